// The client against real `wsgate` processes on loopback ports (Node 20 has no global
// WebSocket: the `ws` package is injected, as an application on Node would do).

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { connect } from "../wsgate.js";
import { freePort, nextEvent, recordingWebSocket, sleep, startGateway, startProxy, stopAll, waitFor } from "./helpers.js";

const clients = [];
function client(url, opts = {}) {
  const c = connect(url, { WebSocket, ...opts });
  clients.push(c);
  return c;
}
async function opened(c) {
  if (c.state !== "open") await nextEvent(c, "open", 15000);
  return c;
}

after(async () => {
  for (const c of clients) c.close();
  await stopAll();
});

describe("against one gateway", () => {
  let gw;
  before(async () => {
    gw = await startGateway({ name: "main", args: ["--node-id", "node-main", "--heartbeat-interval", "1s"] });
  });

  test("welcome: session, node and heartbeat are exposed", async () => {
    const c = await opened(client(gw.wsUrl));
    assert.equal(c.state, "open");
    assert.equal(c.welcome.node, "node-main");
    assert.equal(typeof c.welcome.session, "string");
    assert.ok(c.welcome.session.length > 0);
    assert.equal(c.welcome.heartbeat_ms, 1000);
    const rtt = await c.ping();
    assert.ok(rtt >= 0);
  });

  test("subscribe/publish round trip between two clients, in order, publisher gets its own", async () => {
    const a = await opened(client(gw.wsUrl));
    const b = await opened(client(gw.wsUrl));
    const gotA = [];
    const gotB = [];
    await Promise.all([a.subscribe("chat.room-1", (d) => gotA.push(d)), b.subscribe("chat.room-1", (d, m) => gotB.push([d, m.topic]))]);
    for (let i = 0; i < 50; i++) await a.publish("chat.room-1", { i, text: `hello ${i}` });
    await waitFor(() => gotA.length === 50 && gotB.length === 50, { what: "50 messages on both clients" });
    assert.deepEqual(
      gotB.map(([d]) => d.i),
      Array.from({ length: 50 }, (_, i) => i),
    );
    assert.equal(gotB[0][1], "chat.room-1");
    assert.deepEqual(gotA[49], { i: 49, text: "hello 49" });
  });

  test("publish rejects with the server's code (invalid_topic); the connection stays usable", async () => {
    const c = await opened(client(gw.wsUrl));
    await assert.rejects(c.publish("bad topic!", 1), (err) => {
      assert.equal(err.name, "WsgateError");
      assert.equal(err.code, "invalid_topic");
      return true;
    });
    await assert.rejects(c.publish("x".repeat(201), 1), { code: "invalid_topic" });
    await assert.rejects(c.subscribe("no spaces allowed", () => {}), { code: "invalid_topic" });
    assert.deepEqual(c.topics(), [], "a rejected topic is dropped");
    // Same connection, still fine.
    const session = c.welcome.session;
    const got = [];
    await c.subscribe("ok.topic", (d) => got.push(d));
    await c.publish("ok.topic", null);
    await c.publish("ok.topic", [1, "two", { three: 3 }]);
    await waitFor(() => got.length === 2);
    assert.deepEqual(got, [null, [1, "two", { three: 3 }]]);
    assert.equal(c.welcome.session, session);
  });

  test("a batch with one bad topic: the good ones are still subscribed", async () => {
    const c = await opened(client(gw.wsUrl));
    const results = await Promise.allSettled([c.subscribe("good.1", () => {}), c.subscribe("bad topic", () => {}), c.subscribe("good.2", () => {})]);
    assert.deepEqual(
      results.map((r) => r.status),
      ["fulfilled", "rejected", "fulfilled"],
    );
    assert.equal(results[1].reason.code, "invalid_topic");
    assert.deepEqual(c.topics().sort(), ["good.1", "good.2"]);
  });

  test("HTTP API publications reach subscribers; unsubscribe stops them", async () => {
    const c = await opened(client(gw.wsUrl));
    const ticks = [];
    const barrier = [];
    await c.subscribe("demo.ticker", (d) => ticks.push(d));
    await c.subscribe("barrier", (d) => barrier.push(d));
    const res = await gw.publish("demo.ticker", { symbol: "ACME", price: 101.5 });
    assert.equal(res.status, 200, res.body);
    await waitFor(() => ticks.length === 1);
    assert.deepEqual(ticks[0], { symbol: "ACME", price: 101.5 });

    await c.unsubscribe("demo.ticker");
    assert.equal((await gw.publish("demo.ticker", { symbol: "ACME", price: 0 })).status, 200);
    await c.publish("barrier", "after");
    await waitFor(() => barrier.length === 1);
    await sleep(100);
    assert.equal(ticks.length, 1, "no message after unsubscribe");
  });

  test("too_many_topics: the client subscribes what fits and rejects the rest", async () => {
    const small = await startGateway({ name: "small", args: ["--max-topics-per-connection", "3"] });
    const c = await opened(client(small.wsUrl));
    const results = await Promise.allSettled(["t1", "t2", "t3", "t4", "t5"].map((t) => c.subscribe(t, () => {})));
    const ok = results.filter((r) => r.status === "fulfilled").length;
    const rejected = results.filter((r) => r.status === "rejected");
    assert.equal(ok, 3);
    assert.equal(rejected.length, 2);
    for (const r of rejected) assert.equal(r.reason.code, "too_many_topics");
    c.close();
    await small.stop();
  });
});

