#!/usr/bin/env bash
# Runs the JS client's tests: unit tests, type check, tests against real gateway
# processes, and the headless Chromium end-to-end test of the demo.
#
# Installs what it needs: the test dependencies (npm ci), Debian's chromium and
# redis-server when missing, and the gateway binary (cargo build -p wsgate) unless
# WSGATE_BIN points at one. Exits non-zero when any test fails.
#
# Usage: clients/js/test/run.sh [test files...]   (default: every *.test.js)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
cd "$here"

need_apt=()
command -v chromium >/dev/null 2>&1 || [[ -n "${CHROMIUM_PATH:-}" ]] || need_apt+=(chromium)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if ((${#need_apt[@]})); then
  echo "run.sh: installing ${need_apt[*]} with apt-get" >&2
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [[ ! -d node_modules ]] || [[ package-lock.json -nt node_modules ]]; then
  npm ci --no-audit --no-fund --loglevel=error
fi

if [[ -z "${WSGATE_BIN:-}" ]]; then
  (cd "$root" && cargo build -p wsgate --quiet)
  export WSGATE_BIN="$root/target/debug/wsgate"
fi

if (($#)); then
  files=("$@")
else
  files=(*.test.js)
fi
# One file at a time: the gateway tests start processes and the browser is heavy on 2 cores.
exec node --test --test-concurrency=1 --test-reporter=spec "${files[@]}"
