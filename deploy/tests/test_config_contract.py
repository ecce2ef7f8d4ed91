"""The deployment files and the gateway binary agree.

Every WSGATE_* variable that the Dockerfile, the compose file or the Helm chart sets must
be a flag of the binary (clap ignores unknown variables silently, so a typo would just
be lost), and the binary must start with the environment the chart renders.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import DOCKERFILE, PRODUCTION_VALUES, REPO
from helpers import free_port, http_status, wait_until
from test_compose import GATEWAYS, compose
from test_helm import VALUE_SETS, config_file, container, env, gateway

# Flags announced for later issues, which deployment files may already set for users who
# ask for them. Each one is reported; drop it from here once `wsgate --help` lists it.
PENDING_FLAGS: set[str] = set()


@pytest.fixture(scope="module")
def known_env(wsgate_binary) -> set[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_")}
    out = subprocess.run([str(wsgate_binary), "--help"], capture_output=True, text=True,
                         env=clean, check=True, timeout=30).stdout
    names = set(re.findall(r"\[env: (WSGATE_\w+)[=\]]", out))  # hidden values: no "="
    assert {"WSGATE_LISTEN", "WSGATE_ADMIN_LISTEN", "WSGATE_DRAIN_TIMEOUT"} <= names
    return names


def set_by_deployment_files(render) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}

    def add(where: str, names):
        for n in names:
            if n.startswith("WSGATE_"):
                found.setdefault(n, set()).add(where)

    add("Dockerfile", re.findall(r"(WSGATE_\w+)=", DOCKERFILE.read_text()))
    compose_file = yaml.safe_load((REPO / "deploy/docker-compose.yml").read_text())
    for name in GATEWAYS:
        add("docker-compose.yml", compose_file["services"][name]["environment"])
    add("docker-compose.yml", compose_file["x-gateway"]["environment"])
    for values, args in VALUE_SETS.items():
        add(f"helm ({values})", env(container(gateway(render(*args)))))
    add("helm (redis cluster)", env(container(gateway(render(
        "--set", "redis.url=redis://r:6379", "--set", "redis.mode=cluster",
        "--set", "redis.clusterSeeds={redis://r2:6379}")))))
    return found


def test_every_variable_set_is_a_flag_of_the_binary(render, known_env):
    found = set_by_deployment_files(render)
    unknown = {n: sorted(w) for n, w in found.items() if n not in known_env and n not in PENDING_FLAGS}
    assert not unknown, f"set by deployment files but unknown to `wsgate --help`: {unknown}"
    pending = sorted(n for n in found if n not in known_env)
    if pending:
        print(f"variables for flags not in this binary yet (ignored by it): {pending}")


def pod_env(manifests, ws: int, admin: int) -> dict[str, str]:
    """The gateway container's environment as the kubelet would build it, with the listen
    addresses moved to loopback ports and secrets given dummy values."""
    out: dict[str, str] = {}
    for name, e in env(container(gateway(manifests))).items():
        if "value" in e:
            value = re.sub(r"\$\((\w+)\)", lambda m: out.get(m.group(1), m.group(0)), e["value"])
        elif "fieldRef" in e["valueFrom"]:
            value = "pod-0"
        else:
            value = "dummy-secret"
        out[name] = value
    out["WSGATE_LISTEN"] = f"127.0.0.1:{ws}"
    out["WSGATE_ADMIN_LISTEN"] = f"127.0.0.1:{admin}"
    return out


@pytest.mark.parametrize("values", ["default", "production"])
def test_binary_starts_with_the_rendered_environment(render, wsgate_binary, tmp_path, values):
    ws, admin = free_port(), free_port()
    environment = pod_env(render(*VALUE_SETS[values]), ws, admin)
    if "WSGATE_REDIS_URL" in environment:
        # Only the address changes (nothing listens there: the node starts, unready until
        # Redis answers); the scheme and credentials are the rendered ones.
        environment["WSGATE_REDIS_URL"] = re.sub(r"@[^/]+", f"@127.0.0.1:{free_port()}",
                                                 environment["WSGATE_REDIS_URL"])
    if "WSGATE_JWT_PUBLIC_KEY" in environment:
        environment.pop("WSGATE_JWT_PUBLIC_KEY")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_")}
    log = tmp_path / "wsgate.log"
    proc = subprocess.Popen([str(wsgate_binary)], env={**clean, **environment},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: proc.poll() is not None or http_status(f"http://127.0.0.1:{admin}/healthz") == 200,
                   timeout=20, what="/healthz")
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_helm_config_file_passes_check_config(render, wsgate_binary, tmp_path):
    """The wsgate.toml the chart renders from `namespaces` is one the binary accepts."""
    path = tmp_path / "wsgate.toml"
    path.write_text(config_file(render(*VALUE_SETS["namespaces"])))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_")}
    res = subprocess.run([str(wsgate_binary), "check-config", str(path)], env=clean,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "chat: chat:*, dm:* → stream (history 1000000 messages, 10m)" in res.stdout, res.stdout
    assert "lobby: chat:lobby → plain" in res.stdout, res.stdout
