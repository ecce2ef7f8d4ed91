#!/usr/bin/env bash
# Streams benchmark (issue 16): stream topics against plain topics, side by side in one
# run, alternating, with the in-memory broker and with Redis; then the resume storm.
#
#   loadtest/bench-streams.sh            # builds release, results under $BENCH_OUT
#   BENCH_QUICK=1 loadtest/bench-streams.sh   # small sizes: checks the script
#
# For each mode (embedded, redis) one gateway is started with a configuration file
# whose namespace makes `st:*` streams (history_size $HISTORY, history_ttl 10m); plain
# topics are named `pl:…`. Every round runs each workload once on streams and once on
# plain topics, the order swapped from round to round:
#   - 1x2000: 1 topic x $SUBS subscribers, 2 publishers at $RATE_1 publications/s;
#   - 1x2000cap: the same at $RATE_1CAP/s (6M deliveries/s offered): the capacity;
#   - 300x2: $TOPICS_N topics x 2 subscribers, one publisher per topic, $RATE_N/s;
#   - 300x2open: the same open loop (publications/s accepted at saturation);
#   - 300x2backend (redis mode): the same published straight into Redis as a backend
#     does, FCALL wsgate_publish for streams, PUBLISH for plain topics.
# Redis mode reads the redis-server's CPU (/proc/<pid>/stat) before and after each run
# and divides by the publications acknowledged: Redis CPU per publication. Then the
# resume storm: $STORM_CLIENTS clients on $STORM_TOPICS stream topic(s) leave, miss
# $MISSED publications per topic, and all come back at once with `since`, while
# $LIVE_SUBS clients of a plain live topic receive $LIVE_RATE publications/s.
#
# Environment: BENCH_OUT (default: a temp dir), MODES ("embedded redis"), ROUNDS (2),
# DUR (10s), SUBS (2000), RATE_1 (250), RATE_1CAP (3000), TOPICS_N (300), RATE_N (6000), OPEN (1: run
# 300x2-open), STORM_CLIENTS (2000), STORM_TOPICS (1), MISSED (1000), LIVE_SUBS (200),
# LIVE_RATE (50), HISTORY (2000), BUILD (1: cargo build --release first), WSGATE
# (target/release/wsgate).
# Everything binds 127.0.0.1 on free ports, every run is bounded in time, and what the
# script started is stopped at exit, by pid.
set -euo pipefail
cd "$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
  D_ROUNDS=1 D_DUR=4s D_SUBS=200 D_RATE_1=100 D_RATE_1CAP=3000 D_TOPICS_N=30 D_RATE_N=600 D_STORM=200 D_MISSED=200 D_LIVE=20
else
  D_ROUNDS=2 D_DUR=10s D_SUBS=2000 D_RATE_1=250 D_RATE_1CAP=3000 D_TOPICS_N=300 D_RATE_N=6000 D_STORM=2000 D_MISSED=1000 D_LIVE=200
fi
MODES=${MODES:-embedded redis}
ROUNDS=${ROUNDS:-$D_ROUNDS}
DUR=${DUR:-$D_DUR}
SUBS=${SUBS:-$D_SUBS}
RATE_1=${RATE_1:-$D_RATE_1}
RATE_1CAP=${RATE_1CAP:-$D_RATE_1CAP}
TOPICS_N=${TOPICS_N:-$D_TOPICS_N}
RATE_N=${RATE_N:-$D_RATE_N}
OPEN=${OPEN:-1}
STORM_CLIENTS=${STORM_CLIENTS:-$D_STORM}
STORM_TOPICS=${STORM_TOPICS:-1}
MISSED=${MISSED:-$D_MISSED}
LIVE_SUBS=${LIVE_SUBS:-$D_LIVE}
LIVE_RATE=${LIVE_RATE:-50}
HISTORY=${HISTORY:-2000}
WSGATE=${WSGATE:-target/release/wsgate}
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
ulimit -n "$(ulimit -Hn)"
if ! "$WSGATE" --help | grep -q -- '--config'; then
  echo "$WSGATE has no --config: streams are configured by the configuration file" >&2
  exit 2
fi


cat >"$TMP/wsgate.toml" <<EOF
# Stream topics of the benchmark; pl:* topics stay plain.
[[namespaces]]
name = "bench"
topics = ["st:*"]
history_size = $HISTORY
history_ttl = "10m"
EOF
cp "$TMP/wsgate.toml" "$OUT/wsgate.toml"

