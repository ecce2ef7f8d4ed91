#!/usr/bin/env bash
# Scale-out run (issue 20): N gateway nodes with Redis between them (one Redis, or a
# 3-primary Redis Cluster with CLUSTER=1), and generator processes sized to the
# open-file limit, each taking its share of the connections (`scale --split K/P`):
# rooms and tickers published through other nodes than their subscribers', churn,
# default heartbeats. A progress bar while it runs (connections held and deliveries/s,
# summed over the nodes' /metrics); at the end the merged report, its summary and the
# chart (connections, deliveries/s, latency, the nodes' RSS over time).
#
#   cargo build --release -p wsgate -p wsgate-loadtest
#   loadtest/bench-scale.sh                           # 500,000 connections over 30 nodes
#   CLUSTER=1 loadtest/bench-scale.sh                 # the same through a 3-shard cluster
#   BENCH_QUICK=1 loadtest/bench-scale.sh             # 4 nodes x 2,000 connections, 15 s
#   NODES=8 CONNS=40000 DUR=60s loadtest/bench-scale.sh
#
# Environment (defaults in brackets): NODES [30], CONNS [500000], DUR [120s],
# ROOM_SIZE [10], ROOM_RATE [0.01 publications/s per room], TICKERS [50],
# TICKER_RATE [0.01/s per ticker; with 500,000 connections: 5,000 + 5,000 = 10,000
# deliveries/s offered, a ticker publication to 10,000 subscribers every 2 s], CHURN [0.015: 1.5 % of the connections a minute],
# PAYLOAD [100], ON_TIME [500ms], PER_PROC [18600 connections per generator process,
# below the 20,000 open files a process may have], THREADS [1 per generator process],
# CONCURRENCY [32 connects in flight per process], RAMP_S [10 + CONNS/3000: seconds
# given to the ramp before publishing starts], PER_ADDR [20000 connections per source
# address], CLUSTER [0], BENCH_OUT [a temp dir], WSGATE [target/release/wsgate],
# LT [target/release/wsgate-loadtest], NODE_ARGS [extra gateway flags].
# Everything binds to 127.0.0.0/8, every process is bounded in time and stopped by
# pid at exit.
set -euo pipefail
cd "$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
  NODES=${NODES:-4}; CONNS=${CONNS:-2000}; DUR=${DUR:-15s}
  ROOM_RATE=${ROOM_RATE:-0.5}; TICKER_RATE=${TICKER_RATE:-2}; CHURN=${CHURN:-0.5}
  PER_PROC=${PER_PROC:-1000}
fi
NODES=${NODES:-30}
CONNS=${CONNS:-500000}
DUR=${DUR:-120s}
ROOM_SIZE=${ROOM_SIZE:-10}
ROOM_RATE=${ROOM_RATE:-0.01}
TICKERS=${TICKERS:-50}
TICKER_RATE=${TICKER_RATE:-0.01}
CHURN=${CHURN:-0.015}
PAYLOAD=${PAYLOAD:-100}
ON_TIME=${ON_TIME:-500ms}
PER_PROC=${PER_PROC:-18600}
THREADS=${THREADS:-1}
CONCURRENCY=${CONCURRENCY:-32}
RAMP_S=${RAMP_S:-$((10 + CONNS / 3000))}
PER_ADDR=${PER_ADDR:-20000}
CLUSTER=${CLUSTER:-0}
WSGATE=${WSGATE:-target/release/wsgate}
LT=${LT:-target/release/wsgate-loadtest}
NODE_ARGS=${NODE_ARGS:-}
# shellcheck source=loadtest/bench-common.sh
source loadtest/bench-common.sh
bench_init

require_built "$WSGATE" "$LT"
# Every process here may open as many files as the hard limit allows.
ulimit -n "$(ulimit -Hn)"

# A port p with p + 10000 free too (a cluster node's bus port).
cluster_port() {
  while :; do
    local p=$((20000 + RANDOM % 30000))
    if ! ss -ltnH "sport = :$p" | grep -q . && ! ss -ltnH "sport = :$((p + 10000))" | grep -q .; then
      echo "$p"; return
    fi
  done
}

log() { printf '== %s\n' "$*" >&2; }

