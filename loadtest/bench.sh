#!/usr/bin/env bash
# Benchmarks: the same workloads against wsgate, the Node ws + Redis baseline
# (loadtest/peers/) and NATS's WebSocket listener, on loopback, in one run.
#
#   loadtest/bench.sh install   # install what is missing (Debian packages, npm ci)
#   loadtest/bench.sh           # build, start servers, run everything (< 10 min)
#   BENCH_QUICK=1 loadtest/bench.sh   # a smaller, faster run (smoke test)
#
# Results: $BENCH_OUT (default docs/bench/): one JSON report + PNG chart per
# workload and target, floor/ (the kernel-only fan-out at the same rates),
# summary.md (the comparison table), machine.txt, and the exact commands in
# commands.txt. Every server binds 127.0.0.1 on free ports and is
# stopped at the end; every generator run is bounded in time.
#
# Environment: BENCH_OUT, BENCH_QUICK, BENCH_TARGETS (default "wsgate peer nats"),
# BENCH_NICE (e.g. -5: run servers and generator at that niceness, to lessen the
# noise of other work on a shared machine; needs root).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${BENCH_OUT:-docs/bench}"
TARGETS="${BENCH_TARGETS:-wsgate peer nats}"
NICE="${BENCH_NICE:-0}"
TMP="$(mktemp -d)"
PIDS=()

# Workload sizes (quick mode is for checking the script, not for numbers).
if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
  SUBS=200; IDLE_CONNS=2000; DUR=4s; HOLD=3s; CHURN_DUR=4s
else
  SUBS=2000; IDLE_CONNS=19000; DUR=10s; HOLD=20s; CHURN_DUR=8s
fi
# Publications per second that offer 500,000, 2,000,000 and 6,000,000 deliveries/s
# to SUBS subscribers of one topic.
RATE_500K=$((500000 / SUBS)); RATE_2M=$((2000000 / SUBS)); RATE_6M=$((6000000 / SUBS))
SRC="127.0.0.2-127.0.0.9"

log() { printf '\n== %s\n' "$*" >&2; }

install() {
  local pkgs=()
  command -v redis-server >/dev/null || pkgs+=(redis-server redis-tools)
  command -v nats-server >/dev/null || pkgs+=(nats-server)
  command -v node >/dev/null || pkgs+=(nodejs)
  command -v npm >/dev/null || pkgs+=(npm)
  command -v fc-match >/dev/null || pkgs+=(fontconfig fonts-dejavu-core)
  if ((${#pkgs[@]})); then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
  fi
  [[ -d loadtest/peers/node_modules ]] || (cd loadtest/peers && npm ci --no-audit --no-fund)
}

# shellcheck source=loadtest/bench-common.sh
source "$ROOT/loadtest/bench-common.sh"
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts "$@" in the background; remembers the listener's pid in $SPID.
start() {
  local port=$1; shift
  nice -n "$NICE" "$@" >>"$TMP/servers.log" 2>&1 &
  wait_port "$port"
  SPID=$(pid_of_port "$port")
  PIDS+=("$SPID")
}

stop() { kill "$1" 2>/dev/null || true; for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done; kill -9 "$1" 2>/dev/null || true; }

start_redis() { REDIS_PORT=$(free_port); start "$REDIS_PORT" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no; REDIS_PID=$SPID; }

HAS_REDIS=0
# Starts one server of $1's kind; sets URL, PID, METRICS (may be empty).
start_server() {
  local kind=$1 node=${2:-a} port; port=$(free_port)
  METRICS=""
  case $kind in
    wsgate)
      local admin; admin=$(free_port)
      local redis_args=()
      ((HAS_REDIS)) && redis_args=(--redis-url "redis://127.0.0.1:$REDIS_PORT")
      # Limits opened up: the generator's publishers send thousands of commands/s.
      start "$port" target/release/wsgate --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --node-id "bench-$node" --drain-timeout 1s --rate-limit 10000000 --rate-burst 10000000 --log-level warn "${redis_args[@]}"
      URL="ws://127.0.0.1:$port/ws"; METRICS="http://127.0.0.1:$admin/metrics" ;;
    peer)
      (cd loadtest/peers && PEER_LISTEN="127.0.0.1:$port" REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
        nice -n "$NICE" node server.js >>"$TMP/servers.log" 2>&1 &)
      wait_port "$port"; SPID=$(pid_of_port "$port"); PIDS+=("$SPID")
      URL="ws://127.0.0.1:$port/ws" ;;
    nats)
      local client http; client=$(free_port); http=$(free_port)
      printf 'listen: "127.0.0.1:%s"\nhttp: "127.0.0.1:%s"\nwebsocket {\n  listen: "127.0.0.1:%s"\n  no_tls: true\n}\n' \
        "$client" "$http" "$port" >"$TMP/nats-$node.conf"
      start "$port" nats-server -c "$TMP/nats-$node.conf"
      URL="ws://127.0.0.1:$port/" ;;
  esac
  PID=$SPID
}

