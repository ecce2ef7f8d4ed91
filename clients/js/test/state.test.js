// Unit tests of the client's state machine, driven frame by frame through an in-memory
// socket. They cover what the real gateway cannot be made to do on demand (a 1008 close,
// the `refresh` op before the auth issue lands, a subscribe rejected only for some
// topics, exact backoff bookkeeping). The end-to-end behaviour is tested against real
// gateway processes in gateway.test.js.

import assert from "node:assert/strict";
import { afterEach, describe, test } from "node:test";
import { connect } from "../wsgate.js";
import { nextEvent, waitFor } from "./helpers.js";

/** An in-memory WebSocket: the test plays the server side. */
function fakeSockets() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.readyState = 0;
      this.closedWith = null;
      sockets.push(this);
      // Like a real socket, `open` comes asynchronously.
      setTimeout(() => {
        if (this.readyState === 0) {
          this.readyState = 1;
          this.onopen?.({});
        }
      }, 0);
    }
    send(text) {
      if (this.readyState !== 1) throw new Error("not open");
      const frame = JSON.parse(text);
      this.sent.push(frame);
      if (this.autoPong && frame.op === "ping") setTimeout(() => this.reply(frame), this.autoPong);
    }
    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 3;
    }
    // -- the server side --
    serverSend(obj) {
      this.onmessage?.({ data: JSON.stringify(obj) });
    }
    welcome(extra = {}) {
      if (this.readyState === 0) {
        this.readyState = 1;
        this.onopen?.({});
      }
      this.serverSend({ op: "welcome", session: `s${sockets.indexOf(this)}`, node: "n1", heartbeat_ms: 60000, ...extra });
    }
    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: code !== 1006 });
    }
    lastSent(op) {
      return this.sent.filter((f) => f.op === op).at(-1);
    }
    reply(frame, extra = {}) {
      const op = { subscribe: "subscribed", unsubscribe: "unsubscribed", publish: "published", ping: "pong", refresh: "refreshed" }[frame.op];
      this.serverSend({ op, id: frame.id, ...(frame.topics ? { topics: frame.topics } : {}), ...extra });
    }
    error(frame, code) {
      this.serverSend({ op: "error", id: frame.id, code, message: code });
    }
  }
  return { WebSocket: FakeWebSocket, sockets };
}

function jwt(payload) {
  const b64url = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  return `${b64url({ alg: "HS256" })}.${b64url(payload)}.sig`;
}

const fast = { backoffInitialMs: 20, backoffMaxMs: 200, goingAwayMaxDelayMs: 50, connectTimeoutMs: 2000, browserEvents: false };
const clients = [];
function make(url, opts) {
  const c = connect(url, { ...fast, ...opts });
  c.on("error", () => {}); // expected errors are asserted through promises
  clients.push(c);
  return c;
}
afterEach(() => {
  while (clients.length) clients.pop().close();
});

const socketCount = (sockets, n) => waitFor(() => sockets.length >= n, { timeoutMs: 3000, what: `${n} sockets` });

