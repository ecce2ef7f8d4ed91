// End-to-end resume in headless Chromium: the demo page's chat room on a stream topic
// (`chat:*` made a stream by a `--config` file), two nodes sharing a private Redis.
//
// A backend publishes steadily to the chat through node 2 (HTTP API) while the page sits
// on node 1. Node 1 is drained (SIGTERM: the page gets 1001) and then killed (SIGKILL);
// the page moves to node 2 and resumes with `since`. Every publication must be on the
// page exactly once, in seq order, with no "resync needed" line.
//
// Needs the gateway's --config and the Redis brokers' stream support; skipped (with the
// reason) by a build without --config.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { chromium } from "playwright-core";
import { artifacts, gatewayHelp, sleep, startGateway, startRedis, stopAll, streamConfig, waitFor, within } from "./helpers.js";

const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const help = gatewayHelp();
const skip = !help.includes("--config")
  ? "this wsgate build has no --config (streams cannot be configured)"
  : !help.includes("--demo")
    ? "this wsgate build has no --demo page"
    : false;

let browser;
let redis;
const consoleLines = [];

before(async () => {
  if (skip) return;
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} missing: apt-get install -y --no-install-recommends chromium (test/run.sh does it)`);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  await browser?.close();
  await stopAll();
  await redis?.stop();
});

const demo = (page, fn) => page.evaluate(fn);

test("page subscribed to a stream, its node drained and killed: no message lost on the page (every seq once, in order)", { skip, timeout: 120000 }, async () => {
  redis = await startRedis();
  const common = ["--redis-url", redis.url, "--config", streamConfig(), "--demo", "--drain-timeout", "5s"];
  const n1 = await startGateway({ name: "node-1", args: ["--node-id", "node-1", ...common] });
  const n2 = await startGateway({ name: "node-2", args: ["--node-id", "node-2", ...common] });
  const topic = "chat:resume-e2e";

  const page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
  page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
  let stop = false;
  let backend = Promise.resolve();
  const published = []; // seqs answered by the gateway, in order
  try {
    // Some history first: the page shows it, then subscribes from right after it.
    const earlier = [];
    for (let i = 1; i <= 3; i++) {
      const res = await n2.publish(topic, { name: "backend", text: `earlier ${i}`, n: i });
      assert.equal(res.status, 200, res.body);
      earlier.push(JSON.parse(res.body).seq);
    }
    await page.goto(`${n1.httpUrl}/?nodes=${n1.wsUrl},${n2.wsUrl}&name=watcher&chat=${encodeURIComponent(topic)}`);
    await waitFor(async () => (await demo(page, () => document.body.dataset.state)) === "open" && (await page.locator("#node").textContent()) === "node-1", {
      timeoutMs: 20000,
      what: "page open on node-1",
    });
    await waitFor(() => demo(page, () => window.wsgateDemo.chat.joined), { what: "chat joined" });
    assert.equal(await demo(page, () => window.wsgateDemo.chat.stream), true, "the chat topic is a stream");
    assert.deepEqual(await demo(page, () => window.wsgateDemo.chat.seqs), earlier, "the history is on the page");

    // The backend: one publication every 20 ms through node 2, numbered.
    published.push(...earlier);
    let n = earlier.length;
    backend = (async () => {
      while (!stop) {
        n++;
        const res = await n2.publish(topic, { name: "backend", text: `message ${n}`, n });
        assert.equal(res.status, 200, res.body);
        published.push(JSON.parse(res.body).seq);
        await sleep(20);
      }
    })();
    const seen = () => demo(page, () => window.wsgateDemo.chat.seqs.length);
    await waitFor(async () => (await seen()) >= earlier.length + 25, { what: "25 live messages on node-1" });
    await page.screenshot({ path: path.join(artifacts(), "streams-before-drain.png") });

    // The page's jitter after a 1001 is random in 0..1 s; pinned near 1 s (the client's
    // jitter source) so that the backend surely publishes while the page is away.
    await demo(page, () => {
      window.wsgateDemo.client._random = () => 0.99;
    });
    // Drain node 1 (the page gets 1001 and leaves), then kill it for good.
    n1.kill("SIGTERM");
    await waitFor(() => demo(page, () => window.wsgateDemo.client.welcome?.node !== "node-1"), { timeoutMs: 10000, what: "page left node-1" });
    const left = published.length;
    n1.kill("SIGKILL");
    await within(n1.exited, 10000, "node-1 killed");
    await waitFor(async () => (await demo(page, () => document.body.dataset.state)) === "open" && (await page.locator("#node").textContent()) === "node-2", {
      timeoutMs: 20000,
      what: "page open on node-2",
    });
    const moved = published.length;
    assert.ok(moved - left >= 10, `published while the page was away: ${moved - left}`);
    await waitFor(() => published.length >= moved + 25, { what: "25 more publications after the move" });
    stop = true;
    await backend;

    await waitFor(async () => (await seen()) >= published.length, { timeoutMs: 15000, what: `all ${published.length} publications on the page` });
    await sleep(300); // anything extra (a duplicate) would show up now
    const seqs = await demo(page, () => window.wsgateDemo.chat.seqs);
    const first = published[0];
    assert.deepEqual(
      published,
      published.map((_, i) => first + i),
      "the backend's publications are consecutive",
    );
    assert.deepEqual(seqs, published, "every seq once, in order, on the page");
    assert.deepEqual(await demo(page, () => window.wsgateDemo.chat.resyncs), [], "no resync needed");
    assert.equal(await page.locator("#chat-log li.resync").count(), 0);
    const lastText = await page.locator("#chat-log li").last().textContent();
    assert.match(lastText, new RegExp(`message ${n}\\b`));
    const events = await page.locator("#event-log").textContent();
    assert.match(events, /1001/, "the page saw the going-away close");
    assert.match(events, /chat resumes after #\d+/);
    await page.screenshot({ path: path.join(artifacts(), "streams-after-drain.png") });
    const errors = consoleLines.filter((l) => /pageerror|error:/.test(l) && !/WebSocket connection to .* failed/.test(l));
    assert.deepEqual(errors, [], "no page errors");
  } catch (err) {
    const state = await page
      .evaluate(() => ({
        seqs: window.wsgateDemo.chat.seqs.join(","),
        resyncs: window.wsgateDemo.chat.resyncs,
        position: window.wsgateDemo.client.position(window.wsgateDemo.chatTopic),
        duplicates: window.wsgateDemo.client.duplicates,
        events: document.getElementById("event-log").textContent,
      }))
      .catch((e) => `(page state unavailable: ${e.message})`);
    err.message += `\n--- page ---\n${JSON.stringify(state, null, 1)}\n--- published ---\n${published.join(",")}`;
    err.message += `\n--- browser console ---\n${consoleLines.join("\n")}\n--- node-2 log (tail) ---\n${n2.log.slice(-3000)}`;
    throw err;
  } finally {
    stop = true;
    await backend.catch(() => {});
    await page.close();
  }
});
