"""The Helm chart: `helm lint`, `helm template` and checks on the rendered manifests.

Each check runs on every values set in VALUE_SETS: the defaults, the production-like
file, the bundled Redis and a few variants. Refusals (a `latest` tag, a grace period
shorter than the drain...) are tested at the end.
"""

from __future__ import annotations

import json
import re
import tomllib
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import CHART, DOCKERFILE, PRODUCTION_VALUES, REPO, helm_template

VALUE_SETS = {
    "default": (),
    "production": ("-f", str(PRODUCTION_VALUES)),
    "bundled-redis": ("--set", "redis.bundled.enabled=true", "--set", "replicaCount=3"),
    "hard-anti-affinity": (
        "--set", "redis.url=redis://r:6379", "--set", "replicaCount=3",
        "--set", "podAntiAffinity=hard", "--set", "topologySpread.enabled=false",
        "--set", "config.drainTimeout=45s", "--set", "secrets.jwtPublicKey=JWKS",
        "--set", "secrets.jwtPublicKeyFile=jwks.json", "--set", "drain.preStop=none",
        "--set", "tls.enabled=true", "--set", "tls.secretName=wsgate-tls",
        "--set", "ingress.enabled=true",
    ),
    "namespaces": (
        "--set-json", 'namespaces=[{"name": "chat", "topics": ["chat:*", "dm:*"], '
        '"historySize": 1000000, "historyTtl": "10m"}, {"name": "lobby", "topics": ["chat:lobby"]}, '
        '{"name": "rooms", "topics": ["room.*"], "presence": true, "joinLeave": true, '
        '"joinLeaveRate": 5, "clientPublish": false}]',
    ),
}
CONFIG_PATH = "/etc/wsgate/config/wsgate.toml"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the
# offline schemas know.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version() + ".0")
# Kinds whose schema is a CRD (Prometheus Operator), not part of Kubernetes.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

GATEWAY_SELECTOR = {
    "app.kubernetes.io/name": "wsgate",
    "app.kubernetes.io/instance": "t",
    "app.kubernetes.io/component": "gateway",
}


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", duration)
    assert m, f"not a duration: {duration!r}"
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def gateway(manifests) -> dict:
    return manifests.one("Deployment", "wsgate")


def container(deploy: dict) -> dict:
    (c,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "wsgate"]
    return c