describe("close codes", () => {
  test("1008 without a token callback: closed for good, no reconnect", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket, token: "t1" });
    await socketCount(sockets, 1);
    assert.match(sockets[0].url, /token=t1/);
    sockets[0].welcome();
    const closed = nextEvent(c, "closed");
    sockets[0].serverClose(1008, "token expired");
    const info = await closed;
    assert.equal(info.code, 1008);
    assert.equal(c.state, "closed");
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(sockets.length, 1, "no reconnect after 1008");
    await assert.rejects(c.publish("x", 1), { code: "closed" });
  });

  test("1008 and the callback returns the same token: closed; setToken() later restarts and resubscribes", async () => {
    const { WebSocket, sockets } = fakeSockets();
    let calls = 0;
    const c = make("ws://a/ws", { WebSocket, token: "t1", getToken: async () => (calls++, "t1") });
    await socketCount(sockets, 1);
    sockets[0].welcome();
    c.subscribe("news", () => {});
    await waitFor(() => sockets[0].lastSent("subscribe"));
    sockets[0].reply(sockets[0].lastSent("subscribe"));
    const closed = nextEvent(c, "closed");
    sockets[0].serverClose(1008);
    await closed;
    assert.equal(calls, 1, "the callback was asked for a new token");
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(sockets.length, 1);

    c.setToken("t2");
    await socketCount(sockets, 2);
    assert.match(sockets[1].url, /token=t2/);
    sockets[1].welcome();
    assert.equal(c.state, "open");
    assert.deepEqual(sockets[1].lastSent("subscribe").topics, ["news"]);
  });

  test("1008 and the callback supplies a new token: reconnects with it", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const tokens = ["t1", "t2"];
    const c = make("ws://a/ws", { WebSocket, getToken: async () => tokens.shift() ?? "t2" });
    await socketCount(sockets, 1);
    assert.match(sockets[0].url, /token=t1/);
    sockets[0].welcome();
    sockets[0].serverClose(1008);
    await socketCount(sockets, 2);
    assert.match(sockets[1].url, /token=t2/);
    sockets[1].welcome();
    assert.equal(c.state, "open");
  });

  test("1001: reconnects after a small jittered delay, to the next node of the list", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make(["ws://a/ws", "ws://b/ws"], { WebSocket, goingAwayMaxDelayMs: 100, random: () => 0.5 });
    await socketCount(sockets, 1);
    assert.equal(sockets[0].url, "ws://a/ws");
    sockets[0].welcome();
    const rec = nextEvent(c, "reconnecting");
    sockets[0].serverClose(1001, "draining");
    const info = await rec;
    assert.equal(info.delayMs, 50, "random 0.5 of the 100 ms window");
    assert.equal(info.code, 1001);
    await socketCount(sockets, 2);
    assert.equal(sockets[1].url, "ws://b/ws");
    sockets[1].welcome({ node: "n2" });
    assert.equal(c.welcome.node, "n2");
    assert.equal(c.reconnects, 1);
  });

  test("1012 (service restart, rebalance): reconnects within the jitter window, backoff reset", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make(["ws://a/ws", "ws://b/ws"], { WebSocket, goingAwayMaxDelayMs: 100, random: () => 0.5, stableAfterMs: 60000 });
    // Two failed attempts first: the backoff would have grown.
    await socketCount(sockets, 1);
    sockets[0].serverClose(1006);
    await socketCount(sockets, 2);
    sockets[1].serverClose(1006);
    await socketCount(sockets, 3);
    sockets[2].welcome();
    c.subscribe("news", () => {});
    await waitFor(() => sockets[2].lastSent("subscribe"));
    sockets[2].reply(sockets[2].lastSent("subscribe"));
    const rec = nextEvent(c, "reconnecting");
    sockets[2].serverClose(1012, "rebalance");
    const info = await rec;
    assert.equal(info.code, 1012);
    assert.equal(info.delayMs, 50, "the 1001 jitter window, not the backoff");
    await socketCount(sockets, 4);
    sockets[3].welcome();
    assert.deepEqual(sockets[3].lastSent("subscribe").topics, ["news"], "resubscribed");
  });

  test("1001 and 1012 with a retry= hint: reconnects after the hint plus the jitter", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make(["ws://a/ws", "ws://b/ws"], { WebSocket, goingAwayMaxDelayMs: 100, random: () => 0.5 });
    await socketCount(sockets, 1);
    sockets[0].welcome();
    let rec = nextEvent(c, "reconnecting");
    sockets[0].serverClose(1001, "node draining: reconnect; retry=150");
    let info = await rec;
    assert.equal(info.delayMs, 200, "150 ms hint + 50 ms jitter");
    assert.equal(info.reason, "node draining: reconnect; retry=150");
    await socketCount(sockets, 2);
    sockets[1].welcome();
    rec = nextEvent(c, "reconnecting");
    sockets[1].serverClose(1012, "rebalance; retry=30");
    info = await rec;
    assert.equal(info.delayMs, 80);
    await socketCount(sockets, 3);
  });

  test("welcome.reconnect_ms is the base of the backoff after an unexplained loss", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket, random: () => 0.5, backoffInitialMs: 20, backoffMaxMs: 200 });
    await socketCount(sockets, 1);
    sockets[0].welcome({ reconnect_ms: 400 });
    assert.equal(c.welcome.reconnect_ms, 400);
    let rec = nextEvent(c, "reconnecting");
    sockets[0].serverClose(1006);
    let info = await rec;
    assert.equal(info.delayMs, 200, "random 0.5 of the server's 400 ms base");
    // backoffMaxMs (200) is below the server's base: the base is the cap too.
    await socketCount(sockets, 2);
    rec = nextEvent(c, "reconnecting");
    sockets[1].serverClose(1006);
    info = await rec;
    assert.equal(info.delayMs, 200);
    // A node without the field: the client's own options again.
    await socketCount(sockets, 3);
    sockets[2].welcome();
    assert.equal(c.welcome.reconnect_ms, undefined);
    rec = nextEvent(c, "reconnecting");
    sockets[2].serverClose(1006);
    info = await rec;
    assert.ok(info.delayMs <= 100, `${info.delayMs}`);
  });

  test("4010 (disconnected by the server API): closed for good, no reconnect", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    await socketCount(sockets, 1);
    sockets[0].welcome();
    const pending = c.subscribe("news", () => {});
    await waitFor(() => sockets[0].lastSent("subscribe"));
    const closed = nextEvent(c, "closed");
    sockets[0].serverClose(4010, "kicked by an operator");
    const info = await closed;
    assert.equal(info.code, 4010);
    assert.equal(info.reason, "kicked by an operator");
    assert.equal(info.kicked, true);
    assert.equal(c.state, "closed");
    assert.equal(c.closeInfo.kicked, true);
    await assert.rejects(pending, { code: "closed" });
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(sockets.length, 1, "no reconnect after 4010");
    await assert.rejects(c.presence("room.1"), { code: "closed" });
    c.setToken("another");
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(sockets.length, 1, "a new token does not undo a kick");
  });

  test("4010 with reconnectOnKick: reconnects with backoff", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket, reconnectOnKick: true, backoffInitialMs: 40, random: () => 0.5 });
    await socketCount(sockets, 1);
    sockets[0].welcome();
    const rec = nextEvent(c, "reconnecting");
    sockets[0].serverClose(4010, "kicked");
    const info = await rec;
    assert.equal(info.code, 4010);
    assert.equal(info.delayMs, 20, "backoff: random 0.5 of the first 40 ms cap");
    await socketCount(sockets, 2);
    sockets[1].welcome();
    assert.equal(c.state, "open");
  });

  test("failures back off exponentially (full jitter) and an open connection resets it", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket, backoffInitialMs: 10, backoffMaxMs: 80, random: () => 0.999, stableAfterMs: 0 });
    const delays = [];
    c.on("reconnecting", (i) => delays.push(i.delayMs));
    for (let n = 1; n <= 6; n++) {
      await socketCount(sockets, n);
      sockets[n - 1].serverClose(1006);
    }
    assert.deepEqual(delays, [9, 19, 39, 79, 79, 79]);
    await socketCount(sockets, 7);
    sockets[6].welcome();
    sockets[6].serverClose(4008, "slow consumer");
    await waitFor(() => delays.length === 7);
    assert.equal(delays[6], 9, "a connection that opened resets the backoff");
  });
});

