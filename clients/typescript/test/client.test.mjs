// The client against the real chat server, started by these tests (the
// binary in CHAT_BIN, default ../../target/debug/examples/chat): publish and
// receive, rejections, presence and member events, a server killed and
// restarted mid-stream (sled), and a slow-consumer close (4000), each
// followed by a complete recovery.

import { afterEach, test } from "node:test";
import assert from "node:assert/strict";
import { ChannelboxError } from "../dist/index.js";
import { closeClients, kill, post, recorder, server, startServer, until } from "./helpers.mjs";

import WebSocket from "ws";

afterEach(closeClients);

test("publish, receive, and typed rejections", async () => {
  const s = await server(["--store", "memory"]);
  try {
    const a = recorder(s.addr, "room");
    const b = recorder(s.addr, "room");
    await until("both connected", () => a.client.currentState === "connected" && b.client.currentState === "connected");
    const published = await a.client.publish({ text: "hi" });
    assert.equal(published.offset, 1);
    assert.equal(typeof published.epoch, "string");
    await until("b receives", () => b.got.length === 1);
    assert.deepEqual(b.got[0].data, { text: "hi" });
    await a.client.publish("quiet", { echo: false });
    await until("b receives the second", () => b.got.length === 2);
    assert.equal(a.got.length, 1, "echo:false keeps the sender's own copy away");

    await assert.rejects(a.client.publish(1, { group: "elsewhere" }), (e) => e instanceof ChannelboxError && e.code === "forbidden");
    await assert.rejects(a.client.join("has space"), (e) => e.code === "invalid_group");
    await assert.rejects(a.client.history({ limit: 0 }), (e) => e.code === "bad_request");
    const history = await b.client.history({ limit: 10 });
    assert.deepEqual(history.messages.map((m) => m.offset), [1, 2]);
    a.client.close();
    b.client.close();
  } finally {
    await kill(s.child);
  }
});

test("presence and member events", async () => {
  const s = await server(["--store", "memory"]);
  try {
    const watcher = recorder(s.addr, "lobby", { events: true });
    const joined = [];
    const left = [];
    watcher.client.on("member_joined", (e) => joined.push(e.channel_id));
    watcher.client.on("member_left", (e) => left.push(e.channel_id));
    await until("watcher connected", () => watcher.client.currentState === "connected");
    const other = recorder(s.addr, "lobby");
    let id = null;
    other.client.on("welcome", (w) => (id = w.channel_id));
    await until("a member_joined", () => joined.length === 1);
    assert.equal(joined[0], id);
    const presence = await watcher.client.presence();
    assert.equal(presence.members.length, 2);
    other.client.close();
    await until("a member_left", () => left.length === 1);
    watcher.client.close();
  } finally {
    await kill(s.child);
  }
});

test("a server killed and restarted mid-stream: every saved message once, in order", async () => {
  const s = await server(["--store", "sled"]);
  const sub = recorder(s.addr, "stream");
  await until("connected", () => sub.client.currentState === "connected");
  let stop = false;
  let last = 0;
  const publishing = (async () => {
    for (let n = 0; !stop; n++) last = await post(s.addr, "stream", { n });
  })();
  try {
    await until("a few messages", () => sub.got.length >= 30);
    await kill(s.child);
    s.child = await startServer(s.addr, s.args);
    await until("more after the restart", () => sub.got.length >= 60 + 30);
    stop = true;
    await publishing;
    await until("everything", () => sub.got.at(-1)?.offset === last);
    const offsets = sub.got.map((m) => m.offset);
    assert.deepEqual(offsets, Array.from({ length: last }, (_, i) => i + 1), "offsets 1..last, once each");
    assert.ok(sub.recovered.length >= 1 && sub.recovered.every((r) => r.complete), "recovered completely");
    sub.client.close();
  } finally {
    stop = true;
    await kill(s.child);
  }
});

test("a slow-consumer close (4000) is followed by a complete recovery", async () => {
  const s = await server(["--store", "memory", "--queue", "16", "--history-bytes", "67108864"]);
  const sockets = [];
  class Recorded extends WebSocket {
    constructor(url) {
      // Uncompressed: 8 KB of "x" compresses to a few bytes, and 1,500 of
      // them would fit in the kernel's buffers without filling the queue.
      super(url, { perMessageDeflate: false });
      sockets.push(this);
    }
  }
  const sub = recorder(s.addr, "slow", { WebSocket: Recorded });
  const codes = [];
  sub.client.on("state", (e) => e.code !== undefined && codes.push(e.code));
  try {
    await until("connected", () => sub.client.currentState === "connected");
    // Stop reading: the server's queue for this client fills.
    sockets[0]._socket.pause();
    const big = "x".repeat(8192);
    let last = 0;
    for (let n = 0; n < 1500; n++) last = await post(s.addr, "slow", { n, big });
    sockets[0]._socket.resume();
    await until("everything", () => sub.got.at(-1)?.offset === last, 30000);
    // The server sends 4000 only if the paused socket still takes the close
    // frame (PROTOCOL.md: "if the socket accepts it"); otherwise it drops the
    // TCP connection, which the client sees as 1006. Either way it recovers.
    assert.ok(codes.includes(4000) || codes.includes(1006), `closed as a slow consumer (codes ${codes})`);
    assert.deepEqual(sub.got.map((m) => m.offset), Array.from({ length: last }, (_, i) => i + 1));
    assert.ok(sub.recovered.at(-1)?.complete, "the recovery was complete");
    sub.client.close();
  } finally {
    await kill(s.child);
  }
});

test("history on the first connection is delivered, then live messages", async () => {
  const s = await server(["--store", "memory"]);
  try {
    for (let n = 0; n < 5; n++) await post(s.addr, "h", { n });
    const sub = recorder(s.addr, "h", { history: 3 });
    await until("the replay", () => sub.got.length === 3);
    await post(s.addr, "h", { n: 5 });
    await until("live", () => sub.got.length === 4);
    assert.deepEqual(sub.got.map((m) => m.offset), [3, 4, 5, 6]);
    sub.client.close();
  } finally {
    await kill(s.child);
  }
});