LT=target/release/wsgate-loadtest
# Runs the generator (bounded by `timeout`), logging the exact command.
lt() {
  local out=$1; shift
  echo "$LT $* --source-addrs $SRC --no-progress --out $OUT/$out.json --chart $OUT/$out.png" >>"$OUT/commands.txt"
  timeout 300 nice -n "$NICE" "$LT" "$@" --source-addrs "$SRC" --no-progress \
    --out "$OUT/$out.json" --chart "$OUT/$out.png" | tee "$TMP/$out.txt"
}

common() { echo --target "$1" --url "$URL" --server-pid "$PID" ${METRICS:+--metrics-url "$METRICS"} --label "$2"; }

bench_target() {
  local t=$1
  # Idle: a fresh server, so its memory before the ramp is a clean baseline. Two
  # generator processes split the connections (each stays under the open-file
  # limit) and their reports are merged.
  log "$t: idle $IDLE_CONNS"
  start_server "$t"
  local gens=()
  for k in 0 1; do
    lt "$t-idle-part$k" idle $(common "$t" idle) --connections "$IDLE_CONNS" --topics 100 \
      --duration "$HOLD" --split "$k/2" >/dev/null &
    gens+=($!)
  done
  # Only the generators: a bare `wait` would also wait for the servers.
  wait "${gens[@]}"
  "$LT" merge "$OUT/$t-idle-part0.json" "$OUT/$t-idle-part1.json" --out "$OUT/$t-idle.json" --chart "$OUT/$t-idle.png"
  echo "$LT merge $OUT/$t-idle-part0.json $OUT/$t-idle-part1.json --out $OUT/$t-idle.json --chart $OUT/$t-idle.png" >>"$OUT/commands.txt"
  rm -f "$OUT/$t-idle-part"[01].png
  stop "$PID"

  start_server "$t"
  log "$t: churn (connect + subscribe + close, open loop)"
  lt "$t-churn" churn $(common "$t" churn) --rate 0 --concurrency 128 --duration "$CHURN_DUR"
  log "$t: fan-out 1 topic x $SUBS subscribers, 100 B, offered 500k deliveries/s"
  lt "$t-fanout-500k" fanout $(common "$t" fanout-500k) --subscribers "$SUBS" --topics 1 \
    --publishers 2 --rate "$RATE_500K" --payload 100 --duration "$DUR"
  log "$t: fan-out offered 2M deliveries/s"
  lt "$t-fanout-2m" fanout $(common "$t" fanout-2m) --subscribers "$SUBS" --topics 1 \
    --publishers 4 --rate "$RATE_2M" --payload 100 --duration "$DUR"
  # Capacity: three times the 2M target. Not for the peer, which already falls
  # behind at 0.1M/s (its backlog would only grow faster).
  if [[ $t != peer ]]; then
    log "$t: fan-out offered 6M deliveries/s (capacity)"
    lt "$t-fanout-6m" fanout $(common "$t" fanout-6m) --subscribers "$SUBS" --topics 1 \
      --publishers 4 --rate "$RATE_6M" --payload 100 --duration "$DUR"
  fi
  # Slow consumers: 10 topics, 1 KiB payloads, 1,000 publications/s. 10% of the
  # subscribers take every topic (1 MB/s each) and stop reading after 2 s, so the
  # server's buffers for them fill within the run; the control run is the same
  # workload with everyone reading. Compare the others' latency between the two.
  local slow_args=(--subscribers "$SUBS" --topics 10 --publishers 10 --rate 1000 --payload 1000 --duration "$DUR")
  log "$t: slow-consumer control (everyone reads)"
  lt "$t-slow-control" fanout $(common "$t" slow-control) "${slow_args[@]}"
  log "$t: slow consumers (10% stop reading)"
  lt "$t-slow" slow $(common "$t" slow) "${slow_args[@]}" --slow-share 0.1 --slow-after 2s --slow-all-topics
  stop "$PID"

  # Across two nodes: subscribers on node a, publishers on node b, through Redis.
  if [[ $t == peer || ( $t == wsgate && $HAS_REDIS == 1 ) ]]; then
    log "$t: cross-node fan-out through Redis, offered 2M deliveries/s"
    start_server "$t" a; local url_a=$URL pid_a=$PID
    start_server "$t" b; local url_b=$URL pid_b=$PID
    URL=$url_a PID="$pid_a,$pid_b" METRICS=""
    lt "$t-cross-node-2m" fanout $(common "$t" cross-node-2m) --pub-url "$url_b" \
      --subscribers "$SUBS" --topics 1 --publishers 4 --rate "$RATE_2M" --payload 100 --duration "$DUR"
    stop "$pid_a"; stop "$pid_b"
  fi
}