describe("subscriptions", () => {
  test("subscribes made together go in one command; everything is resubscribed in one command", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    const got = [];
    const ready = Promise.all(["a", "b", "c"].map((t) => c.subscribe(t, (d) => got.push([t, d]))));
    await socketCount(sockets, 1);
    sockets[0].welcome();
    const subs = sockets[0].sent.filter((f) => f.op === "subscribe");
    assert.equal(subs.length, 1);
    assert.deepEqual(subs[0].topics, ["a", "b", "c"]);
    sockets[0].reply(subs[0]);
    await ready;
    sockets[0].serverSend({ op: "message", topic: "b", data: { x: 1 } });
    assert.deepEqual(got, [["b", { x: 1 }]]);

    c.unsubscribe("c");
    await waitFor(() => sockets[0].lastSent("unsubscribe"));
    assert.deepEqual(sockets[0].lastSent("unsubscribe").topics, ["c"]);

    sockets[0].serverClose(1006);
    await socketCount(sockets, 2);
    sockets[1].welcome();
    const resubs = sockets[1].sent.filter((f) => f.op === "subscribe");
    assert.equal(resubs.length, 1, "one subscribe command after reconnecting");
    assert.deepEqual(resubs[0].topics, ["a", "b"]);
  });

  test("a batch rejected for one bad topic is retried topic by topic", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    await socketCount(sockets, 1);
    sockets[0].welcome();
    const good = c.subscribe("good", () => {});
    const bad = c.subscribe("bad topic", () => {});
    await waitFor(() => sockets[0].lastSent("subscribe"));
    sockets[0].error(sockets[0].lastSent("subscribe"), "invalid_topic");
    await waitFor(() => sockets[0].sent.filter((f) => f.op === "subscribe").length === 3);
    for (const f of sockets[0].sent.filter((f) => f.op === "subscribe").slice(1)) {
      if (f.topics[0] === "good") sockets[0].reply(f);
      else sockets[0].error(f, "invalid_topic");
    }
    await good;
    await assert.rejects(bad, { code: "invalid_topic" });
    assert.deepEqual(c.topics(), ["good"]);
  });
});

