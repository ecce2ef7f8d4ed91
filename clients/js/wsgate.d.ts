// Type definitions for wsgate.js, the client of the wsgate WebSocket pub/sub gateway.

/** Any value that survives JSON.stringify / JSON.parse. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** Protocol version this client speaks (with the v1.1 stream fields). */
export declare const PROTOCOL_VERSION: 1;

/** The connection state. `closed` is final (close(), or a 1008 without a new token). */
export type State = "connecting" | "open" | "reconnecting" | "closed";

/** The server's first frame on every connection. */
export interface Welcome {
  /** Session id, new on every connection. */
  session: string;
  /** Id of the gateway node serving this connection. */
  node: string;
  /** Interval of the server's WebSocket pings, in milliseconds. */
  heartbeat_ms: number;
  /**
   * Base delay before reconnecting after losing this connection without a hint (sent by
   * nodes that limit their upgrade rate); the client's backoff starts from it.
   */
  reconnect_ms?: number;
}

/** A publication as received. Later protocol versions may add fields. */
export interface Message<T = Json> {
  op: "message";
  topic: string;
  data: T;
  /** On a stream topic: the publication's number in its stream (one more than the previous). */
  seq?: number;
  [extra: string]: unknown;
}

/** A place in a stream: publications after `seq` in `epoch` come next. */
export interface Position {
  seq: number;
  epoch: string;
}

/**
 * A stream topic lost publications the client cannot get back: the application resyncs
 * it by other means (its backend, or `POST /api/history`).
 * - `not_recovered`: a resume (`since`, after a reconnect or given to subscribe())
 *   failed: the gateway's history no longer has what followed `previous`, or the epoch
 *   changed. `seq`/`epoch` are where delivery continues (both null when the topic is no
 *   longer a stream on that gateway).
 * - `reset`: the gateway lost publications while subscribed: those after `previous` up
 *   to `seq` of `epoch` are gone.
 * - `gap`: a `seq` jumped without a `reset` (a gateway breaking its contract).
 */
export interface Resync {
  topic: string;
  reason: "not_recovered" | "reset" | "gap";
  /** Delivery continues after this seq (null only for a topic that is no longer a stream). */
  seq: number | null;
  epoch: string | null;
  /** The position before: the last publication delivered (or resumed from). */
  previous: Position | null;
}

export interface SubscribeOptions {
  /**
   * Resume from this position (e.g. saved from `position()` before a page reload): the
   * publications after it are delivered first. Used only when the topic is not yet
   * subscribed.
   */
  since?: Position | null;
}

export type MessageHandler<T = Json> = (data: T, message: Message<T>) => void;

/** A connection in a presence topic (from `presence()`). */
export interface PresenceClient {
  /** The connection's session id (its `welcome.session`). */
  session: string;
  /** The authenticated user (the token's subject); null for an anonymous connection. */
  user: string | null;
  /** The gateway node serving it. */
  node: string;
  [extra: string]: unknown;
}

/** Counts of a presence topic (from `presenceStats()`). */
export interface PresenceStats {
  /** Connections in the topic. */
  clients: number;
  /** Distinct users among them (anonymous connections not counted). */
  users: number;
}

/** Someone else joined or left a presence topic this connection is subscribed to. */
export interface PresenceEvent {
  topic: string;
  session: string;
  user: string | null;
  [extra: string]: unknown;
}

/**
 * The per-topic rate rule skipped `skipped` join/leave events: a list kept from
 * `presence()` and join/leave is stale; query `presence()` again.
 */
export interface PresenceChanged {
  topic: string;
  skipped: number;
  [extra: string]: unknown;
}

/**
 * The server subscribed this connection to topics (the token's `topics` claim right after
 * `welcome`, or `POST /api/subscribe`), or unsubscribed it (`POST /api/unsubscribe`).
 */
export interface ServerSubscription {
  topics: string[];
  /** Always true: the event is for the server's own changes, not replies to subscribe(). */
  server: true;
  /** On `subscribed`, for stream topics: where each starts (`{seq, epoch}`). */
  streams?: Record<string, Position & { [extra: string]: unknown }>;
}

/**
 * Error codes: the server's (`bad_request`, `unknown_op`, `invalid_topic`, `forbidden`,
 * `too_many_topics`, `rate_limited`, `payload_too_large`, `unavailable`, `internal`,
 * `not_enabled`: presence asked of a topic without it) and the client's own:
 * - `disconnected`: the connection dropped after the command was sent; outcome unknown.
 * - `offline`: no connection within `offlineTimeoutMs`; the command was never sent.
 * - `timeout`: no reply within `requestTimeoutMs`.
 * - `closed`: the client is closed for good.
 * - `token`: the token callback failed (reported through the `error` event).
 * - `connect`: the WebSocket constructor threw (reported through the `error` event).
 */