# The kernel alone: no server and no generator, only threads writing ready-made frames
# into loopback sockets and epoll readers (`wsgate-loadtest floor`): the yardstick
# for the fan-out latencies, since a real server does all that and more. A 149-byte
# payload makes 153-byte frames, the size of wsgate's deliveries of the generator's
# 100-byte publications (the envelope and topic name add about 50 bytes).
floor() {
  local r name
  for r in "$RATE_500K:500k" "$RATE_2M:2m" "$RATE_6M:6m"; do
    name="floor-fanout-${r##*:}"
    log "kernel floor: $SUBS sockets, offered ${r##*:} deliveries/s"
    echo "$LT floor --sockets $SUBS --rate ${r%%:*} --payload 149 --duration $DUR --source-addrs $SRC --out $OUT/floor/$name.json" >>"$OUT/commands.txt"
    timeout 120 nice -n "$NICE" "$LT" floor --sockets "$SUBS" --rate "${r%%:*}" --payload 149 \
      --duration "$DUR" --source-addrs "$SRC" --out "$OUT/floor/$name.json" | tee "$OUT/floor/$name.txt"
  done
}

machine() {
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "nproc: $(nproc)"
    lscpu | grep -E 'Model name|Thread|Core|Socket|MHz' || true
    free -h | head -2
    uname -sr
    echo "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "rustc: $(rustc --version)"; echo "node: $(node --version)"
    echo "nats-server: $(nats-server --version)"; echo "redis: $(redis-server --version | cut -d' ' -f3)"
    echo "open files: $(ulimit -n) soft, $(ulimit -Hn) hard"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  } >"$OUT/machine.txt"
}

main() {
  install
  ulimit -n "$(ulimit -Hn)"
  log "building release binaries"
  cargo build --release -p wsgate -p wsgate-loadtest
  mkdir -p "$OUT"
  rm -f "$OUT"/*.json "$OUT"/*.png "$OUT/commands.txt"
  rm -rf "$OUT/floor"; mkdir -p "$OUT/floor"
  machine
  floor
  if target/release/wsgate --help | grep -q -- '--redis-url'; then HAS_REDIS=1; fi
  start_redis
  for t in $TARGETS; do bench_target "$t"; done
  echo "load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.txt"
  rm -f "$OUT"/*-part[01].json
  "$LT" table "$OUT"/*.json >"$OUT/summary.md"
  {
    printf '\n## Kernel floor (no server, no generator; same sockets, rates and frame size)\n\n```\n'
    cat "$OUT"/floor/*.txt
    printf '```\n'
  } >>"$OUT/summary.md"
  log "summary ($OUT/summary.md)"
  cat "$OUT/summary.md"
}

case "${1:-all}" in
  install) install ;;
  all) main ;;
  *) echo "usage: $0 [install|all]" >&2; exit 2 ;;
esac
