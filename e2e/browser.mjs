// Browser test of the chat page in real headless Chromium (Debian's package),
// driven by playwright-core: two pages in one room exchange messages, see who
// is in the room (presence, then member events as a third page comes and
// goes), permessage-deflate is negotiated and carries a message both ways, a
// reload shows the history, and after the server restarts (sled store, same
// data directory and port) the page reconnects and catches up.
// Saves a screenshot.
//
// Usage: CHAT_BIN=target/debug/examples/chat node e2e/browser.mjs <screenshot.png>

import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { chromium } from "playwright-core";

const bin = process.env.CHAT_BIN;
const shot = process.argv[2] || "target/browser/chat.png";
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
if (!bin) throw new Error("CHAT_BIN must point at the chat server binary");

const freePort = () => new Promise((resolve) => {
  const s = createServer();
  s.listen(0, "127.0.0.1", () => { const { port } = s.address(); s.close(() => resolve(port)); });
});

function startServer(addr, data) {
  return new Promise((resolve, reject) => {
    // Heartbeats every second, so that the test sees that a browser tab left
    // open answers them and is never closed for silence (4003).
    const args = ["--addr", addr, "--data", data, "--ping-interval", "1", "--pong-timeout", "1"];
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
  return new Promise((resolve) => { child.removeAllListeners("exit"); child.on("exit", resolve); child.kill("SIGTERM"); });
}

async function publish(base, room, text) {
  const r = await fetch(`${base}/api/groups/${room}/messages`, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ name: "server", text }),
  });
  if (r.status !== 200) throw new Error(`publish answered ${r.status}`);
}

const check = (cond, what) => { if (!cond) throw new Error(`browser test failed: ${what}`); console.log(`ok - ${what}`); };

const port = await freePort();
const addr = `127.0.0.1:${port}`;
const base = `http://${addr}`;
const data = mkdtempSync(join(tmpdir(), "channelbox-browser-"));
let server = await startServer(addr, data);
const browser = await chromium.launch({
  executablePath: chromiumPath,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  const a = await context.newPage();
  const b = await context.newPage();
  const room = "e2e-room";
  for (const [page, name] of [[a, "alice"], [b, "bob"]]) {
    await page.goto(`${base}/#room=${room}`);
    await page.fill("#name", name);
    await page.dispatchEvent("#name", "change");
    await page.waitForSelector("#status.connected");
  }
  await a.fill("#text", "hello from alice");
  await a.click("#send");
  await b.waitForSelector("#messages li.message:has-text('hello from alice')");
  check(true, "bob sees alice's message");
  await b.fill("#text", "hi alice, bob here");
  await b.press("#text", "Enter");
  await a.waitForSelector("#messages li.message:has-text('bob here')");
  check(true, "alice sees bob's message");
  await a.waitForFunction(() => document.getElementById("members").textContent === "2");
  check(true, "the page shows two people in the room");
  check(await a.evaluate(() => typeof window.channelbox?.connect === "function"),
    "the page runs the channelbox client package (/channelbox.js)");
  // permessage-deflate: Chromium offers it, the server accepts it, and a
  // 3 KB message goes compressed both ways (Chromium compresses what it
  // sends once the extension is in force) and comes back whole.
  const deflate = await a.evaluate(async (addr) => {
    const text = "the deploy to staging failed again, the logs show a timeout. ".repeat(50);
    const ws = new WebSocket(`ws://${addr}/ws/e2e-deflate`);
    return await new Promise((resolve, reject) => {
      setTimeout(() => reject(new Error("no message within 10 s")), 10000);
      ws.onopen = () => ws.send(JSON.stringify({ type: "publish", data: { text } }));
      ws.onmessage = (e) => {
        const frame = JSON.parse(e.data);
        if (frame.type !== "message") return;
        resolve({ extensions: ws.extensions, whole: frame.data.text === text });
        ws.close();
      };
      ws.onerror = () => reject(new Error("socket error"));
    });
  }, addr);
  check(deflate.extensions.startsWith("permessage-deflate") && deflate.extensions.includes("server_no_context_takeover"),
    `Chromium negotiates permessage-deflate (${deflate.extensions})`);
  check(deflate.whole, "a compressed 3 KB message goes both ways and comes back whole");
  await a.waitForFunction(() => document.querySelectorAll("#member-list li").length === 2);
  check((await a.locator("#member-list li:has-text('(you)')").count()) === 1, "the member list marks you");
  const third = await context.newPage();
  await third.goto(`${base}/#room=${room}`);
  await third.waitForSelector("#status.connected");
  await a.waitForFunction(() => document.querySelectorAll("#member-list li").length === 3);
  check(true, "a member joining shows in the list (member event)");
  await third.close();
  await a.waitForFunction(() => document.querySelectorAll("#member-list li").length === 2);
  check(true, "a member leaving goes from the list (member event)");

  await b.reload();
  await b.waitForSelector("#status.connected");
  await b.waitForSelector("#messages li.message:has-text('bob here')");
  check((await b.locator("#messages li.message").count()) === 2, "a reload shows the room's history");

  await stopServer(server);
  await a.waitForSelector("#status:not(.connected)");
  check(true, "the page notices the server went away");
  server = await startServer(addr, data);
  await publish(base, room, "sent while you were away");
  await a.waitForSelector("#status.connected", { timeout: 15000 });
  await a.waitForSelector("#messages li.message:has-text('sent while you were away')", { timeout: 15000 });
  check((await a.locator("#messages li.message:has-text('sent while you were away')").count()) === 1,
    "after a restart the page reconnects and catches up, without duplicates");
  check((await a.locator("#messages li.message").count()) === 3, "nothing was lost or repeated");
  await a.fill("#text", "back online");
  await a.click("#send");
  await b.waitForSelector("#messages li.message:has-text('back online')", { timeout: 15000 });
  check(true, "both pages talk again after the restart");

  mkdirSync(dirname(shot), { recursive: true });
  await a.screenshot({ path: shot, fullPage: true });
  console.log(`screenshot: ${shot}`);
  const phone = await browser.newPage({ viewport: { width: 390, height: 740 } });
  await phone.goto(`${base}/#room=${room}`);
  await phone.waitForSelector("#messages li.message:has-text('back online')");
  await phone.screenshot({ path: shot.replace(/\.png$/, "-phone.png") });
  // A tab left open for several heartbeat periods stays connected.
  await a.evaluate(() => {
    window.__drops = 0;
    const status = document.getElementById("status");
    new MutationObserver(() => { if (!status.classList.contains("connected")) window.__drops++; })
      .observe(status, { attributes: true });
  });
  await new Promise((r) => setTimeout(r, 4000));
  check((await a.evaluate(() => window.__drops)) === 0, "a tab left open is not closed by heartbeats");
  console.log("browser test passed");
} finally {
  await browser.close();
  await stopServer(server);
}
