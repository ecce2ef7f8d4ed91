// Test helpers: real gateway processes on free loopback ports, a real Redis, a TCP proxy
// that can stop forwarding (a dead link), and small waiting utilities.
//
// Nothing here imitates the gateway: every integration test talks to the `wsgate` binary.

import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";

const here = path.dirname(fileURLToPath(import.meta.url));
/** The repository root (this file is clients/js/test/helpers.js). */
export const repoRoot = path.resolve(here, "../../..");
/** Where tests leave screenshots and logs (gitignored). */
export const artifactsDir = path.join(repoRoot, "test-artifacts");

let builtOnce = false;

/** Path of the gateway binary: $WSGATE_BIN, else target/debug/wsgate (built if missing). */
export function wsgateBin() {
  if (process.env.WSGATE_BIN) return path.resolve(process.env.WSGATE_BIN);
  const bin = path.join(repoRoot, "target", "debug", "wsgate");
  if (!existsSync(bin) && !builtOnce) {
    builtOnce = true;
    const r = spawnSync("cargo", ["build", "-p", "wsgate"], { cwd: repoRoot, stdio: "inherit" });
    if (r.status !== 0) throw new Error("cargo build -p wsgate failed");
  }
  return bin;
}

/** The gateway's --help text, to find out which optional flags this build has. */
export function gatewayHelp() {
  const r = spawnSync(wsgateBin(), ["--help"], { encoding: "utf8" });
  return `${r.stdout}${r.stderr}`;
}

/** A TCP port free on 127.0.0.1 right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it returns a truthy value (returned), or throws after `timeoutMs`. */
export async function waitFor(fn, { timeoutMs = 10000, intervalMs = 20, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}

/** Resolves or rejects like `promise`, or rejects after `timeoutMs`. */
export function within(promise, timeoutMs, what = "operation") {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not done within ${timeoutMs} ms`)), timeoutMs);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Resolves with the arguments of the next `event` emitted by a wsgate client. */
export function nextEvent(client, event, timeoutMs = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no '${event}' event within ${timeoutMs} ms`));
    }, timeoutMs);
    const off = client.on(event, (...args) => {
      clearTimeout(timer);
      off();
      resolve(args.length <= 1 ? args[0] : args);
    });
  });
}

async function httpOk(url) {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(1000) });
    await res.arrayBuffer();
    return res.ok;
  } catch {
    return false;
  }
}

/**
 * Starts a gateway on `port` (default: a free one) with its admin listener on another
 * free port, and waits until /readyz says ready.
 * @returns {Promise<Gateway>}
 */
export async function startGateway({ port, adminPort, args = [], env = {}, name = "gw" } = {}) {
  port ??= await freePort();
  adminPort ??= await freePort();
  const argv = ["--listen", `127.0.0.1:${port}`, "--admin-listen", `127.0.0.1:${adminPort}`, ...args];
  const proc = spawn(wsgateBin(), argv, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "info", ...env },
  });
  const gw = new Gateway(name, proc, port, adminPort);
  try {
    await waitFor(async () => gw.exitCode !== null || (await httpOk(`${gw.adminUrl}/readyz`)), {
      timeoutMs: 20000,
      what: `${name} ready on ${port}`,
    });
  } catch (err) {
    gw.kill("SIGKILL");
    throw new Error(`${err.message}\n--- ${name} log ---\n${gw.log}`);
  }
  if (gw.exitCode !== null) throw new Error(`${name} exited with ${gw.exitCode}\n--- log ---\n${gw.log}`);
  return gw;
}

/** A running gateway process. */
export class Gateway {
  constructor(name, proc, port, adminPort) {
    this.name = name;
    this.proc = proc;
    this.port = port;
    this.adminPort = adminPort;
    this.wsUrl = `ws://127.0.0.1:${port}/ws`;
    this.httpUrl = `http://127.0.0.1:${port}`;
    this.adminUrl = `http://127.0.0.1:${adminPort}`;
    this.log = "";
    this.exitCode = null;
    const keep = (chunk) => {
      this.log += chunk;
      if (this.log.length > 200000) this.log = this.log.slice(-100000);
    };
    proc.stdout.setEncoding("utf8").on("data", keep);
    proc.stderr.setEncoding("utf8").on("data", keep);
    this.exited = new Promise((resolve) => {
      proc.on("exit", (code, signal) => {
        this.exitCode = code ?? signal;
        resolve(this.exitCode);
      });
    });
    running.add(this);
    this.exited.then(() => running.delete(this));
  }

  /** Sends a signal to this process (by its own pid). */
  kill(signal = "SIGTERM") {
    if (this.exitCode === null) this.proc.kill(signal);
  }

  /** SIGTERM (graceful drain), then SIGKILL if still alive after `graceMs`. */
  async stop(graceMs = 15000) {
    if (this.exitCode !== null) return this.exitCode;
    this.kill("SIGTERM");
    const t = setTimeout(() => this.kill("SIGKILL"), graceMs);
    const code = await this.exited;
    clearTimeout(t);
    return code;
  }

  /**
   * POST (or GET when `body` is undefined) to the HTTP API at `path` (e.g.
   * `/api/presence`); returns { status, body, json } (json null when not JSON).
   */
  async api(path, body, { apiKey, timeoutMs = 10000 } = {}) {
    const headers = { ...(body === undefined ? {} : { "content-type": "application/json" }), ...(apiKey ? { authorization: `Bearer ${apiKey}` } : {}) };
    const res = await fetch(`${this.httpUrl}${path}`, {
      method: body === undefined ? "GET" : "POST",
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(timeoutMs),
    });
    const text = await res.text();
    let json = null;
    try {
      json = JSON.parse(text);
    } catch {
      /* not JSON */
    }
    return { status: res.status, body: text, json };
  }