# 1. Redis.
REDIS_PIDS=()
if [[ $CLUSTER == 1 ]]; then
  CPORTS=()
  for _ in 1 2 3; do
    p=$(cluster_port); mkdir -p "$TMP/r$p"
    redis-server --bind 127.0.0.1 --port "$p" --save "" --appendonly no --dir "$TMP/r$p" \
      --cluster-enabled yes --cluster-config-file nodes.conf \
      --client-output-buffer-limit "pubsub 256mb 64mb 60" --loglevel warning >>"$OUT/servers.log" 2>&1 &
    wait_port "$p"; pid=$(pid_of_port "$p"); PIDS+=("$pid"); REDIS_PIDS+=("$pid"); CPORTS+=("$p")
  done
  redis-cli --cluster create $(for p in "${CPORTS[@]}"; do echo "127.0.0.1:$p"; done) \
    --cluster-replicas 0 --cluster-yes >/dev/null
  for _ in $(seq 100); do
    redis-cli -p "${CPORTS[0]}" cluster info | grep -q cluster_state:ok && break; sleep 0.1
  done
  sleep 1
  SEEDS=$(for p in "${CPORTS[@]}"; do echo -n "redis://127.0.0.1:$p,"; done)
  REDIS_ARGS=(--redis-mode cluster --redis-url "${SEEDS%,}")
  log "Redis Cluster: 3 primaries on ${CPORTS[*]}"
else
  start_bench_redis
  REDIS_PIDS=("$REDIS_PID")
  REDIS_ARGS=(--redis-url "redis://127.0.0.1:$REDIS_PORT")
  log "Redis on $REDIS_PORT"
fi

# 2. The nodes. Automatic rebalancing is off: the fleet does not change during the
# run, and the assignment of connections to nodes is even by construction.
URLS=() METRICS=() NODE_PIDS=()
for n in $(seq 0 $((NODES - 1))); do
  port=$(free_port); admin=$(free_port)
  # shellcheck disable=SC2086
  "$WSGATE" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --node-id "scale-$n" \
    --log-level warn --rebalance-auto false "${REDIS_ARGS[@]}" $NODE_ARGS >>"$OUT/servers.log" 2>&1 &
  wait_port "$port"; wait_port "$admin"
  pid=$(pid_of_port "$port"); PIDS+=("$pid"); NODE_PIDS+=("$pid")
  URLS+=("ws://127.0.0.1:$port/ws"); METRICS+=("http://127.0.0.1:$admin/metrics")
done
for m in "${METRICS[@]}"; do
  for _ in $(seq 200); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' "${m%/metrics}/readyz") == 200 ]] && break
    sleep 0.05
  done
done
log "$NODES nodes ready"

# 3. The generator processes, all publishing from the same instant.
PROCS=$(((CONNS + PER_PROC - 1) / PER_PROC))
ADDRS=$(((CONNS + PER_ADDR - 1) / PER_ADDR))
SRC="127.0.0.2-127.0.0.$((1 + ADDRS))"
(( ADDRS <= 250 )) || { echo "too many source addresses: $ADDRS" >&2; exit 1; }
START_AT=$(($(date +%s%3N) + RAMP_S * 1000))
DUR_S=$(( $(sed 's/s$//' <<<"$DUR") ))
URL_LIST=$(IFS=,; echo "${URLS[*]}")
{
  echo "date: $(date -u +%FT%TZ)"; echo "cpus: $(nproc)"; echo "redis: $(redis-server --version | cut -d' ' -f3)"
  echo "nodes: $NODES; connections: $CONNS over $PROCS generator processes, source addresses $SRC"
  echo "mix: rooms of $ROOM_SIZE at $ROOM_RATE/s, $TICKERS tickers at $TICKER_RATE/s, payload $PAYLOAD B, churn $CHURN/min, $DUR"
  echo "cluster: $CLUSTER"
} >"$OUT/env.txt"
log "$PROCS generator processes, $CONNS connections over $SRC; publishing starts in ${RAMP_S}s"
GEN_PIDS=()
for k in $(seq 0 $((PROCS - 1))); do
  cmd=("$LT" scale --url "$URL_LIST" --split "$k/$PROCS" --start-at "$START_AT"
    --connections "$CONNS" --room-size "$ROOM_SIZE" --room-rate "$ROOM_RATE"
    --tickers "$TICKERS" --ticker-rate "$TICKER_RATE" --churn "$CHURN" --payload "$PAYLOAD"
    --on-time "$ON_TIME" --duration "$DUR" --warmup 5s --tail 2s --threads "$THREADS"
    --connect-concurrency "$CONCURRENCY" --connect-timeout 30s --source-addrs "$SRC"
    --topic-prefix "scale.$START_AT." --no-progress --out "$OUT/part-$k.json")
  if [[ $k == 0 ]]; then
    # One process watches the nodes and Redis (CPU, RSS) for the whole run.
    cmd+=(--server-pid "$(IFS=,; echo "${NODE_PIDS[*]}")" --redis-pid "$(IFS=,; echo "${REDIS_PIDS[*]}")")
  fi
  echo "${cmd[*]}" >>"$OUT/commands.txt"
  timeout $((RAMP_S + DUR_S + 120)) "${cmd[@]}" >"$OUT/part-$k.txt" 2>&1 &
  GEN_PIDS+=("$!"); PIDS+=("$!")
