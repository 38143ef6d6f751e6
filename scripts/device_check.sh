#!/usr/bin/env bash
# The CUDA path in one command (issue 19), for a machine with one CUDA GPU and this project installed:
#
#   bash scripts/device_check.sh [MODE] [OUT_DIR]   # default OUT_DIR: runs/device-check (emptied first)
#   DEVICE=cpu bash scripts/device_check.sh         # the same steps on the CPU, to try the script itself
#
# MODE (default basic):
#   basic    the steps below (a few minutes of GPU time, most of it loading)
#   vit-b16  python -m benchmarks.paper_shapes: a randomly initialised ViT-B/16 at 224 px through a training step
#            (batch 128), Gram matrices, a k = 6 RegMean merge, the sweep's scoring and the demo's batch answer,
#            with throughput and peak memory (cost only: random weights say nothing about accuracy)
#   wide     the wide profile's plan and estimate (run_all --plan), then the study itself on the device, resumable,
#            each stage's seconds printed by run_all; WIDE_LIMIT_S (default 480) stops it (timeout) so it fits a
#            lent machine's call: what finished is stored, and the same command continues it
#   all      basic, vit-b16, then wide
#
# Offline (HF_HUB_OFFLINE=1), on the tiny-vit profile (a random tiny ViT on local copies of offline tasks),
# it runs and times: 1. adapter training and a short merge sweep (one process: accelerate and the sweep use
# the GPU); 2. the benchmarks' inference section on the device (torch.cuda.synchronize around every clock
# read, benchmarks/timing.py) and prints its figures; 3. the demo answering one request on the device through
# gradio_client. Each step prints its figures; the script stops at the first failure with a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
MODE=basic
case "${1:-}" in basic|vit-b16|wide|all) MODE=$1; shift ;; esac
OUT=${1:-runs/device-check}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ]; then unset ACCELERATE_USE_CPU; else export ACCELERATE_USE_CPU=1; fi

"$PYTHON" - "$DEVICE" <<'PY'
import sys, torch
device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("error: no CUDA device is visible to torch: run on a GPU machine, or DEVICE=cpu to try the script")
name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
print(f"device check on {name}: torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

if [ "$MODE" != wide ]; then rm -rf "$OUT"; fi  # a wide run continues what an earlier call stored
mkdir -p "$OUT"
STUDY=(--config tiny-vit --db "$OUT/results.duckdb" --artifacts "$OUT/artifacts")
started=$(date +%s)

basic() {
echo "== 1. tiny-vit: train adapters and heads, merge pairs with two methods"
"$PYTHON" training/run_all.py "${STUDY[@]}" --stages train merge --max-k 2 --merge-methods task_arithmetic ties
"$PYTHON" - "$OUT/results.duckdb" <<'PY'
import json, sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
machine = json.loads(con.execute("SELECT machine FROM runs ORDER BY started_at DESC LIMIT 1").fetchone()[0])
print("run machine:", {k: machine.get(k) for k in ("device_name", "cuda", "processes") if k in machine})
for row in con.execute("SELECT model_kind, count(*), round(avg(accuracy), 3) FROM task_results GROUP BY ALL").fetchall():
    print(f"  {row[0]}: {row[1]} trained, mean test accuracy {row[2]}")
for row in con.execute("SELECT method, count(DISTINCT merge_id), round(avg(normalized_accuracy), 3) "
                       "FROM merge_results GROUP BY ALL ORDER BY 1").fetchall():
    print(f"  {row[0]}: {row[1]} merges, mean retention {row[2]}")
PY

echo "== 2. benchmarks: inference on $DEVICE"
"$PYTHON" -m training.bench "${STUDY[@]}" --bench-sections inference --device "$DEVICE" --bench-repeats 10
# (it prints one line per batch size: each variant's median and its ratio to the backbone)

echo "== 3. the demo answering on $DEVICE"
"$PYTHON" scripts/device_demo_check.py "$OUT/results.duckdb" "$DEVICE"
}

vit_b16() {
  echo "== ViT-B/16 at 224 px, random weights: cost only"
  "$PYTHON" -m benchmarks.paper_shapes --device "$DEVICE"
}

wide() {
  local wide=(--config wide --db "$OUT/wide/results.duckdb" --artifacts "$OUT/wide/artifacts")
  mkdir -p "$OUT/wide"
  echo "== wide profile: plan and estimate on $DEVICE"
  "$PYTHON" training/run_all.py "${wide[@]}" --plan
  echo "== wide profile: the study (stopped after ${WIDE_LIMIT_S:-480} s; rerun to continue)"
  local code=0
  timeout --signal=INT "${WIDE_LIMIT_S:-480}" "$PYTHON" training/run_all.py "${wide[@]}" --stages train merge findings \
    || code=$?
  if [ "$code" = 124 ] || [ "$code" = 130 ]; then echo "wide: stopped at the limit; what finished is stored"
  elif [ "$code" != 0 ]; then exit "$code"; fi
  "$PYTHON" training/run_all.py "${wide[@]}" --plan  # what is left
}

case "$MODE" in
  basic) basic ;;
  vit-b16) vit_b16 ;;
  wide) wide ;;
  all) basic; vit_b16; wide ;;
esac
echo "device check ($MODE) passed in $(( $(date +%s) - started )) s"
