#!/usr/bin/env bash
# All five strategies side by side on HAPT by subject: same seed, same partition, same tiers
# (thirds), the demo's settings for 30 rounds. Results in runs/hapt-subject/<strategy>/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-30}
SEED=${SEED:-0}
OUT=${OUT:-runs/hapt-subject}
for s in ${STRATEGIES:-hypemefed depthwise fedavg heterofl fedavg-small}; do
  .venv/bin/hmf simulate --strategy "$s" --rounds "$ROUNDS" --seed "$SEED" --out "$OUT/$s" --resume
done
.venv/bin/hmf plot "$OUT"/* --out "$OUT/accuracy.png" --title "HAPT by subject, seed $SEED"
