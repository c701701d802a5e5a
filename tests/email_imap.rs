//! The email channel over IMAP, black-box: a real Dovecot (started by the
//! tests on a free port, `scripts/email-servers.sh` installs it) holds the
//! channel's mailbox, messages are APPENDed as the mailbox's user would
//! receive them, the real application polls it, and what it stored is read
//! back through the agent API. Replies and outbound mail go to a real SMTP
//! server (aiosmtpd) and are read back with Python's email package.

#[macro_use]
mod common;
mod email_support;
mod process_support;

use common::*;
use email_support::{Dovecot, SmtpServer, MAILBOX};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const SECRET: &str = "whsec_c2VjcmV0LWtleS1vZi10aGUtdGVzdHM=";

fn email_channel(imap: &str, smtp_port: u16) -> String {
    format!(
        r#"
[[channels]]
id = "mail"
kind = "email"
name = "Shop Support"
queue = "support"
address = "support@shop.example"
inbound_secret = "{SECRET}"
imap = {imap}
smtp = {{ host = "127.0.0.1", port = {smtp_port}, tls = "none" }}
"#
    )
}

/// The application polling `dovecot` every `poll` seconds (IDLE makes it
/// sooner), with an outbound email queue anne belongs to.
async fn start_polling(b: Backend, dovecot: &Dovecot, smtp: &SmtpServer, poll: u64) -> TestApp {
    TestApp::start_with(
        b,
        &email_channel(&dovecot.channel_imap(poll), smtp.port),
        |s| {
            s.queues.push(switchboard::config::QueueConfig {
                id: "outbound-email".into(),
                name: "Outbound email".into(),
                kind: switchboard::config::QueueKind::OutboundEmail,
            });
            for a in &mut s.agents {
                if a.id == "anne" {
                    a.queues.push("outbound-email".into());
                }
            }
        },
    )
    .await
}