  /** POST /api/publish; returns { status, body }. Rejects after `timeoutMs`. */
  async publish(topic, data, { headers = {}, timeoutMs = 10000 } = {}) {
    const res = await fetch(`${this.httpUrl}/api/publish`, {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: JSON.stringify({ topic, data }),
      signal: AbortSignal.timeout(timeoutMs),
    });
    return { status: res.status, body: await res.text() };
  }
}

const running = new Set();

/** Kills every gateway still running (call from an `after` hook). */
export async function stopAll() {
  await Promise.all([...running].map((gw) => gw.stop(3000)));
}

/** A WebSocket constructor (the `ws` package) that records the frames the client sends. */
export function recordingWebSocket() {
  const sent = [];
  const sockets = [];
  class RecordingWebSocket extends WebSocket {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
    send(data, ...rest) {
      sent.push(typeof data === "string" ? JSON.parse(data) : data);
      return super.send(data, ...rest);
    }
  }
  return { WebSocket: RecordingWebSocket, sent, sockets };
}

/**
 * A TCP proxy on a free loopback port forwarding to `targetPort`. `freeze()` makes every
 * current connection silently drop bytes both ways while staying open: from the client's
 * side, a link that died without a FIN or RST (a sleeping laptop, a dead NAT entry).
 * New connections after freeze() are forwarded normally.
 */
export async function startProxy(targetPort) {
  const pairs = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(targetPort, "127.0.0.1");
    const pair = { client, upstream, frozen: false };
    pairs.add(pair);
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("data", (b) => {
      if (!pair.frozen) upstream.write(b);
    });
    upstream.on("data", (b) => {
      if (!pair.frozen) client.write(b);
    });
    client.on("error", end).on("close", () => {
      if (!pair.frozen) end();
    });
    upstream.on("error", end).on("close", () => {
      if (!pair.frozen) end();
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    port: server.address().port,
    get connections() {
      return pairs.size;
    },
    freeze() {
      for (const p of pairs) p.frozen = true;
    },
    async close() {
      for (const p of pairs) {
        p.client.destroy();
        p.upstream.destroy();
      }
      pairs.clear();
      await new Promise((r) => server.close(r));
    },
  };
}

/**
 * Starts a private redis-server on a free loopback port (never the shared 6379).
 * @returns {Promise<{port: number, url: string, stop: () => Promise<void>}>}
 */
export async function startRedis() {
  const port = await freePort();
  const proc = spawn("redis-server", ["--bind", "127.0.0.1", "--port", String(port), "--save", "", "--appendonly", "no", "--daemonize", "no"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let log = "";
  proc.stdout.setEncoding("utf8").on("data", (c) => (log += c));
  proc.stderr.setEncoding("utf8").on("data", (c) => (log += c));
  const exited = new Promise((r) => proc.on("exit", r));
  await waitFor(
    () =>
      new Promise((resolve) => {
        const s = net.connect(port, "127.0.0.1");
        s.on("connect", () => {
          s.end("PING\r\n");
          resolve(true);
        });
        s.on("error", () => resolve(false));
      }),
    { timeoutMs: 10000, what: `redis on ${port}\n${log}` },
  );
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      proc.kill("SIGTERM");
      await exited;
    },
  };
}

/** Creates (if needed) and returns the artifacts directory. */
export function artifacts() {
  mkdirSync(artifactsDir, { recursive: true });
  return artifactsDir;
}

let configDir = null;
let configs = 0;
/**
 * Writes a gateway configuration file (for `--config`) with `text` in it; returns its
 * path. The files live in a temporary directory removed when the process exits.
 */
export function configFile(text) {
  if (!configDir) {
    configDir = mkdtempSync(path.join(os.tmpdir(), "wsgate-js-test-"));
    const dir = configDir;
    process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
  }
  const file = path.join(configDir, `wsgate-${++configs}.toml`);
  writeFileSync(file, text);
  return file;
}

/**
 * A configuration file making `chat:*` a stream that keeps `historySize` publications
 * for 10 minutes; returns its path.
 */
export function streamConfig(historySize = 1000) {
  return configFile(["[[namespaces]]", 'name = "chat"', 'topics = ["chat:*"]', `history_size = ${historySize}`, 'history_ttl = "10m"', ""].join("\n"));
}

/**
 * A configuration file with presence namespaces (protocol v1.1): `room.*` with presence
 * and join/leave; `crowd.*` the same with `joinLeaveRate` events per second, so that a
 * burst of joins is skipped and announced with `presence_changed`; `quiet.*` with
 * presence but no join/leave; `inbox.*` only subscribable by the server (token claim,
 * server API). Other topics are plain: no presence.
 */
export function presenceConfig({ joinLeaveRate = 1 } = {}) {
  return configFile(
    [
      "[[namespaces]]",
      'name = "rooms"',
      'topics = ["room.*"]',
      "presence = true",
      "join_leave = true",
      "",
      "[[namespaces]]",
      'name = "crowd"',
      'topics = ["crowd.*"]',
      "presence = true",
      "join_leave = true",
      `join_leave_rate = ${joinLeaveRate}`,
      "",
      "[[namespaces]]",
      'name = "quiet"',
      'topics = ["quiet.*"]',
      "presence = true",
      "",
      "[[namespaces]]",
      'name = "inbox"',
      'topics = ["inbox.*"]',
      "client_subscribe = false",
      "client_publish = false",
      "",
    ].join("\n"),
  );
}
