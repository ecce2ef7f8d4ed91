// Tokens against a real gateway with JWT auth (HS256 `--jwt-secret`): the `refresh` op
// before `exp`, the 1008 close at expiry, and the token callback on reconnects.

import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { connect } from "../wsgate.js";
import { nextEvent, sleep, startGateway, stopAll, waitFor } from "./helpers.js";

const SECRET = "wsgate-js-client-test-secret";

/** An HS256 JWT valid for `ttlS` seconds. */
function mint({ sub = "alice", ttlS = 60, subscribe = ["**"], publish = ["**"] } = {}) {
  const b64url = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const body = `${b64url({ alg: "HS256", typ: "JWT" })}.${b64url({ sub, exp: Math.floor(Date.now() / 1000) + ttlS, subscribe, publish })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

const clients = [];
function client(url, opts = {}) {
  const c = connect(url, { WebSocket, backoffInitialMs: 100, backoffMaxMs: 500, ...opts });
  c.on("error", () => {});
  clients.push(c);
  return c;
}

describe("with JWT auth", () => {
  let gw;
  before(async () => {
    // No leeway: the connection closes right at `exp`.
    gw = await startGateway({ name: "auth", args: ["--jwt-secret", SECRET, "--jwt-leeway", "0s"] });
  });
  after(async () => {
    for (const c of clients) c.close();
    await stopAll();
  });

  test("the refresh op keeps a connection alive past its first token's exp", async () => {
    let minted = 0;
    const c = client(gw.wsUrl, { token: mint({ ttlS: 3 }), getToken: async () => (minted++, mint({ ttlS: 3 })), refreshMarginMs: 2000 });
    await nextEvent(c, "open");
    const session = c.welcome.session;
    const got = [];
    await c.subscribe("auth.news", (d) => got.push(d));
    const closes = [];
    c.on("disconnect", (i) => closes.push(i.code));
    await sleep(5000);
    assert.deepEqual(closes, [], "no close: the token was refreshed in time");
    assert.equal(c.state, "open");
    assert.equal(c.welcome.session, session, "same connection");
    assert.ok(minted >= 2, `refreshed ${minted} times`);
    assert.equal((await gw.publish("auth.news", "still here")).status, 200);
    await waitFor(() => got.includes("still here"));
  });

  test("expiry without a token callback: 1008 stops the client; setToken() reconnects and resubscribes", async () => {
    const c = client(gw.wsUrl, { token: mint({ ttlS: 2 }) });
    await nextEvent(c, "open");
    const got = [];
    await c.subscribe("auth.expiring", (d) => got.push(d));
    const closed = await nextEvent(c, "closed", 10000);
    assert.equal(closed.code, 1008);
    assert.equal(c.state, "closed");
    await sleep(500);
    assert.equal(c.state, "closed", "no reconnect with the same token");

    c.setToken(mint({ ttlS: 60 }));
    await nextEvent(c, "open");
    await c.subscribe("auth.expiring");
    assert.equal((await gw.publish("auth.expiring", "back")).status, 200);
    await waitFor(() => got.includes("back"));
  });

  test("1008 then a new token from the callback: reconnects by itself", async () => {
    const first = mint({ ttlS: 2 });
    let expired = false;
    // The callback has nothing newer until the connection actually closed.
    const c = client(gw.wsUrl, { token: first, getToken: async () => (expired ? mint({ ttlS: 60 }) : first) });
    await nextEvent(c, "open");
    c.on("disconnect", () => (expired = true));
    const codes = [];
    c.on("disconnect", (i) => codes.push(i.code));
    await waitFor(() => codes.includes(1008), { timeoutMs: 10000, what: "1008 at expiry" });
    await waitFor(() => c.state === "open", { timeoutMs: 10000, what: "reconnect with the new token" });
    assert.equal(c.reconnects, 1);
  });

  test("a refused token (HTTP 401 before the upgrade) is replaced by the callback on the next attempt", async () => {
    const tokens = ["not-a-valid-token", mint({ ttlS: 60 })];
    const c = client(gw.wsUrl, { getToken: async () => tokens.shift() ?? mint({ ttlS: 60 }) });
    const disconnects = [];
    c.on("disconnect", (i) => disconnects.push(i.code));
    await nextEvent(c, "open", 10000);
    assert.equal(disconnects.length, 1, "one refused attempt");
    assert.equal(c.reconnects, 0, "the first connection that opened");
  });

  test("topic permissions: a subscribe outside the token's claims is forbidden", async () => {
    const c = client(gw.wsUrl, { token: mint({ subscribe: ["public.*"], publish: [] }) });
    await nextEvent(c, "open");
    await c.subscribe("public.news", () => {});
    await assert.rejects(c.subscribe("private.stuff", () => {}), { code: "forbidden" });
    await assert.rejects(c.publish("public.news", 1), { code: "forbidden" });
    assert.deepEqual(c.topics(), ["public.news"]);
  });
});
