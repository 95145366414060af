#!/usr/bin/env bash
# Multi-node training of one config on Slurm: one torchrun per node, c10d rendezvous, requeue on
# preemption. Nothing in this file needs editing: resources are sbatch options, the rest are
# environment variables (sbatch passes your environment to the job).
#
#   sbatch slurm/train.sh CONFIG [key=value ...]
#   sbatch --nodes=4 --gpus-per-node=8 --partition=gpu --time=2-00:00:00 slurm/train.sh configs/llama2_13b.yaml
#   sbatch --gpus-per-node=0 slurm/train.sh CONFIG   # CPU nodes: one process per node
#
# Defaults below (#SBATCH lines): 2 nodes x 8 GPUs, one task per node, 24 h, the cluster's
# default partition. Environment (see slurm/lib.sh for all): UORA_NPROC_PER_NODE (default: the
# GPUs Slurm gave each node, else 1), UORA_MAX_RESTARTS (20), UORA_PYTHON, UORA_HOME.
#
# What happens: the batch shell (on the first node) first runs `python -m pipeline plan CONFIG ...`
# for the allocation and stops with the plan's reason when the config will not fit its GPUs
# (UORA_SKIP_PLAN=1 skips it; CPU allocations are not planned); then it runs `python -m pipeline
# train CONFIG ...`, whose workers are started on every node by slurm/launch.sh (srun, one torchrun per node).
# Preemption: Slurm sends SIGUSR1 to this batch shell 5 minutes before the time limit, which
# passes it on to the workers (`scancel --signal=USR1 JOBID` reaches the workers directly, at any
# time); they checkpoint and exit 0 without
# writing DONE; this script then requeues the job (`scontrol requeue`), at most
# UORA_MAX_RESTARTS times, and the requeued job resumes from the checkpoint. The log is appended
# to across restarts: <submit dir>/<job name>-<job id>.out.
#
#SBATCH --job-name=uora-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
trap 'UORA_PREEMPT_REQUESTED=1' USR1  # first: an early preemption warning must not kill this shell
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch [sbatch options] slurm/train.sh CONFIG [key=value ...]" >&2
    exit 2
fi

# The checkout: $UORA_HOME, else the folder above this script. Inside a job $0 is Slurm's spooled
# copy, so the submitted path is taken from the job record.
if [[ -z ${UORA_HOME:-} ]]; then
    script=$0
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^[[:space:]]*Command=\([^[:space:]]*\).*/\1/p')
    fi
    UORA_HOME=$(cd "$(dirname "$script")/.." && pwd)
fi
# shellcheck source=slurm/lib.sh
source "$UORA_HOME/slurm/lib.sh"

uora_init
uora_train "$@"