describe("publish", () => {
  test("resolves on published, rejects with the server's code, and with `disconnected` when the link drops", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    await socketCount(sockets, 1);
    sockets[0].welcome();
    const ok = c.publish("t", { n: 1 });
    const rejected = c.publish("t", 2);
    const inflight = c.publish("t", 3);
    const [f1, f2] = sockets[0].sent.filter((f) => f.op === "publish");
    assert.deepEqual(f1.data, { n: 1 });
    sockets[0].reply(f1);
    sockets[0].error(f2, "rate_limited");
    await ok;
    await assert.rejects(rejected, { code: "rate_limited" });
    sockets[0].serverClose(1006);
    await assert.rejects(inflight, { code: "disconnected" });
  });

  test("while disconnected: waits for the connection up to offlineTimeoutMs, then `offline`", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket, offlineTimeoutMs: 150 });
    const early = c.publish("t", "queued");
    await socketCount(sockets, 1);
    assert.equal(sockets[0].sent.length, 0, "nothing is sent before welcome");
    sockets[0].welcome();
    const f = sockets[0].lastSent("publish");
    assert.equal(f.data, "queued");
    sockets[0].reply(f);
    await early;

    sockets[0].serverClose(1006);
    const late = c.publish("t", "too late");
    await assert.rejects(late, { code: "offline" });
    const none = connect("ws://a/ws", { ...fast, WebSocket, offlineTimeoutMs: 0 });
    await assert.rejects(none.publish("t", 1), { code: "offline" });
    none.close();
    // The wait queue is bounded.
    const few = make("ws://a/ws", { WebSocket, maxQueued: 2 });
    const waiting = [few.publish("t", 1), few.publish("t", 2)];
    await assert.rejects(few.publish("t", 3), { code: "offline" });
    few.close();
    for (const p of waiting) await assert.rejects(p, { code: "closed" });
  });

  test("a frame over maxMessageBytes is refused locally (the server would close with 1009)", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket, maxMessageBytes: 1000 });
    await socketCount(sockets, 1);
    sockets[0].welcome();
    await assert.rejects(c.publish("t", "é".repeat(600)), { code: "payload_too_large" });
    await assert.rejects(c.publish("t", undefined), { code: "bad_request" });
    assert.equal(sockets[0].sent.length, 0);
  });
});

describe("liveness and tokens", () => {
  test("silence past heartbeat + margin sends a ping op; no answer closes and reconnects", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket, idleMarginMs: 50, pongTimeoutMs: 300 });
    let dead = 0;
    c.on("dead", () => dead++);
    await socketCount(sockets, 1);
    // Answers take longer than the client's timer granularity, like on a real network.
    sockets[0].autoPong = 80;
    sockets[0].welcome({ heartbeat_ms: 50 });
    // Answered probes: the connection stays up.
    await waitFor(() => sockets[0].sent.filter((f) => f.op === "ping").length >= 3, { what: "3 probes" });
    assert.equal(dead, 0);
    assert.equal(c.state, "open");
    // Unanswered probe: the socket is dropped and a new one opened.
    sockets[0].autoPong = false;
    await waitFor(() => dead === 1, { what: "dead link detected" });
    assert.ok(sockets[0].closedWith, "the dead socket was closed");
    await socketCount(sockets, 2);
  });

  test("refreshes the token with the refresh op before exp; falls back when the server lacks the op", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const exp = () => Math.floor(Date.now() / 1000) + 3;
    const first = jwt({ sub: "u", exp: exp() });
    let n = 0;
    const c = make("ws://a/ws", { WebSocket, token: first, getToken: async () => jwt({ sub: "u", exp: exp(), n: ++n }), refreshMarginMs: 2500 });
    await socketCount(sockets, 1);
    sockets[0].welcome();
    const refresh = await waitFor(() => sockets[0].lastSent("refresh"), { timeoutMs: 4000, what: "refresh op" });
    assert.notEqual(refresh.token, first);
    assert.equal(typeof refresh.id, "number");
    sockets[0].reply(refresh);

    // A gateway without the op: no more refresh attempts; the token is used on reconnect.
    const second = await waitFor(() => sockets[0].sent.filter((f) => f.op === "refresh")[1], { timeoutMs: 4000, what: "second refresh" });
    sockets[0].error(second, "unknown_op");
    sockets[0].serverClose(1008, "token expired");
    await socketCount(sockets, 2);
    assert.ok(!sockets[1].url.includes(encodeURIComponent(first)));
    assert.match(sockets[1].url, /token=/);
    sockets[1].welcome();
    assert.equal(c.state, "open");
  });

  test("a static token that has expired stops the client instead of retrying forever", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket, token: jwt({ exp: Math.floor(Date.now() / 1000) - 10 }) });
    await waitFor(() => c.state === "closed");
    assert.equal(sockets.length, 0);
    assert.equal(c.closeInfo.reason, "token expired");
  });
});

