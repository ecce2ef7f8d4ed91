// Presence, join/leave and the server API (protocol v1.1) against real gateways: a
// `--config` file with presence namespaces (helpers.presenceConfig), JWT users
// (`--jwt-secret`: a connection's presence `user` is its token's `sub`) and an API key
// for the server API. One embedded node, then two nodes on a private Redis.
//
// Skipped (with the reason) by a build whose configuration has no presence.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { connect } from "../wsgate.js";
import { nextEvent, presenceConfig, sleep, startGateway, startRedis, stopAll, waitFor, wsgateBin } from "./helpers.js";

const SECRET = "wsgate-js-presence-test-secret";
const API_KEY = "wsgate-js-presence-test-key";

/** Whether this build knows the presence keys of a namespace (check-config says so). */
function presenceSupport() {
  const r = spawnSync(wsgateBin(), ["check-config", presenceConfig()], { encoding: "utf8" });
  return r.status === 0 ? false : `this wsgate build has no presence namespaces:\n${r.stdout}${r.stderr}`;
}
const skip = presenceSupport();

/** An HS256 JWT for user `sub`; `topics`: the server subscribes the connection to them. */
function mint({ sub, ttlS = 600, topics } = {}) {
  const b64url = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const claims = { sub, exp: Math.floor(Date.now() / 1000) + ttlS, subscribe: ["**"], publish: ["**"], ...(topics ? { topics } : {}) };
  const body = `${b64url({ alg: "HS256", typ: "JWT" })}.${b64url(claims)}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

const clients = [];
/** A client connected as `user` (anonymous tokens are not accepted with --jwt-secret). */
function client(gw, user, opts = {}) {
  const c = connect(gw.wsUrl, { WebSocket, token: mint({ sub: user, topics: opts.topics }), backoffInitialMs: 100, backoffMaxMs: 500, ...opts });
  c.on("error", () => {});
  clients.push(c);
  return c;
}
async function opened(c) {
  if (c.state !== "open") await nextEvent(c, "open", 15000);
  return c;
}
/** Collects the join/leave events of a client: [[op, {topic, session, user}]]. */
function presenceLog(c) {
  const log = [];
  for (const ev of ["join", "leave", "presence_changed"]) c.on(ev, (info) => log.push([ev, info]));
  return log;
}
const sessions = (list) => list.map((e) => e.session).sort();

describe("presence against a real gateway", { skip }, () => {
  let gw;
  let room = 0;
  const nextRoom = () => `room.t${++room}`;
  const api = (path, body) => gw.api(path, body, { apiKey: API_KEY });
  const publish = (topic, data) => gw.publish(topic, data, { headers: { authorization: `Bearer ${API_KEY}` } });

  before(async () => {
    gw = await startGateway({
      name: "presence",
      args: ["--node-id", "node-p", "--config", presenceConfig({ joinLeaveRate: 1 }), "--jwt-secret", SECRET, "--api-key", API_KEY],
    });
  });
  after(async () => {
    for (const c of clients) c.close();
    await stopAll();
  });

  test("two clients in a room see each other in presence(), with user and node; presenceStats counts them", async () => {
    const topic = nextRoom();
    const a = await opened(client(gw, "alice"));
    const b = await opened(client(gw, "bob"));
    await a.subscribe(topic);
    await b.subscribe(topic);
    const fromA = await a.presence(topic);
    const fromB = await b.presence(topic);
    assert.deepEqual(sessions(fromA), [a.welcome.session, b.welcome.session].sort());
    assert.deepEqual(sessions(fromB), sessions(fromA), "both see the same room");
    const alice = fromB.find((e) => e.session === a.welcome.session);
    assert.equal(alice.user, "alice");
    assert.equal(alice.node, "node-p");
    assert.equal(fromA.find((e) => e.session === b.welcome.session).user, "bob");
    assert.deepEqual(await a.presenceStats(topic), { clients: 2, users: 2 });

    // A second connection of the same user: one more client, not one more user.
    const a2 = await opened(client(gw, "alice"));
    await a2.subscribe(topic);
    assert.deepEqual(await b.presenceStats(topic), { clients: 3, users: 2 });
    // The server API agrees.
    const http = await api("/api/presence", { topic });
    assert.equal(http.status, 200, http.body);
    assert.deepEqual(sessions(http.json.clients), sessions(await b.presence(topic)));
    const httpStats = await api("/api/presence_stats", { topic });
    assert.equal(httpStats.json.clients, 3);
    assert.equal(httpStats.json.users, 2);
    // A room nobody is in is empty, not an error.
    assert.deepEqual(await a.presence(nextRoom()), []);
  });

  test("join and leave reach the others, never the connection's own", async () => {
    const topic = nextRoom();
    const a = await opened(client(gw, "alice"));
    const b = await opened(client(gw, "bob"));
    const logA = presenceLog(a);
    const logB = presenceLog(b);
    await a.subscribe(topic);
    await sleep(200);
    assert.deepEqual(logA, [], "no join of its own");

    const joined = nextEvent(a, "join");
    await b.subscribe(topic);
    assert.deepEqual(await joined, { topic, session: b.welcome.session, user: "bob" });

    // Leaving by unsubscribing, then by closing the connection.
    const left = nextEvent(a, "leave");
    await b.unsubscribe(topic);
    assert.deepEqual(await left, { topic, session: b.welcome.session, user: "bob" });
    const c = await opened(client(gw, "carol"));
    const joined2 = nextEvent(a, "join");
    await c.subscribe(topic);
    const carol = c.welcome.session;
    assert.equal((await joined2).session, carol);
    const left2 = nextEvent(a, "leave");
    c.close();
    assert.deepEqual(await left2, { topic, session: carol, user: "carol" });

    await sleep(300);
    assert.deepEqual(
      logA.map(([ev, i]) => [ev, i.user]),
      [
        ["join", "bob"],
        ["leave", "bob"],
        ["join", "carol"],
        ["leave", "carol"],
      ],
    );
    assert.deepEqual(logB, [], "bob got nothing of his own (and nothing once out of the room)");
    assert.deepEqual(sessions(await a.presence(topic)), [a.welcome.session]);
  });

  test("a burst of joins over the rate rule: the events that were skipped are announced with presence_changed", async () => {
    // crowd.* pushes 1 join/leave per second per topic: 6 joins at once are mostly skipped.
    const topic = "crowd.burst";
    const watcher = await opened(client(gw, "watcher"));
    const log = presenceLog(watcher);
    await watcher.subscribe(topic);
    const crowd = await Promise.all(Array.from({ length: 6 }, (_, i) => opened(client(gw, `u${i}`))));
    await Promise.all(crowd.map((c) => c.subscribe(topic)));
    const joins = () => log.filter(([ev]) => ev === "join").length;
    const skipped = () => log.filter(([ev]) => ev === "presence_changed").reduce((n, [, i]) => n + i.skipped, 0);
    // The joins may straddle two windows: each ends with its own summary.
    await waitFor(() => joins() + skipped() >= 6, { timeoutMs: 5000, what: "6 joins, pushed or counted in presence_changed" });
    await sleep(1200); // a window more: nothing else comes
    assert.equal(joins() + skipped(), 6, "every join either pushed or counted as skipped, once");
    assert.ok(joins() < 6, `joins pushed: ${joins()}`);
    assert.ok(skipped() >= 1, `skipped: ${skipped()}`);
    assert.ok(log.filter(([ev]) => ev === "presence_changed").every(([, i]) => i.topic === topic));
    // What the event means: the list is stale, ask again. The room has everyone.
    assert.equal((await watcher.presence(topic)).length, 7);
    for (const c of crowd) c.close();
  });

  test("presence on a topic without it: not_enabled; without join/leave: listed, but no events", async () => {
    const a = await opened(client(gw, "alice"));
    await a.subscribe("plain.topic");
    await assert.rejects(a.presence("plain.topic"), { name: "WsgateError", code: "not_enabled" });
    await assert.rejects(a.presenceStats("plain.topic"), { code: "not_enabled" });
    await assert.rejects(a.presence("bad topic!"), { code: "invalid_topic" });

    const log = presenceLog(a);
    await a.subscribe("quiet.1");
    const b = await opened(client(gw, "bob"));
    await b.subscribe("quiet.1");
    assert.deepEqual(sessions(await a.presence("quiet.1")), [a.welcome.session, b.welcome.session].sort());
    await sleep(300);
    assert.deepEqual(log, [], "no join/leave on a topic without them");
    assert.equal(a.state, "open", "errors leave the connection up");
  });

  test("server API subscribe: the client is told, messages reach listen() handlers; unsubscribe too; not resubscribed", async () => {
    const a = await opened(client(gw, "dave"));
    const got = [];
    a.listen("inbox.dave", (data, msg) => got.push([msg.topic, data]));
    // The namespace is server-subscribed only: the client itself may not.
    await assert.rejects(a.subscribe("inbox.dave"), { code: "forbidden" });

    const subscribed = nextEvent(a, "subscribed");
    const res = await api("/api/subscribe", { session: a.welcome.session, topics: ["inbox.dave", "room.news"] });
    assert.equal(res.status, 200, res.body);
    assert.equal(res.json.ok, true);
    const info = await subscribed;
    assert.equal(info.server, true);
    assert.deepEqual([...info.topics].sort(), ["inbox.dave", "room.news"]);
    assert.deepEqual(a.serverTopics().sort(), ["inbox.dave", "room.news"]);
    assert.deepEqual(a.topics(), [], "not the client's own subscriptions");

    assert.equal((await publish("inbox.dave", { n: 1 })).status, 200);
    await waitFor(() => got.length === 1, { what: "the message on the server-made subscription" });
    assert.deepEqual(got[0], ["inbox.dave", { n: 1 }]);
    // A presence topic subscribed by the server counts the connection in.
    assert.ok(sessions(await a.presence("room.news")).includes(a.welcome.session));

    const unsubscribed = nextEvent(a, "unsubscribed");
    const res2 = await api("/api/unsubscribe", { session: a.welcome.session, topics: ["inbox.dave"] });
    assert.equal(res2.status, 200, res2.body);
    assert.deepEqual(await unsubscribed, { topics: ["inbox.dave"], server: true });
    assert.deepEqual(a.serverTopics(), ["room.news"]);
    assert.equal((await publish("inbox.dave", { n: 2 })).status, 200);
    await sleep(300);
    assert.equal(got.length, 1, "nothing after the server unsubscribed");

    // API-made subscriptions end with the connection, and the client does not make them
    // its own on reconnect.
    const reopened = nextEvent(a, "open");
    a._ws.close(4999, "test: drop the connection"); // dropped from this side
    await reopened;
    assert.deepEqual(a.serverTopics(), []);
    assert.deepEqual(a.topics(), []);
    assert.ok(!sessions(await a.presence("room.news")).includes(a.welcome.session), "not back in room.news");
  });

  test("the token's topics claim: subscribed by the server after welcome, again after a reconnect", async () => {
    const events = [];
    const got = [];
    const c = client(gw, "erin", { topics: ["inbox.erin"] });
    c.on("subscribed", (i) => events.push(i));
    c.listen("inbox.erin", (d) => got.push(d));
    await opened(c);
    await waitFor(() => events.length === 1, { what: "subscribed after welcome" });
    assert.deepEqual(events[0].topics, ["inbox.erin"]);
    assert.equal(events[0].server, true);
    assert.equal((await publish("inbox.erin", "hello erin")).status, 200);
    await waitFor(() => got.includes("hello erin"));

    const reopened = nextEvent(c, "open");
    c._ws.close(4999, "test: drop the connection");
    await reopened;
    await waitFor(() => events.length === 2, { what: "subscribed again on the new connection" });
    assert.deepEqual(c.serverTopics(), ["inbox.erin"]);
    assert.equal((await publish("inbox.erin", "still here")).status, 200);
    await waitFor(() => got.includes("still here"));
  });

  test("server API disconnect: 4010 with its reason, the client stops (kicked); reconnectOnKick comes back", async () => {
    const topic = nextRoom();
    const watcher = await opened(client(gw, "watcher"));
    await watcher.subscribe(topic);
    const f = await opened(client(gw, "frank"));
    await f.subscribe(topic);
    const disconnects = [];
    f.on("disconnect", (i) => disconnects.push(i));
    const closed = nextEvent(f, "closed");
    const left = nextEvent(watcher, "leave");
    const res = await api("/api/disconnect", { user: "frank", code: 4010, reason: "removed by a moderator" });
    assert.equal(res.status, 200, res.body);
    assert.equal(res.json.ok, true);
    const info = await closed;
    assert.equal(info.code, 4010);
    assert.equal(info.reason, "removed by a moderator");
    assert.equal(info.kicked, true);
    assert.equal(f.closeInfo.kicked, true);
    assert.equal((await left).user, "frank", "the others see the kicked one leave");
    await sleep(1000);
    assert.equal(f.state, "closed", "no reconnect after a kick");
    assert.equal(disconnects.length, 1);
    await assert.rejects(f.presence(topic), { code: "closed" });

    // By session, with the option to come back.
    const g = await opened(client(gw, "grace", { reconnectOnKick: true }));
    const first = g.welcome.session;
    const reconnecting = nextEvent(g, "reconnecting");
    const res2 = await api("/api/disconnect", { session: first });
    assert.equal(res2.status, 200, res2.body);
    assert.equal((await reconnecting).code, 4010);
    await nextEvent(g, "open");
    assert.notEqual(g.welcome.session, first);
  });
});

describe("presence across two nodes on one Redis", { skip }, () => {
  let n1;
  let n2;
  let redis;
  const api = (gw, path, body) => gw.api(path, body, { apiKey: API_KEY });

  before(async () => {
    redis = await startRedis();
    const common = ["--redis-url", redis.url, "--config", presenceConfig(), "--jwt-secret", SECRET, "--api-key", API_KEY];
    n1 = await startGateway({ name: "node-1", args: ["--node-id", "node-1", ...common] });
    n2 = await startGateway({ name: "node-2", args: ["--node-id", "node-2", ...common] });
  });
  after(async () => {
    for (const c of clients) c.close();
    await stopAll();
    await redis?.stop();
  });

  test("clients on two nodes see each other, join/leave cross nodes, the server API reaches the other node", async () => {
    const topic = "room.cluster";
    const a = await opened(client(n1, "alice"));
    const b = await opened(client(n2, "bob"));
    await a.subscribe(topic);
    const joined = nextEvent(a, "join");
    await b.subscribe(topic);
    assert.deepEqual(await joined, { topic, session: b.welcome.session, user: "bob" });
    const list = await a.presence(topic);
    assert.deepEqual(
      list.map((e) => [e.user, e.node]).sort(),
      [
        ["alice", "node-1"],
        ["bob", "node-2"],
      ],
    );
    assert.deepEqual(await b.presenceStats(topic), { clients: 2, users: 2 });

    // Subscribed through node 1's API, delivered on node 2.
    const got = [];
    b.listen("inbox.bob", (d) => got.push(d));
    const subscribed = nextEvent(b, "subscribed");
    assert.equal((await api(n1, "/api/subscribe", { user: "bob", topics: ["inbox.bob"] })).status, 200);
    assert.deepEqual((await subscribed).topics, ["inbox.bob"]);
    const res = await n1.publish("inbox.bob", "across", { headers: { authorization: `Bearer ${API_KEY}` } });
    assert.equal(res.status, 200, res.body);
    await waitFor(() => got.includes("across"), { what: "the message on node 2" });

    // Kicked through node 1's API while on node 2: 4010, stays closed; alice sees bob leave.
    const bobSession = b.welcome.session;
    const left = nextEvent(a, "leave");
    const closed = nextEvent(b, "closed");
    assert.equal((await api(n1, "/api/disconnect", { user: "bob" })).status, 200);
    const info = await closed;
    assert.equal(info.code, 4010);
    assert.equal(info.kicked, true);
    assert.deepEqual(await left, { topic, session: bobSession, user: "bob" });
    await sleep(500);
    assert.equal(b.state, "closed");
    assert.deepEqual(
      (await a.presence(topic)).map((e) => e.user),
      ["alice"],
    );
  });
});
