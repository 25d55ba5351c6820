#!/usr/bin/env bash
# A real fleet on one machine: mosquitto with a generated password file and per-device ACL, the
# cloud (`hmf-cloud start`) and six device processes of tiers 1, 2 and 3 (`hmf-device join`) on
# the shipped HAPT data, a few rounds, then everything stops cleanly.
#
#   scripts/demo_fleet.sh                       # 3 rounds, fp32 weights on the wire
#   ROUNDS=5 TRANSFER=float16 scripts/demo_fleet.sh
#
# Settings (environment): OUT (runs/fleet-demo), PORT (18883), ROUNDS (3), TRANSFER (float32 or
# float16), BIN (.venv/bin). Logs: $OUT/logs/. Needs mosquitto (Debian: apt-get install mosquitto).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/fleet-demo}
PORT=${PORT:-18883}
ROUNDS=${ROUNDS:-3}
TRANSFER=${TRANSFER:-float32}
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$MOSQUITTO" ] || { echo "mosquitto not found (apt-get install mosquitto)" >&2; exit 1; }
[ -x "$BIN/hmf-cloud" ] || { echo "$BIN/hmf-cloud not found: run 'make test' or set BIN" >&2; exit 1; }

rm -rf "$OUT"
mkdir -p "$OUT/logs"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# 1. the data: the simulator's split of HAPT (Dirichlet, alpha 0.5), one file per device
"$BIN/hmf-cloud" partition --out "$OUT/data" --clients 6 --participants 6 --partition dirichlet \
  --alpha 0.5 --seed 0

# 2. the broker: passwords and ACL for the six devices and the cloud, loopback only
"$BIN/hmf-cloud" broker-config --out "$OUT/broker" --devices "$OUT/data/fleet.json" \
  --port "$PORT" --bind 127.0.0.1 --run-as "$(id -un)"
"$MOSQUITTO" -c "$OUT/broker/mosquitto.conf" >"$OUT/logs/mosquitto.log" 2>&1 &
pids+=($!)
sleep 1

# 3. the devices (each with its own password), then the cloud, which waits for all six
SECRETS="$OUT/broker/secrets"
devices=()
for data in "$OUT"/data/dev-*.npz; do
  id=$(basename "$data" .npz)
  "$BIN/hmf-device" join --broker "mqtt://127.0.0.1:$PORT" --device-id "$id" \
    --password-file "$SECRETS/$id.txt" --data "$data" --work-dir "$OUT/devices/$id" \
    --threads 1 >"$OUT/logs/$id.log" 2>&1 &
  devices+=($!)
  pids+=($!)
done
"$BIN/hmf-cloud" start --broker "mqtt://127.0.0.1:$PORT" --username hmf-cloud \
  --password-file "$SECRETS/hmf-cloud.txt" --fleet "$OUT/data/fleet.json" \
  --participants 6 --rounds "$ROUNDS" --local-epochs 1 --batch-size 32 --hypernet-epochs 5 \
  --min-updates 4 --wait-devices 6 --round-timeout 300 --transfer-dtype "$TRANSFER" \
  --eval-data "$OUT/data/eval.npz" --threads 1 --out "$OUT/run" 2>&1 | tee "$OUT/logs/cloud.log"

# 4. the run is over: the devices leave on their own when they hear it
for pid in "${devices[@]}"; do wait "$pid"; done
echo "devices: $(grep -l 'finished after' "$OUT"/logs/dev-*.log | wc -l) of 6 left cleanly; logs in $OUT/logs"
echo "metrics: $OUT/run/metrics.jsonl, summary: $OUT/run/summary.json"
