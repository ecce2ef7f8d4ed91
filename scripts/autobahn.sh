#!/usr/bin/env bash
# Runs the Autobahn TestSuite fuzzingclient (every case but 12.* and 13.*,
# compression) against wsgate's `--echo` endpoint and fails unless every case is
# OK, NON-STRICT or INFORMATIONAL. The summary is printed; the HTML report stays in
# target/autobahn/reports. Usage: scripts/autobahn.sh
# env: WSGATE_BIN (a built binary), WSGATE_AUTOBAHN_INSTALLER (path of install-autobahn.sh)
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel)
cd "$ROOT"
# shared/ sits beside the repository (CI); a worktree elsewhere can point at it.
INSTALLER=${WSGATE_AUTOBAHN_INSTALLER:-"$(git rev-parse --show-toplevel)/../shared/tools/install-autobahn.sh"}
WSTEST=$("$INSTALLER" | tail -n 1)
if [ -z "${WSGATE_BIN:-}" ]; then
  cargo build --release -q -p wsgate
  WSGATE_BIN="$ROOT/target/release/wsgate"
fi
OUT="$ROOT/target/autobahn"
rm -rf "$OUT"; mkdir -p "$OUT"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port); ADMIN=$(free_port)
# The suite sends messages up to 16 MiB and bursts of 1000 messages: the limits are
# raised for this run only; the code paths are the production ones.
"$WSGATE_BIN" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN" --echo \
  --max-message-size 16MiB --outbound-queue-bytes 64MiB \
  --rate-limit 1000000 --rate-burst 1000000 --log-level warn >"$OUT/wsgate.log" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$ADMIN/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
cat >"$OUT/spec.json" <<JSON
{"servers":[{"agent":"wsgate","url":"ws://127.0.0.1:$PORT/echo"}],
 "cases":["*"],"exclude-cases":["12.*","13.*"],"exclude-agent-cases":{},
 "outdir":"$OUT/reports"}
JSON
(cd "$OUT" && timeout 600 "$WSTEST" -m fuzzingclient -s spec.json >"$OUT/wstest.log" 2>&1)
python3 - "$OUT/reports/index.json" <<'PY'
import collections, json, sys
results = json.load(open(sys.argv[1]))["wsgate"]
ok = {"OK", "NON-STRICT", "INFORMATIONAL"}
counts = collections.Counter(r["behavior"] for r in results.values())
closes = collections.Counter(r["behaviorClose"] for r in results.values())
bad = sorted((c for c, r in results.items() if r["behavior"] not in ok),
             key=lambda c: [int(x) for x in c.split(".")])
print(f"autobahn: {len(results)} cases; behavior {dict(counts)}; close {dict(closes)}")
for c in bad:
    print(f"  FAILED {c}: {results[c]['behavior']} (close {results[c]['behaviorClose']})")
sys.exit(1 if bad or not results else 0)
PY
