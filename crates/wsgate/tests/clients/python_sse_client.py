"""Reads wsgate's Server-Sent Events with the Python `httpx` library (not ours).

Usage: python_sse_client.py http://127.0.0.1:PORT   (the gateway runs with
--heartbeat-interval 1s and a `chat:*` stream namespace; publications go through
POST /api/publish). Exits non-zero on the first failure; prints ALL OK.
"""
import json
import sys
import time

import httpx


def events(response):
    """Yields ("comment", text) and ("event", {"event","id","data"}) per the SSE spec."""
    fields = {"data": []}
    for line in response.iter_lines():
        if line == "":
            if fields["data"] or "event" in fields or "id" in fields:
                yield "event", {
                    "event": fields.get("event"),
                    "id": fields.get("id"),
                    "data": "\n".join(fields["data"]),
                }
            fields = {"data": []}
            continue
        if line.startswith(":"):
            yield "comment", line[1:].strip()
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            fields["data"].append(value)
        else:
            fields[name] = value


def next_event(it):
    for kind, value in it:
        if kind == "event":
            return value, json.loads(value["data"])
    raise AssertionError("stream ended")


def publish(client, base, topic, data):
    r = client.post(base + "/api/publish", json={"topic": topic, "data": data})
    assert r.status_code == 200, r.text


def main(base):
    timeout = httpx.Timeout(10.0)
    with httpx.Client(timeout=timeout) as client:
        r = client.get(base + "/sse", params={"topics": "bad topic"})
        assert r.status_code == 400 and r.json()["error"] == "invalid_topic", r.text

        last_id = None
        with client.stream("GET", base + "/sse", params={"topics": "chat:py,py.news"}) as r:
            assert r.status_code == 200, r.status_code
            assert r.headers["content-type"].startswith("text/event-stream"), r.headers
            it = events(r)
            _, welcome = next_event(it)
            assert welcome["op"] == "welcome", welcome
            ev, sub = next_event(it)
            assert sub["op"] == "subscribed" and sub["streams"]["chat:py"]["seq"] == 0, sub
            for i in range(1, 6):
                publish(client, base, "chat:py", {"i": i, "s": "é✓"})
            publish(client, base, "py.news", "plain")
            for i in range(1, 6):
                ev, m = next_event(it)
                assert m == {"op": "message", "topic": "chat:py", "data": {"i": i, "s": "é✓"}, "seq": i}, m
                assert ev["id"] and ev["id"].startswith("v1."), ev
                if i == 3:
                    last_id = ev["id"]
            ev, m = next_event(it)
            assert m["topic"] == "py.news" and ev["id"] is None, (ev, m)
            # A heartbeat comment arrives within a few intervals.
            deadline = time.monotonic() + 5
            for kind, value in it:
                if kind == "comment":
                    assert value == "ping", value
                    break
                assert time.monotonic() < deadline, "no heartbeat comment"

        for i in range(6, 9):
            publish(client, base, "chat:py", {"i": i, "s": "é✓"})
        with client.stream(
            "GET",
            base + "/sse",
            params={"topics": "chat:py"},
            headers={"Last-Event-ID": last_id},
        ) as r:
            assert r.status_code == 200, r.status_code
            it = events(r)
            _, welcome = next_event(it)
            assert welcome["op"] == "welcome", welcome
            _, sub = next_event(it)
            assert sub["streams"]["chat:py"] == {"seq": 8, "epoch": sub["streams"]["chat:py"]["epoch"], "recovered": True}, sub
            for i in range(4, 9):
                _, m = next_event(it)
                assert m["seq"] == i and m["data"]["i"] == i, m
    print("ALL OK")


if __name__ == "__main__":
    main(sys.argv[1])
