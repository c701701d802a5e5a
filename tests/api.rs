//! Black-box tests of the whole gateway over HTTP, with wiremock as Twilio.
//! Each scenario runs on both stores.

#[macro_use]
mod common;

use common::*;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

const TWIML: &str = r#"<?xml version="1.0" encoding="UTF-8"?><Response/>"#;

fn messages_path() -> String {
    format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json")
}

async fn twilio_accepts(app: &TestApp, sid: &str) {
    Mock::given(method("POST"))
        .and(path(messages_path()))
        .respond_with(ResponseTemplate::new(201).set_body_json(twilio_created(sid)))
        .mount(&app.twilio)
        .await;
}

on_both_stores!(
    inbound_sms_becomes_a_new_interaction_on_the_queue,
    a_retried_webhook_is_stored_once_and_answered_the_same,
    forged_and_missing_signatures_are_refused_and_store_nothing,
    the_full_reply_cycle_reaches_twilio_and_follows_statuses,
    a_customer_reply_after_resolution_reopens_the_interaction,
    replies_are_refused_unless_assigned,
    agents_see_only_their_queues,
    idempotency_key_sends_a_reply_once,
    a_permanent_twilio_error_fails_the_message_and_reopens,
    transient_twilio_errors_are_retried,
    stop_refuses_sends_until_start,
    transfer_follows_the_rules,
    end_keeps_status_and_a_new_message_reopens,
    notes_are_private_to_their_agent,
    outbound_sms_only_for_outbound_queue_members,
    attachments_are_sent_as_expiring_links,
    the_routing_feed_pages_and_long_polls,
);

