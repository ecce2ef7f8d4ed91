"""deploy/haproxy/haproxy.cfg: checked by HAProxy itself, and its WebSocket settings.

The live test (the same file in front of three gateways and Redis) is test_lb.py.
"""

from __future__ import annotations

import os
import re
import subprocess

from conftest import REPO

CFG = REPO / "deploy/haproxy/haproxy.cfg"


def cfg_defaults() -> dict[str, str]:
    """The ${NAME-default} variables of the config and their (compose) defaults."""
    return dict(re.findall(r'"\$\{(\w+)-([^}]*)\}"', CFG.read_text()))


def loopback_env(**overrides: str) -> dict[str, str]:
    env = {
        "LB_BIND": "127.0.0.1:1", "LB_STATS_BIND": "127.0.0.1:2",
        "LB_GW1": "127.0.0.1:3", "LB_GW2": "127.0.0.1:4", "LB_GW3": "127.0.0.1:5",
        "LB_GW1_ADMIN_PORT": "6", "LB_GW2_ADMIN_PORT": "7", "LB_GW3_ADMIN_PORT": "8",
    }
    env.update(overrides)
    return env


def haproxy_check(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["haproxy", "-c", "-f", str(CFG)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=30)


def test_config_is_valid_on_loopback_without_warnings():
    res = haproxy_check(loopback_env())
    assert res.returncode == 0, res.stderr
    assert "WARNING" not in res.stderr, res.stderr


def test_every_variable_has_a_default():
    # Compose passes no LB_* variables: every one used needs a default.
    used = set(re.findall(r"\$\{(\w+)", CFG.read_text()))
    assert used == set(cfg_defaults())


def test_bad_values_are_refused():
    res = haproxy_check(loopback_env(LB_TUNNEL_TIMEOUT="soon"))
    assert res.returncode != 0


def test_websocket_settings():
    text = CFG.read_text()
    assert "balance leastconn" in text
    assert "option httpchk GET /readyz" in text
    assert re.search(r"timeout tunnel \"\$\{LB_TUNNEL_TIMEOUT-", text)
    assert "retry-on conn-failure empty-response 503" in text
    assert "option redispatch" in text
    # No stickiness of any kind.
    assert not re.search(r"^\s*(cookie|stick|stick-table|balance source)\b", text, re.M)
    # Only client paths are routed: the admin API is never reachable through the LB.
    assert "http-request deny deny_status 404 unless ws_path || sse_path || api_path || demo_path" in text
    assert "acl sse_path  path /sse" in text
