// The agent's digital inbox: vanilla JavaScript over the agent API
// (session cookie from POST /agent/session; SSE from /api/v1/events).
"use strict";
(() => {
  const MAX_FILE = 10 * 1024 * 1024;
  const EMOJI = ["😀", "🙂", "😉", "😊", "👍", "🙏", "👋", "🎉", "❤️", "✅", "📦", "🚚", "⏰", "📞", "💬", "🙌"];
  const CHANNEL_ICON = { chat: "💬", email: "✉", facebook: "f", instagram: "◎", sms: "✆", twitter: "𝕏", whatsapp: "☏" };
  const $ = (id) => document.getElementById(id);
  const S = {
    lang: "en", me: null, tagsStale: true, tagsAt: 0, channels: {}, queues: [], tags: [], selectedTags: new Set(),
    items: [], current: null, plainText: new Set(), files: [], events: null, outKind: null, refreshTimer: null, previewTimer: null,
  };

  // ---------- texts ----------
  function pickLang() {
    const saved = localStorage.getItem("sb-lang");
    if (saved === "en" || saved === "es") return saved;
    const langs = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || "en"];
    for (const l of langs) {
      const p = String(l).toLowerCase().slice(0, 2);
      if (p === "es" || p === "en") return p;
    }
    return "en";
  }
  function t(key, vars) {
    const dict = window.SB_I18N[S.lang] || window.SB_I18N.en;
    let v = key.split(".").length === 2 && (key.startsWith("err.") || key.startsWith("field."))
      ? (dict[key.split(".")[0]] || {})[key.split(".")[1]]
      : dict[key];
    if (v === undefined) v = window.SB_I18N.en[key] !== undefined ? window.SB_I18N.en[key] : key;
    return String(v).replace(/\{(\w+)\}/g, (_, k) => (vars && vars[k] !== undefined ? String(vars[k]) : ""));
  }
  function applyTexts() {
    document.documentElement.lang = S.lang;
    document.title = t("app");
    for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
    for (const el of document.querySelectorAll("[data-i18n-label]")) el.setAttribute("aria-label", t(el.dataset.i18nLabel));
    $("lang").value = S.lang;
    $("lang-signin").value = S.lang;
  }
  function setLang(l) {
    S.lang = l;
    localStorage.setItem("sb-lang", l);
    applyTexts();
    if (S.me) {
      renderWho();
      renderList();
      if (S.current) renderThread();
    }
  }

  // ---------- helpers ----------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c);
    return el;
  }
  const fmtTime = (iso) => {
    if (!iso) return "";
    const d = new Date(iso);
    const same = d.toDateString() === new Date().toDateString();
    return same
      ? d.toLocaleTimeString(S.lang, { hour: "2-digit", minute: "2-digit" })
      : d.toLocaleString(S.lang, { dateStyle: "short", timeStyle: "short" });
  };
  const fmtSize = (n) => (n >= 1048576 ? (n / 1048576).toFixed(1) + " MiB" : n >= 1024 ? Math.round(n / 1024) + " KiB" : n + " B");
  const key = () => (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random().toString(16).slice(2));

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.detail) || `HTTP ${status}`);
      this.status = status;
      this.code = (body && body.code) || (status === 0 ? "network" : "unknown");
      this.field = body && body.field;
    }
  }
  function errorText(e) {
    if (!(e instanceof ApiError)) return t("err.network");
    if (e.code === "validation_failed") {
      if (!e.field) return t("err.validation_failed_nofield");
      const f = t("field." + e.field);
      return t("err.validation_failed", { field: f.startsWith("field.") ? e.field : f });
    }
    const dict = (window.SB_I18N[S.lang] || window.SB_I18N.en).err;
    return dict[e.code] ? dict[e.code] : t("err.unknown", { status: e.status });
  }
  async function api(method, path, body) {
    const opts = { method, credentials: "same-origin", headers: {} };
    if (body instanceof FormData) opts.body = body;
    else if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    if (path.endsWith("/replies")) opts.headers["Idempotency-Key"] = key();
    let r;
    try {
      r = await fetch(path, opts);
    } catch (_) {
      throw new ApiError(0, null);
    }
    const text = await r.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!r.ok) {
      if (r.status === 401 && S.me && path !== "/agent/session") showSignin();
      throw new ApiError(r.status, data);
    }
    return data;
  }
  let toastTimer = null;
  function toast(msg) {
    $("toast").textContent = msg;
    $("toast").classList.add("show");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => $("toast").classList.remove("show"), 4000);
  }
  function showError(e, where) {
    const msg = typeof e === "string" ? e : errorText(e);
    if (where) {
      where.textContent = msg;
      return;
    }
    const el = $("error");
    el.textContent = "";
    el.append(h("span", { text: msg }), h("button", { type: "button", class: "close", "aria-label": t("close"), onclick: () => (el.hidden = true), text: "×" }));
    el.hidden = false;
  }
  function clearError() { $("error").hidden = true; }

  // ---------- sign in / out ----------
  function showSignin() {
    S.me = null;
    if (S.events) { S.events.close(); S.events = null; }
    document.body.classList.remove("offline");
    $("conn").hidden = true;
    $("app").hidden = true;
    $("signin").hidden = false;
    $("token").focus();
  }
  async function start() {
    try {
      S.me = await api("GET", "/api/v1/me");
    } catch (e) {
      if (e.status === 401) return showSignin();
      return showError(e);
    }
    $("signin").hidden = true;
    $("app").hidden = false;
    const [q, ch] = await Promise.all([api("GET", "/api/v1/queues"), api("GET", "/api/v1/channels")]);
    S.queues = q.items;
    S.channels = {};
    for (const c of ch.items) S.channels[c.id] = c;
    const kinds = new Set(S.me.queues.map((x) => x.kind));
    $("new-email").hidden = !kinds.has("outbound_email");
    $("new-sms").hidden = !kinds.has("outbound_sms");
    $("new-wrap").hidden = !(kinds.has("outbound_email") || kinds.has("outbound_sms"));
    renderWho();
    connectEvents();
    await refresh();
  }
  function renderWho() {
    if (S.me) $("who").textContent = S.me.name || S.me.id;
  }

  // ---------- live updates ----------
  const EVENT_TYPES = ["interaction.created", "message.received", "message.sent", "message.status", "interaction.assigned",
    "interaction.resolved", "interaction.reopened", "interaction.ended", "interaction.transferred", "interaction.updated",
    "message.updated"];
  const TAG_EVENTS = ["interaction.updated", "interaction.transferred", "interaction.assigned"];
  function connectEvents() {
    if (S.events) S.events.close();
    const es = new EventSource("/api/v1/events", { withCredentials: true });
    const on = (ev) => {
      let data = null;
      try { data = JSON.parse(ev.data); } catch (_) { /* ignore */ }
      // Only these can change which tags are in use in the agent's queues.
      if (TAG_EVENTS.includes(ev.type)) S.tagsStale = true;
      scheduleRefresh(data && data.case_number);
    };
    for (const ty of EVENT_TYPES) es.addEventListener(ty, on);
    es.onmessage = on;
    // Live updates stopped: say so (the browser reconnects by itself), and catch up once back.
    es.onopen = () => {
      const was = document.body.classList.contains("offline");
      document.body.classList.remove("offline");
      $("conn").hidden = true;
      if (was) {
        S.tagsStale = true;
        scheduleRefresh(S.current && S.current.case_number);
      }
    };
    es.onerror = () => {
      document.body.classList.add("offline");
      $("conn").hidden = false;
    };
    S.events = es;
  }
  let pendingCases = new Set();
  function scheduleRefresh(caseNumber) {
    if (caseNumber) pendingCases.add(caseNumber);
    clearTimeout(S.refreshTimer);
    S.refreshTimer = setTimeout(async () => {
      const cases = pendingCases;
      pendingCases = new Set();
      await refresh().catch(() => {});
      if (S.current && cases.has(S.current.case_number)) {
        const n = S.current.case_number;
        await loadThread(n).catch(() => {});
        // The agent is looking at it: what just arrived is read.
        if (S.current && S.current.case_number === n && S.current.unread && S.current.assigned_to === S.me.id) {
          api("POST", `/api/v1/interactions/${n}/assign`, {}).catch(() => {});
        }
      }
    }, 120);
  }

  // ---------- the Digital list ----------
  // The tags in use are fetched again only when an event may have changed
  // them (or a minute has passed), not on every refresh.
  const TAGS_EVERY_MS = 60000;
  async function refresh() {
    const p = new URLSearchParams();
    p.set("sort", $("sort").value);
    for (const tag of S.selectedTags) p.append("tag", tag);
    const withTags = S.tagsStale !== false || Date.now() - (S.tagsAt || 0) > TAGS_EVERY_MS;
    if (withTags) {
      S.tagsStale = false;
      S.tagsAt = Date.now();
    }
    // "My interactions" is read when its dialog opens; its badge comes
    // with /me, which reads only what waits.
    const [list, me, tags] = await Promise.all([
      api("GET", "/api/v1/interactions?" + p.toString()),
      api("GET", "/api/v1/me"),
      withTags ? api("GET", "/api/v1/tags") : Promise.resolve({ items: S.tags }),
    ]).catch((e) => {
      if (withTags) S.tagsStale = true;
      throw e;
    });
    S.items = list.items;
    S.me = me;
    if (JSON.stringify(tags.items) !== JSON.stringify(S.tags)) {
      S.tags = tags.items;
      renderTags();
    }
    renderList();
    renderBadges();
  }
  function renderBadges() {
    const u = S.me ? S.me.unread : 0;
    $("unread-count").hidden = !u;
    $("unread-count").textContent = u ? String(u) : "";
    $("unread-count").setAttribute("aria-label", `${u} ${t("unread")}`);
    const mu = ((S.me && S.me.mine_unread) || []).filter((c) => !S.current || c !== S.current.case_number).length;
    $("mine-badge").hidden = !mu;
    $("mine-badge").textContent = mu ? String(mu) : "";
    $("mine-badge").setAttribute("aria-label", `${mu} ${t("unread")}`);
  }
  function renderTags() {
    const box = $("tags");
    for (const el of box.querySelectorAll("label")) el.remove();
    $("tags-none").hidden = S.tags.length > 0;
    for (const tag of S.tags) {
      const cb = h("input", { type: "checkbox", value: tag, checked: S.selectedTags.has(tag) });
      cb.addEventListener("change", () => {
        if (cb.checked) S.selectedTags.add(tag); else S.selectedTags.delete(tag);
        refresh().catch(showError);
      });
      box.append(h("label", { class: "tag-choice" }, cb, " " + tag));
    }
  }
  function preview(m, subject) {
    // Email: the subject first, as mail clients show it.
    if (subject) return m && m.text && m.text.trim() !== subject.trim() ? `${subject} — ${m.text}` : subject;
    if (!m) return t("noPreview");
    if (m.text) return m.text;
    return m.attachments && m.attachments.length ? t("attachmentOnly") + " " + m.attachments.map((a) => a.filename).join(", ") : t("noPreview");
  }
  function row(i, onClick) {
    const name = (i.contact && i.contact.name) || i.digital_id;
    const ch = S.channels[i.channel.id];
    const b = h("button", { type: "button", class: "row" + (i.unread ? " unread" : "") + (S.current && S.current.case_number === i.case_number ? " current" : ""),
      "data-case": String(i.case_number), onclick: () => onClick(i) },
      h("span", { class: "ch ch-" + i.channel.kind, title: ch ? ch.name : i.channel.id, "aria-label": ch ? ch.name : i.channel.kind, text: CHANNEL_ICON[i.channel.kind] || "•" }),
      h("span", { class: "who", text: name }),
      h("span", { class: "time" }, h("time", { datetime: i.received_at, text: fmtTime(i.received_at) })),
      h("span", { class: "preview", text: preview(i.last_message, i.subject) }),
      h("span", { class: "meta" },
        h("span", { class: "status st-" + i.status, text: t("status." + i.status) }),
        i.unread ? h("span", { class: "sr", text: ", " + t("unread") }) : null,
        ...(i.tags || []).map((tg) => h("span", { class: "tag", text: tg }))));
    return h("li", {}, b);
  }
  function renderList() {
    const ul = $("list");
    const focused = document.activeElement && document.activeElement.dataset && document.activeElement.dataset.case;
    ul.textContent = "";
    for (const i of S.items) ul.append(row(i, openFromList));
    $("list-empty").hidden = S.items.length > 0;
    if (focused) {
      const again = ul.querySelector(`button[data-case="${focused}"]`);
      if (again) again.focus();
    }
  }
  async function openFromList(i) {
    clearError();
    try {
      // Taking it, or opening one already ours: either way it is now read.
      await api("POST", `/api/v1/interactions/${i.case_number}/assign`, {});
      await loadThread(i.case_number);
      showThread();
      refresh().catch(() => {});
    } catch (e) {
      showError(e);
      refresh().catch(() => {});
    }
  }

  // ---------- the thread ----------
  function showThread() {
    $("thread-pane").hidden = false;
    $("placeholder").hidden = true;
    document.body.classList.add("thread-open");
    $("home").removeAttribute("aria-current");
    $("reply-text").focus();
  }
  function closeThread() {
    S.current = null;
    S.files = [];
    $("thread-pane").hidden = true;
    $("placeholder").hidden = false;
    $("contact-pane").hidden = true;
    document.body.classList.remove("thread-open");
    $("home").setAttribute("aria-current", "page");
    renderList();
    renderBadges();
  }
  async function loadThread(n) {
    const i = await api("GET", `/api/v1/interactions/${n}`);
    const changed = !S.current || S.current.case_number !== n;
    S.current = i;
    S.scrollDown = changed;
    if (changed) {
      S.files = [];
      $("reply-text").value = "";
      $("contact-pane").hidden = true;
      $("emoji").hidden = true;
    }
    renderThread();
    renderList();
    renderBadges();
  }
  function renderThread() {
    const i = S.current;
    const ch = S.channels[i.channel.id] || { capabilities: {} };
    const caps = ch.capabilities || {};
    $("thread-title").textContent = t("caseTitle", { n: i.case_number });
    $("thread-who").textContent = `${(i.contact && i.contact.name) || i.digital_id} · ${ch.name || i.channel.id}`;
    $("thread-status").textContent = t("status." + i.status);
    $("thread-status").className = "status st-" + i.status;
    $("thread-subject").hidden = !i.subject;
    $("thread-subject").textContent = i.subject ? t("subjectIs", { subject: i.subject }) : "";
    // The window.
    const w = i.window;
    const wEl = $("window");
    wEl.className = "window";
    if (!w) wEl.textContent = "";
    else if (w.open) wEl.textContent = t(w.tag ? "windowOpenTag" : "windowOpen", { time: fmtTime(w.closes_at) });
    else {
      wEl.classList.add("closed");
      wEl.textContent = w.closes_at ? t("windowClosed", { time: fmtTime(w.closes_at) }) : t("windowNever");
    }
    // Messages.
    const ol = $("messages");
    const atBottom = ol.scrollHeight - ol.scrollTop - ol.clientHeight < 40;
    ol.textContent = "";
    for (const m of i.messages) ol.append(messageItem(m));
    if (atBottom || S.scrollDown) ol.scrollTop = ol.scrollHeight;
    S.scrollDown = false;
    // Reply tools from the channel's capabilities.
    $("emoji-btn").hidden = caps.emoji === false;
    const att = caps.attachments || {};
    $("attach-wrap").hidden = !att.allowed;
    $("files").accept = att.types && att.types.length ? att.types.join(",") : "";
    renderFiles();
    updateCounter();
  }
  // Why a delivery failed: in words for the provider codes agents meet most
  // (Twilio's and Meta's); the provider's own text stays in brackets, without
  // the code repeated in front ("21211: Twilio error 21211 …").
  const DELIVERY_REASONS = {
    "21610": "fail.optedOut", "21211": "fail.badNumber", "21614": "fail.notMobile",
    "30003": "fail.unreachable", "30005": "fail.unknownNumber", "30006": "fail.landline",
    "30007": "fail.filtered", "63016": "fail.window", "131047": "fail.window",
    "131026": "fail.undeliverable",
  };
  function deliveryReason(r) {
    const text = String(r);
    const gaveUp = /^gave up after (\d+) attempts: /.exec(text);
    const rest = gaveUp ? text.slice(gaveUp[0].length) : text;
    const code = (/^(?:ErrorCode )?(\d+)\b/.exec(rest) || [])[1];
    const plain = rest.replace(/^(\w+): (.*\b\1\b)/s, "$2");
    const key = DELIVERY_REASONS[code];
    const words = key ? `${t(key)} (${plain})` : plain;
    return gaveUp ? t("fail.gaveUp", { n: gaveUp[1], reason: words }) : words;
  }
  // Why a media download failed, in words; the technical reason stays in brackets.
  function mediaReason(r) {
    const reason = String(r || "").replace(/^media download failed: /, "");
    const http = /HTTP (\d{3})/.exec(reason);
    let key = null;
    if (http) {
      const code = Number(http[1]);
      key = code === 404 || code === 410 ? "media.gone" : code === 401 || code === 403 ? "media.refused" : code >= 500 ? "media.providerError" : null;
    } else if (/timed out/.test(reason)) key = "media.slow";
    else if (/larger than/.test(reason)) key = "media.tooBig";
    else if (/not allowed/.test(reason)) key = "media.host";
    return key ? `${t(key)} (${reason})` : reason;
  }
  // ---------- an email's formatted body ----------
  // The server already sanitized it (ammonia); this is a second, independent
  // line of defence. DOMParser builds an inert document (no script runs, no
  // image loads), and only an allow-list of elements and attributes is copied
  // into the page: never a script, style, form, frame or event handler; links
  // open in a new tab without a referrer; images only from this gateway's
  // attachments. Remote images (tracking pixels) are never requested: each
  // becomes a short note. Styles are dropped (the page's CSP refuses inline
  // styles anyway), so the email looks plain but readable. The page's CSP is
  // the third line: should the server ever let a handler or a style through,
  // the browser refuses it even in the parsed copy (and says so on the console).
  const HTML_KEEP = new Set(["a", "abbr", "b", "blockquote", "br", "caption", "cite", "code", "dd", "del", "dfn", "div",
    "dl", "dt", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "kbd", "li", "mark", "ol", "p", "pre",
    "q", "s", "small", "span", "strike", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr",
    "u", "ul"]);
  // Dropped with everything inside; any other unknown element keeps only its children.
  const HTML_DROP = new Set(["script", "style", "noscript", "template", "iframe", "frame", "frameset", "object", "embed",
    "applet", "svg", "math", "form", "input", "button", "select", "textarea", "option", "link", "meta", "base", "title",
    "head", "audio", "video", "source", "track", "canvas", "picture", "map", "area", "portal", "dialog"]);
  const HTML_ATTRS = { a: ["href", "title"], img: ["alt", "title", "width", "height"], td: ["colspan", "rowspan"],
    th: ["colspan", "rowspan", "scope"], ol: ["start", "type"], abbr: ["title"], q: ["cite"] };
  function attachmentUrl(src) {
    let u;
    try { u = new URL(src, location.href); } catch (_) { return null; }
    return u.origin === location.origin && /^\/api\/v1\/attachments\/[^/]+$/.test(u.pathname) ? u.pathname : null;
  }
  function safeHref(href) {
    let u;
    try { u = new URL(href, location.href); } catch (_) { return null; }
    return ["http:", "https:", "mailto:"].includes(u.protocol) ? u.href : null;
  }
  function htmlBody(html) {
    const doc = new DOMParser().parseFromString(String(html), "text/html");
    const box = h("div", { class: "html-body" });
    const used = new Set();
    let remote = 0;
    const copy = (from, to) => {
      for (const n of from.childNodes) {
        if (n.nodeType === Node.TEXT_NODE) { to.append(document.createTextNode(n.data)); continue; }
        if (n.nodeType !== Node.ELEMENT_NODE) continue;
        const tag = n.localName;
        if (n.namespaceURI !== "http://www.w3.org/1999/xhtml" || HTML_DROP.has(tag)) continue;
        if (!HTML_KEEP.has(tag)) { copy(n, to); continue; }
        if (tag === "img") {
          const src = attachmentUrl(n.getAttribute("src") || "");
          if (!src) {
            remote++;
            const alt = (n.getAttribute("alt") || "").trim();
            to.append(h("span", { class: "img-blocked", text: alt ? t("imageBlockedAlt", { alt }) : t("imageBlocked") }));
            continue;
          }
          used.add(decodeURIComponent(src.split("/").pop()));
          const img = h("img", { src, alt: n.getAttribute("alt") || "", loading: "lazy" });
          for (const a of ["width", "height"]) {
            const v = n.getAttribute(a);
            if (v && /^\d{1,4}$/.test(v)) img.setAttribute(a, v);
          }
          const title = n.getAttribute("title");
          if (title) img.title = title;
          to.append(img);
          continue;
        }
        const el = document.createElement(tag);
        for (const a of HTML_ATTRS[tag] || []) {
          const v = n.getAttribute(a);
          if (v === null) continue;
          if (a === "href" || a === "cite") {
            const safe = safeHref(v);
            if (safe) el.setAttribute(a, safe);
          } else el.setAttribute(a, v);
        }
        if (tag === "a" && el.hasAttribute("href")) {
          el.target = "_blank";
          el.rel = "noopener noreferrer nofollow";
        }
        copy(n, el);
        to.append(el);
      }
    };
    copy(doc.body, box);
    return { el: box, used, remote };
  }
  function messageItem(m) {
    const out = m.direction === "outbound";
    const failed = out && m.status === "failed";
    const status = out ? h("span", { class: "delivery d-" + m.status, text: t("delivery." + m.status) }) : null;
    // Formatted (when the email has HTML) unless the agent chose the plain text.
    const hasHtml = typeof m.html === "string" && m.html.trim() !== "";
    const formatted = hasHtml && !(m.text && S.plainText.has(m.id));
    const body = formatted ? htmlBody(m.html) : null;
    const atts = (m.attachments || []).filter((a) => !(body && body.used.has(a.id))).map((a) => {
      if (a.state === "failed") {
        return h("li", { class: "att failed" },
          h("span", { text: t(a.error ? "attachmentFailed" : "attachmentFailedNoReason", { name: a.filename, reason: mediaReason(a.error) }) }),
          h("button", { type: "button", class: "retry", "aria-label": t("retryLabel", { name: a.filename }), text: t("retry"),
            onclick: (ev) => retryAttachment(a, ev.currentTarget) }));
      }
      const url = `/api/v1/attachments/${encodeURIComponent(a.id)}`;
      if (/^image\//.test(a.content_type)) {
        return h("li", { class: "att" }, h("a", { href: url, target: "_blank", rel: "noopener" }, h("img", { src: url, alt: a.filename, loading: "lazy" })));
      }
      return h("li", { class: "att" }, h("a", { href: url, download: a.filename, text: t("download", { name: a.filename, size: fmtSize(a.size || 0) }) }));
    });
    return h("li", { class: "msg " + (out ? "out" : "in") + (m.status === "failed" ? " failed" : ""), "data-msg": m.id },
      h("div", { class: "msg-head" },
        h("span", { class: "dir", text: out ? (m.author ? `${t("outbound")} (${m.author})` : t("outbound")) : t("inbound") }),
        h("time", { datetime: m.sent_at, text: fmtTime(m.sent_at) }), status),
      hasHtml && m.text ? h("button", { type: "button", class: "view-toggle",
        text: t(formatted ? "showPlain" : "showFormatted"),
        onclick: () => {
          if (formatted) S.plainText.add(m.id); else S.plainText.delete(m.id);
          renderThread();
          const again = $("messages").querySelector(`[data-msg="${CSS.escape(m.id)}"] .view-toggle`);
          if (again) again.focus();
        } }) : null,
      body ? body.el : m.text ? h("p", { class: "text", text: m.text }) : null,
      body && body.remote ? h("p", { class: "remote-note", text: t("remoteImages", { n: body.remote }) }) : null,
      atts.length ? h("ul", { class: "atts" }, atts) : null,
      failed ? h("p", { class: "fail-reason", text: m.error ? t("failedBecause", { reason: deliveryReason(m.error) }) : t("failedNoReason") }) : null);
  }
  async function retryAttachment(a, btn) {
    clearError();
    btn.disabled = true;
    try {
      const r = await api("POST", `/api/v1/attachments/${encodeURIComponent(a.id)}/retry`);
      if (r && r.state === "failed") showError(t("retryFailed", { name: a.filename }));
      else toast(t("retryOk", { name: (r && r.filename) || a.filename }));
      if (S.current) await loadThread(S.current.case_number);
    } catch (e) {
      showError(e);
    } finally {
      btn.disabled = false;
    }
  }
  function updateCounter() {
    if (!S.current) return;
    const ch = S.channels[S.current.channel.id] || { capabilities: {} };
    const text = $("reply-text").value;
    const max = ch.capabilities && ch.capabilities.text && ch.capabilities.text.max_chars;
    const n = [...text].length;
    $("counter").textContent = max ? t("chars", { n, max }) : t("charsNoMax", { n });
    $("counter").classList.toggle("over", !!max && n > max);
    if (S.current.channel.kind === "sms" && text) smsPreview(text, $("sms-info"));
    else { clearTimeout(S.previewTimer); $("sms-info").textContent = ""; }
  }
  function smsPreview(text, el) {
    clearTimeout(S.previewTimer);
    S.previewTimer = setTimeout(async () => {
      try {
        const p = await api("POST", "/api/v1/sms/preview", { text });
        el.textContent = t("sms", { encoding: p.encoding, segments: p.segments });
      } catch (_) { el.textContent = ""; }
    }, 150);
  }
  function typeAllowed(type, types) {
    if (!types || !types.length) return true;
    return types.some((p) => (p.endsWith("/*") ? type.startsWith(p.slice(0, -1)) : p === type));
  }
  function addFiles(list, target, errEl, caps) {
    const att = (caps && caps.attachments) || {};
    const max = Math.min(att.max_attachment_bytes || (caps && caps.max_attachment_bytes) || MAX_FILE, MAX_FILE);
    const problems = [];
    for (const f of list) {
      if (f.size > max) problems.push(t("tooBig", { name: f.name, max: fmtSize(max) }));
      else if (!typeAllowed(f.type || "application/octet-stream", att.types)) problems.push(t("notAllowedType", { name: f.name, type: f.type || "?" }));
      else target.push(f);
    }
    if (problems.length) showError(problems.join(" "), errEl);
  }
  function renderFiles(files = S.files, ul = $("file-list")) {
    ul.textContent = "";
    files.forEach((f, idx) => {
      ul.append(h("li", {}, `${f.name} (${fmtSize(f.size)}) `,
        h("button", { type: "button", class: "link", "aria-label": t("removeFile", { name: f.name }), text: "×",
          onclick: () => { files.splice(idx, 1); renderFiles(files, ul); } })));
    });
  }
  async function sendReply(ev) {
    ev.preventDefault();
    clearError();
    const i = S.current;
    const text = $("reply-text").value;
    let body;
    if (S.files.length) {
      body = new FormData();
      body.append("text", text);
      for (const f of S.files) body.append("attachments", f, f.name);
    } else body = { text };
    $("send").disabled = true;
    try {
      await api("POST", `/api/v1/interactions/${i.case_number}/replies`, body);
      $("reply-text").value = "";
      S.files = [];
      toast(t("sentOk"));
      await loadThread(i.case_number);
      refresh().catch(() => {});
    } catch (e) {
      showError(e);
    } finally {
      $("send").disabled = false;
    }
  }

  // ---------- case menu actions ----------
  function toggleMenu(btn, menu, open) {
    const show = open === undefined ? menu.hidden : open;
    menu.hidden = !show;
    btn.setAttribute("aria-expanded", String(show));
    if (show) { const first = menu.querySelector("button:not([hidden])"); if (first) first.focus(); }
  }
  async function doResolve() {
    toggleMenu($("case-menu-btn"), $("case-menu"), false);
    try {
      await api("POST", `/api/v1/interactions/${S.current.case_number}/resolve`);
      toast(t("resolvedOk"));
      await loadThread(S.current.case_number);
      refresh().catch(() => {});
    } catch (e) { showError(e); }
  }
  async function showContact() {
    toggleMenu($("case-menu-btn"), $("case-menu"), false);
    try {
      const c = await api("GET", `/api/v1/interactions/${S.current.case_number}/contact`);
      S.contact = c;
      $("c-case").textContent = String(c.case_number);
      $("c-digital").textContent = c.digital_id;
      $("c-name").textContent = (c.contact && c.contact.name) || t("contactNone");
      $("c-related").value = c.related_case || "";
      $("c-notes").value = c.notes || "";
      const ul = $("c-history");
      ul.textContent = "";
      for (const x of c.history || []) {
        const chName = (S.channels[x.channel.id] || {}).name || x.channel.id;
        ul.append(h("li", {}, `${t("caseTitle", { n: x.case_number })} · ${chName} · ${t("status." + x.status)} · ${fmtTime(x.received_at)}`));
      }
      if (!(c.history || []).length) ul.append(h("li", { text: t("noHistory") }));
      $("contact-pane").hidden = false;
      $("c-notes").focus();
    } catch (e) { showError(e); }
  }
  function openEnd() {
    toggleMenu($("case-menu-btn"), $("case-menu"), false);
    $("end-case").textContent = String(S.current.case_number);
    $("end-name").value = S.current.related_name || "";
    $("end-related").value = S.current.related_case || "";
    $("end-notes").value = "";
    $("end-error").textContent = "";
    $("end-dialog").showModal();
  }
  async function saveEnd(ev) {
    ev.preventDefault();
    const n = S.current.case_number;
    const disposition = { related_name: $("end-name").value || null, related_case: $("end-related").value || null };
    if ($("end-notes").value) disposition.notes = $("end-notes").value;
    try {
      await api("POST", `/api/v1/interactions/${n}/end`, { disposition });
      $("end-dialog").close();
      closeThread();
      toast(t("endedOk", { n }));
      await refresh();
    } catch (e) { showError(e, $("end-error")); }
  }
  function openTransfer() {
    toggleMenu($("case-menu-btn"), $("case-menu"), false);
    const sel = $("transfer-queue");
    sel.textContent = "";
    const targets = S.queues.filter((q) => q.kind === "digital" && q.id !== S.current.queue);
    for (const q of targets) sel.append(h("option", { value: q.id, text: q.name }));
    $("transfer-error").textContent = targets.length ? "" : t("noTransferQueue");
    sel.disabled = !targets.length;
    $("transfer-go").disabled = !targets.length;
    $("transfer-dialog").showModal();
  }
  async function saveTransfer(ev) {
    ev.preventDefault();
    const n = S.current.case_number;
    const q = $("transfer-queue").value;
    try {
      const i = await api("POST", `/api/v1/interactions/${n}/transfer`, { queue: q });
      $("transfer-dialog").close();
      const qn = (S.queues.find((x) => x.id === q) || { name: q }).name;
      toast(t("transferredOk", { n, q: qn }));
      if (i.assigned_to === S.me.id) await loadThread(n); else closeThread();
      await refresh();
    } catch (e) { showError(e, $("transfer-error")); }
  }
  async function saveRelated(ev) {
    ev.preventDefault();
    try {
      await api("PATCH", `/api/v1/interactions/${S.current.case_number}`, { related_case: $("c-related").value || null });
      toast(t("relatedSaved"));
    } catch (e) { showError(e); }
  }
  async function saveNotes(ev) {
    ev.preventDefault();
    try {
      await api("PUT", `/api/v1/contacts/${encodeURIComponent(S.contact.contact.id)}/notes`, { notes: $("c-notes").value });
      toast(t("notesSaved"));
    } catch (e) { showError(e); }
  }

  // ---------- switch ----------
  async function openMine() {
    const mine = (await api("GET", "/api/v1/interactions?view=mine&limit=500")).items;
    const ul = $("mine-list");
    ul.textContent = "";
    for (const i of mine) ul.append(row(i, async (x) => { $("mine-dialog").close(); await openFromList(x); }));
    $("mine-empty").hidden = mine.length > 0;
    $("mine-dialog").showModal();
  }

  // ---------- outbound ----------
  function openOut(kind) {
    toggleMenu($("new"), $("new-menu"), false);
    S.outKind = kind;
    S.outFiles = [];
    const email = kind === "email";
    $("out-title").textContent = t(email ? "outEmailTitle" : "outSmsTitle");
    const sel = $("out-channel");
    sel.textContent = "";
    const chans = Object.values(S.channels).filter((c) => c.kind === kind);
    for (const c of chans) sel.append(h("option", { value: c.id, text: c.name }));
    $("out-nochannel").hidden = chans.length > 0;
    $("out-nochannel").textContent = t(email ? "noEmailChannel" : "noSmsChannel");
    $("out-to-label").textContent = t(email ? "toEmail" : "toSms");
    $("out-to").type = email ? "email" : "tel";
    $("out-subject-wrap").hidden = !email;
    $("out-format").hidden = !email;
    $("out-html").hidden = !email;
    $("out-text").hidden = email;
    $("out-files-wrap").hidden = !email;
    for (const id of ["out-to", "out-subject", "out-text", "out-name", "out-rname", "out-rcase", "out-notes", "out-files"]) $(id).value = "";
    $("out-html").textContent = "";
    $("out-file-list").textContent = "";
    $("out-counter").textContent = "";
    $("out-error").textContent = "";
    for (const id of ["out-channel", "out-to", "out-subject", "out-html", "out-text"]) $(id).removeAttribute("aria-invalid");
    outStep(1);
    $("out-dialog").showModal();
    (chans.length ? $("out-to") : sel).focus();
  }
  // What is missing on the first step, said in words before the server is asked.
  function checkStep1() {
    const email = S.outKind === "email";
    const to = $("out-to").value.trim();
    const body = email ? $("out-html").innerText.trim() : $("out-text").value.trim();
    const problems = [];
    let first = null;
    const miss = (el, key) => {
      problems.push(t(key));
      el.setAttribute("aria-invalid", "true");
      first = first || el;
    };
    for (const id of ["out-channel", "out-to", "out-subject", "out-html", "out-text"]) $(id).removeAttribute("aria-invalid");
    if (!$("out-channel").value) miss($("out-channel"), email ? "noEmailChannel" : "noSmsChannel");
    if (!to) miss($("out-to"), email ? "needEmail" : "needNumber");
    else if (email && !$("out-to").checkValidity()) miss($("out-to"), "badEmail");
    else if (!email && !/^\+[1-9]\d{6,14}$/.test(to.replace(/[\s().-]/g, ""))) miss($("out-to"), "badNumber");
    if (email && !$("out-subject").value.trim()) miss($("out-subject"), "needSubject");
    if (!body) miss(email ? $("out-html") : $("out-text"), "needMessage");
    $("out-error").textContent = problems.join(" ");
    if (first) first.focus();
    return !first;
  }
  function outStep(n) {
    $("out-step1").hidden = n !== 1;
    $("out-step2").hidden = n !== 2;
    $("out-next").hidden = n !== 1;
    $("out-back").hidden = n !== 2;
    $("out-send").hidden = n !== 2;
    if (n === 2) $("out-name").focus();
  }
  async function sendOut(ev) {
    ev.preventDefault();
    const email = S.outKind === "email";
    const contact = { name: $("out-name").value || null, related_name: $("out-rname").value || null,
      related_case: $("out-rcase").value || null };
    if ($("out-notes").value) contact.notes = $("out-notes").value;
    let body;
    const fields = { channel: $("out-channel").value || null, to: $("out-to").value };
    if (email) {
      fields.subject = $("out-subject").value;
      fields.html = $("out-html").innerHTML;
      fields.text = $("out-html").innerText;
    } else fields.text = $("out-text").value;
    if (email && S.outFiles.length) {
      body = new FormData();
      for (const [k, v] of Object.entries(fields)) if (v !== null) body.append(k, v);
      body.append("contact", JSON.stringify(contact));
      for (const f of S.outFiles) body.append("attachments", f, f.name);
    } else body = { ...fields, contact };
    $("out-error").textContent = "";
    try {
      const r = await api("POST", `/api/v1/outbound/${email ? "email" : "sms"}`, body);
      $("out-dialog").close();
      toast(t("outSent", { n: r.case_number }));
      await loadThread(r.case_number);
      showThread();
      refresh().catch(() => {});
    } catch (e) {
      showError(e, $("out-error"));
      if (e.field && ["channel", "to", "subject", "text", "html", "attachments"].includes(e.field)) outStep(1);
    }
  }

  // ---------- wiring ----------
  function wire() {
    $("signin-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      $("signin-error").textContent = "";
      try {
        await api("POST", "/agent/session", { token: $("token").value.trim() });
        $("token").value = "";
        await start();
      } catch (e) { showError(e, $("signin-error")); }
    });
    $("signout").addEventListener("click", async () => {
      try { await api("DELETE", "/agent/session"); } catch (_) { /* signed out anyway */ }
      closeThread();
      showSignin();
    });
    $("lang").addEventListener("change", () => setLang($("lang").value));
    $("lang-signin").addEventListener("change", () => setLang($("lang-signin").value));
    $("sort").addEventListener("change", () => refresh().catch(showError));
    $("home").addEventListener("click", () => { closeThread(); refresh().catch(showError); });
    $("back").addEventListener("click", () => { closeThread(); });
    $("switch").addEventListener("click", () => openMine().catch(showError));
    $("new").addEventListener("click", () => toggleMenu($("new"), $("new-menu")));
    $("new-email").addEventListener("click", () => openOut("email"));
    $("new-sms").addEventListener("click", () => openOut("sms"));
    $("case-menu-btn").addEventListener("click", () => toggleMenu($("case-menu-btn"), $("case-menu")));
    $("act-resolve").addEventListener("click", doResolve);
    $("act-contact").addEventListener("click", showContact);
    $("act-end").addEventListener("click", openEnd);
    $("act-transfer").addEventListener("click", openTransfer);
    $("contact-close").addEventListener("click", () => { $("contact-pane").hidden = true; });
    $("related-form").addEventListener("submit", saveRelated);
    $("notes-form").addEventListener("submit", saveNotes);
    $("end-form").addEventListener("submit", saveEnd);
    $("transfer-form").addEventListener("submit", saveTransfer);
    $("out-form").addEventListener("submit", sendOut);
    $("out-next").addEventListener("click", () => { if (checkStep1()) outStep(2); });
    $("out-back").addEventListener("click", () => outStep(1));
    $("out-text").addEventListener("input", () => {
      const n = [...$("out-text").value].length;
      $("out-counter").textContent = t("chars", { n, max: 1600 });
      smsPreview($("out-text").value, $("out-counter"));
    });
    $("out-files").addEventListener("change", () => {
      $("out-error").textContent = "";
      addFiles($("out-files").files, S.outFiles, $("out-error"), null);
      $("out-files").value = "";
      renderFiles(S.outFiles, $("out-file-list"));
    });
    for (const b of document.querySelectorAll("#out-format button")) {
      b.addEventListener("mousedown", (e) => e.preventDefault());
      b.addEventListener("click", () => { $("out-html").focus(); document.execCommand(b.dataset.cmd); });
    }
    for (const d of document.querySelectorAll("dialog")) {
      for (const c of d.querySelectorAll("button.cancel")) c.addEventListener("click", () => d.close());
    }
    $("reply").addEventListener("submit", sendReply);
    $("reply-text").addEventListener("input", updateCounter);
    $("reply-text").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("reply").requestSubmit(); }
    });
    $("files").addEventListener("change", () => {
      const ch = S.channels[S.current.channel.id] || {};
      addFiles($("files").files, S.files, null, ch.capabilities);
      $("files").value = "";
      renderFiles();
    });
    const pal = $("emoji");
    for (const e of EMOJI) {
      pal.append(h("button", { type: "button", class: "emo", "aria-label": t("emojiInsert", { e }), text: e, onclick: () => {
        const ta = $("reply-text");
        const s = ta.selectionStart, en = ta.selectionEnd;
        ta.value = ta.value.slice(0, s) + e + ta.value.slice(en);
        ta.selectionStart = ta.selectionEnd = s + e.length;
        ta.focus();
        updateCounter();
      } }));
    }
    $("emoji-btn").addEventListener("click", () => {
      pal.hidden = !pal.hidden;
      $("emoji-btn").setAttribute("aria-expanded", String(!pal.hidden));
    });
    // Menus: arrow keys, Home and End move between items; a click elsewhere closes them.
    for (const [b, m] of [["case-menu-btn", "case-menu"], ["new", "new-menu"]]) {
      $(m).addEventListener("keydown", (e) => {
        const items = [...$(m).querySelectorAll("button:not([hidden])")];
        const at = items.indexOf(document.activeElement);
        const to = { ArrowDown: at + 1, ArrowUp: at - 1, Home: 0, End: items.length - 1 }[e.key];
        if (to === undefined || !items.length) return;
        e.preventDefault();
        items[(to + items.length) % items.length].focus();
      });
      document.addEventListener("click", (e) => {
        if (!$(m).hidden && !$(b).parentElement.contains(e.target)) toggleMenu($(b), $(m), false);
      });
    }
    document.addEventListener("keydown", (e) => {
      if (e.key !== "Escape") return;
      for (const [b, m] of [["case-menu-btn", "case-menu"], ["new", "new-menu"]]) {
        if (!$(m).hidden) { toggleMenu($(b), $(m), false); $(b).focus(); }
      }
      if (!$("emoji").hidden) { $("emoji").hidden = true; $("emoji-btn").focus(); }
    });
  }

  S.lang = pickLang();
  wire();
  applyTexts();
  start();
})();
