# Shared by slurm/train.sh and slurm/pipeline.sh (sourced, not run). Bash, `set -euo pipefail`.
#
# Settings (environment variables; sbatch exports the submitting shell's environment):
#   UORA_HOME            repository checkout (default: found from the submitted script's path)
#   UORA_PYTHON          Python with this project installed (default: $UORA_HOME/.venv/bin/python
#                        if it exists, else python3 on PATH)
#   UORA_NPROC_PER_NODE  training processes per node (default: GPUs Slurm gave the node, else 1)
#   UORA_MAX_RESTARTS    how often the job may requeue itself after a preemption (default 20)
#   MASTER_ADDR / MASTER_PORT  rendezvous endpoint (default: first node's address, 20000 +
#                        job id mod 20000)
#   UORA_TRAIN_CMD       training command run on the first node (default: `$UORA_PYTHON -m
#                        pipeline train CONFIG OVERRIDES...`); runs with `bash -c`, CONFIG and
#                        OVERRIDES as "$@". For custom recipes (and the Slurm tests' stand-in).
#   UORA_DONE_FILE       with UORA_TRAIN_CMD: the file that says training finished
#   UORA_PREEMPTED_FILE  with UORA_TRAIN_CMD: the file that says it stopped after a checkpoint

uora_log() { echo "[uora-slurm $(date '+%F %T')] $*" >&2; }

# The first node of the allocation, as an address the other nodes can reach: its NodeAddr from
# slurm.conf (an IP or a resolvable name on real clusters; 127.0.0.1 on the loopback test
# cluster, where node names like "n1" resolve nowhere), else the host name itself.
uora_head_address() {
    local head addr
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    addr=$(scontrol show node -o "$head" 2>/dev/null | sed -n 's/.*[[:space:]]NodeAddr=\([^[:space:]]*\).*/\1/p')
    echo "${addr:-$head}"
}

# Resolve every setting once, in the batch shell, and export what the job steps need.
uora_init() {
    : "${SLURM_JOB_ID:?not inside a Slurm job: submit with sbatch}"
    if [[ -z ${UORA_PYTHON:-} ]]; then
        if [[ -x $UORA_HOME/.venv/bin/python ]]; then UORA_PYTHON=$UORA_HOME/.venv/bin/python; else UORA_PYTHON=python3; fi
    fi
    export UORA_HOME UORA_PYTHON
    export UORA_NPROC_PER_NODE=${UORA_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    export UORA_MAX_RESTARTS=${UORA_MAX_RESTARTS:-20}
    export MASTER_ADDR=${MASTER_ADDR:-$(uora_head_address)}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export UORA_TRAIN_LAUNCHER=$UORA_HOME/slurm/launch.sh
    export PYTHONUNBUFFERED=1
    uora_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0} of at most $UORA_MAX_RESTARTS):" \
        "${SLURM_JOB_NUM_NODES:-1} node(s) [$SLURM_JOB_NODELIST] x $UORA_NPROC_PER_NODE process(es)," \
        "rendezvous $MASTER_ADDR:$MASTER_PORT, python $UORA_PYTHON"
}

# Where training stands for CONFIG + overrides: "complete" (the driver's train output is up to
# date for this config: manifest matches, DONE and the adapter present), "preempted" (the workers
# checkpointed and left the PREEMPTED marker in train.partial/), else "incomplete". Asked of the
# pipeline itself, so a DONE left by an earlier run of a different config never counts.
# For a custom UORA_TRAIN_CMD: UORA_DONE_FILE / UORA_PREEMPTED_FILE say the same.
uora_training_status() {
    if [[ -n ${UORA_DONE_FILE:-} ]]; then
        if [[ -f $UORA_DONE_FILE ]]; then echo complete
        elif [[ -n ${UORA_PREEMPTED_FILE:-} && -f $UORA_PREEMPTED_FILE ]]; then echo preempted
        else echo incomplete; fi
        return
    fi
    "$UORA_PYTHON" - "$@" <<'PY'
import sys
from pipeline.config import ConfigError, load_config
from pipeline.driver import Pipeline
try:
    config = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as error:
    sys.exit("\n".join(error.lines))
if Pipeline(config).up_to_date("train") and (config.run_dir / "train" / "DONE").is_file():
    print("complete")
elif (config.run_dir / "train.partial" / "PREEMPTED").is_file():
    print("preempted")
else:
    print("incomplete")
PY
}

# Run "$@" in the background and wait for it, with the batch shell staying alive on signals.
# A plain foreground command would make bash postpone our traps until it exits.
#   SIGUSR1 to this shell (`--signal=B:USR1@...`, `scancel --batch --signal=USR1`): passed on to
#           the job's steps (the training workers); the preemption then runs as usual.
#   SIGTERM: logged and otherwise ignored; the workers get their own SIGTERM from Slurm and
#           checkpoint, and this shell must live to requeue the job afterwards.
# Sets UORA_RC to the command's exit status (correct under `set -e`).
uora_run_supervised() {
    local pid
    trap 'uora_log "SIGUSR1: asking the training workers to checkpoint"; scancel --signal=USR1 "$SLURM_JOB_ID" || true' USR1
    trap 'uora_log "SIGTERM: waiting for the training workers to checkpoint"' TERM
    "$@" &
    pid=$!
    UORA_RC=0
    while :; do
        if wait "$pid"; then UORA_RC=0; else UORA_RC=$?; fi
        # wait returns early (status > 128) when a trapped signal arrives; the child lives on.
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1 TERM
}

# Training: run it, then finish (complete), requeue (stopped without DONE after a checkpoint),
# or fail. Exits the shell on requeue and failure; returns 0 when training is complete.
# The train command always runs: the driver itself skips a train stage that is up to date.
uora_train() {
    local status restarts
    if [[ -n ${UORA_TRAIN_CMD:-} ]]; then
        uora_run_supervised bash -c "$UORA_TRAIN_CMD" uora-train "$@"
    else
        uora_run_supervised "$UORA_PYTHON" -m pipeline train "$@"
    fi
    status=$(uora_training_status "$@")
    if [[ $status == complete ]]; then
        uora_log "training complete"
        return 0
    fi
    # Stopped after a checkpoint: exit 0 without DONE is the workers' contract; the PREEMPTED
    # marker covers a driver that reports the stop with a non-zero status.
    if [[ $status != preempted ]] && ((UORA_RC != 0)); then
        uora_log "training failed (exit status $UORA_RC) without a checkpointed stop; not requeueing." \
            "Fix the cause, then resubmit the same command: it resumes from the last checkpoint."
        exit "$UORA_RC"
    fi
    restarts=${SLURM_RESTART_COUNT:-0}
    if ((restarts >= UORA_MAX_RESTARTS)); then
        uora_log "training stopped without DONE after $restarts restart(s) (UORA_MAX_RESTARTS=$UORA_MAX_RESTARTS);" \
            "resubmit the same command to resume from the last checkpoint"
        exit 3
    fi
    uora_log "training stopped without DONE (checkpoint saved): requeueing job $SLURM_JOB_ID" \
        "(restart $((restarts + 1)) of at most $UORA_MAX_RESTARTS)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