async fn start(b: Backend, dovecot: &Dovecot, smtp: &SmtpServer) -> TestApp {
    start_polling(b, dovecot, smtp, 1).await
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/fixtures/email/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn messages(i: &Value) -> &Vec<Value> {
    i["messages"].as_array().unwrap()
}

/// Every interaction anne can see, in full.
async fn interactions(app: &TestApp) -> Vec<Value> {
    let (s, v) = app
        .get(ANNE, "/api/v1/interactions?view=all&limit=500")
        .await;
    assert_eq!(s, 200, "{v}");
    let mut out = vec![];
    for item in v["items"].as_array().unwrap() {
        out.push(app.interaction(item["case_number"].as_u64().unwrap()).await);
    }
    out
}

/// Every stored inbound message by its provider ID (Message-ID), with its
/// interaction; panics on a message stored twice.
async fn inbound(app: &TestApp) -> HashMap<String, (Value, Value)> {
    let mut out = HashMap::new();
    for i in interactions(app).await {
        for m in messages(&i) {
            if m["direction"] == "inbound" {
                let pid = m["provider_id"].as_str().unwrap().to_string();
                let old = out.insert(pid.clone(), (i.clone(), m.clone()));
                assert!(old.is_none(), "{pid} was stored twice");
            }
        }
    }
    out
}

/// Waits until `n` inbound messages are stored (and no more).
async fn wait_inbound(
    app: &TestApp,
    n: usize,
    dovecot: &Dovecot,
) -> HashMap<String, (Value, Value)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = inbound(app).await;
        assert!(got.len() <= n, "more than {n} messages: {:?}", got.keys());
        if got.len() == n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages were stored: {:?}\n{}",
            got.len(),
            got.keys(),
            dovecot.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn download(app: &TestApp, id: &str) -> (u16, Vec<u8>) {
    let r = app
        .http
        .get(format!("{}/api/v1/attachments/{id}", app.url))
        .bearer_auth(ANNE)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

/// Flags without `\Recent` (which belongs to sessions, not to the mailbox).
fn lasting(flags: Vec<email_support::Seen>) -> Vec<email_support::Seen> {
    flags
        .into_iter()
        .map(|mut s| {
            s.flags.retain(|f| f != "Recent");
            s
        })
        .collect()
}

fn simple(from: &str, id: &str, subject: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: support@shop.example\r\nSubject: {subject}\r\nMessage-ID: <{id}>\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n{headers}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}

/// A message with an 11 MiB attachment (over the 10 MiB limit).
fn oversize() -> Vec<u8> {
    use base64::Engine;
    let data = vec![b'x'; 11 * 1024 * 1024];
    let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
    let mut body = String::with_capacity(b64.len() * 78 / 76 + 1024);
    body.push_str("From: Big <big@example.com>\r\nTo: support@shop.example\r\nSubject: Big file\r\nMessage-ID: <big-1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n--B\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"big.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n");
    for chunk in b64.as_bytes().chunks(76) {
        body.push_str(std::str::from_utf8(chunk).unwrap());
        body.push_str("\r\n");
    }
    body.push_str("--B--\r\n");
    body.into_bytes()
}

/// If this breaks, mail in the channel's mailbox is never seen, arrives
/// garbled in some charset, loses its files, its HTML or its raw copy, or
/// polling marks the customer's mail as read.
async fn imap_polls_every_charset_and_attachment_without_touching_the_mailbox(b: Backend) {
    let dovecot = Dovecot::start();
    let smtp = SmtpServer::start();
    let mut user = dovecot.user().await;
    user.create(MAILBOX).await;
    let names = [
        "utf8_plain.eml",
        "latin1.eml",
        "windows1252.eml",
        "shift_jis.eml",
        "iso2022jp.eml",
        "html_inline_attachments.eml",
    ];
    for n in names {
        user.append(MAILBOX, &fixture(n)).await;
    }
    user.append(MAILBOX, &oversize()).await;
    let before = lasting(user.flags(MAILBOX).await);
    assert_eq!(before.len(), 7);

    let app = start(b, &dovecot, &smtp).await;
    let got = wait_inbound(&app, 7, &dovecot).await;

    let expect = [
        (
            "utf8-1@mail.example.com",
            "renee@example.com",
            "Renée Dupré",
            "Commande – où est mon colis ? 📦",
            "Bonjour, où est ma commande ? 📦\nMerci",
        ),
        (
            "latin1-1@example.es",
            "jose@example.es",
            "José",
            "Señor pedido",
            "El niño quiere café.",
        ),
        (
            "cp1252-1@example.com",
            "pat@example.com",
            "Pat",
            "Quotes",
            "\u{201c}Smart quotes\u{201d} cost € 5 – ok",
        ),
        (
            "sjis-1@example.jp",
            "yamada@example.jp",
            "山田太郎",
            "注文",
            "注文はどこですか",
        ),
        (
            "jis-1@example.jp",
            "suzuki@example.jp",
            "鈴木",
            "お問い合わせ",
            "注文はどこですか",
        ),
    ];
    for (id, from, name, subject, text) in expect {
        let (i, m) = &got[id];
        assert_eq!(i["digital_id"], from, "{i}");
        assert_eq!(i["contact"]["name"], name, "{i}");
        assert_eq!(i["subject"], subject, "{i}");
        assert_eq!(m["text"], text, "{m}");
        assert_eq!(i["status"], "new", "{i}");
    }

    // The raw message is kept for audit, byte for byte, and downloadable.
    let (_, m) = &got["utf8-1@mail.example.com"];
    let raw = &m["raw"];
    assert_eq!(raw["content_type"], "message/rfc822", "{m}");
    let (s, bytes) = download(&app, raw["id"].as_str().unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(bytes, fixture("utf8_plain.eml"));

    // Attachments and the inline image, downloadable; the HTML sanitized,
    // its inline image pointing at the stored file.
    let (_, m) = &got["html-1@example.com"];
    assert_eq!(m["text"], "The box is broken & wet.\nx\nAnn", "{m}");
    let atts = m["attachments"].as_array().unwrap();
    assert_eq!(atts.len(), 2, "{m}");
    let png = atts
        .iter()
        .find(|a| a["content_type"] == "image/png")
        .unwrap();
    assert_eq!(png["content_id"], "img1@example.com", "{png}");
    let (s, bytes) = download(&app, png["id"].as_str().unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(&bytes[1..4], b"PNG");
    assert_eq!(png["size"].as_u64(), Some(bytes.len() as u64));
    let pdf = atts
        .iter()
        .find(|a| a["content_type"] == "application/pdf")
        .unwrap();
    assert_eq!(pdf["filename"], "Rechnung für März.pdf", "{pdf}");
    let (s, bytes) = download(&app, pdf["id"].as_str().unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(bytes, b"%PDF-1.4\n%fake\n");
    let html = m["html"].as_str().unwrap();
    assert!(
        html.contains(&format!(
            "src=\"/api/v1/attachments/{}\"",
            png["id"].as_str().unwrap()
        )),
        "{html}"
    );
    for bad in ["<script", "onclick", "javascript:", "alert("] {
        assert!(!html.contains(bad), "{bad} in {html}");
    }
    assert!(html.contains("<b>broken</b>"), "{html}");

    // The oversize file: recorded as omitted, with its name and size.
    let (_, m) = &got["big-1@example.com"];
    let atts = m["attachments"].as_array().unwrap();
    assert_eq!(atts.len(), 1, "{m}");
    assert_eq!(atts[0]["state"], "omitted", "{m}");
    assert_eq!(atts[0]["filename"], "big.bin");
    assert_eq!(atts[0]["size"].as_u64(), Some(11 * 1024 * 1024));
    assert_eq!(download(&app, atts[0]["id"].as_str().unwrap()).await.0, 404);
    assert!(
        m["text"]
            .as_str()
            .unwrap()
            .contains("[attachment omitted: big.bin"),
        "{m}"
    );

    // The mailbox is as it was: no \Seen, nothing moved or deleted.
    let after = lasting(user.flags(MAILBOX).await);
    assert_eq!(after, before);
    assert!(after.iter().all(|s| s.flags.is_empty()), "{after:?}");
}

/// If this breaks, customers' replies split into new cases or land in
/// someone else's case.
async fn imap_threads_by_headers_and_keeps_strangers_apart(b: Backend) {
    let dovecot = Dovecot::start();
    let smtp = SmtpServer::start();
    let mut user = dovecot.user().await;
    user.create(MAILBOX).await;
    let renee = "Renee <renee@example.com>";
    for raw in [
        fixture("utf8_plain.eml"),
        // In-Reply-To only.
        simple(
            renee,
            "irt-1@mail.example.com",
            "Re: Commande",
            "In-Reply-To: <utf8-1@mail.example.com>\r\n",
            "In reply",
        ),
        // References only (as Outlook sends), In-Reply-To missing.
        fixture("outlook_references_only.eml"),
        // A reply that changes the subject: the headers decide, it stays.
        simple(
            renee,
            "topic-1@mail.example.com",
            "Something else entirely",
            "In-Reply-To: <outlook-1@mail.example.com>\r\nReferences: <utf8-1@mail.example.com> <outlook-1@mail.example.com>\r\n",
            "New subject, same thread",
        ),
        // Someone else answering the forwarded thread: a case of their own.
        simple(
            "Paul <paul@example.net>",
            "fwd-1@example.net",
            "Fwd: Commande",
            "In-Reply-To: <utf8-1@mail.example.com>\r\nReferences: <utf8-1@mail.example.com>\r\n",
            "I am her husband",
        ),
        // The same customer starting a new thread.
        simple(renee, "new-1@mail.example.com", "Another question", "", "New topic"),
    ] {
        user.append(MAILBOX, &raw).await;
    }
    let app = start(b, &dovecot, &smtp).await;
    let got = wait_inbound(&app, 6, &dovecot).await;
    let case = |id: &str| got[id].0["case_number"].as_u64().unwrap();
    let first = case("utf8-1@mail.example.com");
    for id in [
        "irt-1@mail.example.com",
        "outlook-1@mail.example.com",
        "topic-1@mail.example.com",
    ] {
        assert_eq!(case(id), first, "{id} joins the thread");
    }
    let i = app.interaction(first).await;
    assert_eq!(messages(&i).len(), 4, "{i}");
    assert_eq!(i["subject"], "Commande – où est mon colis ? 📦");
    let paul = &got["fwd-1@example.net"].0;
    assert_ne!(case("fwd-1@example.net"), first);
    assert_eq!(paul["digital_id"], "paul@example.net");
    assert_eq!(messages(paul).len(), 1);
    let fresh = &got["new-1@mail.example.com"].0;
    assert_ne!(case("new-1@mail.example.com"), first);
    assert_eq!(fresh["digital_id"], "renee@example.com");
    assert_eq!(fresh["subject"], "Another question");
    assert_eq!(interactions(&app).await.len(), 3);
}

/// If this breaks, a mailbox recreated or migrated (new UIDVALIDITY) is
/// either never read again or imported twice.
async fn imap_uidvalidity_change_rescans_and_duplicates_nothing(b: Backend) {
    let dovecot = Dovecot::start();
    let smtp = SmtpServer::start();
    let mut user = dovecot.user().await;
    user.create(MAILBOX).await;
    let m = |n: u32| {
        simple(
            "kim@example.org",
            &format!("v-{n}@example.org"),
            "Hi",
            "",
            &format!("message {n}"),
        )
    };
    user.append(MAILBOX, &m(1)).await;
    user.append(MAILBOX, &m(2)).await;
    let app = start(b, &dovecot, &smtp).await;
    wait_inbound(&app, 2, &dovecot).await;
    let before = user.uid_validity(MAILBOX).await;

    // The mailbox is deleted and made again (a migration): the old messages
    // come back under new UIDs, with one new message.
    user.session.close().await.ok();
    user.delete(MAILBOX).await;
    user.create(MAILBOX).await;
    for n in [1, 2, 3] {
        user.append(MAILBOX, &m(n)).await;
    }
    let after = user.uid_validity(MAILBOX).await;
    assert_ne!(before, after, "the test needs a new UIDVALIDITY");
    let got = wait_inbound(&app, 3, &dovecot).await;
    // A moment more: nothing else arrives.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(inbound(&app).await.len(), 3);
    assert!(got.contains_key("v-3@example.org"));
    let cursor = switchboard::adapters::email::imap::load_cursor(&app.gateway, "mail")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((cursor.uid_validity, cursor.last_uid), (after, 3));
}

/// If this breaks, one bad email blocks the mailbox or is fetched forever
/// (chatwoot#5081), or is silently thrown away.
async fn a_malformed_message_is_quarantined_and_the_next_goes_through(b: Backend) {
    let dovecot = Dovecot::start();
    let smtp = SmtpServer::start();
    let mut user = dovecot.user().await;
    user.create(MAILBOX).await;
    let bad = fixture("no_sender.eml");
    user.append(MAILBOX, &bad).await;
    user.append(
        MAILBOX,
        &simple(
            "kim@example.org",
            "good-1@example.org",
            "Hi",
            "",
            "after the bad one",
        ),
    )
    .await;
    let app = start(b, &dovecot, &smtp).await;
    let got = wait_inbound(&app, 1, &dovecot).await;
    assert!(got.contains_key("good-1@example.org"));

    let line = "switchboard_email_quarantined_total{reason=\"unparsable\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.metric(line).await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the bad message was not quarantined"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Kept: the record names it and its raw bytes are in the blob store.
    let list = app
        .gateway
        .store
        .kv_get(&switchboard::adapters::email::imap::quarantine_list_key(
            "mail",
        ))
        .await
        .unwrap()
        .unwrap();
    let list: Vec<Value> = serde_json::from_str(&list).unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["uid"], 1);
    assert_eq!(list[0]["message_id"], "<nosender@example.com>");
    let blob = app
        .gateway
        .store
        .blob(list[0]["blob"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(blob, bad);

    // An operator (a service token) lists it and downloads it as it came.
    let (s, v) = app.get(ROUTER, "/api/v1/channels/mail/quarantine").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["items"], Value::Array(list.clone()));
    let id = list[0]["blob"].as_str().unwrap();
    let r = app
        .http
        .get(format!("{}/api/v1/channels/mail/quarantine/{id}", app.url))
        .bearer_auth(ROUTER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "message/rfc822");
    assert_eq!(r.bytes().await.unwrap(), bad);
    for (token, path, status, code) in [
        (
            ANNE,
            "/api/v1/channels/mail/quarantine".to_string(),
            403,
            "not_permitted",
        ),
        (
            ANNE,
            format!("/api/v1/channels/mail/quarantine/{id}"),
            403,
            "not_permitted",
        ),
        (
            ROUTER,
            "/api/v1/channels/nope/quarantine".to_string(),
            404,
            "unknown_channel",
        ),
        // A blob that exists, but not as this channel's quarantined mail.
        (
            ROUTER,
            format!("/api/v1/channels/sms-main/quarantine/{id}"),
            404,
            "not_found",
        ),
        (
            ROUTER,
            "/api/v1/channels/mail/quarantine/nope".to_string(),
            404,
            "not_found",
        ),
    ] {
        let (s, v) = app.get(token, &path).await;
        assert_eq!((s, v["code"].as_str()), (status, Some(code)), "{path}: {v}");
    }

    // The cursor moved past it: a later message arrives, the bad one is not
    // tried again.
    user.append(
        MAILBOX,
        &simple("kim@example.org", "good-2@example.org", "Hi", "", "later"),
    )
    .await;
    wait_inbound(&app, 2, &dovecot).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.metric(line).await, Some(1.0));
    let after = lasting(user.flags(MAILBOX).await);
    assert_eq!(after.len(), 3);
    assert!(after.iter().all(|s| s.flags.is_empty()), "{after:?}");
}

/// If this breaks, an agent's outbound email never reaches the customer,
/// arrives without the headers that bring the answer back, or the answer
/// (and a bounce) is not filed with it.
async fn outbound_email_reaches_smtp_and_the_answer_threads_back(b: Backend) {
    let dovecot = Dovecot::start();
    let smtp = SmtpServer::start();
    let mut user = dovecot.user().await;
    user.create(MAILBOX).await;
    // Polling every 30 s: what arrives sooner came through IDLE.
    let app = start_polling(b, &dovecot, &smtp, 30).await;

    let (s, v) = app
        .post(
            ANNE,
            "/api/v1/outbound/email",
            json!({"channel": "mail", "to": "Kim@Example.org", "subject": "Your order 1234",
                   "text": "Hello Kim, it ships today ✓", "contact": {"name": "Kim"}}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let case = v["case_number"].as_u64().unwrap();
    app.deliver().await;
    let i = app
        .wait_for(case, "the outbound email sent", |i| {
            messages(i).last().is_some_and(|m| m["status"] == "sent")
        })
        .await;
    assert_eq!(i["status"], "resolved", "{i}");
    let mid = format!("<{}>", messages(&i)[0]["provider_id"].as_str().unwrap());
    let m = smtp.message(0).await;
    assert_eq!(m["from"], "Shop Support <support@shop.example>", "{m}");
    assert_eq!(m["to"], "kim@example.org", "{m}");
    assert_eq!(m["subject"], "Your order 1234", "{m}");
    assert_eq!(m["message_id"], mid, "{m}");
    assert_eq!(
        m["parts"][0]["text"].as_str().unwrap().trim_end(),
        "Hello Kim, it ships today ✓"
    );

    // Multipart, with a file.
    let pdf = b"%PDF-1.4\n% an invoice\n".to_vec();
    let form = reqwest::multipart::Form::new()
        .text("channel", "mail")
        .text("to", "lou@example.org")
        .text("subject", "Invoice – März")
        .text("text", "Your invoice is attached.")
        .text("contact", json!({"name": "Lou"}).to_string())
        .part(
            "attachments",
            reqwest::multipart::Part::bytes(pdf.clone())
                .file_name("invoice.pdf")
                .mime_str("application/pdf")
                .unwrap(),
        );
    let (status, v) = app
        .post_multipart(ANNE, "/api/v1/outbound/email", form)
        .await;
    assert_eq!(status, 202, "{v}");
    let case2 = v["case_number"].as_u64().unwrap();
    app.deliver().await;
    let i2 = app
        .wait_for(case2, "the multipart email sent", |i| {
            messages(i).last().is_some_and(|m| m["status"] == "sent")
        })
        .await;
    let mid2 = format!("<{}>", messages(&i2)[0]["provider_id"].as_str().unwrap());
    let m = smtp.message(1).await;
    assert_eq!(m["to"], "lou@example.org", "{m}");
    assert_eq!(m["subject"], "Invoice – März", "{m}");
    assert_eq!(m["message_id"], mid2, "{m}");
    let part = m["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["content_type"] == "application/pdf")
        .unwrap_or_else(|| panic!("no PDF part: {m}"));
    assert_eq!(part["filename"], "invoice.pdf");
    assert_eq!(part["size"].as_u64(), Some(pdf.len() as u64));

    // Kim answers (delivered to the mailbox): the same case, now open.
    let appended = Instant::now();
    user.append(
        MAILBOX,
        &simple(
            "Kim <kim@example.org>",
            "kim-answer@example.org",
            "Re: Your order 1234",
            &format!("In-Reply-To: {mid}\r\nReferences: {mid}\r\n"),
            "Thank you!",
        ),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let i = loop {
        let i = app.interaction(case).await;
        if messages(&i).len() == 2 {
            break i;
        }
        assert!(
            Instant::now() < deadline,
            "the answer did not thread back: {i}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(i["status"], "open", "{i}");
    assert_eq!(messages(&i)[1]["text"], "Thank you!");
    if b == Backend::Embedded {
        // Without IDLE it would wait for the 30 s poll. (On Redis IDLE is
        // also re-issued every few seconds to renew the lease.)
        assert!(
            appended.elapsed() < Duration::from_secs(15),
            "IDLE did not wake the poller: {:?}",
            appended.elapsed()
        );
    }
    // Lou's address bounces: the bounce in the mailbox fails that message
    // and opens no case.
    let bounce = String::from_utf8(fixture("bounce.eml"))
        .unwrap()
        .replace("<abc123@shop.example>", &mid2);
    user.append(MAILBOX, bounce.as_bytes()).await;
    let i2 = app
        .wait_for(case2, "the bounce to fail the message", |i| {
            messages(i)[0]["status"] == "failed"
        })
        .await;
    assert!(
        messages(&i2)[0]["error"]
            .as_str()
            .unwrap()
            .contains("bounced"),
        "{i2}"
    );
    assert_eq!(interactions(&app).await.len(), 2);
}

on_both_stores!(
    imap_polls_every_charset_and_attachment_without_touching_the_mailbox,
    imap_threads_by_headers_and_keeps_strangers_apart,
    imap_uidvalidity_change_rescans_and_duplicates_nothing,
    a_malformed_message_is_quarantined_and_the_next_goes_through,
    outbound_email_reaches_smtp_and_the_answer_threads_back,
);

/// If this breaks, mail servers reached over TLS cannot be polled, or are
/// trusted without checking their certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_over_implicit_tls_checks_the_certificate() {
    polls_over_tls_only_with_a_trusted_certificate("true", |d| d.tls_port.unwrap()).await;
}

/// If this breaks, mail servers on port 143 that want STARTTLS cannot be
/// polled, or the upgrade trusts any certificate (or is skipped, and the
/// password crosses the network in the clear).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_with_starttls_checks_the_certificate_before_logging_in() {
    polls_over_tls_only_with_a_trusted_certificate("\"starttls\"", |d| d.port).await;
}

/// A mailbox on Dovecot with TLS, polled with `imap.tls = tls` on the port
/// `port_of` gives: refused while the server's CA is unknown, read once it
/// is trusted, and the login is over TLS.
async fn polls_over_tls_only_with_a_trusted_certificate(tls: &str, port_of: fn(&Dovecot) -> u16) {
    let dovecot = Dovecot::start_tls();
    let smtp = SmtpServer::start();
    let mut user = dovecot.user().await;
    user.create(MAILBOX).await;
    user.append(
        MAILBOX,
        &simple("kim@example.org", "tls-1@example.org", "Hi", "", "over TLS"),
    )
    .await;
    let imap = |ca: &str| {
        format!(
            r#"{{ host = "127.0.0.1", port = {}, tls = {tls}, username = "{}", password = "{}", mailbox = "{MAILBOX}", poll_seconds = 1{ca} }}"#,
            port_of(&dovecot),
            email_support::IMAP_USER,
            email_support::IMAP_PASSWORD,
        )
    };
    // A certificate from an unknown CA is refused: nothing is read.
    let app = TestApp::start_with(
        Backend::Embedded,
        &email_channel(&imap(""), smtp.port),
        |_| {},
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while app
        .metric("switchboard_imap_errors_total")
        .await
        .unwrap_or(0.0)
        < 1.0
    {
        assert!(Instant::now() < deadline, "no IMAP error counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(inbound(&app).await.is_empty());
    let (s, v) = app.get(ANNE, "/readyz").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["channels"]["mail"], "imap_failing", "{v}");
    drop(app);
    // (The test's own client logs in without TLS, from 127.0.0.1.)
    let tls_logins = |log: &str| {
        log.lines()
            .filter(|l| l.contains("Login: user=<support>") && l.contains(", TLS,"))
            .count()
    };
    assert_eq!(tls_logins(&dovecot.log()), 0, "{}", dovecot.log());
    // Trusting the server's CA (`ca_file`), it polls over TLS.
    let ca = format!(", ca_file = \"{}\"", dovecot.ca_file().display());
    let app = TestApp::start_with(
        Backend::Embedded,
        &email_channel(&imap(&ca), smtp.port),
        |_| {},
    )
    .await;
    let got = wait_inbound(&app, 1, &dovecot).await;
    assert_eq!(got["tls-1@example.org"].1["text"], "over TLS");
    // Dovecot saw our client refuse its certificate, then a login over TLS.
    let log = dovecot.log();
    assert!(log.contains("alert unknown ca"), "{log}");
    assert!(tls_logins(&log) >= 1, "{log}");
}

/// If this breaks, two gateway processes on one Redis both poll the same
/// mailbox (twice the load on the customer's mail server, racing each other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_one_process_polls_a_mailbox() {
    let dovecot = Dovecot::start();
    let smtp = SmtpServer::start();
    let mut user = dovecot.user().await;
    user.create(MAILBOX).await;
    let a = start(Backend::Redis, &dovecot, &smtp).await;
    let prefix = a.prefix.clone();
    let b = TestApp::start_with(
        Backend::Redis,
        &email_channel(&dovecot.channel_imap(1), smtp.port),
        |s| s.store.key_prefix = prefix,
    )
    .await;
    for n in 0..5 {
        user.append(
            MAILBOX,
            &simple(
                "kim@example.org",
                &format!("two-{n}@example.org"),
                "Hi",
                "",
                "hello",
            ),
        )
        .await;
    }
    wait_inbound(&a, 5, &dovecot).await;
    assert_eq!(inbound(&b).await.len(), 5, "both processes see one store");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Dovecot logs every login: the test's own and one poller's, not two.
    let log = dovecot.log();
    let logins = log
        .lines()
        .filter(|l| l.contains("Login: user=<support>"))
        .count();
    assert_eq!(logins, 2, "{log}");
}

/// If this breaks, a gateway killed while it works through the mailbox
/// loses mail or stores some twice when it comes back.
async fn a_killed_poller_resumes_without_loss_or_duplicates(backend: &str) {
    use process_support::{Api, Proc, RedisKeys};
    const N: usize = 40;
    let dovecot = Dovecot::start();
    let mut user = dovecot.user().await;
    user.create(MAILBOX).await;
    let pad = "padding to make each message take a moment. ".repeat(2000);
    for n in 0..N {
        user.append(
            MAILBOX,
            &simple(
                "kim@example.org",
                &format!("r-{n}@example.org"),
                &format!("Order {n}"),
                "",
                &format!("message {n}\r\n{pad}"),
            ),
        )
        .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = RedisKeys::new();
    let mut text = process_support::config_toml(
        "http://127.0.0.1:9",
        &dir.path().join("data"),
        backend,
        &keys.0,
    );
    text.push_str(&format!(
        r#"
[[channels]]
id = "mail"
kind = "email"
queue = "support"
address = "support@shop.example"
imap = {}
"#,
        dovecot.channel_imap(1)
    ));
    let config = dir.path().join("switchboard.toml");
    std::fs::write(&config, text).unwrap();
    let cfg = config.to_str().unwrap();

    async fn stored(api: &Api) -> Vec<String> {
        let mut ids = vec![];
        for item in api.all_cases().await {
            let i = api.interaction(item["case_number"].as_u64().unwrap()).await;
            for m in i["messages"].as_array().unwrap() {
                ids.push(m["provider_id"].as_str().unwrap().to_string());
            }
        }
        ids
    }

    let p = Proc::start(&["serve", "--config", cfg], &[], dir.path()).await;
    let api = Api::new(&p.url);
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.all_cases().await.is_empty() {
        assert!(Instant::now() < deadline, "nothing polled:\n{}", p.output());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before_kill = stored(&api).await.len();
    p.signal("KILL");
    drop(p);
    eprintln!("{before_kill} of {N} stored when the gateway was killed");
    assert!(before_kill < N, "the kill came after polling was done");

    let p = Proc::start(&["serve", "--config", cfg], &[], dir.path()).await;
    let api = Api::new(&p.url);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ids = stored(&api).await;
        if ids.len() >= N {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {N} after the restart:\n{}",
            ids.len(),
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut ids = stored(&api).await;
    ids.sort();
    let mut want: Vec<String> = (0..N).map(|n| format!("r-{n}@example.org")).collect();
    want.sort();
    assert_eq!(ids, want, "each message exactly once");
    let after = lasting(user.flags(MAILBOX).await);
    assert_eq!(after.len(), N);
    assert!(after.iter().all(|s| s.flags.is_empty()), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_killed_poller_resumes_without_loss_or_duplicates() {
    a_killed_poller_resumes_without_loss_or_duplicates("embedded").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_killed_poller_resumes_without_loss_or_duplicates() {
    a_killed_poller_resumes_without_loss_or_duplicates("redis").await
}