REDIS_PORT="" REDIS_PID=""

# Starts a gateway for mode $1; sets URL, HTTP, METRICS, GW_PID.
start_gateway() {
  local mode=$1 port admin extra=()
  port=$(free_port); admin=$(free_port)
  [[ $mode == redis ]] && extra=(--redis-url "redis://127.0.0.1:$REDIS_PORT")
  "$WSGATE" --config "$TMP/wsgate.toml" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --node-id "bench-$mode" --drain-timeout 1s --rate-limit 10000000 --rate-burst 10000000 \
    --log-level warn "${extra[@]}" >>"$OUT/servers.log" 2>&1 &
  local launched=$!
  PIDS+=("$launched")
  if ! wait_port "$port"; then tail -5 "$OUT/servers.log" >&2; return 1; fi
  GW_PID=$(pid_of_port "$port")
  [[ $GW_PID == "$launched" ]] || PIDS+=("$GW_PID")
  URL="ws://127.0.0.1:$port/ws"; HTTP="http://127.0.0.1:$port/api/publish"
  METRICS="http://127.0.0.1:$admin/metrics"
}

stop_gateway() {
  kill "$GW_PID" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$GW_PID" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$GW_PID" 2>/dev/null || true
}

# Whether the gateway numbers publications of a stream topic (the mode has streams).
has_streams() {
  curl -s -m 5 -X POST "$HTTP" -d '{"topic":"st:probe","data":1}' | grep -q '"seq"'
}

# fanout label kind(st|pl) args...: one fan-out run; Redis CPU around it in redis mode.
fanout() {
  local label=$1 kind=$2; shift 2
  local before="" after="" t0
  t0=$(date +%s.%N)
  [[ -n $REDIS_PID && $MODE == redis ]] && before=$(cpu_s "$REDIS_PID")
  local cmd=("$LT" fanout --url "$URL" --server-pid "$GW_PID" --metrics-url "$METRICS"
    --topic-prefix "$kind:$label-" --duration "$DUR" --payload 100 "$@"
    --source-addrs "$SRC" --no-progress --label "$label" --out "$OUT/$label.json")
  echo "${cmd[*]}" >>"$OUT/commands.txt"
  timeout 300 "${cmd[@]}" >"$OUT/$label.txt" || echo "$label: generator exit $?" >>"$OUT/errors.txt"
  if [[ -n $before ]]; then
    after=$(cpu_s "$REDIS_PID")
    echo "$label $(awk -v a="$before" -v b="$after" -v t0="$t0" -v t1="$(date +%s.%N)" \
      'BEGIN{printf "%.3f %.3f", b - a, t1 - t0}')" >>"$OUT/redis_cpu.txt"
  fi
}

storm() {
  local label=$1 before="" t0
  t0=$(date +%s.%N)
  [[ -n $REDIS_PID && $MODE == redis ]] && before=$(cpu_s "$REDIS_PID")
  local cmd=("$LT" resume-storm --url "$URL" --server-pid "$GW_PID" --metrics-url "$METRICS"
    --topic-prefix "st:$label-" --clients "$STORM_CLIENTS" --topics "$STORM_TOPICS" --missed "$MISSED"
    --publish-via http --http-batch 100 --live-subscribers "$LIVE_SUBS" --live-rate "$LIVE_RATE"
    --live-topic "pl:$label-live" --duration 30s --before 3s --after 1s --connect-timeout 20s
    --source-addrs "$SRC" --no-progress --label "$label" --out "$OUT/$label.json" --chart "$OUT/$label.png")
  echo "${cmd[*]}" >>"$OUT/commands.txt"
  timeout 300 "${cmd[@]}" >"$OUT/$label.txt" || echo "$label: generator exit $?" >>"$OUT/errors.txt"
  if [[ -n $before ]]; then
    awk -v a="$before" -v b="$(cpu_s "$REDIS_PID")" -v t0="$t0" -v t1="$(date +%s.%N)" \
      'BEGIN{printf "%.3f CPU s over %.1f s\n", b - a, t1 - t0}' >"$OUT/$label.redis_cpu.txt"
  fi
}

{
  echo "date: $(date -u +%FT%TZ)"; echo "cpus: $(nproc)"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "redis: $(redis-server --version 2>/dev/null | cut -d' ' -f3)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "sizes: rounds $ROUNDS, $DUR; 1x$SUBS at $RATE_1/s; ${TOPICS_N}x2 at $RATE_N/s; storm $STORM_CLIENTS clients x $STORM_TOPICS topic(s), $MISSED missed, live $LIVE_SUBS at $LIVE_RATE/s"
} >"$OUT/env.txt"

