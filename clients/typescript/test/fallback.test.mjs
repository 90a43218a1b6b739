// The fallback to Server-Sent Events: behind an HTTP proxy that refuses
// WebSocket upgrades the client listens on `/sse/{group}` and publishes over
// the HTTP API; a switch of transport in either direction keeps every
// group's position, so nothing is lost and nothing repeated.

import { afterEach, test } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { connect as tcpConnect } from "node:net";
import { closeClients, kill, post, recorder, server, until } from "./helpers.mjs";

afterEach(closeClients);

/** An HTTP proxy to `target` that forwards requests (streaming answers) and,
 * unless told to refuse them, WebSocket upgrades. `refuseUpgrades()` and
 * `allowUpgrades()` switch; `dropAll()` closes every connection. */
async function upgradeGate(target) {
  const [host, port] = target.split(":");
  let refuse = false;
  const sockets = new Set();
  const gate = http.createServer((req, res) => {
    const upstream = http.request(
      { host, port: Number(port), method: req.method, path: req.url, headers: req.headers },
      (answer) => {
        res.writeHead(answer.statusCode, answer.headers);
        answer.pipe(res);
      },
    );
    upstream.on("error", () => res.destroy());
    req.pipe(upstream);
  });
  gate.on("connection", (s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  gate.on("upgrade", (req, socket, head) => {
    socket.on("error", () => {});
    if (refuse) {
      socket.end("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
      return;
    }
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
  await new Promise((r) => gate.listen(0, "127.0.0.1", r));
  return {
    addr: `127.0.0.1:${gate.address().port}`,
    refuseUpgrades() {
      refuse = true;
    },
    allowUpgrades() {
      refuse = false;
    },
    dropAll() {
      for (const s of sockets) s.destroy();
    },
    close() {
      for (const s of sockets) s.destroy();
      gate.close();
    },
  };
}

test("behind a proxy that refuses upgrades the client listens over SSE and publishes over HTTP", async () => {
  const s = await server(["--store", "memory"]);
  const gate = await upgradeGate(s.addr);
  gate.refuseUpgrades();
  try {
    const sub = recorder(gate.addr, "room");
    await until("connected", () => sub.client.currentState === "connected");
    assert.equal(sub.client.currentTransport, "sse");
    const published = await sub.client.publish({ n: 1 });
    assert.equal(published.offset, 1);
    await post(s.addr, "room", { n: 2 });
    await until("both messages", () => sub.got.length === 2);
    assert.deepEqual(sub.got.map((m) => [m.offset, m.data.n]), [[1, 1], [2, 2]]);
    const groups = await sub.client.groups();
    assert.equal(groups.room, 1);
    await assert.rejects(sub.client.join("other"), (err) => err.code === "unsupported");
    await assert.rejects(sub.client.publish({ n: 3 }, { history: false }), (err) => err.code === "unsupported");
    sub.client.close();
  } finally {
    gate.close();
    await kill(s.child);
  }
});

test("switching transports either way keeps every position: nothing lost, nothing repeated", async () => {
  const s = await server(["--store", "memory"]);
  const gate = await upgradeGate(s.addr);
  try {
    const sub = recorder(gate.addr, "room");
    await until("connected", () => sub.client.currentState === "connected");
    assert.equal(sub.client.currentTransport, "websocket");
    await post(s.addr, "room", { n: 1 });
    await post(s.addr, "room", { n: 2 });
    await until("the first two", () => sub.got.length === 2);

    // Upgrades refused from now on, and the WebSocket cut: published
    // meanwhile, 3 and 4 are recovered over SSE.
    gate.refuseUpgrades();
    gate.dropAll();
    await post(s.addr, "room", { n: 3 });
    await post(s.addr, "room", { n: 4 });
    await until("recovered over SSE", () => sub.got.length === 4 && sub.recovered.length === 1);
    assert.equal(sub.client.currentTransport, "sse");
    assert.deepEqual(sub.recovered[0], { group: "room", from: 2, to: 4, complete: true });
    assert.equal((await sub.client.publish({ n: 5 })).offset, 5);
    await until("live over SSE", () => sub.got.length === 5);

    // Upgrades allowed again and the stream cut: back on a WebSocket, from 5.
    gate.allowUpgrades();
    gate.dropAll();
    await post(s.addr, "room", { n: 6 });
    await until("recovered over WebSocket", () => sub.got.length === 6 && sub.recovered.length === 2);
    assert.equal(sub.client.currentTransport, "websocket");
    assert.deepEqual(sub.recovered[1], { group: "room", from: 5, to: 6, complete: true });
    assert.deepEqual(
      sub.got.map((m) => m.offset),
      [1, 2, 3, 4, 5, 6],
    );
    sub.client.close();
  } finally {
    gate.close();
    await kill(s.child);
  }
});

test("on SSE the client keeps trying WebSockets and switches back once one opens", async () => {
  const s = await server(["--store", "memory"]);
  const gate = await upgradeGate(s.addr);
  gate.refuseUpgrades();
  try {
    const sub = recorder(gate.addr, "room", { websocketRetryMs: 100 });
    await until("connected over SSE", () => sub.client.currentState === "connected");
    assert.equal(sub.client.currentTransport, "sse");
    await post(s.addr, "room", { n: 1 });
    await until("the first message", () => sub.got.length === 1);
    gate.allowUpgrades();
    await until("back on a WebSocket", () => sub.client.currentTransport === "websocket" && sub.client.currentState === "connected");
    await sub.client.join("side");
    await post(s.addr, "room", { n: 2 });
    await post(s.addr, "side", { n: 1 });
    await until("both", () => sub.got.length === 3);
    assert.deepEqual(
      sub.got.map((m) => `${m.group}:${m.offset}`),
      ["room:1", "room:2", "side:1"],
    );
    sub.client.close();
  } finally {
    gate.close();
    await kill(s.child);
  }
});
