#!/usr/bin/env bash
# The whole pipeline on Slurm: prepare (one task) -> train (every node) -> evaluate, export and
# promote (one node). Resources are sbatch options, the rest environment variables (see
# slurm/lib.sh); nothing in this file needs editing.
#
# As one job (the allocation is held throughout; CPU-only stages use one node of it):
#   sbatch slurm/pipeline.sh CONFIG [key=value ...]
#   sbatch --nodes=4 --gpus-per-node=8 --partition=gpu slurm/pipeline.sh configs/llama2_13b.yaml
#
# As three dependent jobs (each asks only for what it needs; run this on a login node):
#   slurm/pipeline.sh --chain [SBATCH_OPTION ...] -- CONFIG [key=value ...]
# submits  prepare (1 node)  ->  train (slurm/train.sh, all nodes)  ->  evaluate+export+promote
# (1 node), linked with --dependency=afterok and --kill-on-invalid-dep=yes (a failed stage
# cancels the rest). The SBATCH_OPTIONs (--partition, --gpus-per-node, --time, ...) go to all
# three; --nodes to the train job only.
#
# Preemption and requeue work as in slurm/train.sh. A requeued job starts from the top: the
# driver skips every stage whose output is up to date (prepare), and training resumes from its
# last checkpoint. The log goes to <submit dir>/<job name>-<job id>.out, appended across restarts.
#
#SBATCH --job-name=uora-pipeline
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
trap 'UORA_PREEMPT_REQUESTED=1' USR1  # first: an early preemption warning must not kill this shell
set -euo pipefail

usage() {
    echo "usage: sbatch [sbatch options] slurm/pipeline.sh CONFIG [key=value ...]" >&2
    echo "       slurm/pipeline.sh --chain [sbatch options] -- CONFIG [key=value ...]" >&2
    exit 2
}
[[ $# -ge 1 ]] || usage

if [[ -z ${UORA_HOME:-} ]]; then
    script=$0
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^[[:space:]]*Command=\([^[:space:]]*\).*/\1/p')
    fi
    UORA_HOME=$(cd "$(dirname "$script")/.." && pwd)
fi
# shellcheck source=slurm/lib.sh
source "$UORA_HOME/slurm/lib.sh"

# --chain: submit the three parts as dependent jobs, print their ids, and return.
chain() {
    local opts=() nodes=() train_opts=() prep finish train
    while [[ $# -gt 0 && $1 != -- ]]; do
        case $1 in
            --nodes=* | -N*) nodes+=("$1") ;;
            *) opts+=("$1") ;;
        esac
        shift
    done
    [[ ${1:-} == -- && $# -ge 2 ]] || usage
    shift
    train_opts=("${opts[@]}" "${nodes[@]}")
    export UORA_HOME
    prep=$(UORA_PIPELINE_PART=prepare sbatch --parsable --job-name=uora-prepare --nodes=1 "${opts[@]}" \
        "$UORA_HOME/slurm/pipeline.sh" "$@")
    train=$(sbatch --parsable --dependency="afterok:${prep%%;*}" --kill-on-invalid-dep=yes "${train_opts[@]}" \
        "$UORA_HOME/slurm/train.sh" "$@")
    finish=$(UORA_PIPELINE_PART=finish sbatch --parsable --job-name=uora-finish --nodes=1 \
        --dependency="afterok:${train%%;*}" --kill-on-invalid-dep=yes "${opts[@]}" \
        "$UORA_HOME/slurm/pipeline.sh" "$@")
    echo "prepare ${prep%%;*}"
    echo "train ${train%%;*}"
    echo "finish ${finish%%;*}"
}

# One stage (or the driver's tail) as a single task on one node. SIGUSR1 (the preemption
# warning meant for training) is ignored here: these stages are resumable by rerunning and
# simply run on until Slurm stops the job.
one_task() {
    srun --nodes=1 --ntasks=1 bash -c 'trap "" USR1; exec "$UORA_PYTHON" -m pipeline "$@"' uora-stage "$@"
}

if [[ $1 == --chain ]]; then
    shift
    chain "$@"
    exit 0
fi

uora_init
part=${UORA_PIPELINE_PART:-all}
config=$1
shift
case $part in
    all | prepare)
        uora_log "prepare"
        one_task prepare "$config" "$@"
        ;;&
    all | train)
        uora_log "train"
        uora_train "$config" "$@"
        ;;&
    all | finish)
        uora_log "evaluate, export, promote"
        one_task run "$config" "$@" --from evaluate
        ;;
    prepare | train) ;;
    *)
        uora_log "UORA_PIPELINE_PART=$part: expected all, prepare, train or finish"
        exit 2
        ;;
esac
uora_log "done ($part)"