/// An SMS from a customer must appear as a New interaction an agent can take.
async fn inbound_sms_becomes_a_new_interaction_on_the_queue(b: Backend) {
    let app = TestApp::start(b).await;
    let (s, body) = app
        .sms_from("+1 415 867 5309", "Hello, my order is late", "SM001")
        .await;
    assert_eq!(s, 200);
    assert_eq!(body, TWIML);
    let case = app.only_case().await;
    let i = app.interaction(case).await;
    assert_eq!(i["status"], "new");
    assert_eq!(i["digital_id"], "+14158675309");
    assert_eq!(i["channel"], json!({"id": "sms-main", "kind": "sms"}));
    assert_eq!(i["queue"], "support");
    assert_eq!(i["in_queue"], true);
    assert_eq!(i["assigned_to"], Value::Null);
    assert_eq!(i["unread"], true);
    assert_eq!(i["messages"][0]["text"], "Hello, my order is late");
    assert_eq!(i["messages"][0]["direction"], "inbound");
    assert_eq!(i["messages"][0]["status"], "received");
    let types: Vec<String> = app
        .events()
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types, vec!["interaction.created", "message.received"]);
    // A second message from the same number joins the same interaction.
    app.sms_from("+14158675309", "Any news?", "SM002").await;
    assert_eq!(app.only_case().await, case);
    assert_eq!(
        app.interaction(case).await["messages"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

/// Twilio retries: the same MessageSid must never become two messages.
async fn a_retried_webhook_is_stored_once_and_answered_the_same(b: Backend) {
    let app = TestApp::start(b).await;
    let first = app.sms_from("+14158675309", "hi", "SMdup").await;
    let second = app.sms_from("+14158675309", "hi", "SMdup").await;
    assert_eq!(first, second);
    assert_eq!(first.0, 200);
    let case = app.only_case().await;
    assert_eq!(
        app.interaction(case).await["messages"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(app.events().await.len(), 2);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"switchboard_webhooks_deduplicated_total{kind="sms"} 1"#),
        "{metrics}"
    );
    // Both deliveries are timed, the retry as well as the first.
    assert!(
        metrics.contains(r#"switchboard_webhook_duration_seconds_count{kind="sms"} 2"#),
        "{metrics}"
    );
}

/// A forged or unsigned webhook must not create anything.
async fn forged_and_missing_signatures_are_refused_and_store_nothing(b: Backend) {
    let app = TestApp::start(b).await;
    let mut req = switchboard::adapters::sms::simulate_inbound(
        &app.sms_channel(),
        &app.url,
        "+14158675309",
        "hi",
        "SMforged",
    );
    let good = req.clone();
    for (k, v) in req.headers.iter_mut() {
        if k.eq_ignore_ascii_case("x-twilio-signature") {
            *v = "AAAAAAAAAAAAAAAAAAAAAAAAAAA=".into();
        }
    }
    let (s, body) = app.post_simulated(req).await;
    assert_eq!(s, 401);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], "invalid_signature");
    let mut unsigned = good.clone();
    unsigned
        .headers
        .retain(|(k, _)| !k.eq_ignore_ascii_case("x-twilio-signature"));
    let (s, body) = app.post_simulated(unsigned).await;
    assert_eq!(s, 401, "{body}");
    // A body changed after signing.
    let mut tampered = good.clone();
    tampered.body = String::from_utf8(tampered.body)
        .unwrap()
        .replace("hi", "ho")
        .into_bytes();
    assert_eq!(app.post_simulated(tampered).await.0, 401);
    let (_, list) = app.get(ANNE, "/api/v1/interactions?view=all").await;
    assert_eq!(list["items"], json!([]));
    assert!(app.events().await.is_empty());
}

/// The agent takes the case, replies, and Twilio receives exactly the documented request;
/// status callbacks then move the message forward and never back.
async fn the_full_reply_cycle_reaches_twilio_and_follows_statuses(b: Backend) {
    let app = TestApp::start(b).await;
    twilio_accepts(&app, "SMreply1").await;
    app.sms_from("+14158675309", "Where is my parcel?", "SMin1")
        .await;
    let case = app.only_case().await;
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/assign"),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["assigned_to"], "anne");
    assert_eq!(v["unread"], false);
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": "It ships today"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["message"]["status"], "queued");
    assert_eq!(v["message"]["sms"]["encoding"], "GSM-7");
    let i = app.interaction(case).await;
    assert_eq!(i["status"], "resolved");
    assert_eq!(i["in_queue"], false);
    let i = app
        .wait_for(case, "sent", |i| i["messages"][1]["status"] == "sent")
        .await;
    assert_eq!(i["messages"][1]["provider_id"], "SMreply1");
    let received = app.twilio.received_requests().await.unwrap();
    assert_eq!(received.len(), 1);
    let req = &received[0];
    use base64::Engine;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}"));
    assert_eq!(
        req.headers.get("authorization").unwrap().to_str().unwrap(),
        format!("Basic {basic}")
    );
    let form = form_of(req);
    assert_eq!(field(&form, "To"), Some("+14158675309"));
    assert_eq!(field(&form, "From"), Some("+14155550100"));
    assert_eq!(field(&form, "Body"), Some("It ships today"));
    assert_eq!(
        field(&form, "StatusCallback"),
        Some(format!("{}/webhooks/sms-main", app.url).as_str())
    );
    // Statuses: read arrives before delivered; delivered must not move it back.
    assert_eq!(app.sms_status("SMreply1", "read", None).await.0, 200);
    assert_eq!(app.sms_status("SMreply1", "delivered", None).await.0, 200);
    let i = app.interaction(case).await;
    assert_eq!(i["messages"][1]["status"], "read");
    let types: Vec<String> = app
        .events()
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        types,
        vec![
            "interaction.created",
            "message.received",
            "interaction.assigned",
            "interaction.resolved",
            "message.sent",
            "message.status"
        ]
    );
}

/// PRODUCT rule 4: a customer writing after a reply reopens the interaction.
async fn a_customer_reply_after_resolution_reopens_the_interaction(b: Backend) {
    let app = TestApp::start(b).await;
    twilio_accepts(&app, "SMr").await;
    app.sms_from("+14158675309", "one", "SMa").await;
    let case = app.only_case().await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    let (s, _) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/resolve"),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(app.interaction(case).await["status"], "resolved");
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/resolve"),
            json!({}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("invalid_transition")));
    app.sms_from("+14158675309", "two", "SMb").await;
    let i = app.interaction(case).await;
    assert_eq!(i["status"], "open");
    assert_eq!(i["in_queue"], true);
    assert_eq!(
        i["assigned_to"], "anne",
        "the agent stays assigned until End or Transfer"
    );
    assert_eq!(i["unread"], true);
    let (_, me) = app.get(ANNE, "/api/v1/me").await;
    assert_eq!(me["unread"], 1);
    assert_eq!(me["mine_unread"], json!([case]), "{me}");
    // Opening it again (assign to oneself) marks it read.
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/assign"),
            json!({}),
        )
        .await;
    assert_eq!((s, v["unread"].clone()), (200, json!(false)), "{v}");
    let (_, me) = app.get(ANNE, "/api/v1/me").await;
    assert_eq!(me["unread"], 0);
    assert_eq!(me["mine_unread"], json!([]), "{me}");
}

