// End-to-end: the demo page in headless Chromium (Debian's `chromium`, driven by
// playwright-core) against real gateway processes.
//
// Two nodes share a private Redis (`--redis-url`); the two pages start on different
// nodes, a chat message crosses nodes, then one node drains (SIGTERM -> 1001) and its page
// reconnects to the other node and keeps receiving.
//
// The pages come from the gateway itself (`--demo`: `/` and `/wsgate.js`, plus its demo
// ticker). A build without `--demo` gets the same two files from static-server.js and the
// ticker fed through the HTTP API from here.
//
// Screenshots land in test-artifacts/ at the repository root.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { chromium } from "playwright-core";
import { artifacts, gatewayHelp, sleep, startGateway, startRedis, stopAll, waitFor, within } from "./helpers.js";
import { startStaticServer } from "./static-server.js";

const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const help = gatewayHelp();
const hasDemo = help.includes("--demo");

let browser;
let redis;
let staticServer;
const consoleLines = [];

before(async () => {
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
  await staticServer?.close();
});

async function openPage(origin, nodes, name) {
  const page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
  page.on("console", (m) => consoleLines.push(`[${name}] ${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`[${name}] pageerror: ${e.message}`));
  await page.goto(`${origin}/?nodes=${nodes.join(",")}&name=${name}`);
  return page;
}

const text = (page, sel) => page.locator(sel).textContent();
const state = (page) => page.evaluate(() => document.body.dataset.state);

async function waitNode(page, node, what) {
  await waitFor(async () => (await state(page)) === "open" && (await text(page, "#node")) === node, {
    timeoutMs: 20000,
    what: `${what} open on ${node}`,
  });
}

async function say(page, message) {
  await page.fill("#chat-input", message);
  await page.press("#chat-input", "Enter");
}

async function sees(page, message, what) {
  await waitFor(async () => (await text(page, "#chat-log")).includes(message), { timeoutMs: 10000, what });
}

/** The names in a page's member list ("In the room"), sorted. */
const members = (page) => page.evaluate(() => window.wsgateDemo.members.map((m) => m.name));

/** Waits until the page's member list is exactly `names` (and says how many). */
async function membersAre(page, names, what) {
  const want = [...names].sort();
  try {
    await waitFor(async () => JSON.stringify(await members(page)) === JSON.stringify(want) && (await text(page, "#member-count")) === String(want.length), {
      timeoutMs: 15000,
      what,
    });
  } catch (err) {
    err.message += `; the list shows ${JSON.stringify(await members(page))}`;
    throw err;
  }
}

test(
  "two nodes + Redis: chat crosses nodes; a drained node's page moves to the other node and keeps receiving",
  { timeout: 120000 },
  async () => {
    const common = ["--drain-timeout", "2s", ...(hasDemo ? ["--demo"] : [])];
    redis = await startRedis();
    const redisArgs = ["--redis-url", redis.url];
    const n1 = await startGateway({ name: "node-1", args: ["--node-id", "node-1", ...redisArgs, ...common] });
    const n2 = await startGateway({ name: "node-2", args: ["--node-id", "node-2", ...redisArgs, ...common] });
    let origin1 = n1.httpUrl;
    let origin2 = n2.httpUrl;
    if (!hasDemo) {
      staticServer = await startStaticServer();
      origin1 = origin2 = staticServer.url;
    }

    try {
      // Each page lists both nodes, its own first: reconnects move on to the other one.
      const alice = await openPage(origin1, [n1.wsUrl, n2.wsUrl], "alice");
      const bob = await openPage(origin2, [n2.wsUrl, n1.wsUrl], "bob");
      await waitNode(alice, "node-1", "alice");
      await waitNode(bob, "node-2", "bob");

      // The pages subscribe on load; the chat subscription is confirmed before sending
      // (a subscribe the gateway keeps refusing as `unavailable` is retried forever: say so).
      const subscribed = async (page, who) => {
        try {
          await within(page.evaluate(() => window.wsgateDemo.client.subscribe(window.wsgateDemo.chatTopic)), 15000, `${who} subscribes to the chat`);
        } catch (err) {
          const log = await page.locator("#event-log li").allTextContents();
          err.message += `\n--- ${who}'s event log (tail) ---\n${log.slice(-5).join("\n")}`;
          throw err;
        }
      };
      await subscribed(alice, "alice");
      await subscribed(bob, "bob");
      if (hasDemo) {
        // `--demo` alone makes the chat room a stream: numbered, resumed after reconnects.
        await waitFor(() => alice.evaluate(() => window.wsgateDemo.chat.joined), { what: "alice joined the chat" });
        assert.equal(await alice.evaluate(() => window.wsgateDemo.chat.stream), true, "the demo chat is a stream");
      }
      await say(alice, "hello from alice");
      await sees(bob, "hello from alice", "bob sees alice's message");
      await sees(alice, "hello from alice", "alice sees her own message");
      assert.match(await text(bob, "#chat-log"), /via node-1/, "published on node 1, received on node 2");
      await say(bob, "hi alice, bob here");
      await sees(alice, "hi alice, bob here", "alice sees bob's reply");
      if (hasDemo) {
        // Who is in the room (presence with join/leave, on with --demo): both pages on
        // both lists, across the two nodes, named after their messages.
        await membersAre(alice, ["alice (you)", "bob"], "alice's member list shows alice and bob");
        await membersAre(bob, ["alice", "bob (you)"], "bob's member list shows alice and bob");
        const sessions = await Promise.all([alice, bob].map((p) => p.evaluate(() => window.wsgateDemo.client.welcome.session)));
        const listed = await alice.evaluate(() => window.wsgateDemo.members.map((m) => m.session));
        assert.deepEqual(listed.sort(), sessions.sort(), "the list is the two pages' connections");
      }

      // Ticker: the gateway's demo ticker, or (without --demo) the HTTP API from here.
      const feeder = hasDemo
        ? null
        : setInterval(() => {
            for (const gw of [n1, n2]) if (gw.exitCode === null) gw.publish("demo.ticker", { symbol: "ACME", price: 100 + Math.random() * 5, node: gw.name }).catch(() => {});
          }, 250);
      try {
        await waitFor(async () => (await alice.locator("#ticker tbody tr").count()) > 0, { timeoutMs: 10000, what: "ticker rows on alice" });
        await waitFor(async () => Number(await text(alice, "#rate")) > 0, { what: "messages/s > 0" });
        await alice.screenshot({ path: path.join(artifacts(), "demo-alice-before-drain.png") });

        // Drain node 1: its page gets 1001 and moves to node 2.
        const before = await alice.evaluate(() => window.wsgateDemo.total);
        n1.kill("SIGTERM");
        await waitNode(alice, "node-2", "alice after the drain");
        assert.equal(await n1.exited, 0, "node 1 drained and exited 0");
        const events = await text(alice, "#event-log");
        assert.match(events, /1001/, "the page saw the going-away close");
        assert.equal(await text(alice, "#reconnects"), "1");

        // Still receiving on the new node: chat both ways, and the ticker.
        await alice.evaluate(() => window.wsgateDemo.client.subscribe(window.wsgateDemo.chatTopic));
        await say(bob, "still there?");
        await sees(alice, "still there?", "alice receives after moving to node 2");
        await say(alice, "yes, via node-2 now");
        await sees(bob, "yes, via node-2 now", "bob receives alice's message sent through node 2");
        if (hasDemo) {
          // Alice's new connection replaced her old one on both lists.
          await membersAre(alice, ["alice (you)", "bob"], "alice's member list after her move");
          await membersAre(bob, ["alice", "bob (you)"], "bob's member list after alice's move");
        }
        await waitFor(async () => (await alice.evaluate(() => window.wsgateDemo.total)) > before + 3, { what: "ticker keeps flowing on alice" });
        await sleep(2500); // let the rate and sparklines fill in for the picture
        await alice.screenshot({ path: path.join(artifacts(), "demo-alice.png") });
        await bob.screenshot({ path: path.join(artifacts(), "demo-bob.png") });
      } finally {
        if (feeder) clearInterval(feeder);
      }
      const errors = consoleLines.filter((l) => /pageerror|error:/.test(l) && !/WebSocket connection to .* failed/.test(l));
      assert.deepEqual(errors, [], "no page errors");
    } catch (err) {
      err.message += `\n--- browser console ---\n${consoleLines.join("\n")}`;
      throw err;
    }
  },
);
