#!/usr/bin/env bash
# Soak (issue 20): hours of steady traffic, connection churn and Redis restarts against
# a few gateway nodes; fails when anything leaks, a node dies, or data is lost.
#
#   loadtest/soak.sh                       # one hour, 3 nodes, Redis restarted every 10 min
#   loadtest/soak.sh --ci                  # 5 minutes, a restart every 2 minutes
#   loadtest/soak.sh --duration 20m --nodes 2 --restart-every 5m --out soak-out
#
# What runs, all on 127.0.0.1, started and stopped (by pid) by this script:
#   - a redis-server with an append-only file fsynced at every write, so that stream
#     history and sequence numbers survive its restarts (with no persistence a restart
#     is a new epoch: every stream client would be told `reset`, and the soak would
#     prove nothing about resume);
#   - --nodes wsgate nodes on it ($WSGATE_BIN, default target/release/wsgate), with a
#     configuration file that makes `soak.st.*` stream topics;
#   - the load generator ($LOADTEST_BIN, default target/release/wsgate-loadtest):
#       stream  `fanout` on stream topics for the whole run (subscribers spread over
#               the nodes, publishers on other nodes): every seq exactly once, in order;
#       plain   `fanout` on plain topics for the whole run (loss is reported: plain
#               topics are at most once, and a Redis restart loses what was in flight);
#       seg-K   one plain `fanout` per restart period, kept out of the restart windows
#               (from --guard-after after a restart to --guard-before before the next):
#               nothing may be lost there;
#       churn   connect + subscribe + close cycles at --churn-rate for the whole run;
#   - Redis stopped (SIGTERM) and started again every --restart-every;
#   - a sampler scraping every node's /metrics every --sample-every into samples.csv.
# At the end `wsgate-loadtest soak-report` reads everything, prints the verdict and
# per-window latency (also into verdict.txt), draws soak.png and exits non-zero when
# the soak failed
# (loadtest/README.md, "Soak", has the rules).
#
# Options (or environment: SOAK_DURATION, SOAK_NODES, SOAK_RESTART_EVERY, SOAK_OUT):
#   --duration D         loaded phase (default 60m; s/m/h suffixes or seconds)
#   --nodes N            gateway nodes (default 3)
#   --restart-every P    Redis restart period (default 10m; 0: never)
#   --redis-down D       how long Redis stays down at each restart (default 2s)
#   --sample-every D     /metrics scrape period (default 5s)
#   --guard-before D, --guard-after D   plain segments keep this far from restarts
#                        (default 5s, 15s)
#   --rate R             publications/s of each fanout run (default 50)
#   --subscribers S      subscribers of each fanout run (default 60, over 5 topics)
#   --churn-rate R       churn cycles/s (default 20)
#   --settle D           idle time after the load before the final sample (default 20s)
#   --out DIR            results (default: a new temporary directory)
#   --ci                 the CI form: --duration 5m --restart-every 2m --nodes 2
#                        --settle 10s --sample-every 3s (later options override it)
set -euo pipefail
# The whole script is one compound command, read before it runs: editing the file
# while a soak runs cannot change what the running soak does next.
{
cd "$(dirname "$0")/.."
ROOT=$PWD
source loadtest/bench-common.sh

secs() { # 90, 90s, 5m, 1h -> seconds
  local v=$1
  case $v in
    *h) echo $((${v%h} * 3600)) ;; *m) echo $((${v%m} * 60)) ;; *s) echo "${v%s}" ;; *) echo "$v" ;;
  esac
}

DURATION=${SOAK_DURATION:-60m} NODES=${SOAK_NODES:-3} RESTART_EVERY=${SOAK_RESTART_EVERY:-10m}
OUT=${SOAK_OUT:-} REDIS_DOWN=2s SAMPLE_EVERY=5s GUARD_BEFORE=5s GUARD_AFTER=15s
RATE=50 SUBSCRIBERS=60 TOPICS=5 CHURN_RATE=20 SETTLE=20s
while [[ $# -gt 0 ]]; do
  case $1 in
    --duration) DURATION=$2; shift ;;
    --nodes) NODES=$2; shift ;;
    --restart-every) RESTART_EVERY=$2; shift ;;
    --redis-down) REDIS_DOWN=$2; shift ;;
    --sample-every) SAMPLE_EVERY=$2; shift ;;
    --guard-before) GUARD_BEFORE=$2; shift ;;
    --guard-after) GUARD_AFTER=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --subscribers) SUBSCRIBERS=$2; shift ;;
    --churn-rate) CHURN_RATE=$2; shift ;;
    --settle) SETTLE=$2; shift ;;
    --out) OUT=$2; shift ;;
    --ci) DURATION=5m RESTART_EVERY=2m NODES=2 SETTLE=10s SAMPLE_EVERY=3s ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (--help)" >&2; exit 2 ;;
  esac
  shift
