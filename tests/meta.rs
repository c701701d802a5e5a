//! Black-box tests of the WhatsApp, Messenger and Instagram channels, with
//! wiremock serving Meta's Graph API in its documented shapes.

#[macro_use]
mod common;

use chrono::Utc;
use common::*;
use serde_json::{json, Value};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};

const PHONE_ID: &str = "1234567890";
const PAGE_ID: &str = "PAGE1";
const IG_ID: &str = "IG1";

fn meta_channels() -> String {
    format!(
        r#"
[[channels]]
id = "wa-main"
kind = "whatsapp"
queue = "support"
api_base = "{{provider}}/v25.0"
media_hosts = ["127.0.0.1"]
app_secret = "wa-secret"
app_secret_previous = "wa-old-secret"
verify_token = "wa-verify"
access_token = "wa-token"
phone_number_id = "{PHONE_ID}"

[[channels]]
id = "fb-main"
kind = "facebook"
queue = "support"
api_base = "{{provider}}/v25.0"
media_hosts = ["127.0.0.1"]
app_secret = "fb-secret"
verify_token = "fb-verify"
page_access_token = "fb-token"
page_id = "{PAGE_ID}"
human_agent_tag = true

[[channels]]
id = "ig-main"
kind = "instagram"
queue = "sales"
api_base = "{{provider}}/v25.0"
media_hosts = ["127.0.0.1"]
app_secret = "ig-secret"
verify_token = "ig-verify"
access_token = "ig-token"
ig_account_id = "{IG_ID}"
"#
    )
}

async fn start(b: Backend) -> TestApp {
    TestApp::start_with(b, &meta_channels(), |_| {}).await
}

async fn meta_post(app: &TestApp, channel: &str, secret: &str, body: &Value) -> (u16, String) {
    let raw = serde_json::to_vec(body).unwrap();
    let r = app
        .http
        .post(format!("{}/webhooks/{channel}", app.url))
        .header("content-type", "application/json")
        .header(
            "x-hub-signature-256",
            switchboard::adapters::meta::sign(secret, &raw),
        )
        .body(raw)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn wa_envelope(phone_number_id: &str, value: Value) -> Value {
    let mut v = value;
    v["messaging_product"] = json!("whatsapp");
    v["metadata"] =
        json!({"display_phone_number": "15550001234", "phone_number_id": phone_number_id});
    json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA1", "changes": [{"field": "messages", "value": v}]}]})
}

fn wa_text(from: &str, name: &str, id: &str, text: &str, ts: i64) -> Value {
    wa_envelope(
        PHONE_ID,
        json!({"contacts": [{"profile": {"name": name}, "wa_id": from}],
               "messages": [{"from": from, "id": id, "timestamp": ts.to_string(), "type": "text", "text": {"body": text}}]}),
    )
}

fn wa_status(wamid: &str, status: &str, to: &str) -> Value {
    wa_envelope(
        PHONE_ID,
        json!({"statuses": [{"id": wamid, "status": status, "timestamp": Utc::now().timestamp().to_string(), "recipient_id": to}]}),
    )
}

fn now() -> i64 {
    Utc::now().timestamp()
}

async fn list(app: &TestApp) -> Vec<Value> {
    let (s, v) = app.get(ANNE, "/api/v1/interactions?view=all").await;
    assert_eq!(s, 200, "{v}");
    v["items"].as_array().unwrap().clone()
}

async fn case_of(app: &TestApp, digital_id: &str) -> u64 {
    list(app)
        .await
        .iter()
        .find(|i| i["digital_id"] == digital_id)
        .unwrap_or_else(|| panic!("no interaction for {digital_id}"))["case_number"]
        .as_u64()
        .unwrap()
}

async fn graph_send_ok(app: &TestApp, path_: &str, answer: Value) {
    Mock::given(method("POST"))
        .and(path(path_.to_string()))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer))
        .mount(&app.twilio)
        .await;
}

