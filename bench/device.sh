#!/usr/bin/env bash
# The whole GPU suite in one command, sized for a short rationed lease (under 8 minutes on one H100):
#   1. tile tuning of the attention kernels at A-JEPA shapes (bench/tune_attention.py); the tuned
#      table is exported as AJEPA_ATTN_TILES, so every later section runs on the tiles it picked
#   2. kernel tests natively (tests/test_gather.py, test_attention.py, test_attention_tiles.py,
#      test_ema.py), in parallel when pytest-xdist is there
#   3. the fused-path parity test (tests/test_fused_path.py), natively with bf16
#   4. kernel benchmarks: gather + EMA, then attention (FlexAttention last)
#   5. the end-to-end step benchmark (tiny + base, reference + triton, bf16, with a kernel profile),
#      then the fused path again at base B=64, the batch the reference path fits
#   6. the input pipeline: a base-preset corpus written here (ajepa synth, ajepa prepare), the per-core
#      loader paths (bench.loader), and the base step end to end from the shards beside the
#      synthetic-input step (bench.e2e, issue #15's 95% / 5% targets)
#   7. one merged JSON and the Markdown table, printed last
# Run from anywhere: `bash bench/device.sh`. Runs from the source tree (PYTHONPATH=., no pip install).
# Output goes to $OUT when set (the device machine's return folder), else bench/results/:
#   device.log, the tile table, one JSON per benchmark section, the merged *_all.json and
#   speedups.png (8 files, no subfolders; 7 with TUNE=0).
# Wheels in .whl/ (e.g. xformers 0.0.35, see bench/README.md) are installed into /tmp/site first.
# Set AJEPA_COMMIT=<sha> to record the commit where no .git travels with the tree.
# Every section runs under `timeout`, so one slow part cannot eat the others' time.
# SECTIONS=env,bench-step (comma list) runs only those sections (e.g. a CPU dry run of the plumbing).
# TUNE=0 skips the tuning and runs everything on the built-in tile table; COMPILE=1 adds the
# train.compile step beside the eager fused one (a 240 s section of its own).

set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
export OUT="$OUT_DIR" PYTHONUNBUFFERED=1
LOG="$OUT_DIR/device.log"
: >"$LOG"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
MARK=$(mktemp)  # this run's JSON files are the ones newer than this
SUMMARY=()

log() { echo "$*" | tee -a "$LOG"; }

section() {  # section NAME SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    if [ -n "${SECTIONS:-}" ] && [[ ",$SECTIONS," != *",$name,"* ]]; then
        SUMMARY+=("$name: not selected (SECTIONS=$SECTIONS)")
        return
    fi
    start=$(date +%s)
    log ""
    log "=== $name (budget ${limit}s, at +$((start - T0))s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && log "=== $name: TIMED OUT after ${limit}s (partial results kept)"
    log "=== $name: rc=$rc in $(($(date +%s) - start))s"
    SUMMARY+=("$name: rc=$rc, $(($(date +%s) - start))s of ${limit}s")
}

if compgen -G ".whl/*.whl" >/dev/null; then
    log "installing carried wheels: $(ls .whl)"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | tee -a "$LOG"; then
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
    else
        log "wheel install failed: continuing without them"
    fi
fi

section env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv; \
    $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"gpu\", torch.cuda.get_device_name())'; \
    $PY -c 'import xformers; print(\"xformers\", xformers.__version__)' 2>&1 | tail -1"

if [ "${TUNE:-1}" != 0 ]; then
    section tune-attention 60 "$PY" -m bench.tune_attention
    TILES=$(find "$OUT_DIR" -maxdepth 1 -name '*_attention-tiles.json' -newer "$MARK" | sort | tail -1)
    if [ -n "$TILES" ]; then
        export AJEPA_ATTN_TILES="$TILES"
        log "=== later sections use the tuned tiles: AJEPA_ATTN_TILES=$TILES"
    else
        log "=== no tuned tile table was written: later sections use the built-in table"
    fi
fi

XDIST=()
"$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)  # 8 workers compile the test kernels in parallel
section kernel-tests 90 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" tests/test_gather.py \
    tests/test_attention.py tests/test_attention_tiles.py tests/test_ema.py

# 90 s: the torch.compile test (inductor) alone outlasted a 45 s budget on the H100 machines
section fused-path-test 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_path.py

section bench-gather-ema 55 "$PY" -m pytest -q -p no:cacheprovider bench/test_gather.py bench/test_ema.py
section bench-attention 115 "$PY" -m pytest -q -p no:cacheprovider bench/test_attention.py
section bench-step 105 "$PY" -m bench.step --no-progress --profile-steps 3
# the fused path at the batch the reference path fits (it runs out of memory at base B=128)
section bench-step-b64 40 "$PY" -m bench.step --no-progress --preset base --batch-size 64 --impl triton
# COMPILE=1: train.compile (torch.compile, dynamic token counts) against the hand-fused eager step above;
# its warm-up time is the compile time. Off by default: the whole suite must fit one short lease.
if [ "${COMPILE:-0}" = 1 ]; then
    section bench-step-compile 240 "$PY" -m bench.step --no-progress --preset base --batch-size 64 --impl triton \
        --set train.compile=true
fi
# the input pipeline (issue #15): the corpus is written here, so the run needs nothing from outside
E2E=/tmp/ajepa-e2e
section bench-loader 60 "$PY" -m bench.loader
section bench-e2e 150 bash -c "rm -rf $E2E && $PY -m ajepa.cli synth --out $E2E/audio --clips 512 --preset base \
    --no-progress && $PY -m ajepa.cli prepare --data $E2E/audio --out $E2E/shards --workers 8 --no-progress \
    && $PY -m bench.e2e --data $E2E/shards --preset base --no-progress"

log ""
log "=== summary (total $(($(date +%s) - T0))s before the report)"
for line in "${SUMMARY[@]}"; do log "  $line"; done
log ""
# One merged JSON of this run, and its Markdown table as the last thing printed.
mapfile -t RUN_JSON < <(find "$OUT_DIR" -maxdepth 1 -name '*.json' -newer "$MARK" | sort)
if [ "${#RUN_JSON[@]}" -eq 0 ]; then
    log "no JSON results were written by this run"
else
    timeout -k 5 30 "$PY" -m bench.report "${RUN_JSON[@]}" --write "$OUT_DIR" --plot "$OUT_DIR/speedups.png" 2>&1 \
        | tee -a "$LOG"
fi
rm -f "$MARK"
