// Presence in headless Chromium: the client as loaded by a page (`wsgate --demo` serves
// `/wsgate.js` and the demo page) against one real gateway with presence namespaces
// (helpers.presenceConfig). A Node client comes and goes; the page sees it in
// `presence()`, gets its `join` and `leave`, and the demo's member list follows.
//
// Skipped (with the reason) by a build without --demo or without presence.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { chromium } from "playwright-core";
import WebSocket from "ws";
import { connect } from "../wsgate.js";
import { artifacts, gatewayHelp, nextEvent, presenceConfig, sleep, startGateway, stopAll, waitFor, wsgateBin } from "./helpers.js";

const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const help = gatewayHelp();
const skip = !help.includes("--demo")
  ? "this wsgate build has no --demo page"
  : spawnSync(wsgateBin(), ["check-config", presenceConfig()]).status !== 0
    ? "this wsgate build has no presence namespaces"
    : false;

let browser;
const consoleLines = [];
const nodeClients = [];

before(async () => {
  if (skip) return;
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} missing: apt-get install -y --no-install-recommends chromium (test/run.sh does it)`);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  for (const c of nodeClients) c.close();
  await browser?.close();
  await stopAll();
});

function nodeClient(gw) {
  const c = connect(gw.wsUrl, { WebSocket });
  c.on("error", () => {});
  nodeClients.push(c);
  return c;
}

test("in a browser: presence() lists the page and a Node client, join/leave arrive, the demo's member list follows", { skip, timeout: 90000 }, async () => {
  const gw = await startGateway({ name: "presence-browser", args: ["--node-id", "node-b", "--demo", "--config", presenceConfig()] });
  const chat = "chat:presence-e2e";
  const room = "room.browser";
  const page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
  page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
  try {
    await page.goto(`${gw.httpUrl}/?name=pat&chat=${encodeURIComponent(chat)}`);
    await waitFor(async () => (await page.evaluate(() => document.body.dataset.state)) === "open", { timeoutMs: 20000, what: "page open" });
    await waitFor(() => page.evaluate(() => window.wsgateDemo.chat.joined), { what: "chat joined" });
    const pageSession = await page.evaluate(() => window.wsgateDemo.client.welcome.session);

    // The page's client on a room of its own: presence() and join/leave events.
    const alone = await page.evaluate(async (room) => {
      const c = window.wsgateDemo.client;
      window.presenceLog = [];
      c.on("join", (e) => window.presenceLog.push(["join", e]));
      c.on("leave", (e) => window.presenceLog.push(["leave", e]));
      await c.subscribe(room);
      return c.presence(room);
    }, room);
    assert.deepEqual(alone, [{ session: pageSession, user: null, node: "node-b" }]);

    const visitor = nodeClient(gw);
    await nextEvent(visitor, "open");
    const visitorSession = visitor.welcome.session;
    await visitor.subscribe(room);
    await waitFor(() => page.evaluate(() => window.presenceLog.length >= 1), { what: "join on the page" });
    const both = await page.evaluate((room) => window.wsgateDemo.client.presence(room), room);
    assert.deepEqual(both.map((e) => e.session).sort(), [pageSession, visitorSession].sort());
    assert.deepEqual(await page.evaluate((room) => window.wsgateDemo.client.presenceStats(room), room), { clients: 2, users: 0 });
    await visitor.unsubscribe(room);
    await waitFor(() => page.evaluate(() => window.presenceLog.length >= 2), { what: "leave on the page" });
    assert.deepEqual(await page.evaluate(() => window.presenceLog), [
      ["join", { topic: room, session: visitorSession, user: null }],
      ["leave", { topic: room, session: visitorSession, user: null }],
    ]);
    // A topic without presence: the server's code, as with any other command.
    assert.equal(await page.evaluate(() => window.wsgateDemo.client.presence("plain.x").catch((e) => e.code)), "not_enabled");

    // The demo's member list: the page alone, then the visitor joins the chat and
    // speaks (the list learns its name), then leaves.
    const members = () => page.evaluate(() => window.wsgateDemo.members.map((m) => m.name));
    assert.equal(await page.evaluate(() => window.wsgateDemo.presence.enabled), true, "the demo chat has presence");
    assert.deepEqual(await members(), ["pat (you)"]);
    await visitor.subscribe(chat);
    await waitFor(async () => (await members()).length === 2, { what: "the visitor in the member list" });
    assert.match((await members()).join(","), new RegExp(`guest ${visitorSession.slice(-4)}`));
    await visitor.publish(chat, { name: "visitor", text: "hello from node", ts: Date.now(), from: "node", session: visitorSession });
    await waitFor(async () => (await members()).includes("visitor"), { what: "the visitor named after its message" });
    assert.equal(await page.locator("#member-count").textContent(), "2");
    assert.match(await page.locator("#member-list").textContent(), /visitor/);
    await page.screenshot({ path: path.join(artifacts(), "presence-members.png") });
    visitor.close();
    await waitFor(async () => (await members()).length === 1, { what: "the visitor gone from the member list" });
    assert.match(await page.locator("#event-log").textContent(), /left the chat: visitor/);
    await sleep(100);
    const errors = consoleLines.filter((l) => /pageerror|error:/.test(l) && !/WebSocket connection to .* failed/.test(l));
    assert.deepEqual(errors, [], "no page errors");
  } catch (err) {
    err.message += `\n--- browser console ---\n${consoleLines.join("\n")}\n--- gateway log (tail) ---\n${gw.log.slice(-3000)}`;
    throw err;
  } finally {
    await page.close();
  }
});