/// The agent UI's counts come from `/api/v1/me`: they must count every
/// unread interaction, not the first page of a list, and name the caller's
/// own ones apart (the badge of "My interactions"), whoever else's are there.
#[tokio::test]
async fn me_counts_every_unread_interaction_and_names_the_callers_own() {
    let app = TestApp::start(Backend::Embedded).await;
    for n in 0..503 {
        let (s, _) = app
            .sms_from(&format!("+1415555{n:04}"), "hello", &format!("SMp{n}"))
            .await;
        assert_eq!(s, 200);
    }
    let (_, list) = app.get(ANNE, "/api/v1/interactions?limit=500").await;
    let cases: Vec<u64> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["case_number"].as_u64().unwrap())
        .collect();
    assert_eq!(cases.len(), 500);
    let (_, me) = app.get(ANNE, "/api/v1/me").await;
    assert_eq!(
        (me["unread"].clone(), me["mine_unread"].clone()),
        (json!(503), json!([]))
    );
    // Anne takes two; one customer writes again after that.
    for case in &cases[..2] {
        let (s, _) = app
            .post(
                ANNE,
                &format!("/api/v1/interactions/{case}/assign"),
                json!({}),
            )
            .await;
        assert_eq!(s, 200);
    }
    let i = app.interaction(cases[1]).await;
    app.sms_from(i["digital_id"].as_str().unwrap(), "again", "SMp-again")
        .await;
    let (_, me) = app.get(ANNE, "/api/v1/me").await;
    assert_eq!(me["unread"], 502, "{me}");
    assert_eq!(me["mine_unread"], json!([cases[1]]), "{me}");
    // Bob sees the same queue: anne's cases are not in his view at all.
    let (_, me) = app.get(BOB, "/api/v1/me").await;
    assert_eq!(
        (me["unread"].clone(), me["mine_unread"].clone()),
        (json!(501), json!([])),
        "{me}"
    );
}