for MODE in $MODES; do
  if [[ $MODE == redis ]]; then
    command -v redis-server >/dev/null || { log "no redis-server: redis mode skipped"; continue; }
    start_bench_redis
  fi
  log "$MODE: gateway"
  if ! start_gateway "$MODE"; then
    log "$MODE: the gateway did not start (see above): mode skipped"
    echo "$MODE: gateway did not start" >>"$OUT/errors.txt"; continue
  fi
  if ! has_streams; then
    log "$MODE: publishing to a stream topic returned no seq: this build has no streams in $MODE mode; skipped"
    echo "$MODE: no streams in this mode" >>"$OUT/errors.txt"; stop_gateway; continue
  fi
  if [[ $MODE == redis ]]; then
    # Redis's own CPU with the gateway connected and no traffic (cron, pings): taken
    # off each run's CPU, pro rata of its wall time, in the "net" column.
    c0=$(cpu_s "$REDIS_PID"); sleep 10; c1=$(cpu_s "$REDIS_PID")
    awk -v a="$c0" -v b="$c1" 'BEGIN{printf "%.4f\n", (b - a) / 10}' >"$OUT/redis_idle_cpu.txt"
  fi
  for r in $(seq "$ROUNDS"); do
    kinds="st pl"; ((r % 2 == 0)) && kinds="pl st"
    for k in $kinds; do
      log "$MODE round $r: $k 1x$SUBS"
      fanout "$MODE-1x$SUBS-$k-r$r" "$k" --subscribers "$SUBS" --topics 1 --publishers 2 --rate "$RATE_1"
    done
    for k in $kinds; do
      log "$MODE round $r: $k 1x$SUBS at $RATE_1CAP/s (capacity)"
      fanout "$MODE-1x${SUBS}cap-$k-r$r" "$k" --subscribers "$SUBS" --topics 1 --publishers 4 --rate "$RATE_1CAP"
    done
    for k in $kinds; do
      log "$MODE round $r: $k ${TOPICS_N}x2"
      fanout "$MODE-${TOPICS_N}x2-$k-r$r" "$k" --subscribers $((TOPICS_N * 2)) --topics "$TOPICS_N" \
        --publishers "$TOPICS_N" --rate "$RATE_N"
    done
    if [[ $OPEN == 1 ]]; then
      for k in $kinds; do
        log "$MODE round $r: $k ${TOPICS_N}x2 open loop"
        fanout "$MODE-${TOPICS_N}x2open-$k-r$r" "$k" --subscribers $((TOPICS_N * 2)) --topics "$TOPICS_N" \
          --publishers "$TOPICS_N" --rate 0 --max-inflight 16 --batch 16
      done
    fi
    if [[ $MODE == redis ]]; then
      # As a backend publishes: FCALL wsgate_publish into a stream, PUBLISH otherwise.
      for k in $kinds; do
        extra=(); [[ $k == st ]] && extra=(--redis-fcall)
        log "$MODE round $r: $k ${TOPICS_N}x2 published by a backend through Redis"
        fanout "$MODE-${TOPICS_N}x2backend-$k-r$r" "$k" --subscribers $((TOPICS_N * 2)) --topics "$TOPICS_N" \
          --publishers "$TOPICS_N" --rate "$RATE_N" --publish-via redis \
          --redis-url "redis://127.0.0.1:$REDIS_PORT" "${extra[@]}"
      done
    fi
    log "$MODE round $r: resume storm"
    storm "$MODE-storm-r$r"
  done
  stop_gateway
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"

python3 - "$OUT" >"$OUT/summary.md" <<'EOF'
import json, sys, pathlib, re, statistics
out = pathlib.Path(sys.argv[1])
cpu, idle = {}, 0.0
if (out / "redis_idle_cpu.txt").exists():
    idle = float((out / "redis_idle_cpu.txt").read_text())
if (out / "redis_cpu.txt").exists():
    for l in (out / "redis_cpu.txt").read_text().splitlines():
        k, c, wall = l.split()
        cpu[k] = (float(c), max(float(c) - idle * float(wall), 0.0))
