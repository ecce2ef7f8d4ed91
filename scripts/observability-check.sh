#!/usr/bin/env bash
# Observability checks against real tools, on a fresh machine too:
#   - installs Prometheus + promtool (Debian package `prometheus`) when missing;
#   - runs the binary's integration tests: /metrics under real traffic, OTLP span
#     export to a receiver, `promtool check metrics` on a live scrape,
#     `promtool check rules` + `promtool test rules` on deploy/prometheus, and a real
#     Prometheus scraping a loaded gateway where every dashboard and alert query
#     must parse and find data.
# Usage: scripts/observability-check.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    echo "installing prometheus (for promtool and a real server)..." >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package starts a system-wide server on :9090; the tests start their own.
    ($SUDO systemctl stop prometheus 2>/dev/null || $SUDO service prometheus stop 2>/dev/null) || true
fi

cargo test -p wsgate-metrics "$@"
cargo test -p wsgate --test metrics --test otlp --test prometheus "$@"