on_both_stores!(
    whatsapp_text_becomes_an_interaction_once,
    whatsapp_batch_takes_every_element_and_ignores_other_numbers,
    whatsapp_phoneless_user_then_phone_joins_one_contact,
    whatsapp_reply_reaches_graph_and_statuses_never_go_back,
    messenger_echoes_and_watermarks,
);

/// Meta's subscription handshake is answered byte for byte, and only with the right token.
#[tokio::test]
async fn the_meta_handshake_echoes_the_challenge() {
    let app = start(Backend::Embedded).await;
    for (channel, token) in [
        ("wa-main", "wa-verify"),
        ("fb-main", "fb-verify"),
        ("ig-main", "ig-verify"),
    ] {
        let r = app
            .http
            .get(format!("{}/webhooks/{channel}?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token={token}", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        assert_eq!(r.text().await.unwrap(), "1158201444");
        let r = app
            .http
            .get(format!("{}/webhooks/{channel}?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=nope", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403);
        assert_eq!(
            r.json::<Value>().await.unwrap()["code"],
            "verify_token_mismatch"
        );
    }
}

/// A forged Meta signature is refused and stores nothing; the previous secret still works during rotation.
#[tokio::test]
async fn meta_signatures_are_enforced_with_rotation() {
    let app = start(Backend::Embedded).await;
    let body = wa_text("16315551181", "Kerry", "wamid.F1", "hi", now());
    let (s, b) = meta_post(&app, "wa-main", "not-the-secret", &body).await;
    assert_eq!(s, 401, "{b}");
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["code"],
        "invalid_signature"
    );
    let r = app
        .http
        .post(format!("{}/webhooks/fb-main", app.url))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(list(&app).await.is_empty());
    let (s, _) = meta_post(&app, "wa-main", "wa-old-secret", &body).await;
    assert_eq!(s, 200);
    assert_eq!(list(&app).await.len(), 1);
    // A correctly signed body that is not JSON is 400; a signed event we do not handle is 200 and ignored.
    let raw = b"not json".to_vec();
    let r = app
        .http
        .post(format!("{}/webhooks/wa-main", app.url))
        .header("content-type", "application/json")
        .header(
            "x-hub-signature-256",
            switchboard::adapters::meta::sign("wa-secret", &raw),
        )
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        "malformed_payload"
    );
    let other = json!({"object": "whatsapp_business_account", "entry": [{"id": "WABA1", "changes": [{"field": "account_update", "value": {"event": "VERIFIED_ACCOUNT"}}]}]});
    assert_eq!(meta_post(&app, "wa-main", "wa-secret", &other).await.0, 200);
    assert_eq!(list(&app).await.len(), 1);
}

/// A WhatsApp text becomes an interaction with the profile name, once however often Meta retries.
async fn whatsapp_text_becomes_an_interaction_once(b: Backend) {
    let app = start(b).await;
    let body = wa_text(
        "16315551181",
        "Kerry Fisher",
        "wamid.HBgL1",
        "Hello from WhatsApp \u{e4}",
        now(),
    );
    for _ in 0..3 {
        assert_eq!(meta_post(&app, "wa-main", "wa-secret", &body).await.0, 200);
    }
    let case = case_of(&app, "16315551181").await;
    let i = app.interaction(case).await;
    assert_eq!(i["channel"], json!({"id": "wa-main", "kind": "whatsapp"}));
    assert_eq!(i["contact"]["name"], "Kerry Fisher");
    assert_eq!(i["messages"].as_array().unwrap().len(), 1);
    assert_eq!(i["messages"][0]["text"], "Hello from WhatsApp \u{e4}");
    assert_eq!(i["window"]["open"], true);
    assert!(i["window"]["closes_at"].is_string());
}

/// Every entry, change and message of a batch is taken; another number's entry is ignored.
async fn whatsapp_batch_takes_every_element_and_ignores_other_numbers(b: Backend) {
    let app = start(b).await;
    let t = now().to_string();
    let mine = |msgs: Value, contacts: Value| {
        json!({"field": "messages", "value": {"messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001234", "phone_number_id": PHONE_ID},
            "contacts": contacts, "messages": msgs}})
    };
    let body = json!({"object": "whatsapp_business_account", "entry": [
        {"id": "WABA1", "changes": [
            mine(json!([
                {"from": "16315550001", "id": "wamid.B1", "timestamp": t, "type": "text", "text": {"body": "one"}},
                {"from": "16315550002", "id": "wamid.B2", "timestamp": t, "type": "text", "text": {"body": "two"}}
            ]), json!([{"profile": {"name": "A"}, "wa_id": "16315550001"}, {"profile": {"name": "B"}, "wa_id": "16315550002"}]))
        ]},
        {"id": "WABA1", "changes": [
            mine(json!([{"from": "16315550001", "id": "wamid.B3", "timestamp": t, "type": "text", "text": {"body": "three"}}]),
                 json!([{"profile": {"name": "A"}, "wa_id": "16315550001"}])),
            {"field": "messages", "value": {"messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15559999999", "phone_number_id": "OTHER"},
                "messages": [{"from": "16315550003", "id": "wamid.B4", "timestamp": t, "type": "text", "text": {"body": "not ours"}}]}}
        ]}
    ]});
    assert_eq!(meta_post(&app, "wa-main", "wa-secret", &body).await.0, 200);
    let items = list(&app).await;
    assert_eq!(items.len(), 2, "{items:?}");
    let a = app.interaction(case_of(&app, "16315550001").await).await;
    let texts: Vec<&str> = a["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec!["one", "three"]);
}

