# Shared by slurm/train.sh and slurm/pipeline.sh (sourced, not run). Bash, `set -euo pipefail`.
#
# Settings (environment variables; sbatch exports the submitting shell's environment):
#   UORA_HOME            repository checkout (default: found from the submitted script's path)
#   UORA_PYTHON          Python with this project installed (default: $UORA_HOME/.venv/bin/python
#                        if it exists, else python3 on PATH)
#   UORA_NPROC_PER_NODE  training processes per node (default: GPUs Slurm gave the node, else 1)
#   UORA_MAX_RESTARTS    how often the job may requeue itself after a preemption (default 20)
#   UORA_RESIGNAL_S      while a preemption warning is pending, repeat it to the workers this
#                        often until they have stopped (default 5)
#   MASTER_ADDR / MASTER_PORT  rendezvous endpoint (default: first node's address, 20000 +
#                        job id mod 20000)
#   UORA_TRAIN_CMD       training command run on the first node (default: `$UORA_PYTHON -m
#                        pipeline train CONFIG OVERRIDES...`); runs with `bash -c`, CONFIG and
#                        OVERRIDES as "$@". For custom recipes (and the Slurm tests' stand-in).
#   UORA_DONE_FILE       with UORA_TRAIN_CMD: the file that says training finished
#   UORA_PREEMPTED_FILE  with UORA_TRAIN_CMD: the file that says it stopped after a checkpoint
#   UORA_SKIP_PLAN       set (e.g. 1): train without the pre-flight plan (see uora_plan)
#   UORA_GPU_MEMORY      GiB per GPU for the plan (default: read from the first node's GPU)

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
    uora_note_usr1
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

# The files whose appearance means the workers are done with signals (training finished, or
# stopped after a checkpoint): <run dir>/train.partial/{DONE,PREEMPTED}, or for a custom
# UORA_TRAIN_CMD, UORA_DONE_FILE and UORA_PREEMPTED_FILE. Repeating SIGUSR1 stops once one
# exists: a worker already shutting down (Python has restored default handlers) must not be hit.
uora_stop_markers() {
    if [[ -n ${UORA_DONE_FILE:-} ]]; then
        echo "$UORA_DONE_FILE"
        if [[ -n ${UORA_PREEMPTED_FILE:-} ]]; then echo "$UORA_PREEMPTED_FILE"; fi
        return
    fi
    "$UORA_PYTHON" - "$@" <<'PY' || true
import sys
from pipeline.config import ConfigError, load_config
try:
    config = load_config(sys.argv[1], sys.argv[2:])
except ConfigError:
    sys.exit(0)
print(config.run_dir / "train.partial" / "DONE")
print(config.run_dir / "train.partial" / "PREEMPTED")
PY
}

uora_any_file() {
    local f
    for f in "$@"; do [[ -f $f ]] && return 0; done
    return 1
}

# Alive and not a zombie (an exited child that bash has not reaped yet still answers kill -0).
uora_running() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

# Ask every process of the job's steps (not this batch shell) to checkpoint and stop.
uora_signal_workers() { scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || true; }

# Run "$@" in the background and wait for it, with the batch shell staying alive on signals.
# A plain foreground command would make bash postpone our traps until it exits.
#   SIGUSR1 to this shell (`#SBATCH --signal=B:USR1@...`, `scancel --batch --signal=USR1`):
#           passed on to the job's steps (the training workers), and repeated every
#           UORA_RESIGNAL_S seconds (default 5) until training has stopped (a stop marker, see
#           uora_stop_markers): a warning that arrives while the workers are still starting
#           (before their handler exists; torchrun and the node shells ignore SIGUSR1) is not
#           lost. The workers treat repeats as one request.
#   SIGTERM: logged and otherwise ignored; the workers get their own SIGTERM from Slurm and
#           checkpoint, and this shell must live to requeue the job afterwards.
# Sets UORA_RC to the command's exit status (correct under `set -e`).
uora_run_supervised() {
    local pid tick every=${UORA_RESIGNAL_S:-5} next=0
    trap 'UORA_PREEMPT_REQUESTED=1; uora_log "SIGUSR1: asking the training workers to checkpoint"' USR1
    trap 'uora_log "SIGTERM: waiting for the training workers to checkpoint"' TERM
    if [[ -n ${UORA_PREEMPT_REQUESTED:-} ]]; then
        uora_log "SIGUSR1 arrived before training started: asking the workers to checkpoint at once"
    fi
    "$@" &
    pid=$!
    # Poll once a second with `read -t` on a pipe nobody writes (no process per tick); traps run
    # during the read. `wait` only once the command has exited, so its status is read exactly once.
    exec {tick}<> <(:)
    while uora_running "$pid"; do
        read -r -t 1 -u "$tick" || true
        if [[ -n ${UORA_PREEMPT_REQUESTED:-} ]] && ((SECONDS >= next)) && uora_running "$pid" &&
            ! uora_any_file "${UORA_MARKERS[@]}"; then
            uora_signal_workers
            next=$((SECONDS + every))
        fi
    done
    exec {tick}<&-
    if wait "$pid"; then UORA_RC=0; else UORA_RC=$?; fi
    trap - TERM
    uora_note_usr1
}

# Outside training (prepare, evaluate, export, setup) a SIGUSR1 to the batch shell must not kill
# it (bash's default action): note it and carry on. Training that starts afterwards is asked to
# checkpoint at once; the other stages resume when rerun. train.sh and pipeline.sh set the same
# trap as their very first command, so a warning during setup is not lost either.
uora_note_usr1() {
    trap 'UORA_PREEMPT_REQUESTED=1; uora_log "SIGUSR1 outside training: noted (training, if it starts, checkpoints at once)"' USR1
}

# Pre-flight: `python -m pipeline plan` for this allocation (nodes x processes per node, one GPU
# each). "Will not fit" stops the job before any training, with the plan's reason; a plan that
# cannot run (e.g. the model's config.json is not available offline yet) is logged and training
# goes ahead. Skipped for CPU allocations (no GPUs on the node) and when UORA_SKIP_PLAN is set.
uora_plan() {
    local rc=0 memory=()
    if [[ -n ${UORA_SKIP_PLAN:-} ]]; then
        uora_log "plan skipped (UORA_SKIP_PLAN=$UORA_SKIP_PLAN)"
        return 0
    fi
    if ((${SLURM_GPUS_ON_NODE:-0} == 0)); then
        uora_log "plan skipped: no GPUs in this allocation (CPU nodes)"
        return 0
    fi
    if [[ -n ${UORA_GPU_MEMORY:-} ]]; then memory=(--gpu-memory "$UORA_GPU_MEMORY"); fi
    "$UORA_PYTHON" -m pipeline plan "$@" --nodes "${SLURM_JOB_NUM_NODES:-1}" \
        --gpus-per-node "$UORA_NPROC_PER_NODE" "${memory[@]}" || rc=$?
    if ((rc == 1)); then
        uora_log "the plan says this will not fit (see above): not training. Change the config or the" \
            "allocation, or set UORA_SKIP_PLAN=1 to train anyway."
        exit 1
    elif ((rc != 0)); then
        uora_log "the plan could not run (exit status $rc, see above): training anyway"
    fi
}

# Training: run it, then finish (complete), requeue (stopped without DONE after a checkpoint),
# or fail. Exits the shell on requeue and failure; returns 0 when training is complete.
# The train command always runs: the driver itself skips a train stage that is up to date.
uora_train() {
    local status restarts
    uora_plan "$@"
    mapfile -t UORA_MARKERS < <(uora_stop_markers "$@")
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
