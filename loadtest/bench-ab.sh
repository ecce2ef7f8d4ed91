#!/usr/bin/env bash
# Before/after: loadtest/bench.sh (wsgate only) for two checkouts of the repository,
# alternating A, B, A, B… in one run, so both see the same machine and the same noise.
#
#   loadtest/bench-ab.sh A_DIR B_DIR        e.g. a worktree of the old commit, and this one
#
# Each checkout builds its own release binaries (bench.sh does) and runs the whole
# wsgate workload set (kernel floor, idle 19,000, churn, fan-out 500k/2M/6M, slow
# consumers, cross-node). Results: $AB_OUT/<A|B>-<round>/ (one bench.sh output each)
# and $AB_OUT/ab.md, the wsgate rows of every run side by side.
# Environment: AB_ROUNDS (default 2), AB_OUT (default target/bench-ab), BENCH_NICE,
# BENCH_QUICK (passed on to bench.sh).
set -euo pipefail
[[ $# == 2 ]] || { echo "usage: $0 A_DIR B_DIR" >&2; exit 2; }
A=$(cd "$1" && pwd); B=$(cd "$2" && pwd)
ROUNDS=${AB_ROUNDS:-2}
OUT=$(mkdir -p "${AB_OUT:-target/bench-ab}" && cd "${AB_OUT:-target/bench-ab}" && pwd)

run() { # label dir round
  local dest="$OUT/$1-$3"
  echo "== $1 (round $3): $2 at $(git -C "$2" rev-parse --short HEAD)" >&2
  (cd "$2" && BENCH_TARGETS=wsgate BENCH_OUT="$dest" bash loadtest/bench.sh >"$OUT/$1-$3.log" 2>&1)
}

for r in $(seq "$ROUNDS"); do
  run A "$A" "$r"
  run B "$B" "$r"
done

{
  echo "A: $A at $(git -C "$A" rev-parse --short HEAD); B: $B at $(git -C "$B" rev-parse --short HEAD)"
  echo
  head -2 "$OUT/A-1/summary.md" | sed 's/^| workload |/| run | workload |/; s/^|---|/|---|---|/'
  for r in $(seq "$ROUNDS"); do
    for l in A B; do
      grep '| wsgate |' "$OUT/$l-$r/summary.md" | sed "s/^|/| $l-$r |/"
    done
  done | sort -t'|' -k3,3 -k2,2
} >"$OUT/ab.md"
cat "$OUT/ab.md"
