// Server-Sent Events in headless Chromium (docs/protocol.md, "Server-Sent Events").
//
// 1. The browser's own EventSource on `/sse` of a stream topic, its node killed (SIGKILL)
//    and another node (same Redis) started on the same address: the browser's automatic
//    reconnect sends Last-Event-ID and the stream resumes with every seq exactly once.
// 2. The JS client with WebSockets failing (its ws URL refuses connections) falls back to
//    SSE by itself (`client.transport === "sse"`), receives, subscribes to more topics,
//    says clearly that presence is not available, and moves back to WebSocket once
//    WebSockets work (a gateway now listens at the ws URL).

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { after, before, test } from "node:test";
import { chromium } from "playwright-core";
import { freePort, gatewayHelp, sleep, startGateway, startRedis, stopAll, streamConfig, waitFor, within } from "./helpers.js";
import { startStaticServer } from "./static-server.js";

const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const help = gatewayHelp();
const skip = !help.includes("--config") ? "this wsgate build has no --config (streams cannot be configured)" : false;

let browser;
let redis;
let web;
const consoleLines = [];

before(async () => {
  if (skip) return;
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} missing: apt-get install -y --no-install-recommends chromium (test/run.sh does it)`);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  web = await startStaticServer();
});

after(async () => {
  await browser?.close();
  await web?.close();
  await stopAll();
  await redis?.stop();
});

async function newPage() {
  const page = await browser.newPage();
  page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
  // A page of another origin than the gateways': /sse answers with CORS.
  await page.goto(`${web.url}/wsgate.js`);
  return page;
}

test("EventSource resumes a stream with Last-Event-ID on another node: every seq once, in order", { skip, timeout: 120000 }, async () => {
  redis ??= await startRedis();
  const common = ["--redis-url", redis.url, "--config", streamConfig(), "--heartbeat-interval", "2s"];
  const port = await freePort();
  const n1 = await startGateway({ name: "sse-node-1", port, args: ["--node-id", "sse-node-1", ...common] });
  const backendNode = await startGateway({ name: "sse-backend", args: ["--node-id", "sse-backend", ...common] });
  const topic = "chat:sse-e2e";
  const page = await newPage();
  let stop = false;
  let backend = Promise.resolve();
  const published = [];
  let n3;
  try {
    await page.evaluate(
      ({ url }) => {
        window.got = { seqs: [], ids: [], opens: 0, welcomes: [], subscribed: [] };
        const es = new EventSource(url);
        window.es = es;
        es.onopen = () => window.got.opens++;
        es.onmessage = (ev) => {
          const m = JSON.parse(ev.data);
          if (m.op === "welcome") window.got.welcomes.push(m.node);
          if (m.op === "subscribed") window.got.subscribed.push(m);
          if (m.op === "message") {
            window.got.seqs.push(m.seq);
            window.got.ids.push(ev.lastEventId);
          }
        };
      },
      { url: `${n1.httpUrl}/sse?topics=${encodeURIComponent(topic)}` },
    );
    await waitFor(() => page.evaluate(() => window.got.subscribed.length === 1), { what: "subscribed on node 1" });
    backend = (async () => {
      let i = 0;
      while (!stop) {
        i++;
        const res = await backendNode.publish(topic, { i });
        assert.equal(res.status, 200, res.body);
        published.push(JSON.parse(res.body).seq);
        await sleep(20);
      }
    })();
    await waitFor(() => page.evaluate(() => window.got.seqs.length >= 20), { what: "20 messages on node 1" });
    const ids = await page.evaluate(() => window.got.ids);
    assert.ok(ids.every((id) => id.startsWith("v1.")), "stream messages carry ids");

    // Node 1 dies; node 3 (same Redis) takes its address.
    n1.kill("SIGKILL");
    await within(n1.exited, 10000, "node 1 killed");
    const gone = published.length;
    await waitFor(() => published.length >= gone + 15, { what: "publications while no node serves the address" });
    n3 = await startGateway({ name: "sse-node-3", port, args: ["--node-id", "sse-node-3", ...common] });
    await waitFor(() => page.evaluate(() => window.got.welcomes.includes("sse-node-3")), { timeoutMs: 30000, what: "the browser reconnected to node 3" });
    const moved = published.length;
    await waitFor(() => published.length >= moved + 20, { what: "20 more publications" });
    stop = true;
    await backend;
    await waitFor(async () => (await page.evaluate(() => window.got.seqs.length)) >= published.length, { timeoutMs: 15000, what: `all ${published.length} publications in the page` });
    await sleep(300);
    const got = await page.evaluate(() => window.got);
    assert.deepEqual(got.seqs, published, "every seq once, in order");
    const resumed = got.subscribed[got.subscribed.length - 1];
    assert.equal(resumed.streams[topic].recovered, true, JSON.stringify(resumed));
    assert.deepEqual(got.welcomes, ["sse-node-1", "sse-node-3"]);
  } catch (err) {
    err.message += `\n--- browser console ---\n${consoleLines.join("\n")}\n--- node 3 log (tail) ---\n${n3?.log.slice(-3000) ?? ""}`;
    throw err;
  } finally {
    stop = true;
    await backend.catch(() => {});
    await page.close();
  }
});

test("the JS client falls back to SSE when WebSockets fail, and back when they work", { skip, timeout: 120000 }, async () => {
  const gw = await startGateway({ name: "sse-fallback", args: ["--node-id", "sse-fallback", "--config", streamConfig(), "--heartbeat-interval", "2s"] });
  // Nothing listens at the WebSocket URL (as when a proxy breaks WebSockets).
  const wsPort = await freePort();
  const page = await newPage();
  try {
    await page.evaluate(
      async ({ wsUrl, sseUrl }) => {
        const { connect } = await import("/wsgate.js");
        window.got = { news: [], chat: [], transports: [] };
        const client = connect(wsUrl, { sseUrl, backoffInitialMs: 100, wsRetryMs: 1500, connectTimeoutMs: 3000 });
        window.client = client;
        client.on("transport", (i) => window.got.transports.push(i.transport));
        client.subscribe("news", (d) => window.got.news.push(d));
      },
      { wsUrl: `ws://127.0.0.1:${wsPort}/ws`, sseUrl: `${gw.httpUrl}/sse` },
    );
    await waitFor(() => page.evaluate(() => window.client.state === "open"), { timeoutMs: 20000, what: "client open" });
    assert.equal(await page.evaluate(() => window.client.transport), "sse");
    assert.equal(await page.evaluate(() => window.client.welcome.node), "sse-fallback");
    await page.evaluate(() => window.client.subscribe("news"));
    for (let i = 1; i <= 3; i++) assert.equal((await gw.publish("news", { i })).status, 200);
    await waitFor(() => page.evaluate(() => window.got.news.length === 3), { what: "3 news over SSE" });
    assert.deepEqual(await page.evaluate(() => window.got.news), [{ i: 1 }, { i: 2 }, { i: 3 }]);

    // One more topic: the stream is reopened with both, the plain one kept.
    await page.evaluate(() => window.client.subscribe("chat:fb", (d) => window.got.chat.push(d)));
    assert.equal(await page.evaluate(() => window.client.position("chat:fb")?.seq), 0);
    for (let i = 1; i <= 3; i++) assert.equal((await gw.publish("chat:fb", { i })).status, 200);
    assert.equal((await gw.publish("news", { i: 4 })).status, 200);
    await waitFor(() => page.evaluate(() => window.got.chat.length === 3 && window.got.news.length === 4), { what: "chat and news over SSE" });
    assert.equal(await page.evaluate(() => window.client.position("chat:fb")?.seq), 3);

    // What SSE cannot do is said clearly.
    const presence = await page.evaluate(() => window.client.presence("news").then(() => "ok", (e) => `${e.code}: ${e.message}`));
    assert.match(presence, /^unsupported: .*Server-Sent Events/);
    const pub = await page.evaluate(() => window.client.publish("news", 1).then(() => "ok", (e) => `${e.code}: ${e.message}`));
    assert.match(pub, /^unsupported: .*HTTP API/);

    // WebSockets work again (a gateway at the ws URL): the client moves back, and the
    // stream resumes there from its position.
    const wsGw = await startGateway({ name: "ws-back", port: wsPort, args: ["--node-id", "ws-back", "--config", streamConfig()] });
    await waitFor(() => page.evaluate(() => window.client.transport === "websocket" && window.client.state === "open"), { timeoutMs: 20000, what: "back on WebSocket" });
    assert.equal(await page.evaluate(() => window.client.welcome.node), "ws-back");
    assert.deepEqual(await page.evaluate(() => window.got.transports), ["sse", "websocket"]);
    assert.equal((await wsGw.publish("news", { i: 5 })).status, 200);
    await waitFor(() => page.evaluate(() => window.got.news.length === 5), { what: "news over WebSocket" });
    const errors = consoleLines.filter((l) => /pageerror/.test(l));
    assert.deepEqual(errors, [], "no page errors");
  } catch (err) {
    err.message += `\n--- browser console ---\n${consoleLines.join("\n")}`;
    throw err;
  } finally {
    await page.close();
  }
});
