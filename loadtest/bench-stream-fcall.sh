#!/usr/bin/env bash
# Redis CPU of one stream function call, without a gateway: redis-benchmark sends
# `FCALL wsgate_gateway_publish` (and, for the floor, `PUBLISH`, an empty function and
# the smallest function a numbered stream can be) to a fresh redis-server, pipelined,
# with one subscriber on every channel, and the redis-server's CPU (utime + stime from
# /proc) is divided by the calls.
#
#   [BEFORE_REV=<git revision>] loadtest/bench-stream-fcall.sh
#
# Variants, each on its own 300 channels (so each finds its streams as full as the
# others), in rounds:
#   before  the library of $BEFORE_REV (crates/redis-broker/src/streams.lua there;
#           left out when BEFORE_REV is not set)
#   after   the library of the work tree
#   publish PUBLISH of the same payload
#   empty   FCALL of a function that does nothing (the floor of any function call)
#   xadd    XADD with MAXLEN ~ of the same payload, a command alone (the history append)
#   minimal FCALL of INCR + XADD (MAXLEN ~) + PUBLISH and nothing else: a numbered,
#           kept, relayed publication without epoch, expiry or checks (the floor of
#           a stream publication made by one function call)
# Environment: BEFORE_REV, ROUNDS (3), CALLS (30000 per variant and round),
# SIZE (history size argument, 200), FILL (calls per stream variant before the rounds,
# 60000: 200 per channel, so the histories are full and trimmed), BENCH_OUT (a temp
# dir). Results: $OUT/fcall.txt.
set -euo pipefail
cd "$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"

BEFORE_REV=${BEFORE_REV:-}
ROUNDS=${ROUNDS:-3}
CALLS=${CALLS:-30000}
SIZE=${SIZE:-200}
FILL=${FILL:-60000}
# shellcheck source=loadtest/bench-common.sh
source loadtest/bench-common.sh
bench_init
for tool in redis-server redis-cli redis-benchmark; do
  command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 2; }
done

# The library as a gateway loads it (single mode), under another name, its functions
# renamed <prefix>_…
library() {
  sed -e 's/__SHARDED__/false/; s/__DEFAULT_SIZE__/100/; s/__DEFAULT_TTL_MS__/300000/' \
    -e "s/^#!lua name=wsgate/#!lua name=$2/" \
    -e "s/register_function('wsgate_\\([a-z_]*\\)'/register_function('$2_\\1'/" "$1"
}
libs=(after empty minimal)
variants=(after publish empty xadd minimal)
if [[ -n $BEFORE_REV ]]; then
  git show "$BEFORE_REV:crates/redis-broker/src/streams.lua" >"$TMP/before.lua"
  library "$TMP/before.lua" before >"$TMP/lib-before.lua"
  libs=(before "${libs[@]}")
  variants=(before "${variants[@]}")
fi
library crates/redis-broker/src/streams.lua after >"$TMP/lib-after.lua"
cat >"$TMP/lib-empty.lua" <<'EOF'
#!lua name=empty
redis.register_function('empty_call', function() return 1 end)
EOF
cat >"$TMP/lib-minimal.lua" <<'EOF'
#!lua name=minimal
redis.register_function('minimal_publish', function(keys, args)
  local seq = redis.call('INCR', keys[1] .. ':seq')
  redis.call('XADD', keys[1] .. ':history', 'MAXLEN', '~', args[2], seq .. '-0', 'd', args[1])
  return redis.call('PUBLISH', keys[1], seq .. ' ' .. args[1])
end)
EOF

start_bench_redis
for lib in "${libs[@]}"; do
  redis-cli -p "$REDIS_PORT" -x FUNCTION LOAD REPLACE <"$TMP/lib-$lib.lua" >/dev/null
done
channels=()
for v in "${variants[@]}"; do
  for i in $(seq 0 299); do channels+=("$(printf 'wsgate:%s%012d' "$v" "$i")"); done
done
timeout 3600 redis-cli -p "$REDIS_PORT" SUBSCRIBE "${channels[@]}" >/dev/null 2>&1 &
PIDS+=("$!")
sleep 0.5

PAYLOAD='{"payload":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'
AT=1765000000000123456
command_of() {
  local ch="wsgate:$1__rand_int__"
  case $1 in
    publish) echo PUBLISH "$ch" "$PAYLOAD" ;;
    empty) echo FCALL empty_call 1 "$ch" "$PAYLOAD" ;;
    xadd) echo XADD "$ch:history" MAXLEN '~' "$SIZE" '*' d "$PAYLOAD" ;;
    minimal) echo FCALL minimal_publish 1 "$ch" "$PAYLOAD" "$SIZE" ;;
    *) echo FCALL "$1_gateway_publish" 1 "$ch" "$PAYLOAD" "$AT" "$SIZE" 600000 ;;
  esac
}
bench() {
  local n=$1; shift
  # shellcheck disable=SC2046
  timeout 600 redis-benchmark -p "$REDIS_PORT" -n "$n" -P 16 -c 2 -r 300 -q "$@" >/dev/null 2>&1
}
for v in "${variants[@]}"; do
  [[ $v == publish || $v == empty ]] && continue
  read -r -a cmd <<<"$(command_of "$v")"
  bench "$FILL" "${cmd[@]}"
done
{
  echo "date: $(date -u +%FT%TZ); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "redis: $(redis-server --version | cut -d' ' -f3); before: ${BEFORE_REV:-none}; after: $(git rev-parse --short HEAD) + work tree"
  echo "redis-benchmark -n $CALLS -P 16 -c 2 -r 300 -q <command>; 300 channels per variant, each subscribed"
  echo "round variant us_per_call errors command"
} >"$OUT/fcall.txt"
for r in $(seq "$ROUNDS"); do
  for v in "${variants[@]}"; do
    read -r -a cmd <<<"$(command_of "$v")"
    a=$(cpu_s "$REDIS_PID")
    bench "$CALLS" "${cmd[@]}"
    b=$(cpu_s "$REDIS_PID")
    errors=$(redis-cli -p "$REDIS_PORT" INFO errorstats | grep -c '^errorstat' || true)
    echo "$r $v $(awk -v a="$a" -v b="$b" -v n="$CALLS" 'BEGIN{printf "%.2f", (b - a) * 1e6 / n}') $errors ${cmd[*]:0:3}" >>"$OUT/fcall.txt"
  done
done
cat "$OUT/fcall.txt"