/// A user with a username and no phone is keyed by the business-scoped ID; when the number comes too, both stay on one contact.
async fn whatsapp_phoneless_user_then_phone_joins_one_contact(b: Backend) {
    let app = start(b).await;
    let t = now().to_string();
    let phoneless = wa_envelope(
        PHONE_ID,
        json!({"contacts": [{"profile": {"name": "Kim", "username": "kimk"}, "user_id": "US.13491208655302741918"}],
               "messages": [{"from_user_id": "US.13491208655302741918", "id": "wamid.U1", "timestamp": t, "type": "text", "text": {"body": "no number"}}]}),
    );
    assert_eq!(
        meta_post(&app, "wa-main", "wa-secret", &phoneless).await.0,
        200
    );
    let case = case_of(&app, "US.13491208655302741918").await;
    let both = wa_envelope(
        PHONE_ID,
        json!({"contacts": [{"profile": {"name": "Kim"}, "wa_id": "16315557777", "user_id": "US.13491208655302741918"}],
               "messages": [{"from": "16315557777", "from_user_id": "US.13491208655302741918", "id": "wamid.U2", "timestamp": t, "type": "text", "text": {"body": "now with number"}}]}),
    );
    assert_eq!(meta_post(&app, "wa-main", "wa-secret", &both).await.0, 200);
    let items = list(&app).await;
    assert_eq!(items.len(), 1, "one contact, one interaction: {items:?}");
    let i = app.interaction(case).await;
    assert_eq!(i["messages"].as_array().unwrap().len(), 2);
    // And a message with only the number now joins too.
    let phone_only = wa_text("16315557777", "Kim", "wamid.U3", "just the number", now());
    assert_eq!(
        meta_post(&app, "wa-main", "wa-secret", &phone_only).await.0,
        200
    );
    assert_eq!(list(&app).await.len(), 1);
    assert_eq!(
        app.interaction(case).await["messages"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

/// The reply reaches the Graph API in the documented shape; statuses arriving out of order never move it back.
async fn whatsapp_reply_reaches_graph_and_statuses_never_go_back(b: Backend) {
    let app = start(b).await;
    graph_send_ok(
        &app,
        &format!("/v25.0/{PHONE_ID}/messages"),
        json!({"messaging_product": "whatsapp", "contacts": [{"input": "16315551181", "wa_id": "16315551181"}], "messages": [{"id": "wamid.OUT1"}]}),
    )
    .await;
    meta_post(
        &app,
        "wa-main",
        "wa-secret",
        &wa_text("16315551181", "Kerry", "wamid.IN1", "where is it?", now()),
    )
    .await;
    let case = case_of(&app, "16315551181").await;
    let in_id = app.interaction(case).await["messages"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
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
            json!({"text": "On its way", "reply_to": in_id}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let i = app
        .wait_for(case, "sent", |i| i["messages"][1]["status"] == "sent")
        .await;
    assert_eq!(i["messages"][1]["provider_id"], "wamid.OUT1");
    let got = app.twilio.received_requests().await.unwrap();
    let send = got
        .iter()
        .find(|r| r.url.path() == format!("/v25.0/{PHONE_ID}/messages"))
        .unwrap();
    assert_eq!(
        send.headers.get("authorization").unwrap(),
        "Bearer wa-token"
    );
    let body: Value = serde_json::from_slice(&send.body).unwrap();
    assert_eq!(body["messaging_product"], "whatsapp");
    assert_eq!(body["to"], "16315551181");
    assert_eq!(body["type"], "text");
    assert_eq!(body["text"]["body"], "On its way");
    assert_eq!(body["context"]["message_id"], "wamid.IN1");
    for st in ["read", "delivered", "sent"] {
        assert_eq!(
            meta_post(
                &app,
                "wa-main",
                "wa-secret",
                &wa_status("wamid.OUT1", st, "16315551181")
            )
            .await
            .0,
            200
        );
    }
    assert_eq!(app.interaction(case).await["messages"][1]["status"], "read");
    // A reaction to our message is stored on it.
    let reaction = wa_envelope(
        PHONE_ID,
        json!({"contacts": [{"profile": {"name": "Kerry"}, "wa_id": "16315551181"}],
               "messages": [{"from": "16315551181", "id": "wamid.R1", "timestamp": now().to_string(), "type": "reaction",
                             "reaction": {"message_id": "wamid.OUT1", "emoji": "\u{1f44d}"}}]}),
    );
    assert_eq!(
        meta_post(&app, "wa-main", "wa-secret", &reaction).await.0,
        200
    );
    let i = app.interaction(case).await;
    assert_eq!(
        i["messages"].as_array().unwrap().len(),
        2,
        "a reaction is not a message"
    );
    assert_eq!(i["messages"][1]["reactions"][0]["emoji"], "\u{1f44d}");
}

/// Outside the 24-hour window a WhatsApp reply is refused before any Graph call.
#[tokio::test]
async fn whatsapp_window_closed_is_refused_before_sending() {
    let app = start(Backend::Embedded).await;
    let old = now() - 25 * 3600;
    meta_post(
        &app,
        "wa-main",
        "wa-secret",
        &wa_text("16315551181", "Kerry", "wamid.OLD", "old", old),
    )
    .await;
    let case = case_of(&app, "16315551181").await;
    let i = app.interaction(case).await;
    assert_eq!(i["window"]["open"], false);
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
            json!({"text": "sorry"}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (422, Some("window_closed")), "{v}");
    assert!(app.twilio.received_requests().await.unwrap().is_empty());
}

/// Graph error codes decide what happens: 131047 fails as window closed, 190 flags the channel, 130429 is retried.
#[tokio::test]
async fn whatsapp_error_codes_are_mapped() {
    let app = start(Backend::Embedded).await;
    Mock::given(method("POST"))
        .and(path(format!("/v25.0/{PHONE_ID}/messages")))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {"message": "Re-engagement message", "type": "OAuthException",
            "code": 131047, "error_data": {"messaging_product": "whatsapp", "details": "Message failed to send because more than 24 hours have passed"},
            "fbtrace_id": "A1"}})))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.twilio)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("/v25.0/{PHONE_ID}/messages")))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"error": {"message": "Error validating access token", "type": "OAuthException", "code": 190, "fbtrace_id": "A2"}})))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&app.twilio)
        .await;
    meta_post(
        &app,
        "wa-main",
        "wa-secret",
        &wa_text("16315551181", "Kerry", "wamid.E1", "hi", now()),
    )
    .await;
    let case = case_of(&app, "16315551181").await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/replies"),
        json!({"text": "first"}),
    )
    .await;
    let i = app
        .wait_for(case, "failed", |i| i["messages"][1]["status"] == "failed")
        .await;
    let err = i["messages"][1]["error"].as_str().unwrap();
    assert!(err.contains("131047") && err.contains("24 hours"), "{err}");
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/replies"),
        json!({"text": "second"}),
    )
    .await;
    app.wait_for(case, "failed", |i| i["messages"][2]["status"] == "failed")
        .await;
    let r: Value = app
        .http
        .get(format!("{}/readyz", app.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["channels"]["wa-main"], "needs_reauth");
    assert_eq!(
        r["status"], "ready",
        "channels being unhealthy does not make the gateway unready"
    );
    let m = app.metrics().await;
    assert!(
        m.contains(r#"switchboard_channels_unhealthy{kind="whatsapp",state="needs_reauth"} 1"#),
        "{m}"
    );
}

/// WhatsApp media is fetched by ID, then from its short-lived URL with the bearer token, and stored.
#[tokio::test]
async fn whatsapp_media_is_downloaded_by_id() {
    let app = start(Backend::Embedded).await;
    let media_url = format!(
        "{}/lookaside/whatsapp_business/attachments/?mid=MEDIA1&ext=1&hash=abc",
        app.twilio.uri()
    );
    Mock::given(method("GET"))
        .and(path("/v25.0/MEDIA1"))
        .and(header("authorization", "Bearer wa-token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"messaging_product": "whatsapp", "url": media_url,
            "mime_type": "image/jpeg", "sha256": "x", "file_size": 9, "id": "MEDIA1"})),
        )
        .mount(&app.twilio)
        .await;
    Mock::given(method("GET"))
        .and(path("/lookaside/whatsapp_business/attachments/"))
        .and(header("authorization", "Bearer wa-token"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "image/jpeg")
                .set_body_bytes(b"jpegbytes".to_vec()),
        )
        .mount(&app.twilio)
        .await;
    let body = wa_envelope(
        PHONE_ID,
        json!({"contacts": [{"profile": {"name": "Kerry"}, "wa_id": "16315551181"}],
               "messages": [
                 {"from": "16315551181", "id": "wamid.M1", "timestamp": now().to_string(), "type": "image",
                  "image": {"caption": "my receipt", "mime_type": "image/jpeg", "sha256": "x", "id": "MEDIA1"}},
                 {"from": "16315551181", "id": "wamid.M2", "timestamp": now().to_string(), "type": "document",
                  "document": {"filename": "gone.pdf", "mime_type": "application/pdf", "sha256": "y", "id": "MISSING"}}]}),
    );
    assert_eq!(meta_post(&app, "wa-main", "wa-secret", &body).await.0, 200);
    let case = case_of(&app, "16315551181").await;
    let i = app.interaction(case).await;
    let a = &i["messages"][0]["attachments"][0];
    assert_eq!(a["state"], "stored", "{i}");
    assert_eq!(a["size"], 9);
    assert_eq!(i["messages"][0]["text"], "my receipt");
    let failed = &i["messages"][1]["attachments"][0];
    assert_eq!(failed["state"], "failed", "{i}");
    let got = app.twilio.received_requests().await.unwrap();
    let resolve = got
        .iter()
        .find(|r| r.url.path() == "/v25.0/MEDIA1")
        .unwrap();
    assert!(
        resolve
            .url
            .query()
            .unwrap_or("")
            .find("phone_number_id")
            .is_none(),
        "inbound media is fetched without phone_number_id"
    );
    let id = a["id"].as_str().unwrap();
    let r = app
        .http
        .get(format!("{}/api/v1/attachments/{id}", app.url))
        .bearer_auth(ANNE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().to_vec(), b"jpegbytes".to_vec());
}

