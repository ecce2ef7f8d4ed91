#!/usr/bin/env bash
# Redis CPU per stream publication, A/B: several gateway builds (or settings) side by
# side in one run, interleaved, each run on a fresh redis-server and a fresh gateway.
#
#   BEFORE=path/to/old/wsgate loadtest/bench-stream-cpu.sh
#
# Every round runs each workload once per variant, the variants' order reversed from
# round to round:
#   - rate: $TOPICS topics x 2 subscribers, one publisher per topic, $RATE publications/s;
#   - open: the same, open loop (--rate 0 --max-inflight 16 --batch 16).
# Variants (VARIANTS, space-separated name=binary[,extra gateway flag…]), by default:
#   before  the stream topics (st:*) on $BEFORE
#   after0  the stream topics on $AFTER with --redis-stream-linger 0s
#   after   the stream topics on $AFTER as configured by default
#   plain   plain topics (pl:*) on $AFTER
# "binary" is before or after (the paths $BEFORE and $AFTER). For each run the script
# reads utime + stime of the redis-server from /proc before and after the generator and
# writes a line to $OUT/redis_cpu.txt: label, Redis CPU seconds, wall seconds; the
# generator's report is $OUT/<label>.json. $OUT/summary.md is the table of them all.
#
# Environment: BEFORE (required), AFTER (target/release/wsgate), BENCH_OUT (default: a
# temp dir), ROUNDS (2), DUR (10s), TOPICS (300), RATE (6000), WORKLOADS ("rate open"),
# HISTORY (2000), VARIANTS (above), BUILD (1: cargo build --release first).
# Everything binds 127.0.0.1 on free ports, every run is bounded in time, and what the
# script started is stopped at exit, by pid.
set -euo pipefail
cd "$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"

BEFORE=${BEFORE:?set BEFORE to the wsgate binary to compare with}
AFTER=${AFTER:-target/release/wsgate}
ROUNDS=${ROUNDS:-2}
DUR=${DUR:-10s}
TOPICS=${TOPICS:-300}
RATE=${RATE:-6000}
WORKLOADS=${WORKLOADS:-rate open}
HISTORY=${HISTORY:-2000}
VARIANTS=${VARIANTS:-before=before after0=after,--redis-stream-linger=0s after=after plain=after}
LT=target/release/wsgate-loadtest
SRC="127.0.0.2-127.0.0.9"
# shellcheck source=loadtest/bench-common.sh
source loadtest/bench-common.sh
bench_init

log() { printf '\n== %s\n' "$*" >&2; }

if [[ ${BUILD:-1} == 1 ]]; then
  log "building release binaries"
  cargo build --release -p wsgate -p wsgate-loadtest
fi
for b in "$BEFORE" "$AFTER" "$LT"; do
  [[ -x $b ]] || { echo "not an executable: $b" >&2; exit 2; }
done
command -v redis-server >/dev/null || { echo "redis-server is needed" >&2; exit 2; }
ulimit -n "$(ulimit -Hn)"

cat >"$TMP/wsgate.toml" <<EOF
# Stream topics of the benchmark; pl:* topics stay plain.
[[namespaces]]
name = "bench"
topics = ["st:*"]
history_size = $HISTORY
history_ttl = "10m"
EOF

{
  echo "date: $(date -u +%FT%TZ)"; echo "cpus: $(nproc)"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "redis: $(redis-server --version 2>/dev/null | cut -d' ' -f3)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "rounds $ROUNDS, $DUR, $TOPICS topics x 2, workloads: $WORKLOADS (rate: $RATE/s), history $HISTORY"
  echo "variants: $VARIANTS"
} >"$OUT/env.txt"

