"""Prometheus config, alert rules and the Grafana dashboard, as shipped to compose and
to the Helm chart; and the runbook in docs/operations.md for every alert."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from conftest import REPO

PROM = REPO / "deploy/prometheus"
ALERTS = PROM / "alerts.yml"
DASHBOARD = REPO / "deploy/grafana/wsgate.json"
OPERATIONS = REPO / "docs/operations.md"
METRICS_SRC = REPO / "crates/metrics/src/lib.rs"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def alert_names() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def test_prometheus_config_and_rules_pass_promtool():
    res = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout
    res = promtool("check", "rules", str(ALERTS))
    assert res.returncode == 0, res.stdout + res.stderr


def test_chart_links_to_the_same_files():
    chart_files = REPO / "helm/wsgate/files"
    assert (chart_files / "alerts.yml").resolve() == ALERTS.resolve()
    assert (chart_files / "wsgate.json").resolve() == DASHBOARD.resolve()


def exported_metrics() -> set[str]:
    return set(re.findall(r'"(wsgate_[a-z_]+)"', METRICS_SRC.read_text()))


def used_metrics(text: str) -> set[str]:
    names = set(re.findall(r"\b(wsgate_[a-z_]+)", text))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_alerts_and_dashboard_use_metrics_the_gateway_exports():
    exported = exported_metrics()
    assert "wsgate_connections" in exported
    for path in (ALERTS, DASHBOARD):
        unknown = used_metrics(path.read_text()) - exported
        assert not unknown, f"{path.name} uses metrics nobody exports: {unknown}"


def test_dashboard_is_grafana_json_with_a_datasource_variable():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"] and d["panels"]
    variables = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert variables, "a datasource variable, so the same JSON works in compose and in clusters"


def test_every_alert_has_a_runbook_section():
    text = OPERATIONS.read_text()
    headings = set(re.findall(r"^#{3,4} `?(\w+)`?\s*$", text, re.M))
    missing = [a for a in alert_names() if a not in headings]
    assert not missing, f"docs/operations.md has no section for: {missing}"


METRICS_DOC = REPO / "docs/metrics.md"


def test_every_exported_metric_is_documented():
    doc = METRICS_DOC.read_text()
    missing = sorted(m for m in exported_metrics() if f"`{m}`" not in doc)
    assert not missing, f"docs/metrics.md does not document: {missing}"


def test_every_exported_metric_has_a_dashboard_panel():
    missing = sorted(exported_metrics() - used_metrics(DASHBOARD.read_text()))
    assert not missing, f"no dashboard panel reads: {missing}"


def test_dashboard_panels_have_unique_ids_and_do_not_overlap():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    taken: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{p['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", f"{p['title']}: datasource"
            assert 'instance=~"$instance"' in t["expr"], f"{p['title']}: the Node variable"
