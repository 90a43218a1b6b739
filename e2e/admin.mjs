// Browser test of the admin page (`/admin`) in real headless Chromium
// (Debian's package), driven by playwright-core: a wrong token is refused,
// the right one logs in; a group with a WebSocket member appears with its
// count; a publish from the page's form shows in the group's messages; flush
// asks for confirmation (declined: nothing happens; accepted: the history is
// gone). Saves a screenshot.
//
// Usage: CHAT_BIN=target/debug/channelbox node e2e/admin.mjs <screenshot.png>

import { spawn } from "node:child_process";
import { mkdirSync } from "node:fs";
import { createServer } from "node:net";
import { dirname } from "node:path";
import { chromium } from "playwright-core";

const bin = process.env.CHAT_BIN;
const shot = process.argv[2] || "target/browser/admin.png";
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
if (!bin) throw new Error("CHAT_BIN must point at the chat server binary");
const TOKEN = "admin-e2e-token";

const freePort = () => new Promise((resolve) => {
  const s = createServer();
  s.listen(0, "127.0.0.1", () => { const { port } = s.address(); s.close(() => resolve(port)); });
});

function startServer(addr) {
  return new Promise((resolve, reject) => {
    const args = ["--addr", addr, "--store", "memory", "--admin-token", TOKEN];
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

const check = (cond, what) => { if (!cond) throw new Error(`admin page test failed: ${what}`); console.log(`ok - ${what}`); };

async function historyLength(base, group) {
  const r = await fetch(`${base}/api/groups/${group}/history`);
  return (await r.json()).messages.length;
}

const addr = `127.0.0.1:${await freePort()}`;
const base = `http://${addr}`;
const server = await startServer(addr);
const browser = await chromium.launch({
  executablePath: chromiumPath,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
try {
  const context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
  const admin = await context.newPage();
  await admin.goto(`${base}/admin`);
  await admin.fill("#token", "not-the-token");
  await admin.click("#login-button");
  await admin.waitForSelector("#login-error:has-text('wrong token')");
  check(await admin.isHidden("#app"), "a wrong token is refused");
  await admin.fill("#token", TOKEN);
  await admin.click("#login-button");
  await admin.waitForSelector("#app:not([hidden])");
  check(true, "the admin token logs in");

  // A member of the group, connected from a second page with the chat page.
  const chat = await context.newPage();
  await chat.goto(`${base}/#room=lobby`);
  await chat.waitForSelector("#status.connected");
  await admin.waitForSelector("#groups li[data-group='lobby'] .count:text-is('1')", { timeout: 10000 });
  check(true, "the group appears with its member count");

  await admin.click("#groups li[data-group='lobby']");
  await admin.waitForFunction(() => document.querySelectorAll("#members li").length === 1);
  check(true, "choosing the group shows its member");
  await admin.fill("#publish-data", JSON.stringify({ name: "admin", text: "hello from the admin page" }));
  await admin.click("#publish button");
  await admin.waitForSelector("#messages li:has-text('hello from the admin page')", { timeout: 10000 });
  check(true, "a publish from the form shows in the group's messages");
  await chat.waitForSelector("#messages li.message:has-text('hello from the admin page')");
  check(true, "the member received it");

  mkdirSync(dirname(shot), { recursive: true });
  await admin.waitForFunction(() => document.querySelector("#c-connections polyline").getAttribute("points"));
  await admin.screenshot({ path: shot, fullPage: true });
  console.log(`screenshot: ${shot}`);

  let asked = "";
  admin.once("dialog", (d) => { asked = d.message(); d.dismiss(); });
  await admin.click("#flush");
  check(asked.includes("Flush"), "flush asks for confirmation");
  check((await historyLength(base, "lobby")) === 1, "declining the confirmation flushes nothing");
  admin.once("dialog", (d) => d.accept());
  await admin.click("#flush");
  await admin.waitForSelector("#error:has-text('history flushed')");
  check((await historyLength(base, "lobby")) === 0, "accepting it flushes the history");
  await admin.waitForFunction(() => document.querySelectorAll("#messages li").length === 0, null, { timeout: 10000 });
  check(true, "the page shows the group's new, empty history");
  console.log("admin page test passed");
} finally {
  await browser.close();
  await stopServer(server);
}
