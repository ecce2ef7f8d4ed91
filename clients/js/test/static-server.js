// Serves the demo the way `wsgate --demo` lays it out (`/` -> demo/index.html,
// `/wsgate.js` -> wsgate.js), for a gateway built without `--demo`. The WebSocket side is
// always a real gateway; only these two static files come from here.

import { readFileSync } from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";

const web = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const routes = {
  "/": ["demo/index.html", "text/html; charset=utf-8"],
  "/wsgate.js": ["wsgate.js", "text/javascript; charset=utf-8"],
};

/** @returns {Promise<{url: string, close: () => Promise<void>}>} */
export async function startStaticServer() {
  const server = http.createServer((req, res) => {
    const route = routes[new URL(req.url, "http://x").pathname];
    if (!route) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": route[1], "cache-control": "no-cache" });
    res.end(readFileSync(path.join(web, route[0])));
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    close: () => new Promise((r) => server.close(r)),
  };
}