export type ErrorCode =
  | "bad_request"
  | "unknown_op"
  | "invalid_topic"
  | "forbidden"
  | "too_many_topics"
  | "rate_limited"
  | "payload_too_large"
  | "unavailable"
  | "internal"
  | "not_enabled"
  | "disconnected"
  | "offline"
  | "timeout"
  | "closed"
  | "token"
  | "connect"
  | (string & {});

export declare class WsgateError extends Error {
  constructor(code: ErrorCode, message?: string);
  readonly name: "WsgateError";
  readonly code: ErrorCode;
}

/** A constructor compatible with the browser's WebSocket (e.g. the `ws` package). */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string; wasClean: boolean }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  /** Optional (the `ws` package has it): drops the socket without a close handshake. */
  terminate?(): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** Where to connect: one URL, a list of nodes (each reconnect moves to the next), or a chooser. */
export type UrlSource = string | string[] | ((ctx: { attempt: number; previous: string | null }) => string);

export interface Options {
  /** Token for the first connection (sent as the `token` query parameter). */
  token?: string;
  /**
   * Called for a token before every reconnect, before the current token's `exp`
   * (then sent with the `refresh` op), and after a 1008 close: a different token
   * reconnects, the same one stops the client.
   */
  getToken?: () => string | Promise<string>;
  /** WebSocket implementation; defaults to the global `WebSocket`. */
  WebSocket?: WebSocketConstructor | (new (url: string) => unknown);
  /** Random source in [0, 1) for the jitter (tests). */
  random?: () => number;
  /** Base for relative URLs; defaults to `location.href` in a browser. */
  base?: string;
  /** First backoff cap in ms (default 500); doubles per failed attempt. */
  backoffInitialMs?: number;
  /** Largest backoff cap in ms (default 30000). */
  backoffMaxMs?: number;
  /** Backoff growth factor (default 2). */
  backoffFactor?: number;
  /**
   * After a 1001 (node draining) or 1012, reconnect after a random 0..this ms (default
   * 1000), added to the close reason's `retry=` hint when there is one.
   */
  goingAwayMaxDelayMs?: number;
  /** A connection open this long resets the backoff (default 5000 ms). */
  stableAfterMs?: number;
  /** Open + welcome must happen within this (default 10000 ms). */
  connectTimeoutMs?: number;
  /** Reply timeout for commands sent on an open connection (default 10000 ms). */
  requestTimeoutMs?: number;
  /** How long publish()/ping() wait for a connection while disconnected (default 10000 ms; 0: reject at once). */
  offlineTimeoutMs?: number;
  /** At most this many commands wait for a connection; more reject with `offline` (default 256). */
  maxQueued?: number;
  /** Heartbeat assumed before the welcome (default 25000 ms). */
  heartbeatMs?: number;
  /** Probe with a `ping` op after heartbeat_ms + this ms of silence (default 5000). */
  idleMarginMs?: number;
  /** A probe with no answer within this closes the socket and reconnects (default 10000 ms). */
  pongTimeoutMs?: number;
  /** Refresh the token this long before `exp`, at most half its remaining life (default 60000 ms). */
  refreshMarginMs?: number;
  /** Frames over this are refused locally with `payload_too_large` (default 65536). */
  maxMessageBytes?: number;
  /** Use the browser's `online`/`visibilitychange` events (default true). */
  browserEvents?: boolean;
  /**
   * After a close 4010 (disconnected by the server API), reconnect with backoff instead
   * of stopping (default false: a kicked client stays `closed`).
   */
  reconnectOnKick?: boolean;
  /** EventSource implementation for the SSE fallback; defaults to the global `EventSource`. */
  EventSource?: new (url: string) => unknown;
  /**
   * Fall back to Server-Sent Events (`GET /sse`) when WebSocket attempts fail
   * `sseAfterFailures` times in a row before `welcome` (default true, when an
   * EventSource exists).
   */
  sseFallback?: boolean;
  /** WebSocket attempts that fail before `welcome` before the SSE fallback (default 2). */
  sseAfterFailures?: number;
  /** On SSE, try a WebSocket again after this long and switch back if it works (default 60000 ms; 0: never). */
  wsRetryMs?: number;
  /** The SSE endpoint, or a function of the WebSocket URL (default: that URL with http(s) and `/sse` for `/ws`). */
  sseUrl?: string | ((wsUrl: string) => string) | null;
  /** Over SSE, publish() POSTs `{topic, data}` here (e.g. `/api/publish`); null: publish() rejects with `unsupported`. */
  publishUrl?: string | null;
  /** Headers of those POSTs (e.g. `{ authorization: "Bearer <api key>" }`). */
  publishHeaders?: Record<string, string> | null;
}

