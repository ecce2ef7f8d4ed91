// wsgate.js: client for the wsgate WebSocket pub/sub gateway (wire protocol v1.1).
//
// Dependency-free ES module for browsers and Node. Uses the global `WebSocket` when there
// is one, or the constructor passed as the `WebSocket` option (e.g. the `ws` package on
// Node 20, which has no global WebSocket).
//
// # Layout
// - DEFAULTS and the pure policy functions (backoffDelay, closePolicy, reconnectDelay,
//   retryHint, decodeJwtPayload, tokenExpiresAt, refreshDelay, withToken, resolveUrl): no I/O, no
//   timers, exported so that the reconnect rules can be unit-tested with injected
//   randomness and clocks.
// - WsgateError: every rejection carries a stable `.code` (the server's error codes plus
//   the client-side ones `disconnected`, `offline`, `timeout`, `closed`).
// - WsgateClient: the connection state machine. One live socket at a time; every
//   callback checks that its socket is still the current one, so late events from an
//   abandoned socket are ignored. For stream topics it keeps the last delivered
//   position ({seq, epoch}) and resumes from it (`since`) on every resubscribe.
// - connect(): the public entry point.

/** Protocol version this client speaks (with the v1.1 stream fields: seq, since, reset). */
export const PROTOCOL_VERSION = 1;

/** Default options; every one can be overridden in `connect(url, options)`. */
export const DEFAULTS = Object.freeze({
  /** First backoff cap; the cap doubles (backoffFactor) per failed attempt. */
  backoffInitialMs: 500,
  /** Largest backoff cap. */
  backoffMaxMs: 30000,
  backoffFactor: 2,
  /**
   * After a 1001 (node draining) or 1012 (restart, rebalance), reconnect after a random
   * 0..this delay (added to the server's `retry=` hint when the close reason has one).
   */
  goingAwayMaxDelayMs: 1000,
  /** A connection open at least this long resets the backoff attempt counter. */
  stableAfterMs: 5000,
  /** Socket open + `welcome` must arrive within this, else the attempt counts as failed. */
  connectTimeoutMs: 10000,
  /** A command sent on an open connection is rejected with `timeout` after this. */
  requestTimeoutMs: 10000,
  /** A publish made while not connected waits this long for a connection (0: reject at once). */
  offlineTimeoutMs: 10000,
  /**
   * At most this many commands wait for a connection; more reject with `offline`. Kept
   * well under the server's default --rate-burst (400): flushing more at once after a
   * reconnect would be rate limited, then closed with 4029.
   */
  maxQueued: 256,
  /** Heartbeat assumed until the server's `welcome` says otherwise. */
  heartbeatMs: 25000,
  /** Silence longer than heartbeat_ms + this makes the client probe with a `ping` op. */
  idleMarginMs: 5000,
  /** A probe `ping` not answered (by anything) within this closes the socket. */
  pongTimeoutMs: 10000,
  /** Refresh a JWT this long before its `exp` (at most half of its remaining life). */
  refreshMarginMs: 60000,
  /** Frames are kept under this; the server's default limit is 65536 bytes. */
  maxMessageBytes: 65536,
  /** Listen to the browser's `online` and `visibilitychange` events. */
  browserEvents: true,
  /**
   * After a close 4010 (disconnected by the server API: the connection was kicked),
   * reconnect with backoff instead of stopping.
   */
  reconnectOnKick: false,
  /**
   * Fall back to Server-Sent Events (`GET /sse`, the browser's `EventSource`) when
   * WebSocket connections fail `sseAfterFailures` times in a row before `welcome`.
   */
  sseFallback: true,
  sseAfterFailures: 2,
  /** While on SSE, try a WebSocket again after this long (and switch back if it works). */
  wsRetryMs: 60000,
  /**
   * The SSE endpoint: a URL, or a function of the WebSocket URL; by default the
   * WebSocket URL with http(s) and the path's last `/ws` replaced by `/sse`.
   */
  sseUrl: null,
  /**
   * Over SSE, publish() POSTs to this HTTP API endpoint (e.g. `/api/publish` of the
   * gateway, or a backend route that forwards there); null: publish() rejects.
   */
  publishUrl: null,
  /** Headers for those POSTs (e.g. `{authorization: "Bearer <api key>"}`). */
  publishHeaders: null,
});

// ---------------------------------------------------------------------------------------
// Pure policy functions

/**
 * Exponential backoff with full jitter: a uniformly random delay in
 * [0, min(max, initial * factor^attempt)).
 * @param {number} attempt 0 for the first retry.
 * @param {object} [opts] backoffInitialMs, backoffMaxMs, backoffFactor.
 * @param {() => number} [random] returns [0, 1); injectable for tests.
 */
export function backoffDelay(attempt, opts = {}, random = Math.random) {
  const initial = opts.backoffInitialMs ?? DEFAULTS.backoffInitialMs;
  const max = opts.backoffMaxMs ?? DEFAULTS.backoffMaxMs;
  const factor = opts.backoffFactor ?? DEFAULTS.backoffFactor;
  const cap = Math.min(max, initial * Math.pow(factor, Math.max(0, attempt)));
  return Math.floor(random() * cap);
}

/**
 * What to do after the server (or the network) closed the connection.
 * - `"jitter"`: reconnect soon, after a small random delay (1001 going away: the node is
 *   draining; 1012 service restart). Spreading the reconnects keeps a drained node's
 *   clients from stampeding the other nodes at the same millisecond.
 * - `"new-token"`: 1008 policy violation (e.g. the token expired): reconnect only if the
 *   token callback supplies a token different from the one that was refused.
 * - `"kicked"`: 4010, disconnected by the server API (`POST /api/disconnect`): stop,
 *   unless the `reconnectOnKick` option says to reconnect (then with backoff).
 * - `"backoff"`: everything else (1006 abnormal, 1009, 4000 heartbeat, 4008 slow
 *   consumer, 4029 rate limit, server-sent 1000, ...): exponential backoff.
 * A close the application asked for (`client.close()`) never reaches this function.
 * @param {number} code WebSocket close code.
 * @returns {"jitter" | "new-token" | "kicked" | "backoff"}
 */
export function closePolicy(code) {
  switch (code) {
    case 1001:
    case 1012:
      return "jitter";
    case 1008:
      return "new-token";
    case 4010:
      return "kicked";
    default:
      return "backoff";
  }
}

/**
 * Delay before the next attempt for a given policy (`kicked`, when reconnecting at all,
 * backs off like `backoff`).
 * @param {"jitter" | "new-token" | "kicked" | "backoff"} policy from closePolicy().
 * @param {number} attempt consecutive failed attempts so far (0-based).
 * @param {object} [opts] see DEFAULTS.
 * @param {() => number} [random] returns [0, 1).
 */
export function reconnectDelay(policy, attempt, opts = {}, random = Math.random, hintMs = null) {
  if (policy === "jitter") {
    return (hintMs ?? 0) + Math.floor(random() * (opts.goingAwayMaxDelayMs ?? DEFAULTS.goingAwayMaxDelayMs));
  }
  return backoffDelay(attempt, opts, random);
}

/** The largest reconnect hint honoured (the server never sends more). */
export const MAX_RETRY_HINT_MS = 60000;

/**
 * The server's reconnect hint in a close reason: `"node draining: reconnect; retry=250"`
 * gives 250 (docs/protocol.md, "Reconnecting": `; retry=` and 1 to 7 digits at the end).
 * @param {string} [reason] the close frame's reason.
 * @returns {number | null} milliseconds (at most MAX_RETRY_HINT_MS), or null without one.
 */
export function retryHint(reason) {
  const m = /; retry=(\d{1,7})$/.exec(typeof reason === "string" ? reason : "");
  return m ? Math.min(Number(m[1]), MAX_RETRY_HINT_MS) : null;
}

/**
 * The server's wait from a refused upgrade (HTTP 503 `overloaded`): the body's
 * `retry_after_ms`, else the `Retry-After` header's seconds (plus up to a second of
 * jitter), else null. Only non-browser sockets see the response (Node's `ws`).
 * @param {number} status HTTP status.
 * @param {string | undefined} retryAfter the `Retry-After` header.
 * @param {string} body the response body.
 * @param {() => number} [random] returns [0, 1).
 * @returns {number | null} milliseconds, at most MAX_RETRY_HINT_MS.
 */
