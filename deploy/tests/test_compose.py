"""deploy/docker-compose.yml: validated by the real `docker compose config` (the client
needs no engine for that), then checked for the properties the system relies on."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO
from test_haproxy import cfg_defaults

COMPOSE_FILE = REPO / "deploy/docker-compose.yml"
GATEWAYS = ["wsgate-1", "wsgate-2", "wsgate-3"]


def compose(*args: str) -> subprocess.CompletedProcess:
    """`docker compose` through the docker CLI when there is one (with the plugin from
    run.sh), else the standalone docker-compose binary: the same program either way."""
    env = dict(os.environ)
    docker = shutil.which("docker")
    if docker and os.environ.get("WSGATE_DOCKER_CONFIG"):
        env["DOCKER_CONFIG"] = os.environ["WSGATE_DOCKER_CONFIG"]
        argv = [docker, "compose"]
    else:
        binary = os.environ.get("WSGATE_COMPOSE_BIN")
        assert binary, "no docker compose client: run deploy/tests/run.sh, which installs it"
        argv = [binary]
    # Keep the user's environment out of the interpolation (e.g. a WSGATE_API_KEY).
    for name in list(env):
        if name.startswith(("WSGATE_API_KEY", "WSGATE_IMAGE", "GRAFANA_")):
            del env[name]
    return subprocess.run([*argv, "-f", str(COMPOSE_FILE), *args],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def config() -> dict:
    res = compose("config", "--format", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def duration_seconds(d: str) -> float:
    total = 0.0
    for n, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", d):
        total += float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def test_compose_config_validates():
    res = compose("config", "--quiet")
    assert res.returncode == 0, res.stderr


def test_compose_config_rejects_a_broken_file(tmp_path):
    # The validator really validates: the same file with an unknown key fails.
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["lb"]["bogus_key"] = 1
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    env = dict(os.environ)
    binary = os.environ["WSGATE_COMPOSE_BIN"]
    res = subprocess.run([binary, "-f", str(path), "config", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode != 0 and "bogus_key" in res.stderr


def test_whole_system_is_there(config):
    assert set(config["services"]) == {"redis", *GATEWAYS, "lb", "prometheus", "grafana"}


def test_gateways_build_from_the_dockerfile(config):
    for name in GATEWAYS:
        svc = config["services"][name]
        assert svc["build"]["context"] == str(REPO)
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"


def test_gateways_use_redis_and_distinct_node_ids(config):
    ids = set()
    for name in GATEWAYS:
        env = config["services"][name]["environment"]
        assert env["WSGATE_REDIS_URL"].startswith("redis://redis:6379")
        assert config["services"][name]["depends_on"]["redis"]["condition"] == "service_healthy"
        ids.add(env["WSGATE_NODE_ID"])
    assert ids == set(GATEWAYS)


def test_gateways_stop_gracefully(config):
    for name in GATEWAYS:
        svc = config["services"][name]
        drain = duration_seconds(svc["environment"]["WSGATE_DRAIN_TIMEOUT"])
        assert duration_seconds(svc["stop_grace_period"]) > drain + 5
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert svc["ulimits"]["nofile"]["soft"] >= 65536
        assert svc["read_only"] is True
        assert svc["cap_drop"] == ["ALL"]


def test_load_balancer_uses_the_shipped_config(config):
    lb = config["services"]["lb"]
    (mount,) = [v for v in lb["volumes"] if v["target"].endswith("haproxy.cfg")]
    assert mount["source"] == str(REPO / "deploy/haproxy/haproxy.cfg") and mount["read_only"]
    # The config's default backends are the compose gateways on their ports.
    defaults = cfg_defaults()
    for i, name in enumerate(GATEWAYS, 1):
        assert defaults[f"LB_GW{i}"] == f"{name}:8080"
        assert defaults[f"LB_GW{i}_ADMIN_PORT"] == "9090"
    # The heartbeat-vs-tunnel-timeout rule holds for the compose values.
    heartbeat = duration_seconds(config["services"]["wsgate-1"]["environment"]["WSGATE_HEARTBEAT_INTERVAL"])
    assert duration_seconds(defaults["LB_TUNNEL_TIMEOUT"]) >= 3 * heartbeat


def test_prometheus_and_grafana_get_the_shipped_files(config):
    prom = {v["target"]: v["source"] for v in config["services"]["prometheus"]["volumes"]}
    assert prom["/etc/prometheus/prometheus.yml"] == str(REPO / "deploy/prometheus/prometheus.yml")
    # prometheus.yml names its rule file relative to itself: both must share a directory.
    assert prom["/etc/prometheus/alerts.yml"] == str(REPO / "deploy/prometheus/alerts.yml")
    graf = {v["target"]: v["source"] for v in config["services"]["grafana"]["volumes"]}
    assert graf["/etc/grafana/provisioning"] == str(REPO / "deploy/grafana/provisioning")
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/wsgate.yml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    assert graf[f"{dash_dir}/wsgate.json"] == str(REPO / "deploy/grafana/wsgate.json")
    ds = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


def test_every_bind_mount_exists_and_images_are_pinned(config):
    for name, svc in config["services"].items():
        for v in svc.get("volumes", []):
            if v["type"] == "bind":
                assert os.path.exists(v["source"]), f"{name}: {v['source']} does not exist"
        image = svc["image"]
        assert re.search(r":[^/:]+$", image) and not image.endswith(":latest"), f"{name}: {image}"


def test_published_ports_are_loopback_only(config):
    for name, svc in config["services"].items():
        for p in svc.get("ports", []):
            assert p["host_ip"] == "127.0.0.1", f"{name} publishes {p} beyond this machine"
