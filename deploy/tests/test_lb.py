"""The shipped load balancer for real: deploy/haproxy/haproxy.cfg, unchanged, in front of
three gateway processes and one Redis, everything on 127.0.0.1 free ports.

The config's environment variables point it at the loopback gateways and shorten its
timeouts (client/server 2s, tunnel 3s) against a 1s gateway heartbeat, so that "idle
but heartbeating connections survive" is tested in seconds. Clients are the `websockets`
library, nobody's code from this project.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websockets

from conftest import REPO
from helpers import free_port, http_status, wait_until

CFG = REPO / "deploy/haproxy/haproxy.cfg"
API_KEY = "lb-test-key"
HEARTBEAT = "1s"
TUNNEL_TIMEOUT_S = 3
DRAIN_TIMEOUT_S = 2


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    lb_port: int
    stats_port: int
    gateways: dict[str, Proc] = field(default_factory=dict)
    admin_ports: dict[str, int] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    lb: Proc | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.lb_port}/ws"

    def server_status(self) -> dict[str, str]:
        """HAProxy's view of its gateways: {gw1: UP, ...}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2) as r:
            rows = csv.DictReader(io.StringIO(r.read().decode().lstrip("# ")))
            return {row["svname"]: row["status"] for row in rows if row["pxname"] == "gateways"
                    and row["svname"] not in ("FRONTEND", "BACKEND")}


def spawn(name: str, argv: list[str], env: dict[str, str], logdir: Path) -> Proc:
    log = logdir / f"{name}.log"
    popen = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log.open("w"),
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Proc(name, popen, log)


def start_redis(logdir: Path) -> tuple[Proc, int]:
    port = free_port()
    proc = spawn("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                           "--save", "", "--appendonly", "no", "--daemonize", "no"], {}, logdir)
    wait_until(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                                      text=True).stdout.strip() == "PONG", timeout=10, what="redis")
    return proc, port


