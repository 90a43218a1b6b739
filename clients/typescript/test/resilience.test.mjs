// The client's defences against the faults it cannot see coming: a group in
// which nothing arrived yet is still recovered after a reconnect (from the
// `joined` position); a half-open connection (a proxy that stops forwarding
// without closing) and a handshake that never completes are given up and
// replaced; a server that closes at once (4002) or refuses a rejoin is not
// reconnected to every few milliseconds; refused rejoins are reported.

import { afterEach, test } from "node:test";
import assert from "node:assert/strict";
import { closeClients, fakeServer, kill, post, proxy, recorder, server, sleep, until } from "./helpers.mjs";

afterEach(closeClients);

test("a joined group where nothing arrived yet is recovered after a reconnect", async () => {
  const s = await server(["--store", "memory"]);
  const p = await proxy(s.addr);
  try {
    const sub = recorder(p.addr, "home");
    await until("connected", () => sub.client.currentState === "connected");
    await sub.client.join("side");
    p.cut();
    await until("the drop noticed", () => sub.client.currentState === "reconnecting");
    // Published while the client is away: it never saw anything in either group.
    await post(s.addr, "side", { n: 1 });
    await post(s.addr, "side", { n: 2 });
    await post(s.addr, "home", { n: 3 });
    p.open();
    await until("the missed messages", () => sub.got.length === 3);
    const seen = sub.got.map((m) => `${m.group}:${m.offset}`).sort();
    assert.deepEqual(seen, ["home:1", "side:1", "side:2"]);
    await until("both recovered", () => sub.recovered.length === 2);
    const side = sub.recovered.find((r) => r.group === "side");
    assert.deepEqual(side, { group: "side", from: 0, to: 2, complete: true });
    // And live after it, with nothing repeated.
    await post(s.addr, "side", { n: 4 });
    await until("live", () => sub.got.length === 4);
    assert.equal(sub.got.at(-1).offset, 3);
    sub.client.close();
  } finally {
    p.close();
    await kill(s.child);
  }
});

test("a half-open connection is detected by the liveness check and replaced", async () => {
  const s = await server(["--store", "memory"]);
  const p = await proxy(s.addr);
  try {
    const sub = recorder(p.addr, "live", { pingIntervalMs: 200, pongTimeoutMs: 300 });
    await until("connected", () => sub.client.currentState === "connected");
    await post(s.addr, "live", { n: 1 });
    await until("the first message", () => sub.got.length === 1);
    p.freeze();
    await post(s.addr, "live", { n: 2 });
    await until("the dead connection noticed", () => sub.states.some((e) => e.reason === "no pong"));
    await until("recovered on a new connection", () => sub.got.length === 2 && sub.recovered.length === 1);
    assert.deepEqual(sub.got.map((m) => m.offset), [1, 2]);
    assert.equal(sub.recovered[0].complete, true);
    assert.ok(p.accepted() >= 2);
    sub.client.close();
  } finally {
    p.close();
    await kill(s.child);
  }
});

test("a handshake that never completes times out and is retried", async () => {
  const s = await server(["--store", "memory"]);
  const p = await proxy(s.addr);
  try {
    p.blackhole();
    const sub = recorder(p.addr, "slowstart", { connectTimeoutMs: 300 });
    await until("the connect timeout", () => sub.states.some((e) => e.reason === "connect timeout"));
    p.open();
    await until("connected through the proxy", () => sub.client.currentState === "connected");
    sub.client.close();
  } finally {
    p.close();
    await kill(s.child);
  }
});

/** The waits between consecutive connections, in ms. */
const gaps = (connections) => connections.slice(1).map((c, i) => c.at - connections[i].at);

test("a server that closes every connection at once (4002) is not hammered", async () => {
  const fake = await fakeServer((conn) => setTimeout(() => conn.ws.close(4002, "insufficient state"), 5));
  try {
    const sub = recorder(fake.addr, "home", { minBackoffMs: 20, maxBackoffMs: 320, stableMs: 10_000 });
    await until("eight connections", () => fake.connections.length >= 8);
    sub.client.close();
    assert.ok(sub.states.some((e) => e.code === 4002), "the close code is reported");
    // The ceiling doubles from 20 ms to 320 ms; each wait is at least half of it.
    const late = gaps(fake.connections).slice(5);
    assert.ok(late.every((g) => g >= 150), `the backoff keeps growing: ${gaps(fake.connections)}`);
  } finally {
    fake.close();
  }
});

test("the backoff starts over once a connection stayed up", async () => {
  const fake = await fakeServer((conn, n) => setTimeout(() => conn.ws.close(4003, "no pong"), n === 6 ? 400 : 5));
  try {
    const sub = recorder(fake.addr, "home", { minBackoffMs: 20, maxBackoffMs: 2000, stableMs: 200 });
    await until("seven connections", () => fake.connections.length >= 7, 20000);
    sub.client.close();
    const g = gaps(fake.connections);
    // Connection 6 stayed up 400 ms: the wait after it is the first again.
    assert.ok(g[5] - 400 < 100, `reset after a stable connection: ${g}`);
  } finally {
    fake.close();
  }
});

test("a refused rejoin is reported; forbidden drops the group, unavailable backs off", async () => {
  const refusals = ["unavailable", "unavailable", "unavailable", "unavailable", "forbidden"];
  const fake = await fakeServer((conn, n) => {
    conn.handlers.push((f) => {
      if (f.type !== "join") return;
      const ref = f.ref;
      const refusal = n === 1 ? null : refusals[n - 2];
      const reply = refusal
        ? { type: "error", code: refusal, message: "no", ref }
        : { type: "joined", group: f.group, epoch: "e1", offset: 7, ref };
      conn.ws.send(JSON.stringify(reply));
      // The first connection drops once the join is answered.
      if (n === 1) setTimeout(() => conn.ws.close(1001, "going away"), 20);
    });
  });
  try {
    const sub = recorder(fake.addr, "home", { minBackoffMs: 20, maxBackoffMs: 320 });
    await until("connected", () => sub.client.currentState === "connected");
    await sub.client.join("side");
    await until("every refusal", () => sub.rejoinFailed.length === refusals.length);
    assert.deepEqual(
      sub.rejoinFailed.map((r) => [r.group, r.code, r.retrying]),
      refusals.map((code) => ["side", code, code === "unavailable"]),
    );
    for (const conn of fake.connections.slice(1)) {
      const rejoin = conn.frames.find((f) => f.type === "join");
      assert.ok(rejoin.ref !== undefined, "a rejoin carries a ref");
      assert.deepEqual([rejoin.since, rejoin.epoch], [7, "e1"], "from the joined position");
    }
    const g = gaps(fake.connections);
    assert.ok(g[3] >= 80, `an unavailable rejoin backs off more each time: ${g}`);
    // After forbidden the group is dropped and the connection kept.
    await sleep(300);
    assert.equal(fake.connections.length, refusals.length + 1);
    assert.equal(sub.client.currentState, "connected");
    sub.client.close();
  } finally {
    fake.close();
  }
});
