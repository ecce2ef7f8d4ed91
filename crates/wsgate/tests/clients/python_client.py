"""Drives a running wsgate with the Python `websockets` library (not ours).

Usage: python_client.py ws://127.0.0.1:PORT/ws   (the gateway runs with
--max-message-size 4096 --node-id py-node). Exits non-zero on the first failure.
"""
import asyncio
import json
import sys

import websockets


async def recv_json(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), 5))


async def main(url):
    async with websockets.connect(url) as a, websockets.connect(url) as b:
        wa = await recv_json(a)
        assert wa["op"] == "welcome" and wa["node"] == "py-node", wa
        assert isinstance(wa["heartbeat_ms"], int) and wa["session"], wa
        await recv_json(b)

        await a.send(json.dumps({"op": "subscribe", "id": 1, "topics": ["py.news"]}))
        assert await recv_json(a) == {"op": "subscribed", "id": 1, "topics": ["py.news"]}

        for i in range(100):
            await b.send(json.dumps({"op": "publish", "id": 100 + i, "topic": "py.news", "data": {"i": i, "s": "é✓"}}))
        acks = [await recv_json(b) for _ in range(100)]
        assert sorted(x["id"] for x in acks) == list(range(100, 200)), acks[:3]
        for i in range(100):
            m = await recv_json(a)
            assert m == {"op": "message", "topic": "py.news", "data": {"i": i, "s": "é✓"}}, m

        await a.send(b"\x01\x02")
        e = await recv_json(a)
        assert e["op"] == "error" and e["code"] == "bad_request" and e["id"] is None, e
        await a.send(json.dumps({"op": "subscribe", "id": 2, "topics": ["bad topic"]}))
        e = await recv_json(a)
        assert e["code"] == "invalid_topic" and e["id"] == 2, e
        await a.send(json.dumps({"op": "ping", "id": 3}))
        assert await recv_json(a) == {"op": "pong", "id": 3}

        # A WebSocket-level ping is answered with a pong.
        pong_waiter = await a.ping(b"hello")
        await asyncio.wait_for(pong_waiter, 5)

        # Over the size limit: closed with 1009.
        await a.send("x" * 5000)
        try:
            await asyncio.wait_for(a.recv(), 5)
            raise AssertionError("expected a close")
        except websockets.ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1009, closed

        # The neighbour is unaffected.
        await b.send(json.dumps({"op": "ping", "id": 4}))
        assert await recv_json(b) == {"op": "pong", "id": 4}
    print("ALL OK")


asyncio.run(main(sys.argv[1]))
