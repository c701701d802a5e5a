// The web chat widget in a real browser (Debian's Chromium, driven by
// playwright-core). Run by tests/browser_chat.rs, which starts the gateway
// and passes:
//   SWITCHBOARD_URL      the gateway's base URL
//   SWITCHBOARD_CHANNEL  the web chat channel's id
//   SWITCHBOARD_AGENT    an agent's bearer token
//   ARTIFACTS_DIR        where screenshots go (default target/browser-artifacts)
//   CHROMIUM_PATH        the browser (default /usr/bin/chromium)
//   EMBED_PORT           a free port for a "customer site" page that embeds the
//                        widget; its origin is in the channel's allowed_origins
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createServer } from "node:http";
import { chromium } from "playwright-core";

const base = process.env.SWITCHBOARD_URL;
const channel = process.env.SWITCHBOARD_CHANNEL || "chat-main";
const agent = process.env.SWITCHBOARD_AGENT;
const artifacts = process.env.ARTIFACTS_DIR || "target/browser-artifacts";
const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";

// What this machine's Chromium needs to start headless, as root, offline.
const ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-background-networking",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-component-update",
  "--disable-sync",
];

async function api(method, path, body) {
  const r = await fetch(base + path, {
    method,
    headers: { Authorization: `Bearer ${agent}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

async function eventually(what, f, ms = 15000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Runs `f(page, problems)` in a fresh headless Chromium profile. */
async function withBrowser(name, f) {
  mkdirSync(artifacts, { recursive: true });
  const profile = mkdtempSync(join(tmpdir(), "switchboard-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: ARGS,
  });
  const page = context.pages()[0] || (await context.newPage());
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("response", (r) => {
    if (r.status() >= 400) problems.push(`HTTP ${r.status()} for ${r.url()}`);
  });
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });
  try {
    await f(page, problems);
  } catch (e) {
    await page.screenshot({ path: join(artifacts, `${name}-failure.png`), fullPage: true }).catch(() => {});
    throw e;
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

test("the widget embedded with one script tag on an allowed site", async () => {
  const port = Number(process.env.EMBED_PORT);
  assert.ok(port > 0, "EMBED_PORT is set");
  const site = createServer((req, res) => {
    res.writeHead(200, { "Content-Type": "text/html; charset=utf-8" });
    res.end(`<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Shop</title>
<link rel="icon" href="data:,"></head><body><h1>A shop</h1><p>Products.</p>
<script src="${base}/chat/widget.js" data-channel="${channel}" data-name="Embedded Visitor" defer></script>
</body></html>`);
  });
  await new Promise((resolve) => site.listen(port, "127.0.0.1", resolve));
  try {
    await withBrowser("embed", async (page, problems) => {
      await page.goto(`http://127.0.0.1:${port}/`);
      const launcher = page.getByRole("button", { name: "Chat with us" });
      await launcher.click();
      assert.equal(await launcher.getAttribute("aria-expanded"), "true");
      await page.getByText("Connected.").waitFor({ timeout: 15000 });
      const question = `Do you ship abroad? (${Date.now()})`;
      const box = page.getByLabel("Message", { exact: true });
      await box.fill(question);
      await box.press("Enter");
      const log = page.getByRole("log", { name: "Messages" });
      await log.getByText(question).waitFor();
      const item = await eventually("the embedded visitor's interaction", async () => {
        const r = await api("GET", "/api/v1/interactions?view=all");
        return r.body.items.find((i) => i.last_message && i.last_message.text === question);
      });
      assert.equal(item.contact.name, "Embedded Visitor");
      let r = await api("POST", `/api/v1/interactions/${item.case_number}/assign`, {});
      assert.equal(r.status, 200);
      r = await api("POST", `/api/v1/interactions/${item.case_number}/replies`, { text: "We ship to 40 countries." });
      assert.equal(r.status, 202);
      await log.getByText("We ship to 40 countries.").waitFor({ timeout: 15000 });
      await page.screenshot({ path: join(artifacts, "chat-embedded.png"), fullPage: true });
      assert.deepEqual(problems, []);
    });
  } finally {
    await new Promise((resolve) => site.close(resolve));
  }
});

test("a visitor chats with an agent in the widget, and a reload keeps the history", async () => {
  assert.ok(base, "SWITCHBOARD_URL is set");
  assert.ok(agent, "SWITCHBOARD_AGENT is set");
  await withBrowser("chat", async (page, problems) => {
    await page.goto(`${base}/chat/${channel}`);
    // Accessible by its label, sent with Enter.
    const box = page.getByLabel("Message", { exact: true });
    await box.waitFor();
    await page.getByText("Connected.").waitFor({ timeout: 15000 });
    const question = `Where is my parcel? (${Date.now()})`;
    await box.fill(question);
    await box.press("Enter");
    const log = page.getByRole("log", { name: "Messages" });
    await log.getByText(question).waitFor();

    // The interaction appears for the agent.
    const item = await eventually("the interaction in the agent's list", async () => {
      const r = await api("GET", "/api/v1/interactions?view=all");
      assert.equal(r.status, 200);
      return r.body.items.find(
        (i) => i.channel.id === channel && i.last_message && i.last_message.text === question,
      );
    });
    assert.equal(item.channel.kind, "chat");
    assert.equal(item.status, "new");
    const caseNumber = item.case_number;

    // The agent answers through the API; the answer appears in the page.
    let r = await api("POST", `/api/v1/interactions/${caseNumber}/assign`, {});
    assert.equal(r.status, 200, JSON.stringify(r.body));
    r = await api("POST", `/api/v1/interactions/${caseNumber}/typing`, { state: "on" });
    assert.equal(r.status, 204);
    await page.getByText("The agent is typing…").waitFor();
    const answer = "It left our warehouse this morning 🚚";
    r = await api("POST", `/api/v1/interactions/${caseNumber}/replies`, { text: answer });
    assert.equal(r.status, 202, JSON.stringify(r.body));
    await log.getByText(answer).waitFor({ timeout: 15000 });
    await page.screenshot({ path: join(artifacts, "chat-reply.png"), fullPage: true });

    // A reload keeps the conversation: the same session, the history replayed in order.
    await page.reload();
    await page.getByText("Connected.").waitFor({ timeout: 15000 });
    await log.getByText(answer).waitFor({ timeout: 15000 });
    const texts = await log.locator(".sb-text").allTextContents();
    assert.deepEqual(texts, [question, answer]);
    await page.screenshot({ path: join(artifacts, "chat-after-reload.png"), fullPage: true });
    const i = await api("GET", `/api/v1/interactions/${caseNumber}`);
    assert.equal(i.body.messages.length, 2, "the reload sent nothing twice");
    assert.deepEqual(problems, []);
  });
});
