// Stream resume against real gateway processes: `chat:*` is a stream (a `--config` file
// with a [[namespaces]] table), the client is the Node one with the `ws` package.
//
// - one embedded node: a dropped connection catches up with exactly what it missed
//   (seq by seq, then live); a history too short to cover the gap, and a restarted node
//   (new epoch), give one `resync` event and delivery goes on;
// - two nodes on one Redis: the client's node drains (SIGTERM -> 1001), the client moves
//   to the other node and resumes there with nothing lost.
//
// Publications are made over HTTP (`POST /api/publish`), as an application backend does.

import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import { connect } from "../wsgate.js";
import { freePort, gatewayHelp, nextEvent, recordingWebSocket, startGateway, startRedis, stopAll, streamConfig, waitFor, within } from "./helpers.js";

const hasConfig = gatewayHelp().includes("--config");
const skip = hasConfig ? false : "this wsgate build has no --config (streams cannot be configured)";

const clients = [];
let redis;
after(async () => {
  for (const c of clients) c.close();
  await stopAll();
  await redis?.stop();
});

/** A client whose reconnects wait `delayMs` (so that publications happen meanwhile). */
function client(url, { delayMs = 1000, ...opts } = {}) {
  const rec = recordingWebSocket();
  const c = connect(url, {
    WebSocket: rec.WebSocket,
    backoffInitialMs: delayMs,
    backoffMaxMs: delayMs,
    goingAwayMaxDelayMs: delayMs,
    random: () => 0.99,
    ...opts,
  });
  c.on("error", () => {});
  c.rec = rec;
  c.resyncs = [];
  c.on("resync", (r) => c.resyncs.push(r));
  clients.push(c);
  return c;
}

async function opened(c) {
  if (c.state !== "open") await nextEvent(c, "open", 15000);
  return c;
}

/** Publishes `{n}` for each n over HTTP; returns the positions the gateway answered. */
async function publishRun(gw, topic, from, to) {
  const out = [];
  for (let n = from; n <= to; n++) {
    const res = await gw.publish(topic, { n });
    assert.equal(res.status, 200, res.body);
    const body = JSON.parse(res.body);
    assert.equal(typeof body.seq, "number", `a stream publication has a seq: ${res.body}`);
    out.push({ seq: body.seq, epoch: body.epoch });
  }
  return out;
}

/** Subscribes `c` to `topic`, recording [seq, data.n] of every delivery. */
async function follow(c, topic) {
  const got = [];
  await within(
    c.subscribe(topic, (d, m) => got.push([m.seq, d?.n])),
    15000,
    `subscribe ${topic}`,
  );
  return got;
}

const subscribes = (c) => c.rec.sent.filter((f) => f.op === "subscribe");
const range = (a, b) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

