#!/usr/bin/env bash
# Redis Cluster benchmark (issue 9): the same fan-out workload through one Redis and
# through a 3-primary Redis Cluster (sharded pub/sub), back to back in one run, ROUNDS
# times alternating. Redis CPU of every redis-server is read from /proc/<pid>/stat
# before and after each run, so the table shows how the work spreads over the shards.
#
#   cargo build --release -p wsgate -p wsgate-loadtest
#   loadtest/bench-redis-cluster.sh            # results under $BENCH_OUT (default: a temp dir)
#
# Comparing builds of the cluster mode on the same cluster, same run: CLUSTER_BINS lists
# label=path pairs; each gets its own two gateway nodes, and every round runs each once,
# the order rotating from round to round:
#   CLUSTER_BINS="old=/tmp/wsgate-old new=target/release/wsgate" loadtest/bench-redis-cluster.sh
#
# Environment: BENCH_OUT, ROUNDS (2), DUR (10s), RATE (publications/s, 20000), TOPICS
# (300), SUBS (600: 2 per topic, half on each gateway node), PUBS (300: one per topic), PAYLOAD (100),
# WSGATE (the single-mode binary, target/release/wsgate), CLUSTER_BINS ("cluster=$WSGATE"),
# SINGLE (1: also run single mode; 0: cluster runs only).
# Everything binds to 127.0.0.1, runs bounded in time and is killed at exit.
set -euo pipefail
cd "$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"

ROUNDS=${ROUNDS:-2}
DUR=${DUR:-10s}
RATE=${RATE:-20000}
TOPICS=${TOPICS:-300}
SUBS=${SUBS:-600}
PUBS=${PUBS:-300}
PAYLOAD=${PAYLOAD:-100}
WSGATE=${WSGATE:-target/release/wsgate}
CLUSTER_BINS=${CLUSTER_BINS:-"cluster=$WSGATE"}
SINGLE=${SINGLE:-1}
# shellcheck source=loadtest/bench-common.sh
source loadtest/bench-common.sh
bench_init

TICKS=$(getconf CLK_TCK)
# CPU seconds (user + system) of a process so far.
cpu_s() { awk -v t="$TICKS" '{ print ($14 + $15) / t }' "/proc/$1/stat"; }

# A port p with p + 10000 free too (a cluster node's bus port).
cluster_port() {
  while :; do
    local p=$((20000 + RANDOM % 30000))
    if ! ss -ltnH "sport = :$p" | grep -q . && ! ss -ltnH "sport = :$((p + 10000))" | grep -q .; then
      echo "$p"; return
    fi
  done
}
free_port() { cluster_port; }

start_redis() { # port [extra args...]
  local port=$1; shift
  mkdir -p "$TMP/r$port"
  redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$TMP/r$port" \
    --client-output-buffer-limit "pubsub 256mb 64mb 60" --loglevel warning "$@" >>"$TMP/servers.log" 2>&1 &
  wait_port "$port"
  PIDS+=("$(pid_of_port "$port")")
}

start_gateway() { # binary name redis-args...
  local bin=$1 name=$2; shift 2
  local port admin; port=$(free_port); admin=$(free_port)
  "$bin" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --node-id "$name" --rate-limit 10000000 --rate-burst 10000000 --log-level warn "$@" \
    >>"$TMP/servers.log" 2>&1 &
  wait_port "$port"; wait_port "$admin"
  local pid; pid=$(pid_of_port "$port"); PIDS+=("$pid")
  for _ in $(seq 200); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin/readyz") == 200 ]] && break
    sleep 0.05
  done
  echo "ws://127.0.0.1:$port/ws http://127.0.0.1:$admin/metrics $pid"
}

# One Redis.
SINGLE_PORT=$(free_port); start_redis "$SINGLE_PORT"; SINGLE_PID=${PIDS[-1]}
# A 3-primary cluster.
CPORTS=(); CPIDS=()
for _ in 1 2 3; do
  p=$(cluster_port); start_redis "$p" --cluster-enabled yes --cluster-config-file nodes.conf
  CPORTS+=("$p"); CPIDS+=("${PIDS[-1]}")
done
redis-cli --cluster create $(for p in "${CPORTS[@]}"; do echo "127.0.0.1:$p"; done) \
  --cluster-replicas 0 --cluster-yes >/dev/null
for _ in $(seq 100); do
  redis-cli -p "${CPORTS[0]}" cluster info | grep -q cluster_state:ok && break; sleep 0.1
done
sleep 1
SEEDS=$(for p in "${CPORTS[@]}"; do echo -n "redis://127.0.0.1:$p,"; done); SEEDS=${SEEDS%,}

if [[ $SINGLE == 1 ]]; then
  # start_gateway runs in a subshell: its pid is added to PIDS here, for cleanup.
  read -r S_A S_A_M S_A_PID < <(start_gateway "$WSGATE" single-a --redis-url "redis://127.0.0.1:$SINGLE_PORT")
  PIDS+=("$S_A_PID")
  read -r S_B S_B_M S_B_PID < <(start_gateway "$WSGATE" single-b --redis-url "redis://127.0.0.1:$SINGLE_PORT")
  PIDS+=("$S_B_PID")