describe("streams and resume", () => {
  /** Opens a client subscribed to `topics` on socket `i`; the reply gives `streams`. */
  async function subscribed(c, sockets, i, streams) {
    await socketCount(sockets, i + 1);
    sockets[i].welcome();
    const f = await waitFor(() => sockets[i].lastSent("subscribe"), { what: "subscribe" });
    sockets[i].reply(f, streams ? { streams } : {});
    return f;
  }
  const msg = (topic, seq, data = { n: seq }) => ({ op: "message", topic, data, seq });

  test("no since on the first subscribe; positions from `subscribed` then each seq; since on reconnect", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    const got = [];
    const resyncs = [];
    c.on("resync", (r) => resyncs.push(r));
    const ready = Promise.all([c.subscribe("chat:1", (d, m) => got.push([d.n, m.seq])), c.subscribe("chat:2", () => {}), c.subscribe("plain", () => {})]);
    const first = await subscribed(c, sockets, 0, { "chat:1": { seq: 41, epoch: "x7f" }, "chat:2": { seq: 0, epoch: "e2" } });
    await ready;
    assert.equal(first.since, undefined, "nothing to resume on the first subscribe");
    assert.deepEqual(first.topics, ["chat:1", "chat:2", "plain"]);
    assert.deepEqual(c.position("chat:1"), { seq: 41, epoch: "x7f" });
    assert.deepEqual(c.position("chat:2"), { seq: 0, epoch: "e2" });
    assert.equal(c.position("plain"), null, "not a stream");
    assert.equal(c.position("unknown"), null);

    sockets[0].serverSend(msg("chat:1", 42));
    sockets[0].serverSend(msg("chat:1", 43));
    sockets[0].serverSend({ op: "message", topic: "plain", data: 1 });
    assert.deepEqual(got, [
      [42, 42],
      [43, 43],
    ]);
    assert.deepEqual(c.positions(), { "chat:1": { seq: 43, epoch: "x7f" }, "chat:2": { seq: 0, epoch: "e2" } });

    // The link drops: one subscribe restores every topic, each stream from its position.
    sockets[0].serverClose(1006);
    await socketCount(sockets, 2);
    sockets[1].welcome();
    const subs = sockets[1].sent.filter((f) => f.op === "subscribe");
    assert.equal(subs.length, 1, "one subscribe command");
    assert.deepEqual(subs[0].topics, ["chat:1", "chat:2", "plain"]);
    assert.deepEqual(subs[0].since, { "chat:1": { seq: 43, epoch: "x7f" }, "chat:2": { seq: 0, epoch: "e2" } });
    // Recovered: the reply carries the head, the missed run follows it, then live.
    sockets[1].reply(subs[0], { streams: { "chat:1": { seq: 45, epoch: "x7f", recovered: true }, "chat:2": { seq: 0, epoch: "e2", recovered: true } } });
    for (const seq of [44, 45, 46]) sockets[1].serverSend(msg("chat:1", seq));
    assert.deepEqual(
      got.map(([n]) => n),
      [42, 43, 44, 45, 46],
    );
    assert.deepEqual(c.position("chat:1"), { seq: 46, epoch: "x7f" });
    assert.deepEqual(resyncs, [], "nothing lost, no resync");

    // And again from the new position.
    sockets[1].serverClose(1001);
    await socketCount(sockets, 3);
    sockets[2].welcome();
    assert.deepEqual(sockets[2].lastSent("subscribe").since["chat:1"], { seq: 46, epoch: "x7f" });
  });

  test("the replay right behind `subscribed` in the same task is checked against the resumed position", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    const got = [];
    c.subscribe("chat:1", (d, m) => got.push(m.seq));
    await subscribed(c, sockets, 0, { "chat:1": { seq: 5, epoch: "e" } });
    sockets[0].serverClose(1006);
    await socketCount(sockets, 2);
    sockets[1].welcome();
    const f = sockets[1].lastSent("subscribe");
    // Like the `ws` package emitting several frames of one TCP chunk synchronously.
    sockets[1].reply(f, { streams: { "chat:1": { seq: 8, epoch: "e", recovered: true } } });
    sockets[1].serverSend(msg("chat:1", 6));
    sockets[1].serverSend(msg("chat:1", 7));
    sockets[1].serverSend(msg("chat:1", 8));
    assert.deepEqual(got, [6, 7, 8]);
  });

  test("duplicates (seq not past the position) are dropped before the handlers and the message event", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    const got = [];
    const events = [];
    c.on("message", (m) => events.push(m.seq));
    c.subscribe("chat:1", (d, m) => got.push(m.seq));
    await subscribed(c, sockets, 0, { "chat:1": { seq: 10, epoch: "e" } });
    for (const seq of [9, 10, 11, 11, 12, 10, 13]) sockets[0].serverSend(msg("chat:1", seq));
    assert.deepEqual(got, [11, 12, 13]);
    assert.deepEqual(events, [11, 12, 13]);
    assert.equal(c.duplicates, 4);
    assert.deepEqual(c.position("chat:1"), { seq: 13, epoch: "e" });
  });

  test("recovered:false after a since: one resync event (not_recovered), position moved to the server's", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    const resyncs = [];
    c.on("resync", (r) => resyncs.push(r));
    const got = [];
    c.subscribe("chat:1", (d, m) => got.push(m.seq));
    await subscribed(c, sockets, 0, { "chat:1": { seq: 3, epoch: "e1" } });
    sockets[0].serverSend(msg("chat:1", 4));
    sockets[0].serverClose(1006);
    await socketCount(sockets, 2);
    sockets[1].welcome();
    const f = sockets[1].lastSent("subscribe");
    assert.deepEqual(f.since, { "chat:1": { seq: 4, epoch: "e1" } });
    sockets[1].reply(f, { streams: { "chat:1": { seq: 900, epoch: "e2", recovered: false } } });
    assert.deepEqual(resyncs, [{ topic: "chat:1", reason: "not_recovered", seq: 900, epoch: "e2", previous: { seq: 4, epoch: "e1" } }]);
    assert.deepEqual(c.position("chat:1"), { seq: 900, epoch: "e2" });
    sockets[1].serverSend(msg("chat:1", 901));
    assert.deepEqual(got, [4, 901], "live continues after the new position");
  });

  test("no resync on a first subscribe, even when the server says where the stream is", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    let resyncs = 0;
    c.on("resync", () => resyncs++);
    c.subscribe("chat:1", () => {});
    const f = await subscribed(c, sockets, 0, { "chat:1": { seq: 77, epoch: "e" } });
    assert.equal(f.since, undefined);
    assert.equal(resyncs, 0);
  });

  test("reset: one resync event, the position moves to the reset's seq/epoch, delivery continues after it", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    const resyncs = [];
    c.on("resync", (r) => resyncs.push(r));
    const got = [];
    c.subscribe("chat:1", (d, m) => got.push(m.seq));
    await subscribed(c, sockets, 0, { "chat:1": { seq: 0, epoch: "e" } });
    sockets[0].serverSend(msg("chat:1", 1));
    sockets[0].serverSend({ op: "reset", topic: "chat:1", seq: 7, epoch: "e" });
    assert.deepEqual(resyncs, [{ topic: "chat:1", reason: "reset", seq: 7, epoch: "e", previous: { seq: 1, epoch: "e" } }]);
    assert.deepEqual(c.position("chat:1"), { seq: 7, epoch: "e" });
    sockets[0].serverSend(msg("chat:1", 5)); // inside the lost range: already accounted for
    sockets[0].serverSend(msg("chat:1", 8));
    assert.deepEqual(got, [1, 8]);
    // A reset that loses nothing already delivered is no news.
    sockets[0].serverSend({ op: "reset", topic: "chat:1", seq: 8, epoch: "e" });
    assert.equal(resyncs.length, 1);
    // A new epoch: the position follows it, and the next resume uses it.
    sockets[0].serverSend({ op: "reset", topic: "chat:1", seq: 2, epoch: "e9" });
    assert.equal(resyncs.length, 2);
    assert.deepEqual(c.position("chat:1"), { seq: 2, epoch: "e9" });
    sockets[0].serverSend(msg("chat:1", 3));
    assert.deepEqual(got, [1, 8, 3]);
    sockets[0].serverClose(1006);
    await socketCount(sockets, 2);
    sockets[1].welcome();
    assert.deepEqual(sockets[1].lastSent("subscribe").since, { "chat:1": { seq: 3, epoch: "e9" } });
    // A reset for a topic not subscribed is ignored.
    sockets[1].serverSend({ op: "reset", topic: "other", seq: 1, epoch: "e" });
    assert.equal(resyncs.length, 2);
  });

  test("a seq jump without reset is reported as a gap; a resumed topic that is no longer a stream too", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    const resyncs = [];
    c.on("resync", (r) => resyncs.push(r));
    const got = [];
    c.subscribe("chat:1", (d, m) => got.push(m.seq ?? d));
    await subscribed(c, sockets, 0, { "chat:1": { seq: 0, epoch: "e" } });
    sockets[0].serverSend(msg("chat:1", 1));
    sockets[0].serverSend(msg("chat:1", 4));
    assert.deepEqual(resyncs, [{ topic: "chat:1", reason: "gap", seq: 3, epoch: "e", previous: { seq: 1, epoch: "e" } }]);
    assert.deepEqual(got, [1, 4]);
    // Reconnected to a node where the topic is not a stream: the resume failed.
    sockets[0].serverClose(1006);
    await socketCount(sockets, 2);
    sockets[1].welcome();
    sockets[1].reply(sockets[1].lastSent("subscribe"));
    assert.deepEqual(resyncs[1], { topic: "chat:1", reason: "not_recovered", seq: null, epoch: null, previous: { seq: 4, epoch: "e" } });
    assert.equal(c.position("chat:1"), null);
    sockets[1].serverSend({ op: "message", topic: "chat:1", data: "plain" });
    assert.deepEqual(got, [1, 4, "plain"]);
  });

  test("subscribe({since}) resumes on the first subscribe; a failed resume there is a resync too", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    const resyncs = [];
    c.on("resync", (r) => resyncs.push(r));
    await assert.rejects(c.subscribe("chat:1", () => {}, { since: { seq: -1, epoch: "e" } }), { code: "bad_request" });
    await assert.rejects(c.subscribe("chat:1", () => {}, { since: { seq: 1 } }), { code: "bad_request" });
    const got = [];
    const a = c.subscribe("chat:a", (d, m) => got.push(m.seq), { since: { seq: 37, epoch: "x7f" } });
    const b = c.subscribe("chat:b", () => {}, { since: { seq: 5, epoch: "old" } });
    assert.deepEqual(c.position("chat:a"), { seq: 37, epoch: "x7f" }, "known before the server confirms");
    await socketCount(sockets, 1);
    sockets[0].welcome();
    const f = sockets[0].lastSent("subscribe");
    assert.deepEqual(f.since, { "chat:a": { seq: 37, epoch: "x7f" }, "chat:b": { seq: 5, epoch: "old" } });
    sockets[0].reply(f, { streams: { "chat:a": { seq: 41, epoch: "x7f", recovered: true }, "chat:b": { seq: 12, epoch: "new", recovered: false } } });
    for (const seq of [38, 39, 40, 41]) sockets[0].serverSend(msg("chat:a", seq));
    await Promise.all([a, b]);
    assert.deepEqual(got, [38, 39, 40, 41]);
    assert.deepEqual(resyncs, [{ topic: "chat:b", reason: "not_recovered", seq: 12, epoch: "new", previous: { seq: 5, epoch: "old" } }]);
    // Unsubscribing forgets the position.
    const unsub = c.unsubscribe("chat:b");
    assert.equal(c.position("chat:b"), null);
    sockets[0].reply(await waitFor(() => sockets[0].lastSent("unsubscribe"), { what: "unsubscribe" }));
    await unsub;
  });

  test("publish resolves with {seq, epoch} on a stream, undefined on a plain topic", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    await socketCount(sockets, 1);
    sockets[0].welcome();
    const onStream = c.publish("chat:1", { text: "hi" });
    const onPlain = c.publish("news", 1);
    const [f1, f2] = sockets[0].sent.filter((f) => f.op === "publish");
    sockets[0].reply(f1, { seq: 42, epoch: "x7f" });
    sockets[0].reply(f2);
    assert.deepEqual(await onStream, { seq: 42, epoch: "x7f" });
    assert.equal(await onPlain, undefined);
  });

  test("a big resubscribe with since entries is split so that every frame fits", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket, maxMessageBytes: 2048 });
    const topics = Array.from({ length: 60 }, (_, i) => `chat:${"x".repeat(20)}${i}`);
    for (const t of topics) c.subscribe(t, () => {}, { since: { seq: 1000000 + topics.indexOf(t), epoch: "0123456789abcdef" } }).catch(() => {});
    await socketCount(sockets, 1);
    sockets[0].welcome();
    const subs = sockets[0].sent.filter((f) => f.op === "subscribe");
    assert.ok(subs.length > 1, "split");
    for (const f of subs) {
      assert.ok(JSON.stringify(f).length < 2048, "fits");
      assert.deepEqual(Object.keys(f.since), f.topics, "each frame carries the since of its own topics");
    }
    assert.deepEqual(
      subs.flatMap((f) => f.topics),
      topics,
    );
  });
});

