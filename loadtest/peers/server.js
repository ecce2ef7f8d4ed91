// Baseline peer for wsgate's benchmarks: the WebSocket pub/sub relay that a tutorial
// would write with Node's `ws` and `redis` packages. It speaks the part of wsgate's
// JSON protocol v1 that the load generator uses (welcome, subscribe/subscribed,
// unsubscribe/unsubscribed, publish/published, ping/pong, message, error) and the HTTP
// publish API, and relays every publication through Redis PUBLISH/SUBSCRIBE on
// channels `<prefix><topic>`, exactly like wsgate. Nothing here is tuned: it is the
// straightforward design a team would start from.
//
// Configuration (environment):
//   PEER_LISTEN  host:port to listen on (default 127.0.0.1:8090; port 0 = any free)
//   REDIS_URL    redis://127.0.0.1:6379
//   REDIS_PREFIX wsgate:
// Prints `listening <port>` on stdout once ready.
'use strict';

const http = require('http');
const crypto = require('crypto');
const { WebSocketServer } = require('ws');
const { createClient } = require('redis');

const [HOST, PORT] = (process.env.PEER_LISTEN || '127.0.0.1:8090').split(':');
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const PREFIX = process.env.REDIS_PREFIX || 'wsgate:';
const TOPIC_RE = /^[A-Za-z0-9_.:/-]{1,200}$/;
const NODE_ID = `peer-${process.pid}`;

// topic -> Set of sockets subscribed to it on this node.
const topics = new Map();

async function main() {
  const pub = createClient({ url: REDIS_URL });
  const sub = pub.duplicate();
  pub.on('error', (e) => console.error('redis:', e.message));
  sub.on('error', (e) => console.error('redis:', e.message));
  await pub.connect();
  await sub.connect();

  // The Redis payload is the publication's JSON; splice it into the envelope.
  function deliver(topic, payload) {
    const sockets = topics.get(topic);
    if (!sockets) return;
    let data = payload;
    try {
      JSON.parse(payload);
    } catch {
      data = JSON.stringify(payload);
    }
    const frame = `{"op":"message","topic":${JSON.stringify(topic)},"data":${data}}`;
    for (const ws of sockets) {
      if (ws.readyState === ws.OPEN) ws.send(frame);
    }
  }

  async function subscribe(ws, topic) {
    let sockets = topics.get(topic);
    if (!sockets) {
      sockets = new Set();
      topics.set(topic, sockets);
      await sub.subscribe(PREFIX + topic, (message) => deliver(topic, message));
    }
    sockets.add(ws);
    ws.topics.add(topic);
  }

  async function unsubscribe(ws, topic) {
    ws.topics.delete(topic);
    const sockets = topics.get(topic);
    if (!sockets) return;
    sockets.delete(ws);
    if (sockets.size === 0) {
      topics.delete(topic);
      await sub.unsubscribe(PREFIX + topic);
    }
  }

  const server = http.createServer((req, res) => {
    if (req.method !== 'POST' || req.url !== '/api/publish') {
      res.writeHead(404).end();
      return;
    }
    let body = '';
    req.on('data', (chunk) => (body += chunk));
    req.on('end', async () => {
      let items;
      try {
        const parsed = JSON.parse(body);
        items = Array.isArray(parsed) ? parsed : [parsed];
        if (!items.every((i) => i && TOPIC_RE.test(i.topic) && 'data' in i)) throw new Error('shape');
      } catch {
        res.writeHead(400, { 'content-type': 'application/json' }).end('{"error":"bad_request"}');
        return;
      }
      try {
        await Promise.all(items.map((i) => pub.publish(PREFIX + i.topic, JSON.stringify(i.data))));
        res.writeHead(200, { 'content-type': 'application/json' }).end(`{"published":${items.length}}`);
      } catch {
        res.writeHead(503, { 'content-type': 'application/json' }).end('{"error":"unavailable"}');
      }
    });
  });

  const wss = new WebSocketServer({ server, path: '/ws' });
  wss.on('connection', (ws) => {
    ws.topics = new Set();
    ws.send(JSON.stringify({ op: 'welcome', session: crypto.randomUUID(), node: NODE_ID, heartbeat_ms: 25000 }));
    const reply = (obj) => ws.send(JSON.stringify(obj));
    const error = (id, code, message) => reply({ op: 'error', id: id ?? null, code, message });

    ws.on('message', async (raw, isBinary) => {
      if (isBinary) return error(null, 'bad_request', 'binary frames are not accepted');
      let cmd;
      try {
        cmd = JSON.parse(raw.toString());
      } catch {
        return error(null, 'bad_request', 'not JSON');
      }
      const id = Number.isInteger(cmd && cmd.id) ? cmd.id : null;
      if (!cmd || typeof cmd.op !== 'string') return error(id, 'bad_request', 'missing op');
      try {
        switch (cmd.op) {
          case 'subscribe':
          case 'unsubscribe': {
            if (!Array.isArray(cmd.topics) || cmd.topics.length === 0) return error(id, 'bad_request', 'topics');
            if (!cmd.topics.every((t) => typeof t === 'string' && TOPIC_RE.test(t))) {
              return error(id, 'invalid_topic', 'invalid topic');
            }
            for (const t of cmd.topics) {
              if (cmd.op === 'subscribe') await subscribe(ws, t);
              else await unsubscribe(ws, t);
            }
            return reply({ op: cmd.op === 'subscribe' ? 'subscribed' : 'unsubscribed', id, topics: cmd.topics });
          }
          case 'publish': {
            if (typeof cmd.topic !== 'string' || !('data' in cmd)) return error(id, 'bad_request', 'topic and data');
            if (!TOPIC_RE.test(cmd.topic)) return error(id, 'invalid_topic', 'invalid topic');
            await pub.publish(PREFIX + cmd.topic, JSON.stringify(cmd.data));
            return reply({ op: 'published', id });
          }
          case 'ping':
            return reply({ op: 'pong', id });
          default:
            return error(id, 'unknown_op', `unknown op ${cmd.op}`);
        }
      } catch (e) {
        return error(id, 'unavailable', e.message);
      }
    });

    ws.on('close', () => {
      for (const t of [...ws.topics]) unsubscribe(ws, t).catch(() => {});
    });
    ws.on('error', () => {});
  });

  server.listen(Number(PORT), HOST, () => {
    console.log(`listening ${server.address().port}`);
  });

  const stop = () => {
    wss.close();
    server.close();
    Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