fi
# Per cluster build: label, and its two gateways' ws and metrics URLs.
declare -A C_A C_B C_A_M C_B_M
LABELS=()
for pair in $CLUSTER_BINS; do
  label=${pair%%=*} bin=${pair#*=}
  LABELS+=("$label")
  read -r a am apid < <(start_gateway "$bin" "$label-a" --redis-mode cluster --redis-url "$SEEDS")
  read -r b bm bpid < <(start_gateway "$bin" "$label-b" --redis-mode cluster --redis-url "$SEEDS")
  PIDS+=("$apid" "$bpid")
  C_A[$label]=$a C_A_M[$label]=$am C_B[$label]=$b C_B_M[$label]=$bm
  echo "$label: $bin ($("$bin" --version 2>/dev/null || echo "?"))" >>"$TMP/bins.txt"
done

{
  echo "date: $(date -u +%FT%TZ)"; echo "cpus: $(nproc)"; echo "redis: $(redis-server --version | cut -d' ' -f3)"
  echo "workload: $TOPICS topics, $SUBS subscribers (2 nodes), $PUBS publishers (WebSocket, both nodes), $RATE publications/s, $PAYLOAD B, $DUR"
  cat "$TMP/bins.txt"
} >"$OUT/env.txt"

LT=target/release/wsgate-loadtest
# Ports of the Redis processes, by pid (for INFO commandstats).
declare -A PORT_OF=(["$SINGLE_PID"]=$SINGLE_PORT)
for i in 0 1 2; do PORT_OF[${CPIDS[$i]}]=${CPORTS[$i]}; done
run() { # label url_a url_b metrics_a metrics_b pids...
  local label=$1 a=$2 b=$3 ma=$4 mb=$5; shift 5
  local redis_pids=("$@") before=() after=()
  for p in "${redis_pids[@]}"; do redis-cli -p "${PORT_OF[$p]}" config resetstat >/dev/null; done
  for p in "${redis_pids[@]}"; do before+=("$(cpu_s "$p")"); done
  local cmd=("$LT" fanout --url "$a,$b" --pub-url "$b,$a" --subscribers "$SUBS" --topics "$TOPICS"
    --publishers "$PUBS" --rate "$RATE" --payload "$PAYLOAD" --duration "$DUR" --no-progress
    --metrics-url "$ma,$mb" --label "$label" --out "$OUT/$label.json")
  echo "${cmd[*]}" >>"$OUT/commands.txt"
  timeout 300 "${cmd[@]}" >"$OUT/$label.txt"
  for p in "${redis_pids[@]}"; do after+=("$(cpu_s "$p")"); done
  local cpu=""
  for i in "${!redis_pids[@]}"; do cpu+="$(awk -v a="${before[$i]}" -v b="${after[$i]}" 'BEGIN{printf "%.2f", b - a}') "; done
  echo "$label ${cpu% }" >>"$OUT/redis_cpu.txt"
  # Time Redis spent executing the publish commands themselves (fan-out included).
  local stats=""
  for p in "${redis_pids[@]}"; do
    stats+="$(redis-cli -p "${PORT_OF[$p]}" info commandstats | tr -d '\r' \
      | awk -F'[:,=]' '/^cmdstat_s?publish:/ { printf "%s:%s:%s ", $1, $3, $5 }')"
  done
  echo "$label $stats" >>"$OUT/commandstats.txt"
}

# Idle baseline (no traffic, gateways connected): cron and, for the cluster, the bus.
idle() { # label seconds pids...
  local label=$1 secs=$2; shift 2
  local before=() cpu=""
  for p in "$@"; do before+=("$(cpu_s "$p")"); done
  sleep "$secs"
  local i=0
  for p in "$@"; do cpu+="$(awk -v a="${before[$i]}" -v b="$(cpu_s "$p")" 'BEGIN{printf "%.2f", b - a}') "; i=$((i + 1)); done
  echo "$label ${secs}s: ${cpu% }" >>"$OUT/idle_cpu.txt"
}
idle single-idle 10 "$SINGLE_PID"
idle cluster-idle 10 "${CPIDS[@]}"

for r in $(seq "$ROUNDS"); do
  [[ $SINGLE == 1 ]] && run "single-$r" "$S_A" "$S_B" "$S_A_M" "$S_B_M" "$SINGLE_PID"
  # Rotate the order of the cluster builds from round to round.
  n=${#LABELS[@]}
  for k in $(seq 0 $((n - 1))); do
    l=${LABELS[$(((k + r - 1) % n))]}
    run "$l-$r" "${C_A[$l]}" "${C_B[$l]}" "${C_A_M[$l]}" "${C_B_M[$l]}" "${CPIDS[@]}"
  done
done

# Topics per shard as the cluster sees them (channels held by the gateways).
for p in "${CPORTS[@]}"; do
  echo "shard 127.0.0.1:$p: $(redis-cli -p "$p" pubsub shardchannels | wc -l) channels"
done >"$OUT/shards.txt"

python3 - "$OUT" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
cpu = {l.split()[0]: [float(x) for x in l.split()[1:]] for l in (out / "redis_cpu.txt").read_text().splitlines()}
print("| run | publications/s | deliveries/s | p50 ms | p99 ms | lost | reordered | Redis CPU s (per process) | Redis CPU s total | Redis CPU µs per publication |")
print("|---|---|---|---|---|---|---|---|---|---|")
for label, secs in cpu.items():
    r = json.loads((out / f"{label}.json").read_text())
    f = r["fanout"]
    per_pub = sum(secs) / f["published"] * 1e6 if f["published"] else float("nan")
    print(f"| {label} | {f['publishes_per_s_steady']:.0f} | {f['deliveries_per_s_steady']:.0f} | "
          f"{f['latency']['p50_ms']:.2f} | {f['latency']['p99_ms']:.2f} | {f['lost']} | {f['reordered']} | "
          f"{' / '.join(f'{s:.2f}' for s in secs)} | {sum(secs):.2f} | {per_pub:.2f} |")
EOF
cat "$OUT/shards.txt" "$OUT/idle_cpu.txt" "$OUT/commandstats.txt"
echo "results: $OUT"
