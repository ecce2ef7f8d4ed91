#!/usr/bin/env bash
# Presence benchmark (issue 17): the cost of presence on connect churn, presence query
# latency at 10,000 subscribers, and a mass reconnect on a join/leave topic — presence
# against none, side by side in one run, with the in-memory broker and with Redis.
#
#   loadtest/bench-presence.sh                 # builds release, results under $BENCH_OUT
#   BENCH_QUICK=1 loadtest/bench-presence.sh   # small sizes: checks the script
#
# One gateway per mode, with a configuration file whose namespaces make
#   pr:*  presence + join_leave            pl:*  plain (no presence)
#   sp:*  stream + presence + join_leave   st:*  stream only
# Per round (the order of the pair swapped from round to round):
#   - churn: connect + handshake + subscribe + close, $CONC at a time, open loop, $DUR,
#     on pr: topics then pl: topics ($CHURN_TOPICS topics): connect cycles/s, and in
#     redis mode Redis CPU per cycle (/proc/<pid>/stat around the run);
#   - query: $QUERY_SUBS connections held on one pr: topic; $QUERIES sequential
#     `POST /api/presence` and `POST /api/presence_stats` timed by curl (p50, p99, max,
#     bytes);
#   - storm: $STORM_CLIENTS clients of one stream topic leave, miss $MISSED publications
#     and all come back at once (resume-storm), on sp: (join/leave on: 2 × clients
#     events, each to every subscriber, under the rate rule) then st:, while
#     $LIVE_SUBS clients of a plain topic get $LIVE_RATE publications/s: completion
#     time and the live topic's latency during the storm.
# Environment: BENCH_OUT (a temp dir), MODES ("embedded redis"), ROUNDS (2), DUR (8s),
# CONC (128), CHURN_TOPICS (100), QUERY_SUBS (10000), QUERIES (50), STORM_CLIENTS (5000),
# MISSED (200), LIVE_SUBS (200), LIVE_RATE (50), PARTS ("churn query storm": which
# measurements each round makes), BUILD (1), WSGATE (target/release/wsgate).
# Everything binds 127.0.0.1 on free ports, every run is bounded in time, and what the
# script started is stopped at exit, by pid.
set -euo pipefail
cd "$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
  D_ROUNDS=1 D_DUR=3s D_QUERY_SUBS=300 D_QUERIES=10 D_STORM=200 D_MISSED=50
else
  D_ROUNDS=2 D_DUR=8s D_QUERY_SUBS=10000 D_QUERIES=50 D_STORM=5000 D_MISSED=200
fi
MODES=${MODES:-embedded redis}
ROUNDS=${ROUNDS:-$D_ROUNDS}
DUR=${DUR:-$D_DUR}
CONC=${CONC:-128}
CHURN_TOPICS=${CHURN_TOPICS:-100}
QUERY_SUBS=${QUERY_SUBS:-$D_QUERY_SUBS}
QUERIES=${QUERIES:-$D_QUERIES}
STORM_CLIENTS=${STORM_CLIENTS:-$D_STORM}
MISSED=${MISSED:-$D_MISSED}
LIVE_SUBS=${LIVE_SUBS:-200}
LIVE_RATE=${LIVE_RATE:-50}
PARTS=${PARTS:-churn query storm}
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


cat >"$TMP/wsgate.toml" <<'EOF'
# The presence benchmark's namespaces; pl:* stays plain.
[[namespaces]]
name = "presence"
topics = ["pr:*"]
presence = true
join_leave = true

[[namespaces]]
name = "stream-presence"
topics = ["sp:*"]
history_size = 2000
history_ttl = "10m"
presence = true
join_leave = true

[[namespaces]]
name = "stream"
topics = ["st:*"]
history_size = 2000
history_ttl = "10m"
EOF
cp "$TMP/wsgate.toml" "$OUT/wsgate.toml"

REDIS_PORT="" REDIS_PID=""

start_gateway() {
  local mode=$1 port admin extra=()
  port=$(free_port); admin=$(free_port)
  [[ $mode == redis ]] && extra=(--redis-url "redis://127.0.0.1:$REDIS_PORT")
  "$WSGATE" --config "$TMP/wsgate.toml" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --node-id "bench-$mode" --drain-timeout 1s --rate-limit 10000000 --rate-burst 10000000 \
    --max-connections 30000 --log-level warn "${extra[@]}" >>"$OUT/servers.log" 2>&1 &
  local launched=$!
  PIDS+=("$launched")
  if ! wait_port "$port"; then tail -5 "$OUT/servers.log" >&2; return 1; fi
  GW_PID=$(pid_of_port "$port")
  [[ $GW_PID == "$launched" ]] || PIDS+=("$GW_PID")
  URL="ws://127.0.0.1:$port/ws"; API="http://127.0.0.1:$port/api"
  METRICS="http://127.0.0.1:$admin/metrics"
}

