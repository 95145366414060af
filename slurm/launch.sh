#!/usr/bin/env bash
# One torchrun per node of the current Slurm allocation, all joined by one c10d rendezvous.
#
#   slurm/launch.sh TARGET [ARGS...]      e.g. slurm/launch.sh -m pipeline.stages.train_worker SPEC
#
# slurm/train.sh and slurm/pipeline.sh export UORA_TRAIN_LAUNCHER=<this file>; the train stage
# then starts its workers through it instead of a single-node `torchrun --standalone`. It reads
# what slurm/lib.sh exported in the batch shell: MASTER_ADDR, MASTER_PORT, UORA_NPROC_PER_NODE,
# UORA_PYTHON.
#
# Signals. `scancel --signal=USR1 JOBID` (which is also how the batch shell passes on the
# `--signal=B:USR1@grace` warning) and `--signal=USR1@grace` reach every process of the job
# step: the node's shell, torchrun and the workers. torchrun's elastic agent does not
# handle SIGUSR1, so its default action would kill the agent (and then the workers) before they
# can checkpoint. The node shell therefore sets SIGUSR1 to "ignore" before exec'ing torchrun:
# torchrun inherits the ignore, while the workers install their own handler (which replaces an
# inherited ignore), set the preemption flag, checkpoint and exit 0; torchrun then exits 0 too.
# SIGTERM keeps torchrun's default: it forwards it to the workers and waits for them.
set -euo pipefail

: "${SLURM_JOB_ID:?slurm/launch.sh runs inside a Slurm job (sbatch slurm/train.sh ...)}"
: "${MASTER_ADDR:?MASTER_ADDR not set (slurm/lib.sh sets it)}"
: "${MASTER_PORT:?MASTER_PORT not set (slurm/lib.sh sets it)}"
: "${UORA_NPROC_PER_NODE:?UORA_NPROC_PER_NODE not set (slurm/lib.sh sets it)}"
export UORA_PYTHON=${UORA_PYTHON:-python3}

# Single quotes: $SLURM_NODEID etc. are expanded by each node's own shell, not by this one.
# The target and its arguments travel as positional parameters, so no quoting is lost.
exec srun --nodes="${SLURM_JOB_NUM_NODES:-$SLURM_NNODES}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    --label bash -c '
        trap "" USR1
        echo "node $SLURM_NODEID ($(hostname)): torchrun, $UORA_NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
        exec "$UORA_PYTHON" -m torch.distributed.run \
            --nnodes="$SLURM_NNODES" --nproc_per_node="$UORA_NPROC_PER_NODE" \
            --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
            --max_restarts=0 "$@"
    ' uora-node "$@"