fn fb_event(object: &str, entry_id: &str, events: Value) -> Value {
    json!({"object": object, "entry": [{"id": entry_id, "time": Utc::now().timestamp_millis(), "messaging": events}]})
}

fn fb_text(sender: &str, recipient: &str, mid: &str, text: &str, ts_ms: i64) -> Value {
    json!({"sender": {"id": sender}, "recipient": {"id": recipient}, "timestamp": ts_ms, "message": {"mid": mid, "text": text}})
}

/// Messenger: our echo is matched (never a customer message), a Page-inbox echo is recorded as outbound,
/// and delivery/read watermarks move our messages forward.
async fn messenger_echoes_and_watermarks(b: Backend) {
    let app = start(b).await;
    graph_send_ok(
        &app,
        &format!("/v25.0/{PAGE_ID}/messages"),
        json!({"recipient_id": "PSID1", "message_id": "m_OUT1"}),
    )
    .await;
    let ms = Utc::now().timestamp_millis();
    let (s, _) = meta_post(
        &app,
        "fb-main",
        "fb-secret",
        &fb_event(
            "page",
            PAGE_ID,
            json!([fb_text("PSID1", PAGE_ID, "m_IN1", "hello page", ms)]),
        ),
    )
    .await;
    assert_eq!(s, 200);
    let case = case_of(&app, "PSID1").await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/replies"),
        json!({"text": "hello customer"}),
    )
    .await;
    let i = app
        .wait_for(case, "sent", |i| i["messages"][1]["status"] == "sent")
        .await;
    let our_id = i["messages"][1]["id"].as_str().unwrap().to_string();
    let send = app
        .twilio
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.url.path() == format!("/v25.0/{PAGE_ID}/messages"))
        .unwrap();
    let body: Value = serde_json::from_slice(&send.body).unwrap();
    assert_eq!(body["recipient"]["id"], "PSID1");
    assert_eq!(body["messaging_type"], "RESPONSE");
    assert_eq!(body["message"]["text"], "hello customer");
    let echo = json!({"sender": {"id": PAGE_ID}, "recipient": {"id": "PSID1"}, "timestamp": ms + 10,
        "message": {"is_echo": true, "app_id": 1517, "metadata": our_id, "mid": "m_OUT1", "text": "hello customer"}});
    let inbox = json!({"sender": {"id": PAGE_ID}, "recipient": {"id": "PSID1"}, "timestamp": ms + 20,
        "message": {"is_echo": true, "app_id": 263902037430900_i64, "mid": "m_INBOX1", "text": "typed in the Page inbox"}});
    assert_eq!(
        meta_post(
            &app,
            "fb-main",
            "fb-secret",
            &fb_event("page", PAGE_ID, json!([echo, inbox]))
        )
        .await
        .0,
        200
    );
    let i = app.interaction(case).await;
    let msgs = i["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 3, "{i}");
    assert!(
        msgs.iter()
            .all(|m| m["direction"] == "outbound" || m["text"] == "hello page"),
        "an echo is never a customer message"
    );
    assert_eq!(msgs[2]["text"], "typed in the Page inbox");
    assert_eq!(msgs[2]["status"], "sent");
    assert_eq!(i["status"], "resolved", "echoes do not reopen");
    let delivery = json!({"sender": {"id": "PSID1"}, "recipient": {"id": PAGE_ID}, "delivery": {"mids": ["m_OUT1"], "watermark": ms + 100}});
    meta_post(
        &app,
        "fb-main",
        "fb-secret",
        &fb_event("page", PAGE_ID, json!([delivery])),
    )
    .await;
    assert_eq!(
        app.interaction(case).await["messages"][1]["status"],
        "delivered"
    );
    let read = json!({"sender": {"id": "PSID1"}, "recipient": {"id": PAGE_ID}, "timestamp": ms + 200, "read": {"watermark": Utc::now().timestamp_millis() + 1000}});
    meta_post(
        &app,
        "fb-main",
        "fb-secret",
        &fb_event("page", PAGE_ID, json!([read])),
    )
    .await;
    assert_eq!(app.interaction(case).await["messages"][1]["status"], "read");
}