/// Only the assigned agent may reply; bad tokens are refused.
async fn replies_are_refused_unless_assigned(b: Backend) {
    let app = TestApp::start(b).await;
    app.sms_from("+14158675309", "hi", "SMx").await;
    let case = app.only_case().await;
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": "x"}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("not_assigned")));
    app.post(
        BOB,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/assign"),
            json!({}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("already_assigned")));
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": "x"}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("not_assigned")));
    let (s, v) = app.get("wrong-token", "/api/v1/interactions").await;
    assert_eq!(s, 401, "{v}");
    let r = app
        .http
        .get(format!("{}/api/v1/interactions", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.headers().get("content-type").unwrap(),
        "application/problem+json"
    );
    let (s, v) = app.get(ANNE, "/api/v1/interactions/999999").await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")));
    let (s, v) = app
        .post(
            BOB,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": ""}),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str(), v["field"].as_str()),
        (422, Some("validation_failed"), Some("text"))
    );
    // A service may give the interaction to another agent.
    let (s, v) = app
        .post(
            ROUTER,
            &format!("/api/v1/interactions/{case}/assign"),
            json!({"agent": "anne"}),
        )
        .await;
    assert_eq!((s, v["assigned_to"].as_str()), (200, Some("anne")));
    // Nothing was sent to Twilio.
    assert!(app.twilio.received_requests().await.unwrap().is_empty());
}

/// An agent outside the interaction's queue can neither see nor act on it.
async fn agents_see_only_their_queues(b: Backend) {
    let app = TestApp::start(b).await;
    app.sms_from("+14158675309", "hi", "SMq").await;
    let case = app.only_case().await;
    let (s, v) = app
        .get(CAROL, &format!("/api/v1/interactions/{case}"))
        .await;
    assert_eq!((s, v["code"].as_str()), (403, Some("not_permitted")));
    let (s, v) = app
        .post(
            CAROL,
            &format!("/api/v1/interactions/{case}/assign"),
            json!({}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (403, Some("not_permitted")));
    let (_, v) = app.get(CAROL, "/api/v1/interactions?view=all").await;
    assert_eq!(v["items"], json!([]));
    let (s, v) = app.get(CAROL, "/api/v1/interactions?queue=support").await;
    assert_eq!((s, v["code"].as_str()), (403, Some("not_permitted")));
    let (_, v) = app.get(BOB, "/api/v1/interactions").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
}

/// A double click must not send two SMS.
async fn idempotency_key_sends_a_reply_once(b: Backend) {
    let app = TestApp::start(b).await;
    twilio_accepts(&app, "SMonce").await;
    app.sms_from("+14158675309", "hi", "SMi").await;
    let case = app.only_case().await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    let mut ids = vec![];
    for _ in 0..3 {
        let r = app
            .http
            .post(format!("{}/api/v1/interactions/{case}/replies", app.url))
            .bearer_auth(ANNE)
            .header("Idempotency-Key", "click-1")
            .json(&json!({"text": "once"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        let v: Value = r.json().await.unwrap();
        ids.push(v["message"]["id"].as_str().unwrap().to_string());
    }
    assert!(ids.iter().all(|i| *i == ids[0]));
    app.wait_for(case, "sent", |i| i["messages"][1]["status"] == "sent")
        .await;
    assert_eq!(
        app.interaction(case).await["messages"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(app.twilio.received_requests().await.unwrap().len(), 1);
}

/// 21610 (unsubscribed) is final: the message fails where the agent sees it and the case reopens.
async fn a_permanent_twilio_error_fails_the_message_and_reopens(b: Backend) {
    let app = TestApp::start(b).await;
    Mock::given(method("POST"))
        .and(path(messages_path()))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "code": 21610, "message": "Attempt to send to unsubscribed recipient",
            "more_info": "https://www.twilio.com/docs/errors/21610", "status": 400})))
        .mount(&app.twilio)
        .await;
    app.sms_from("+14158675309", "hi", "SMp").await;
    let case = app.only_case().await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/replies"),
        json!({"text": "x"}),
    )
    .await;
    let i = app
        .wait_for(case, "failed", |i| i["messages"][1]["status"] == "failed")
        .await;
    assert!(
        i["messages"][1]["error"]
            .as_str()
            .unwrap()
            .contains("21610"),
        "{i}"
    );
    assert_eq!(i["status"], "open");
    assert_eq!(i["in_queue"], true);
    assert_eq!(i["assigned_to"], "anne");
    assert_eq!(
        app.twilio.received_requests().await.unwrap().len(),
        1,
        "not retried"
    );
    // Twilio told us the recipient unsubscribed: the next reply is refused before any call.
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": "y"}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (422, Some("opted_out")), "{v}");
    assert_eq!(app.twilio.received_requests().await.unwrap().len(), 1);
}

/// A 503 from Twilio is retried, and the reply then goes out once.
async fn transient_twilio_errors_are_retried(b: Backend) {
    let app = TestApp::start(b).await;
    Mock::given(method("POST"))
        .and(path(messages_path()))
        .respond_with(ResponseTemplate::new(503).set_body_json(
            json!({"code": 20500, "message": "Internal Server Error", "status": 503}),
        ))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.twilio)
        .await;
    twilio_accepts(&app, "SMlater").await;
    app.sms_from("+14158675309", "hi", "SMt").await;
    let case = app.only_case().await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/replies"),
        json!({"text": "x"}),
    )
    .await;
    // The first attempt fails; make the retry due now instead of sleeping.
    app.wait_for(case, "a first attempt", |_| true).await;
    for _ in 0..100 {
        if !app.twilio.received_requests().await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let due = app
        .gateway
        .store
        .outbox_lease(
            chrono::Utc::now() + chrono::Duration::hours(1),
            std::time::Duration::ZERO,
            10,
        )
        .await
        .unwrap();
    for mut job in due {
        job.due_at = chrono::Utc::now();
        app.gateway.store.outbox_reschedule(&job).await.unwrap();
    }
    app.deliver().await;
    let i = app
        .wait_for(case, "sent", |i| i["messages"][1]["status"] == "sent")
        .await;
    assert_eq!(i["messages"][1]["provider_id"], "SMlater");
    assert_eq!(app.twilio.received_requests().await.unwrap().len(), 2);
}

/// After STOP no SMS may be sent to the contact until START.
async fn stop_refuses_sends_until_start(b: Backend) {
    let app = TestApp::start(b).await;
    twilio_accepts(&app, "SMok").await;
    app.sms_from("+14158675309", "hi", "SM1").await;
    app.sms_from("+14158675309", "STOP", "SM2").await;
    let case = app.only_case().await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": "x"}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (422, Some("opted_out")), "{v}");
    let (s, v) = app
        .post(
            ANNE,
            "/api/v1/outbound/sms",
            json!({"channel": "sms-main", "to": "+14158675309", "text": "promo"}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (422, Some("opted_out")), "{v}");
    assert!(app.twilio.received_requests().await.unwrap().is_empty());
    app.sms_from("+14158675309", "START", "SM3").await;
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": "welcome back"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
}

/// PRODUCT rule 7 and CONTRACT's transfer rules.
async fn transfer_follows_the_rules(b: Backend) {
    let app = TestApp::start(b).await;
    app.sms_from("+14158675309", "hi", "SMtr").await;
    let case = app.only_case().await;
    let url = format!("/api/v1/interactions/{case}/transfer");
    let (s, v) = app.post(ANNE, &url, json!({"queue": "sales"})).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("not_assigned")));
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    let (s, v) = app.post(ANNE, &url, json!({"queue": "nowhere"})).await;
    assert_eq!((s, v["code"].as_str()), (404, Some("unknown_queue")));
    let (s, v) = app.post(ANNE, &url, json!({"queue": "omni"})).await;
    assert_eq!((s, v["code"].as_str()), (422, Some("invalid_queue")));
    let master0 = app.interaction(case).await["master_contact_id"].clone();
    let (s, v) = app.post(ANNE, &url, json!({"queue": "sales"})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["queue"].as_str(),
            v["assigned_to"].clone(),
            v["in_queue"].clone()
        ),
        (Some("sales"), Value::Null, json!(true))
    );
    assert_eq!(v["transfer_count"], 1);
    // Bob may not transfer.
    app.post(
        BOB,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    let (s, v) = app.post(BOB, &url, json!({"queue": "support"})).await;
    assert_eq!((s, v["code"].as_str()), (403, Some("not_permitted")));
    app.post(
        ROUTER,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({"agent": "anne"}),
    )
    .await;
    let (_, v) = app.post(ANNE, &url, json!({"queue": "support"})).await;
    assert_eq!(v["transfer_count"], 2);
    assert_eq!(
        v["master_contact_id"], master0,
        "no new master id before the 3rd transfer"
    );
    // Carol is the only member of vip: transferring there herself keeps it, but anne is not carol.
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    let (_, v) = app.post(ANNE, &url, json!({"queue": "vip"})).await;
    assert_eq!(v["transfer_count"], 3);
    assert_ne!(
        v["master_contact_id"], master0,
        "the 3rd transfer gives a new master contact id"
    );
    assert_eq!(v["assigned_to"], Value::Null);
    let master3 = v["master_contact_id"].clone();
    app.post(
        CAROL,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    let (s, v) = app.post(CAROL, &url, json!({"queue": "vip"})).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("invalid_transition")));
    let (_, v) = app.post(CAROL, &url, json!({"queue": "sales"})).await;
    assert_eq!(v["transfer_count"], 4);
    assert_ne!(
        v["master_contact_id"], master3,
        "every transfer from the 3rd on gives a new one"
    );
}

