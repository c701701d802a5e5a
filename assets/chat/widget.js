/*
 * Switchboard web chat widget. Plain JavaScript, no build step.
 *
 * Embed it with one tag (the page's origin must be in the channel's
 * `allowed_origins`):
 *
 *   <script src="https://GATEWAY/chat/widget.js" data-channel="chat-main" defer></script>
 *
 * Optional attributes:
 *   data-mount="#id"          render inside that element instead of a floating button
 *   data-title="Support"      the heading
 *   data-name, data-email     who the visitor is, if the site knows
 *   data-identifier, data-identifier-hash [, data-identifier-ts]
 *                             a signed-in visitor: hex HMAC-SHA256 of the identifier
 *                             (or of "identifier.ts") with the channel's identity_secret,
 *                             computed on the site's server
 *
 * The session token stays in this browser (localStorage) so a reload keeps
 * the conversation. The socket reconnects with backoff, resumes after the
 * last message it has, and re-sends unacknowledged messages with the same
 * client_message_id, so nothing is lost or sent twice.
 */
(function () {
  "use strict";

  var script = document.currentScript;
  if (!script) {
    var all = document.querySelectorAll("script[data-channel][src*='/chat/widget.js']");
    script = all[all.length - 1];
  }
  if (!script) return;
  var channel = script.getAttribute("data-channel");
  if (!channel) return;
  var base = new URL(script.src, location.href).href.replace(/\/chat\/widget\.js([?#].*)?$/, "");
  var attr = function (name) {
    var v = script.getAttribute("data-" + name);
    return v === null || v === "" ? null : v;
  };
  var uid = "sb-" + channel.replace(/[^A-Za-z0-9_-]/g, "");
  var storeKey = "switchboard-chat:" + base + ":" + channel;

  // ----- storage (a private window may refuse it: fall back to memory) -----
  var memory = {};
  function load() {
    try {
      return JSON.parse(localStorage.getItem(storeKey) || "null") || {};
    } catch (e) {
      return memory;
    }
  }
  function save(state) {
    memory = state;
    try {
      localStorage.setItem(storeKey, JSON.stringify(state));
    } catch (e) { /* memory only */ }
  }
  var saved = load();
  // A message whose file was still uploading when the page went away cannot be re-sent.
  saved.pending = (saved.pending || []).filter(function (p) { return p.uploaded !== false && !p.error; });

  function newId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    var b = new Uint8Array(16);
    crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  // ----- the DOM -----
  function el(tag, props, children) {
    var e = document.createElement(tag);
    Object.keys(props || {}).forEach(function (k) {
      if (k === "text") e.textContent = props[k];
      else if (k === "class") e.className = props[k];
      else e.setAttribute(k, props[k]);
    });
    (children || []).forEach(function (c) { if (c) e.appendChild(c); });
    return e;
  }

  if (!document.querySelector("link[data-switchboard-chat-css]")) {
    document.head.appendChild(el("link", { rel: "stylesheet", href: base + "/chat/widget.css", "data-switchboard-chat-css": "" }));
  }

  var title = attr("title") || "Chat with us";
  var log = el("ol", { class: "sb-log", role: "log", "aria-live": "polite", "aria-relevant": "additions", "aria-label": "Messages", tabindex: "0" });
  var status = el("p", { class: "sb-status", role: "status", "aria-live": "polite", text: "Connecting…" });
  var typing = el("p", { class: "sb-typing", "aria-live": "polite", text: "" });
  var input = el("textarea", { id: uid + "-input", class: "sb-input", rows: "2", maxlength: "10000", "aria-describedby": uid + "-hint", autocomplete: "off" });
  var file = el("input", { id: uid + "-file", class: "sb-file", type: "file" });
  var chosen = el("span", { class: "sb-chosen", "aria-live": "polite" });
  var send = el("button", { type: "submit", class: "sb-send", text: "Send" });
  var form = el("form", { class: "sb-form", novalidate: "" }, [
    el("label", { for: uid + "-input", class: "sb-label", text: "Message" }),
    input,
    el("p", { id: uid + "-hint", class: "sb-hint", text: "Press Enter to send, Shift+Enter for a new line." }),
    el("div", { class: "sb-actions" }, [
      el("label", { for: uid + "-file", class: "sb-attach", text: "Attach a file" }),
      file,
      chosen,
      send
    ])
  ]);
  var heading = el("h2", { id: uid + "-title", class: "sb-title", text: title });
  var panel = el("section", { id: uid + "-panel", class: "sb-panel", role: "region", "aria-labelledby": uid + "-title" }, [
    heading, status, log, typing, form
  ]);

  var mount = attr("mount") && document.querySelector(attr("mount"));
  if (mount) {
    panel.classList.add("sb-inline");
    mount.appendChild(panel);
  } else {
    var launcher = el("button", { type: "button", class: "sb-launcher", "aria-expanded": "false", "aria-controls": uid + "-panel", text: title });
    panel.classList.add("sb-floating");
    panel.hidden = attr("open") !== "true";
    launcher.setAttribute("aria-expanded", String(!panel.hidden));
    launcher.addEventListener("click", function () {
      panel.hidden = !panel.hidden;
      launcher.setAttribute("aria-expanded", String(!panel.hidden));
      if (!panel.hidden) input.focus();
    });
    document.addEventListener("keydown", function (e) {
      if (e.key === "Escape" && !panel.hidden && panel.contains(document.activeElement)) {
        panel.hidden = true;
        launcher.setAttribute("aria-expanded", "false");
        launcher.focus();
      }
    });
    var wrap = el("div", { class: "sb-widget" }, [panel, launcher]);
    (document.body || document.documentElement).appendChild(wrap);
  }

  // ----- rendering -----
  var bySeq = [];          // [{seq, li}], sorted by seq
  var byId = {};           // message id -> li
  var byClientId = {};     // client_message_id -> li (not yet in the timeline)
  var lastSeq = 0;

  function setStatus(text) { status.textContent = text; }

  function formatSize(n) {
    if (n >= 1048576) return (n / 1048576).toFixed(1) + " MB";
    if (n >= 1024) return Math.round(n / 1024) + " KB";
    return n + " bytes";
  }

  function fetchFile(id) {
    return fetch(base + "/chat/" + encodeURIComponent(channel) + "/attachments/" + encodeURIComponent(id), {
      headers: { Authorization: "Bearer " + saved.token }
    }).then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.blob();
    });
  }

  function attachmentNode(a) {
    var item = el("li", { class: "sb-att" });
    var label = a.filename + " (" + formatSize(a.size || 0) + ")";
    if (a.state && a.state !== "stored") {
      item.appendChild(el("span", { text: label + ": not available" }));
      return item;
    }
    var button = el("button", { type: "button", class: "sb-att-open", text: "Open " + label });
    button.addEventListener("click", function () {
      fetchFile(a.id).then(function (blob) {
        var url = URL.createObjectURL(blob);
        var link = el("a", { href: url, download: a.filename });
        document.body.appendChild(link);
        link.click();
        link.remove();
        setTimeout(function () { URL.revokeObjectURL(url); }, 60000);
      }).catch(function () { setStatus("The file could not be opened."); });
    });
    item.appendChild(button);
    if (/^image\//.test(a.content_type || "")) {
      fetchFile(a.id).then(function (blob) {
        item.insertBefore(el("img", { class: "sb-thumb", src: URL.createObjectURL(blob), alt: a.filename }), button);
      }).catch(function () { /* the button still works */ });
    }
    return item;
  }

  function fillMessage(li, m) {
    li.textContent = "";
    var outbound = m.direction === "outbound";
    li.className = "sb-msg " + (outbound ? "sb-out" : "sb-in");
    var who = outbound ? (m.author_name || "Agent") : "You";
    li.appendChild(el("span", { class: "sb-who", text: who + ": " }));
    if (m.text) li.appendChild(el("p", { class: "sb-text", text: m.text }));
    if (m.attachments && m.attachments.length) {
      li.appendChild(el("ul", { class: "sb-atts", "aria-label": "Attachments" }, m.attachments.map(attachmentNode)));
    }
    if (m.sent_at) {
      var t = new Date(m.sent_at);
      li.appendChild(el("time", { class: "sb-time", datetime: m.sent_at, text: t.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) }));
    }
    li.setAttribute("data-message-id", m.id);
    li.setAttribute("data-seq", String(m.seq));
    li.removeAttribute("aria-busy");
  }

  function place(li, seq) {
    var i = bySeq.length;
    while (i > 0 && bySeq[i - 1].seq > seq) i--;
    var next = i < bySeq.length ? bySeq[i].li : null;
    // Messages still on their way stay last.
    if (!next) {
      var firstPending = log.querySelector(".sb-pending");
      log.insertBefore(li, firstPending);
    } else {
      log.insertBefore(li, next);
    }
    bySeq.splice(i, 0, { seq: seq, li: li });
  }

  function showMessage(m) {
    if (byId[m.id]) {
      fillMessage(byId[m.id], m);
    } else {
      var li = null;
      Object.keys(byClientId).forEach(function (cid) {
        if (byClientId[cid].getAttribute("data-message-id") === m.id) {
          li = byClientId[cid];
          delete byClientId[cid];
          li.remove();
        }
      });
      li = li || el("li", {});
      fillMessage(li, m);
      byId[m.id] = li;
      place(li, m.seq);
    }
    if (m.seq > lastSeq) lastSeq = m.seq;
    log.scrollTop = log.scrollHeight;
  }

  function showPending(p) {
    var li = byClientId[p.client_message_id];
    if (!li) {
      li = el("li", { class: "sb-msg sb-in sb-pending", "aria-busy": "true" });
      byClientId[p.client_message_id] = li;
      log.appendChild(li);
    }
    li.textContent = "";
    li.appendChild(el("span", { class: "sb-who", text: "You: " }));
    if (p.text) li.appendChild(el("p", { class: "sb-text", text: p.text }));
    if (p.filenames && p.filenames.length) li.appendChild(el("p", { class: "sb-text", text: "📎 " + p.filenames.join(", ") }));
    li.appendChild(el("span", { class: "sb-state", text: p.error ? p.error : "Sending…" }));
    if (p.error) li.classList.add("sb-failed");
    log.scrollTop = log.scrollHeight;
  }

  // ----- the session -----
  function startSession() {
    var body = {};
    ["name", "email", "identifier"].forEach(function (k) { if (attr(k)) body[k] = attr(k); });
    if (attr("identifier-hash")) body.identifier_hash = attr("identifier-hash");
    if (attr("identifier-ts")) body.identifier_ts = Number(attr("identifier-ts"));
    var headers = { "Content-Type": "application/json" };
    if (saved.token) headers.Authorization = "Bearer " + saved.token;
    return fetch(base + "/chat/" + encodeURIComponent(channel) + "/sessions", {
      method: "POST", headers: headers, body: JSON.stringify(body)
    }).then(function (r) {
      if (r.status === 401 && saved.token) {
        // The old session is gone: start a new one.
        saved = { pending: saved.pending };
        save(saved);
        return startSession();
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json().then(function (s) {
        if (saved.session_id && saved.session_id !== s.session_id) {
          saved.pending = [];
        }
        saved.token = s.token;
        saved.session_id = s.session_id;
        save(saved);
      });
    });
  }

  // ----- the socket -----
  var ws = null;
  var attempt = 0;
  var reconnectTimer = null;
  var typingTimer = null;
  var lastTypingOn = 0;

  function sendFrame(f) {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify(f));
      return true;
    }
    return false;
  }

  function sendPending() {
    saved.pending.forEach(function (p) {
      if (p.error || !p.uploaded) return;
      sendFrame({ type: "message", client_message_id: p.client_message_id, text: p.text, attachments: p.attachments || [] });
    });
  }

  function scheduleReconnect() {
    if (reconnectTimer) return;
    // 1, 2, 4 … 30 s, with jitter (providers.md A8).
    var delay = Math.min(30000, 1000 * Math.pow(2, attempt)) * (0.5 + Math.random() / 2);
    attempt++;
    setStatus("Reconnecting…");
    reconnectTimer = setTimeout(function () {
      reconnectTimer = null;
      connect();
    }, delay);
  }

  function connect() {
    startSession().then(function () {
      var url = base.replace(/^http/, "ws") + "/chat/" + encodeURIComponent(channel) + "/ws?token=" + encodeURIComponent(saved.token);
      ws = new WebSocket(url);
      ws.onopen = function () {
        attempt = 0;
        setStatus("Connected.");
        sendFrame({ type: "resume", after_seq: lastSeq });
        sendPending();
      };
      ws.onmessage = function (ev) {
        var f;
        try { f = JSON.parse(ev.data); } catch (e) { return; }
        onFrame(f);
      };
      ws.onclose = function () {
        ws = null;
        scheduleReconnect();
      };
      ws.onerror = function () { /* onclose follows */ };
    }).catch(function () {
      scheduleReconnect();
    });
  }

  function dropPending(cid) {
    saved.pending = saved.pending.filter(function (p) { return p.client_message_id !== cid; });
    save(saved);
  }

  function onFrame(f) {
    if (f.type === "message" && f.message) {
      showMessage(f.message);
    } else if (f.type === "ack") {
      dropPending(f.client_message_id);
      var li = byClientId[f.client_message_id];
      if (li) {
        if (byId[f.message_id]) {
          li.remove();
        } else {
          li.setAttribute("data-message-id", f.message_id);
          var st = li.querySelector(".sb-state");
          if (st) st.textContent = "Sent";
        }
      }
    } else if (f.type === "typing") {
      typing.textContent = f.state === "on" ? "The agent is typing…" : "";
      clearTimeout(typing._t);
      if (f.state === "on") typing._t = setTimeout(function () { typing.textContent = ""; }, 6000);
    } else if (f.type === "error") {
      if (f.client_message_id) {
        var p = saved.pending.filter(function (x) { return x.client_message_id === f.client_message_id; })[0];
        if (f.code === "rate_limited" || f.status >= 500) {
          // Try again later with the same ID.
          setTimeout(sendPending, 1000 * (f.retry_after || 5));
          if (p) showPending({ client_message_id: p.client_message_id, text: p.text, filenames: p.filenames, error: "Waiting to send…" });
        } else if (p) {
          p.error = "Not sent: " + (f.detail || f.code);
          save(saved);
          showPending(p);
          dropPending(p.client_message_id);
        }
      }
    }
  }

  // ----- sending -----
  function upload(f) {
    var body = new FormData();
    body.append("file", f, f.name);
    return fetch(base + "/chat/" + encodeURIComponent(channel) + "/attachments", {
      method: "POST", headers: { Authorization: "Bearer " + saved.token }, body: body
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (j) {
        if (!r.ok) throw new Error(j.detail || ("HTTP " + r.status));
        return j.id;
      });
    });
  }

  function submit() {
    var text = input.value.replace(/\s+$/, "");
    var files = Array.prototype.slice.call(file.files || []);
    if (!text.trim() && !files.length) return;
    var p = {
      client_message_id: newId(), text: text, attachments: [],
      filenames: files.map(function (f) { return f.name; }), uploaded: files.length === 0
    };
    input.value = "";
    file.value = "";
    chosen.textContent = "";
    saved.pending.push(p);
    save(saved);
    showPending(p);
    stopTyping();
    if (!files.length) {
      sendFrame({ type: "message", client_message_id: p.client_message_id, text: p.text, attachments: [] });
      return;
    }
    Promise.all(files.map(upload)).then(function (ids) {
      p.attachments = ids;
      p.uploaded = true;
      save(saved);
      sendFrame({ type: "message", client_message_id: p.client_message_id, text: p.text, attachments: ids });
    }).catch(function (e) {
      p.error = "Not sent: " + e.message;
      showPending(p);
      dropPending(p.client_message_id);
    });
  }

  function stopTyping() {
    clearTimeout(typingTimer);
    if (lastTypingOn) {
      lastTypingOn = 0;
      sendFrame({ type: "typing", state: "off" });
    }
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    submit();
  });
  input.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  });
  input.addEventListener("input", function () {
    var now = Date.now();
    if (now - lastTypingOn > 2000) {
      lastTypingOn = now;
      sendFrame({ type: "typing", state: "on" });
    }
    clearTimeout(typingTimer);
    typingTimer = setTimeout(stopTyping, 4000);
  });
  file.addEventListener("change", function () {
    var names = Array.prototype.map.call(file.files || [], function (f) { return f.name; });
    chosen.textContent = names.length ? names.join(", ") : "";
  });

  saved.pending.forEach(function (p) { if (!p.error) showPending(p); });
  connect();
})();