done
D=$(secs "$DURATION") P=$(secs "$RESTART_EVERY") DOWN=$(secs "$REDIS_DOWN")
SAMPLE=$(secs "$SAMPLE_EVERY") GB=$(secs "$GUARD_BEFORE") GA=$(secs "$GUARD_AFTER")
SETTLE_S=$(secs "$SETTLE")
WSGATE=${WSGATE_BIN:-$ROOT/target/release/wsgate}
LOADTEST=${LOADTEST_BIN:-$ROOT/target/release/wsgate-loadtest}
for b in "$WSGATE" "$LOADTEST"; do
  [[ -x $b ]] || { echo "missing $b (cargo build --release -p wsgate -p wsgate-loadtest)" >&2; exit 2; }
done
command -v redis-server >/dev/null || { echo "soak: needs redis-server" >&2; exit 2; }
command -v curl >/dev/null || { echo "soak: needs curl" >&2; exit 2; }

TMP=$(mktemp -d)
OUT=${OUT:-$(mktemp -d -t wsgate-soak.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/{samples,events}.csv "$OUT"/*.json "$OUT"/*.log
PIDS=() SAMPLER_PID="" REDIS_PID=""
# Stops what is still running (Redis: only the current one), then removes TMP.
cleanup() {
  local live=()
  for p in "${PIDS[@]}" $REDIS_PID; do kill -0 "$p" 2>/dev/null && live+=("$p"); done
  for p in "${live[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 30); do
    local any=0
    for p in "${live[@]}"; do kill -0 "$p" 2>/dev/null && any=1; done
    ((any)) || break
    sleep 0.1
  done
  for p in "${live[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
log() { echo "[soak $(date -u +%H:%M:%S)] $*" >&2; }
now_ms() { date +%s%3N; }
event() { echo "$(now_ms),$1,${2:-}" >>"$OUT/events.csv"; }
echo "t_ms,event,detail" >"$OUT/events.csv"

# --- Redis, persistent: AOF fsynced at every write, in a directory kept across restarts.
REDIS_PORT=$(free_port)
mkdir -p "$TMP/redis"
start_redis() {
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$TMP/redis" --save "" \
    --appendonly yes --appendfsync always --loglevel warning \
    --client-output-buffer-limit "pubsub 256mb 64mb 60" >>"$OUT/redis.log" 2>&1 &
  REDIS_PID=$!
  wait_port "$REDIS_PORT"
  # Serving only once the append-only file is loaded.
  for _ in $(seq 100); do
    [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] && return 0
    sleep 0.1
  done
}
stop_redis() {
  kill -TERM "$REDIS_PID" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$REDIS_PID" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$REDIS_PID" 2>/dev/null || true
}
start_redis

# --- Gateway nodes.
cat >"$TMP/wsgate.toml" <<EOF
# Stream topics of the soak; soak.pl.* and the others stay plain.
[[namespaces]]
name = "soak"
topics = ["soak.st.*"]
history_size = 100000
history_ttl = "2h"
EOF
WS_URLS=() PUB_URLS=() METRICS=() NODE_PIDS=()
for i in $(seq 0 $((NODES - 1))); do
  port=$(free_port); admin=$(free_port)
  "$WSGATE" --config "$TMP/wsgate.toml" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --redis-url "redis://127.0.0.1:$REDIS_PORT" --node-id "soak-$i" --drain-timeout 1s \
    --rate-limit 100000 --rate-burst 100000 --log-level warn >>"$OUT/node-$i.log" 2>&1 &
  NODE_PIDS+=($!); PIDS+=($!)
  wait_port "$port" || { tail -5 "$OUT/node-$i.log" >&2; exit 1; }
  WS_URLS+=("ws://127.0.0.1:$port/ws"); METRICS+=("http://127.0.0.1:$admin/metrics")
done
# Publishers take the nodes in another order than subscribers: most publications cross
# nodes through Redis.
for i in $(seq 0 $((NODES - 1))); do PUB_URLS+=("${WS_URLS[$(((i + 1) % NODES))]}"); done
for m in "${METRICS[@]}"; do
  for _ in $(seq 100); do
    curl -fsS --max-time 2 "$m" 2>/dev/null | grep -q '^wsgate_redis_up 1' && break
    sleep 0.1
  done
done

# --- Sampler: every node's /metrics every $SAMPLE s.
sample_node() { # index -> one CSV line
  local i=$1 alive=1 vals
  kill -0 "${NODE_PIDS[$i]}" 2>/dev/null || alive=0
  vals=$(curl -fsS --max-time 3 "${METRICS[$i]}" 2>/dev/null | awk '
    $1=="process_resident_memory_bytes"{r=$2} $1=="process_open_fds"{f=$2}
    $1=="wsgate_runtime_tasks"{t=$2} $1=="wsgate_connections"{c=$2}
    $1=="wsgate_messages_delivered_total"{d=$2} $1=="wsgate_redis_up"{u=$2}
    END{ if (r=="") print ",,,,,"; else printf "%d,%d,%d,%d,%d,%d", r, f, t, c, d, u }') || vals=",,,,,"
  echo "$(now_ms),$i,$alive,$vals"
}
echo "t_ms,node,alive,rss_bytes,open_fds,tasks,connections,delivered_total,redis_up" >"$OUT/samples.csv"
(
  while :; do
    for i in "${!NODE_PIDS[@]}"; do sample_node "$i" >>"$OUT/samples.csv" & done
    wait
    sleep "$SAMPLE"
  done
) &
SAMPLER_PID=$!; PIDS+=("$SAMPLER_PID")

log "out: $OUT; $NODES nodes, Redis on $REDIS_PORT; ${D}s of load, Redis restarted every ${P}s"
event nodes_ready "$NODES"
sleep $((3 * SAMPLE))   # the idle baseline: a few samples before any client

# --- The load.
common=(--no-progress --threads 1 --warmup 10s --tail 2s)
urls=(); for u in "${WS_URLS[@]}"; do urls+=(--url "$u"); done
purls=(); for u in "${PUB_URLS[@]}"; do purls+=(--pub-url "$u"); done
fan() { # name prefix duration -> a fanout run in the background (pid in LAST)
  "$LOADTEST" fanout "${common[@]}" "${urls[@]}" "${purls[@]}" --topic-prefix "$2" \
    --duration "${3}s" --subscribers "$SUBSCRIBERS" --topics "$TOPICS" --publishers "$TOPICS" \
    --rate "$RATE" --payload 100 --drain 10s --label "$1" --out "$OUT/$1.json" \
    >"$OUT/$1.log" 2>&1 &
  LAST=$!; PIDS+=("$LAST")
}
T0=$(date +%s)
event load_start "$D"
GEN=()
fan stream soak.st. "$D"; GEN+=("$LAST")
fan plain soak.pl. "$D"; GEN+=("$LAST")
"$LOADTEST" churn "${common[@]}" "${urls[@]}" --topic-prefix soak.ch. --duration "${D}s" \
  --rate "$CHURN_RATE" --concurrency 8 --topics 20 --label churn --out "$OUT/churn.json" \
  >"$OUT/churn.log" 2>&1 &
GEN+=($!); PIDS+=($!)

# Restarts at P, 2P, … before the end; plain segments between them, off the guards.
RESTARTS=()
if ((P > 0)); then for ((r = P; r < D; r += P)); do RESTARTS+=("$r"); done; fi
bounds=(0 "${RESTARTS[@]}" "$D")
SEGS=() k=0
at() { local w=$((T0 + $1 - $(date +%s))); ((w > 0)) && sleep "$w"; return 0; }
for ((j = 0; j + 1 < ${#bounds[@]}; j++)); do
  from=${bounds[$j]} to=${bounds[$((j + 1))]}
  ((j > 0)) && from=$((from + GA))
  ((to < D)) && to=$((to - GB))
  len=$((to - from - 12))   # leave room for its ramp and its drain
  if ((len >= 10)); then
    at "$from"
    fan "seg-$k" "soak.seg$k." "$len"; SEGS+=("$LAST"); event segment_start "seg-$k"
    k=$((k + 1))
  fi
  if ((j + 1 < ${#bounds[@]} - 1)); then
    at "${bounds[$((j + 1))]}"
    log "Redis restart $((j + 1))/${#RESTARTS[@]}"
    event redis_stop
    stop_redis
    sleep "$DOWN"
    start_redis
    event redis_start
  fi
done

# --- The end: every generator stops by itself (duration + drain); bounded wait anyway.
deadline=$((T0 + D + 120))
for p in "${GEN[@]}" "${SEGS[@]}"; do
  while kill -0 "$p" 2>/dev/null && (($(date +%s) < deadline)); do sleep 1; done
  kill -0 "$p" 2>/dev/null && { log "generator $p overran; stopped"; kill "$p" || true; }
done
event load_end
log "load over; ${SETTLE_S}s to settle"
sleep "$SETTLE_S"
event settled
sleep $((2 * SAMPLE + 1))   # the final idle samples
event stop
kids=$(pgrep -P "$SAMPLER_PID" || true)
kill "$SAMPLER_PID" 2>/dev/null || true
# shellcheck disable=SC2086 # its children's pids, one a word
[[ -n $kids ]] && kill $kids 2>/dev/null || true
for i in "${!NODE_PIDS[@]}"; do
  kill -0 "${NODE_PIDS[$i]}" 2>/dev/null || event node_dead "$i"
done
set +e
"$LOADTEST" soak-report --dir "$OUT" --chart "$OUT/soak.png" | tee "$OUT/verdict.txt"
status=${PIPESTATUS[0]}
log "results in $OUT"
exit "$status"
}
