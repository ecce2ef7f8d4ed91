#!/usr/bin/env bash
# The readers that keep up, with 10% of the subscribers stalled, under each
# slow-consumer policy, beside a control run where everyone reads (docs/benchmarks.md,
# "10% stalled readers, per policy"). ROUNDS rounds (default 3), the variants in
# alternating order each round, a fresh gateway per run; reports and a table in OUT.
#
# Usage: loadtest/bench-policies.sh
# env:   ROUNDS (3), OUT (target/bench-policies), WSGATE_BIN (target/release/wsgate),
#        LOADTEST_BIN (target/release/wsgate-loadtest)
# Needs the release builds: cargo build --release -p wsgate -p wsgate-loadtest
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
. loadtest/bench-common.sh
ROUNDS=${ROUNDS:-3}
OUT=${OUT:-target/bench-policies}
GW_BIN=${WSGATE_BIN:-target/release/wsgate}
L=${LOADTEST_BIN:-target/release/wsgate-loadtest}
mkdir -p "$OUT"
TMP=$(mktemp -d)
PIDS=()
trap cleanup EXIT

W=(--subscribers 500 --topics 10 --publishers 10 --rate 1000 --payload 1000 --duration 12s --no-progress)
variants=(control disconnect drop_oldest latest)

run_one() { # variant round
  local v=$1 r=$2 policy=$1
  [ "$v" = control ] && policy=disconnect
  printf '[[namespaces]]\nname = "lt"\ntopics = ["lt.slow.*"]\nslow_consumer = "%s"\n' "$policy" >"$TMP/policy.toml"
  local P A
  P=$(free_port); A=$(free_port)
  "$GW_BIN" --listen "127.0.0.1:$P" --admin-listen "127.0.0.1:$A" --node-id lt \
    --drain-timeout 1s --rate-limit 10000000 --rate-burst 10000000 --log-level warn \
    --config "$TMP/policy.toml" >>"$OUT/servers.log" 2>&1 &
  local gw=$!
  PIDS+=("$gw")
  wait_port "$P"
  local c=(--target wsgate --url "ws://127.0.0.1:$P/ws" --server-pid "$gw" --topic-prefix lt.slow.)
  if [ "$v" = control ]; then
    "$L" fanout "${c[@]}" "${W[@]}" --label control --out "$OUT/$v-r$r.json"
  else
    "$L" slow "${c[@]}" "${W[@]}" --slow-share 0.1 --slow-after 2s --slow-all-topics \
      --label "$v" --out "$OUT/$v-r$r.json"
  fi
  kill "$gw" 2>/dev/null || true
  wait "$gw" 2>/dev/null || true
}

for r in $(seq "$ROUNDS"); do
  order=("${variants[@]}")
  if [ $((r % 2)) = 0 ]; then
    order=(latest drop_oldest disconnect control)
  fi
  for v in "${order[@]}"; do
    echo "== round $r: $v" >&2
    run_one "$v" "$r"
  done
done
"$L" table "$OUT"/*-r*.json | tee "$OUT/table.md"
