// Browser test of the TypeScript client's fallback to Server-Sent Events in
// real headless Chromium (Debian's package), driven by playwright-core. The
// page loads the client bundle the server serves (/channelbox.js, which
// `cargo xtask e2e` checks is the build of clients/typescript) and talks to
// the chat server through an HTTP proxy that can refuse WebSocket upgrades
// (and, for a while, streams):
//
// - upgrades refused, the client (`transports: ["websocket", "sse"]`) tries a
//   WebSocket, is refused, and listens over SSE: messages published over HTTP
//   arrive, and a publish from the page goes through the HTTP API (the proxy
//   sees the POST);
// - its stream cut while messages are published, it reconnects over SSE with
//   `since`/`epoch` and recovers them: every message once, in order, no gap;
// - a plain `EventSource` gets `welcome` with the group's position as its
//   id, and after its stream is cut it reconnects by itself with that id as
//   `Last-Event-ID` and recovers what was published meanwhile;
// - allowed again, the client returns to a WebSocket and recovers its
//   position: every message once, in order, none lost across the switch.
//
// Usage: CHAT_BIN=target/debug/examples/chat node e2e/fallback.mjs

import { spawn } from "node:child_process";
import { mkdtempSync } from "node:fs";
import http from "node:http";
import { createServer, connect as tcpConnect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const bin = process.env.CHAT_BIN;
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
if (!bin) throw new Error("CHAT_BIN must point at the chat server binary");

const freePort = () => new Promise((resolve) => {
  const s = createServer();
  s.listen(0, "127.0.0.1", () => { const { port } = s.address(); s.close(() => resolve(port)); });
});

function startServer(addr) {
  return new Promise((resolve, reject) => {
    const data = mkdtempSync(join(tmpdir(), "channelbox-fallback-"));
    const args = ["--addr", addr, "--data", data, "--store", "memory"];
    const child = spawn(bin, args, { stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    child.stdout.on("data", (chunk) => {
      out += chunk;
      if (out.includes("listening on http://")) resolve(child);
    });
    child.on("exit", (code) => reject(new Error(`server exited early with ${code}`)));
  });
}

function stopServer(child) {
  return new Promise((resolve) => {
    child.removeAllListeners("exit");
    if (child.exitCode !== null) return resolve();
    child.on("exit", resolve);
    child.kill("SIGTERM");
  });
}

/** An HTTP proxy to `target` that forwards requests (streaming answers) and,
 * unless `refuse` is set, WebSocket upgrades (`refused` counts the ones it
 * refused). While `refuseStreams` is set it answers `/sse/…` with 503. It
 * records every request (method, path, `Last-Event-ID`, whether it was
 * refused); `cut(prefix)` closes the connections whose last request's path
 * starts with `prefix`. */
async function upgradeGate(target) {
  const [host, port] = target.split(":");
  const gate = { refuse: false, refuseStreams: false, requests: [], upgrades: 0, refused: 0 };
  const paths = new Map();
  const proxy = http.createServer((req, res) => {
    const refused = gate.refuseStreams && req.url.startsWith("/sse/");
    gate.requests.push({ method: req.method, path: req.url, lastEventId: req.headers["last-event-id"], refused });
    paths.set(req.socket, req.url);
    if (refused) {
      res.writeHead(503, { "content-type": "text/plain", connection: "close" });
      res.end("streams refused by the test's proxy");
      return;
    }
    const upstream = http.request(
      { host, port: Number(port), method: req.method, path: req.url, headers: req.headers },
      (answer) => { res.writeHead(answer.statusCode, answer.headers); answer.pipe(res); },
    );
    upstream.on("error", () => res.destroy());
    res.on("close", () => upstream.destroy());
    req.pipe(upstream);
  });
  proxy.on("connection", (s) => { paths.set(s, ""); s.on("close", () => paths.delete(s)); });
  proxy.on("upgrade", (req, socket, head) => {
    socket.on("error", () => {});
    if (gate.refuse) {
      gate.refused++;
      socket.end("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
      return;
    }
    gate.upgrades++;
    const upstream = tcpConnect(Number(port), host, () => {
      let raw = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) raw += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      upstream.write(`${raw}\r\n`);
      upstream.write(head);
      socket.pipe(upstream);
      upstream.pipe(socket);
    });
    upstream.on("error", () => socket.destroy());
    socket.on("close", () => upstream.destroy());
    upstream.on("close", () => socket.destroy());
  });
  await new Promise((r) => proxy.listen(0, "127.0.0.1", r));
  gate.addr = `127.0.0.1:${proxy.address().port}`;
  gate.cut = (prefix) => {
    for (const [s, path] of paths) if (path.startsWith(prefix)) s.destroy();
  };
  gate.close = () => {
    for (const s of paths.keys()) s.destroy();
    proxy.close();
  };
  return gate;
}

async function publish(addr, group, data) {
  const r = await fetch(`http://${addr}/api/groups/${group}/messages`, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(data),
  });
  if (r.status !== 200) throw new Error(`publish answered ${r.status}`);
  return r.json();
}

const check = (cond, what) => { if (!cond) throw new Error(`fallback test failed: ${what}`); console.log(`ok - ${what}`); };

const server = await startServer(`127.0.0.1:${await freePort()}`);
const addr = server.spawnargs[server.spawnargs.indexOf("--addr") + 1];
const gate = await upgradeGate(addr);
const browser = await chromium.launch({
  executablePath: chromiumPath,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
// What the page logged (refused handshakes, dropped streams), shown if a check fails.
const pageLog = [];
try {
  gate.refuse = true;
  const page = await browser.newPage();
  page.on("console", (m) => pageLog.push(`${m.type()}: ${m.text()}`));
  // A plain page of the proxy's origin with the client bundle on it.
  await page.goto(`http://${gate.addr}/healthz`);
  await page.addScriptTag({ url: "/channelbox.js" });
  await page.evaluate((url) => {
    const c = window.channelbox.connect(url, {
      transports: ["websocket", "sse"], minBackoffMs: 50, maxBackoffMs: 500, websocketRetryMs: 300,
    });
    window.t = { client: c, got: [], recovered: [], states: [] };
    c.on("message", (m) => window.t.got.push(m.offset));
    c.on("recovered", (r) => window.t.recovered.push(r));
    c.on("state", (s) => window.t.states.push(s.state));
  }, `ws://${gate.addr}/ws/room`);
  await page.waitForFunction(() => window.t.client.currentState === "connected");
  check(gate.refused >= 1 && gate.upgrades === 0, `the client tried a WebSocket first and was refused (${gate.refused})`);
  check(await page.evaluate(() => window.t.client.currentTransport === "sse"),
    "with upgrades refused the client connects over Server-Sent Events");
  check(gate.requests.some((r) => r.method === "GET" && r.path.startsWith("/sse/room") && !r.refused),
    "the proxy carried the client's stream of /sse/room");

  const got = () => page.evaluate(() => window.t.got);
  await publish(addr, "room", { n: 1 });
  await page.waitForFunction(() => window.t.got.length === 1);
  check((await got())[0] === 1, "a message published over HTTP arrives on the stream");
  const posts = () => gate.requests.filter((r) => r.method === "POST" && r.path === "/api/groups/room/messages").length;
  const before = posts();
  const published = await page.evaluate(() => window.t.client.publish({ n: 2 }));
  check(published.offset === 2 && posts() === before + 1, "a publish from the page goes through the HTTP API");
  await page.waitForFunction(() => window.t.got.length === 2);

  // The stream drops, and streams are refused until three more messages
  // are saved: the client must reconnect over SSE and recover them.
  gate.refuseStreams = true;
  const streamsBefore = gate.requests.length;
  gate.cut("/sse/room");
  await page.waitForFunction(() => window.t.client.currentState === "reconnecting");
  for (let n = 3; n <= 5; n++) await publish(addr, "room", { n });
  const refusedStream = () => gate.requests.slice(streamsBefore).some((r) => r.path.startsWith("/sse/room") && r.refused);
  for (let i = 0; i < 200 && !refusedStream(); i++) await new Promise((r) => setTimeout(r, 50));
  check(refusedStream(), "after its stream dropped the client tried to open it again");
  gate.refuseStreams = false;
  await page.waitForFunction(() => window.t.got.length >= 5 && window.t.client.currentState === "connected",
    null, { timeout: 15000 });
  const resumed = gate.requests.slice(streamsBefore).find((r) => r.path.startsWith("/sse/room") && !r.refused);
  const query = new URL(resumed.path, "http://x").searchParams;
  check(query.get("since") === "2" && query.get("epoch") === published.epoch,
    `the client reopened its stream with since=2 and its epoch (${resumed.path})`);
  check(await page.evaluate(() => window.t.client.currentTransport === "sse"), "it is still on Server-Sent Events");
  let t = await page.evaluate(() => ({ got: window.t.got, recovered: window.t.recovered }));
  check(JSON.stringify(t.got) === JSON.stringify([1, 2, 3, 4, 5]),
    `the messages published while the stream was down arrived once each, in order (${t.got})`);
  const last = t.recovered[t.recovered.length - 1];
  check(last && last.from === 2 && last.to === 5 && last.complete === true,
    `the stream's recovery was complete, from 2 to 5 (${JSON.stringify(last)})`);

  // A plain EventSource: welcome's id is the position at join, sent back as
  // Last-Event-ID when it reconnects by itself after its stream was cut.
  await page.evaluate(() => {
    const es = new EventSource("/sse/plain");
    window.es = { got: [], welcomeId: null, recovered: null, opens: 0 };
    es.onopen = () => window.es.opens++;
    es.addEventListener("welcome", (e) => { if (window.es.welcomeId === null) window.es.welcomeId = e.lastEventId; });
    es.addEventListener("message", (e) => window.es.got.push([e.lastEventId, JSON.parse(e.data).data.n]));
    es.addEventListener("recovered", (e) => { window.es.recovered = JSON.parse(e.data); });
  });
  await page.waitForFunction(() => window.es.welcomeId !== null);
  const welcomeId = await page.evaluate(() => window.es.welcomeId);
  check(/^.+:0$/.test(welcomeId), `an EventSource's welcome carries the position at join (${welcomeId})`);
  gate.cut("/sse/plain");
  const { epoch } = await publish(addr, "plain", { n: 1 });
  await page.waitForFunction(() => window.es.recovered !== null, null, { timeout: 15000 });
  check(gate.requests.some((r) => r.path === "/sse/plain" && r.lastEventId === welcomeId),
    "the EventSource reconnected with welcome's id as Last-Event-ID");
  const es = await page.evaluate(() => window.es);
  check(es.recovered.complete === true && JSON.stringify(es.got) === JSON.stringify([[`${epoch}:1`, 1]]),
    "it recovered the message published while it was away");

  // Upgrades allowed again: the client's next probe opens a WebSocket and
  // it moves there, recovering from its position; messages published
  // during the switch arrive once each.
  const upgrades = gate.upgrades;
  const recoveries = t.recovered.length;
  gate.refuse = false;
  for (let n = 6; n <= 9; n++) await publish(addr, "room", { n });
  await page.waitForFunction(() => window.t.client.currentTransport === "websocket"
    && window.t.client.currentState === "connected", null, { timeout: 15000 });
  check(gate.upgrades > upgrades, "with upgrades allowed again the client returns to a WebSocket");
  await publish(addr, "room", { n: 10 });
  await page.waitForFunction(() => window.t.got.length >= 10, null, { timeout: 15000 });
  // Anything late (a duplicate) would come right behind the last message.
  await new Promise((r) => setTimeout(r, 300));
  t = await page.evaluate(() => ({ got: window.t.got, recovered: window.t.recovered }));
  check(JSON.stringify(t.got) === JSON.stringify([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
    `every message once, in order, across the switch (${t.got})`);
  check(t.recovered.length > recoveries && t.recovered.every((r) => r.complete),
    "the WebSocket recovered the client's position completely");
  console.log("fallback test passed");
} catch (err) {
  console.log(`the page's console:\n  ${pageLog.join("\n  ")}`);
  throw err;
} finally {
  await browser.close();
  gate.close();
  await stopServer(server);
}