rows, pairs = [], {}
print(f"Redis idle CPU: {idle * 100:.2f}% of a core (subtracted pro rata in the net columns)")
print()
print("| run | publications/s accepted | deliveries/s | p50 ms | p99 ms | lost | stream gaps / dups / resets | gateway CPU s per M deliveries | Redis CPU s (net of idle) | Redis CPU µs per publication (net) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for p in sorted(out.glob("*.json")):
    r = json.loads(p.read_text())
    f = r.get("fanout")
    if not f:
        continue
    label = r["label"]
    acc = f["published"] / max(r["duration_s"], 1)
    st = f.get("streams", {})
    red, net = cpu.get(label, (None, None))
    per_pub = red / f["published"] * 1e6 if red is not None and f["published"] else None
    net_pub = net / f["published"] * 1e6 if net is not None and f["published"] else None
    srv = r["servers"][0]["cpu_s_per_million_events"] if r.get("servers") else None
    print(f"| {label} | {acc:.0f} | {f['deliveries_per_s_steady']:.0f} | {f['latency']['p50_ms']:.2f} | "
          f"{f['latency']['p99_ms']:.2f} | {f['lost']} | {st.get('gaps', 0)} / {st.get('dups', 0)} / {st.get('resets', 0)} | "
          f"{'–' if srv is None else f'{srv:.2f}'} | {'–' if red is None else f'{red:.2f} ({net:.2f})'} | "
          f"{'–' if per_pub is None else f'{per_pub:.1f} ({net_pub:.1f})'} |")
    m = re.match(r"(.+)-(st|pl)-r(\d+)$", label)
    if m:
        pairs.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = (acc, f["deliveries_per_s_steady"], f["latency"]["p99_ms"], net_pub)
print()
print("Stream / plain, per round (same gateway, back to back):")
print()
print("| workload | round | publications/s | deliveries/s | p99 | Redis CPU per publication (net) |")
print("|---|---|---|---|---|---|")
ratios = {}
for (w, rnd), v in sorted(pairs.items()):
    if "st" not in v or "pl" not in v:
        continue
    s, p = v["st"], v["pl"]
    q = lambda a, b: a / b if a is not None and b else None
    rr = [q(s[i], p[i]) for i in range(4)]
    ratios.setdefault(w, []).append(rr)
    fmt = lambda x: "–" if x is None else f"{x:.2f}×"
    print(f"| {w} | {rnd} | {fmt(rr[0])} | {fmt(rr[1])} | {fmt(rr[2])} | {fmt(rr[3])} |")
print()
print("| workload | mean publications/s ratio | mean deliveries/s ratio | mean p99 ratio | mean Redis CPU/publication ratio |")
print("|---|---|---|---|---|")
for w, rs in ratios.items():
    def mean(i):
        xs = [x[i] for x in rs if x[i] is not None]
        return f"{statistics.mean(xs):.2f}×" if xs else "–"
    print(f"| {w} | {mean(0)} | {mean(1)} | {mean(2)} | {mean(3)} |")
print()
print("| storm | clients | missed | recovered | completed | all complete within | per client p50 / p99 | gaps / dups / resets | live p50 / p99 before | live p50 / p99 during | live lost | Redis CPU |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for p in sorted(out.glob("*.json")):
    r = json.loads(p.read_text())
    s = r.get("resume")
    if not s:
        continue
    l = s.get("live") or {}
    lb, ld = l.get("before", {}), l.get("during", {})
    st = s["streams"]
    c = s["completion_s"]
    rcf = out / f"{r['label']}.redis_cpu.txt"
    rc = rcf.read_text().strip() if rcf.exists() else "–"
    print(f"| {r['label']} | {s['clients']} | {s['missed_per_topic']} | {s['recovered']} | {s['completed']} | "
          f"{'NOT ALL' if c is None else f'{c:.2f} s'} | {s['completion']['p50_ms']:.0f} / {s['completion']['p99_ms']:.0f} ms | "
          f"{st['gaps']} / {st['dups']} / {st['resets']} | {lb.get('p50_ms', 0):.2f} / {lb.get('p99_ms', 0):.2f} | "
          f"{ld.get('p50_ms', 0):.2f} / {ld.get('p99_ms', 0):.2f} | {l.get('lost', '–')} | {rc} |")
EOF
cat "$OUT/summary.md"
[[ -f $OUT/errors.txt ]] && { echo; echo "errors:"; cat "$OUT/errors.txt"; }
echo "results: $OUT"
