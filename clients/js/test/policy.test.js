// Unit tests of the pure reconnect/token policy functions (no I/O, injected randomness).

import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  DEFAULTS,
  backoffDelay,
  closePolicy,
  decodeJwtPayload,
  reconnectDelay,
  refreshDelay,
  refusalDelay,
  retryHint,
  resolveUrl,
  tokenExpiresAt,
  withToken,
} from "../wsgate.js";

const opts = { backoffInitialMs: 500, backoffMaxMs: 30000, backoffFactor: 2, goingAwayMaxDelayMs: 1000 };
/** A "random" source returning the given values in turn. */
const seq = (...values) => {
  let i = 0;
  return () => values[i++ % values.length];
};
const almostOne = 1 - Number.EPSILON;

function jwt(payload) {
  const b64url = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  return `${b64url({ alg: "HS256", typ: "JWT" })}.${b64url(payload)}.c2lnbmF0dXJl`;
}

describe("backoffDelay (exponential, full jitter)", () => {
  test("the cap doubles per attempt up to the maximum", () => {
    const caps = [0, 1, 2, 3, 4, 5, 6, 7, 20, 1000].map((a) => backoffDelay(a, opts, () => almostOne) + 1);
    assert.deepEqual(caps, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]);
  });

  test("full jitter: the delay is random * cap, anywhere in [0, cap)", () => {
    assert.equal(backoffDelay(3, opts, () => 0), 0);
    assert.equal(backoffDelay(3, opts, () => 0.5), 2000);
    assert.equal(backoffDelay(3, opts, () => 0.25), 1000);
    assert.equal(backoffDelay(10, opts, () => 0.1), 3000);
  });

  test("with Math.random every delay stays within [0, cap) and they spread", () => {
    for (let attempt = 0; attempt < 12; attempt++) {
      const cap = Math.min(30000, 500 * 2 ** attempt);
      const seen = new Set();
      for (let i = 0; i < 200; i++) {
        const d = backoffDelay(attempt, opts);
        assert.ok(d >= 0 && d < cap, `attempt ${attempt}: ${d} not in [0, ${cap})`);
        assert.ok(Number.isInteger(d));
        seen.add(d);
      }
      assert.ok(seen.size > 20, `attempt ${attempt}: delays not spread (${seen.size} distinct)`);
    }
  });

  test("defaults apply when options are missing; negative attempts count as 0", () => {
    assert.equal(backoffDelay(0, {}, () => 0.5), DEFAULTS.backoffInitialMs / 2);
    assert.equal(backoffDelay(-3, {}, () => 0.5), DEFAULTS.backoffInitialMs / 2);
    assert.equal(backoffDelay(99, {}, () => 0.5), DEFAULTS.backoffMaxMs / 2);
  });
});

describe("closePolicy (what a close code means for reconnecting)", () => {
  test("1001 going away and 1012 service restart: reconnect soon, jittered", () => {
    assert.equal(closePolicy(1001), "jitter");
    assert.equal(closePolicy(1012), "jitter");
  });

  test("1008 policy violation: only with a new token", () => {
    assert.equal(closePolicy(1008), "new-token");
  });

  test("4010 disconnected by the server API: kicked (stops unless reconnectOnKick)", () => {
    assert.equal(closePolicy(4010), "kicked");
  });

  test("everything else backs off", () => {
    for (const code of [1000, 1002, 1003, 1005, 1006, 1007, 1009, 1011, 1013, 4000, 4008, 4029, 4999]) {
      assert.equal(closePolicy(code), "backoff", `code ${code}`);
    }
  });
});

describe("reconnectDelay", () => {
  test("1001: a small random delay in [0, goingAwayMaxDelayMs), whatever the attempt", () => {
    assert.equal(reconnectDelay("jitter", 0, opts, () => 0), 0);
    assert.equal(reconnectDelay("jitter", 0, opts, () => 0.5), 500);
    assert.equal(reconnectDelay("jitter", 15, opts, () => almostOne), 999);
    assert.equal(reconnectDelay("jitter", 0, { goingAwayMaxDelayMs: 200 }, () => 0.5), 100);
  });

  test("many clients drained at once spread their reconnects over the window", () => {
    const delays = Array.from({ length: 1000 }, () => reconnectDelay("jitter", 0, opts));
    const buckets = new Array(10).fill(0);
    for (const d of delays) {
      assert.ok(d >= 0 && d < 1000);
      buckets[Math.floor(d / 100)]++;
    }
    // Uniform: each 100 ms bucket gets ~100 of 1000; none is empty or holds most of them.
    for (const b of buckets) assert.ok(b > 30 && b < 250, `bucket sizes ${buckets}`);
  });

  test("1001/1012 with the server's retry= hint: the hint plus the jitter", () => {
    assert.equal(reconnectDelay("jitter", 0, opts, () => 0.5, 250), 750);
    assert.equal(reconnectDelay("jitter", 0, opts, () => 0, 4000), 4000);
    assert.equal(reconnectDelay("jitter", 3, opts, () => 0.5, null), 500);
    // The hint is for the jitter policy only.
    assert.equal(reconnectDelay("backoff", 0, opts, () => 0.5, 9000), 250);
  });

  test("backoff and new-token use the exponential backoff", () => {
    const r = seq(0.5);
    assert.equal(reconnectDelay("backoff", 2, opts, r), 1000);
    assert.equal(reconnectDelay("new-token", 0, opts, r), 250);
  });
});

