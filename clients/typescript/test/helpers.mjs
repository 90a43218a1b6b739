// Shared by the tests: the real chat server (the binary in CHAT_BIN, default
// ../../target/debug/examples/chat), HTTP publishes, a TCP proxy that can cut,
// refuse or freeze connections, a scripted fake server, and waiting.

import { spawn } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { createServer, connect as tcpConnect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket, { WebSocketServer } from "ws";
import { connect } from "../dist/index.js";

const bin = process.env.CHAT_BIN ?? fileURLToPath(new URL("../../../target/debug/examples/chat", import.meta.url));

export const freePort = () =>
  new Promise((resolve) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });

/** Starts the chat server; resolves once it listens. */
export function startServer(addr, args = []) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ["--addr", addr, ...args], {
      stdio: ["ignore", "pipe", "inherit"],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn" },
    });
    let out = "";
    child.stdout.on("data", (chunk) => {
      out += chunk;
      if (out.includes("listening on http://")) resolve(child);
    });
    child.on("exit", (code) => reject(new Error(`server exited early with ${code}`)));
  });
}

export function kill(child, signal = "SIGKILL") {
  return new Promise((resolve) => {
    child.removeAllListeners("exit");
    if (child.exitCode !== null) return resolve();
    child.on("exit", resolve);
    child.kill(signal);
  });
}

/** A chat server on a free port with its own data directory. */
export async function server(args = []) {
  const addr = `127.0.0.1:${await freePort()}`;
  const data = mkdtempSync(join(tmpdir(), "channelbox-ts-"));
  const fullArgs = ["--data", data, ...args];
  return { addr, data, args: fullArgs, child: await startServer(addr, fullArgs) };
}

/** Publishes over HTTP, retrying while the server is away (for 30 s at
 * most, so that a failed test ends); the saved offset. */
export async function post(addr, group, data) {
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (Date.now() > deadline) throw new Error(`no server at ${addr} took the publish`);
    try {
      const r = await fetch(`http://${addr}/api/groups/${group}/messages`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(data),
      });
      if (r.status === 200) return (await r.json()).offset;
    } catch {
      // refused while restarting
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export const until = async (what, check, ms = 15000) => {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
};

export const options = { WebSocket, minBackoffMs: 50, maxBackoffMs: 500 };

/** Every client a test made, closed after it (`closeClients`) even when it
 * failed half-way: a client left open reconnects forever and keeps the test
 * process from exiting. */
const clients = new Set();

export function closeClients() {
  for (const c of clients) c.close();
  clients.clear();
}

/** A client on `group` that records every message, recovery, state change
 * and refused rejoin. */
export function recorder(addr, group, extra = {}) {
  const client = connect(`ws://${addr}/ws/${group}`, { ...options, ...extra });
  clients.add(client);
  const got = [];
  const recovered = [];
  const states = [];
  const rejoinFailed = [];
  client.on("message", (m) => got.push(m));
  client.on("recovered", (r) => recovered.push(r));
  client.on("state", (s) => states.push(s));
  client.on("rejoin_failed", (r) => rejoinFailed.push(r));
  return { client, got, recovered, states, rejoinFailed };
}

/** A TCP proxy to `target` ("host:port"). `cut()` drops every connection and
 * refuses new ones until `open()`; `freeze()` stops forwarding on the open
 * connections without closing them (a half-open connection as the client
 * sees it); `blackhole()` makes new connections frozen from the start. */
export async function proxy(target) {
  const [host, port] = target.split(":");
  const conns = new Set();
  let mode = "open";
  let accepted = 0;
  const server = createServer((client) => {
    accepted++;
    client.on("error", () => {});
    if (mode === "refuse") return client.destroy();
    const upstream = tcpConnect(Number(port), host);
    upstream.on("error", () => {});
    const c = { client, upstream, frozen: mode === "blackhole" };
    conns.add(c);
    client.on("data", (d) => c.frozen || upstream.write(d));
    upstream.on("data", (d) => c.frozen || client.write(d));
    const end = () => {
      conns.delete(c);
      client.destroy();
      upstream.destroy();
    };
    client.on("close", end);
    upstream.on("close", end);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    addr: `127.0.0.1:${server.address().port}`,
    accepted: () => accepted,
    cut() {
      mode = "refuse";
      for (const c of conns) c.client.destroy();
    },
    freeze() {
      for (const c of conns) c.frozen = true;
    },
    blackhole() {
      mode = "blackhole";
    },
    open() {
      mode = "open";
    },
    close() {
      for (const c of conns) c.client.destroy();
      server.close();
    },
  };
}

/** A scripted server speaking just enough of the protocol: every connection
 * gets `welcome`, then `script(conn, n)` runs with `n` counting connections
 * from 1; `conn.frames` collects what the client sent. */
export async function fakeServer(script) {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((r) => wss.on("listening", r));
  const connections = [];
  wss.on("connection", (ws, req) => {
    const conn = { ws, url: req.url, at: Date.now(), frames: [], handlers: [] };
    connections.push(conn);
    ws.on("message", (data) => {
      const frame = JSON.parse(String(data));
      conn.frames.push(frame);
      for (const h of conn.handlers) h(frame);
    });
    ws.send(JSON.stringify({ type: "welcome", channel_id: `c${connections.length}`, group: "home", epoch: "e1", offset: 0 }));
    script(conn, connections.length);
  });
  return {
    addr: `127.0.0.1:${wss.address().port}`,
    connections,
    close: () => {
      for (const c of wss.clients) c.terminate();
      wss.close();
    },
  };
}