/** The transport a client uses. */
export type Transport = "websocket" | "sse";

export interface StateInfo {
  previous?: State;
  url?: string;
  attempt?: number;
  delayMs?: number;
  code?: number;
  reason?: string;
  session?: string;
  node?: string;
  heartbeat_ms?: number;
  byClient?: boolean;
  policy?: boolean;
  /** Closed for good by a 4010 (disconnected by the server API). */
  kicked?: boolean;
}

/** Why the client closed for good. */
export interface CloseInfo {
  code: number;
  reason: string;
  /** `close()` was called. */
  byClient?: boolean;
  /** A 1008 with no new token (setToken() restarts). */
  policy?: boolean;
  /** A 4010: disconnected by the server API (no reconnect unless `reconnectOnKick`). */
  kicked?: boolean;
}

export interface DisconnectInfo {
  code: number;
  reason: string;
  wasClean?: boolean;
  /** True when the client itself gave up on the socket (ping or connect timeout). */
  local?: boolean;
  /** The HTTP status of a refused upgrade (only where the socket shows it: Node's `ws`). */
  status?: number;
  /** The wait a refused upgrade asked for (503 `overloaded`), honoured for the next attempt. */
  retryAfterMs?: number;
  url: string | null;
}

export interface Events {
  /** Every state change. */
  state: (state: State, info: StateInfo) => void;
  connecting: (info: { attempt: number; url: string }) => void;
  open: (info: Welcome & { url: string; transport: Transport }) => void;
  /** The client changed transport (WebSocket → SSE fallback, or back). */
  transport: (info: { transport: Transport }) => void;
  reconnecting: (info: { delayMs: number; attempt: number; code: number; reason: string }) => void;
  closed: (info: CloseInfo) => void;
  /** A socket ended (or an attempt failed), before the reconnect decision. */
  disconnect: (info: DisconnectInfo) => void;
  /** The idle probe went unanswered: the link is dead. */
  dead: (info: { url: string | null; idleMs: number }) => void;
  /** Every publication received, after the topic handlers (stream duplicates dropped). */
  message: (message: Message) => void;
  /** A stream topic lost publications (failed resume, `reset`, or a seq gap): resync it. */
  resync: (info: Resync) => void;
  /** Another connection joined a presence topic this one is subscribed to (never its own). */
  join: (info: PresenceEvent) => void;
  /** Another connection left a presence topic this one is subscribed to. */
  leave: (info: PresenceEvent) => void;
  /** Join/leave events were skipped by the rate rule: query presence() again. */
  presence_changed: (info: PresenceChanged) => void;
  /** The server subscribed this connection to topics (not a reply to subscribe()). */
  subscribed: (info: ServerSubscription) => void;
  /** The server unsubscribed this connection from topics. */
  unsubscribed: (info: ServerSubscription) => void;
  /** Errors not tied to a call (an `error` frame with id null, a handler that threw, ...). */
  error: (error: WsgateError | Error) => void;
}

export declare class WsgateClient {
  constructor(url: UrlSource, options?: Options);
  /** Current state. */
  readonly state: State;
  /** The transport in use: `"websocket"`, or `"sse"` after the fallback. */
  readonly transport: Transport;
  /** The current connection's welcome; null when not open. */
  readonly welcome: Welcome | null;
  /** URL of the current (or last) socket, without the token. */
  readonly url: string | null;
  /** Connections opened after the first one. */
  readonly reconnects: number;
  /** Stream messages dropped because they had already been delivered. */
  readonly duplicates: number;
  /** Why the client closed for good, once `state` is `closed`. */
  readonly closeInfo: CloseInfo | null;

  on<E extends keyof Events>(event: E, fn: Events[E]): () => void;
  off<E extends keyof Events>(event: E, fn: Events[E]): void;
  once<E extends keyof Events>(event: E, fn: Events[E]): () => void;