def env(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def port_number(c: dict, name: str) -> int:
    (p,) = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return p


def dockerfile_directive(name: str) -> str:
    lines = [l for l in DOCKERFILE.read_text().splitlines() if l.startswith(name + " ")]
    return lines[-1][len(name) + 1:].strip()


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- lint --------------------------------------------------------------------------------

@pytest.mark.parametrize("values", ["default", "production"])
def test_helm_lint_strict(helm, values):
    args = [] if values == "default" else ["-f", str(PRODUCTION_VALUES)]
    res = subprocess.run([helm, "lint", "--strict", str(CHART), *args],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 chart(s) failed" in res.stdout


# --- every values set ----------------------------------------------------------------------

@pytest.fixture(params=list(VALUE_SETS))
def manifests(request, render):
    return render(*VALUE_SETS[request.param])


def test_manifests_validate_against_kubernetes_schemas(manifests):
    for m in manifests:
        if m["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(m, version, strict=True)


def test_probes_use_admin_port_endpoints(manifests):
    c = container(gateway(manifests))
    admin = port_number(c, "admin")
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["startupProbe"]["httpGet"]["port"] == "admin"
    # The admin listener really is on that port, on all interfaces (the kubelet probes
    # the pod IP).
    assert env(c)["WSGATE_ADMIN_LISTEN"]["value"] == f"0.0.0.0:{admin}"
    assert env(c)["WSGATE_LISTEN"]["value"] == f"0.0.0.0:{port_number(c, 'ws')}"


def test_grace_period_outlasts_drain(manifests):
    d = gateway(manifests)
    c = container(d)
    drain = seconds(env(c)["WSGATE_DRAIN_TIMEOUT"]["value"])
    grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain + 5, f"grace {grace}s leaves no margin over the {drain}s drain"


def test_prestop_starts_the_drain(manifests, request):
    c = container(gateway(manifests))
    pre = c.get("lifecycle", {}).get("preStop")
    if "drain.preStop=none" in VALUE_SETS[request.node.callspec.params["manifests"]]:
        assert pre is None
        return
    argv = pre["exec"]["command"]
    # The binary the image's entrypoint runs (the image has no shell and no curl).
    entrypoint = json.loads(dockerfile_directive("ENTRYPOINT"))
    assert argv[0] == entrypoint[-1] == "/usr/local/bin/wsgate"
    assert argv[1] == "drain"
    assert argv[argv.index("--admin-url") + 1] == f"http://127.0.0.1:{port_number(c, 'admin')}"


def test_image_is_pinned_never_latest(manifests):
    for m in manifests:
        spec = m.get("spec", {}).get("template", {}).get("spec")
        if not spec:
            continue
        for c in spec["containers"] + spec.get("initContainers", []):
            image = c["image"]
            assert "@sha256:" in image or re.search(r":[^/:]+$", image), f"{image} has no tag"
            assert not image.endswith(":latest"), image


def test_pods_are_non_root_read_only_and_bounded(manifests):
    uid = int(dockerfile_directive("USER").split(":")[0])
    for d in manifests.of_kind("Deployment"):
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (d["metadata"]["name"], kind)
    # The gateway runs as the image's own user.
    assert gateway(manifests)["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


def test_pods_spread_over_nodes(manifests):
    pod = gateway(manifests)["spec"]["template"]["spec"]
    labels = gateway(manifests)["spec"]["template"]["metadata"]["labels"]
    terms = []
    anti = pod.get("affinity", {}).get("podAntiAffinity", {})
    terms += [t["podAffinityTerm"] for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    terms += anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    terms += pod.get("topologySpreadConstraints", [])
    assert terms, "neither pod anti-affinity nor topology spread"
    assert any(t["topologyKey"] == "kubernetes.io/hostname" for t in terms)
    for t in terms:
        assert matches(t["labelSelector"]["matchLabels"], labels)
    for t in pod.get("topologySpreadConstraints", []):
        assert t["matchLabelKeys"] == ["pod-template-hash"]


def test_pdb_covers_the_gateways(manifests):
    pdb = manifests.one("PodDisruptionBudget")
    labels = gateway(manifests)["spec"]["template"]["metadata"]["labels"]
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable")


def test_services_select_gateways_and_keep_admin_private(manifests):
    labels = gateway(manifests)["spec"]["template"]["metadata"]["labels"]
    client = manifests.one("Service", "t-wsgate")
    assert matches(client["spec"]["selector"], labels)
    assert [p["targetPort"] for p in client["spec"]["ports"]] == ["ws"]
    assert client["spec"]["sessionAffinity"] == "None"
    metrics = manifests.one("Service", "-metrics")
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == ["admin"]
    # Each Service selects the pods of exactly one workload (never the gateways and the
    # bundled Redis together).
    for svc in manifests.of_kind("Service"):
        selected = [d["metadata"]["name"] for d in manifests.of_kind("Deployment")
                    if matches(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert len(selected) == 1, (svc["metadata"]["name"], selected)


def test_secrets_are_referenced_never_inlined(manifests):
    c = container(gateway(manifests))
    for name, e in env(c).items():
        if name in ("WSGATE_API_KEY", "WSGATE_JWT_SECRET", "WSGATE_REDIS_PASSWORD",
                    "WSGATE_REDIS_SENTINEL_PASSWORD"):
            ref = e["valueFrom"]["secretKeyRef"]
            secret_names = {s["metadata"]["name"] for s in manifests.of_kind("Secret")}
            assert ref["name"] in secret_names or ref["name"] == "wsgate-secrets"
    # The Redis password reaches the gateway as its own variable, never inside the URL.
    url = env(c).get("WSGATE_REDIS_URL", {}).get("value", "")
    userinfo = url.split("://", 1)[-1].split("@")[0] if "@" in url else ""
    assert ":" not in userinfo and "$(" not in url, url


def test_dashboard_configmap_for_grafana_sidecar(manifests):
    cm = manifests.one("ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((REPO / "deploy/grafana/wsgate.json").read_text())
    assert json.loads(cm["data"]["wsgate.json"]) == shipped


# --- specific values sets ------------------------------------------------------------------

def test_default_is_one_pod_without_redis(render):
    m = render()
    assert gateway(m)["spec"]["replicas"] == 1
    assert "WSGATE_REDIS_URL" not in env(container(gateway(m)))
    assert not m.of_kind("HorizontalPodAutoscaler")
    assert not m.of_kind("Secret"), "no secret values given, so no Secret"


def test_production_autoscales_on_cpu(render):
    m = render(*VALUE_SETS["production"])
    assert "replicas" not in gateway(m)["spec"], "the HPA owns the replica count"
    hpa = m.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == gateway(m)["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    kinds = [(x["type"], x.get("resource", {}).get("name")) for x in hpa["spec"]["metrics"]]
    assert kinds == [("Resource", "cpu")], "no custom metrics API in a plain helm template"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_hpa_scales_on_connections_when_custom_metrics_exist(render):
    m = render(*VALUE_SETS["production"], "--api-versions", "custom.metrics.k8s.io/v1beta1")
    pods = [x for x in m.one("HorizontalPodAutoscaler")["spec"]["metrics"] if x["type"] == "Pods"]
    assert pods and pods[0]["pods"]["metric"]["name"] == "wsgate_connections"


def test_production_ingress_keeps_websockets_open(render):
    m = render(*VALUE_SETS["production"])
    ing = m.one("Ingress")
    heartbeat = seconds(env(container(gateway(m)))["WSGATE_HEARTBEAT_INTERVAL"]["value"])
    ann = ing["metadata"]["annotations"]
    for key in ("nginx.ingress.kubernetes.io/proxy-read-timeout",
                "nginx.ingress.kubernetes.io/proxy-send-timeout"):
        assert int(ann[key]) >= 3 * heartbeat
    assert seconds(ann["haproxy.org/timeout-tunnel"]) >= 3 * heartbeat
    paths = {p["path"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]}
    assert paths == {"/ws", "/sse", "/api/publish"}, "the admin API never goes through the Ingress"
    for r in ing["spec"]["rules"]:
        for p in r["http"]["paths"]:
            assert p["backend"]["service"]["port"]["name"] == "ws"


def test_production_prometheus_operator_resources(render):
    m = render(*VALUE_SETS["production"])
    sm = m.one("ServiceMonitor")
    metrics_svc = m.one("Service", "-metrics")
    assert matches(sm["spec"]["selector"]["matchLabels"], metrics_svc["metadata"]["labels"])
    assert not matches(sm["spec"]["selector"]["matchLabels"], m.one("Service", "t-wsgate")["metadata"]["labels"])
    (ep,) = sm["spec"]["endpoints"]
    assert (ep["port"], ep["path"]) == ("admin", "/metrics")
    # job="wsgate", as the alert rules and the dashboard expect.
    assert metrics_svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "wsgate"
    rule = m.one("PrometheusRule")
    shipped = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"]


def test_production_uses_existing_secret_and_network_policy(render):
    m = render(*VALUE_SETS["production"])
    assert not m.of_kind("Secret")
    e = env(container(gateway(m)))
    assert e["WSGATE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wsgate-secrets", "key": "api-key"}
    np = m.one("NetworkPolicy")
    admin_rules = [r for r in np["spec"]["ingress"] if r["ports"][0]["port"] == "admin"]
    assert admin_rules and admin_rules[0]["from"], "the admin port is open to listed peers only"


def test_bundled_redis(render):
    m = render(*VALUE_SETS["bundled-redis"])
    redis = m.one("Deployment", "-redis")
    svc = m.one("Service", "-redis")
    assert matches(svc["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    (secret,) = m.of_kind("Secret")
    assert secret["data"]["redis-password"]
    url = env(container(gateway(m)))["WSGATE_REDIS_URL"]["value"]
    assert url == "redis://t-wsgate-redis:6379/0"
    pw = env(container(gateway(m)))["WSGATE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert pw["key"] == "redis-password"
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"


def test_redis_acl_user_and_password(render):
    m = render(*VALUE_SETS["production"])
    e = env(container(gateway(m)))
    assert e["WSGATE_REDIS_URL"]["value"] == \
        "redis://wsgate@redis-master.redis.svc.cluster.local:6379/0"
    assert e["WSGATE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"


def test_redis_tls_files_are_mounted(render):
    m = render("--set", "redis.url=rediss://r:6380/0", "--set", "replicaCount=3",
               "--set", "redis.tls.secretName=redis-client-tls",
               "--set", "redis.tls.clientCertKey=tls.crt", "--set", "redis.tls.clientKeyKey=tls.key")
    d = gateway(m)
    c = container(d)
    e = env(c)
    assert e["WSGATE_REDIS_URL"]["value"] == "rediss://r:6380/0"
    assert e["WSGATE_REDIS_CA_FILE"]["value"] == "/etc/wsgate/redis-tls/ca.crt"
    assert e["WSGATE_REDIS_CLIENT_CERT"]["value"] == "/etc/wsgate/redis-tls/tls.crt"
    assert e["WSGATE_REDIS_CLIENT_KEY"]["value"] == "/etc/wsgate/redis-tls/tls.key"
    mounts = {v["name"]: v for v in c["volumeMounts"]}
    assert mounts["redis-tls"]["mountPath"] == "/etc/wsgate/redis-tls"
    volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
    assert volumes["redis-tls"]["secret"]["secretName"] == "redis-client-tls"


def test_redis_sentinel(render):
    m = render("--set", "replicaCount=3", "--set", "redis.sentinel.addresses={s1:26379,s2:26379}",
               "--set", "redis.sentinel.masterName=mymaster",
               "--set", "secrets.redisPassword=p", "--set", "secrets.redisSentinelPassword=sp")
    e = env(container(gateway(m)))
    assert "WSGATE_REDIS_URL" not in e
    assert e["WSGATE_REDIS_SENTINEL"]["value"] == "s1:26379,s2:26379"
    assert e["WSGATE_REDIS_SENTINEL_MASTER"]["value"] == "mymaster"
    assert e["WSGATE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    ref = e["WSGATE_REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] == "redis-sentinel-password"
    (secret,) = m.of_kind("Secret")
    assert secret["data"]["redis-sentinel-password"]


def test_redis_cluster_mode_with_seeds(render):
    m = render("--set", "redis.url=redis://rc-0.redis:6379", "--set", "redis.mode=cluster",
               "--set", "redis.clusterSeeds={redis://rc-1.redis:6379,redis://rc-2.redis:6379}",
               "--set", "secrets.redisPassword=pw", "--set", "replicaCount=3")
    e = env(container(gateway(m)))
    assert e["WSGATE_REDIS_MODE"]["value"] == "cluster"
    # The gateway splits the seed list on commas; the password comes from the Secret
    # (it wins over the URLs' in cluster mode too), never inside the URLs.
    assert e["WSGATE_REDIS_URL"]["value"] == ",".join(
        f"redis://rc-{i}.redis:6379" for i in range(3))
    assert e["WSGATE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    m = render("--set", "redis.url=redis://rc-0.redis:6379", "--set", "redis.mode=cluster",
               "--set", "redis.clusterSeeds={redis://rc-1.redis:6379}",
               "--set", "redis.username=app")
    e = env(container(gateway(m)))
    assert e["WSGATE_REDIS_URL"]["value"] == "redis://app@rc-0.redis:6379,redis://app@rc-1.redis:6379"


def test_redis_cluster_mode_with_tls(render):
    m = render("--set", "redis.url=rediss://rc-0.redis:6380", "--set", "redis.mode=cluster",
               "--set", "redis.clusterSeeds={rediss://rc-1.redis:6380}",
               "--set", "redis.tls.secretName=redis-tls", "--set", "redis.tls.caKey=ca.crt",
               "--set", "redis.tls.clientCertKey=tls.crt", "--set", "redis.tls.clientKeyKey=tls.key")
    d = gateway(m)
    c = container(d)
    e = env(c)
    assert e["WSGATE_REDIS_MODE"]["value"] == "cluster"
    assert e["WSGATE_REDIS_URL"]["value"] == "rediss://rc-0.redis:6380,rediss://rc-1.redis:6380"
    assert e["WSGATE_REDIS_CA_FILE"]["value"] == "/etc/wsgate/redis-tls/ca.crt"
    assert (e["WSGATE_REDIS_CLIENT_CERT"]["value"], e["WSGATE_REDIS_CLIENT_KEY"]["value"]) == \
        ("/etc/wsgate/redis-tls/tls.crt", "/etc/wsgate/redis-tls/tls.key")
    mounts = {v["name"]: v for v in c["volumeMounts"]}
    assert mounts["redis-tls"]["mountPath"] == "/etc/wsgate/redis-tls"
    volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
    assert volumes["redis-tls"]["secret"]["secretName"] == "redis-tls"


def test_jwt_public_key_and_tls_are_mounted_as_files(render):
    m = render(*VALUE_SETS["hard-anti-affinity"])
    d = gateway(m)
    c = container(d)
    e = env(c)
    assert e["WSGATE_JWT_PUBLIC_KEY"]["value"] == "/etc/wsgate/jwt/jwks.json"
    assert (e["WSGATE_TLS_CERT"]["value"], e["WSGATE_TLS_KEY"]["value"]) == \
        ("/etc/wsgate/tls/tls.crt", "/etc/wsgate/tls/tls.key")
    mounts = {v["name"]: v for v in c["volumeMounts"]}
    assert mounts["jwt"]["mountPath"] == "/etc/wsgate/jwt" and "subPath" not in mounts["tls"]
    volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
    assert volumes["jwt"]["secret"]["items"] == [{"key": "jwt-public-key", "path": "jwks.json"}]
    assert volumes["tls"]["secret"]["secretName"] == "wsgate-tls"
    assert m.one("Service", "t-wsgate")["spec"]["ports"][0]["appProtocol"] == "kubernetes.io/wss"
    assert m.one("Ingress")["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"


def test_config_values_become_env_vars(render):
    m = render("--set", "config.maxConnections=1048576", "--set", "config.someFutureFlag=x",
               "--set", "config.rateLimit=null")
    e = env(container(gateway(m)))
    assert e["WSGATE_MAX_CONNECTIONS"]["value"] == "1048576"  # not 1.048576e+06
    assert e["WSGATE_SOME_FUTURE_FLAG"]["value"] == "x"
    assert "WSGATE_RATE_LIMIT" not in e


def config_file(m) -> str:
    return m.one("ConfigMap", "-config")["data"]["wsgate.toml"]


def test_namespaces_render_a_config_file_read_with_config(render):
    m = render(*VALUE_SETS["namespaces"])
    toml = tomllib.loads(config_file(m))
    assert toml == {"namespaces": [
        {"name": "chat", "topics": ["chat:*", "dm:*"], "history_size": 1000000, "history_ttl": "10m"},
        {"name": "lobby", "topics": ["chat:lobby"]},
        {"name": "rooms", "topics": ["room.*"], "presence": True, "join_leave": True,
         "join_leave_rate": 5, "client_publish": False},
    ]}
    d = gateway(m)
    c = container(d)
    assert c["args"][:2] == ["--config", CONFIG_PATH]
    mounts = {v["name"]: v for v in c["volumeMounts"]}
    assert mounts["config"] == {"name": "config", "mountPath": "/etc/wsgate/config", "readOnly": True}
    volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == m.one("ConfigMap", "-config")["metadata"]["name"]
    # A change of the file rolls the pods (the file is read at start).
    other = render("--set-json", 'namespaces=[{"name": "chat", "topics": ["chat:*"]}]')
    checksum = lambda r: gateway(r)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert checksum(m) != checksum(other)


def test_config_file_keeps_extra_args(render):
    m = render(*VALUE_SETS["namespaces"], "--set", "extraArgs={--log-level,debug}")
    assert container(gateway(m))["args"] == ["--config", CONFIG_PATH, "--log-level", "debug"]


def test_no_namespaces_no_config_file(render):
    m = render()
    assert not [c for c in m.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-config")]
    c = container(gateway(m))
    assert "--config" not in c.get("args", [])
    assert "config" not in {v["name"] for v in c.get("volumeMounts", [])}


# --- refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (("--set", "image.tag=latest"), "image.tag"),
    (("--set-string", "redis.bundled.image.tag=latest"), "redis.bundled.image.tag"),
    (("--set", "terminationGracePeriodSeconds=10"), "must be longer than config.drainTimeout"),
    (("--set", "config.drainTimeout=60s", "--set", "drain.graceMarginSeconds=0"), "must be longer"),
    (("--set", "replicaCount=3"), "needs Redis"),
    (("--set", "autoscaling.enabled=true"), "needs Redis"),
    (("--set", "ingress.enabled=true", "--set", "ingress.websocketTimeoutSeconds=20"), "heartbeatInterval"),
    (("--set", "config.drainTimeout=10"), "config.drainTimeout"),
    (("--set", "config.listen=0.0.0.0:1"), "listen"),
    (("--set", "redis.url=redis://:secret@r:6379"), "redis.url"),
    (("--set", "redis.url=r:6379", "--set", "secrets.redisPassword=p"), "redis.url"),
    (("--set", "nosuchvalue=1"), "nosuchvalue"),
    (("--set", "redis.bundled.enabled=true", "--set", "redis.mode=cluster"), "redis.mode=cluster"),
    (("--set", "redis.url=redis://r:6379", "--set", "redis.clusterSeeds={redis://s:1}"), "redis.clusterSeeds"),
    (("--set", "redis.url=redis://r:6379", "--set", "redis.mode=cluster",
      "--set", "redis.tls.secretName=t"), "rediss://"),
    (("--set", "redis.url=rediss://r:6379", "--set", "redis.mode=cluster",
      "--set", "redis.clusterSeeds={redis://s:1}"), "scheme of redis.url"),
    (("--set", "redis.mode=cluster", "--set", "redis.sentinel.addresses={s:1}",
      "--set", "redis.sentinel.masterName=m"), "fails over by itself"),
    (("--set", "redis.url=redis://r:6379", "--set", "redis.mode=cluster",
      "--set", "redis.clusterSeeds={s:1}"), "clusterSeeds"),
    (("--set", "tls.enabled=true"), "tls.secretName"),
    (("--set", "redis.sentinel.addresses={s:26379}"), "masterName"),
    (("--set", "redis.url=redis://r:6379", "--set", "redis.tls.secretName=x"), "rediss://"),
    (("--set", "redis.sentinel.addresses={nocolon}", "--set", "redis.sentinel.masterName=m"), "addresses"),
    (("--set", "secrets.jwtPublicKeyFile=key.txt"), "jwtPublicKeyFile"),
    (("--set-json", 'namespaces=[{"name": "c", "topics": ["c:*"], "historySize": 0, "historyTtl": "1m"}]'),
     "historySize"),
    (("--set-json", 'namespaces=[{"name": "c", "topics": ["c:*"], "historySize": 5}]'), "historyTtl"),
    (("--set-json", 'namespaces=[{"name": "c", "topics": ["c:*"], "histSize": 5}]'), "histSize"),
    (("--set-json", 'namespaces=[{"name": "c", "topics": []}]'), "topics"),
])
def test_refused(helm, args, message):
    res = helm_template(helm, *args)
    assert res.returncode != 0, f"{args} was accepted"
    assert message in res.stderr, res.stderr


# --- NOTES.txt -----------------------------------------------------------------------------

def render_notes(helm: str, tmp_path: Path, *args: str) -> str:
    """NOTES.txt rendered offline (`helm install --dry-run` wants a cluster): a copy of the
    chart gets a template that runs NOTES.txt through `tpl`."""
    chart = tmp_path / "wsgate"
    shutil.copytree(CHART, chart, symlinks=False)
    (chart / "files" / "NOTES.txt").write_text((chart / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ tpl (.Files.Get "files/NOTES.txt") . | quote }}\n')
    res = helm_template(helm, "--show-only", "templates/zz-notes.yaml", *args, chart=chart)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)["data"]["notes"]


def test_notes(helm, tmp_path):
    notes = render_notes(helm, tmp_path)
    assert "port-forward svc/t-wsgate" in notes
    assert "killed after 25s" in notes
    assert "no API key" in notes
    notes = render_notes(helm, tmp_path / "p", "-f", str(PRODUCTION_VALUES))
    assert "wss://ws.example.com/ws" in notes
    assert "killed after 45s" in notes
    assert "no API key" not in notes
    notes = render_notes(helm, tmp_path / "b", *VALUE_SETS["bundled-redis"])
    assert "FOR TRYING" in notes.upper()


# --- packaging -----------------------------------------------------------------------------

def test_packaged_chart_carries_the_linked_files(helm, tmp_path):
    """files/alerts.yml and files/wsgate.json are links out of the chart; a packaged chart
    must hold their contents."""
    import tarfile
    res = subprocess.run([helm, "package", str(CHART), "-d", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    (tgz,) = tmp_path.glob("wsgate-*.tgz")
    with tarfile.open(tgz) as tar:
        for inside, source in (("wsgate/files/alerts.yml", "deploy/prometheus/alerts.yml"),
                               ("wsgate/files/wsgate.json", "deploy/grafana/wsgate.json")):
            member = tar.getmember(inside)
            assert member.isfile(), f"{inside} is packaged as a link"
            assert tar.extractfile(member).read() == (REPO / source).read_bytes()
    # The packaged chart renders like the directory.
    res = helm_template(helm, chart=tgz)
    assert res.returncode == 0, res.stderr


def test_fractional_settings_reach_the_binary_as_written(render):
    # Whole numbers print as integers (not 1.048576e+06); fractions keep their digits.
    m = render("--set-json", "config.rebalanceMargin=0.25", "--set-json", "config.rebalanceRate=0.05",
               "--set", "config.upgradeRate=500", "--set", "config.rebalanceAuto=false")
    env = {e["name"]: e.get("value") for e in container(gateway(m))["env"]}
    assert env["WSGATE_REBALANCE_MARGIN"] == "0.25"
    assert env["WSGATE_REBALANCE_RATE"] == "0.05"
    assert env["WSGATE_UPGRADE_RATE"] == "500"
    assert env["WSGATE_REBALANCE_AUTO"] == "false"
    assert env["WSGATE_OUTBOUND_QUEUE_BYTES"] == "1048576"