# run label kind binary extra-flags workload: one fresh Redis, one fresh gateway, one run.
run() {
  local label=$1 kind=$2 bin=$3 extra=$4 workload=$5 port admin gw before t0 flags=()
  start_bench_redis
  port=$(free_port); admin=$(free_port)
  [[ -n $extra ]] && IFS=',' read -r -a flags <<<"$extra"
  "$bin" --config "$TMP/wsgate.toml" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --node-id ab --drain-timeout 1s --rate-limit 10000000 --rate-burst 10000000 --log-level warn \
    --redis-url "redis://127.0.0.1:$REDIS_PORT" "${flags[@]}" >>"$OUT/servers.log" 2>&1 &
  PIDS+=("$!")
  if ! wait_port "$port"; then echo "$label: gateway did not start" >>"$OUT/errors.txt"; return 0; fi
  gw=$(pid_of_port "$port"); PIDS+=("$gw")
  local load=(--rate "$RATE")
  [[ $workload == open ]] && load=(--rate 0 --max-inflight 16 --batch 16)
  local cmd=("$LT" fanout --url "ws://127.0.0.1:$port/ws" --server-pid "$gw"
    --metrics-url "http://127.0.0.1:$admin/metrics" --topic-prefix "$kind:$label-" --duration "$DUR"
    --payload 100 --subscribers $((TOPICS * 2)) --topics "$TOPICS" --publishers "$TOPICS" "${load[@]}"
    --source-addrs "$SRC" --no-progress --label "$label" --out "$OUT/$label.json")
  echo "${cmd[*]}  # gateway: $(basename "$bin") ${flags[*]}" >>"$OUT/commands.txt"
  before=$(cpu_s "$REDIS_PID"); t0=$(date +%s.%N)
  timeout 300 "${cmd[@]}" >"$OUT/$label.txt" || echo "$label: generator exit $?" >>"$OUT/errors.txt"
  echo "$label $(awk -v a="$before" -v b="$(cpu_s "$REDIS_PID")" -v t0="$t0" -v t1="$(date +%s.%N)" \
    'BEGIN{printf "%.3f %.3f", b - a, t1 - t0}')" >>"$OUT/redis_cpu.txt"
  kill "$gw" "$REDIS_PID" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$gw" 2>/dev/null || kill -0 "$REDIS_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$gw" "$REDIS_PID" 2>/dev/null || true
}

read -r -a variants <<<"$VARIANTS"
for r in $(seq "$ROUNDS"); do
  order=("${variants[@]}")
  if ((r % 2 == 0)); then
    order=(); for ((i = ${#variants[@]} - 1; i >= 0; i--)); do order+=("${variants[$i]}"); done
  fi
  for w in $WORKLOADS; do
    for v in "${order[@]}"; do
      name=${v%%=*}; spec=${v#*=}; which=${spec%%,*}; extra=""
      [[ $spec == *,* ]] && extra=${spec#*,}
      bin=$AFTER; [[ $which == before ]] && bin=$BEFORE
      kind=st; [[ $name == plain* ]] && kind=pl
      log "round $r: $w $name"
      run "$w-$name-r$r" "$kind" "$bin" "$extra" "$w"
    done
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"

# The table: one row per run.
python3 - "$OUT" >"$OUT/summary.md" <<'EOF'
import json, sys
out = sys.argv[1]
cpu = {}
for line in open(f"{out}/redis_cpu.txt"):
    label, c, wall = line.split()
    cpu[label] = (float(c), float(wall))
print("| run | publications acked | publications/s (steady) | deliveries/s (steady) | p50 / p99 ms "
      "| Redis CPU s | Redis CPU per publication | lost / dup / reordered | stream gaps / dups / resets |")
print("|---|---|---|---|---|---|---|---|---|")
for label, (c, wall) in cpu.items():
    try:
        f = json.load(open(f"{out}/{label}.json"))["fanout"]
    except (OSError, KeyError, ValueError):
        print(f"| {label} | (no report) | | | | {c:.2f} | | | |")
        continue
    pubs = f["published"]
    per = f"{c / pubs * 1e6:.1f} µs" if pubs else "–"
    s = f.get("streams", {})
    print(f"| {label} | {pubs} | {f['publishes_per_s_steady']:.0f} | {f['deliveries_per_s_steady']:.0f} "
          f"| {f['latency']['p50_ms']:.1f} / {f['latency']['p99_ms']:.1f} | {c:.2f} | {per} "
          f"| {f['lost']}/{f['duplicated']}/{f['reordered']} "
          f"| {s.get('gaps', 0)}/{s.get('dups', 0)}/{s.get('resets', 0)} |")
EOF
cat "$OUT/summary.md"