describe("JWT helpers (decode only, no verification)", () => {
  test("decodes the payload (base64url, UTF-8) and reads exp", () => {
    const token = jwt({ sub: "zoë/ü?>", exp: 1900000000, topics: ["a.b"] });
    assert.deepEqual(decodeJwtPayload(token), { sub: "zoë/ü?>", exp: 1900000000, topics: ["a.b"] });
    assert.equal(tokenExpiresAt(token), 1900000000 * 1000);
  });

  test("non-JWT tokens give null", () => {
    for (const t of ["", "abc", "a.b", "a.b.c.d", "a.!!!.c", `x.${Buffer.from("[1]").toString("base64url")}.y`, null, 42]) {
      assert.equal(decodeJwtPayload(t), null, String(t));
      assert.equal(tokenExpiresAt(t), null);
    }
    assert.equal(tokenExpiresAt(jwt({ sub: "no exp" })), null);
    assert.equal(tokenExpiresAt(jwt({ exp: "soon" })), null);
  });

  test("refreshDelay: margin before expiry, at most half the remaining life, at least minMs", () => {
    const now = 1_000_000;
    // One hour left, 60 s margin: refresh 59 minutes from now.
    assert.equal(refreshDelay(now + 3600_000, now, 60_000), 3540_000);
    // 30 s left: halfway, 15 s from now.
    assert.equal(refreshDelay(now + 30_000, now, 60_000), 15_000);
    // 1.5 s left: not sooner than minMs.
    assert.equal(refreshDelay(now + 1500, now, 60_000, 1000), 1000);
    // Expired: nothing to refresh.
    assert.equal(refreshDelay(now - 1, now, 60_000), null);
    assert.equal(refreshDelay(now, now, 60_000), null);
  });
});

describe("URLs", () => {
  test("resolveUrl maps http(s) to ws(s) and resolves relative URLs against the page", () => {
    assert.equal(resolveUrl("ws://127.0.0.1:8080/ws"), "ws://127.0.0.1:8080/ws");
    assert.equal(resolveUrl("wss://example.test/ws"), "wss://example.test/ws");
    assert.equal(resolveUrl("/ws", "http://127.0.0.1:8080/demo?x=1"), "ws://127.0.0.1:8080/ws");
    assert.equal(resolveUrl("/ws", "https://example.test/"), "wss://example.test/ws");
    assert.equal(resolveUrl("http://127.0.0.1:1/ws"), "ws://127.0.0.1:1/ws");
  });

  test("withToken sets the token query parameter, URL-encoded", () => {
    assert.equal(withToken("ws://h/ws", null), "ws://h/ws");
    assert.equal(withToken("ws://h/ws", ""), "ws://h/ws");
    assert.equal(withToken("ws://h/ws", "a.b+c/="), "ws://h/ws?token=a.b%2Bc%2F%3D");
    assert.equal(withToken("ws://h/ws?x=1&token=old", "new"), "ws://h/ws?x=1&token=new");
  });
});

describe("server reconnect hints (docs/protocol.md, Reconnecting)", () => {
  test("retryHint reads `; retry=<ms>` at the end of a close reason", () => {
    assert.equal(retryHint("node draining: reconnect; retry=250"), 250);
    assert.equal(retryHint("rebalance; retry=0"), 0);
    assert.equal(retryHint("x; retry=9999999"), 60000, "capped");
    for (const r of ["node draining: reconnect", "", undefined, null, "a; retry=", "a; retry=12x", "a; retry=-1", "a; retry=12345678", "a;retry=5", "a; retry=5 "]) {
      assert.equal(retryHint(r), null, JSON.stringify(r));
    }
  });

  test("refusalDelay: the 503 body's retry_after_ms, else Retry-After seconds with jitter", () => {
    const body = JSON.stringify({ error: "overloaded", message: "m", retry_after_ms: 1234 });
    assert.equal(refusalDelay(503, "2", body), 1234);
    assert.equal(refusalDelay(503, "2", "not json", () => 0.5), 2500);
    assert.equal(refusalDelay(503, undefined, JSON.stringify({ error: "draining" })), null);
    assert.equal(refusalDelay(503, "999", "", () => 0), 60000, "capped");
    assert.equal(refusalDelay(401, "2", body), null, "only refusals that mean 'later'");
    assert.equal(refusalDelay(503, "soon", ""), null);
  });
});
