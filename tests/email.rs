//! The email channel black-box: raw mail over HTTP (Standard Webhooks),
//! replies over SMTP to a real server (aiosmtpd from
//! `scripts/email-servers.sh`), read back with Python's email package.

#[macro_use]
mod common;
mod email_support;

use common::*;
use email_support::SmtpServer;
use serde_json::{json, Value};

const SECRET: &str = "whsec_c2VjcmV0LWtleS1vZi10aGUtdGVzdHM=";

fn email_channel(smtp_port: u16) -> String {
    format!(
        r#"
[[channels]]
id = "mail"
kind = "email"
name = "Shop Support"
queue = "support"
address = "support@shop.example"
inbound_secret = "{SECRET}"
smtp = {{ host = "127.0.0.1", port = {smtp_port}, tls = "none" }}
"#
    )
}

async fn start(backend: Backend, smtp: &SmtpServer) -> TestApp {
    TestApp::start_with(backend, &email_channel(smtp.port), |_| {}).await
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

on_both_stores!(
    http_intake_verifies_and_dedupes,
    reply_goes_out_over_smtp_with_threading_headers,
    smtp_5xx_fails_and_4xx_retries,
);