def start_gateway(binary: Path, name: str, redis_port: int | None, logdir: Path,
                  heartbeat: str = HEARTBEAT) -> tuple[Proc, int, int]:
    ws, admin = free_port(), free_port()
    env = {
        "WSGATE_LISTEN": f"127.0.0.1:{ws}",
        "WSGATE_ADMIN_LISTEN": f"127.0.0.1:{admin}",
        "WSGATE_NODE_ID": name,
        "WSGATE_HEARTBEAT_INTERVAL": heartbeat,
        "WSGATE_HEARTBEAT_TIMEOUT": "60s",
        "WSGATE_DRAIN_TIMEOUT": f"{DRAIN_TIMEOUT_S}s",
        "WSGATE_API_KEY": API_KEY,
        "WSGATE_LOG_FORMAT": "json",
    }
    if redis_port is not None:
        env["WSGATE_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    proc = spawn(name, [str(binary)], env, logdir)
    wait_until(lambda: proc.popen.poll() is not None or http_status(f"http://127.0.0.1:{admin}/readyz") == 200,
               timeout=20, what=f"{name} ready")
    assert proc.popen.poll() is None, proc.output()
    return proc, ws, admin


def start_haproxy(backends: list[tuple[int, int]], logdir: Path, name: str = "haproxy",
                  check_interval: str = "300ms") -> tuple[Proc, int, int]:
    lb, stats = free_port(), free_port()
    env = {
        "LB_BIND": f"127.0.0.1:{lb}",
        "LB_STATS_BIND": f"127.0.0.1:{stats}",
        "LB_DNS": f"127.0.0.1:{free_port()}",
        "LB_CHECK_INTERVAL": check_interval,
        "LB_CLIENT_TIMEOUT": "2s",
        "LB_SERVER_TIMEOUT": "2s",
        "LB_TUNNEL_TIMEOUT": f"{TUNNEL_TIMEOUT_S}s",
    }
    for i, (ws, admin) in enumerate(backends, 1):
        env[f"LB_GW{i}"] = f"127.0.0.1:{ws}"
        env[f"LB_GW{i}_ADMIN_PORT"] = str(admin)
    proc = spawn(name, ["haproxy", "-db", "-f", str(CFG)], env, logdir)
    return proc, lb, stats


@pytest.fixture
def cluster(request, wsgate_binary, tmp_path):
    """Redis, gateways gw1..gw3 and HAProxy; everything is killed afterwards. A test can
    set HAProxy's health-check interval with @pytest.mark.check_interval("10s")."""
    marker = request.node.get_closest_marker("check_interval")
    check_interval = marker.args[0] if marker else "300ms"
    procs: list[Proc] = []
    try:
        redis, redis_port = start_redis(tmp_path)
        procs.append(redis)
        c = Cluster(0, 0)
        backends = []
        for i in (1, 2, 3):
            proc, ws, admin = start_gateway(wsgate_binary, f"gw{i}", redis_port, tmp_path)
            procs.append(proc)
            c.gateways[f"gw{i}"] = proc
            c.admin_ports[f"gw{i}"] = admin
            backends.append((ws, admin))
        lb, c.lb_port, c.stats_port = start_haproxy(backends, tmp_path, check_interval=check_interval)
        procs.append(lb)
        c.lb = lb

        def all_up():
            if lb.popen.poll() is not None:
                raise AssertionError(lb.output())
            try:
                return set(c.server_status().values()) == {"UP"}
            except OSError:
                return False

        wait_until(all_up, timeout=20, what="HAProxy to see three gateways UP")
        c.procs = procs
        yield c
    finally:
        for p in reversed(procs):
            p.stop()


# --- a client ------------------------------------------------------------------------------

class Client:
    """One WebSocket client: connect, subscribe, publish, receive messages by topic."""

    def __init__(self, ws, welcome: dict):
        self.ws = ws
        self.node = welcome["node"]
        self.next_id = 1
        # Frames that arrived while waiting for a reply (a publisher subscribed to its own
        # topic may get the message before the `published` reply).
        self.pending: list[dict] = []

    @classmethod
    async def connect(cls, url: str) -> "Client":
        # No client-side pings: only the server's heartbeat keeps the connection busy.
        ws = await websockets.connect(url, ping_interval=None, open_timeout=10, close_timeout=2)
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert welcome["op"] == "welcome", welcome
        return cls(ws, welcome)

    async def command(self, cmd: dict, reply_op: str) -> dict:
        cmd = {**cmd, "id": self.next_id}
        self.next_id += 1
        await self.ws.send(json.dumps(cmd))
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
            if frame.get("id") == cmd["id"]:
                assert frame["op"] == reply_op, frame
                return frame
            self.pending.append(frame)

    async def subscribe(self, *topics: str) -> None:
        await self.command({"op": "subscribe", "topics": list(topics)}, "subscribed")

    async def publish(self, topic: str, data) -> None:
        await self.command({"op": "publish", "topic": topic, "data": data}, "published")

    async def message(self, topic: str, timeout: float = 5) -> object:
        for frame in self.pending:
            if frame.get("op") == "message" and frame["topic"] == topic:
                self.pending.remove(frame)
                return frame["data"]
        deadline = time.monotonic() + timeout
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), max(0.01, deadline - time.monotonic())))
            if frame.get("op") == "message" and frame["topic"] == topic:
                return frame["data"]

    async def close_code(self, timeout: float) -> int | None:
        """Waits for the server to close; the close code it sent (None: no close frame)."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), timeout)
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None


async def connect_spread(url: str, n: int) -> list[Client]:
    clients = []
    for _ in range(n):
        clients.append(await Client.connect(url))
    return clients


def by_node(clients: list[Client]) -> dict[str, list[Client]]:
    out: dict[str, list[Client]] = {}
    for c in clients:
        out.setdefault(c.node, []).append(c)
    return out


def http_publish(lb_port: int, topic: str, data) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{lb_port}/api/publish", method="POST",
        data=json.dumps({"topic": topic, "data": data}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


# --- tests ---------------------------------------------------------------------------------

def test_clients_spread_over_nodes_and_exchange_messages(cluster):
    async def scenario():
        clients = await connect_spread(cluster.ws_url, 6)
        nodes = by_node(clients)
        # leastconn: six connections in a row land two on each gateway.
        assert {n: len(cs) for n, cs in nodes.items()} == {"gw1": 2, "gw2": 2, "gw3": 2}
        for c in clients:
            await c.subscribe("room.1")
        # A client on gw1 publishes; every client on every node receives it (Redis).
        await nodes["gw1"][0].publish("room.1", {"from": "gw1"})
        for c in clients:
            assert await c.message("room.1") == {"from": "gw1"}
        # The HTTP publish API through the load balancer, to whichever node it lands on.
        assert await asyncio.to_thread(http_publish, cluster.lb_port, "room.1", [1, 2]) == 200
        for c in clients:
            assert await c.message("room.1") == [1, 2]
        for c in clients:
            await c.ws.close()

    asyncio.run(scenario())


def test_admin_endpoints_are_not_reachable_through_the_lb(cluster):
    base = f"http://127.0.0.1:{cluster.lb_port}"
    assert http_status(f"{base}/metrics") == 404
    assert http_status(f"{base}/readyz") == 404
    assert http_status(f"{base}/drain", method="POST") == 404
    assert all(http_status(f"http://127.0.0.1:{p}/readyz") == 200 for p in cluster.admin_ports.values())


# HAProxy's health checks are made too slow to notice the drain within the test: every
# upgrade that still goes to the draining (503) or stopped (refused) node must be retried
# on another one by the config's `retry-on` + `option redispatch`.
@pytest.mark.check_interval("10s")
def test_sigterm_drains_a_node_and_its_clients_move_to_the_others(cluster):
    async def scenario():
        clients = await connect_spread(cluster.ws_url, 6)
        nodes = by_node(clients)
        assert set(nodes) == {"gw1", "gw2", "gw3"}
        for c in clients:
            await c.subscribe("room.2")
        leaving, staying = nodes["gw2"], nodes["gw1"] + nodes["gw3"]

        cluster.gateways["gw2"].popen.send_signal(signal.SIGTERM)

        async def reconnect(c: Client) -> tuple[int | None, Client]:
            # Closed with 1001 at some point of the drain window, then back through the
            # LB at once, as a client library does.
            code = await c.close_code(DRAIN_TIMEOUT_S + 5)
            return code, await Client.connect(cluster.ws_url)

        results = await asyncio.gather(*(reconnect(c) for c in leaving))
        assert [code for code, _ in results] == [1001] * len(leaving)
        moved = [c for _, c in results]
        assert all(c.node in ("gw1", "gw3") for c in moved), [c.node for c in moved]
        for c in moved:
            await c.subscribe("room.2")
        # The others were never disconnected, and everyone receives again, across nodes.
        await staying[0].publish("room.2", "after-drain")
        for c in staying + moved:
            assert await c.message("room.2") == "after-drain"
        for c in staying + moved:
            await c.ws.close()
        return len(moved)

    n_moved = asyncio.run(scenario())
    gw2 = cluster.gateways["gw2"].popen
    assert gw2.wait(timeout=DRAIN_TIMEOUT_S + 10) == 0, cluster.gateways["gw2"].output()
    # HAProxy still counts gw2 UP (no check noticed), yet every reconnect was served: the
    # log shows each was first sent to gw2 and retried elsewhere ("+N" retries: redispatched).
    def retried_upgrades():
        lines = re.findall(r"gateways/(gw\d) \S+ 101 .* \d+/\d+/\d+/\d+/\+(\d+) ", cluster.lb.output())
        return [l for l in lines if l[0] != "gw2" and int(l[1]) >= 1]
    found = wait_until(lambda: len(retried_upgrades()) >= n_moved and retried_upgrades(),
                       timeout=10, what="HAProxy's log of the retried upgrades")
    assert len(found) == n_moved, cluster.lb.output()


def test_idle_heartbeating_connections_outlive_the_lb_timeouts(cluster, wsgate_binary, tmp_path):
    """Idle for 3x the tunnel timeout: the gateways' 1s pings keep the tunnels open.
    The control, a gateway with a 50s heartbeat behind a second HAProxy with the same
    config, shows the timeout is real: its idle client is cut."""
    control_procs = []
    try:
        slow, ws, admin = start_gateway(wsgate_binary, "slow", None, tmp_path, heartbeat="50s")
        control_procs.append(slow)
        lb, lb_port, stats_port = start_haproxy([(ws, admin)] * 3, tmp_path, name="haproxy-control")
        control_procs.append(lb)
        control = Cluster(lb_port, stats_port)
        wait_until(lambda: _up(control), timeout=20, what="control HAProxy UP")

        async def scenario():
            clients = await connect_spread(cluster.ws_url, 3)
            assert {c.node for c in clients} == {"gw1", "gw2", "gw3"}
            for c in clients:
                await c.subscribe("idle")
            quiet = await Client.connect(control.ws_url)
            # From here nobody sends anything (the client library answers the server's
            # pings with pongs, as browsers do).
            t0 = time.monotonic()
            idle = 3 * TUNNEL_TIMEOUT_S + 1
            control_code = await quiet.close_code(idle)
            control_cut_after = time.monotonic() - t0
            await asyncio.sleep(max(0.0, t0 + idle - time.monotonic()))
            for c in clients:
                assert c.ws.close_code is None, f"{c.node} connection was cut while idle"
            await clients[0].publish("idle", "still here")
            for c in clients:
                assert await c.message("idle") == "still here"
            for c in clients:
                await c.ws.close()
            return control_code, control_cut_after

        control_code, cut_after = asyncio.run(scenario())
        # HAProxy cut the unpinged tunnel after its timeout, without a WebSocket close frame.
        assert control_code is None
        assert TUNNEL_TIMEOUT_S - 0.5 <= cut_after < 3 * TUNNEL_TIMEOUT_S
    finally:
        for p in control_procs:
            p.stop()


def test_server_sent_events_stream_through_the_lb_with_heartbeats(cluster):
    """GET /sse through HAProxy: a chunked text/event-stream that stays open while idle
    for longer than every HAProxy timeout (the gateway's 1s `: ping` comments are its
    traffic), then delivers a publication made through the load balancer."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", cluster.lb_port, timeout=5)
    conn.request("GET", "/sse?topics=sse.lb", headers={"Accept": "text/event-stream"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Type").startswith("text/event-stream")
    assert resp.getheader("Cache-Control") == "no-cache"
    assert resp.getheader("Transfer-Encoding") == "chunked"

    def next_item() -> tuple[str, str]:
        """("comment", text) or ("event", data) of the next block."""
        data, comment = [], None
        while True:
            line = resp.readline().decode()
            assert line, "the stream ended"
            line = line.rstrip("\n")
            if line == "":
                if data:
                    return "event", "\n".join(data)
                if comment is not None:
                    return "comment", comment
                continue
            if line.startswith(":"):
                comment = line[1:].strip()
            elif line.startswith("data: "):
                data.append(line[6:])

    kind, welcome = next_item()
    assert kind == "event" and json.loads(welcome)["op"] == "welcome", welcome
    node = json.loads(welcome)["node"]
    assert node in {"gw1", "gw2", "gw3"}
    kind, sub = next_item()
    assert json.loads(sub) == {"op": "subscribed", "topics": ["sse.lb"]}, sub
    idle = 3 * TUNNEL_TIMEOUT_S + 1
    t0, pings = time.monotonic(), 0
    while time.monotonic() - t0 < idle:
        kind, text = next_item()
        assert (kind, text) == ("comment", "ping")
        pings += 1
    assert pings >= idle - 2, pings
    assert http_publish(cluster.lb_port, "sse.lb", {"through": "haproxy"}) == 200
    while True:
        kind, text = next_item()
        if kind == "event":
            break
    assert json.loads(text) == {"op": "message", "topic": "sse.lb", "data": {"through": "haproxy"}}
    conn.close()


def _up(c: Cluster) -> bool:
    try:
        return set(c.server_status().values()) == {"UP"}
    except OSError:
        return False