describe("reconnecting", () => {
  test("drain (SIGTERM, close 1001): reconnects to a new gateway on the same port and resubscribes in one command", async () => {
    const port = await freePort();
    const g1 = await startGateway({ name: "g1", port, args: ["--node-id", "g1", "--drain-timeout", "1s"] });
    const rec = recordingWebSocket();
    const c = await opened(client(g1.wsUrl, { WebSocket: rec.WebSocket, backoffInitialMs: 100, backoffMaxMs: 500 }));
    const got = { "room.a": [], "room.b": [], "room.c": [] };
    await Promise.all(Object.keys(got).map((t) => c.subscribe(t, (d) => got[t].push(d))));
    const closes = [];
    c.on("disconnect", (i) => closes.push(i.code));

    const disconnected = nextEvent(c, "disconnect");
    g1.kill("SIGTERM");
    assert.equal((await disconnected).code, 1001, "a draining node closes with 1001");
    assert.equal(c.state, "reconnecting");
    // Published while offline: waits for the next connection.
    const queued = c.publish("room.a", "sent while offline");
    assert.equal(await g1.exited, 0, "the drained node exits 0");

    const g2 = await startGateway({ name: "g2", port, args: ["--node-id", "g2"] });
    await waitFor(() => c.state === "open" && c.welcome?.node === "g2", { timeoutMs: 15000, what: "reconnect to g2" });
    await queued;
    assert.equal(c.reconnects, 1);
    // The subscriptions are back (subscribe() on a known topic waits for the server's reply).
    await Promise.all(Object.keys(got).map((t) => c.subscribe(t)));
    const subscribes = rec.sent.filter((f) => f.op === "subscribe");
    assert.equal(subscribes.length, 2, "one subscribe command per connection");
    assert.deepEqual([...subscribes[1].topics].sort(), ["room.a", "room.b", "room.c"]);

    for (const t of Object.keys(got)) assert.equal((await g2.publish(t, { after: "reconnect" })).status, 200);
    await waitFor(() => Object.values(got).every((l) => l.some((d) => d?.after === "reconnect")), { what: "messages after reconnect" });
    assert.equal(closes[0], 1001);
  });

  test("dead link (no FIN, no RST): the idle ping op detects it, in-flight publish rejects, the client reconnects", async () => {
    const gw = await startGateway({ name: "behind-proxy", args: ["--heartbeat-interval", "1s"] });
    const proxy = await startProxy(gw.port);
    const c = await opened(
      client(`ws://127.0.0.1:${proxy.port}/ws`, { idleMarginMs: 300, pongTimeoutMs: 1500, backoffInitialMs: 100, backoffMaxMs: 300 }),
    );
    const got = [];
    await c.subscribe("live.t", (d) => got.push(d));
    let dead = 0;
    c.on("dead", () => dead++);
    // A healthy but quiet link: probes get answered, nothing is torn down.
    await sleep(3000);
    assert.equal(dead, 0);
    assert.equal(c.state, "open");
    assert.equal(c.reconnects, 0);

    const session = c.welcome.session;
    proxy.freeze();
    const inflight = c.publish("live.t", "into the void");
    await assert.rejects(inflight, { code: "disconnected" });
    assert.equal(dead, 1);
    await waitFor(() => c.state === "open", { timeoutMs: 10000, what: "reconnect" });
    assert.notEqual(c.welcome.session, session);
    await c.subscribe("live.t");
    assert.equal((await gw.publish("live.t", "after")).status, 200);
    await waitFor(() => got.includes("after"), { what: "message after reconnect" });
    c.close();
    await proxy.close();
    await gw.stop();
  });

  test("close() is final: no reconnect, pending work rejects with `closed`", async () => {
    const gw = await startGateway({ name: "closing" });
    const c = await opened(client(gw.wsUrl));
    const states = [];
    c.on("state", (s) => states.push(s));
    c.close();
    assert.equal(c.state, "closed");
    await assert.rejects(c.publish("t", 1), { code: "closed" });
    await assert.rejects(c.subscribe("t", () => {}), { code: "closed" });
    await sleep(300);
    assert.deepEqual(states, ["closed"]);
    await gw.stop();
  });

  test("503 overloaded (upgrade rate): the client waits the server's retry_after_ms and gets in", async () => {
    // A bucket of 2 refilled at 2/s: the third client at once is refused with a hint.
    const gw = await startGateway({ name: "storm", args: ["--upgrade-rate", "2", "--upgrade-burst", "2"] });
    const a = await opened(client(gw.wsUrl));
    const b = await opened(client(gw.wsUrl));
    assert.equal(a.welcome.reconnect_ms, 1000, "one refill of the burst");
    const c = client(gw.wsUrl, { backoffInitialMs: 60000, backoffMaxMs: 60000 });
    const [refused, rec] = await Promise.all([nextEvent(c, "disconnect"), nextEvent(c, "reconnecting")]);
    assert.equal(refused.status, 503);
    assert.ok(refused.retryAfterMs > 0 && refused.retryAfterMs <= 1000, `${refused.retryAfterMs}`);
    assert.equal(rec.delayMs, refused.retryAfterMs, "the server's wait, not the 60 s backoff");
    await opened(c);
    for (const x of [a, b, c]) x.close();
    await gw.stop();
  });

  test("drain with an upgrade rate: 1001 with retry= hints, each client back after its hint", async () => {
    const gw = await startGateway({ name: "drained", args: ["--upgrade-rate", "20", "--drain-timeout", "0s"] });
    const other = await startGateway({ name: "other" });
    const cs = [];
    for (let i = 0; i < 3; i++) cs.push(await opened(client([gw.wsUrl, other.wsUrl], { goingAwayMaxDelayMs: 1 })));
    const recs = cs.map((c) => nextEvent(c, "reconnecting"));
    gw.kill("SIGTERM");
    const infos = await Promise.all(recs);
    const hints = infos.map((i) => i.reason.match(/; retry=(\d+)$/)?.[1]).map((h) => (h ? Number(h) : 0)).sort((x, y) => x - y);
    assert.deepEqual(hints, [0, 50, 100], infos.map((i) => i.reason).join(" | "));
    for (const [i, info] of infos.entries()) {
      assert.equal(info.code, 1001);
      assert.ok(info.reason.startsWith("node draining: reconnect"), info.reason);
      const h = Number(info.reason.match(/; retry=(\d+)$/)?.[1] ?? 0);
      assert.ok(info.delayMs >= h && info.delayMs <= h + 1, `client ${i}: ${info.delayMs} for hint ${h}`);
    }
    for (const c of cs) await opened(c);
    for (const c of cs) c.close();
    await gw.stop();
    await other.stop();
  });
});
