//! The email channel black-box: raw mail over HTTP (Standard Webhooks),
//! replies and outbound mail over SMTP to a real server (aiosmtpd from
//! `scripts/email-servers.sh`; plain, STARTTLS or implicit TLS with AUTH),
//! read back with Python's email package.

#[macro_use]
mod common;
mod email_support;

use common::*;
use email_support::{SmtpMode, SmtpServer, SMTP_PASSWORD, SMTP_USER};
use serde_json::{json, Value};

const SECRET: &str = "whsec_c2VjcmV0LWtleS1vZi10aGUtdGVzdHM=";

fn email_channel(smtp: &str) -> String {
    format!(
        r#"
[[channels]]
id = "mail"
kind = "email"
name = "Shop Support"
queue = "support"
address = "support@shop.example"
inbound_secret = "{SECRET}"
smtp = {smtp}
"#
    )
}

fn plain_smtp(port: u16) -> String {
    format!(r#"{{ host = "127.0.0.1", port = {port}, tls = "none" }}"#)
}

/// The application sending through `smtp` (a TOML table), with an outbound
/// email queue anne belongs to.
async fn start_smtp(backend: Backend, smtp: &str) -> TestApp {
    TestApp::start_with(backend, &email_channel(smtp), |s| {
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
    })
    .await
}

async fn start(backend: Backend, smtp: &SmtpServer) -> TestApp {
    start_smtp(backend, &plain_smtp(smtp.port)).await
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/fixtures/email/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

async fn post_mail(app: &TestApp, raw: &[u8], age_secs: i64) -> (u16, String) {
    let req = switchboard::adapters::email::simulate_raw(
        "mail",
        SECRET,
        raw,
        chrono::Utc::now().timestamp() - age_secs,
    )
    .unwrap();
    app.post_simulated(req).await
}

fn messages(i: &Value) -> &Vec<Value> {
    i["messages"].as_array().unwrap()
}

/// If this breaks, mail piped in over HTTP is lost, forged or replayed.
async fn http_intake_verifies_and_dedupes(b: Backend) {
    let smtp = SmtpServer::start();
    let app = start(b, &smtp).await;
    let raw = fixture("utf8_plain.eml");

    let (s, body) = post_mail(&app, &raw, 0).await;
    assert_eq!(s, 200, "{body}");
    let case = app.only_case().await;
    let i = app.interaction(case).await;
    assert_eq!(i["digital_id"], "renee@example.com", "{i}");
    assert_eq!(
        i["contact"]["name"].as_str().or(i["contact_name"].as_str()),
        Some("Renée Dupré"),
        "{i}"
    );
    assert_eq!(messages(&i).len(), 1);
    assert_eq!(
        messages(&i)[0]["text"],
        "Bonjour, où est ma commande ? 📦\nMerci"
    );
    // The raw message is kept for audit, as it was posted.
    let raw_id = messages(&i)[0]["raw"]["id"].as_str().unwrap().to_string();
    let r = app
        .http
        .get(format!("{}/api/v1/attachments/{raw_id}", app.url))
        .bearer_auth(ANNE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().to_vec(), raw);

    // The same message again (a mail server's retry): stored once.
    let (s, _) = post_mail(&app, &raw, 0).await;
    assert_eq!(s, 200);
    assert_eq!(messages(&app.interaction(case).await).len(), 1);

    // Six minutes old, correctly signed: 401.
    let other = fixture("latin1.eml");
    let (s, body) = post_mail(&app, &other, 360).await;
    assert_eq!(s, 401, "{body}");
    // Signed with another secret: 401.
    let forged = switchboard::adapters::email::simulate_raw(
        "mail",
        "whsec_b3RoZXI=",
        &other,
        chrono::Utc::now().timestamp(),
    )
    .unwrap();
    let (s, _) = app.post_simulated(forged).await;
    assert_eq!(s, 401);
    let (s, v) = app.get(ANNE, "/api/v1/interactions?view=all").await;
    assert_eq!(s, 200);
    assert_eq!(v["items"].as_array().unwrap().len(), 1, "{v}");
}

/// If this breaks, agents' answers never reach the customer's mailbox or
/// arrive without the headers that keep the thread and route the answer back.
async fn reply_goes_out_over_smtp_with_threading_headers(b: Backend) {
    let smtp = SmtpServer::start();
    let app = start(b, &smtp).await;
    let (s, body) = post_mail(&app, &fixture("utf8_plain.eml"), 0).await;
    assert_eq!(s, 200, "{body}");
    let case = app.only_case().await;
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/assign"),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": "Votre colis part aujourd'hui ✓"}),
        )
        .await;
    assert!(s == 200 || s == 201 || s == 202, "{s} {v}");
    app.deliver().await;
    let i = app
        .wait_for(case, "the reply sent", |i| {
            messages(i).last().is_some_and(|m| m["status"] == "sent")
        })
        .await;
    let ours = messages(&i).last().unwrap().clone();

    let m = smtp.message(0).await;
    assert_eq!(m["from"], "Shop Support <support@shop.example>", "{m}");
    assert_eq!(m["to"], "renee@example.com", "{m}");
    // Threading headers: Re: the original subject, In-Reply-To the customer's
    // latest message, References the thread.
    let original_subject = "Commande – où est mon colis ? 📦";
    assert_eq!(m["subject"], format!("Re: {original_subject}"), "{m}");
    assert_eq!(m["in_reply_to"], "<utf8-1@mail.example.com>", "{m}");
    assert!(
        m["references"]
            .as_str()
            .unwrap_or("")
            .contains("<utf8-1@mail.example.com>"),
        "{m}"
    );
    assert_eq!(app.interaction(case).await["subject"], original_subject);
    let mid = m["message_id"].as_str().unwrap();
    assert!(
        mid.starts_with('<') && mid.ends_with("@shop.example>"),
        "{m}"
    );
    let token = &mid[1..mid.find('@').unwrap()];
    assert_eq!(
        m["reply_to"].as_str().unwrap(),
        format!("support+r-{token}@shop.example"),
        "{m}"
    );
    assert_eq!(
        m["parts"][0]["text"].as_str().unwrap().trim_end(),
        "Votre colis part aujourd'hui ✓"
    );
    // Our Message-ID is the message's provider ID: a reply naming it (or
    // the token) finds the thread.
    assert_eq!(
        ours["provider_id"]
            .as_str()
            .map(|p| format!("<{p}>"))
            .as_deref(),
        Some(mid),
        "{ours}"
    );

    // The customer answers by replying to it: same contact, same interaction.
    let answer = format!(
        "From: Renee <renee@example.com>\r\nTo: support+r-{token}@shop.example\r\nSubject: Re: Commande\r\nMessage-ID: <answer-1@mail.example.com>\r\nIn-Reply-To: {mid}\r\nReferences: <utf8-1@mail.example.com> {mid}\r\n\r\nMerci beaucoup\r\n"
    );
    let (s, body) = post_mail(&app, answer.as_bytes(), 0).await;
    assert_eq!(s, 200, "{body}");
    let i = app.interaction(case).await;
    assert_eq!(
        messages(&i).last().unwrap()["text"],
        "Merci beaucoup",
        "{i}"
    );

    // A bounce of our reply marks it failed and opens nothing.
    let bounce = String::from_utf8(fixture("bounce.eml"))
        .unwrap()
        .replace("<abc123@shop.example>", mid);
    let (s, body) = post_mail(&app, bounce.as_bytes(), 0).await;
    assert_eq!(s, 200, "{body}");
    let i = app
        .wait_for(case, "the bounce to fail our reply", |i| {
            messages(i)
                .iter()
                .any(|m| m["id"] == ours["id"] && m["status"] == "failed")
        })
        .await;
    assert_eq!(messages(&i).len(), 3, "{i}");
    app.only_case().await;

    // Someone else answering that thread (a forward) gets an interaction of their own.
    let other = format!(
        "From: Paul <paul@example.net>\r\nTo: support@shop.example\r\nSubject: Re: Commande\r\nMessage-ID: <fwd-1@example.net>\r\nIn-Reply-To: {mid}\r\nReferences: <utf8-1@mail.example.com> {mid}\r\n\r\nI am her husband\r\n"
    );
    assert_eq!(post_mail(&app, other.as_bytes(), 0).await.0, 200);
    // The same customer starting a new thread (no threading headers) gets a new interaction.
    let fresh = "From: Renee <renee@example.com>\r\nTo: support@shop.example\r\nSubject: Another question\r\nMessage-ID: <new-1@mail.example.com>\r\n\r\nNew topic\r\n";
    assert_eq!(post_mail(&app, fresh.as_bytes(), 0).await.0, 200);
    let (_, list) = app.get(ANNE, "/api/v1/interactions?view=all").await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{list}");
    assert_eq!(
        messages(&app.interaction(case).await).len(),
        3,
        "nothing else joined the first thread"
    );
    assert!(items
        .iter()
        .any(|i| i["digital_id"] == "paul@example.net" && i["case_number"] != case));
    assert!(items
        .iter()
        .any(|i| i["subject"] == "Another question" && i["digital_id"] == "renee@example.com"));
}