done

# 4. Progress: connections held and deliveries/s over all nodes, from their /metrics.
scrape() { # prints: connections delivered
  for m in "${METRICS[@]}"; do curl -s --max-time 2 "$m" || true; done |
    awk '/^wsgate_connections / { c += $2 } /^wsgate_messages_delivered_total/ { d += $2 } END { printf "%d %d\n", c, d }'
}
bar() { # done total width
  local n=$(( $1 * $3 / ($2 > 0 ? $2 : 1) )); (( n > $3 )) && n=$3
  printf '%s%s' "$(printf '%*s' "$n" '' | tr ' ' '=')" "$(printf '%*s' $(($3 - n)) '')"
}
END_MS=$((START_AT + DUR_S * 1000))
read -r _ last_d < <(scrape); last_t=$(date +%s%3N)
while :; do
  alive=0
  for p in "${GEN_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  (( alive )) || break
  sleep 5
  read -r conns d < <(scrape); now=$(date +%s%3N)
  rate=$(( (d - last_d) * 1000 / (now - last_t > 0 ? now - last_t : 1) )); last_d=$d; last_t=$now
  if (( now < START_AT )); then
    phase="ramp    [$(bar "$conns" "$CONNS" 30)]"
  else
    phase="publish [$(bar $((now - START_AT)) $((END_MS - START_AT)) 30)]"
  fi
  line=$(printf '%s %7d/%d connections  %8d deliveries/s' "$phase" "$conns" "$CONNS" "$rate")
  if [[ -t 2 ]]; then printf '\r%s' "$line" >&2; else echo "$line" >&2; fi
done
[[ -t 2 ]] && echo >&2
failed=0
for k in "${!GEN_PIDS[@]}"; do
  wait "${GEN_PIDS[$k]}" || { echo "generator $k failed: see $OUT/part-$k.txt" >&2; failed=1; }
done

# 5. The merged report and chart.
"$LT" merge "$OUT"/part-*.json --out "$OUT/scale.json" --chart "$OUT/scale.png" | tee "$OUT/summary.txt"
python3 - "$OUT/scale.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
f, s = r["fanout"], r["scale"]
l = f["latency"]
per = [n["rss_per_connection_bytes"] for n in s["node_stats"] if n["rss_per_connection_bytes"]]
opt = lambda v, d=2: "?" if v is None else f"{v:.{d}f}"
print("| nodes | connections held | deliveries/s | p50 ms | p99 ms | p99.9 ms | expected | lost | late | node RSS/conn (mean, max) | nodes CPU s/M | Redis CPU s/M | generator CPU s/M | generator RSS/conn |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
print(f"| {s['nodes']} | {s['held']} / {s['connections']} | {f['deliveries_per_s_steady']:.0f} | {l['p50_ms']:.1f} | {l['p99_ms']:.1f} | "
      f"{l['p999_ms']:.1f} | {f['expected']} | {f['lost']} | {s['late']} | "
      f"{sum(per) / max(len(per), 1):.0f} B, {max(per, default=0):.0f} B | {opt(s['nodes_cpu_s_per_million'])} | "
      f"{opt(s['redis_cpu_s_per_million'])} | {opt(s['generator_cpu_s_per_million'])} | "
      f"{opt(s['generator_rss_per_connection_bytes'], 0)} B |")
EOF
echo "results: $OUT (scale.json, scale.png, summary.txt, part-*.txt, commands.txt)"
exit "$failed"
