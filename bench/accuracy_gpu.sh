#!/usr/bin/env bash
# The accuracy benchmark on a lent GPU machine (16 cores, one GPU, a few minutes of device time
# per session): the runs named by ONLY (default: the CIFAR-10 settings of the cpu scale) on cuda,
# JOBS at a time. Expects .gpu/ to hold cifar10_jpeg.npz, small_index.npz and make_small.py (see
# docs/RESULTS.md). Results come back as $OUT/runs.tgz (run directories without checkpoints),
# re-packed every 30 s so that a run cut off by the device's time limit still returns what it did.
# THREADS sets torch threads per run. SCALE=full ONLY=... runs the authors' setting instead;
# with DEADLINE (seconds) inside the call limit, a second call on the still-warm machine
# resumes the cut runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SCALE=${SCALE:-cpu}
ONLY=${ONLY:-cifar10-}
# inside the checkout (ignored by git): a warm machine keeps it between calls, so a second call
# resumes every cut run from its checkpoint
RUNS=${RUNS:-runs/gpu}
mkdir -p .gpu/small "$RUNS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
pack() { tar czf "$OUT/runs.tmp" --exclude checkpoint.hmf --exclude '*.tmp' -C "$RUNS" . \
  && mv "$OUT/runs.tmp" "$OUT/runs.tgz"; }
( while sleep 30; do pack; done ) &
PACKER=$!
[ "$SCALE" = full ] || $PY .gpu/make_small.py .gpu || exit 1
CIFAR=.gpu/small; [ "$SCALE" = full ] && CIFAR=.gpu
PYTHONUNBUFFERED=1 $PY bench/accuracy.py run --scale "$SCALE" --device cuda --jobs "${JOBS:-16}" \
  --threads "${THREADS:-1}" --runs "$RUNS" --cifar-dir "$CIFAR" --extras --only "$ONLY" \
  ${DEADLINE:+--deadline-s "$DEADLINE"} \
  2>&1 | tee "$OUT/${SCALE}_scale.log"
kill $PACKER; pack