export function refusalDelay(status, retryAfter, body, random = Math.random) {
  if (status !== 503 && status !== 429) return null;
  try {
    const ms = JSON.parse(body)?.retry_after_ms;
    if (Number.isInteger(ms) && ms >= 0) return Math.min(ms, MAX_RETRY_HINT_MS);
  } catch {
    /* not JSON: fall back to the header */
  }
  const secs = Number(retryAfter);
  if (retryAfter !== undefined && retryAfter !== "" && Number.isInteger(secs) && secs >= 0) {
    return Math.min(secs * 1000 + Math.floor(random() * 1000), MAX_RETRY_HINT_MS);
  }
  return null;
}

/**
 * Decodes the payload of a JWT without verifying anything (the server verifies).
 * @param {string} token
 * @returns {object | null} null when the token is not a decodable JWT.
 */
export function decodeJwtPayload(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    let b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    b64 += "=".repeat((4 - (b64.length % 4)) % 4);
    const bin = atob(b64);
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    const payload = JSON.parse(new TextDecoder().decode(bytes));
    return payload !== null && typeof payload === "object" && !Array.isArray(payload) ? payload : null;
  } catch {
    return null;
  }
}

/**
 * When a JWT expires, in milliseconds since the epoch, from its `exp` claim.
 * @param {string} token
 * @returns {number | null} null when the token has no numeric `exp`.
 */
export function tokenExpiresAt(token) {
  const payload = decodeJwtPayload(token);
  return payload && typeof payload.exp === "number" ? payload.exp * 1000 : null;
}

/**
 * How long to wait before refreshing a token expiring at `expiresAt`: `marginMs` before
 * expiry, but no later than half of the remaining life (short-lived tokens), and not
 * sooner than `minMs` (so a callback that keeps returning the same token cannot spin).
 * @returns {number | null} null when the token has already expired (nothing to refresh:
 *   the server will close the connection and the reconnect path takes over).
 */
export function refreshDelay(expiresAt, now, marginMs = DEFAULTS.refreshMarginMs, minMs = 1000) {
  const remaining = expiresAt - now;
  if (!(remaining > 0)) return null;
  return Math.max(minMs, remaining - Math.min(marginMs, remaining / 2));
}

/**
 * Resolves a gateway URL: `ws:`/`wss:` as is, `http:`/`https:` mapped to `ws:`/`wss:`,
 * and a relative URL (e.g. `/ws`) resolved against `base` (the page's location).
 * @param {string} url
 * @param {string} [base]
 */
export function resolveUrl(url, base) {
  const u = base ? new URL(url, base) : new URL(url);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  return u.toString();
}

/**
 * Adds the token as the `token` query parameter (browsers cannot set an Authorization
 * header on a WebSocket upgrade).
 * @param {string} url absolute ws(s) URL.
 * @param {string | null | undefined} token
 */
export function withToken(url, token) {
  if (token === null || token === undefined || token === "") return url;
  const u = new URL(url);
  u.searchParams.set("token", token);
  return u.toString();
}

/**
 * The SSE URL of a WebSocket URL: http(s), and the path's last `/ws` replaced by `/sse`
 * (or `/sse` appended).
 * @param {string} wsUrl absolute ws(s) URL.
 */
export function sseUrlOf(wsUrl) {
  const u = new URL(wsUrl);
  if (u.protocol === "ws:") u.protocol = "http:";
  else if (u.protocol === "wss:") u.protocol = "https:";
  u.pathname = /\/ws$/.test(u.pathname) ? u.pathname.replace(/\/ws$/, "/sse") : `${u.pathname.replace(/\/$/, "")}/sse`;
  return u.toString();
}

/**
 * Stream positions in the gateway's SSE id encoding (docs/protocol.md, "Server-Sent
 * Events"): `v1.` + base64url (no padding) of the `since` JSON object.
 * @param {Record<string, {seq: number, epoch: string}>} positions
 */
export function encodeSseId(positions) {
  const json = JSON.stringify(positions);
  const bytes = new TextEncoder().encode(json);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return `v1.${btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "")}`;
}

/**
 * A WebSocket look-alike over Server-Sent Events, so that the client's whole state
 * machine runs unchanged on SSE: frames from the server arrive as `onmessage`; the
 * commands the client sends are carried out over HTTP or answered here:
 * - `subscribe`/`unsubscribe`: the stream is reopened with the new topic set, every
 *   stream topic resuming from its position (`since`); a plain topic may miss what is
 *   published during the reopen;
 * - `publish`: `POST publishUrl` when given, else an `unsupported` error;
 * - `ping`: answered here (heartbeat comments keep the HTTP stream alive, the browser's
 *   EventSource notices a broken one);
 * - `presence`, `presence_stats`: `unsupported`; `refresh`: `unknown_op` (the new token
 *   is used at the next connection).
 */
export class SseSocket {
  /**
   * @param {Function} EventSourceImpl the EventSource constructor.
   * @param {string} url the `/sse` URL, token included.
   * @param {string[]} topics the topics to open with.
   * @param {Record<string, {seq: number, epoch: string}>} since their stream positions.
   * @param {{publishUrl?: string | null, publishHeaders?: object | null, base?: string}} [opts]
   */
  constructor(EventSourceImpl, url, topics, since, opts = {}) {
    this._ES = EventSourceImpl;
    this._url = url;
    this._opts = opts;
    this.readyState = 0;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    /** The open stream's topics, in order. */
    this._topics = [...topics];
    /** topic -> {seq, epoch}: where each stream topic stands, as delivered. */
    this._positions = new Map(Object.entries(since ?? {}));
    /** Client subscribes waiting for the stream's own `subscribed`. */
    this._pending = [];
    this._welcomed = false;
    this._reopen = false;
    this._open();
  }

  _open() {
    const u = new URL(this._url);
    if (this._topics.length > 0) u.searchParams.set("topics", this._topics.join(","));
    else u.searchParams.delete("topics");
    const since = {};
    for (const t of this._topics) if (this._positions.has(t)) since[t] = this._positions.get(t);
    if (Object.keys(since).length > 0) u.searchParams.set("since", encodeSseId(since));
    else u.searchParams.delete("since");
    this._expect = [...this._topics];
    this._gotOwn = this._topics.length === 0;
    const es = new this._ES(u.toString());
    this._es = es;
    es.onopen = () => {
      if (this._es === es) this.readyState = 1;
    };
    es.onmessage = (ev) => {
      if (this._es === es) this._onEvent(ev.data);
    };
    es.addEventListener("close", (ev) => {
      if (this._es !== es) return;
      let info = {};
      try {
        info = JSON.parse(ev.data);
      } catch {
        /* keep the defaults */
      }
      this._end(info.code ?? 1006, info.reason ?? "", true);
    });
    es.onerror = () => {
      // Ours to handle: the client reconnects (with the positions), not the browser.
      if (this._es === es) this._end(1006, "SSE connection failed", false);
    };
  }

  _deliver(msg) {
    this.onmessage?.({ data: typeof msg === "string" ? msg : JSON.stringify(msg) });
  }

  _onEvent(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    const track = (topic, p) => {
      if (typeof topic === "string" && Number.isInteger(p?.seq) && typeof p?.epoch === "string") this._positions.set(topic, { seq: p.seq, epoch: p.epoch });
    };
    switch (msg?.op) {
      case "welcome":
        // A reopen's welcome: the client already has one.
        if (this._welcomed) return;
        this._welcomed = true;
        break;
      case "message":
        if (Number.isInteger(msg.seq) && this._positions.has(msg.topic)) {
          track(msg.topic, { seq: msg.seq, epoch: this._positions.get(msg.topic).epoch });
        }
        break;
      case "reset":
        track(msg.topic, msg);
        break;
      case "subscribed":
        for (const [t, p] of Object.entries(msg.streams ?? {})) track(t, p);
        if ((msg.id === null || msg.id === undefined) && !this._gotOwn && sameList(msg.topics, this._expect)) {
          // The stream's own subscription: it answers the client's subscribes.
          this._gotOwn = true;
          const pending = this._pending;
          this._pending = [];
          for (const cmd of pending) this._deliver(subscribedFor(cmd, msg));
          return;
        }
        break;
      default:
    }
    this._deliver(data);
  }

