#!/usr/bin/env bash
# Latency under load against the kernel floor, same run (issue 20): `fanout-2m`
# (1 topic x 2,000 subscribers, 1,000 publications/s of 100 B: 2M deliveries/s) on a
# fresh gateway in memory mode, and the kernel floor at the same rate (`wsgate-loadtest
# floor`: plain threads writing ready-made frames to 2,000 sockets), alternating in
# rounds. Prints each run's p50 / p99 / p99.9 and, per round, wsgate's p99 over the
# floor's.
#
#   cargo build --release -p wsgate -p wsgate-loadtest
#   ROUNDS=3 loadtest/bench-floor-latency.sh
#
# Environment: ROUNDS [3], RATE [1000 publications/s], DURATION [10s], WSGATE
# [target/release/wsgate], LT [target/release/wsgate-loadtest], BENCH_OUT [a temp dir]
# (each run's report: floor-N.json, wsgate-N.json, and the summary: latency.txt).
set -euo pipefail
cd "$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"

ROUNDS=${ROUNDS:-3}
RATE=${RATE:-1000}
DURATION=${DURATION:-10s}
WSGATE=${WSGATE:-target/release/wsgate}
LT=${LT:-target/release/wsgate-loadtest}
# shellcheck source=loadtest/bench-common.sh
source loadtest/bench-common.sh
bench_init
require_built "$WSGATE" "$LT"
SRC=127.0.0.2-127.0.0.9

# p50 p99 p99.9 of a report's steady window.
percentiles() {
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); l=r["fanout"]["latency"] if "fanout" in r else r["latency"]; print(l["p50_ms"], l["p99_ms"], l["p999_ms"])' "$1"
}

{
  echo "date: $(date -u +%FT%TZ); load average: $(cut -d' ' -f1-3 /proc/loadavg); wsgate: $(git rev-parse --short HEAD)"
  echo "fanout: 2000 subscribers, 1 topic, 4 publishers, $RATE publications/s, 100 B, $DURATION; floor: the same rate, 149 B payloads (153 B frames)"
  echo "round run p50_ms p99_ms p999_ms"
} >"$OUT/latency.txt"
for r in $(seq "$ROUNDS"); do
  "$LT" floor --sockets 2000 --rate "$RATE" --payload 149 --duration "$DURATION" \
    --source-addrs "$SRC" --out "$OUT/floor-$r.json" >"$OUT/floor-$r.txt" 2>&1
  port=$(free_port); admin=$(free_port)
  "$WSGATE" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --drain-timeout 1s \
    --rate-limit 10000000 --rate-burst 10000000 --log-level warn >>"$OUT/servers.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  wait_port "$port"
  "$LT" fanout --url "ws://127.0.0.1:$port/ws" --server-pid "$pid" --subscribers 2000 --topics 1 \
    --publishers 4 --rate "$RATE" --payload 100 --duration "$DURATION" --source-addrs "$SRC" \
    --no-progress --out "$OUT/wsgate-$r.json" >"$OUT/wsgate-$r.txt" 2>&1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  read -r f50 f99 f999 < <(percentiles "$OUT/floor-$r.json")
  read -r w50 w99 w999 < <(percentiles "$OUT/wsgate-$r.json")
  { echo "$r floor $f50 $f99 $f999"; echo "$r wsgate $w50 $w99 $w999"
    awk -v w="$w99" -v f="$f99" -v r="$r" 'BEGIN { printf "%s p99 wsgate/floor %.2f\n", r, w / f }'; } >>"$OUT/latency.txt"
done
cat "$OUT/latency.txt"