  /**
   * Subscribes (kept across reconnects; a stream topic resumes from its position).
   * Resolves once the server confirmed it; rejects with the server's code (the handler
   * is then dropped), `bad_request` (a malformed `since`) or `closed`.
   */
  subscribe<T = Json>(topic: string, handler?: MessageHandler<T> | null, options?: SubscribeOptions): Promise<void>;
  /** Removes one handler, or all; unsubscribes from the server when none is left. */
  unsubscribe(topic: string, handler?: MessageHandler<any>): Promise<void>;
  /** Topics currently wanted. */
  topics(): string[];
  /** Last delivered position of a stream topic; null if not subscribed, not a stream, or not known yet. */
  position(topic: string): Position | null;
  /** Every known stream position, by topic (to save for a resume after a page reload). */
  positions(): Record<string, Position>;
  /**
   * Handler for the messages of a topic the server subscribes this connection to (token
   * claim, server API), without subscribing; kept across reconnects. Returns its remover.
   */
  listen<T = Json>(topic: string, handler: MessageHandler<T>): () => void;
  /** Topics the server subscribed the current connection to (empty when not open). */
  serverTopics(): string[];
  /**
   * Who is in a presence topic, on every node. Waits for a connection like publish();
   * rejects with the server's code (`not_enabled`, `forbidden`, `invalid_topic`,
   * `unavailable`) or a client code.
   */
  presence(topic: string): Promise<PresenceClient[]>;
  /** Connection and user counts of a presence topic; rejects like presence(). */
  presenceStats(topic: string): Promise<PresenceStats>;
  /**
   * Resolves on `published`: with the publication's position on a stream topic, else
   * `undefined`. Rejects with a WsgateError (see ErrorCode).
   */
  publish(topic: string, data: Json): Promise<Position | undefined>;
  /** Round-trip time of a `ping` op, in ms. */
  ping(): Promise<number>;
  /** Supplies a new token (refresh op if open; restarts after a 1008 stop). */
  setToken(token: string): void;
  /** Closes for good. */
  close(code?: number, reason?: string): void;
}

/** Connects and keeps the connection up. */
export declare function connect(url: UrlSource, options?: Options): WsgateClient;
export default connect;

/** Default options. */
export declare const DEFAULTS: Readonly<Required<Omit<Options, "token" | "getToken" | "WebSocket" | "random" | "base">>>;

/** Full-jitter exponential backoff: random() * min(max, initial * factor^attempt). */
export declare function backoffDelay(
  attempt: number,
  opts?: Pick<Options, "backoffInitialMs" | "backoffMaxMs" | "backoffFactor">,
  random?: () => number,
): number;
/** Reconnect policy for a close code. */
export type ClosePolicy = "jitter" | "new-token" | "kicked" | "backoff";
/** Reconnect policy for a close code (`kicked`: 4010, stop unless `reconnectOnKick`). */
export declare function closePolicy(code: number): ClosePolicy;
/** Delay before the next attempt for a policy (`kicked` backs off like `backoff`). */
export declare function reconnectDelay(
  policy: ClosePolicy,
  attempt: number,
  opts?: Options,
  random?: () => number,
  hintMs?: number | null,
): number;
/** The largest reconnect hint honoured, in ms (60000). */
export declare const MAX_RETRY_HINT_MS: number;
/** The `retry=<ms>` hint at the end of a close reason; null without one. */
export declare function retryHint(reason?: string): number | null;
/**
 * The wait a refused upgrade asked for (503/429: body `retry_after_ms`, else
 * `Retry-After` seconds plus up to 1 s of jitter); null without one.
 */
export declare function refusalDelay(status: number, retryAfter: string | undefined, body: string, random?: () => number): number | null;
/** JWT payload, decoded without verification; null if not a JWT. */
export declare function decodeJwtPayload(token: string): Record<string, unknown> | null;
/** `exp` of a JWT in ms since the epoch; null if none. */
export declare function tokenExpiresAt(token: string): number | null;
/** Delay before refreshing a token; null if already expired. */
export declare function refreshDelay(expiresAt: number, now: number, marginMs?: number, minMs?: number): number | null;
/** Absolute ws(s) URL (http(s) mapped, relative resolved against base). */
export declare function resolveUrl(url: string, base?: string): string;
/** `{seq, epoch}` copied from a value, or null when it is not a valid position. */
export declare function toPosition(value: unknown): Position | null;
/** URL with the `token` query parameter set. */
export declare function withToken(url: string, token: string | null | undefined): string;
/** The SSE URL of a WebSocket URL (http(s), `/ws` → `/sse`). */
export declare function sseUrlOf(wsUrl: string): string;
/** Stream positions in the gateway's SSE id encoding (`v1.` + base64url of the `since` JSON). */
export declare function encodeSseId(positions: Record<string, Position>): string;
/** A WebSocket look-alike over Server-Sent Events (used by the client's fallback). */
export declare class SseSocket {
  constructor(
    EventSourceImpl: new (url: string) => unknown,
    url: string,
    topics: string[],
    since: Record<string, Position>,
    opts?: { publishUrl?: string | null; publishHeaders?: Record<string, string> | null; base?: string },
  );
  readyState: number;
  send(text: string): void;
  close(code?: number, reason?: string): void;
}