  /** Sends a command (JSON text), as WebSocket.send would. */
  send(text) {
    if (this.readyState > 1) throw new Error("SSE connection closed");
    const cmd = JSON.parse(text);
    const error = (code, message) => this._later({ op: "error", id: cmd.id, code, message });
    switch (cmd.op) {
      case "subscribe": {
        for (const [t, p] of Object.entries(cmd.since ?? {})) if (!this._positions.has(t)) this._positions.set(t, p);
        const fresh = cmd.topics.filter((t) => !this._topics.includes(t));
        if (fresh.length === 0 && !this._gotOwn) {
          this._pending.push(cmd);
          return;
        }
        if (fresh.length === 0) {
          const streams = {};
          for (const t of cmd.topics) if (this._positions.has(t)) streams[t] = this._positions.get(t);
          this._later(subscribedFor(cmd, { streams }));
          return;
        }
        this._topics.push(...fresh);
        this._pending.push(cmd);
        this._scheduleReopen();
        return;
      }
      case "unsubscribe": {
        const gone = new Set(cmd.topics);
        const before = this._topics.length;
        this._topics = this._topics.filter((t) => !gone.has(t));
        for (const t of gone) this._positions.delete(t);
        this._later({ op: "unsubscribed", id: cmd.id, topics: cmd.topics });
        if (this._topics.length !== before) this._scheduleReopen();
        return;
      }
      case "ping":
        this._later({ op: "pong", id: cmd.id });
        return;
      case "publish":
        this._publish(cmd);
        return;
      case "refresh":
        error("unknown_op", "refresh is not available over SSE: the new token is used at the next connection");
        return;
      case "presence":
      case "presence_stats":
        error("unsupported", `${cmd.op} is not available over Server-Sent Events (use the HTTP API /api/presence)`);
        return;
      default:
        error("unknown_op", `${cmd.op} is not available over Server-Sent Events`);
    }
  }

  _later(msg) {
    queueMicrotask(() => {
      if (this.readyState <= 1) this._deliver(msg);
    });
  }

  _scheduleReopen() {
    if (this._reopen) return;
    this._reopen = true;
    queueMicrotask(() => {
      this._reopen = false;
      if (this.readyState > 1) return;
      const old = this._es;
      this._es = null;
      old?.close();
      // Topics already answered keep resuming from their positions; subscribes still
      // waiting are answered by the new stream's `subscribed`.
      this._open();
    });
  }

  async _publish(cmd) {
    const { publishUrl, publishHeaders, base } = this._opts;
    if (!publishUrl) {
      this._later({
        op: "error",
        id: cmd.id,
        code: "unsupported",
        message: "publishing over Server-Sent Events needs the HTTP API: pass the publishUrl option (POST /api/publish)",
      });
      return;
    }
    let reply;
    try {
      const res = await fetch(new URL(publishUrl, base ?? this._url).toString(), {
        method: "POST",
        headers: { "content-type": "application/json", ...(publishHeaders ?? {}) },
        body: JSON.stringify({ topic: cmd.topic, data: cmd.data }),
      });
      const body = await res.json().catch(() => ({}));
      reply = res.ok
        ? { op: "published", id: cmd.id, ...(Number.isInteger(body.seq) ? { seq: body.seq, epoch: body.epoch } : {}) }
        : { op: "error", id: cmd.id, code: body.error ?? `http_${res.status}`, message: body.message ?? `HTTP ${res.status}` };
    } catch (err) {
      reply = { op: "error", id: cmd.id, code: "unavailable", message: `publish failed: ${err?.message ?? err}` };
    }
    if (this.readyState <= 1) this._deliver(reply);
  }

  _end(code, reason, wasClean) {
    if (this.readyState > 2) return;
    this.readyState = 3;
    const es = this._es;
    this._es = null;
    es?.close();
    const onclose = this.onclose;
    queueMicrotask(() => onclose?.({ code, reason, wasClean }));
  }

  /** Ends the stream, as WebSocket.close would (the close event follows). */
  close(code = 1000, reason = "") {
    this._end(code, reason, true);
  }
}

function sameList(a, b) {
  return Array.isArray(a) && a.length === b.length && a.every((t, i) => t === b[i]);
}

/** The reply to subscribe `cmd`, from the stream's own `subscribed` (its topics' streams). */
function subscribedFor(cmd, own) {
  const reply = { op: "subscribed", id: cmd.id, topics: cmd.topics };
  const streams = {};
  for (const t of cmd.topics) if (own.streams?.[t]) streams[t] = own.streams[t];
  if (Object.keys(streams).length > 0) reply.streams = streams;
  return reply;
}

// ---------------------------------------------------------------------------------------
// Errors

/** An error with a stable machine-readable `code`. */
export class WsgateError extends Error {
  /**
   * @param {string} code server code (`invalid_topic`, `forbidden`, ...) or client code
   *   (`disconnected`, `offline`, `timeout`, `closed`, `payload_too_large`, `bad_request`).
   * @param {string} [message]
   */
  constructor(code, message) {
    super(message || code);
    this.name = "WsgateError";
    this.code = code;
  }
}

/** Server codes that concern the topics of a command: worth retrying topic by topic. */
const PER_TOPIC_CODES = new Set(["invalid_topic", "forbidden", "too_many_topics"]);
/** Server codes for which a subscribe is retried later instead of given up. */
const TRANSIENT_CODES = new Set(["unavailable", "rate_limited", "internal"]);

/** Largest seq the server accepts in `since` (2^53 - 1). */
const MAX_SEQ = Number.MAX_SAFE_INTEGER;

/**
 * A stream position `{seq, epoch}` copied from `p`, or null when `p` is not one
 * (`seq` an integer in 0..2^53-1, `epoch` a string).
 * @param {any} p
 * @returns {{seq: number, epoch: string} | null}
 */
export function toPosition(p) {
  if (p === null || typeof p !== "object") return null;
  const { seq, epoch } = p;
  if (!Number.isInteger(seq) || seq < 0 || seq > MAX_SEQ || typeof epoch !== "string") return null;
  return { seq, epoch };
}

// ---------------------------------------------------------------------------------------
// Client

/**
 * A wsgate connection that survives disconnects. Create it with `connect()`.
 */
export class WsgateClient {
  /**
   * @param {string | string[] | ((ctx: {attempt: number, previous: string | null}) => string)} url
   * @param {object} [options] see README and wsgate.d.ts.
   */
  constructor(url, options = {}) {
    this._opts = { ...DEFAULTS };
    for (const [k, v] of Object.entries(options)) if (v !== undefined) this._opts[k] = v;
    const WS = options.WebSocket ?? globalThis.WebSocket;
    /** The EventSource constructor for the SSE fallback, if any. */
    this._ES = options.EventSource ?? globalThis.EventSource;
    if (typeof this._ES !== "function" || !this._opts.sseFallback) this._ES = null;
    if (typeof WS !== "function" && !this._ES) {
      throw new TypeError("wsgate: no WebSocket available; pass { WebSocket } (e.g. the 'ws' package)");
    }
    /** The WebSocket constructor in use. */
    this._WS = typeof WS === "function" ? WS : null;
    /** The transport in use: `"websocket"`, or `"sse"` (Server-Sent Events) after the fallback. */
    this.transport = this._WS ? "websocket" : "sse";
    /** WebSocket attempts in a row that ended before `welcome`. */
    this._wsFailures = 0;
    this._random = options.random ?? Math.random;
    this._base = options.base ?? globalThis.location?.href;
    if (typeof url === "function") {
      this._chooser = url;
      this._urls = null;
    } else {
      this._urls = (Array.isArray(url) ? url : [url]).map((u) => resolveUrl(u, this._base));
      if (this._urls.length === 0) throw new TypeError("wsgate: no URL given");
      this._chooser = null;
    }
    this._urlIndex = 0;
    /** URL of the current (or last) socket, without the token. */
    this.url = null;

    /** Token for the next connection; the token callback replaces it before reconnects. */
    this._token = options.token ?? null;
    this._getToken = options.getToken ?? null;
    /** Set when _token was just obtained (after a 1008) and must not be fetched again. */
    this._tokenFresh = this._token !== null;
    /** Token the current connection was authenticated with (updated by `refresh`). */
    this._connToken = null;
    this._refreshUnsupported = false;
    /** After a 1008: the refused token, which the next attempt must not reuse. */
    this._refused = null;
    /** The HTTP refusal of the current attempt's upgrade, when the socket shows it. */
    this._refusal = null;
    /** The last `welcome.reconnect_ms`: the server's base for the backoff. */
    this._serverBackoffMs = null;

    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
    /**
     * topic -> { handlers: Set, status: "pending"|"sent"|"active", waiters: [], solo,
     *   position: {seq, epoch} | null (last delivered, stream topics only),
     *   sinceSent: the position sent as `since` with the subscribe in flight, or null }
     */
    this._topics = new Map();
    /** topic -> resolvers of unsubscribe() calls not yet sent. */
    this._unsubs = new Map();
    /**
     * Topics the server subscribed the current connection to (token claim, server API):
     * not the client's own, never resubscribed by it; emptied when the connection ends.
     */
    this._serverTopics = new Set();
    /** topic -> handlers registered with listen() (messages without a subscribe). */
    this._listens = new Map();
    /** id -> { resolve, reject, timer } for commands sent on the current socket. */
    this._requests = new Map();
    /** Publishes waiting for a connection: { frame, resolve, reject, timer }. */
    this._queue = [];
    this._nextId = 1;

    /** @type {"connecting" | "open" | "reconnecting" | "closed"} */
    this.state = "connecting";
    /** The current connection's welcome ({session, node, heartbeat_ms}); null when not open. */
    this.welcome = null;
    /** Number of connections opened after the first one. */
    this.reconnects = 0;
    /** Stream messages dropped because they were already delivered (seq not past the position). */
    this.duplicates = 0;
    /** Why the client closed for good, once state is "closed". */
    this.closeInfo = null;

    this._ws = null;
    this._attempt = 0;
    this._connects = 0;
    this._everOpen = false;
    this._openedAt = 0;
    this._lastFrameAt = 0;
    this._heartbeatMs = this._opts.heartbeatMs;
    this._timers = { reconnect: null, connect: null, idle: null, pong: null, refresh: null, retry: null, wsRetry: null };
    this._flushScheduled = false;

    this._installBrowserHooks();
    this._connect();
  }