stop_gateway() {
  kill "$GW_PID" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$GW_PID" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$GW_PID" 2>/dev/null || true
}

# Runs the generator ($label, args…) with Redis's CPU measured around it in redis mode.
run() {
  local label=$1 before=""; shift
  [[ -n $REDIS_PID && $MODE == redis ]] && before=$(cpu_s "$REDIS_PID")
  local cmd=("$LT" "$@" --url "$URL" --server-pid "$GW_PID" --metrics-url "$METRICS"
    --source-addrs "$SRC" --no-progress --label "$label" --out "$OUT/$label.json")
  echo "${cmd[*]}" >>"$OUT/commands.txt"
  timeout 300 "${cmd[@]}" >"$OUT/$label.txt" 2>&1 || echo "$label: generator exit $?" >>"$OUT/errors.txt"
  if [[ -n $before ]]; then
    echo "$label $(awk -v a="$before" -v b="$(cpu_s "$REDIS_PID")" 'BEGIN{printf "%.3f", b - a}')" >>"$OUT/redis_cpu.txt"
  fi
}

# Times $QUERIES presence queries of $1 ($2: presence | presence_stats).
queries() {
  local topic=$1 what=$2 label=$3
  for _ in $(seq "$QUERIES"); do
    curl -s -o /dev/null -m 10 -w '%{time_total} %{size_download} %{http_code}\n' \
      -X POST "$API/$what" -d "{\"topic\":\"$topic\"}"
  done >"$OUT/$label.times"
}

{
  echo "date: $(date -u +%FT%TZ)"; echo "cpus: $(nproc)"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "redis: $(redis-server --version 2>/dev/null | cut -d' ' -f3)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "sizes: rounds $ROUNDS; churn $DUR x $CONC; query $QUERY_SUBS subscribers x $QUERIES; storm $STORM_CLIENTS clients, $MISSED missed, live $LIVE_SUBS at $LIVE_RATE/s"
} >"$OUT/env.txt"

