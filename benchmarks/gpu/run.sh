#!/usr/bin/env bash
# The GPU kit: one command that proves and measures the pipeline on a GPU host (README, "GPU hosts").
#
#   bash benchmarks/gpu/run.sh             on the GPU host: installs .whl/ (gathered here by
#                                          benchmarks/gpu/gather_wheels.py) into a private folder,
#                                          then runs benchmarks/gpu/kit.py within KIT_DEADLINE_S
#   bash benchmarks/gpu/run.sh --rehearse  here, on the CPU, tiny shapes, no install (CI runs it)
#
# Logs and the report go to $OUT when set (else /tmp/uora-gpu-kit/out); on a GPU the report is
# also written to benchmarks/results/gpu_<device>.md. Exit 0 only if every part passed.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
export KIT_T0=${KIT_T0:-$(date +%s)}
export KIT_WORK=${KIT_WORK:-/tmp/uora-gpu-kit}
out=${OUT:-$KIT_WORK/out}
mkdir -p "$out"

kit() {
    local python
    if [[ "${1:-}" == "--rehearse" ]]; then
        python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        # Tiny shapes: one thread is faster than several, by far on a shared, busy machine.
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    else
        python=${PYTHON:-python3}
        export KIT_SITE="$KIT_WORK/site"
        rm -rf "$KIT_SITE"
        echo "== installing $(ls .whl/*.whl 2>/dev/null | wc -l) wheels from .whl/ into $KIT_SITE"
        timeout 180 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$KIT_SITE" .whl/*.whl \
            || echo "error: the wheel install failed (was .whl carried? see above); going on"
        export PYTHONPATH="$KIT_SITE:$PWD"
    fi
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}
    echo "== $(date -u +%FT%TZ) kit start, deadline ${KIT_DEADLINE_S:-450} s from $KIT_T0, python $python"
    # The kit keeps its own deadline; this outer limit (a minute past it) only guards against the
    # kit itself hanging.
    local limit=$(( ${KIT_DEADLINE_S:-450} + 60 - $(date +%s) + KIT_T0 ))
    timeout -k 10 "$limit" "$python" benchmarks/gpu/kit.py "$@"
}

kit "$@" 2>&1 | tee "$out/run.log"
exit "${PIPESTATUS[0]}"
