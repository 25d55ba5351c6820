#!/usr/bin/env bash
# The accuracy benchmark on a lent GPU machine (16 cores, one GPU, ~9 minutes): every cpu-scale
# run (72, on cuda) plus the authors' full setting for the main strategies at alpha 0.1, as far
# as the deadline allows (the full setting's runs are cut and marked so). Expects .gpu/ to hold
# cifar10_jpeg.npz, small_index.npz and make_small.py (see docs/RESULTS.md); results come back
# as $OUT/runs.tgz (run directories without checkpoints) and the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEADLINE=${DEADLINE:-470}
RUNS=/tmp/runs
mkdir -p .gpu/small "$RUNS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY .gpu/make_small.py .gpu || exit 1
export PYTHONUNBUFFERED=1
$PY bench/accuracy.py run --scale cpu --device cuda --jobs "${CPU_JOBS:-10}" --runs "$RUNS" \
  --cifar-dir .gpu/small --deadline-s "$DEADLINE" > "$OUT/cpu_scale.log" 2>&1 &
$PY bench/accuracy.py run --scale full --device cuda --jobs "${FULL_JOBS:-6}" --runs "$RUNS" \
  --cifar-dir .gpu --deadline-s "$DEADLINE" \
  --only "dir0.1/hypemefed/s0,dir0.1/depthwise/s0,dir0.1/fedavg/s0" > "$OUT/full_scale.log" 2>&1 &
wait
tar czf "$OUT/runs.tgz" --exclude checkpoint.hmf --exclude '*.tmp' -C "$RUNS" .
tail -n 3 "$OUT"/*.log
