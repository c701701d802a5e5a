//! Black-box tests of the X direct-message channel, with wiremock as the X API.

#[macro_use]
mod common;

use chrono::Utc;
use common::*;
use serde_json::{json, Value};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};

const OUR_ID: &str = "1349812765430517760";
const SECRET: &str = "x-consumer-secret";

fn x_channel() -> String {
    format!(
        r#"
[[channels]]
id = "x-main"
kind = "twitter"
queue = "support"
api_base = "{{provider}}"
media_hosts = ["127.0.0.1"]
consumer_secret = "{SECRET}"
user_id = "{OUR_ID}"
access_token = "x-user-token"
"#
    )
}

async fn x_post(app: &TestApp, body: &Value) -> (u16, String) {
    let raw = serde_json::to_vec(body).unwrap();
    let r = app
        .http
        .post(format!("{}/webhooks/x-main", app.url))
        .header("content-type", "application/json")
        .header(
            "x-twitter-webhooks-signature",
            switchboard::adapters::twitter::sign(SECRET, &raw),
        )
        .body(raw)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn dm(id: &str, sender: &str, recipient: &str, text: &str) -> Value {
    json!({"type": "message_create", "id": id, "created_timestamp": Utc::now().timestamp_millis().to_string(),
        "message_create": {"target": {"recipient_id": recipient}, "sender_id": sender, "message_data": {"text": text, "entities": {}}}})
}

fn body(events: Vec<Value>) -> Value {
    json!({"for_user_id": OUR_ID, "direct_message_events": events,
        "users": {"2874619305": {"id": "2874619305", "name": "Kerry Lindqvist", "screen_name": "kerry_lq"},
                  OUR_ID: {"id": OUR_ID, "name": "Support", "screen_name": "support"}}})
}

on_both_stores!(an_x_dm_reaches_the_agent_and_the_reply_reaches_x);

/// A DM becomes an interaction keyed by the numeric user ID; the agent's reply goes to X API v2,
/// and X's echo of it is matched, never a customer message.
async fn an_x_dm_reaches_the_agent_and_the_reply_reaches_x(b: Backend) {
    let app = TestApp::start_with(b, &x_channel(), |_| {}).await;
    Mock::given(method("POST"))
        .and(path("/2/dm_conversations/with/2874619305/messages"))
        .and(header("authorization", "Bearer x-user-token"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"data": {"dm_conversation_id": format!("2874619305-{OUR_ID}"), "dm_event_id": "1861149375081239999"}})))
        .mount(&app.twilio)
        .await;
    let (s, _) = x_post(
        &app,
        &body(vec![dm(
            "1861149375081234401",
            "2874619305",
            OUR_ID,
            "Where is order 4471?",
        )]),
    )
    .await;
    assert_eq!(s, 200);
    // X retries: the same event ID is stored once.
    x_post(
        &app,
        &body(vec![dm(
            "1861149375081234401",
            "2874619305",
            OUR_ID,
            "Where is order 4471?",
        )]),
    )
    .await;
    let case = app.only_case().await;
    let i = app.interaction(case).await;
    assert_eq!(i["digital_id"], "2874619305");
    assert_eq!(i["contact"]["name"], "Kerry Lindqvist");
    assert_eq!(i["messages"].as_array().unwrap().len(), 1);
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
            json!({"text": "It left the depot today"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let i = app
        .wait_for(case, "sent", |i| i["messages"][1]["status"] == "sent")
        .await;
    assert_eq!(i["messages"][1]["provider_id"], "1861149375081239999");
    let sent = app.twilio.received_requests().await.unwrap();
    let req = sent
        .iter()
        .find(|r| r.url.path().starts_with("/2/dm_conversations"))
        .unwrap();
    let sent_body: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(sent_body["text"], "It left the depot today");
    // The echo of our own DM.
    let (s, _) = x_post(
        &app,
        &body(vec![dm(
            "1861149375081239999",
            OUR_ID,
            "2874619305",
            "It left the depot today",
        )]),
    )
    .await;
    assert_eq!(s, 200);
    let i = app.interaction(case).await;
    assert_eq!(
        i["messages"].as_array().unwrap().len(),
        2,
        "our echo is not a new message: {i}"
    );
    assert_eq!(i["status"], "resolved");
}

/// The CRC check answers X's challenge with the documented HMAC; forged POSTs are refused.
#[tokio::test]
async fn the_crc_check_and_signatures() {
    let app = TestApp::start_with(Backend::Embedded, &x_channel(), |_| {}).await;
    let r = app
        .http
        .get(format!(
            "{}/webhooks/x-main?crc_token=challenge_string",
            app.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["response_token"],
        switchboard::adapters::twitter::crc_response(SECRET, "challenge_string")
    );
    assert_eq!(
        switchboard::adapters::twitter::crc_response("TEST_CONSUMER_SECRET", "challenge_string"),
        "sha256=up1n6pdhR9u5Q3J9tQx1h/D3GpBw+nRvrCiWJWPFY8E="
    );
    let raw = serde_json::to_vec(&body(vec![dm("1", "2874619305", OUR_ID, "forged")])).unwrap();
    let r = app
        .http
        .post(format!("{}/webhooks/x-main", app.url))
        .header("content-type", "application/json")
        .header(
            "x-twitter-webhooks-signature",
            switchboard::adapters::twitter::sign("wrong", &raw),
        )
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        "invalid_signature"
    );
    let (_, list) = app.get(ANNE, "/api/v1/interactions?view=all").await;
    assert_eq!(list["items"], json!([]));
}

/// Typing becomes a live event (no message), and a revoked authorization flags the channel.
#[tokio::test]
async fn typing_and_revocation() {
    let app = TestApp::start_with(Backend::Embedded, &x_channel(), |_| {}).await;
    x_post(
        &app,
        &body(vec![dm(
            "1861149375081234401",
            "2874619305",
            OUR_ID,
            "hello",
        )]),
    )
    .await;
    let typing = json!({"for_user_id": OUR_ID, "direct_message_indicate_typing_events": [
        {"created_timestamp": Utc::now().timestamp_millis().to_string(), "sender_id": "2874619305", "target": {"recipient_id": OUR_ID}}]});
    assert_eq!(x_post(&app, &typing).await.0, 200);
    let case = app.only_case().await;
    assert_eq!(
        app.interaction(case).await["messages"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(app
        .events()
        .await
        .iter()
        .any(|e| e["type"] == "interaction.typing" && e["data"]["who"] == "customer"));
    let revoke = json!({"for_user_id": OUR_ID, "user_event": {"revoke": {"date_time": "2026-11-25T10:00:00.000Z",
        "target": {"app_id": "13090192"}, "source": {"user_id": OUR_ID}}}});
    assert_eq!(x_post(&app, &revoke).await.0, 200);
    let r: Value = app
        .http
        .get(format!("{}/readyz", app.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["channels"]["x-main"], "needs_reauth");
}
