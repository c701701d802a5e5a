// The agent's inbox (/agent/) in a real browser (Debian's Chromium, driven by
// playwright-core), two agents at once. Run by tests/browser_agent.rs, which
// starts the gateway with the demo configuration and passes:
//   SWITCHBOARD_URL   the gateway's base URL
//   ANNE_TOKEN        anne: every queue (outbound SMS and email included), may transfer
//   BOB_TOKEN         bob: support and sales only
//   SWITCHBOARD_BIN   the switchboard binary, for `switchboard simulate`
//   ARTIFACTS_DIR     where screenshots go (default target/browser-artifacts)
//   CHROMIUM_PATH     the browser (default /usr/bin/chromium)
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execFile } from "node:child_process";
import { chromium } from "playwright-core";

const base = process.env.SWITCHBOARD_URL;
const tokens = { anne: process.env.ANNE_TOKEN, bob: process.env.BOB_TOKEN };
const bin = process.env.SWITCHBOARD_BIN;
const artifacts = process.env.ARTIFACTS_DIR || "target/browser-artifacts";
const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
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
// A 1×1 PNG.
const PIXEL = Buffer.from(
  "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==",
  "base64",
);
const T = 15000;

async function api(who, method, path, body) {
  const r = await fetch(base + path, {
    method,
    headers: { Authorization: `Bearer ${tokens[who]}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

/** A customer writes, exactly as the provider would post it (signed). */
function simulate(channel, text, from) {
  const env = { ...process.env };
  delete env.SWITCHBOARD_CONFIG;
  return new Promise((resolve, reject) =>
    execFile(bin, ["simulate", channel, "--url", base, "--text", text, "--from", from], { env }, (err, stdout, stderr) =>
      err ? reject(new Error(`simulate failed: ${err.message}\n${stdout}\n${stderr}`)) : resolve(stdout),
    ),
  );
}

/** A provider payload from a file, signed as the provider would sign it. */
function simulateFile(channel, path) {
  const env = { ...process.env };
  delete env.SWITCHBOARD_CONFIG;
  return new Promise((resolve, reject) =>
    execFile(bin, ["simulate", channel, "--url", base, "--file", path], { env }, (err, stdout, stderr) =>
      err ? reject(new Error(`simulate failed: ${err.message}\n${stdout}\n${stderr}`)) : resolve(stdout),
    ),
  );
}

async function eventually(what, f, ms = T) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const shot = (page, name) => page.screenshot({ path: join(artifacts, name), fullPage: true });
const rowFor = (page, text) => page.locator("#list .row", { hasText: text });

async function newAgentPage(browser, locale = "en-US", viewport = { width: 1280, height: 860 }) {
  const context = await browser.newContext({ locale, viewport });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    // Refused requests are expected (401 before sign-in, 409, 422); the UI shows them in words.
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) problems.push(`console: ${m.text()}`);
  });
  page.on("response", (r) => {
    if (r.status() >= 500) problems.push(`HTTP ${r.status()} for ${r.url()}`);
  });
  return { context, page, problems };
}

async function signIn(page, who, labels = { token: "Your agent token", button: "Sign in" }) {
  await page.goto(`${base}/agent/`);
  await page.getByLabel(labels.token).fill(tokens[who]);
  await page.getByRole("button", { name: labels.button }).click();
  await page.locator("#who").getByText(who === "anne" ? "Anne Shirley" : "Bob Cratchit").waitFor({ timeout: T });
}

async function caseMenu(page, item) {
  await page.locator("#case-menu-btn").click();
  await page.getByRole("menuitem", { name: item }).click();
}

test("two agents work the digital inbox", async (t) => {
  assert.ok(base && tokens.anne && tokens.bob && bin, "SWITCHBOARD_URL, ANNE_TOKEN, BOB_TOKEN and SWITCHBOARD_BIN are set");
  mkdirSync(artifacts, { recursive: true });
  const browser = await chromium.launch({ executablePath, headless: true, args: ARGS });
  const A = await newAgentPage(browser);
  const B = await newAgentPage(browser);
  const anne = A.page;
  const bob = B.page;
  const stamp = Date.now();
  const first = `Where is my order? ${stamp}`;
  const customer = "+14155550111";
  let caseA;
  try {
    await t.test("the page is served with a strict Content-Security-Policy", async () => {
      const r = await fetch(`${base}/agent/`);
      assert.equal(r.status, 200);
      assert.match(r.headers.get("content-type"), /^text\/html/);
      assert.match(r.headers.get("content-security-policy"), /default-src 'none'; script-src 'self'/);
      for (const [p, ct] of [["app.js", /^text\/javascript/], ["app.css", /^text\/css/], ["i18n.js", /^text\/javascript/]]) {
        const a = await fetch(`${base}/agent/${p}`);
        assert.equal(a.status, 200, p);
        assert.match(a.headers.get("content-type"), ct, p);
      }
    });

    await t.test("sign in: a wrong token is refused in words, the right one opens the inbox", async () => {
      await anne.goto(`${base}/agent/`);
      await anne.getByLabel("Your agent token").fill("not-a-token");
      await anne.getByRole("button", { name: "Sign in" }).click();
      await anne.getByText("You are not signed in, or that token is not valid.").waitFor({ timeout: T });
      await shot(anne, "agent-signin.png");
      await signIn(anne, "anne");
      await signIn(bob, "bob");
      await anne.getByRole("heading", { name: /Digital/ }).waitFor();
    });

    await t.test("a simulated SMS appears live in both lists, in bold, with its channel, sender, preview and status", async () => {
      await simulate("sms-main", first, customer);
      for (const page of [anne, bob]) {
        const row = rowFor(page, first);
        await row.waitFor({ timeout: T });
        assert.match(await row.getAttribute("class"), /unread/);
        const weight = await row.locator(".preview").evaluate((el) => getComputedStyle(el).fontWeight);
        assert.ok(Number(weight) >= 700, `unread is bold (${weight})`);
        assert.equal(await row.locator(".ch").getAttribute("aria-label"), "SMS +1 415 555 0100");
        assert.match(await row.innerText(), /\+14155550111/);
        assert.match(await row.innerText(), /New/);
        assert.ok(await row.locator("time").getAttribute("datetime"));
      }
      await anne.getByText("Pick an interaction from the list to read it and reply.").waitFor();
      await shot(anne, "agent-list-live.png");
    });

    await t.test("the agent who clicks gets it; it leaves the other agent's list", async () => {
      const row = rowFor(bob, first);
      caseA = Number(await row.getAttribute("data-case"));
      await row.click();
      await bob.locator("#messages").getByText(first).waitFor({ timeout: T });
      assert.equal(await bob.locator("#thread-title").innerText(), `Case ${caseA}`);
      await rowFor(anne, first).waitFor({ state: "detached", timeout: T });
      const i = await api("bob", "GET", `/api/v1/interactions/${caseA}`);
      assert.equal(i.body.assigned_to, "bob");
      const taken = await api("anne", "POST", `/api/v1/interactions/${caseA}/assign`, {});
      assert.equal(taken.body.code, "already_assigned");
    });

    await t.test("reply with an attachment: limits shown, 10 MiB checked before upload, delivered, resolved", async () => {
      await bob.getByText("0 / 1600 characters").waitFor();
      const box = bob.getByLabel("Reply", { exact: true });
      await box.fill("It ships today");
      await bob.getByText("14 / 1600 characters").waitFor();
      await bob.getByText("SMS: GSM-7, 1 segment(s)").waitFor({ timeout: T });
      await bob.getByRole("button", { name: "Emoji" }).click();
      await bob.getByRole("button", { name: "Insert 🚚" }).click();
      await bob.getByText("SMS: UCS-2, 1 segment(s)").waitFor({ timeout: T });
      // Too large for the channel (and never sent): refused before any upload.
      await bob.setInputFiles("#files", { name: "huge.png", mimeType: "image/png", buffer: Buffer.alloc(11 * 1024 * 1024) });
      await bob.getByText(/huge\.png is larger than .*; it was not added\./).waitFor();
      assert.equal(await bob.locator("#file-list li").count(), 0);
      await bob.setInputFiles("#files", { name: "pixel.png", mimeType: "image/png", buffer: PIXEL });
      await bob.locator("#file-list").getByText("pixel.png").waitFor();
      await bob.getByRole("button", { name: "Send", exact: true }).click();
      const out = bob.locator("#messages .msg.out");
      await out.getByText("It ships today🚚").waitFor({ timeout: T });
      const img = out.getByRole("img", { name: "pixel.png" });
      await img.waitFor();
      await eventually("the image preview to load", () => img.evaluate((el) => el.complete && el.naturalWidth === 1));
      await out.getByText("Delivered").waitFor({ timeout: T });
      assert.equal(await bob.locator("#thread-status").innerText(), "Resolved");
      await shot(bob, "agent-thread-reply.png");
      const i = await api("bob", "GET", `/api/v1/interactions/${caseA}`);
      assert.equal(i.body.status, "resolved");
      assert.equal(i.body.messages[1].attachments[0].filename, "pixel.png");
    });

    await t.test("contact details: related case editable, private notes saved", async () => {
      await caseMenu(bob, "Contact details");
      const pane = bob.locator("#contact-pane");
      await pane.waitFor();
      assert.equal(await pane.locator("#c-case").innerText(), String(caseA));
      assert.equal(await pane.locator("#c-digital").innerText(), customer);
      await pane.getByLabel("Related case").fill("CRM-7");
      await pane.getByRole("button", { name: "Save", exact: true }).click();
      await bob.getByText("Related case saved.").waitFor();
      await pane.getByLabel("My private notes").fill("Bob: prefers mornings");
      await pane.getByRole("button", { name: "Save notes" }).click();
      await bob.getByText("Notes saved.").waitFor();
      await shot(bob, "agent-contact.png");
      const c = await api("bob", "GET", `/api/v1/interactions/${caseA}/contact`);
      assert.equal(c.body.related_case, "CRM-7");
      assert.equal(c.body.notes, "Bob: prefers mornings");
    });

    await t.test("End with a disposition: it leaves the list", async () => {
      await caseMenu(bob, "End…");
      const d = bob.locator("#end-dialog");
      assert.equal(await d.locator("#end-case").innerText(), String(caseA));
      assert.equal(await d.getByLabel("Related case").inputValue(), "CRM-7");
      await d.getByLabel("Name it relates to").fill("ACME Ltd");
      await d.getByLabel("My private notes").fill("Bob: call back on Friday");
      await shot(bob, "agent-end.png");
      await d.getByRole("button", { name: "Save" }).click();
      await bob.getByText(`Interaction ${caseA} ended.`).waitFor();
      assert.ok(await bob.locator("#thread-pane").isHidden());
      assert.equal(await rowFor(bob, first).count(), 0);
      const i = await api("bob", "GET", `/api/v1/interactions/${caseA}`);
      assert.equal(i.body.assigned_to, null);
      assert.equal(i.body.disposition.related_name, "ACME Ltd");
      assert.equal(i.body.disposition.related_case, "CRM-7");
    });

    const second = `Any news? ${stamp}`;
    await t.test("the customer writes again: back in both lists as Open; the other agent takes it with the keyboard", async () => {
      await simulate("sms-main", second, customer);
      await rowFor(bob, second).waitFor({ timeout: T });
      const row = rowFor(anne, second);
      await row.waitFor({ timeout: T });
      assert.match(await row.innerText(), /Open/);
      await row.focus();
      await anne.keyboard.press("Enter");
      await anne.locator("#messages").getByText(second).waitFor({ timeout: T });
      await rowFor(bob, second).waitFor({ state: "detached", timeout: T });
    });

    await t.test("private notes are not visible to the other agent", async () => {
      await caseMenu(anne, "Contact details");
      const pane = anne.locator("#contact-pane");
      await pane.waitFor();
      assert.equal(await pane.getByLabel("My private notes").inputValue(), "", "anne does not see bob's notes");
      await pane.getByLabel("My private notes").fill("Anne: VIP customer");
      await pane.getByRole("button", { name: "Save notes" }).click();
      await anne.getByText("Notes saved.").waitFor();
      const mine = await api("anne", "GET", `/api/v1/interactions/${caseA}/contact`);
      assert.equal(mine.body.notes, "Anne: VIP customer");
      const bobs = await api("bob", "GET", `/api/v1/interactions/${caseA}/contact`);
      assert.equal(bobs.body.notes, "Bob: call back on Friday", "bob keeps his own (the disposition's) notes");
      await pane.getByRole("button", { name: "Close" }).click();
    });

    await t.test("set as resolved from the case number menu", async () => {
      await caseMenu(anne, "Set as resolved");
      await anne.getByText("Set as resolved.").waitFor();
      await eventually("Resolved", async () => (await anne.locator("#thread-status").innerText()) === "Resolved");
      const i = await api("anne", "GET", `/api/v1/interactions/${caseA}`);
      assert.equal(i.body.status, "resolved");
      assert.equal(i.body.messages.length, 3, "nothing was sent");
    });

    await t.test("transfer to a digital queue: it leaves anne and appears live for bob", async () => {
      await caseMenu(anne, "Transfer…");
      const d = anne.locator("#transfer-dialog");
      const options = await d.locator("option").allInnerTexts();
      assert.deepEqual(options, ["Sales", "Tea time"], "only the other digital queues");
      await d.getByLabel("Queue").selectOption("sales");
      await d.getByRole("button", { name: "Transfer" }).click();
      await anne.getByText(`Interaction ${caseA} transferred to Sales.`).waitFor();
      assert.ok(await anne.locator("#thread-pane").isHidden());
      await rowFor(bob, second).waitFor({ timeout: T });
      const i = await api("anne", "GET", `/api/v1/interactions/${caseA}`);
      assert.equal(i.body.queue, "sales");
      assert.equal(i.body.assigned_to, null);
      assert.equal(i.body.transfer_count, 1);
    });

    await t.test("switch between own interactions; the badge counts unread ones", async () => {
      await rowFor(bob, second).click();
      await bob.locator("#messages").getByText(second).waitFor({ timeout: T });
      const other = `Hello, I need help ${stamp}`;
      await simulate("sms-main", other, "+14155550122");
      await rowFor(bob, other).click();
      await bob.locator("#messages").getByText(other).waitFor({ timeout: T });
      assert.ok(await bob.locator("#mine-badge").isHidden());
      // The badge comes with /api/v1/me; the list of everything ever
      // assigned to bob is read only when he opens it.
      const mineReads = [];
      const watch = (req) => { if (new URL(req.url()).searchParams.get("view") === "mine") mineReads.push(req.url()); };
      bob.on("request", watch);
      // The first customer writes while bob looks at the other one.
      const third = `Still there? ${stamp}`;
      await simulate("sms-main", third, customer);
      await eventually("the badge", async () => (await bob.locator("#mine-badge").isVisible()) && (await bob.locator("#mine-badge").innerText()) === "1");
      assert.deepEqual(mineReads, [], "the refresh reads no view=mine");
      await bob.getByRole("button", { name: /My interactions/ }).click();
      const d = bob.locator("#mine-dialog");
      await d.locator(".row").first().waitFor({ timeout: T });
      bob.off("request", watch);
      assert.equal(mineReads.length, 1, "opening the dialog reads it");
      assert.equal(await d.locator(".row").count(), 2);
      const target = d.locator(`.row[data-case="${caseA}"]`);
      assert.match(await target.getAttribute("class"), /unread/);
      await shot(bob, "agent-switch.png");
      await target.click();
      await bob.locator("#messages").getByText(third).waitFor({ timeout: T });
      assert.equal(await bob.locator("#thread-title").innerText(), `Case ${caseA}`);
      await eventually("the badge to clear", () => bob.locator("#mine-badge").isHidden());
      await bob.getByRole("button", { name: /Principal/ }).click();
      assert.ok(await bob.locator("#thread-pane").isHidden());
    });

    await t.test("filter by several tags and sort by received, channel or priority", async () => {
      const sms = `Tagged SMS ${stamp}`;
      const wa = `Tagged WhatsApp ${stamp}`;
      await simulate("sms-main", sms, "+14155550133");
      await rowFor(anne, sms).waitFor({ timeout: T });
      await simulate("wa-main", wa, "15551230001");
      await rowFor(anne, wa).waitFor({ timeout: T });
      const order = async () => (await anne.locator("#list .row .preview").allInnerTexts()).filter((x) => x.endsWith(String(stamp)));
      assert.deepEqual(await order(), [wa, sms], "newest first by default");
      const smsCase = Number(await rowFor(anne, sms).getAttribute("data-case"));
      const waCase = Number(await rowFor(anne, wa).getAttribute("data-case"));
      let r = await api("anne", "PATCH", `/api/v1/interactions/${smsCase}`, { tags: ["vip"], priority: 5 });
      assert.equal(r.status, 200, JSON.stringify(r.body));
      r = await api("anne", "PATCH", `/api/v1/interactions/${waCase}`, { tags: ["billing"] });
      assert.equal(r.status, 200, JSON.stringify(r.body));
      // The tags in use appear live, and on the rows.
      const tags = anne.getByRole("group", { name: "Tags" });
      await tags.getByLabel("billing").waitFor({ timeout: T });
      await tags.getByLabel("vip").waitFor({ timeout: T });
      await rowFor(anne, wa).locator(".tag", { hasText: "billing" }).waitFor({ timeout: T });
      await anne.getByLabel("Sort by").selectOption("channel");
      await eventually("channel order", async () => JSON.stringify(await order()) === JSON.stringify([sms, wa]));
      await anne.getByLabel("Sort by").selectOption("received");
      await eventually("received order", async () => JSON.stringify(await order()) === JSON.stringify([wa, sms]));
      await anne.getByLabel("Sort by").selectOption("priority");
      await eventually("priority order", async () => (await anne.locator("#list .row").first().innerText()).includes(sms));
      await anne.getByLabel("Sort by").selectOption("received");
      await tags.getByLabel("billing").check();
      await eventually("only billing", async () => JSON.stringify(await order()) === JSON.stringify([wa]));
      await tags.getByLabel("vip").check();
      await eventually("billing or vip", async () => JSON.stringify(await order()) === JSON.stringify([wa, sms]));
      await shot(anne, "agent-tags.png");
      await tags.getByLabel("billing").uncheck();
      await eventually("only vip", async () => JSON.stringify(await order()) === JSON.stringify([sms]));
      await tags.getByLabel("vip").uncheck();
      await eventually("all again", async () => (await order()).length === 2);

      // A new message refreshes the list, not the tags in use: those are read
      // from every interaction of the queues, and only a change to an
      // interaction's tags, queue or assignee can change them.
      const tagReads = [];
      const count = (req) => { if (new URL(req.url()).pathname === "/api/v1/tags") tagReads.push(req.url()); };
      anne.on("request", count);
      const later = `Untagged SMS ${stamp}`;
      await simulate("sms-main", later, "+14155550134");
      await rowFor(anne, later).waitFor({ timeout: T });
      assert.deepEqual(tagReads, [], "no tags read for a new message");
      r = await api("anne", "PATCH", `/api/v1/interactions/${waCase}`, { tags: ["billing", "urgent"] });
      assert.equal(r.status, 200, JSON.stringify(r.body));
      await tags.getByLabel("urgent").waitFor({ timeout: T });
      anne.off("request", count);
      assert.ok(tagReads.length >= 1, "the tags read again after a tag change");
      await eventually("all three", async () => (await order()).length === 3);
    });

    await t.test("the messaging window and the channel's limits are shown (WhatsApp)", async () => {
      await rowFor(anne, `Tagged WhatsApp ${stamp}`).click();
      await anne.locator("#messages").getByText(`Tagged WhatsApp ${stamp}`).waitFor({ timeout: T });
      await anne.getByText(/^Messaging window open until .+\.$/).waitFor();
      await anne.getByText(/^0 \/ 4096 characters$/).waitFor();
      assert.equal(await anne.locator("#sms-info").innerText(), "", "no SMS segments outside SMS");
      await anne.getByRole("button", { name: /Principal/ }).click();
    });

    await t.test("an API refusal is shown in words (SMS opt-out)", async () => {
      const sms = `Tagged SMS ${stamp}`;
      await simulate("sms-main", "STOP", "+14155550133");
      await rowFor(anne, "STOP").click();
      await anne.locator("#messages").getByText(sms).waitFor({ timeout: T });
      await anne.getByLabel("Reply", { exact: true }).fill("Are you sure?");
      await anne.getByRole("button", { name: "Send", exact: true }).click();
      const alert = anne.locator("#error");
      await alert.getByText("This contact has opted out of SMS (they sent STOP); they must send START first.").waitFor({ timeout: T });
      assert.doesNotMatch(await alert.innerText(), /opted_out/, "never the raw code");
      await alert.getByRole("button", { name: "Close" }).click();
      await anne.getByRole("button", { name: /Principal/ }).click();
    });

    await t.test("New → SMS is offered only to anne, and sends", async () => {
      assert.equal(await bob.getByRole("button", { name: "New", exact: true }).count(), 0, "bob has no outbound queue");
      await anne.getByRole("button", { name: "New", exact: true }).click();
      await anne.getByRole("menuitem", { name: "SMS" }).click();
      const d = anne.locator("#out-dialog");
      await d.getByRole("heading", { name: "New SMS" }).waitFor();
      assert.equal(await d.getByLabel("Sending channel").inputValue(), "sms-main");
      await d.getByLabel(/Mobile number/).fill("+14155550177");
      await d.getByRole("textbox", { name: "Message" }).fill("Your parcel is ready");
      await d.getByText("SMS: GSM-7, 1 segment(s)").waitFor({ timeout: T });
      await d.getByRole("button", { name: "Next" }).click();
      await d.getByLabel("Name", { exact: true }).fill("Marilla Cuthbert");
      await d.getByLabel("My private notes").fill("Anne: outbound");
      await d.getByRole("button", { name: "Save and send" }).click();
      const out = anne.locator("#messages .msg.out");
      await out.getByText("Your parcel is ready").waitFor({ timeout: T });
      await out.getByText("Delivered").waitFor({ timeout: T });
      assert.match(await anne.locator("#thread-who").innerText(), /Marilla Cuthbert/);
      await shot(anne, "agent-outbound-sms.png");
    });

    await t.test("New → Email: formatted body, an attachment, contact details; it goes out through the SMTP sink and is sent", async () => {
      await anne.getByRole("button", { name: "New", exact: true }).click();
      await anne.getByRole("menuitem", { name: "Email" }).click();
      const d = anne.locator("#out-dialog");
      await d.getByRole("heading", { name: "New email" }).waitFor();
      assert.equal(await d.getByLabel("Sending channel").inputValue(), "mail-main");
      assert.equal(await d.getByLabel("Sending channel").locator("option:checked").innerText(), "Email support@demo.example");
      assert.ok(await d.locator("#out-nochannel").isHidden(), "the demo has an email channel");
      // What is missing is said in words, before anything is sent.
      await d.getByRole("button", { name: "Next" }).click();
      await d.getByText("Give the recipient's email address. Give a subject. Write a message.").waitFor();
      assert.equal(await d.getByLabel("Recipient email address").getAttribute("aria-invalid"), "true");
      assert.ok(await d.getByLabel("Recipient email address").evaluate((el) => el === document.activeElement), "the first missing field has the focus");
      await d.getByLabel("Recipient email address").fill("kerry@");
      await d.getByRole("button", { name: "Next" }).click();
      await d.getByText("The recipient is not an email address. Give a subject. Write a message.").waitFor();
      const to = `kerry.${stamp}@example.com`;
      const subject = `Your order ${stamp}`;
      await d.getByLabel("Recipient email address").fill(to);
      await d.getByLabel("Subject").fill(subject);
      await d.getByRole("textbox", { name: "Message" }).click();
      await anne.keyboard.type("Hello ");
      await d.getByRole("button", { name: "Bold" }).click();
      await anne.keyboard.type("Kerry");
      await d.getByRole("button", { name: "Bold" }).click();
      await anne.keyboard.type(", your invoice is attached.");
      assert.match(await d.locator("#out-html").innerHTML(), /<b>Kerry<\/b>/);
      await d.locator("#out-files").setInputFiles({ name: "invoice.pdf", mimeType: "application/pdf", buffer: Buffer.from("%PDF-1.4\n%demo\n") });
      await d.locator("#out-file-list").getByText(/^invoice\.pdf \(\d+ B\)/).waitFor();
      await shot(anne, "agent-outbound-email.png");
      await d.getByRole("button", { name: "Next" }).click();
      await d.getByLabel("Name", { exact: true }).fill("Kerry Fisher");
      await d.getByLabel("Related case").fill("CRM-42");
      await d.getByLabel("My private notes").fill("Anne: sent the invoice");
      await d.getByRole("button", { name: "Save and send" }).click();
      const out = anne.locator("#messages .msg.out");
      await out.getByText("Hello Kerry, your invoice is attached.").waitFor({ timeout: T });
      await out.getByRole("link", { name: /invoice\.pdf/ }).waitFor();
      await out.locator(".delivery", { hasText: "Sent" }).waitFor({ timeout: T });
      assert.equal(await anne.locator("#thread-who").innerText(), "Kerry Fisher · Email support@demo.example");
      assert.equal(await anne.locator("#thread-subject").innerText(), `Subject: ${subject}`);
      await shot(anne, "agent-email-sent.png");
      const n = Number((await anne.locator("#thread-title").innerText()).replace(/\D/g, ""));
      const i = (await api("anne", "GET", `/api/v1/interactions/${n}`)).body;
      assert.equal(i.channel.id, "mail-main");
      assert.equal(i.digital_id, to);
      assert.equal(i.subject, subject);
      assert.equal(i.status, "resolved");
      assert.equal(i.assigned_to, "anne");
      assert.equal(i.related_case, "CRM-42");
      assert.equal(i.messages[0].status, "sent");
      assert.equal(i.messages[0].attachments[0].filename, "invoice.pdf");
      // The SMTP sink took it: envelope, subject and attachment.
      const sink = await (await fetch(`${base}/sandbox/smtp/messages`)).json();
      const mail = sink.messages.find((m) => m.subject === subject);
      assert.ok(mail, `the sink has the message: ${JSON.stringify(sink)}`);
      assert.equal(mail.mail_from, "support@demo.example");
      assert.deepEqual(mail.rcpt_to, [to]);
      assert.deepEqual(mail.attachments, ["invoice.pdf"]);
      const c = await api("anne", "GET", `/api/v1/interactions/${n}/contact`);
      assert.equal(c.body.notes, "Anne: sent the invoice");
    });

    await t.test("an HTML email is shown formatted and safe, with its inline image; the toggle shows the plain text", async () => {
      const subject = `Formatted ${stamp}`;
      const cid = `logo-${stamp}@example.com`;
      // Active content that must never run, whatever the server let through.
      const html = `<html><head><script>window.__pwned = "head"; document.title = "pwned";</script></head>
<body><p>Hello, <b>Bold words ${stamp}</b> and <a href="https://example.com/orders?id=${stamp}" onclick="window.__pwned='click'">your order</a>.</p>
<p><img src="cid:${cid}" alt="Our logo" width="1" height="1"></p>
<p><img src="https://tracker.example/pixel-${stamp}.gif" alt="tracker"></p>
<img src="x" onerror="window.__pwned = 'onerror'; document.title = 'pwned'">
<script>window.__pwned = "body"; document.title = "pwned";</script>
<iframe src="https://example.com/"></iframe>
</body></html>`;
      const eml = [
        `From: Kerry Fisher <kerry.html.${stamp}@example.com>`,
        "To: support@demo.example",
        `Subject: ${subject}`,
        `Message-ID: <html-${stamp}@example.com>`,
        `Date: ${new Date().toUTCString()}`,
        "MIME-Version: 1.0",
        'Content-Type: multipart/alternative; boundary="alt-b"',
        "",
        "--alt-b",
        "Content-Type: text/plain; charset=utf-8",
        "",
        `Hello, Bold words ${stamp} (plain) and your order.`,
        "--alt-b",
        'Content-Type: multipart/related; boundary="rel-b"',
        "",
        "--rel-b",
        "Content-Type: text/html; charset=utf-8",
        "",
        html,
        "--rel-b",
        "Content-Type: image/png",
        "Content-Transfer-Encoding: base64",
        `Content-ID: <${cid}>`,
        'Content-Disposition: inline; filename="logo.png"',
        "",
        PIXEL.toString("base64"),
        "--rel-b--",
        "--alt-b--",
        "",
      ].join("\r\n");
      const file = join(mkdtempSync(join(tmpdir(), "switchboard-eml-")), "html.eml");
      writeFileSync(file, eml);
      const remoteRequests = [];
      const watch = (r) => { if (/tracker\.example|\/agent\/x$/.test(r.url())) remoteRequests.push(r.url()); };
      anne.on("request", watch);
      await simulateFile("mail-main", file);
      await rowFor(anne, subject).click();
      const msg = anne.locator("#messages .msg.in", { hasText: `Bold words ${stamp}` });
      await msg.waitFor({ timeout: T });
      const body = msg.locator(".html-body");
      // Formatted: the bold text, the link (new tab, no referrer) and the inline image from the gateway.
      const bold = body.locator("b", { hasText: `Bold words ${stamp}` });
      await bold.waitFor();
      // Opening it marks it read, and the thread is drawn again when that
      // event comes back: ask again until the style is the drawn one's.
      await eventually("bold to be bold", async () => Number(await bold.evaluate((el) => getComputedStyle(el).fontWeight)) >= 700);
      const link = body.getByRole("link", { name: "your order" });
      assert.equal(await link.getAttribute("href"), `https://example.com/orders?id=${stamp}`);
      assert.equal(await link.getAttribute("target"), "_blank");
      assert.match(await link.getAttribute("rel"), /noopener/);
      assert.match(await link.getAttribute("rel"), /noreferrer/);
      const img = body.getByRole("img", { name: "Our logo" });
      await img.waitFor();
      assert.match(await img.getAttribute("src"), /^\/api\/v1\/attachments\/[^/]+$/);
      await eventually("the inline image to load", () => img.evaluate((el) => el.complete && el.naturalWidth === 1));
      assert.equal(await msg.locator(".atts").getByRole("img").count(), 0, "the inline image is not shown twice");
      // The remote image is not fetched (tracking pixel): a note says so.
      await msg.getByText(/Images from other sites were not loaded/).waitFor();
      await body.getByText("[remote image not loaded: tracker]").waitFor();
      // Nothing active ran or was copied into the page.
      assert.equal(await anne.evaluate(() => window.__pwned), undefined, "no script ran");
      assert.equal(await anne.title(), "Switchboard inbox");
      assert.equal(await body.locator("script, iframe, style, [onclick], [onerror]").count(), 0);
      assert.equal(await body.evaluate((el) => [...el.querySelectorAll("*")].some((e) => [...e.attributes].some((a) => /^on/i.test(a.name) || a.name === "style"))), false);
      await shot(anne, "agent-email-html.png");
      // The toggle: plain text, then formatted again.
      await msg.getByRole("button", { name: "Show plain text" }).click();
      await msg.getByText(`Hello, Bold words ${stamp} (plain) and your order.`).waitFor();
      assert.equal(await msg.locator(".html-body").count(), 0);
      await msg.locator(".atts").getByRole("img", { name: "logo.png" }).waitFor();
      const back = msg.getByRole("button", { name: "Show formatted" });
      assert.ok(await back.evaluate((el) => el === document.activeElement), "the toggle keeps the focus");
      await back.click();
      await msg.locator(".html-body b", { hasText: `Bold words ${stamp}` }).waitFor();
      await anne.waitForTimeout(300);
      anne.off("request", watch);
      assert.deepEqual(remoteRequests, [], "no remote image was requested");
      assert.equal(await anne.evaluate(() => window.__pwned), undefined, "no script ran");
      const n = Number((await anne.locator("#thread-title").innerText()).replace(/\D/g, ""));
      const i = (await api("anne", "GET", `/api/v1/interactions/${n}`)).body;
      assert.match(i.messages[0].html, /<b>Bold words/);
      // Defence in depth: even HTML the server did not sanitize is rendered inert.
      const evil = `<p><b>Unsanitized ${stamp}</b> <a href="javascript:window.__pwned='js'">click</a></p>
<img src="x" onerror="window.__pwned='onerror'"><svg onload="window.__pwned='svg'"></svg>
<script>window.__pwned='script'</script><style>body{display:none}</style>
<p style="color:red" onclick="window.__pwned='click'" id="app">styled</p>
<form action="https://evil.example/"><input name="q"></form><iframe srcdoc="<script>parent.__pwned='frame'</script>"></iframe>
<img src="https://tracker.example/raw-${stamp}.gif"><a href="https://example.com/ok">fine</a>`;
      const route = `${base}/api/v1/interactions/${n}`;
      const handler = async (r) => {
        const res = await r.fetch();
        const j = await res.json();
        j.messages[0].html = evil;
        await r.fulfill({ response: res, json: j });
      };
      // The inert parsed document is checked against the page's CSP, which refuses
      // (and reports on the console) the handlers and styles it holds: expected here only.
      const before = A.problems.length;
      anne.on("request", watch);
      await anne.route(route, handler);
      await rowFor(anne, subject).click();
      const raw = anne.locator("#messages .msg.in .html-body");
      await raw.locator("b", { hasText: `Unsanitized ${stamp}` }).waitFor({ timeout: T });
      await raw.getByText("styled").click();
      await raw.locator("a", { hasText: "click" }).click();
      await anne.waitForTimeout(300);
      await anne.unroute(route, handler);
      anne.off("request", watch);
      const reports = A.problems.splice(before);
      assert.ok(reports.every((p) => /violates the following Content Security Policy directive/.test(p)), reports.join("\n"));
      assert.equal(await anne.evaluate(() => window.__pwned), undefined, "nothing in unsanitized HTML ran");
      assert.equal(await raw.locator("script, style, svg, form, input, iframe, [id], [style], [onclick], [onerror]").count(), 0);
      assert.equal(await raw.locator("a", { hasText: "click" }).getAttribute("href"), null, "javascript: links lose their address");
      assert.equal(await raw.getByRole("link", { name: "fine" }).getAttribute("href"), "https://example.com/ok");
      assert.deepEqual(remoteRequests, [], "no remote image was requested");
      assert.ok(await anne.locator("#app").isVisible(), "the page's own elements are untouched");
    });

    await t.test("a failed delivery shows its reason in words, and the interaction comes back open", async () => {
      // The New menu by keyboard: Enter opens it on its first item, arrows move, Enter picks.
      const focused = () => anne.evaluate(() => document.activeElement.textContent);
      await anne.getByRole("button", { name: "New", exact: true }).focus();
      await anne.keyboard.press("Enter");
      await eventually("Email to have the focus", async () => (await focused()) === "Email");
      await anne.keyboard.press("ArrowDown");
      assert.equal(await focused(), "SMS");
      await anne.keyboard.press("ArrowDown");
      assert.equal(await focused(), "Email", "the arrows wrap around");
      await anne.keyboard.press("End");
      assert.equal(await focused(), "SMS");
      await anne.keyboard.press("Enter");
      const d = anne.locator("#out-dialog");
      await d.getByRole("heading", { name: "New SMS" }).waitFor();
      await d.getByLabel(/Mobile number/).fill("4155550188");
      await d.getByRole("textbox", { name: "Message" }).fill("Your table is booked [sandbox:fail]");
      await d.getByRole("button", { name: "Next" }).click();
      await d.getByText("Give the mobile number in international form, e.g. +14155550123.").waitFor();
      await d.getByLabel(/Mobile number/).fill("+14155550188");
      await d.getByRole("button", { name: "Next" }).click();
      await d.getByLabel("Name", { exact: true }).fill("Diana Barry");
      await d.getByRole("button", { name: "Save and send" }).click();
      const msg = anne.locator("#messages .msg.out", { hasText: "Your table is booked" });
      await msg.waitFor({ timeout: T });
      await msg.getByText("Not delivered: the phone is off or out of reach (ErrorCode 30003: unreachable handset)").waitFor({ timeout: T });
      // In Spanish the reason is in Spanish; the provider's own words stay as they came.
      await anne.getByRole("combobox", { name: "Language" }).selectOption("es");
      await anne.locator("#messages .msg.out", { hasText: "Your table is booked" })
        .getByText("No entregado: el teléfono está apagado o fuera de cobertura (ErrorCode 30003: unreachable handset)")
        .waitFor({ timeout: T });
      await anne.getByRole("combobox", { name: "Idioma" }).selectOption("en");
      await msg.getByText("Not delivered: the phone is off or out of reach (ErrorCode 30003: unreachable handset)").waitFor({ timeout: T });
      await msg.locator(".delivery", { hasText: "Failed" }).waitFor();
      assert.match(await msg.getAttribute("class"), /failed/);
      await eventually("Open", async () => (await anne.locator("#thread-status").innerText()) === "Open");
      await shot(anne, "agent-failed-delivery.png");
      const n = Number((await anne.locator("#thread-title").innerText()).replace(/\D/g, ""));
      const i = (await api("anne", "GET", `/api/v1/interactions/${n}`)).body;
      assert.equal(i.status, "open");
      assert.equal(i.in_queue, true);
      assert.equal(i.assigned_to, "anne");
      assert.equal(i.messages[0].status, "failed");
      // Twilio's test number for an invalid To is refused at once, in Twilio's words.
      let r = await api("anne", "POST", "/api/v1/outbound/sms", { channel: "sms-main", to: "+15005550001", text: "Hi", contact: {} });
      assert.equal(r.status, 202, JSON.stringify(r.body));
      let failed = await eventually("the refused SMS to fail", async () => {
        const m = (await api("anne", "GET", `/api/v1/interactions/${r.body.case_number}`)).body.messages[0];
        return m.status === "failed" && m;
      });
      assert.match(failed.error, /21211.*is not a valid phone number/);
      // Mail to fail.example is refused by the SMTP sink (550).
      r = await api("anne", "POST", "/api/v1/outbound/email", { channel: "mail-main", to: "nobody@fail.example", subject: "Hi", text: "Hi", contact: {} });
      assert.equal(r.status, 202, JSON.stringify(r.body));
      failed = await eventually("the refused email to fail", async () => {
        const m = (await api("anne", "GET", `/api/v1/interactions/${r.body.case_number}`)).body.messages[0];
        return m.status === "failed" && m;
      });
      assert.match(failed.error, /550.*nobody@fail\.example/);
    });

    await t.test("a failed attachment download is marked in words, and can be tried again", async () => {
      const text = `Photos of the damage ${stamp}`;
      const form = new URLSearchParams({
        MessageSid: `SM${stamp}0mms`, AccountSid: "AC00000000000000000000000000000000",
        From: "+14155550199", To: "+14155550100", Body: text, NumMedia: "2",
        MediaUrl0: `${base}/sandbox/media/missing-${stamp}.jpg`, MediaContentType0: "image/jpeg",
        MediaUrl1: `${base}/sandbox/media/flaky-${stamp}.png`, MediaContentType1: "image/png",
      });
      const file = join(mkdtempSync(join(tmpdir(), "switchboard-mms-")), "mms.txt");
      writeFileSync(file, form.toString());
      await simulateFile("sms-main", file);
      await anne.getByRole("button", { name: /Principal/ }).click();
      await rowFor(anne, text).click();
      const msg = anne.locator("#messages .msg.in", { hasText: text });
      await msg.waitFor({ timeout: T });
      assert.equal(await msg.locator(".att.failed").count(), 2);
      await msg.getByText("attachment-1 could not be downloaded: the provider no longer has the file (HTTP 404).").waitFor();
      await shot(anne, "agent-failed-attachment.png");
      // The flaky one is there the second time.
      await msg.getByRole("button", { name: "Try downloading attachment-2 again" }).click();
      const img = msg.getByRole("img", { name: "attachment-2.png" });
      await img.waitFor({ timeout: T });
      await eventually("the image to load", () => img.evaluate((el) => el.complete && el.naturalWidth === 1));
      await anne.getByText("attachment-2.png downloaded.").waitFor();
      // The missing one is still missing, and the agent is told so.
      await msg.getByRole("button", { name: "Try downloading attachment-1 again" }).click();
      const alert = anne.locator("#error");
      await alert.getByText("attachment-1 still could not be downloaded.").waitFor({ timeout: T });
      await alert.getByRole("button", { name: "Close" }).click();
      assert.equal(await msg.locator(".att.failed").count(), 1);
      await anne.getByRole("button", { name: /Principal/ }).click();
    });

    await t.test("the language switch", async () => {
      await anne.getByRole("combobox", { name: "Language" }).selectOption("es");
      await anne.getByRole("button", { name: "Cerrar sesión" }).waitFor();
      await anne.getByRole("button", { name: /Mis interacciones/ }).waitFor();
      await anne.getByRole("combobox", { name: "Idioma" }).selectOption("en");
      await anne.getByRole("button", { name: "Sign out" }).waitFor();
    });

    await t.test("the Spanish interface from the browser's language", async () => {
      const E = await newAgentPage(browser, "es-ES");
      try {
        const page = E.page;
        await page.goto(`${base}/agent/`);
        await page.getByLabel("Tu token de agente").fill("no-vale");
        await page.getByRole("button", { name: "Iniciar sesión" }).click();
        await page.getByText("No has iniciado sesión o ese token no es válido.").waitFor({ timeout: T });
        await signIn(page, "bob", { token: "Tu token de agente", button: "Iniciar sesión" });
        await page.getByRole("button", { name: /Mis interacciones/ }).waitFor();
        await page.getByLabel("Ordenar por").waitFor();
        await page.getByRole("button", { name: "Cerrar sesión" }).waitFor();
        assert.equal(await page.evaluate(() => document.documentElement.lang), "es");
        await shot(page, "agent-es.png");
        assert.deepEqual(E.problems, []);
      } finally {
        await E.context.close();
      }
    });

    await t.test("live updates cut: \"Reconnecting…\" is shown, and the list catches up once they are back", async () => {
      const R = await newAgentPage(browser);
      try {
        const page = R.page;
        // The live-update stream fails as a dropped network does; the
        // browser keeps retrying it by itself.
        let cut = true;
        let refused = 0;
        await page.route("**/api/v1/events", (route) => {
          if (!cut) return route.continue();
          refused += 1;
          return route.abort("internetdisconnected");
        });
        await signIn(page, "anne");
        const banner = page.locator("#conn");
        await banner.getByText("Reconnecting…").waitFor({ timeout: T });
        assert.equal(await banner.getAttribute("role"), "status");
        await shot(page, "agent-reconnecting.png");
        const missed = `Written while the page was offline ${stamp}`;
        await simulate("sms-main", missed, "+14155550177");
        // Nothing tells the page meanwhile: it waits, and says why.
        await page.waitForTimeout(1000);
        assert.equal(await rowFor(page, missed).count(), 0, "no live update without the stream");
        assert.ok(await banner.isVisible());
        cut = false;
        // The browser's next try goes through: the banner goes and the list catches up.
        await rowFor(page, missed).waitFor({ timeout: T });
        await banner.waitFor({ state: "hidden", timeout: T });
        assert.ok(refused >= 1, `the stream was refused ${refused} times`);
        assert.deepEqual(R.problems.filter((p) => !p.includes("/api/v1/events")), []);
      } finally {
        await R.context.close();
      }
    });

    await t.test("readable on a phone", async () => {
      await bob.setViewportSize({ width: 390, height: 844 });
      await rowFor(bob, `Hello, I need help ${stamp}`).waitFor({ timeout: T }).catch(() => {});
      await bob.locator(`#list .row`).first().click();
      await bob.getByRole("button", { name: "Back" }).waitFor();
      assert.ok(await bob.locator("#list-pane").isHidden(), "one pane at a time");
      const overflow = await bob.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
      assert.equal(overflow, false, "no horizontal scrolling");
      await shot(bob, "agent-phone.png");
      await bob.getByRole("button", { name: "Back" }).click();
      await bob.locator("#list-pane").waitFor();
      // The new email form fits a phone too.
      await anne.setViewportSize({ width: 390, height: 844 });
      await anne.getByRole("button", { name: "New", exact: true }).click();
      await anne.getByRole("menuitem", { name: "Email" }).click();
      const d = anne.locator("#out-dialog");
      await d.getByRole("heading", { name: "New email" }).waitFor();
      const box = await d.boundingBox();
      assert.ok(box.x >= 0 && box.x + box.width <= 390, `the dialog fits the screen: ${JSON.stringify(box)}`);
      assert.equal(await anne.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1), false, "no horizontal scrolling");
      await shot(anne, "agent-phone-email.png");
      await anne.keyboard.press("Escape");
      await d.waitFor({ state: "hidden" });
      await anne.setViewportSize({ width: 1280, height: 860 });
    });

    await t.test("sign out", async () => {
      await anne.getByRole("button", { name: "Sign out" }).click();
      await anne.getByLabel("Your agent token").waitFor();
      await anne.reload();
      await anne.getByLabel("Your agent token").waitFor();
      assert.deepEqual(A.problems, []);
      assert.deepEqual(B.problems, []);
    });
  } finally {
    await browser.close();
  }
});