describe("one embedded node, chat:* a stream", { skip }, () => {
  test("a dropped connection resumes with exactly the missed publications, then live", async () => {
    const gw = await startGateway({ name: "stream-1", args: ["--node-id", "stream-1", "--config", streamConfig()] });
    const c = await opened(client(gw.wsUrl, { delayMs: 1500 }));
    const got = await follow(c, "chat:resume");
    const start = c.position("chat:resume");
    assert.equal(start?.seq, 0, "a new stream starts at 0");
    assert.equal(subscribes(c)[0].since, undefined, "no since on the first subscribe");

    const published = await publishRun(gw, "chat:resume", 1, 5);
    assert.deepEqual(
      published.map((p) => p.seq),
      range(1, 5),
    );
    assert.deepEqual((await c.publish("chat:resume", { n: 6 })).epoch, start.epoch, "publish resolves with the position");
    await waitFor(() => got.length === 6, { what: "6 live messages" });

    // The link drops (the socket is torn down under the client); publications go on.
    const disconnected = nextEvent(c, "disconnect");
    c.rec.sockets.at(-1).terminate();
    assert.equal((await disconnected).code, 1006);
    await publishRun(gw, "chat:resume", 7, 15);
    assert.equal(c.state, "reconnecting", "all nine were published while the client was away");

    await waitFor(() => c.state === "open", { timeoutMs: 10000, what: "reconnect" });
    const resub = subscribes(c)[1];
    assert.deepEqual(resub.since, { "chat:resume": { seq: 6, epoch: start.epoch } }, "resumes from the last delivered");
    await waitFor(() => got.length === 15, { what: "the nine missed publications" });
    await publishRun(gw, "chat:resume", 16, 18);
    await waitFor(() => got.length === 18, { what: "live ones after the replay" });
    assert.deepEqual(
      got,
      range(1, 18).map((n) => [n, n]),
      "every seq once, in order",
    );
    assert.deepEqual(c.position("chat:resume"), { seq: 18, epoch: start.epoch });
    assert.deepEqual(c.resyncs, []);
    assert.equal(c.duplicates, 0);
    c.close();
    await gw.stop();
  });

  test("a history too short for the gap: one resync (not_recovered), then live", async () => {
    const gw = await startGateway({ name: "stream-short", args: ["--config", streamConfig(5)] });
    const c = await opened(client(gw.wsUrl, { delayMs: 1500 }));
    const got = await follow(c, "chat:short");
    const { epoch } = c.position("chat:short");
    await publishRun(gw, "chat:short", 1, 2);
    await waitFor(() => got.length === 2);
    const disconnected = nextEvent(c, "disconnect");
    c.rec.sockets.at(-1).terminate();
    await disconnected;
    await publishRun(gw, "chat:short", 3, 12); // ten: the history keeps five
    const resync = nextEvent(c, "resync");
    assert.deepEqual(await resync, { topic: "chat:short", reason: "not_recovered", seq: 12, epoch, previous: { seq: 2, epoch } });
    assert.deepEqual(subscribes(c)[1].since, { "chat:short": { seq: 2, epoch } });
    await publishRun(gw, "chat:short", 13, 13);
    await waitFor(() => got.length === 3, { what: "the live one" });
    assert.deepEqual(got, [
      [1, 1],
      [2, 2],
      [13, 13],
    ]);
    assert.equal(c.resyncs.length, 1);
    c.close();
    await gw.stop();
  });

  test("a drained node replaced on the same port (new epoch): the resume fails with one resync, then live", async () => {
    const port = await freePort();
    const config = streamConfig();
    const g1 = await startGateway({ name: "epoch-1", port, args: ["--node-id", "epoch-1", "--drain-timeout", "1s", "--config", config] });
    const c = await opened(client(g1.wsUrl, { delayMs: 300, backoffInitialMs: 100, backoffMaxMs: 300 }));
    const got = await follow(c, "chat:epoch");
    await publishRun(g1, "chat:epoch", 1, 3);
    await waitFor(() => got.length === 3);
    const before = c.position("chat:epoch");

    const disconnected = nextEvent(c, "disconnect");
    g1.kill("SIGTERM");
    assert.equal((await disconnected).code, 1001, "drain: going away");
    assert.equal(await within(g1.exited, 15000, "epoch-1 exit"), 0);
    const g2 = await startGateway({ name: "epoch-2", port, args: ["--node-id", "epoch-2", "--config", config] });
    const resync = await nextEvent(c, "resync", 15000);
    assert.equal(resync.reason, "not_recovered");
    assert.deepEqual(resync.previous, before);
    assert.notEqual(resync.epoch, before.epoch, "the new process is a new epoch");
    assert.equal(c.welcome?.node, "epoch-2");
    const [p] = await publishRun(g2, "chat:epoch", 4, 4);
    assert.equal(p.epoch, resync.epoch);
    await waitFor(() => got.length === 4, { what: "live on the new node" });
    assert.deepEqual(got.at(-1), [p.seq, 4]);
    c.close();
    await g2.stop();
  });
});

describe("two nodes on one Redis, chat:* a stream", { skip }, () => {
  test("the client's node drains: it moves to the other node and resumes there, nothing lost", { timeout: 90000 }, async () => {
    redis = await startRedis();
    const config = streamConfig();
    const common = ["--redis-url", redis.url, "--config", config, "--drain-timeout", "2s"];
    const n1 = await startGateway({ name: "redis-1", args: ["--node-id", "redis-1", ...common] });
    const n2 = await startGateway({ name: "redis-2", args: ["--node-id", "redis-2", ...common] });
    const c = await opened(client([n1.wsUrl, n2.wsUrl], { delayMs: 500 }));
    assert.equal(c.welcome.node, "redis-1");
    const got = await follow(c, "chat:nodes");
    const start = c.position("chat:nodes");
    assert.ok(start, "chat:nodes is a stream with Redis too");

    // A backend publishes steadily through node 2 while node 1 drains.
    let n = 0;
    const published = [];
    let stop = false;
    const backend = (async () => {
      while (!stop) {
        n++;
        const res = await n2.publish("chat:nodes", { n });
        assert.equal(res.status, 200, res.body);
        published.push(JSON.parse(res.body).seq);
        await new Promise((r) => setTimeout(r, 15));
      }
    })();
    try {
      await waitFor(() => got.length >= 20, { what: "20 messages on node 1" });
      const disconnected = nextEvent(c, "disconnect");
      n1.kill("SIGTERM");
      assert.equal((await disconnected).code, 1001);
      const left = published.length;
      await waitFor(() => c.state === "open" && c.welcome?.node === "redis-2", { timeoutMs: 15000, what: "moved to node 2" });
      const mark = published.length;
      assert.ok(mark - left >= 5, `published while the client was away: ${mark - left}`);
      await waitFor(() => published.length >= mark + 20, { what: "20 more publications" });
    } finally {
      stop = true;
      await backend;
    }
    await waitFor(() => got.length === published.length, { timeoutMs: 10000, what: `all ${n} publications on the client` });
    assert.deepEqual(
      got.map(([seq]) => seq),
      range(start.seq + 1, start.seq + n),
      "every seq once, in order",
    );
    assert.deepEqual(
      got.map(([, d]) => d),
      range(1, n),
    );
    assert.ok(subscribes(c)[1]?.since?.["chat:nodes"], "resumed with since");
    assert.deepEqual(c.resyncs, []);
    assert.equal(await within(n1.exited, 15000, "redis-1 exit"), 0);
  });
});
