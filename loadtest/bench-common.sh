# Shell helpers shared by the bench scripts (sourced, not run). The script that sources
# it sets PIDS (processes to stop at exit) and TMP (a scratch directory) and calls
# `trap cleanup EXIT`.

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
