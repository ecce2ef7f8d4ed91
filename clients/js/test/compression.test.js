// permessage-deflate against a real gateway, with the `ws` package's own client (not
// this repository's): a compressing client and one with compression off subscribe to
// one topic; both receive intact what the HTTP API and the compressing client publish,
// and the gateway reports compressed bytes.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { startGateway, stopAll, waitFor } from "./helpers.js";

/**
 * Opens `url` with `options`; resolves with the socket, a queue of parsed frames and
 * the response's Sec-WebSocket-Extensions ("" without one).
 */
function open(url, options) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, options);
    const frames = [];
    let offered = null;
    ws.once("upgrade", (res) => {
      offered = res.headers["sec-websocket-extensions"] ?? "";
    });
    ws.on("message", (data) => frames.push(JSON.parse(data.toString())));
    ws.once("open", () => resolve({ ws, frames, accepted: offered }));
    ws.once("error", reject);
  });
}

/** The first queued frame with `op` (waiting up to 5 s), removed from the queue. */
async function nextOp(client, op) {
  return waitFor(
    () => {
      const i = client.frames.findIndex((f) => f.op === op);
      return i >= 0 ? client.frames.splice(i, 1)[0] : null;
    },
    { timeoutMs: 5000, what: `an '${op}' frame` },
  );
}

describe("permessage-deflate (ws package)", () => {
  let gw;
  before(async () => {
    gw = await startGateway({ name: "deflate" });
  });
  after(stopAll);

  test("compressed and uncompressed subscribers of one topic both get intact messages", async () => {
    const z = await open(gw.wsUrl, { perMessageDeflate: { threshold: 0 } });
    const p = await open(gw.wsUrl, { perMessageDeflate: false });
    try {
      assert.equal(z.ws.extensions, "permessage-deflate");
      assert.equal(z.accepted, "permessage-deflate; server_no_context_takeover; client_no_context_takeover");
      assert.equal(p.ws.extensions, "");
      assert.equal(p.accepted, "");
      for (const c of [z, p]) {
        await nextOp(c, "welcome");
        c.ws.send(JSON.stringify({ op: "subscribe", id: 1, topics: ["js.z"] }));
        await nextOp(c, "subscribed");
      }
      const data = { rows: Array.from({ length: 60 }, (_, i) => ({ i, name: `row ${i}`, ok: true })) };
      const res = await fetch(`${gw.httpUrl}/api/publish`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ topic: "js.z", data }),
      });
      assert.equal(res.status, 200);
      for (const c of [z, p]) assert.deepEqual((await nextOp(c, "message")).data, data);
      // The client compresses what it sends (threshold 0): inflated by the gateway.
      const mine = { text: "compressed by the client ".repeat(40) };
      z.ws.send(JSON.stringify({ op: "publish", id: 2, topic: "js.z", data: mine }));
      for (const c of [z, p]) assert.deepEqual((await nextOp(c, "message")).data, mine);
      const metrics = await (await fetch(`${gw.adminUrl}/metrics`)).text();
      const out = Number(/^wsgate_compression_bytes_out_total (\S+)$/m.exec(metrics)?.[1] ?? 0);
      const inn = Number(/^wsgate_compression_bytes_in_total (\S+)$/m.exec(metrics)?.[1] ?? 0);
      assert.ok(out > 0 && out < inn / 2, `compressed ${inn} bytes into ${out}`);
    } finally {
      z.ws.terminate();
      p.ws.terminate();
    }
  });
});
