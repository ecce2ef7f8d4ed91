#!/usr/bin/env bash
# The idle workload (benchmarks.md, "Idle footprint and connect rate") against two
# gateway binaries, alternating, ROUNDS times each, and the kernel-only idle floor
# once per round: a fresh gateway per run, 19,000 connections subscribed to one of
# 100 topics by two generator processes, held HOLD; reports merged per run.
#
#   loadtest/idle-ab.sh BEFORE_BIN AFTER_BIN [ROUNDS] [OUTDIR]
#
# Environment: CONNS (19000), HOLD (20s), SRC (127.0.0.2-127.0.0.9), LT (the
# generator, target/release/wsgate-loadtest), GW_ARGS (extra gateway flags, for
# both binaries). Prints one line per run; the JSON reports stay in OUTDIR.
set -euo pipefail

A=${1:?usage: idle-ab.sh BEFORE_BIN AFTER_BIN [ROUNDS] [OUTDIR]}
B=${2:?usage: idle-ab.sh BEFORE_BIN AFTER_BIN [ROUNDS] [OUTDIR]}
ROUNDS=${3:-2}
OUT=${4:-idle-ab-$(date -u +%Y%m%d-%H%M%S)}
CONNS=${CONNS:-19000}
HOLD=${HOLD:-20s}
SRC=${SRC:-127.0.0.2-127.0.0.9}
LT=${LT:-target/release/wsgate-loadtest}
read -r -a EXTRA <<<"${GW_ARGS:-}"
for f in "$A" "$B" "$LT"; do [[ -x $f ]] || { echo "not an executable: $f" >&2; exit 2; }; done
mkdir -p "$OUT"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GW=""
cleanup() { [[ -n $GW ]] && kill "$GW" 2>/dev/null || true; }
trap cleanup EXIT

run_one() {
  local label=$1 bin=$2 port admin
  port=$(free_port); admin=$(free_port)
  "$bin" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --node-id bench \
    --drain-timeout 1s --rate-limit 10000000 --rate-burst 10000000 --log-level warn \
    "${EXTRA[@]}" >>"$OUT/gateway.log" 2>&1 &
  GW=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  local gens=()
  for k in 0 1; do
    timeout 300 "$LT" idle --target wsgate --url "ws://127.0.0.1:$port/ws" --server-pid "$GW" \
      --label "$label" --connections "$CONNS" --topics 100 --duration "$HOLD" --split "$k/2" \
      --source-addrs "$SRC" --no-progress --out "$OUT/$label-part$k.json" >/dev/null &
    gens+=($!)
  done
  wait "${gens[@]}"
  "$LT" merge "$OUT/$label-part0.json" "$OUT/$label-part1.json" --out "$OUT/$label.json" >/dev/null
  rm -f "$OUT/$label-part0.json" "$OUT/$label-part1.json"
  kill "$GW" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$GW" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$GW" 2>/dev/null || true
  GW=""
  python3 - "$OUT/$label.json" "$label" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
i = r["idle"]
print(f'{sys.argv[2]:<12} held {i["held"]:>6}  {i["server_rss_per_connection_bytes"]:7.0f} B RSS/conn  '
      f'{100 * i["server_cpu_idle_cores"]:.3f}% idle CPU  {r["connect"]["rate_per_s"]:7.0f} connects/s')
EOF
}

floor_one() {
  local label=$1
  timeout 300 "$LT" floor-idle --connections "$CONNS" --duration "$HOLD" --source-addrs "$SRC" \
    --out "$OUT/$label.json" >/dev/null
  python3 - "$OUT/$label.json" "$label" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f'{sys.argv[2]:<12} pings {r["pings"]:>6}  pongs {r["pongs"]:>6}  '
      f'{100 * r["server_cpu_cores"]:.3f}% CPU  {r["server_us_per_ping"]:.2f} us per ping')
EOF
}

for r in $(seq "$ROUNDS"); do
  run_one "before-$r" "$A"
  run_one "after-$r" "$B"
  floor_one "floor-$r"
done
