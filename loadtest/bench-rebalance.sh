#!/usr/bin/env bash
# Rebalancing benchmark (issue 18): a scale-out from 3 to 5 gateways under $CLIENTS
# WebSocket clients behind HAProxy (leastconn), with automatic rebalancing: the time
# until every node holds its share within the margin, the clients shed (1012) and
# reconnected, and the latency of a live topic before, during and after.
#
#   loadtest/bench-rebalance.sh                 # 10,000 clients, results under $BENCH_OUT
#   BENCH_QUICK=1 loadtest/bench-rebalance.sh   # 600 clients: checks the script (< 1 min)
#
# Per configuration ("rate:presence-timeout" in CONFIGS), from scratch:
#   - one redis-server; gateways gw1-gw3 (`--rebalance-auto` is on with Redis);
#   - $LBS HAProxy processes, each the shipped deploy/haproxy/haproxy.cfg with two more
#     server lines (gw4, gw5: DOWN until those gateways start). More than one because a
#     process may hold 20,000 files here and a tunnel holds two;
#   - $CLIENTS clients (loadtest/rebalance_clients.py, source addresses 127.0.0.2-9)
#     spread over the LBs; on 1012 they reconnect after 0-1 s and subscribe again.
#     $PROBES of them, in a process of their own, subscribe to `live`, published at
#     $LIVE_RATE/s: their latency is the gateways' and the LB's. The others ($WORKERS
#     processes) subscribe to `live.all` at $ALL_RATE/s: every client takes live
#     deliveries, at a rate Python clients keep up with on a small machine;
#   - publishers: `POST /api/publish` (to gw1), the send time in data; a monitor polls
#     `GET /api/info` every 0.5 s (nodes.csv);
#   - $BEFORE of steady state, then gw4 and gw5 start; from both being ready, the time
#     until every node is within the margin of its share and every client connected
#     (at most $MAX_WAIT), then $AFTER more.
# Environment: BENCH_OUT (a temp dir), CLIENTS (10000), WORKERS (4), PROBES (50), LBS (2),
# CONFIGS ("0.01:30s 0.05:30s 0.05:6s"), LIVE_RATE (10), ALL_RATE (0.5), BEFORE (15), AFTER (15),
# MAX_WAIT (150), MARGIN (0.1), BUILD (0: use target/release/wsgate as it is),
# WSGATE (target/release/wsgate).
# Everything binds 127.0.0.1 on free ports, every wait is bounded, and what the
# script started is stopped at exit, by pid.
set -euo pipefail
cd "$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
  D_CLIENTS=600 D_CONFIGS="0.05:6s" D_BEFORE=5 D_AFTER=5 D_MAX_WAIT=40
else
  D_CLIENTS=10000 D_CONFIGS="0.01:30s 0.05:30s 0.05:6s" D_BEFORE=15 D_AFTER=15 D_MAX_WAIT=150
fi
CLIENTS=${CLIENTS:-$D_CLIENTS}
CONFIGS=${CONFIGS:-$D_CONFIGS}
BEFORE=${BEFORE:-$D_BEFORE}
AFTER=${AFTER:-$D_AFTER}
MAX_WAIT=${MAX_WAIT:-$D_MAX_WAIT}
WORKERS=${WORKERS:-4}
PROBES=${PROBES:-50}
ALL_RATE=${ALL_RATE:-0.5}
LBS=${LBS:-2}
LIVE_RATE=${LIVE_RATE:-10}
MARGIN=${MARGIN:-0.1}
WSGATE=${WSGATE:-target/release/wsgate}
KEY=bench-rebalance-key
SRCS=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9
DRIVER=loadtest/rebalance_clients.py
# shellcheck source=loadtest/bench-common.sh
source loadtest/bench-common.sh
bench_init