for MODE in $MODES; do
  if [[ $MODE == redis ]]; then
    command -v redis-server >/dev/null || { log "no redis-server: redis mode skipped"; continue; }
    start_bench_redis
  fi
  log "$MODE: gateway"
  start_gateway "$MODE" || { echo "$MODE: gateway did not start" >>"$OUT/errors.txt"; continue; }
  if [[ $MODE == redis ]]; then
    c0=$(cpu_s "$REDIS_PID"); sleep 5; c1=$(cpu_s "$REDIS_PID")
    awk -v a="$c0" -v b="$c1" 'BEGIN{printf "%.4f\n", (b - a) / 5}' >"$OUT/redis_idle_cpu.txt"
  fi
  for r in $(seq "$ROUNDS"); do
    kinds="pr pl"; ((r % 2 == 0)) && kinds="pl pr"
    [[ " $PARTS " == *" churn "* ]] || kinds=""
    for k in $kinds; do
      log "$MODE round $r: churn on $k"
      run "$MODE-churn-$k-r$r" churn --rate 0 --concurrency "$CONC" --duration "$DUR" \
        --topics "$CHURN_TOPICS" --topic-prefix "$k:churn$r-"
    done
    if [[ " $PARTS " == *" query "* ]]; then
    log "$MODE round $r: $QUERY_SUBS subscribers held on one presence topic, queried"
    run "$MODE-query-hold-r$r" idle --connections "$QUERY_SUBS" --topics 1 --topic-prefix "pr:query$r-" \
      --duration 60s &
    hold=$!
    topic="pr:query$r-0"
    for _ in $(seq 600); do
      n=$(curl -s -m 5 -X POST "$API/presence_stats" -d "{\"topic\":\"$topic\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("clients",0))' 2>/dev/null || echo 0)
      [[ $n -ge $QUERY_SUBS ]] && break
      sleep 0.1
    done
    echo "$MODE-query-r$r listed $n" >>"$OUT/query_listed.txt"
    queries "$topic" presence "$MODE-query-list-r$r"
    queries "$topic" presence_stats "$MODE-query-stats-r$r"
    wait "$hold" || true
    fi
    skinds="sp st"; ((r % 2 == 0)) && skinds="st sp"
    [[ " $PARTS " == *" storm "* ]] || skinds=""
    for k in $skinds; do
      log "$MODE round $r: mass reconnect of $STORM_CLIENTS on $k"
      run "$MODE-storm-$k-r$r" resume-storm --topic-prefix "$k:storm$r-" --clients "$STORM_CLIENTS" \
        --topics 1 --missed "$MISSED" --publish-via http --http-batch 100 \
        --live-subscribers "$LIVE_SUBS" --live-rate "$LIVE_RATE" --live-topic "pl:live$r-$k" \
        --duration 60s --before 3s --after 1s --connect-timeout 30s
    done
    curl -s -m 5 "$METRICS" | grep '^wsgate_join_leave_events_total' >"$OUT/$MODE-join-leave-r$r.txt" || true
  done
  stop_gateway
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"

python3 - "$OUT" >"$OUT/summary.md" <<'EOF'
import json, sys, pathlib, re, statistics
out = pathlib.Path(sys.argv[1])
cpu = {}
if (out / "redis_cpu.txt").exists():
    for l in (out / "redis_cpu.txt").read_text().splitlines():
        k, c = l.split()
        cpu[k] = float(c)
def load(label):
    p = out / f"{label}.json"
    return json.loads(p.read_text()) if p.exists() else None
print("| churn run | connect cycles/s | connect p50 / p99 ms | failed | gateway CPU s per M connects | Redis CPU µs per cycle |")
print("|---|---|---|---|---|---|")
pairs = {}
for p in sorted(out.glob("*-churn-*.json")):
    r = json.loads(p.read_text()); c = r["connect"]; label = r["label"]
    srv = r["servers"][0]["cpu_s_per_million_events"] if r.get("servers") else None
    red = cpu.get(label); cycles = c["succeeded"]
    per = red / cycles * 1e6 if red is not None and cycles else None
    print(f"| {label} | {c['rate_per_s']:.0f} | {c['latency']['p50_ms']:.2f} / {c['latency']['p99_ms']:.2f} | {c['failed']} | "
          f"{'–' if srv is None else f'{srv:.1f}'} | {'–' if per is None else f'{per:.1f}'} |")
    m = re.match(r"(.+)-churn-(pr|pl)-r(\d+)$", label)
    if m:
        pairs.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = (c["rate_per_s"], per)
print()
print("| mode | round | connect rate with presence / without | Redis CPU per cycle with / without |")
print("|---|---|---|---|")
for (mode, rnd), v in sorted(pairs.items()):
    if "pr" in v and "pl" in v:
        rate = v["pr"][0] / v["pl"][0] if v["pl"][0] else float("nan")
        red = f"{v['pr'][1] / v['pl'][1]:.2f}×" if v["pr"][1] and v["pl"][1] else "–"
        print(f"| {mode} | {rnd} | {rate:.2f}× | {red} |")
print()
print("| query run | n | p50 ms | p99 ms | max ms | bytes | non-200 |")
print("|---|---|---|---|---|---|---|")
for p in sorted(out.glob("*.times")):
    rows = [l.split() for l in p.read_text().splitlines() if l.strip()]
    t = sorted(float(x[0]) * 1000 for x in rows)
    if not t:
        continue
    q = lambda f: t[min(len(t) - 1, int(f * len(t)))]
    bad = sum(1 for x in rows if x[2] != "200")
    print(f"| {p.stem} | {len(t)} | {q(0.5):.1f} | {q(0.99):.1f} | {t[-1]:.1f} | {rows[-1][1]} | {bad} |")
if (out / "query_listed.txt").exists():
    print()
    print("Listed before querying: " + "; ".join((out / "query_listed.txt").read_text().split("\n")[:-1]))
print()
print("| storm | clients | completed | all complete within s | per client p50 / p99 ms | live p50 / p99 before | live p50 / p99 during | live lost | Redis CPU s |")
print("|---|---|---|---|---|---|---|---|---|")
for p in sorted(out.glob("*-storm-*.json")):
    r = json.loads(p.read_text()); s = r.get("resume")
    if not s:
        continue
    l = s.get("live") or {}; lb, ld = l.get("before", {}), l.get("during", {})
    c = s["completion_s"]
    print(f"| {r['label']} | {s['clients']} | {s['completed']} | {'NOT ALL' if c is None else f'{c:.2f}'} | "
          f"{s['completion']['p50_ms']:.0f} / {s['completion']['p99_ms']:.0f} | "
          f"{lb.get('p50_ms', float('nan')):.2f} / {lb.get('p99_ms', float('nan')):.2f} | "
          f"{ld.get('p50_ms', float('nan')):.2f} / {ld.get('p99_ms', float('nan')):.2f} | {l.get('lost', '–')} | "
          f"{cpu.get(r['label'], float('nan')):.2f} |")
print()
for p in sorted(out.glob("*-join-leave-*.txt")):
    print(f"{p.stem}: " + "; ".join(l.replace('wsgate_join_leave_events_total', '') for l in p.read_text().splitlines()))
EOF
cat "$OUT/summary.md"
[[ -f $OUT/errors.txt ]] && { echo; echo "errors:"; cat "$OUT/errors.txt"; }
echo "results: $OUT" >&2