/// If this breaks, a refused address is retried forever, or a relay's
/// momentary refusal loses the reply.
async fn smtp_5xx_fails_and_4xx_retries(b: Backend) {
    let smtp = SmtpServer::start();
    let app = start(b, &smtp).await;
    for (from, id) in [("reject5@example.com", "r5"), ("reject4@example.com", "r4")] {
        let raw = format!(
            "From: {from}\r\nTo: support@shop.example\r\nSubject: hi\r\nMessage-ID: <{id}@example.com>\r\n\r\nhello\r\n"
        );
        let (s, body) = post_mail(&app, raw.as_bytes(), 0).await;
        assert_eq!(s, 200, "{body}");
    }
    let (_, v) = app.get(ANNE, "/api/v1/interactions?view=all").await;
    let cases: Vec<(u64, String)> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["case_number"].as_u64().unwrap(),
                i["digital_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (case, _) in &cases {
        let (s, v) = app
            .post(
                ANNE,
                &format!("/api/v1/interactions/{case}/assign"),
                json!({}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let (s, v) = app
            .post(
                ANNE,
                &format!("/api/v1/interactions/{case}/replies"),
                json!({"text": "ok"}),
            )
            .await;
        assert!(s < 300, "{v}");
    }
    // The background worker or this step: either way each is tried.
    app.deliver().await;
    for (case, who) in cases {
        if who.starts_with("reject5") {
            let i = app
                .wait_for(case, "the 550 to fail the reply", |i| {
                    messages(i).last().is_some_and(|m| m["status"] == "failed")
                })
                .await;
            let last = messages(&i).last().unwrap();
            assert!(last["error"].as_str().unwrap().contains("550"), "{last}");
        } else {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let i = app.interaction(case).await;
            let last = messages(&i).last().unwrap().clone();
            assert_ne!(last["status"], "failed", "a 451 is retried: {last}");
            assert_ne!(last["status"], "sent", "{last}");
        }
    }
    assert!(smtp.received().is_empty());
}

/// A customer's mail, taken by anne and answered with `reply`; the case.
async fn answer_a_customer(app: &TestApp, reply: Value) -> u64 {
    let (s, body) = post_mail(app, &fixture("utf8_plain.eml"), 0).await;
    assert_eq!(s, 200, "{body}");
    let case = app.only_case().await;
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/assign"),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = app
        .post(ANNE, &format!("/api/v1/interactions/{case}/replies"), reply)
        .await;
    assert_eq!(s, 202, "{v}");
    case
}

/// Formatted text with what must never reach a customer's mail client.
const HOSTILE_HTML: &str = r#"<p>Hello <b>Kim</b>,</p><p>order <a href="https://shop.example/o/1234" onclick="steal()">1234</a> ships today.</p><script>alert("x")</script><img src="javascript:alert(1)">"#;

fn assert_clean(html: &str) {
    for bad in ["<script", "alert", "onclick", "javascript:", "steal"] {
        assert!(!html.contains(bad), "{bad} got through: {html}");
    }
}

fn text_of(part: &Value) -> String {
    part["text"]
        .as_str()
        .unwrap_or_else(|| panic!("not a text part: {part}"))
        .trim_end()
        .to_string()
}

/// If this breaks, formatted email reaches the customer as plain text (or
/// with the sender's scripts in it), or the agent sees something other than
/// what was sent.
async fn formatted_email_goes_out_as_text_and_sanitized_html(b: Backend) {
    let smtp = SmtpServer::start();
    let app = start(b, &smtp).await;

    // An agent's reply written in HTML only: the text part is rendered from it.
    let case = answer_a_customer(
        &app,
        json!({"html": "<p>Votre colis part <b>aujourd'hui</b></p><script>alert(1)</script>"}),
    )
    .await;
    app.deliver().await;
    let i = app
        .wait_for(case, "the formatted reply sent", |i| {
            messages(i).last().is_some_and(|m| m["status"] == "sent")
        })
        .await;
    let ours = messages(&i).last().unwrap();
    let m = smtp.message(0).await;
    assert_eq!(
        m["structure"],
        json!(["multipart/alternative", "text/plain", "text/html"]),
        "{m}"
    );
    assert_eq!(
        text_of(&m["parts"][0]),
        "Votre colis part aujourd'hui",
        "{m}"
    );
    let html = text_of(&m["parts"][1]);
    assert!(html.contains("<b>aujourd"), "{m}");
    assert_clean(&html);
    assert_eq!(ours["text"], "Votre colis part aujourd'hui", "{ours}");
    assert_eq!(ours["html"].as_str(), Some(html.as_str()), "{ours}");

    // Outbound email with text and HTML (JSON).
    let text = "Hello Kim, order 1234 ships today.";
    let (s, v) = app
        .post(
            ANNE,
            "/api/v1/outbound/email",
            json!({"channel": "mail", "to": "kim@example.org", "subject": "Your order 1234",
                   "text": text, "html": HOSTILE_HTML, "contact": {"name": "Kim"}}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    assert_clean(v["message"]["html"].as_str().unwrap());
    let case = v["case_number"].as_u64().unwrap();
    app.deliver().await;
    let i = app
        .wait_for(case, "the outbound email sent", |i| {
            messages(i).last().is_some_and(|m| m["status"] == "sent")
        })
        .await;
    let stored = &messages(&i)[0];
    assert_eq!(stored["text"], text, "{stored}");
    let stored_html = stored["html"].as_str().unwrap();
    assert!(
        stored_html.contains("<b>Kim</b>")
            && stored_html.contains(r#"href="https://shop.example/o/1234""#),
        "{stored}"
    );
    assert_clean(stored_html);
    let m = smtp.message(1).await;
    assert_eq!(m["to"], "kim@example.org", "{m}");
    assert_eq!(
        m["structure"],
        json!(["multipart/alternative", "text/plain", "text/html"]),
        "{m}"
    );
    assert_eq!(text_of(&m["parts"][0]), text, "{m}");
    assert_eq!(text_of(&m["parts"][1]), stored_html, "{m}");

    // Multipart: HTML only, with a binary attachment.
    let pdf = b"%PDF-1.4\n% an invoice\n\x00\x01\xfe\xff binary \r\n.\r\n".to_vec();
    let form = reqwest::multipart::Form::new()
        .text("channel", "mail")
        .text("to", "lou@example.org")
        .text("subject", "Invoice")
        .text(
            "html",
            r#"<h1>Invoice</h1><p>Your invoice is <i>attached</i>.</p><p>Pay on <a href="https://shop.example/pay/77">the payment page</a>.</p><script>alert(1)</script>"#,
        )
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
    let case = v["case_number"].as_u64().unwrap();
    app.deliver().await;
    let i = app
        .wait_for(case, "the multipart email sent", |i| {
            messages(i).last().is_some_and(|m| m["status"] == "sent")
        })
        .await;
    let stored = &messages(&i)[0];
    let m = smtp.message(2).await;
    assert_eq!(
        m["structure"],
        json!([
            "multipart/mixed",
            "multipart/alternative",
            "text/plain",
            "text/html",
            "application/pdf"
        ]),
        "{m}"
    );
    let plain = text_of(&m["parts"][0]);
    assert!(
        plain.contains("Invoice") && plain.contains("Your invoice is attached."),
        "{m}"
    );
    assert!(!plain.contains('<') && !plain.contains("alert"), "{m}");
    // Without HTML the reader still has the link.
    assert!(
        plain.contains("the payment page (https://shop.example/pay/77)"),
        "{m}"
    );
    assert_eq!(stored["text"].as_str(), Some(plain.as_str()), "{stored}");
    let html = text_of(&m["parts"][1]);
    assert!(html.contains("<i>attached</i>"), "{m}");
    assert_clean(&html);
    assert_eq!(stored["html"].as_str(), Some(html.as_str()), "{stored}");
    let part = &m["parts"][2];
    assert_eq!(part["filename"], "invoice.pdf", "{m}");
    use sha2::Digest;
    assert_eq!(
        part["sha256"].as_str(),
        Some(hex::encode(sha2::Sha256::digest(&pdf)).as_str()),
        "the attachment arrived altered: {m}"
    );
}

/// One series of a counter in `/metrics` (0 before its first increment).
async fn counter(app: &TestApp, series: &str) -> u64 {
    app.metric(series).await.map_or(0, |v| v as u64)
}

const RAW_STORED: &str = r#"switchboard_files_stored_total{source="raw_email"}"#;
const INBOUND_STORED: &str = r#"switchboard_files_stored_total{source="inbound"}"#;

/// An out-of-office answer with an attachment, to no thread of ours.
const AWAY_WITH_FILE: &str = "From: Lou <lou@example.org>\r\nTo: support@shop.example\r\nSubject: Automatic reply: your order\r\nMessage-ID: <ooo-lou-1@mail.example.org>\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nI am away until Monday.\r\n--b1\r\nContent-Type: application/pdf; name=\"away.pdf\"\r\nContent-Disposition: attachment; filename=\"away.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n";

/// If this breaks, out-of-office answers to our replies pile up on the
/// queue as new work (or reopen what agents resolved), or every dropped
/// one leaves its files in the attachment store for nothing.
async fn auto_replies_never_open_or_reopen_an_interaction(b: Backend) {
    let smtp = SmtpServer::start();
    let app = start(b, &smtp).await;

    // From someone with no interaction: accepted, dropped, nothing stored.
    let (s, body) = post_mail(&app, AWAY_WITH_FILE.as_bytes(), 0).await;
    assert_eq!(s, 200, "{body}");
    let (s, v) = app.get(ANNE, "/api/v1/interactions?view=all").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(counter(&app, RAW_STORED).await, 0);
    assert_eq!(counter(&app, INBOUND_STORED).await, 0);
    // Its retry is a duplicate like any other.
    let (s, body) = post_mail(&app, AWAY_WITH_FILE.as_bytes(), 0).await;
    assert_eq!(s, 200, "{body}");
    assert!(
        app.metrics()
            .await
            .contains(r#"switchboard_webhooks_deduplicated_total{kind="email"} 1"#),
        "{}",
        app.metrics().await
    );

    // Renée's case, answered by anne and so resolved: her out-of-office
    // answer to it neither reopens it nor is filed in it.
    let case = answer_a_customer(&app, json!({"text": "Votre colis part aujourd'hui"})).await;
    app.deliver().await;
    let before = app.interaction(case).await;
    assert_eq!(before["status"], "resolved", "{before}");
    let raw_before = counter(&app, RAW_STORED).await;
    assert_eq!(raw_before, 1, "the customer's mail is kept as received");
    let (s, body) = post_mail(&app, &fixture("auto_reply.eml"), 0).await;
    assert_eq!(s, 200, "{body}");
    let after = app.interaction(case).await;
    assert_eq!(after["status"], "resolved", "{after}");
    assert_eq!(messages(&after).len(), messages(&before).len(), "{after}");
    assert_eq!(counter(&app, RAW_STORED).await, raw_before);
    app.only_case().await;
    assert!(
        !app.events()
            .await
            .iter()
            .any(|e| e["type"] == "interaction.reopened"),
        "an auto-reply reopened the case"
    );

    // She writes herself: the case is back on the queue. An auto-reply
    // arriving while it waits there is part of the conversation, files and all.
    let again = "From: Renee <renee@example.com>\r\nTo: support@shop.example\r\nSubject: Re: Commande\r\nMessage-ID: <again-1@mail.example.com>\r\nIn-Reply-To: <utf8-1@mail.example.com>\r\n\r\nToujours rien\r\n";
    let (s, body) = post_mail(&app, again.as_bytes(), 0).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(app.interaction(case).await["status"], "open");
    let away = fixture("auto_reply.eml");
    let away = String::from_utf8(away)
        .unwrap()
        .replace("<ooo-1@mail.example.com>", "<ooo-2@mail.example.com>");
    let (s, body) = post_mail(&app, away.as_bytes(), 0).await;
    assert_eq!(s, 200, "{body}");
    let i = app.interaction(case).await;
    let last = messages(&i).last().unwrap();
    assert_eq!(last["text"], "I am away until Monday.", "{i}");
    assert_eq!(last["kind"], "auto_reply", "{last}");
    assert!(last["raw"]["id"].is_string(), "{last}");
    assert_eq!(counter(&app, RAW_STORED).await, raw_before + 2);
}

on_both_stores!(
    http_intake_verifies_and_dedupes,
    reply_goes_out_over_smtp_with_threading_headers,
    smtp_5xx_fails_and_4xx_retries,
    formatted_email_goes_out_as_text_and_sanitized_html,
    auto_replies_never_open_or_reopen_an_interaction,
);

// SMTP transport security does not depend on the store: embedded only.

/// `smtp` for `server`, logging in with `password`, trusting the test CA
/// when `trust` is set.
fn secure_smtp(server: &SmtpServer, tls: &str, password: &str, trust: bool) -> String {
    let ca = if trust {
        format!(r#", ca_file = "{}""#, server.ca_file().display())
    } else {
        String::new()
    };
    format!(
        r#"{{ host = "127.0.0.1", port = {}, tls = "{tls}", username = "{SMTP_USER}", password = "{password}"{ca} }}"#,
        server.port
    )
}

/// If this breaks, replies cannot go through a relay that requires TLS and
/// a login (every real one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_out_over_starttls_and_implicit_tls_with_auth() {
    for (mode, tls) in [
        (SmtpMode::StartTls, "starttls"),
        (SmtpMode::Tls, "tls"),
        (SmtpMode::Tls, "implicit"),
    ] {
        let server = SmtpServer::start_secure(mode);
        let app = start_smtp(
            Backend::Embedded,
            &secure_smtp(&server, tls, SMTP_PASSWORD, true),
        )
        .await;
        let case = answer_a_customer(&app, json!({"text": format!("sent with tls = {tls}")})).await;
        app.deliver().await;
        let i = app
            .wait_for(case, "the reply sent over TLS", |i| {
                messages(i).last().is_some_and(|m| m["status"] == "sent")
            })
            .await;
        assert!(messages(&i).last().unwrap()["error"].is_null(), "{i}");
        let m = server.message(0).await;
        assert_eq!(
            text_of(&m["parts"][0]),
            format!("sent with tls = {tls}"),
            "{m}"
        );
        assert_eq!(
            server.session(0),
            json!({"tls": true, "login": SMTP_USER}),
            "tls = {tls}"
        );
        app.shutdown.cancel();
    }
}

/// If this breaks, a refused login is retried for a day with the agent
/// seeing nothing, or is reported without the server's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_smtp_password_fails_the_reply_with_the_servers_reply() {
    let server = SmtpServer::start_secure(SmtpMode::StartTls);
    let app = start_smtp(
        Backend::Embedded,
        &secure_smtp(&server, "starttls", "not-the-password", true),
    )
    .await;
    let case = answer_a_customer(&app, json!({"text": "hello"})).await;
    app.deliver().await;
    let i = app
        .wait_for(case, "the 535 to fail the reply", |i| {
            messages(i).last().is_some_and(|m| m["status"] == "failed")
        })
        .await;
    let last = messages(&i).last().unwrap();
    let error = last["error"].as_str().unwrap();
    assert!(error.contains("535"), "{last}");
    assert!(
        error.to_lowercase().contains("authentication"),
        "the server's reply is kept: {last}"
    );
    assert!(last["provider_id"].is_null(), "{last}");
    assert!(server.received().is_empty());
}

/// If this breaks, mail goes to a relay whose certificate nobody vouches
/// for, or the agent cannot tell why nothing went out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_smtp_certificate_fails_the_reply_and_sends_nothing() {
    for (mode, tls) in [(SmtpMode::StartTls, "starttls"), (SmtpMode::Tls, "tls")] {
        let server = SmtpServer::start_secure(mode);
        // No ca_file: the test CA is not trusted.
        let app = start_smtp(
            Backend::Embedded,
            &secure_smtp(&server, tls, SMTP_PASSWORD, false),
        )
        .await;
        let case = answer_a_customer(&app, json!({"text": "hello"})).await;
        app.deliver().await;
        let i = app
            .wait_for(case, "the certificate to fail the reply", |i| {
                messages(i).last().is_some_and(|m| m["status"] == "failed")
            })
            .await;
        let last = messages(&i).last().unwrap();
        let error = last["error"].as_str().unwrap();
        assert!(
            error.contains("certificate is not trusted") && error.contains("smtp.ca_file"),
            "tls = {tls}: {last}"
        );
        assert!(last["provider_id"].is_null(), "{last}");
        assert!(server.received().is_empty(), "tls = {tls}");
        app.shutdown.cancel();
    }
}

/// If this breaks, `tls = "starttls"` quietly sends in clear text (and the
/// password with it) to a server that does not offer STARTTLS, or retries
/// for a day what can never work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_is_required_never_skipped() {
    let server = SmtpServer::start();
    let smtp = format!(
        r#"{{ host = "127.0.0.1", port = {}, tls = "starttls", username = "{SMTP_USER}", password = "{SMTP_PASSWORD}" }}"#,
        server.port
    );
    let app = start_smtp(Backend::Embedded, &smtp).await;
    let case = answer_a_customer(&app, json!({"text": "secret order details"})).await;
    app.deliver().await;
    let i = app
        .wait_for(case, "the missing STARTTLS to fail the reply", |i| {
            messages(i).last().is_some_and(|m| m["status"] == "failed")
        })
        .await;
    let last = messages(&i).last().unwrap();
    assert!(
        last["error"].as_str().unwrap().contains("STARTTLS"),
        "{last}"
    );
    assert!(server.received().is_empty());
}

/// If this breaks, a relay that is down for a moment (restarting, not yet
/// up) loses the reply instead of delaying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_until_the_relay_is_up() {
    let port = email_support::free_port();
    let app = start_smtp(Backend::Embedded, &plain_smtp(port)).await;
    let case = answer_a_customer(&app, json!({"text": "are you there?"})).await;
    app.deliver().await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let i = app.interaction(case).await;
    let last = messages(&i).last().unwrap();
    assert_eq!(
        last["status"], "queued",
        "a refused connection is retried: {last}"
    );

    let smtp = SmtpServer::start_on(port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let i = app.interaction(case).await;
        let last = messages(&i).last().unwrap().clone();
        if last["status"] == "sent" {
            break;
        }
        assert_ne!(last["status"], "failed", "{last}");
        assert!(
            std::time::Instant::now() < deadline,
            "the retry never went out: {last}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let m = smtp.message(0).await;
    assert_eq!(text_of(&m["parts"][0]), "are you there?", "{m}");
}