# Appends a command line to $D/commands.txt, scratch and output paths made generic.
record() { local l="$*"; l=${l//$TMP/\$TMP}; l=${l//$OUT/out}; echo "$l" >>"$D/commands.txt"; }
log() { printf '== %s %s\n' "$(date -u +%T)" "$*" >&2; }
now() { date +%s.%N; }

if [[ ${BUILD:-0} == 1 ]]; then
  log "building the release binary"
  cargo build --release -p wsgate
fi
[[ -x $WSGATE ]] || { echo "no $WSGATE: cargo build --release -p wsgate" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)"

# Waits (up to $2 s) until $1 answers 200.
wait_http() {
  local end=$((SECONDS + $2))
  until [[ $(curl -s -o /dev/null -m 1 -w '%{http_code}' "$1") == 200 ]]; do
    ((SECONDS < end)) || { echo "no 200 from $1" >&2; return 1; }
    sleep 0.1
  done
}

# Stops the processes of one configuration (RUN_PIDS), by pid, TERM then KILL.
stop_run() {
  for p in "${RUN_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 30); do
    local alive=0
    for p in "${RUN_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for p in "${RUN_PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  RUN_PIDS=()
}

# start_gateway <n> <rate> <presence-timeout>: gw<n> on WS[n]/ADMIN[n].
start_gateway() {
  local n=$1
  record "$WSGATE" --listen "127.0.0.1:${WS[$n]}" --admin-listen "127.0.0.1:${ADMIN[$n]}" \
    --node-id "gw$n" --redis-url "redis://127.0.0.1:$REDIS_PORT" --api-key "$KEY" \
    --presence-timeout "$3" --rebalance-rate "$2" --rebalance-margin "$MARGIN" \
    --drain-timeout 1s --log-level info --log-format json
  "$WSGATE" --listen "127.0.0.1:${WS[$n]}" --admin-listen "127.0.0.1:${ADMIN[$n]}" \
    --node-id "gw$n" --redis-url "redis://127.0.0.1:$REDIS_PORT" --api-key "$KEY" \
    --presence-timeout "$3" --rebalance-rate "$2" --rebalance-margin "$MARGIN" \
    --drain-timeout 1s --log-level info --log-format json >>"$D/gw$n.log" 2>&1 &
  GW_PID[$n]=$!
  PIDS+=("$!"); RUN_PIDS+=("$!")
}

{
  echo "date: $(date -u +%FT%TZ)"; echo "cpus: $(nproc)"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "redis: $(redis-server --version 2>/dev/null | cut -d' ' -f3)"
  echo "haproxy: $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f3)"
  echo "python websockets: $(python3 -c 'import websockets; print(websockets.__version__)')"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "sizes: $CLIENTS clients ($PROBES probes of live at $LIVE_RATE/s in a process of their own, the others" \
    "on live.all at $ALL_RATE/s in $WORKERS processes) over $LBS HAProxy processes;" \
    "before $BEFORE s, after $AFTER s, at most $MAX_WAIT s to converge; margin $MARGIN; configs $CONFIGS"
} >"$OUT/env.txt"
echo "$0 # CLIENTS=$CLIENTS CONFIGS='$CONFIGS' WORKERS=$WORKERS PROBES=$PROBES LBS=$LBS LIVE_RATE=$LIVE_RATE ALL_RATE=$ALL_RATE BEFORE=$BEFORE AFTER=$AFTER MAX_WAIT=$MAX_WAIT" >"$OUT/commands.txt"

for CONF in $CONFIGS; do
  RATE=${CONF%%:*} PT=${CONF#*:}
  D="$OUT/rate-$RATE-pt-$PT"
  rm -rf "$D"; mkdir -p "$D"
  RUN_PIDS=()
  log "config: rebalance rate $RATE, presence timeout $PT"
  printf '{"clients": %d, "probes": %d, "rate": "%s", "presence_timeout": "%s", "margin": %s, "live_rate": %s, "all_rate": %s}\n' \
    "$CLIENTS" "$PROBES" "$RATE" "$PT" "$MARGIN" "$LIVE_RATE" "$ALL_RATE" >"$D/config.json"

  start_bench_redis
  RUN_PIDS+=("$REDIS_PID")
  declare -a WS ADMIN GW_PID
  for n in 1 2 3 4 5; do WS[$n]=$(free_port); ADMIN[$n]=$(free_port); done
  for n in 1 2 3; do start_gateway "$n" "$RATE" "$PT"; done
  for n in 1 2 3; do wait_http "http://127.0.0.1:${ADMIN[$n]}/readyz" 20; done

  # The shipped HAProxy config, with two more slots.
  sed -e '/^    server gw3 /a\' \
      -e '    server gw4 "${LB_GW4-wsgate-4:8080}" port "${LB_GW4_ADMIN_PORT-9090}"\' \
      -e '    server gw5 "${LB_GW5-wsgate-5:8080}" port "${LB_GW5_ADMIN_PORT-9090}"' \
      deploy/haproxy/haproxy.cfg >"$TMP/haproxy.cfg"
  grep -q '^    server gw5 ' "$TMP/haproxy.cfg" || { echo "haproxy.cfg: no gw3 line to extend" >&2; exit 1; }
  URLS=() STATS=()
  for l in $(seq "$LBS"); do
    lb=$(free_port) st=$(free_port)
    record "LB_BIND=127.0.0.1:$lb LB_CHECK_INTERVAL=500ms LB_GW<n>=127.0.0.1:<ws port> LB_GW<n>_ADMIN_PORT=<admin port> (n = 1..5)" \
      haproxy -db -f "$TMP/haproxy.cfg"
    env LB_BIND="127.0.0.1:$lb" LB_STATS_BIND="127.0.0.1:$st" LB_DNS="127.0.0.1:$(free_port)" \
      LB_CHECK_INTERVAL=500ms \
      LB_GW1="127.0.0.1:${WS[1]}" LB_GW1_ADMIN_PORT="${ADMIN[1]}" \
      LB_GW2="127.0.0.1:${WS[2]}" LB_GW2_ADMIN_PORT="${ADMIN[2]}" \
      LB_GW3="127.0.0.1:${WS[3]}" LB_GW3_ADMIN_PORT="${ADMIN[3]}" \
      LB_GW4="127.0.0.1:${WS[4]}" LB_GW4_ADMIN_PORT="${ADMIN[4]}" \
      LB_GW5="127.0.0.1:${WS[5]}" LB_GW5_ADMIN_PORT="${ADMIN[5]}" \
      haproxy -db -f "$TMP/haproxy.cfg" >"$D/haproxy-$l.log" 2>&1 &
    PIDS+=("$!"); RUN_PIDS+=("$!"); LB_PID[$l]=$!
    wait_port "$lb"
    URLS+=(--url "ws://127.0.0.1:$lb/ws"); STATS+=("$st")
  done
  # gw1-3 UP in every LB before the clients come (rise 2 x 500 ms).
  for st in "${STATS[@]}"; do
    for _ in $(seq 100); do
      [[ $(curl -s -m 1 "http://127.0.0.1:$st/stats;csv" | grep -c '^gateways,gw[123],.*,UP,') == 3 ]] && break
      sleep 0.1
    done
  done

  API="http://127.0.0.1:${WS[1]}/api"
  record python3 "$DRIVER" monitor --api "$API" --key "$KEY" --pub "live:$LIVE_RATE" --pub "live.all:$ALL_RATE" \
    --nodes 5 --clients "$CLIENTS" --margin "$MARGIN" --dir "$D"
  python3 "$DRIVER" monitor --api "$API" --key "$KEY" --pub "live:$LIVE_RATE" --pub "live.all:$ALL_RATE" \
    --nodes 5 --clients "$CLIENTS" --margin "$MARGIN" --dir "$D" &
  MON_PID=$!; PIDS+=("$!"); RUN_PIDS+=("$!")
  # The probes: $PROBES clients of `live` in a process of their own (a light one, so
  # their latency is the gateways' and the LB's, not a busy client's).
  W_PIDS=()
  record python3 "$DRIVER" clients "${URLS[@]}" --count "$PROBES" --first 0 --src "$SRCS" \
    --topic live --status "$D/status-probe.json" --out "$D/latency-probe.bin"
  python3 "$DRIVER" clients "${URLS[@]}" --count "$PROBES" --first 0 --src "$SRCS" \
    --topic live --status "$D/status-probe.json" --out "$D/latency-probe.bin" &
  W_PIDS+=("$!"); PIDS+=("$!"); RUN_PIDS+=("$!")
  rest=$((CLIENTS - PROBES))
  per=$(((rest + WORKERS - 1) / WORKERS))
  for w in $(seq 0 $((WORKERS - 1))); do
    first=$((w * per)); count=$((rest - first < per ? rest - first : per)); first=$((first + PROBES))
    record python3 "$DRIVER" clients "${URLS[@]}" --count "$count" --first "$first" --src "$SRCS" \
      --topic live.all --connect-rate 400 --status "$D/status-$w.json" --out "$D/latency-$w.bin"
    python3 "$DRIVER" clients "${URLS[@]}" --count "$count" --first "$first" --src "$SRCS" \
      --topic live.all --connect-rate 400 --status "$D/status-$w.json" --out "$D/latency-$w.bin" &
    W_PIDS+=("$!"); PIDS+=("$!"); RUN_PIDS+=("$!")
  done
  connected() { python3 -c "import json,glob; print(sum(json.load(open(p))['connected'] for p in glob.glob('$D/status-*.json')))" 2>/dev/null || echo 0; }
  end=$((SECONDS + 120))
  until [[ $(connected) == "$CLIENTS" ]]; do
    ((SECONDS < end)) || { echo "only $(connected) of $CLIENTS clients connected" >&2; break; }
    sleep 0.5
  done
  log "$(connected) clients connected; $BEFORE s steady"
  now >"$D/all_in.t"
  sleep "$BEFORE"

  # The scale-out.
  declare -A CPU0=()
  for n in 1 2 3; do CPU0[gw$n]=$(cpu_s "${GW_PID[$n]}"); done
  for l in $(seq "$LBS"); do CPU0[haproxy$l]=$(cpu_s "${LB_PID[$l]}"); done
  now >"$D/start.t"
  start_gateway 4 "$RATE" "$PT"; start_gateway 5 "$RATE" "$PT"
  wait_http "http://127.0.0.1:${ADMIN[4]}/readyz" 20; wait_http "http://127.0.0.1:${ADMIN[5]}/readyz" 20
  now >"$D/ready.t"
  CPU0[gw4]=0 CPU0[gw5]=0
  log "gw4, gw5 ready; waiting (at most $MAX_WAIT s) for the fleet to converge"
  end=$((SECONDS + MAX_WAIT))
  until [[ -f $D/converged.t ]]; do
    ((SECONDS < end)) || { log "not converged after $MAX_WAIT s"; break; }
    sleep 0.5
  done
  {
    printf '{'
    sep=""
    for n in 1 2 3 4 5; do
      printf '%s"gw%d": %s' "$sep" "$n" "$(awk -v a="${CPU0[gw$n]}" -v b="$(cpu_s "${GW_PID[$n]}")" 'BEGIN{printf "%.2f", b - a}')"; sep=", "
    done
    for l in $(seq "$LBS"); do
      printf ', "haproxy%d": %s' "$l" "$(awk -v a="${CPU0[haproxy$l]}" -v b="$(cpu_s "${LB_PID[$l]}")" 'BEGIN{printf "%.2f", b - a}')"
    done
    printf '}\n'
  } >"$D/cpu.json"
  log "converged: $(cat "$D/converged.t" 2>/dev/null || echo no); $AFTER s after"
  sleep "$AFTER"
  now >"$D/end.t"
  echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$D/load.txt"

  # Workers write their latencies on TERM; then everything else stops.
  for p in "${W_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${W_PIDS[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  kill "$MON_PID" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$MON_PID" 2>/dev/null || break; sleep 0.1; done
  stop_run
  for n in 1 2 3 4 5; do grep -h '"rebalancing' "$D/gw$n.log" >>"$D/rebalance-log.jsonl" || true; done
  record python3 "$DRIVER" report --dir "$D"
  python3 "$DRIVER" report --dir "$D" | tee -a "$OUT/rows.md"
  rm -f "$D"/latency-*.bin "$D"/gw?.log "$D"/haproxy-*.log
  [[ -f $D/converged.t ]] || echo "$CONF: not converged" >>"$OUT/errors.txt"
done
log "results in $OUT (rows.md, */summary.json, */nodes.csv)"
