#!/usr/bin/env bash
# The CUDA path in one command (issue 19), for a machine with one CUDA GPU and this project installed:
#
#   bash scripts/device_check.sh [OUT_DIR]          # default OUT_DIR: runs/device-check (emptied first)
#   DEVICE=cpu bash scripts/device_check.sh         # the same steps on the CPU, to try the script itself
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

rm -rf "$OUT" && mkdir -p "$OUT"
STUDY=(--config tiny-vit --db "$OUT/results.duckdb" --artifacts "$OUT/artifacts")
started=$(date +%s)
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

echo "device check passed in $(( $(date +%s) - started )) s"
