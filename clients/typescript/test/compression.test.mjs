// permessage-deflate with Node's `ws`, which offers it as browsers do: the
// server accepts it, compressed messages go both ways (counted on the
// socket: fewer bytes than the text), and `--compression off` declines it.

import { afterEach, test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { kill, server } from "./helpers.mjs";

const started = [];
afterEach(async () => {
  while (started.length) await kill(started.pop().child);
});

/** Opens a `ws` socket (permessage-deflate offered, and `ws` compresses
 * what it sends from 1 KB on); resolves once open, with its messages. */
function open(addr, group) {
  const ws = new WebSocket(`ws://${addr}/ws/${group}`, { perMessageDeflate: { threshold: 1024 } });
  const messages = [];
  const waiting = [];
  ws.on("message", (data) => {
    const frame = JSON.parse(data.toString());
    messages.push(frame);
    for (const w of waiting.splice(0)) w();
  });
  const next = async (type) => {
    for (;;) {
      const i = messages.findIndex((m) => m.type === type);
      if (i >= 0) return messages.splice(i, 1)[0];
      await new Promise((resolve, reject) => {
        waiting.push(resolve);
        setTimeout(() => reject(new Error(`no ${type} frame within 10 s`)), 10_000).unref();
      });
    }
  };
  return new Promise((resolve, reject) => {
    ws.once("open", () => resolve({ ws, next }));
    ws.once("error", reject);
  });
}

/** Chat text of about `len` bytes. */
const chat = (len) =>
  "the deploy to staging failed again, the logs show a timeout talking to the database. "
    .repeat(Math.ceil(len / 85))
    .slice(0, len);

test("ws negotiates permessage-deflate and messages go compressed both ways", async () => {
  const s = await server(["--store", "memory"]);
  started.push(s);
  const { ws, next } = await open(s.addr, "deflated");
  // `ws` shows the names of the extensions in force.
  assert.equal(ws.extensions, "permessage-deflate");
  await next("welcome");
  const text = chat(20_000);
  const wroteBefore = ws._socket.bytesWritten;
  const readBefore = ws._socket.bytesRead;
  ws.send(JSON.stringify({ type: "publish", data: { text }, ref: "big" }));
  const published = await next("published");
  assert.equal(published.ref, "big");
  const message = await next("message");
  assert.equal(message.data.text, text);
  // 20 KB of chat text each way; compressed, a small part of it.
  const wrote = ws._socket.bytesWritten - wroteBefore;
  const read = ws._socket.bytesRead - readBefore;
  assert.ok(wrote < 5_000, `wrote ${wrote} bytes for 20 KB of text`);
  assert.ok(read < 5_000, `read ${read} bytes for 20 KB of text and a reply`);
  ws.close();
});

test("a client without the extension gets the same messages plain", async () => {
  const s = await server(["--store", "memory"]);
  started.push(s);
  const plain = new WebSocket(`ws://${s.addr}/ws/mixed`, { perMessageDeflate: false });
  const got = new Promise((resolve) =>
    plain.on("message", (d) => {
      const frame = JSON.parse(d.toString());
      if (frame.type === "message") resolve(frame);
    }),
  );
  await new Promise((resolve) => plain.once("open", resolve));
  assert.equal(plain.extensions, "");
  const { ws, next } = await open(s.addr, "mixed");
  await next("welcome");
  const text = chat(3_000);
  ws.send(JSON.stringify({ type: "publish", data: { text } }));
  assert.equal((await next("message")).data.text, text);
  assert.equal((await got).data.text, text);
  ws.close();
  plain.close();
});

test("--compression off declines the offer", async () => {
  const s = await server(["--store", "memory", "--compression", "off"]);
  started.push(s);
  const { ws, next } = await open(s.addr, "off");
  assert.equal(ws.extensions, "");
  await next("welcome");
  const text = chat(2_000);
  ws.send(JSON.stringify({ type: "publish", data: { text } }));
  assert.equal((await next("message")).data.text, text);
  ws.close();
});
