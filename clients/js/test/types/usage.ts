// Compile-only check of wsgate.d.ts (run by types.test.js with tsc --noEmit --strict).
import connect, {
  WsgateClient,
  WsgateError,
  backoffDelay,
  closePolicy,
  type ClosePolicy,
  type Json,
  type Position,
  type PresenceClient,
  type PresenceStats,
  type Resync,
  type Welcome,
} from "../../wsgate.js";
import WebSocket from "ws";

interface Tick {
  symbol: string;
  price: number;
}

const client: WsgateClient = connect(["ws://127.0.0.1:8080/ws", "ws://127.0.0.1:8081/ws"], {
  WebSocket,
  getToken: async () => "token",
  backoffMaxMs: 10_000,
  sseAfterFailures: 3,
  wsRetryMs: 30_000,
  publishUrl: "/api/publish",
  publishHeaders: { authorization: "Bearer key" },
});
const transport: "websocket" | "sse" = client.transport;
void transport;
client.on("transport", (i) => console.log(i.transport));
// @ts-expect-error: the transport is read-only
client.transport = "sse";
client.on("open", (w) => {
  const node: string = w.node;
  const welcome: Welcome | null = client.welcome;
  void node;
  void welcome;
});
client.on("state", (state, info) => {
  if (state === "reconnecting") console.log(info.delayMs);
});
client.on("error", (e) => console.log(e.message));
void client.subscribe<Tick>("demo.ticker", (tick, msg) => {
  const p: number = tick.price;
  const topic: string = msg.topic;
  void p;
  void topic;
});
const data: Json = { a: [1, "b", null, { c: true }] };
client.publish("chat.1", data).catch((e: unknown) => {
  if (e instanceof WsgateError && e.code === "invalid_topic") console.log(e.message);
});
// Streams: positions, resume from a saved one, resync events, publish positions.
void client.subscribe<{ text: string }>(
  "chat:room",
  (d, msg) => {
    const seq: number | undefined = msg.seq;
    void d.text;
    void seq;
  },
  { since: { seq: 41, epoch: "x7f" } },
);
void client.subscribe("chat:other", null, { since: null });
const pos: Position | null = client.position("chat:room");
const all: Record<string, Position> = client.positions();
void pos;
void all;
client.on("resync", (r: Resync) => {
  if (r.reason === "reset" && r.seq !== null) console.log(r.topic, r.seq, r.epoch, r.previous?.seq);
});
void client.publish("chat:room", { text: "hi" }).then((p) => p?.seq);
const dups: number = client.duplicates;
void dups;
// @ts-expect-error a position needs an epoch
void client.subscribe("chat:x", null, { since: { seq: 1 } });
const policy: ClosePolicy = closePolicy(4010);
const delay: number = backoffDelay(3, { backoffInitialMs: 100 }, Math.random);
void policy;
void delay;
void client.ping().then((rtt: number) => rtt);
// Presence: the list, the counts, join/leave, and a stale list.
void client.presence("room.1").then((list: PresenceClient[]) => {
  for (const c of list) {
    const user: string | null = c.user;
    console.log(c.session, user, c.node);
  }
});
void client.presenceStats("room.1").then((s: PresenceStats) => s.clients + s.users);
client.on("join", ({ topic, session, user }) => console.log(topic, session, user ?? "anonymous"));
client.on("leave", (e) => console.log(e.session));
client.on("presence_changed", ({ topic, skipped }) => console.log(topic, skipped));
// Server-made subscriptions (token claim, server API).
client.on("subscribed", ({ topics, server }) => {
  const t: string[] = topics;
  const s: true = server;
  void t;
  void s;
});
client.on("unsubscribed", (e) => console.log(e.topics.length));
const stopListening: () => void = client.listen<{ level: string }>("alerts", (d, msg) => console.log(d.level, msg.topic));
stopListening();
const serverTopics: string[] = client.serverTopics();
void serverTopics;
client.on("closed", (info) => {
  if (info.kicked) console.log("disconnected by the server API:", info.reason);
});
const kickable = connect("ws://127.0.0.1:8080/ws", { WebSocket, reconnectOnKick: true });
kickable.close();
client.close();

// @ts-expect-error publish needs data
void client.publish("t");
// @ts-expect-error unknown event
client.on("nope", () => {});
// @ts-expect-error listen needs a handler
client.listen("alerts");
// @ts-expect-error presence needs a topic
void client.presence();
