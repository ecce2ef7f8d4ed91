#!/usr/bin/env python3
"""Driver of loadtest/bench-rebalance.sh (issue 18): WebSocket clients that follow a
rebalance, the publisher and fleet monitor, and the report.

  clients  N clients through the load balancer(s), each subscribed to one live topic;
           on close 1012 a client reconnects after 0-1 s of jitter (like the JS client)
           and subscribes again. Counts go to a status file every 0.5 s; on SIGTERM the
           delivery latencies (receive time - send time in the data) go to a binary file.
  monitor  publishes to the live topic at a fixed rate (`POST /api/publish`, the send
           time in `data`), polls `GET /api/info` every 0.5 s into a CSV of per-node
           counts, and once the new nodes are ready (a file the script writes) marks the
           moment every node holds its share within the margin and every client is
           connected.
  report   per-phase latency percentiles (before / during / after), counts, the summary
           row (JSON and Markdown) and, when matplotlib is there, a chart.

Everything talks to 127.0.0.1 only; timestamps are time.time() on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import glob
import json
import os
import random
import signal
import struct
import sys
import threading
import time
import urllib.request
from array import array
from pathlib import Path

# ---------------------------------------------------------------- clients


class Counts:
    def __init__(self) -> None:
        self.connected = 0  # open and subscribed now
        self.connects = 0  # successful connect + subscribe, first ones included
        self.shed = 0  # closes with 1012
        self.reconnected = 0  # successful connects after a 1012
        self.other_closes = 0  # closes with any other code, or resets
        self.connect_errors = 0  # failed connect attempts (retried)
        self.stop = False


async def one_client(i: int, urls: list[str], srcs: list[str], topic: str, c: Counts,
                     sent: array, lat: array) -> None:
    import websockets

    url = urls[i % len(urls)]
    after_shed = False
    while not c.stop:
        src = srcs[i % len(srcs)] if srcs else None
        try:
            ws = await websockets.connect(
                url, ping_interval=None, open_timeout=30, close_timeout=1,
                max_queue=64, compression=None,
                **({"local_addr": (src, 0)} if src else {}))
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if welcome.get("op") != "welcome":
                raise RuntimeError(f"no welcome: {welcome}")
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "topics": [topic]}))
            while True:  # a publication may come before the reply
                reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if reply.get("op") == "subscribed":
                    break
        except Exception:  # noqa: BLE001 - counted, retried
            c.connect_errors += 1
            await asyncio.sleep(0.5 + random.random())
            continue
        c.connects += 1
        c.connected += 1
        if after_shed:
            c.reconnected += 1
        after_shed = False
        code = None
        try:
            async for raw in ws:
                now = time.time()
                frame = json.loads(raw)
                if frame.get("op") == "message":
                    sent.append(frame["data"]["t"])
                    lat.append(now - frame["data"]["t"])
        except Exception as e:  # noqa: BLE001
            rcvd = getattr(e, "rcvd", None)
            code = rcvd.code if rcvd is not None else None
        else:
            rcvd = getattr(getattr(ws, "protocol", None), "close_rcvd", None)
            code = rcvd.code if rcvd is not None else None
        c.connected -= 1
        if c.stop:
            return
        if code == 1012:
            c.shed += 1
            after_shed = True
            await asyncio.sleep(random.random())  # 0-1 s, like the JS client
        else:
            c.other_closes += 1
            await asyncio.sleep(0.5 + random.random())


def cmd_clients(a: argparse.Namespace) -> None:
    c = Counts()
    sent, lat = array("d"), array("d")
    urls = a.url
    srcs = [s for s in a.src.split(",") if s] if a.src else []

    def write_status() -> None:
        tmp = a.status + ".tmp"
        with open(tmp, "w") as f:
            json.dump({k: getattr(c, k) for k in ("connected", "connects", "shed",
                                                   "reconnected", "other_closes",
                                                   "connect_errors")} | {"t": time.time()}, f)
        os.replace(tmp, a.status)

    def dump() -> None:
        with open(a.out, "wb") as f:
            f.write(struct.pack("<q", len(sent)))
            sent.tofile(f)
            lat.tofile(f)
        write_status()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, done.set)
        loop.add_signal_handler(signal.SIGINT, done.set)
        tasks = []
        pause = 1.0 / a.connect_rate
        for k in range(a.count):
            tasks.append(asyncio.create_task(
                one_client(a.first + k, urls, srcs, a.topic, c, sent, lat)))
            if k % 50 == 49:
                await asyncio.sleep(50 * pause)
            if done.is_set():
                break

        async def status_loop() -> None:
            while True:
                write_status()
                await asyncio.sleep(0.5)

        st = asyncio.create_task(status_loop())
        await done.wait()
        c.stop = True
        st.cancel()
        dump()
        os._exit(0)  # the sockets close with the process

    asyncio.run(main())


# ---------------------------------------------------------------- monitor


def http(method: str, url: str, key: str, body: object | None = None, timeout: float = 5):
    req = urllib.request.Request(
        url, method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def read_status(d: str) -> dict:
    tot: dict = {}
    for p in glob.glob(os.path.join(d, "status-*.json")):
        try:
            with open(p) as f:
                s = json.load(f)
        except (OSError, ValueError):
            continue
        for k, v in s.items():
            if k != "t":
                tot[k] = tot.get(k, 0) + v
    return tot


def cmd_monitor(a: argparse.Namespace) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pub_errors = [0]

    def publisher(topic: str, rate: float) -> None:
        seq, start = 0, time.monotonic()
        while not stop.is_set():
            seq += 1
            try:
                http("POST", a.api + "/publish", a.key,
                     {"topic": topic, "data": {"t": time.time(), "s": seq}})
            except Exception:  # noqa: BLE001
                pub_errors[0] += 1
            delay = start + seq / rate - time.monotonic()
            if delay > 0:
                stop.wait(delay)

    for spec in a.pub:
        topic, rate = spec.rsplit(":", 1)
        threading.Thread(target=publisher, args=(topic, float(rate)), daemon=True).start()
    ready_file = os.path.join(a.dir, "ready.t")
    conv_file = os.path.join(a.dir, "converged.t")
    nodes = [f"gw{i}" for i in range(1, a.nodes + 1)]
    with open(os.path.join(a.dir, "nodes.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", *nodes, "total", "clients_connected", "shed", "reconnected"])
        converged = False
        while not stop.is_set():
            now = time.time()
            try:
                info = http("GET", a.api + "/info", a.key)
                counts = {n["node"]: n["connections"] for n in info["nodes"]}
            except Exception:  # noqa: BLE001
                counts = {}
            st = read_status(a.dir)
            total = sum(counts.values())
            w.writerow([f"{now:.3f}", *[counts.get(n, "") for n in nodes], total,
                        st.get("connected", 0), st.get("shed", 0), st.get("reconnected", 0)])
            f.flush()
            if not converged and os.path.exists(ready_file) and len(counts) == a.nodes:
                share = total / len(counts)
                if (st.get("connected", 0) == a.clients and total == a.clients
                        and all(abs(c - share) <= a.margin * share for c in counts.values())):
                    converged = True
                    with open(conv_file, "w") as cf:
                        cf.write(f"{now:.3f}\n")
            stop.wait(0.5)
    with open(os.path.join(a.dir, "publisher.json"), "w") as f:
        json.dump({"errors": pub_errors[0]}, f)


# ---------------------------------------------------------------- report


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def fmt_ms(x: float) -> str:
    if x != x:
        return "–"
    return f"{x * 1000:.0f}" if x >= 0.0995 else f"{x * 1000:.1f}"


def cmd_report(a: argparse.Namespace) -> None:
    d = Path(a.dir)
    t = {k: float((d / f"{k}.t").read_text()) if (d / f"{k}.t").exists() else None
         for k in ("all_in", "start", "ready", "converged", "end")}
    sets = {"probe": {"before": [], "during": [], "after": []},
            "bulk": {"before": [], "during": [], "after": []}}
    samples = 0
    for p in sorted(d.glob("latency-*.bin")):
        phases = sets["probe" if p.name == "latency-probe.bin" else "bulk"]
        raw = p.read_bytes()
        (n,) = struct.unpack_from("<q", raw)
        sent, lat = array("d"), array("d")
        sent.frombytes(raw[8:8 + 8 * n])
        lat.frombytes(raw[8 + 8 * n:8 + 16 * n])
        samples += n
        end_during = t["converged"] or t["end"]
        for s, l in zip(sent, lat):
            if s < t["all_in"]:
                continue  # the ramp
            if s < t["start"]:
                phases["before"].append(l)
            elif s < end_during:
                phases["during"].append(l)
            else:
                phases["after"].append(l)
    for phases in sets.values():
        for v in phases.values():
            v.sort()
    phases = sets["probe"]
    st = read_status(str(d))
    rows = list(csv.DictReader(open(d / "nodes.csv")))
    last = [r for r in rows if not t["end"] or float(r["t"]) <= t["end"]][-1]
    # Counts at the scale-out's start (a ramp may already move a few clients), and the
    # last 1012: the time the status' shed count last grew.
    at_start = next((r for r in rows if float(r["t"]) >= t["start"]), rows[0])
    shed0, reconnected0 = int(at_start["shed"]), int(at_start["reconnected"])
    last_shed = None
    prev = None
    for r in rows:
        if prev is not None and int(r["shed"]) > prev:
            last_shed = float(r["t"]) if float(r["t"]) >= t["start"] else None
        prev = int(r["shed"])
    cfg = json.loads((d / "config.json").read_text())
    # The servers' side alone: the first poll after the new nodes' readiness where every
    # node of the five is within the margin of its share (clients not yet resubscribed
    # may still be on their way).
    counts_ok = None
    for r in rows:
        if t["ready"] is None or float(r["t"]) < t["ready"]:
            continue
        cs = [int(r[k]) for k in r if k.startswith("gw") and r[k] != ""]
        share = sum(cs) / max(1, len(cs))
        if (len(cs) == len([k for k in r if k.startswith("gw")]) and sum(cs) == cfg["clients"]
                and all(abs(c - share) <= cfg["margin"] * share for c in cs)):
            counts_ok = float(r["t"]) - t["ready"]
            break
    cpu = json.loads((d / "cpu.json").read_text()) if (d / "cpu.json").exists() else {}
    res = {
        **cfg,
        "clients_shed": st.get("shed", 0) - shed0,
        "reconnected": st.get("reconnected", 0) - reconnected0,
        "shed_before_scale_out": shed0,
        "connected_at_end": st.get("connected", 0),
        "other_closes": st.get("other_closes", 0),
        "connect_errors": st.get("connect_errors", 0),
        "ready_after_start_s": round(t["ready"] - t["start"], 2) if t["ready"] else None,
        "converge_s": round(t["converged"] - t["ready"], 1) if t["converged"] else None,
        "node_counts_within_margin_s": round(counts_ok, 1) if counts_ok is not None else None,
        "last_shed_after_ready_s": round(last_shed - t["ready"], 1) if last_shed and t["ready"] else None,
        "final_counts": {k: last[k] for k in last if k.startswith("gw")},
        "deliveries": samples,
        "latency_ms": {name: {k: {"n": len(v), "p50": round(pct(v, 50) * 1000, 1),
                                  "p99": round(pct(v, 99) * 1000, 1),
                                  "max": (round(v[-1] * 1000, 1) if v else None)}
                              for k, v in ph.items()} for name, ph in sets.items()},
        "node_cpu_s_during": cpu,
    }
    (d / "summary.json").write_text(json.dumps(res, indent=1) + "\n")
    lat3 = " / ".join(
        "{} / {} / {}".format(fmt_ms(pct(phases[k], 50)), fmt_ms(pct(phases[k], 99)),
                              fmt_ms(phases[k][-1] if phases[k] else float("nan")))
        for k in ("before", "during", "after"))
    ok = "yes" if res["connected_at_end"] == cfg["clients"] and res["reconnected"] == res["clients_shed"] else "NO"
    cpu_s = ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
    row = (f"| rate {cfg['rate']}, presence timeout {cfg['presence_timeout']} | {res['clients_shed']:,} | "
           f"{res['converge_s']} s (counts {res['node_counts_within_margin_s']} s, last 1012 {res['last_shed_after_ready_s']} s) | {lat3} | "
           f"{ok} ({res['reconnected']:,} of {res['clients_shed']:,}; {res['connected_at_end']:,} at end) | {cpu_s} |")
    (d / "row.md").write_text(row + "\n")
    print(row)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    t0 = t["ready"] or float(rows[0]["t"])
    fig, ax = plt.subplots(figsize=(8, 4))
    for k in [k for k in rows[0] if k.startswith("gw")]:
        xs = [float(r["t"]) - t0 for r in rows if r[k] != ""]
        ys = [int(r[k]) for r in rows if r[k] != ""]
        ax.plot(xs, ys, label=k)
    if t["converged"]:
        ax.axvline(t["converged"] - t0, color="grey", ls="--", lw=1, label="converged")
    ax.axvline(t["start"] - t0, color="grey", ls=":", lw=1, label="nodes 4-5 start")
    ax.set_xlabel("s from nodes 4-5 ready")
    ax.set_ylabel("connections (GET /api/info)")
    ax.set_title(f"{cfg['clients']:,} clients, rate {cfg['rate']}, presence timeout {cfg['presence_timeout']}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(d / "nodes.png", dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("clients")
    p.add_argument("--url", action="append", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--src", default="")
    p.add_argument("--topic", default="live")
    p.add_argument("--connect-rate", type=float, default=500)
    p.add_argument("--status", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("monitor")
    p.add_argument("--api", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--pub", action="append", required=True,
                   help="TOPIC:RATE, a publisher of RATE publications a second (repeatable)")
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--margin", type=float, default=0.1)
    p.add_argument("--dir", required=True)
    p = sub.add_parser("report")
    p.add_argument("--dir", required=True)
    a = ap.parse_args()
    {"clients": cmd_clients, "monitor": cmd_monitor, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