/// Past 24 hours Messenger sends with the HUMAN_AGENT tag (when the channel enables it); past 7 days it is refused.
#[tokio::test]
async fn messenger_human_agent_tag_extends_the_window() {
    let app = start(Backend::Embedded).await;
    graph_send_ok(
        &app,
        &format!("/v25.0/{PAGE_ID}/messages"),
        json!({"recipient_id": "PSID2", "message_id": "m_OUT2"}),
    )
    .await;
    let day_and_more = Utc::now().timestamp_millis() - 30 * 3600 * 1000;
    meta_post(
        &app,
        "fb-main",
        "fb-secret",
        &fb_event(
            "page",
            PAGE_ID,
            json!([fb_text("PSID2", PAGE_ID, "m_H1", "late", day_and_more)]),
        ),
    )
    .await;
    let case = case_of(&app, "PSID2").await;
    let i = app.interaction(case).await;
    assert_eq!(i["window"]["open"], true);
    assert_eq!(i["window"]["tag"], "HUMAN_AGENT");
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
            json!({"text": "sorry for the wait"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    app.wait_for(case, "sent", |i| i["messages"][1]["status"] == "sent")
        .await;
    let send = app
        .twilio
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.url.path() == format!("/v25.0/{PAGE_ID}/messages"))
        .unwrap();
    let body: Value = serde_json::from_slice(&send.body).unwrap();
    assert_eq!(body["messaging_type"], "MESSAGE_TAG");
    assert_eq!(body["tag"], "HUMAN_AGENT");
    let week_and_more = Utc::now().timestamp_millis() - 8 * 24 * 3600 * 1000;
    meta_post(
        &app,
        "fb-main",
        "fb-secret",
        &fb_event(
            "page",
            PAGE_ID,
            json!([fb_text(
                "PSID3",
                PAGE_ID,
                "m_H2",
                "very late",
                week_and_more
            )]),
        ),
    )
    .await;
    let case = case_of(&app, "PSID3").await;
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
    assert_eq!((s, v["code"].as_str()), (422, Some("window_closed")), "{v}");
}

/// Instagram: text over 1000 bytes is refused; unsent messages are marked retracted; a story mention keeps its media.
#[tokio::test]
async fn instagram_limits_retractions_and_story_mentions() {
    let app = start(Backend::Embedded).await;
    Mock::given(method("GET"))
        .and(path("/cdn/story.jpg"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "image/jpeg")
                .set_body_bytes(b"story".to_vec()),
        )
        .mount(&app.twilio)
        .await;
    let ms = Utc::now().timestamp_millis();
    let story = json!({"sender": {"id": "IGSID1"}, "recipient": {"id": IG_ID}, "timestamp": ms,
        "message": {"mid": "ig_m1", "attachments": [{"type": "story_mention", "payload": {"url": format!("{}/cdn/story.jpg", app.twilio.uri())}}]}});
    let text = json!({"sender": {"id": "IGSID1"}, "recipient": {"id": IG_ID}, "timestamp": ms + 1, "message": {"mid": "ig_m2", "text": "oops"}});
    assert_eq!(
        meta_post(
            &app,
            "ig-main",
            "ig-secret",
            &fb_event("instagram", IG_ID, json!([story, text]))
        )
        .await
        .0,
        200
    );
    let case = case_of(&app, "IGSID1").await;
    let i = app.interaction(case).await;
    assert_eq!(i["queue"], "sales");
    assert_eq!(i["messages"][0]["attachments"][0]["state"], "stored", "{i}");
    assert_eq!(i["messages"][0]["kind"], "story_mention");
    let deleted = json!({"sender": {"id": "IGSID1"}, "recipient": {"id": IG_ID}, "timestamp": ms + 2, "message": {"mid": "ig_m2", "is_deleted": true}});
    assert_eq!(
        meta_post(
            &app,
            "ig-main",
            "ig-secret",
            &fb_event("instagram", IG_ID, json!([deleted]))
        )
        .await
        .0,
        200
    );
    let i = app.interaction(case).await;
    assert_eq!(i["messages"][1]["retracted"], true);
    assert_eq!(i["messages"].as_array().unwrap().len(), 2);
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
            json!({"text": "\u{e9}".repeat(501)}),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str(), v["field"].as_str()),
        (422, Some("validation_failed"), Some("text")),
        "{v}"
    );
    assert!(app
        .twilio
        .received_requests()
        .await
        .unwrap()
        .iter()
        .all(|r| r.method.as_str() == "GET"));
}