  // -- public API -----------------------------------------------------------------------

  /**
   * Listens to an event: `state`, `connecting`, `open`, `reconnecting`, `closed`,
   * `disconnect`, `message`, `resync`, `join`, `leave`, `presence_changed`, `subscribed`,
   * `unsubscribed`, `dead`, `error`. Returns a function that removes the listener.
   */
  on(event, fn) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => this.off(event, fn);
  }

  /** Removes a listener added with on(). */
  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }

  /** Like on(), for the next occurrence only. */
  once(event, fn) {
    const off = this.on(event, (...args) => {
      off();
      fn(...args);
    });
    return off;
  }

  /**
   * Subscribes to a topic; `handler(data, message)` gets every publication on it. The
   * subscription survives reconnects (every topic is resubscribed in one command).
   * Resolves when the server confirmed it (messages published after that are delivered),
   * or if unsubscribe() removes the topic first. Rejects with the server's error
   * (`invalid_topic`, `forbidden`, `too_many_topics`), the handler being dropped, or
   * with `closed` if the client closes for good first.
   *
   * On a stream topic, `message.seq` numbers the publications; the client resumes from
   * the last one delivered after every reconnect. `options.since` (`{seq, epoch}`, e.g.
   * saved from `position(topic)` before a page reload) resumes from there on the first
   * subscribe too; it is used only when the topic is not subscribed yet.
   * @param {string} topic
   * @param {((data: any, message: object) => void) | null} [handler]
   * @param {{since?: {seq: number, epoch: string} | null}} [options]
   * @returns {Promise<void>}
   */
  subscribe(topic, handler, options = {}) {
    if (typeof topic !== "string") return Promise.reject(new TypeError("wsgate: topic must be a string"));
    if (this.state === "closed") return Promise.reject(this._closedError());
    let since = null;
    if (options?.since !== undefined && options.since !== null) {
      since = toPosition(options.since);
      if (!since) {
        return Promise.reject(new WsgateError("bad_request", "since must be {seq: integer >= 0, epoch: string}"));
      }
    }
    let t = this._topics.get(topic);
    if (!t) {
      t = { handlers: new Set(), status: "pending", waiters: [], solo: false, position: since, sinceSent: null };
      this._topics.set(topic, t);
      // Unsubscribed and subscribed again before the unsubscribe was sent: cancel it.
      const unsubWaiters = this._unsubs.get(topic);
      if (unsubWaiters) {
        this._unsubs.delete(topic);
        for (const w of unsubWaiters) w();
      }
    }
    if (handler) t.handlers.add(handler);
    if (t.status === "active") return Promise.resolve();
    return new Promise((resolve, reject) => {
      t.waiters.push({ resolve, reject });
      this._scheduleFlush();
    });
  }

  /**
   * Removes `handler` from a topic, or every handler when none is given; the server
   * subscription is dropped when no handler is left. Resolves when the server confirmed
   * it (at once when there was nothing to tell the server).
   * @param {string} topic
   * @param {Function} [handler]
   * @returns {Promise<void>}
   */
  unsubscribe(topic, handler) {
    const t = this._topics.get(topic);
    if (!t) return Promise.resolve();
    if (handler) {
      t.handlers.delete(handler);
      if (t.handlers.size > 0) return Promise.resolve();
    }
    this._topics.delete(topic);
    for (const w of t.waiters) w.resolve();
    t.waiters = [];
    if (t.status === "pending" || this.state !== "open") return Promise.resolve();
    return new Promise((resolve) => {
      let waiters = this._unsubs.get(topic);
      if (!waiters) this._unsubs.set(topic, (waiters = []));
      waiters.push(resolve);
      this._scheduleFlush();
    });
  }

  /** Topics currently wanted (subscribed or being subscribed). */
  topics() {
    return [...this._topics.keys()];
  }

  /**
   * The position of a stream topic: `{seq, epoch}` of the last publication delivered
   * (or where the subscription started, or the last `reset`). Null for a topic that is
   * not subscribed, not a stream, or not confirmed yet without a `since`.
   * @param {string} topic
   * @returns {{seq: number, epoch: string} | null}
   */
  position(topic) {
    const p = this._topics.get(topic)?.position;
    return p ? { seq: p.seq, epoch: p.epoch } : null;
  }

  /**
   * Every known stream position, `{topic: {seq, epoch}}`: what to save to resume after
   * a page reload (pass each back with `subscribe(topic, handler, {since})`).
   * @returns {Record<string, {seq: number, epoch: string}>}
   */
  positions() {
    const out = {};
    for (const [topic, t] of this._topics) if (t.position) out[topic] = { seq: t.position.seq, epoch: t.position.epoch };
    return out;
  }

  /**
   * Registers `handler(data, message)` for the messages on `topic` without subscribing:
   * for topics the server subscribes this connection to (the token's `topics` claim, or
   * `POST /api/subscribe`), which the client must not subscribe to itself. The handler
   * stays until the returned function is called (or the client closes for good), across
   * reconnects and server subscribes/unsubscribes. Handlers given to subscribe() get the
   * topic's messages too, whoever made the subscription.
   * @param {string} topic
   * @param {(data: any, message: object) => void} handler
   * @returns {() => void} removes the handler.
   */
  listen(topic, handler) {
    if (typeof topic !== "string") throw new TypeError("wsgate: topic must be a string");
    if (typeof handler !== "function") throw new TypeError("wsgate: listen needs a handler");
    let set = this._listens.get(topic);
    if (!set) this._listens.set(topic, (set = new Set()));
    set.add(handler);
    return () => {
      const cur = this._listens.get(topic);
      if (!cur) return;
      cur.delete(handler);
      if (cur.size === 0) this._listens.delete(topic);
    };
  }

  /**
   * Topics the server subscribed the current connection to (`subscribed` frames the
   * client did not ask for). Empty when not open: the server re-applies the token's
   * topics on each connection; API-made subscriptions end with the connection.
   * @returns {string[]}
   */
  serverTopics() {
    return [...this._serverTopics];
  }

  /**
   * Who is in a presence topic: `[{session, user, node}]`, every connection subscribed
   * to it on every node (`user` is null for a connection without a user). Like publish,
   * waits up to `offlineTimeoutMs` for a connection. Rejects with the server's code:
   * `not_enabled` (the topic's namespace has no presence), `forbidden`, `invalid_topic`,
   * `unavailable`, or a client code.
   * @param {string} topic
   * @returns {Promise<Array<{session: string, user: string | null, node: string}>>}
   */
  presence(topic) {
    if (typeof topic !== "string") return Promise.reject(new TypeError("wsgate: topic must be a string"));
    if (this.state === "closed") return Promise.reject(this._closedError());
    return this._command({ op: "presence", topic }, true).then((reply) => (Array.isArray(reply.clients) ? reply.clients : []));
  }

  /**
   * How many are in a presence topic, `{clients, users}` (connections, and distinct
   * users among them), without the list. Rejects like presence().
   * @param {string} topic
   * @returns {Promise<{clients: number, users: number}>}
   */
  presenceStats(topic) {
    if (typeof topic !== "string") return Promise.reject(new TypeError("wsgate: topic must be a string"));
    if (this.state === "closed") return Promise.reject(this._closedError());
    return this._command({ op: "presence_stats", topic }, true).then((reply) => ({ clients: reply.clients, users: reply.users }));
  }

  /**
   * Publishes `data` (any JSON value) to `topic`. Resolves when the server answered
   * `published`: with the publication's `{seq, epoch}` on a stream topic, with
   * `undefined` on a plain one. Rejects with a WsgateError whose `code` is the server's (`invalid_topic`,
   * `forbidden`, `rate_limited`, `unavailable`, ...) or: `disconnected` (the connection
   * dropped after sending: the outcome is unknown), `offline` (no connection within
   * `offlineTimeoutMs`), `timeout` (no reply within `requestTimeoutMs`), `closed`,
   * `payload_too_large` (frame over `maxMessageBytes`, not sent), `bad_request`.
   * While disconnected the publish waits for the connection (in order) up to
   * `offlineTimeoutMs`, it is never sent twice.
   * @param {string} topic
   * @param {any} data
   * @returns {Promise<{seq: number, epoch: string} | undefined>}
   */
  publish(topic, data) {
    if (data === undefined) return Promise.reject(new WsgateError("bad_request", "publish needs data (use null for none)"));
    if (this.state === "closed") return Promise.reject(this._closedError());
    return this._command({ op: "publish", topic, data }, true).then((reply) => toPosition(reply) ?? undefined);
  }

  /**
   * Sends a `ping` op and resolves with the round-trip time in milliseconds. Like
   * publish, waits up to `offlineTimeoutMs` for a connection.
   * @returns {Promise<number>}
   */
  ping() {
    if (this.state === "closed") return Promise.reject(this._closedError());
    const started = Date.now();
    return this._command({ op: "ping" }, true).then(() => Date.now() - started);
  }

  /**
   * Supplies a new token. Used for the next connection; on an open connection it is sent
   * with the `refresh` op (when the server knows it); after a 1008 close it reconnects.
   * @param {string} token
   */
  setToken(token) {
    this._token = token;
    this._tokenFresh = true;
    if (this.state === "open" && token !== this._connToken) this._sendRefresh(token);
    else if (this.state === "closed" && this.closeInfo?.policy) this._restart();
  }

  /**
   * Closes the connection for good: no reconnect. Pending commands reject with `closed`.
   * @param {number} [code] 1000 or 3000-4999.
   * @param {string} [reason]
   */
  close(code = 1000, reason = "client closed") {
    if (this.state === "closed" && !this.closeInfo?.policy) return;
    const ws = this._ws;
    this._detach(ws);
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        /* already closing */
      }
    }
    this._finish({ code, reason, byClient: true });
  }

  // -- connection lifecycle ---------------------------------------------------------------

  _nextUrl() {
    if (this._chooser) {
      return resolveUrl(this._chooser({ attempt: this._attempt, previous: this.url }), this._base);
    }
    return this._urls[this._urlIndex % this._urls.length];
  }

  async _connect() {
    this._clearTimer("reconnect");
    const gen = (this._gen = (this._gen ?? 0) + 1);
    const url = this._nextUrl();
    this.url = url;
    this._setState("connecting", { attempt: this._attempt, url });
    if (gen !== this._gen || this.state !== "connecting") return; // a listener closed the client
    let token = this._token;
    if (this._getToken && !this._tokenFresh) {
      try {
        token = await this._getToken();
        this._token = token;
      } catch (err) {
        if (gen !== this._gen || this.state === "closed") return;
        this._emitError(new WsgateError("token", `getToken failed: ${err?.message ?? err}`));
        this._afterClose({ code: 1006, reason: "getToken failed", local: true }, false);
        return;
      }
      if (gen !== this._gen || this.state === "closed") return;
    }
    this._tokenFresh = false;
    if (this._refused) {
      const refused = this._refused;
      this._refused = null;
      if (!token || token === refused.token) {
        this._finish({ ...refused.info, policy: true });
        return;
      }
    }
    const exp = token ? tokenExpiresAt(token) : null;
    if (exp !== null && exp <= Date.now() && !this._getToken) {
      // A static expired token can never work again: the server would refuse it with a
      // 401 that a browser sees only as a failed connection, retried forever.
      this._finish({ code: 1008, reason: "token expired", policy: true });
      return;
    }
    let ws;
    try {
      ws = this.transport === "sse" ? this._openSse(url, token) : new this._WS(withToken(url, token));
    } catch (err) {
      this._emitError(new WsgateError("connect", `cannot open ${url}: ${err?.message ?? err}`));
      this._afterClose({ code: 1006, reason: "constructor failed", local: true }, false);
      return;
    }
    this._ws = ws;
    this._connToken = token;
    this._connects++;
    ws.onmessage = (ev) => {
      if (this._ws === ws) this._onFrame(ev.data);
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._ws = null;
      const refusal = this._refusal;
      this._refusal = null;
      this._afterClose({ code: ev.code, reason: ev.reason, wasClean: ev.wasClean, ...refusal }, true);
    };
    if (typeof ws.on === "function") this._watchRefusal(ws);
    // An error event is always followed by a close event, which does the work.
    ws.onerror = () => {};
    this._timers.connect = setTimeout(() => this._abandon("connect timeout"), this._opts.connectTimeoutMs);
  }

  /** The SSE connection for `url` (the WebSocket URL), with the topics to resume. */
  _openSse(url, token) {
    const custom = this._opts.sseUrl;
    let sse = typeof custom === "function" ? custom(url) : custom ? new URL(custom, this._base ?? url).toString() : sseUrlOf(url);
    if (token) {
      const u = new URL(sse);
      u.searchParams.set("token", token);
      sse = u.toString();
    }
    const topics = [];
    const since = {};
    for (const [topic, t] of this._topics) {
      topics.push(topic);
      if (t.position) since[topic] = { seq: t.position.seq, epoch: t.position.epoch };
    }
    return new SseSocket(this._ES, sse, topics, since, {
      publishUrl: this._opts.publishUrl,
      publishHeaders: this._opts.publishHeaders,
      base: this._base,
    });
  }

  _setTransport(transport) {
    if (this.transport === transport) return;
    this.transport = transport;
    this._wsFailures = 0;
    this._emit("transport", { transport });
  }

  /** On SSE: tries a WebSocket again after `wsRetryMs`; switches back when it works. */
  _armWsRetry() {
    this._clearTimer("wsRetry");
    if (!this._WS || !(this._opts.wsRetryMs > 0)) return;
    this._timers.wsRetry = setTimeout(() => {
      this._timers.wsRetry = null;
      if (this.state !== "open" || this.transport !== "sse") return;
      const gen = this._gen;
      let probe;
      try {
        probe = new this._WS(withToken(this._nextUrl(), this._connToken));
      } catch {
        this._armWsRetry();
        return;
      }
      let done = false;
      const finish = (ok) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        probe.onmessage = probe.onclose = null;
        probe.onerror = () => {};
        try {
          probe.close(1000, "probe");
        } catch {
          /* ignore */
        }
        if (gen !== this._gen || this.state !== "open" || this.transport !== "sse") return;
        if (!ok) {
          this._armWsRetry();
          return;
        }
        // WebSockets work again: move over (stream topics resume with `since`).
        this._setTransport("websocket");
        this._abandon("switching to WebSocket");
      };
      const timer = setTimeout(() => finish(false), this._opts.connectTimeoutMs);
      probe.onmessage = (ev) => finish(typeof ev.data === "string" && ev.data.includes('"welcome"'));
      probe.onclose = () => finish(false);
      probe.onerror = () => {};
    }, this._opts.wsRetryMs);
  }

  /**
   * Node's `ws` shows a refused upgrade's HTTP response (a browser's WebSocket cannot):
   * read the status and the server's wait (503 `overloaded`: `retry_after_ms`,
   * `Retry-After`), then abort the socket, whose close (1006) carries them.
   */
  _watchRefusal(ws) {
    ws.on("unexpected-response", (_req, res) => {
      let body = "";
      let done = false;
      const finish = () => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (this._ws === ws) {
          const status = res.statusCode;
          const retryAfterMs = refusalDelay(status, res.headers?.["retry-after"], body, this._random);
          this._refusal = { status, reason: `HTTP ${status}`, ...(retryAfterMs !== null ? { retryAfterMs } : {}) };
        }
        try {
          ws.terminate();
        } catch {
          /* ignore */
        }
      };
      const timer = setTimeout(finish, 1000);
      res.setEncoding?.("utf8");
      res.on("data", (chunk) => {
        if (body.length < 4096) body += chunk;
      });
      res.on("end", finish);
      res.on("error", finish);
    });
  }

  /** Drops the current socket without waiting for a close handshake (dead link). */
  _abandon(reason) {
    const ws = this._ws;
    if (!ws) return;
    this._detach(ws);
    try {
      if (typeof ws.terminate === "function") ws.terminate();
      else ws.close(4000, reason);
    } catch {
      /* ignore */
    }
    this._afterClose({ code: 1006, reason, wasClean: false, local: true }, true);
  }

  _detach(ws) {
    if (!ws) return;
    if (this._ws === ws) this._ws = null;
    ws.onmessage = ws.onclose = ws.onerror = null;
    // Swallow the error some implementations emit when a CONNECTING socket is closed.
    ws.onerror = () => {};
  }

  /**
   * A socket ended (or an attempt failed): fail what was in flight, then reconnect
   * according to the close code, or stop.
   */
  _afterClose(info, hadSocket) {
    const wasOpen = this.state === "open";
    const openFor = wasOpen ? Date.now() - this._openedAt : 0;
    this._clearConnectionTimers();
    this.welcome = null;
    if (hadSocket) this._resetConnectionState(new WsgateError("disconnected", `connection closed (${info.code}) before the reply`));
    this._emit("disconnect", { ...info, url: this.url });
    if (this.state === "closed") return;

    const policy = closePolicy(info.code);
    if (policy === "kicked" && !this._opts.reconnectOnKick) {
      // Disconnected by the server API: the application decides whether to come back.
      this._finish({ ...info, kicked: true });
      return;
    }
    if (wasOpen && openFor >= this._opts.stableAfterMs) this._attempt = 0;
    if (!wasOpen && this.transport === "websocket" && this._ES && policy !== "new-token" && typeof info.retryAfterMs !== "number") {
      // WebSockets may be what fails here (a proxy that breaks them): after a few
      // attempts that never got a welcome, go on with Server-Sent Events.
      if (++this._wsFailures >= this._opts.sseAfterFailures) {
        this._setTransport("sse");
        this._attempt = 0;
        this._scheduleReconnect(0, info);
        return;
      }
    }
    if (policy === "new-token") {
      if (!this._getToken && (this._token === null || this._token === this._connToken)) {
        // No way to get another token: stop (setToken() restarts).
        this._finish({ ...info, policy: true });
        return;
      }
      // Reconnect only with a different token: _connect() checks what getToken() gives.
      this._refused = { token: this._connToken, info };
    } else {
      this._advanceUrl();
    }
    if (typeof info.retryAfterMs === "number") {
      // A refused upgrade that said when to come back (503 overloaded): the server's
      // hint is already jittered, and the attempt does not count as a failure.
      this._scheduleReconnect(info.retryAfterMs, info);
      return;
    }
    if (policy === "jitter") this._attempt = 0;
    const delayMs = reconnectDelay(policy, this._attempt, this._backoffOpts(), this._random, retryHint(info.reason));
    if (policy !== "jitter") this._attempt++;
    this._scheduleReconnect(delayMs, info);
  }

  /**
   * Backoff options with the server's `welcome.reconnect_ms` (the last one received) as
   * the base: the first cap is at least that, so a node's clients come back no faster
   * than it asked.
   */
  _backoffOpts() {
    const base = this._serverBackoffMs;
    if (!(base > 0)) return this._opts;
    const backoffInitialMs = Math.max(this._opts.backoffInitialMs, base);
    return { ...this._opts, backoffInitialMs, backoffMaxMs: Math.max(this._opts.backoffMaxMs, backoffInitialMs) };
  }

  _advanceUrl() {
    if (this._urls) this._urlIndex = (this._urlIndex + 1) % this._urls.length;
  }

  _scheduleReconnect(delayMs, info) {
    this._setState("reconnecting", { delayMs, attempt: this._attempt, code: info.code, reason: info.reason });
    this._clearTimer("reconnect");
    this._timers.reconnect = setTimeout(() => this._connect(), delayMs);
  }

  _restart() {
    this.closeInfo = null;
    this._attempt = 0;
    this._installBrowserHooks();
    this._connect();
  }

  /** Fails commands of the dead socket and marks every topic for resubscription. */
  _resetConnectionState(err) {
    const requests = [...this._requests.values()];
    this._requests.clear();
    for (const r of requests) {
      clearTimeout(r.timer);
      r.reject(err);
    }
    for (const t of this._topics.values()) {
      t.status = "pending";
      t.solo = false;
    }
    // The server's own subscriptions end with the connection (it re-applies the token's
    // topics on the next one, with a new `subscribed` frame).
    this._serverTopics.clear();
    // The next connection starts with no subscription: nothing left to unsubscribe.
    const unsubs = [...this._unsubs.values()];
    this._unsubs.clear();
    for (const waiters of unsubs) for (const w of waiters) w();
  }

  /** Closes for good. */
  _finish(info) {
    this._gen = (this._gen ?? 0) + 1;
    this._refused = null;
    this._clearConnectionTimers();
    this._clearTimer("reconnect");
    this._clearTimer("retry");
    this._removeBrowserHooks();
    this.welcome = null;
    const err = new WsgateError("closed", `client closed (${info.code}${info.reason ? ` ${info.reason}` : ""})`);
    this._resetConnectionState(err);
    const queue = this._queue;
    this._queue = [];
    for (const q of queue) {
      clearTimeout(q.timer);
      q.reject(err);
    }
    // A topic's handlers are kept after a 1008 stop (setToken() restarts and resubscribes);
    // its unconfirmed subscribe() promises are failed either way.
    for (const t of this._topics.values()) {
      for (const w of t.waiters) w.reject(err);
      t.waiters = [];
    }
    if (!info.policy) {
      this._topics.clear();
      this._listens.clear();
    }
    this.closeInfo = info;
    this._setState("closed", info);
  }

  _closedError() {
    const i = this.closeInfo;
    return new WsgateError("closed", `client closed${i ? ` (${i.code}${i.reason ? ` ${i.reason}` : ""})` : ""}`);
  }

  // -- frames ---------------------------------------------------------------------------

  _onFrame(data) {
    this._lastFrameAt = Date.now();
    // Any frame proves the link alive: a pending probe has its answer, and the idle
    // watch starts over.
    if (this._timers.pong) {
      this._clearTimer("pong");
      this._armIdle();
    }
    if (typeof data !== "string") return;
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (msg === null || typeof msg !== "object") return;
    switch (msg.op) {
      case "message":
        this._deliver(msg);
        return;
      case "reset":
        this._onReset(msg);
        return;
      case "welcome":
        this._onWelcome(msg);
        return;
      case "join":
      case "leave":
      case "presence_changed": {
        // Presence pushes: someone else joined or left a topic this connection is in, or
        // the rate rule skipped some (the list is stale: query presence() again).
        const { op, ...info } = msg;
        if (typeof info.topic === "string") this._emit(op, info);
        return;
      }
      case "subscribed":
      case "unsubscribed":
        if (msg.id === undefined || msg.id === null) {
          this._onServerSubscription(msg);
          return;
        }
        this._onReply(msg);
        return;
      case "error": {
        const req = msg.id !== null && msg.id !== undefined ? this._takeRequest(msg.id) : null;
        const err = new WsgateError(msg.code || "internal", msg.message || msg.code);
        if (req) req.reject(err);
        else this._emitError(err);
        return;
      }
      default:
        // published, pong, refreshed, presence replies, and future replies.
        this._onReply(msg);
    }
  }

  /** A reply to one of this connection's commands. */
  _onReply(msg) {
    if (msg.id === undefined || msg.id === null) return;
    const req = this._takeRequest(msg.id);
    if (!req) return;
    // Work that must happen before the next frame (a `subscribed` sets the stream
    // positions the replay that follows it is checked against): a promise callback
    // could run after frames that arrived in the same chunk.
    if (req.onReply) {
      try {
        req.onReply(msg);
      } catch (err) {
        this._emitError(err);
      }
    }
    req.resolve(msg);
  }

  /**
   * `subscribed`/`unsubscribed` with id null: the server changed this connection's
   * subscriptions itself (token claim right after `welcome`, or the server API).
   */
  _onServerSubscription(msg) {
    const topics = Array.isArray(msg.topics) ? msg.topics.filter((t) => typeof t === "string") : [];
    if (msg.op === "subscribed") {
      for (const topic of topics) this._serverTopics.add(topic);
      const info = { topics, server: true };
      if (msg.streams && typeof msg.streams === "object") info.streams = msg.streams;
      this._emit("subscribed", info);
      return;
    }
    for (const topic of topics) {
      this._serverTopics.delete(topic);
      // The server ended the subscription, even one the client made itself: its word is
      // final, the topic is not resubscribed (subscribe() again to ask for it).
      const t = this._topics.get(topic);
      if (t) {
        this._topics.delete(topic);
        for (const w of t.waiters) w.resolve();
        t.waiters = [];
      }
    }
    this._emit("unsubscribed", { topics, server: true });
  }

  _onWelcome(msg) {
    this._clearTimer("connect");
    this.welcome = { session: msg.session, node: msg.node, heartbeat_ms: msg.heartbeat_ms };
    if (typeof msg.reconnect_ms === "number" && msg.reconnect_ms >= 0) {
      this.welcome.reconnect_ms = msg.reconnect_ms;
      this._serverBackoffMs = Math.min(msg.reconnect_ms, MAX_RETRY_HINT_MS);
    } else {
      this._serverBackoffMs = null;
    }
    this._heartbeatMs = typeof msg.heartbeat_ms === "number" && msg.heartbeat_ms > 0 ? msg.heartbeat_ms : this._opts.heartbeatMs;
    this._openedAt = Date.now();
    this._refreshUnsupported = false;
    if (this._everOpen) this.reconnects++;
    this._everOpen = true;
    const previous = this.state;
    this.state = "open";
    // Resubscribe first, then the publishes queued while offline, in their order, and
    // only then tell the listeners (whose own commands come after those).
    this._flush();
    const queue = this._queue;
    this._queue = [];
    for (const q of queue) {
      clearTimeout(q.timer);
      this._send(q.frame).then(q.resolve, q.reject);
    }
    this._armIdle();
    this._scheduleRefresh();
    if (this.transport === "websocket") this._wsFailures = 0;
    else this._armWsRetry();
    this._emitState("open", { ...this.welcome, url: this.url, transport: this.transport }, previous);
  }

  _deliver(msg) {
    const t = this._topics.get(msg.topic);
    if (t && t.position && Number.isInteger(msg.seq)) {
      // A stream publication: exactly once, in order, from the position on.
      const p = t.position;
      if (msg.seq <= p.seq) {
        this.duplicates++;
        return;
      }
      if (msg.seq > p.seq + 1) {
        // The gateway announces every loss with `reset`; a jump without one is lost
        // publications all the same.
        this._resync(msg.topic, "gap", { seq: msg.seq - 1, epoch: p.epoch }, p);
        if (this._topics.get(msg.topic) !== t) return;
      }
      t.position = { seq: msg.seq, epoch: p.epoch };
    }
    const handlers = [...(t ? t.handlers : []), ...(this._listens.get(msg.topic) ?? [])];
    for (const h of handlers) {
      try {
        h(msg.data, msg);
      } catch (err) {
        this._emitError(err);
      }
    }
    this._emit("message", msg);
  }

  /** `reset`: publications after the position up to `seq` of `epoch` are lost. */
  _onReset(msg) {
    const t = this._topics.get(msg.topic);
    const to = toPosition(msg);
    if (!t || !to) return;
    const prev = t.position;
    // Nothing lost that was not already delivered: no news for the application.
    if (prev && prev.epoch === to.epoch && to.seq <= prev.seq) return;
    t.position = to;
    this._resync(msg.topic, "reset", to, prev);
  }

  /** Tells the application that a stream topic lost publications (one event for all causes). */
  _resync(topic, reason, to, previous) {
    this._emit("resync", {
      topic,
      reason,
      seq: to ? to.seq : null,
      epoch: to ? to.epoch : null,
      previous: previous ? { seq: previous.seq, epoch: previous.epoch } : null,
    });
  }

  _takeRequest(id) {
    const req = this._requests.get(id);
    if (!req) return null;
    this._requests.delete(id);
    clearTimeout(req.timer);
    return req;
  }

  /**
   * Sends a command now if open; otherwise (when `queue`) waits for the connection up to
   * offlineTimeoutMs. Resolves with the reply frame.
   */
  _command(frame, queue) {
    if (this.state === "open" && this._ws) return this._send(frame);
    if (!queue || this._opts.offlineTimeoutMs <= 0) {
      return Promise.reject(new WsgateError("offline", "not connected"));
    }
    if (this._queue.length >= this._opts.maxQueued) {
      return Promise.reject(new WsgateError("offline", `not connected and ${this._queue.length} commands already waiting`));
    }
    return new Promise((resolve, reject) => {
      const entry = { frame, resolve, reject, timer: null };
      entry.timer = setTimeout(() => {
        const i = this._queue.indexOf(entry);
        if (i >= 0) this._queue.splice(i, 1);
        reject(new WsgateError("offline", `not connected within ${this._opts.offlineTimeoutMs} ms`));
      }, this._opts.offlineTimeoutMs);
      this._queue.push(entry);
    });
  }

  /**
   * Sends a command with a fresh id on the open socket; resolves with the reply.
   * `onReply(reply)`, if given, runs synchronously when the reply frame is handled.
   */
  _send(frame, timeoutMs = this._opts.requestTimeoutMs, onReply = null) {
    const ws = this._ws;
    if (!ws || this.state !== "open") return Promise.reject(new WsgateError("offline", "not connected"));
    const id = this._nextId++;
    let text;
    try {
      text = JSON.stringify({ ...frame, id });
    } catch (err) {
      return Promise.reject(new WsgateError("bad_request", `cannot encode: ${err?.message ?? err}`));
    }
    // A frame over the server's limit would get the connection closed (1009): refuse it.
    if (text.length * 3 > this._opts.maxMessageBytes && new TextEncoder().encode(text).length > this._opts.maxMessageBytes) {
      return Promise.reject(new WsgateError("payload_too_large", `frame over ${this._opts.maxMessageBytes} bytes`));
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        if (this._requests.delete(id)) reject(new WsgateError("timeout", `no reply to ${frame.op} within ${timeoutMs} ms`));
      }, timeoutMs);
      this._requests.set(id, { resolve, reject, timer, onReply });
      try {
        ws.send(text);
      } catch (err) {
        this._requests.delete(id);
        clearTimeout(timer);
        reject(new WsgateError("disconnected", `send failed: ${err?.message ?? err}`));
      }
    });
  }

  // -- subscriptions ----------------------------------------------------------------------

  _scheduleFlush() {
    if (this._flushScheduled) return;
    this._flushScheduled = true;
    // Batches every subscribe()/unsubscribe() of the current task into one command each.
    queueMicrotask(() => {
      this._flushScheduled = false;
      this._flush();
    });
  }

  /** Sends pending unsubscribes, then pending subscribes (batched, split by frame size). */
  _flush() {
    if (this.state !== "open" || !this._ws) return;
    if (this._unsubs.size > 0) {
      const entries = [...this._unsubs.entries()];
      this._unsubs.clear();
      for (const batch of this._batches(entries.map(([topic]) => topic))) {
        const inBatch = new Set(batch);
        const waiters = entries.filter(([topic]) => inBatch.has(topic)).flatMap(([, w]) => w);
        const done = () => waiters.forEach((w) => w());
        this._send({ op: "unsubscribe", topics: batch }).then(done, (err) => {
          if (err.code !== "disconnected" && err.code !== "closed") this._emitError(err);
          done();
        });
      }
    }
    const solo = [];
    const batched = [];
    for (const [topic, t] of this._topics) {
      if (t.status !== "pending") continue;
      (t.solo ? solo : batched).push(topic);
    }
    // A topic with a `since` entry takes about twice the room (its name again, seq, epoch).
    const size = (topic) => {
      const p = this._topics.get(topic)?.position;
      return topic.length * 3 + 3 + (p ? topic.length * 3 + p.epoch.length * 6 + 40 : 0);
    };
    for (const batch of this._batches(batched, size)) this._subscribeBatch(batch);
    for (const topic of solo) this._subscribeBatch([topic]);
  }

  /** Splits topics into lists whose subscribe frame stays well under the frame limit. */
  _batches(topics, sizeOf = (topic) => topic.length * 3 + 3) {
    const budget = Math.max(256, this._opts.maxMessageBytes - 1024);
    const out = [];
    let cur = [];
    let size = 0;
    for (const topic of topics) {
      const len = sizeOf(topic);
      if (cur.length > 0 && size + len > budget) {
        out.push(cur);
        cur = [];
        size = 0;
      }
      cur.push(topic);
      size += len;
    }
    if (cur.length > 0) out.push(cur);
    return out;
  }

  _subscribeBatch(batch) {
    const entries = batch.map((topic) => [topic, this._topics.get(topic)]);
    // Resume every stream topic from its position (after a reconnect, or a `since`
    // given to subscribe()).
    let since = null;
    for (const [topic, t] of entries) {
      t.status = "sent";
      t.sinceSent = t.position ? { seq: t.position.seq, epoch: t.position.epoch } : null;
      if (t.sinceSent) (since ??= {})[topic] = t.sinceSent;
    }
    // Only topics still wanted, by the same entry, are affected by the reply.
    const live = () => entries.filter(([topic, t]) => this._topics.get(topic) === t && t.status === "sent");
    const frame = since ? { op: "subscribe", topics: batch, since } : { op: "subscribe", topics: batch };
    const onReply = (reply) => {
      for (const [topic, t] of entries) if (this._topics.get(topic) === t && t.status === "sent") this._streamStart(topic, t, reply);
    };
    this._send(frame, this._opts.requestTimeoutMs, onReply).then(
      () => {
        for (const [topic, t] of entries) {
          if (this._topics.get(topic) !== t) continue;
          // Still "sent" unless the socket closed since (then it resubscribes); the
          // confirmation resolves the waiters either way.
          if (t.status === "sent") t.status = "active";
          const waiters = t.waiters;
          t.waiters = [];
          for (const w of waiters) w.resolve();
        }
      },
      (err) => {
        if (err.code === "disconnected" || err.code === "closed") return; // resubscribed on reconnect
        const still = live();
        if (still.length === 0) return;
        if (batch.length > 1 && PER_TOPIC_CODES.has(err.code)) {
          // The server rejects a command whole: find the culprit(s) one topic at a time.
          for (const [, t] of still) {
            t.status = "pending";
            t.solo = true;
          }
          this._flush();
          return;
        }
        if (TRANSIENT_CODES.has(err.code) || err.code === "timeout") {
          this._emitError(err);
          for (const [, t] of still) t.status = "pending";
          this._clearTimer("retry");
          const delayMs = backoffDelay(2, this._opts, this._random) + 100;
          this._timers.retry = setTimeout(() => this._flush(), delayMs);
          return;
        }
        let told = false;
        for (const [topic, t] of still) {
          this._topics.delete(topic);
          for (const w of t.waiters) w.reject(err);
          told ||= t.waiters.length > 0;
          t.waiters = [];
        }
        // A resubscribe after a reconnect has no caller waiting: report it as an event.
        if (!told) this._emitError(err);
      },
    );
  }

  /**
   * Where a stream topic starts on this connection, from the `subscribed` reply (run
   * before any later frame is handled).
   */
  _streamStart(topic, t, reply) {
    const sent = t.sinceSent;
    t.sinceSent = null;
    const start = toPosition(reply.streams?.[topic]);
    if (!sent) {
      // First subscribe: delivery starts after the current position (null: not a stream).
      t.position = start;
      return;
    }
    if (start && reply.streams[topic].recovered === true) {
      // Recovered: the missed publications follow the reply; keep the position they
      // continue from.
      t.position = sent;
      return;
    }
    t.position = start;
    if (start && start.epoch === sent.epoch && start.seq === sent.seq) return; // nothing missed
    // Not recovered (history too short, another epoch, or the topic is no longer a
    // stream there): what was published meanwhile is not coming.
    this._resync(topic, "not_recovered", start, sent);
  }

  // -- liveness -------------------------------------------------------------------------

  /**
   * Browsers cannot see the server's WebSocket pings, so silence is measured on data
   * frames: after heartbeat_ms + idleMarginMs without any frame, a `ping` op probes the
   * link; no frame at all within pongTimeoutMs means the link is dead.
   */
  _armIdle() {
    this._clearTimer("idle");
    const idleMs = this._heartbeatMs + this._opts.idleMarginMs;
    const wait = Math.max(10, this._lastFrameAt + idleMs - Date.now());
    this._timers.idle = setTimeout(() => {
      this._timers.idle = null;
      if (this.state !== "open") return;
      // Idle: probe; the answer (any frame) re-arms this watch, its absence is a dead link.
      if (Date.now() - this._lastFrameAt >= idleMs) this._probe();
      else this._armIdle();
    }, wait);
  }

  _probe() {
    if (this.state !== "open" || this._timers.pong) return;
    this._timers.pong = setTimeout(() => {
      this._timers.pong = null;
      this._emit("dead", { url: this.url, idleMs: Date.now() - this._lastFrameAt });
      this._abandon("ping timeout");
    }, this._opts.pongTimeoutMs);
    this._send({ op: "ping" }, this._opts.pongTimeoutMs + 1000).catch(() => {});
  }

  // -- token refresh --------------------------------------------------------------------

  _scheduleRefresh(minMs = 1000) {
    this._clearTimer("refresh");
    if (!this._getToken || !this._connToken) return;
    const exp = tokenExpiresAt(this._connToken);
    if (exp === null) return;
    const delayMs = refreshDelay(exp, Date.now(), this._opts.refreshMarginMs, minMs);
    if (delayMs === null) return;
    this._timers.refresh = setTimeout(() => this._refresh(), delayMs);
  }

  async _refresh() {
    this._timers.refresh = null;
    const gen = this._gen;
    let token;
    try {
      token = await this._getToken();
    } catch (err) {
      this._emitError(new WsgateError("token", `getToken failed: ${err?.message ?? err}`));
      if (gen === this._gen && this.state === "open") this._scheduleRefresh(5000);
      return;
    }
    if (gen !== this._gen || this.state !== "open") {
      this._token = token;
      this._tokenFresh = true;
      return;
    }
    this._token = token;
    if (!token || token === this._connToken) {
      this._scheduleRefresh(5000);
      return;
    }
    this._sendRefresh(token);
  }

  _sendRefresh(token) {
    if (this._refreshUnsupported) return; // used at the next reconnect (after the 1008)
    const gen = this._gen;
    this._send({ op: "refresh", token }).then(
      () => {
        if (gen !== this._gen) return;
        this._connToken = token;
        this._scheduleRefresh();
      },
      (err) => {
        if (gen !== this._gen) return;
        if (err.code === "unknown_op") {
          // A gateway without the refresh op: the new token is used when this one's
          // expiry closes the connection (1008 -> reconnect with the new token).
          this._refreshUnsupported = true;
          this._tokenFresh = true;
          return;
        }
        if (err.code !== "disconnected" && err.code !== "closed") this._emitError(err);
        this._scheduleRefresh(5000);
      },
    );
  }

  // -- browser hooks --------------------------------------------------------------------

  _installBrowserHooks() {
    const g = globalThis;
    if (!this._opts.browserEvents || this._hooks || typeof g.addEventListener !== "function" || typeof g.document === "undefined") return;
    const online = () => {
      // Back online: skip the rest of the backoff, keeping a little jitter.
      if (this.state === "reconnecting") {
        this._scheduleReconnect(reconnectDelay("jitter", 0, this._opts, this._random), { code: 0, reason: "online" });
      }
    };
    const visible = () => {
      // Timers are throttled in hidden tabs and frozen in sleeping laptops: check the link
      // as soon as the page is looked at again.
      if (g.document.visibilityState === "visible" && this.state === "open" && Date.now() - this._lastFrameAt > this._opts.idleMarginMs) {
        this._probe();
      }
    };
    g.addEventListener("online", online);
    g.document.addEventListener("visibilitychange", visible);
    this._hooks = { online, visible };
  }

  _removeBrowserHooks() {
    if (!this._hooks) return;
    globalThis.removeEventListener("online", this._hooks.online);
    globalThis.document.removeEventListener("visibilitychange", this._hooks.visible);
    this._hooks = null;
  }

  // -- helpers --------------------------------------------------------------------------

  _setState(state, info) {
    const previous = this.state;
    this.state = state;
    this._emitState(state, info, previous);
  }

  _emitState(state, info, previous) {
    this._emit("state", state, { ...info, previous });
    this._emit(state, info);
  }

  _emit(event, ...args) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (err) {
        if (event === "error") console.error(err);
        else this._emitError(err);
      }
    }
  }

  _emitError(err) {
    if (this._listeners.get("error")?.size) this._emit("error", err);
    else console.error("wsgate:", err);
  }

  _clearTimer(name) {
    if (this._timers[name]) {
      clearTimeout(this._timers[name]);
      this._timers[name] = null;
    }
  }

  _clearConnectionTimers() {
    for (const name of ["connect", "idle", "pong", "refresh", "wsRetry"]) this._clearTimer(name);
  }
}

/**
 * Connects to a wsgate gateway and keeps the connection up.
 * @param {string | string[] | Function} url a `ws(s)://…/ws` URL (relative URLs resolve
 *   against the page), a list of node URLs (tried in turn: each reconnect moves on to the
 *   next), or a function `({attempt, previous}) => url`.
 * @param {object} [options] `token`, `getToken`, `WebSocket` and DEFAULTS overrides.
 * @returns {WsgateClient}
 */
export function connect(url, options = {}) {
  return new WsgateClient(url, options);
}

export default connect;