/// End: unassigns, leaves the queue, keeps the status; a new customer message reopens it.
async fn end_keeps_status_and_a_new_message_reopens(b: Backend) {
    let app = TestApp::start(b).await;
    app.sms_from("+14158675309", "hi", "SMe1").await;
    let case = app.only_case().await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    let (s, v) = app
        .post(ANNE, &format!("/api/v1/interactions/{case}/end"),
            json!({"disposition": {"related_name": "ACME Ltd", "related_case": "CRM-42", "notes": "wants a call back"}}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "new");
    assert_eq!(v["assigned_to"], Value::Null);
    assert_eq!(v["in_queue"], false);
    assert_eq!(v["disposition"]["related_case"], "CRM-42");
    assert_eq!(v["disposition"]["ended_by"], "anne");
    assert!(
        v.to_string().find("wants a call back").is_none(),
        "notes never appear in interaction JSON"
    );
    let (_, list) = app.get(ANNE, "/api/v1/interactions").await;
    assert_eq!(
        list["items"],
        json!([]),
        "an ended interaction leaves the queue"
    );
    app.sms_from("+14158675309", "hello again", "SMe2").await;
    let v = app.interaction(case).await;
    assert_eq!(v["status"], "open");
    assert_eq!(v["in_queue"], true);
    assert_eq!(v["ended_at"], Value::Null);
    assert!(app
        .events()
        .await
        .iter()
        .all(|e| !e.to_string().contains("wants a call back")));
}

/// Rule 8: notes are the agent's own.
async fn notes_are_private_to_their_agent(b: Backend) {
    let app = TestApp::start(b).await;
    app.sms_from("+14158675309", "hi", "SMn").await;
    let case = app.only_case().await;
    let (_, details) = app
        .get(ANNE, &format!("/api/v1/interactions/{case}/contact"))
        .await;
    let contact_id = details["contact"]["id"].as_str().unwrap().to_string();
    let (s, _) = app
        .send(
            "PUT",
            ANNE,
            &format!("/api/v1/contacts/{contact_id}/notes"),
            json!({"notes": "prefers mornings"}),
        )
        .await;
    assert_eq!(s, 200);
    let (_, mine) = app
        .get(ANNE, &format!("/api/v1/interactions/{case}/contact"))
        .await;
    assert_eq!(mine["notes"], "prefers mornings");
    assert_eq!(mine["digital_id"], "+14158675309");
    let (_, theirs) = app
        .get(BOB, &format!("/api/v1/interactions/{case}/contact"))
        .await;
    assert_eq!(theirs["notes"], Value::Null);
    let (s, v) = app
        .send(
            "PUT",
            CAROL,
            &format!("/api/v1/contacts/{contact_id}/notes"),
            json!({"notes": "x"}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (403, Some("not_permitted")));
}

/// Outbound SMS: only for agents of an outbound SMS queue; the answer threads back.
async fn outbound_sms_only_for_outbound_queue_members(b: Backend) {
    let app = TestApp::start(b).await;
    twilio_accepts(&app, "SMout").await;
    let body = json!({"channel": "sms-main", "to": "+14158675309", "text": "Your table is ready",
        "contact": {"name": "Kerry", "related_case": "R-7", "notes": "table for two"}});
    let (s, v) = app.post(BOB, "/api/v1/outbound/sms", body.clone()).await;
    assert_eq!((s, v["code"].as_str()), (403, Some("not_permitted")));
    let (s, v) = app
        .post(
            ANNE,
            "/api/v1/outbound/sms",
            json!({"channel": "sms-main", "to": "12", "text": "x"}),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str(), v["field"].as_str()),
        (422, Some("validation_failed"), Some("to"))
    );
    let (s, v) = app.post(ANNE, "/api/v1/outbound/sms", body).await;
    assert_eq!(s, 202, "{v}");
    let case = v["case_number"].as_u64().unwrap();
    let i = app.interaction(case).await;
    assert_eq!(i["status"], "resolved");
    assert_eq!(i["assigned_to"], "anne");
    assert_eq!(i["contact"]["name"], "Kerry");
    assert_eq!(i["related_case"], "R-7");
    app.wait_for(case, "sent", |i| i["messages"][0]["status"] == "sent")
        .await;
    let (_, details) = app
        .get(ANNE, &format!("/api/v1/interactions/{case}/contact"))
        .await;
    assert_eq!(details["notes"], "table for two");
    app.sms_from("+14158675309", "Thanks!", "SMans").await;
    let i = app.interaction(case).await;
    assert_eq!(i["status"], "open");
    assert_eq!(i["messages"].as_array().unwrap().len(), 2);
}

/// Attachments go to Twilio as MediaUrl links that serve the file and expire; over 10 MiB is refused.
async fn attachments_are_sent_as_expiring_links(b: Backend) {
    let app = TestApp::start(b).await;
    twilio_accepts(&app, "SMmedia").await;
    app.sms_from("+14158675309", "send me the invoice", "SMm")
        .await;
    let case = app.only_case().await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    let big = reqwest::multipart::Form::new().text("text", "here").part(
        "attachments",
        reqwest::multipart::Part::bytes(vec![0u8; 10 * 1024 * 1024 + 1])
            .file_name("big.png")
            .mime_str("image/png")
            .unwrap(),
    );
    let (status, v) = app
        .post_multipart(ANNE, &format!("/api/v1/interactions/{case}/replies"), big)
        .await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["code"], "attachment_too_large");
    let png = b"\x89PNG\r\n\x1a\nfake image".to_vec();
    let form = reqwest::multipart::Form::new()
        .text("text", "here it is")
        .part(
            "attachments",
            reqwest::multipart::Part::bytes(png.clone())
                .file_name("invoice.png")
                .mime_str("image/png")
                .unwrap(),
        );
    let (status, body) = app
        .post_multipart(ANNE, &format!("/api/v1/interactions/{case}/replies"), form)
        .await;
    assert_eq!(status, 202, "{body}");
    app.wait_for(case, "sent", |i| i["messages"][1]["status"] == "sent")
        .await;
    let received = app.twilio.received_requests().await.unwrap();
    let form = form_of(&received[0]);
    let media_url = field(&form, "MediaUrl").expect("a MediaUrl").to_string();
    assert!(media_url.starts_with(&format!("{}/media/", app.url)));
    let fetched = app.http.get(&media_url).send().await.unwrap();
    assert_eq!(fetched.status().as_u16(), 200);
    assert_eq!(fetched.headers().get("content-type").unwrap(), "image/png");
    assert_eq!(fetched.bytes().await.unwrap().to_vec(), png);
    let last = if media_url.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &media_url[..media_url.len() - 1]);
    assert_eq!(
        app.http
            .get(&forged)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    // The agent can download it too.
    let att = app.interaction(case).await["messages"][1]["attachments"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app
        .http
        .get(format!("{}/api/v1/attachments/{att}", app.url))
        .bearer_auth(BOB)
        .send()
        .await
        .unwrap();
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(
        (
            header("cache-control"),
            header("x-content-type-options"),
            header("content-security-policy")
        ),
        (
            Some("private, no-store".into()),
            Some("nosniff".into()),
            Some("default-src 'none'; sandbox".into())
        )
    );
    assert_eq!(r.bytes().await.unwrap().to_vec(), png);
    let r = app
        .http
        .get(format!("{}/api/v1/attachments/{att}", app.url))
        .bearer_auth(CAROL)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
}

/// Routing engines read the feed with `after` and long-poll with `wait`.
async fn the_routing_feed_pages_and_long_polls(b: Backend) {
    let app = TestApp::start(b).await;
    let (s, v) = app.get(ANNE, "/api/v1/routing/events").await;
    assert_eq!((s, v["code"].as_str()), (403, Some("not_permitted")));
    app.sms_from("+14158675309", "hi", "SMf1").await;
    let (_, v) = app.get(ROUTER, "/api/v1/routing/events?limit=1").await;
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
    assert_eq!(v["events"][0]["type"], "interaction.created");
    let next = v["next"].as_str().unwrap().to_string();
    let (_, v) = app
        .get(ROUTER, &format!("/api/v1/routing/events?after={next}"))
        .await;
    assert_eq!(v["events"][0]["type"], "message.received");
    let last = v["next"].as_str().unwrap().to_string();
    // A long poll returns as soon as an event arrives.
    let poll = {
        let http = app.http.clone();
        let url = format!("{}/api/v1/routing/events?after={last}&wait=10", app.url);
        tokio::spawn(async move {
            http.get(url)
                .bearer_auth(ROUTER)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    app.sms_from("+14158675309", "again", "SMf2").await;
    let v = tokio::time::timeout(std::time::Duration::from_secs(5), poll)
        .await
        .expect("the long poll answers")
        .unwrap();
    assert_eq!(v["events"][0]["type"], "message.received");
    assert_eq!(v["events"][0]["data"]["message"]["text"], "again");
}

/// Rule 6 and 10: a message long after End starts a new interaction, and
/// contact details list the earlier one in the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_long_after_end_starts_a_new_interaction_with_history() {
    let app = TestApp::start_with(Backend::Embedded, "", |s| {
        s.server.new_interaction_after_hours = 0
    })
    .await;
    app.sms_from("+14158675309", "first", "SMh1").await;
    let first = app.only_case().await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{first}/assign"),
        json!({}),
    )
    .await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{first}/end"),
        json!({"disposition": {"related_case": "CRM-1"}}),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    app.sms_from("+14158675309", "second", "SMh2").await;
    let (_, v) = app.get(ANNE, "/api/v1/interactions").await;
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{v}");
    let second = items[0]["case_number"].as_u64().unwrap();
    assert_ne!(second, first);
    assert_eq!(items[0]["status"], "new");
    let old = app.interaction(first).await;
    assert_eq!(
        old["messages"].as_array().unwrap().len(),
        1,
        "the ended one is left alone"
    );
    let (_, details) = app
        .get(ANNE, &format!("/api/v1/interactions/{second}/contact"))
        .await;
    assert_eq!(details["history"][0]["case_number"], first);
    assert_eq!(details["history"][0]["related_case"], "CRM-1");
    assert!(details["history"][0].get("messages").is_none());
}

/// MMS media is downloaded into the gateway at once; a failed download stays visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mms_media_is_stored_and_a_failed_download_is_marked() {
    let app = TestApp::start(Backend::Embedded).await;
    let media = format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/MM1/Media/ME1");
    Mock::given(method("GET"))
        .and(path(media.clone()))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "image/jpeg")
                .set_body_bytes(b"jpeg-bytes".to_vec()),
        )
        .mount(&app.twilio)
        .await;
    let ch = app.sms_channel();
    let form = format!(
        "MessageSid=MM1&AccountSid={ACCOUNT_SID}&From=%2B14158675309&To=%2B14155550100&Body=look&NumMedia=2\
         &MediaUrl0={}&MediaContentType0=image%2Fjpeg&MediaUrl1={}&MediaContentType1=image%2Fpng&SmsStatus=received",
        urlencode(&format!("{}{media}", app.twilio.uri())),
        urlencode(&format!("{}/missing", app.twilio.uri())),
    );
    let req = switchboard::adapters::sms::simulate_form(&ch, &app.url, form.as_bytes());
    assert_eq!(app.post_simulated(req).await.0, 200);
    let case = app.only_case().await;
    let i = app.interaction(case).await;
    let atts = i["messages"][0]["attachments"].as_array().unwrap();
    assert_eq!(atts.len(), 2);
    assert_eq!(atts[0]["state"], "stored");
    assert_eq!(atts[0]["content_type"], "image/jpeg");
    assert_eq!(atts[0]["size"], 10);
    assert_eq!(atts[1]["state"], "failed");
    assert!(
        atts[1]["error"].as_str().unwrap().contains("404"),
        "{}",
        atts[1]
    );
    // The store keeps the failed file's provider URL to retry it, but
    // agents never see it: not in the thread, and not in the list's
    // preview of the latest message, which shows it as the thread does.
    assert!(atts[1].get("source_url").is_none(), "{}", atts[1]);
    let (_, list) = app.get(ANNE, "/api/v1/interactions?view=all").await;
    assert_eq!(list["items"][0]["last_message"], i["messages"][0]);
    assert_eq!(list["items"][0]["messages"], json!([]));
    let id = atts[0]["id"].as_str().unwrap();
    let r = app
        .http
        .get(format!("{}/api/v1/attachments/{id}", app.url))
        .bearer_auth(ANNE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().to_vec(), b"jpeg-bytes".to_vec());
    // The Twilio media request carried Basic auth (api_base host).
    let got = app.twilio.received_requests().await.unwrap();
    assert!(got
        .iter()
        .any(|r| r.url.path() == media && r.headers.get("authorization").is_some()));
}

/// A reply that keeps failing transiently is given up after the configured time and shown failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_is_given_up_after_the_retry_window() {
    let app = TestApp::start_with(Backend::Embedded, "", |s| {
        s.server.delivery_give_up_seconds = 0
    })
    .await;
    Mock::given(method("POST"))
        .and(path(messages_path()))
        .respond_with(ResponseTemplate::new(503))
        .mount(&app.twilio)
        .await;
    app.sms_from("+14158675309", "hi", "SMg").await;
    let case = app.only_case().await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/replies"),
        json!({"text": "x"}),
    )
    .await;
    let i = app
        .wait_for(case, "failed", |i| i["messages"][1]["status"] == "failed")
        .await;
    assert!(
        i["messages"][1]["error"]
            .as_str()
            .unwrap()
            .starts_with("gave up after 1 attempts"),
        "{i}"
    );
    assert_eq!(i["status"], "open");
    let wanted = r#"switchboard_deliveries_total{kind="sms",outcome="failed"} 1"#;
    let mut m = String::new();
    for _ in 0..50 {
        m = app.metrics().await;
        if m.contains(wanted) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(m.contains(wanted), "{m}");
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