describe("presence and server-side subscriptions", () => {
  test("presence() and presenceStats() send their ops and resolve with the lists and counts", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    const list = c.presence("room.1"); // waits for the connection, like publish
    const stats = c.presenceStats("room.1");
    await socketCount(sockets, 1);
    sockets[0].welcome();
    const p = sockets[0].lastSent("presence");
    const ps = sockets[0].lastSent("presence_stats");
    assert.equal(p.topic, "room.1");
    assert.equal(ps.topic, "room.1");
    const clients = [
      { session: "s1", user: "alice", node: "n1" },
      { session: "s2", user: null, node: "n2" },
    ];
    sockets[0].serverSend({ op: "presence", id: p.id, topic: "room.1", clients });
    sockets[0].serverSend({ op: "presence_stats", id: ps.id, topic: "room.1", clients: 2, users: 1 });
    assert.deepEqual(await list, clients);
    assert.deepEqual(await stats, { clients: 2, users: 1 });

    const off = c.presence("lobby");
    await waitFor(() => sockets[0].lastSent("presence").topic === "lobby");
    sockets[0].error(sockets[0].lastSent("presence"), "not_enabled");
    await assert.rejects(off, { code: "not_enabled" });
    await assert.rejects(c.presence(42), TypeError);
  });

  test("join, leave and presence_changed pushes become events", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    const seen = [];
    for (const ev of ["join", "leave", "presence_changed"]) c.on(ev, (info) => seen.push([ev, info]));
    await socketCount(sockets, 1);
    sockets[0].welcome();
    sockets[0].serverSend({ op: "join", topic: "room.1", session: "s9", user: "bob" });
    sockets[0].serverSend({ op: "leave", topic: "room.1", session: "s9", user: "bob" });
    sockets[0].serverSend({ op: "presence_changed", topic: "room.1", skipped: 12 });
    assert.deepEqual(seen, [
      ["join", { topic: "room.1", session: "s9", user: "bob" }],
      ["leave", { topic: "room.1", session: "s9", user: "bob" }],
      ["presence_changed", { topic: "room.1", skipped: 12 }],
    ]);
  });

  test("server-made subscriptions: event, messages to listen() and subscribe() handlers, not resubscribed", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    const events = [];
    c.on("subscribed", (i) => events.push(["subscribed", i]));
    c.on("unsubscribed", (i) => events.push(["unsubscribed", i]));
    const got = [];
    const stop = c.listen("alerts", (data, msg) => got.push(["listen", msg.topic, data]));
    c.subscribe("news", (data) => got.push(["news", data]));
    await socketCount(sockets, 1);
    sockets[0].welcome();
    sockets[0].reply(sockets[0].lastSent("subscribe"));
    // Right after the welcome (token claim) and later (server API): no id.
    sockets[0].serverSend({ op: "subscribed", id: null, topics: ["alerts"] });
    sockets[0].serverSend({ op: "subscribed", id: null, topics: ["feed"], streams: { feed: { seq: 4, epoch: "e" } } });
    assert.deepEqual(events, [
      ["subscribed", { topics: ["alerts"], server: true }],
      ["subscribed", { topics: ["feed"], server: true, streams: { feed: { seq: 4, epoch: "e" } } }],
    ]);
    assert.deepEqual(c.serverTopics().sort(), ["alerts", "feed"]);
    assert.deepEqual(c.topics(), ["news"], "not the client's own subscriptions");
    const messages = [];
    c.on("message", (m) => messages.push(m.topic));
    sockets[0].serverSend({ op: "message", topic: "alerts", data: 1 });
    sockets[0].serverSend({ op: "message", topic: "feed", data: 2, seq: 5 });
    assert.deepEqual(got, [["listen", "alerts", 1]]);
    assert.deepEqual(messages, ["alerts", "feed"], "every message reaches the message event");

    // The server ends one of its subscriptions and one of the client's.
    sockets[0].serverSend({ op: "unsubscribed", id: null, topics: ["feed", "news"] });
    assert.deepEqual(events.at(-1), ["unsubscribed", { topics: ["feed", "news"], server: true }]);
    assert.deepEqual(c.serverTopics(), ["alerts"]);
    assert.deepEqual(c.topics(), [], "a subscription the server ended is not the client's any more");

    // A reconnect: only the client's own topics are subscribed again (none here); the
    // server's subscriptions went with the connection.
    c.subscribe("news2", () => {}).catch(() => {});
    await waitFor(() => sockets[0].lastSent("subscribe").topics[0] === "news2");
    sockets[0].serverClose(1006);
    assert.deepEqual(c.serverTopics(), []);
    await socketCount(sockets, 2);
    sockets[1].welcome();
    const resubs = sockets[1].sent.filter((f) => f.op === "subscribe");
    assert.equal(resubs.length, 1);
    assert.deepEqual(resubs[0].topics, ["news2"], "server-made topics are not resubscribed by the client");
    // The server re-applies the token's topics; the listen() handler is still there.
    sockets[1].serverSend({ op: "subscribed", id: null, topics: ["alerts"] });
    sockets[1].serverSend({ op: "message", topic: "alerts", data: 3 });
    assert.deepEqual(got.at(-1), ["listen", "alerts", 3]);
    stop();
    sockets[1].serverSend({ op: "message", topic: "alerts", data: 4 });
    assert.deepEqual(got.at(-1), ["listen", "alerts", 3], "removed");
  });

  test("a reply `subscribed` with an id still answers its command", async () => {
    const { WebSocket, sockets } = fakeSockets();
    const c = make("ws://a/ws", { WebSocket });
    const events = [];
    c.on("subscribed", (i) => events.push(i));
    const done = c.subscribe("a", () => {});
    await socketCount(sockets, 1);
    sockets[0].welcome();
    sockets[0].reply(sockets[0].lastSent("subscribe"));
    await done;
    assert.deepEqual(events, [], "the event is for the server's own subscriptions only");
    assert.deepEqual(c.serverTopics(), []);
  });
});
