# Shell helpers shared by the bench scripts (sourced, not run). A script that sources
# it calls `bench_init` (or sets PIDS and TMP itself and calls `trap cleanup EXIT`).

# The usual start of a bench script: OUT (results: $BENCH_OUT, else a temp dir), TMP (a
# scratch directory), PIDS (processes to stop at exit, by `cleanup`, trapped on EXIT).
bench_init() {
  OUT=${BENCH_OUT:-$(mktemp -d)}
  TMP=$(mktemp -d)
  mkdir -p "$OUT"
  PIDS=()
  trap cleanup EXIT
}

# Exits with a hint when one of the release binaries named is not built.
require_built() {
  for b in "$@"; do
    [[ -x $b ]] || { echo "$b is missing: cargo build --release -p wsgate -p wsgate-loadtest" >&2; exit 1; }
  done
}

# Stops everything in PIDS (TERM, then KILL) and removes TMP.
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}

# Waits (up to 10 s) until something listens on 127.0.0.1:$1.
wait_port() {
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# The pid of the process listening on a port (not a wrapper's).
pid_of_port() { ss -ltnpH "sport = :$1" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; }

# CPU seconds (user + system) of a process so far.
cpu_s() { awk -v t="$(getconf CLK_TCK)" '{ print ($14 + $15) / t }' "/proc/$1/stat"; }

# A TCP port free on 127.0.0.1 right now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts a redis-server on a free port without persistence, its log in $OUT/servers.log;
# sets REDIS_PORT and REDIS_PID (added to PIDS).
start_bench_redis() {
  REDIS_PORT=$(free_port)
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --dir "$TMP" \
    --client-output-buffer-limit "pubsub 256mb 64mb 60" --loglevel warning >>"$OUT/servers.log" 2>&1 &
  wait_port "$REDIS_PORT"
  REDIS_PID=$(pid_of_port "$REDIS_PORT"); PIDS+=("$REDIS_PID")
}