/// A failed media download stays visible as failed and an agent can retry it once the provider answers.
#[tokio::test]
async fn a_failed_media_download_can_be_retried() {
    let app = start(Backend::Embedded).await;
    let media_url = format!("{}/lookaside/retry.jpg", app.twilio.uri());
    Mock::given(method("GET"))
        .and(path("/v25.0/MEDIA9"))
        .respond_with(
            ResponseTemplate::new(500)
                .set_body_json(json!({"error": {"message": "temporary", "code": 2}})),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.twilio)
        .await;
    Mock::given(method("GET"))
        .and(path("/v25.0/MEDIA9"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(
                json!({"url": media_url, "mime_type": "image/jpeg", "id": "MEDIA9"}),
            ),
        )
        .mount(&app.twilio)
        .await;
    Mock::given(method("GET"))
        .and(path("/lookaside/retry.jpg"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "image/jpeg")
                .set_body_bytes(b"second time".to_vec()),
        )
        .mount(&app.twilio)
        .await;
    let body = wa_envelope(
        PHONE_ID,
        json!({"contacts": [{"profile": {"name": "Kerry"}, "wa_id": "16315551181"}],
               "messages": [{"from": "16315551181", "id": "wamid.RT1", "timestamp": now().to_string(), "type": "image",
                             "image": {"mime_type": "image/jpeg", "sha256": "x", "id": "MEDIA9"}}]}),
    );
    assert_eq!(meta_post(&app, "wa-main", "wa-secret", &body).await.0, 200);
    let case = case_of(&app, "16315551181").await;
    let att = app.interaction(case).await["messages"][0]["attachments"][0].clone();
    assert_eq!(att["state"], "failed");
    let id = att["id"].as_str().unwrap();
    let (s, v) = app
        .post(CAROL, &format!("/api/v1/attachments/{id}/retry"), json!({}))
        .await;
    assert_eq!((s, v["code"].as_str()), (403, Some("not_permitted")));
    let (s, v) = app
        .post(ANNE, &format!("/api/v1/attachments/{id}/retry"), json!({}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "stored");
    let a = &app.interaction(case).await["messages"][0]["attachments"][0];
    assert_eq!(
        (a["id"].as_str(), a["state"].as_str(), a["size"].as_u64()),
        (Some(id), Some("stored"), Some(11))
    );
    let r = app
        .http
        .get(format!("{}/api/v1/attachments/{id}", app.url))
        .bearer_auth(ANNE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().to_vec(), b"second time".to_vec());
    let (s, v) = app
        .post(ANNE, &format!("/api/v1/attachments/{id}/retry"), json!({}))
        .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("invalid_transition")));
    assert!(app
        .events()
        .await
        .iter()
        .any(|e| e["type"] == "message.updated"));
}
