//! Web chat, black-box: the visitor's HTTP routes and WebSocket against the
//! real application, the agent's side through the agent API.

#[macro_use]
mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The identity secret and the providers.md appendix vector 12 for it.
const IDENTITY_SECRET: &str = "secret";
const VECTOR_IDENTIFIER: &str = "Message";
const VECTOR_HASH: &str = "aa747c502a898200f9e4fa21bac68136f886a0e27aec70ba06daf2e2a5cb5597";
const SHOP: &str = "https://shop.example";
const EVIL: &str = "https://evil.example";

fn chat_channels() -> String {
    format!(
        r#"
[[channels]]
id = "chat-main"
kind = "chat"
name = "Web chat"
queue = "support"
allowed_origins = ["{SHOP}"]
identity_secret = "{IDENTITY_SECRET}"
attachment_types = ["image/*", "application/pdf", "text/plain"]

[[channels]]
id = "chat-slow"
kind = "chat"
queue = "support"
allowed_origins = ["{SHOP}"]
messages_per_minute = 3
"#
    )
}

async fn start(b: Backend) -> TestApp {
    TestApp::start_with(b, &chat_channels(), |_| {}).await
}

/// Answers with status, body and headers.
async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    token: Option<&str>,
    origin: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut rb = app
        .http
        .request(method.parse().unwrap(), format!("{}{path}", app.url));
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    if let Some(o) = origin {
        rb = rb.header("Origin", o);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap_or(Value::Null), headers)
}

/// A new session on `channel`: `(session_id, token)`.
async fn session(app: &TestApp, channel: &str, body: Value) -> (String, String) {
    let (s, v, _) = call(
        app,
        "POST",
        &format!("/chat/{channel}/sessions"),
        None,
        Some(SHOP),
        Some(body),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    (
        v["session_id"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}

async fn post_message(
    app: &TestApp,
    channel: &str,
    token: &str,
    cmid: &str,
    text: &str,
) -> (u16, Value) {
    let (s, v, _) = call(
        app,
        "POST",
        &format!("/chat/{channel}/messages"),
        Some(token),
        None,
        Some(json!({"client_message_id": cmid, "text": text})),
    )
    .await;
    (s, v)
}

/// The interactions of a chat channel, as Anne sees them.
async fn chat_cases(app: &TestApp, channel: &str) -> Vec<Value> {
    let (s, v) = app.get(ANNE, "/api/v1/interactions?view=all").await;
    assert_eq!(s, 200, "{v}");
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["channel"]["id"] == channel)
        .cloned()
        .collect()
}

async fn case_of(app: &TestApp, digital_id: &str) -> u64 {
    for _ in 0..100 {
        if let Some(i) = chat_cases(app, "chat-main")
            .await
            .into_iter()
            .find(|i| i["digital_id"] == digital_id)
        {
            return i["case_number"].as_u64().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no interaction for {digital_id}");
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A visitor's socket, as a test drives it.
struct Ws {
    s: WsStream,
    /// The `ready` frame the gateway greeted it with.
    ready: Value,
}

fn ws_url(app: &TestApp, channel: &str, token: &str, query: &str) -> String {
    format!(
        "{}/chat/{channel}/ws?token={token}{query}",
        app.url.replacen("http", "ws", 1)
    )
}

/// Opens a socket; `Err(status)` when the upgrade is refused.
async fn try_ws(url: &str, origin: Option<&str>) -> Result<Ws, (u16, Value)> {
    let mut req = url.into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((s, _)) => {
            let mut ws = Ws {
                s,
                ready: Value::Null,
            };
            ws.ready = ws.until("the ready frame", |f| f["type"] == "ready").await;
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((resp.status().as_u16(), body))
        }
        Err(e) => panic!("the socket did not open: {e}"),
    }
}

async fn ws(app: &TestApp, channel: &str, token: &str) -> Ws {
    try_ws(&ws_url(app, channel, token, ""), Some(SHOP))
        .await
        .unwrap_or_else(|e| panic!("refused: {e:?}"))
}

impl Ws {
    async fn send(&mut self, v: Value) {
        self.s.send(WsMessage::text(v.to_string())).await.unwrap();
    }

    /// The next JSON frame, or `None` when none comes within `wait`.
    async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.s.next()).await {
                Err(_) => return None,
                Ok(None) => panic!("the socket closed"),
                Ok(Some(Err(e))) => panic!("socket error: {e}"),
                Ok(Some(Ok(WsMessage::Text(t)))) => return Some(serde_json::from_str(&t).unwrap()),
                Ok(Some(Ok(WsMessage::Close(c)))) => panic!("the socket closed: {c:?}"),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Reads frames until one matches (others are skipped), or panics after 15 s.
    async fn until(&mut self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Some(v) if f(&v) => return v,
                Some(_) => continue,
                None => panic!("timed out waiting for {what}"),
            }
        }
    }

    async fn message(&mut self, cmid: &str, text: &str) -> Value {
        self.send(json!({"type": "message", "client_message_id": cmid, "text": text}))
            .await;
        self.until(&format!("the ack of {cmid}"), |f| {
            (f["type"] == "ack" || f["type"] == "error") && f["client_message_id"] == cmid
        })
        .await
    }
}

on_both_stores!(
    a_visitor_message_reaches_an_agent_and_the_reply_comes_back_live,
    a_resent_client_message_id_is_stored_once_with_the_same_ack,
    reconnect_and_resume_replays_missed_messages_in_order,
);

/// The heart of web chat: what the visitor writes lands on the agents'
/// queue, and the agent's reply and typing appear in the visitor's socket
/// without polling. If it fails, visitors talk to nobody.
async fn a_visitor_message_reaches_an_agent_and_the_reply_comes_back_live(b: Backend) {
    let app = start(b).await;
    let (sid, token) = session(&app, "chat-main", json!({"name": "Kerry"})).await;
    let mut ws = ws(&app, "chat-main", &token).await;
    assert_eq!(ws.ready["session_id"], sid.as_str());
    assert_eq!(ws.ready["last_seq"], 0);
    let ack = ws.message("c-1", "Where is my order?").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["seq"], 1);
    let mid = ack["message_id"].as_str().unwrap().to_string();
    // The visitor's own message comes back as a message frame too (other tabs see it).
    let echo = ws
        .until("the visitor's message", |f| f["type"] == "message")
        .await;
    assert_eq!(echo["message"]["id"], mid.as_str());
    assert_eq!(echo["message"]["direction"], "inbound");

    let case = case_of(&app, &sid).await;
    let i = app.interaction(case).await;
    assert_eq!(i["status"], "new");
    assert_eq!(i["queue"], "support");
    assert_eq!(i["channel"], json!({"id": "chat-main", "kind": "chat"}));
    assert_eq!(i["contact"]["name"], "Kerry");
    assert_eq!(i["messages"][0]["id"], mid.as_str());
    assert_eq!(i["messages"][0]["text"], "Where is my order?");

    // Typing both ways.
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
            &format!("/api/v1/interactions/{case}/typing"),
            json!({"state": "on"}),
        )
        .await;
    assert_eq!(s, 204, "{v}");
    let t = ws
        .until("the agent typing", |f| f["type"] == "typing")
        .await;
    assert_eq!(t["state"], "on");
    ws.send(json!({"type": "typing", "state": "on"})).await;
    let mut saw_customer_typing = false;
    for _ in 0..100 {
        saw_customer_typing = app.events().await.iter().any(|e| {
            e["type"] == "interaction.typing"
                && e["case_number"] == case
                && e["data"]["who"] == "customer"
        });
        if saw_customer_typing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_customer_typing, "the visitor's typing reaches the feed");

    // The reply arrives live.
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": "It ships today 📦"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let reply_id = v["message"]["id"].as_str().unwrap().to_string();
    let f = ws
        .until("the agent's reply", |f| {
            f["type"] == "message" && f["message"]["direction"] == "outbound"
        })
        .await;
    let m = &f["message"];
    assert_eq!(m["id"], reply_id.as_str());
    assert_eq!(m["seq"], 2);
    assert_eq!(m["text"], "It ships today 📦");
    assert_eq!(m["author"], "anne");
    assert_eq!(m["author_name"], "Anne Shirley");
    assert!(m["sent_at"].is_string());
    assert_eq!(m["attachments"], json!([]));
    // Delivery is the push itself: the outbox records it sent.
    let i = app
        .wait_for(case, "the reply sent", |i| {
            i["messages"][1]["status"] == "sent"
        })
        .await;
    assert_eq!(
        i["messages"][1]["provider_id"],
        format!("chat:{reply_id}").as_str()
    );
    assert_eq!(i["status"], "resolved");
    // A webhook to a chat channel is refused: there is no provider.
    let (s, v) = app
        .post(ROUTER, "/webhooks/chat-main", json!({"text": "forged"}))
        .await;
    assert_eq!(s, 401, "{v}");
}

/// A widget on a weak connection re-sends; the visitor must not say things twice.
async fn a_resent_client_message_id_is_stored_once_with_the_same_ack(b: Backend) {
    let app = start(b).await;
    let (sid, token) = session(&app, "chat-main", json!({})).await;
    let mut ws1 = ws(&app, "chat-main", &token).await;
    let first = ws1.message("same-id", "Hello?").await;
    assert_eq!(first["type"], "ack", "{first}");
    let again = ws1.message("same-id", "Hello?").await;
    assert_eq!(again, first);
    drop(ws1);
    // After a reconnect, and over HTTP, still the same message.
    let mut ws2 = ws(&app, "chat-main", &token).await;
    assert_eq!(ws2.message("same-id", "Hello?").await, first);
    let (s, v) = post_message(&app, "chat-main", &token, "same-id", "Hello?").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v, first);
    // A new ID is a new message.
    let second = ws2.message("other-id", "Anyone?").await;
    assert_eq!(second["seq"], 2);
    assert_ne!(second["message_id"], first["message_id"]);
    let case = case_of(&app, &sid).await;
    let msgs = app.interaction(case).await["messages"].clone();
    assert_eq!(msgs.as_array().unwrap().len(), 2, "{msgs}");
    let received = app
        .events()
        .await
        .iter()
        .filter(|e| e["type"] == "message.received" && e["case_number"] == case)
        .count();
    assert_eq!(received, 2);
    // A frame without a client_message_id is refused, not stored.
    ws2.send(json!({"type": "message", "text": "no id"})).await;
    let e = ws2.until("an error", |f| f["type"] == "error").await;
    assert_eq!(e["code"], "validation_failed");
    assert_eq!(e["field"], "client_message_id");
}

/// A visitor whose connection drops gets everything they missed, in order, once back.
async fn reconnect_and_resume_replays_missed_messages_in_order(b: Backend) {
    let app = start(b).await;
    let (sid, token) = session(&app, "chat-main", json!({})).await;
    let mut ws1 = ws(&app, "chat-main", &token).await;
    assert_eq!(ws1.message("m1", "first").await["seq"], 1);
    ws1.s.close(None).await.unwrap();
    drop(ws1);

    let case = case_of(&app, &sid).await;
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
            json!({"text": "reply one"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let (s, v) = post_message(&app, "chat-main", &token, "m2", "second").await;
    assert_eq!((s, v["seq"].clone()), (200, json!(3)), "{v}");
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": "reply two"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    app.deliver().await;

    let mut ws2 = ws(&app, "chat-main", &token).await;
    assert_eq!(ws2.ready["last_seq"], 4);
    // Nothing is pushed until the widget says where it is.
    assert_eq!(ws2.next_within(Duration::from_millis(300)).await, None);
    ws2.send(json!({"type": "resume", "after_seq": 1})).await;
    let mut got = vec![];
    for _ in 0..3 {
        let f = ws2
            .until("a replayed message", |f| f["type"] == "message")
            .await;
        got.push((
            f["message"]["seq"].as_u64().unwrap(),
            f["message"]["text"].as_str().unwrap().to_string(),
            f["message"]["direction"].as_str().unwrap().to_string(),
        ));
    }
    assert_eq!(
        got,
        vec![
            (2, "reply one".into(), "outbound".into()),
            (3, "second".into(), "inbound".into()),
            (4, "reply two".into(), "outbound".into()),
        ]
    );
    assert_eq!(ws2.next_within(Duration::from_millis(300)).await, None);
    // `after_seq` on the URL resumes at once.
    let mut ws3 = try_ws(&ws_url(&app, "chat-main", &token, "&after_seq=3"), None)
        .await
        .unwrap();
    let f = ws3
        .until("the last message", |f| f["type"] == "message")
        .await;
    assert_eq!(f["message"]["seq"], 4);
    // The HTTP fallback reads the same timeline.
    let (s, v, _) = call(
        &app,
        "GET",
        "/chat/chat-main/messages?after_seq=2",
        Some(&token),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["last_seq"], 4);
    let texts: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec!["second", "reply two"]);
}

/// A page reload keeps the conversation: the token resumes the same session.
#[tokio::test]
async fn sessions_are_created_and_resumed_with_the_token() {
    let app = start(Backend::Embedded).await;
    let (s, v, h) = call(
        &app,
        "POST",
        "/chat/chat-main/sessions",
        None,
        Some(SHOP),
        Some(json!({"name": "Kerry", "email": "Kerry@Example.com"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["verified"], false);
    assert_eq!(v["resumed"], false);
    assert_eq!(h.get("access-control-allow-origin").unwrap(), SHOP);
    let sid = v["session_id"].as_str().unwrap().to_string();
    let token = v["token"].as_str().unwrap().to_string();
    assert!(token.len() >= 40, "an unguessable token: {token}");
    assert_ne!(token, sid);
    // The same session again, with the token as a bearer or a field.
    let (s, again, _) = call(
        &app,
        "POST",
        "/chat/chat-main/sessions",
        Some(&token),
        Some(SHOP),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["session_id"], sid.as_str());
    assert_eq!(again["token"], token.as_str());
    assert_eq!(again["resumed"], true);
    let (s, again, _) = call(
        &app,
        "POST",
        "/chat/chat-main/sessions",
        None,
        None,
        Some(json!({"token": token})),
    )
    .await;
    assert_eq!((s, again["session_id"].clone()), (200, json!(sid)));
    // A token the gateway never gave, or one of another channel, proves nothing.
    let (s, v, _) = call(
        &app,
        "POST",
        "/chat/chat-main/sessions",
        Some("not-a-token"),
        None,
        Some(json!({})),
    )
    .await;
    assert_eq!((s, TestApp::problem_code(&v)), (401, "unauthorized"));
    let (s, v, _) = call(
        &app,
        "POST",
        "/chat/chat-slow/sessions",
        Some(&token),
        None,
        Some(json!({})),
    )
    .await;
    assert_eq!((s, TestApp::problem_code(&v)), (401, "unauthorized"));
    let (s, v) = post_message(&app, "chat-slow", &token, "x", "hi").await;
    assert_eq!((s, TestApp::problem_code(&v)), (401, "unauthorized"));
    // Pages of other sites may not open sessions; unknown and non-chat channels are 404.
    let (s, v, h) = call(
        &app,
        "POST",
        "/chat/chat-main/sessions",
        None,
        Some(EVIL),
        Some(json!({})),
    )
    .await;
    assert_eq!((s, TestApp::problem_code(&v)), (403, "forbidden_origin"));
    assert!(h.get("access-control-allow-origin").is_none());
    for ch in ["nope", "sms-main"] {
        let (s, v, _) = call(
            &app,
            "POST",
            &format!("/chat/{ch}/sessions"),
            None,
            None,
            Some(json!({})),
        )
        .await;
        assert_eq!((s, TestApp::problem_code(&v)), (404, "unknown_channel"));
    }
    // Bad fields are refused by name.
    let (s, v, _) = call(
        &app,
        "POST",
        "/chat/chat-main/sessions",
        None,
        None,
        Some(json!({"email": "not an address"})),
    )
    .await;
    assert_eq!((s, v["field"].clone()), (422, json!("email")));
    // The preflight of an allowed page is answered; another site's is refused.
    let r = app
        .http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/chat/chat-main/sessions", app.url),
        )
        .header("Origin", SHOP)
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(r.headers()["access-control-allow-origin"], SHOP);
    assert!(r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("authorization"));
    let r = app
        .http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/chat/chat-main/sessions", app.url),
        )
        .header("Origin", EVIL)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
}

/// A verified visitor's history is theirs alone: only a valid HMAC of the
/// identifier joins it (providers.md A8, vector 12).
#[tokio::test]
async fn identity_verification_binds_history_only_to_a_valid_hash() {
    let app = start(Backend::Embedded).await;
    let (s, v, _) = call(
        &app,
        "POST",
        "/chat/chat-main/sessions",
        None,
        None,
        Some(json!({"identifier": VECTOR_IDENTIFIER, "identifier_hash": "00".repeat(32)})),
    )
    .await;
    assert_eq!((s, TestApp::problem_code(&v)), (401, "invalid_signature"));
    // The published vector verifies.
    let (s, v, _) = call(
        &app,
        "POST",
        "/chat/chat-main/sessions",
        None,
        None,
        Some(json!({"identifier": VECTOR_IDENTIFIER, "identifier_hash": VECTOR_HASH, "name": "Verified"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["verified"], true);
    let verified_token = v["token"].as_str().unwrap().to_string();
    let (s, ack) = post_message(&app, "chat-main", &verified_token, "v1", "my account 42").await;
    assert_eq!(s, 200, "{ack}");
    let case = case_of(&app, VECTOR_IDENTIFIER).await;

    // The same identifier without a hash is just an anonymous visitor.
    let (anon_sid, anon) = session(
        &app,
        "chat-main",
        json!({"identifier": VECTOR_IDENTIFIER, "name": "Impostor"}),
    )
    .await;
    let (s, v, _) = call(
        &app,
        "GET",
        "/chat/chat-main/messages",
        Some(&anon),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["messages"],
        json!([]),
        "no access to the verified history"
    );
    let mut ws_anon = ws(&app, "chat-main", &anon).await;
    assert_eq!(ws_anon.ready["verified"], false);
    ws_anon
        .send(json!({"type": "resume", "after_seq": 0}))
        .await;
    assert_eq!(ws_anon.next_within(Duration::from_millis(300)).await, None);
    let (s, v) = post_message(&app, "chat-main", &anon, "a1", "let me in").await;
    assert_eq!((s, v["seq"].clone()), (200, json!(1)), "{v}");
    let anon_case = case_of(&app, &anon_sid).await;
    assert_ne!(anon_case, case);
    let i = app.interaction(case).await;
    assert_eq!(i["messages"].as_array().unwrap().len(), 1, "{i}");
    let own = ws_anon
        .until("its own message", |f| f["type"] == "message")
        .await;
    assert_eq!(own["message"]["text"], "let me in");
    // The verified visitor's messages do not reach the impostor's socket.
    post_message(&app, "chat-main", &verified_token, "v2", "private").await;
    assert_eq!(ws_anon.next_within(Duration::from_millis(500)).await, None);

    // The verified visitor on another device (a valid hash) has the history.
    let (_, other_device) = session(
        &app,
        "chat-main",
        json!({"identifier": VECTOR_IDENTIFIER, "identifier_hash": VECTOR_HASH}),
    )
    .await;
    let (_, v, _) = call(
        &app,
        "GET",
        "/chat/chat-main/messages",
        Some(&other_device),
        None,
        None,
    )
    .await;
    let texts: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec!["my account 42", "private"]);
    // The time-bound form: HMAC(secret, identifier.ts), within 5 minutes.
    let now = chrono::Utc::now().timestamp();
    let fresh = switchboard::adapters::chat::identifier_hash(
        IDENTITY_SECRET,
        &format!("{VECTOR_IDENTIFIER}.{now}"),
    );
    let (s, v, _) = call(
        &app,
        "POST",
        "/chat/chat-main/sessions",
        None,
        None,
        Some(json!({"identifier": VECTOR_IDENTIFIER, "identifier_hash": fresh, "identifier_ts": now})),
    )
    .await;
    assert_eq!((s, v["verified"].clone()), (201, json!(true)), "{v}");
    let old = now - 3600;
    let stale = switchboard::adapters::chat::identifier_hash(
        IDENTITY_SECRET,
        &format!("{VECTOR_IDENTIFIER}.{old}"),
    );
    let (s, v, _) = call(
        &app,
        "POST",
        "/chat/chat-main/sessions",
        None,
        None,
        Some(json!({"identifier": VECTOR_IDENTIFIER, "identifier_hash": stale, "identifier_ts": old})),
    )
    .await;
    assert_eq!((s, TestApp::problem_code(&v)), (401, "invalid_signature"));
    // Without an identity secret nothing is verified, whatever the hash.
    let (s, v, _) = call(
        &app,
        "POST",
        "/chat/chat-slow/sessions",
        None,
        None,
        Some(json!({"identifier": VECTOR_IDENTIFIER, "identifier_hash": VECTOR_HASH})),
    )
    .await;
    assert_eq!((s, v["verified"].clone()), (201, json!(false)), "{v}");
}

/// Only the sites a channel names may open its socket (checked on the upgrade).
#[tokio::test]
async fn a_wrong_origin_or_token_cannot_open_the_socket() {
    let app = start(Backend::Embedded).await;
    let (_, token) = session(&app, "chat-main", json!({})).await;
    let url = ws_url(&app, "chat-main", &token, "");
    let (status, body) = try_ws(&url, Some(EVIL)).await.err().expect("refused");
    assert_eq!(status, 403);
    assert_eq!(body["code"], "forbidden_origin");
    let (status, body) = try_ws(&ws_url(&app, "chat-main", "forged", ""), Some(SHOP))
        .await
        .err()
        .expect("refused");
    assert_eq!((status, body["code"].clone()), (401, json!("unauthorized")));
    // The allowed site, the gateway's own page and a non-browser client may.
    assert!(try_ws(&url, Some(SHOP)).await.is_ok());
    assert!(try_ws(&url, Some(&app.url)).await.is_ok());
    assert!(try_ws(&url, None).await.is_ok());
}

/// A runaway widget or a bot cannot flood the agents: a per-session limit.
#[tokio::test]
async fn messages_over_the_rate_limit_are_refused() {
    let app = start(Backend::Embedded).await;
    let (_, token) = session(&app, "chat-slow", json!({})).await;
    for n in 1..=3 {
        let (s, v) = post_message(&app, "chat-slow", &token, &format!("h{n}"), "hi").await;
        assert_eq!(s, 200, "{v}");
    }
    let r = app
        .http
        .post(format!("{}/chat/chat-slow/messages", app.url))
        .bearer_auth(&token)
        .json(&json!({"client_message_id": "h4", "text": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "rate_limited");
    // A resend of a stored message is still answered.
    let (s, v) = post_message(&app, "chat-slow", &token, "h2", "hi").await;
    assert_eq!((s, v["seq"].clone()), (200, json!(2)));
    // Over the socket: an error frame naming the message.
    let (_, token2) = session(&app, "chat-slow", json!({})).await;
    let mut ws = ws(&app, "chat-slow", &token2).await;
    for n in 1..=3 {
        assert_eq!(ws.message(&format!("w{n}"), "hi").await["type"], "ack");
    }
    let e = ws.message("w4", "hi").await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], "rate_limited");
    assert!(e["retry_after"].as_u64().unwrap() >= 1);
    // Text over 10,000 characters is refused.
    let (_, token3) = session(&app, "chat-main", json!({})).await;
    let (s, v) = post_message(&app, "chat-main", &token3, "long", &"x".repeat(10_001)).await;
    assert_eq!((s, v["field"].clone()), (422, json!("text")));
}

fn png() -> Vec<u8> {
    let mut b = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    b.extend_from_slice(&[7u8; 300]);
    b
}

async fn upload(
    app: &TestApp,
    channel: &str,
    token: Option<&str>,
    name: &str,
    ct: &str,
    bytes: Vec<u8>,
) -> (u16, Value) {
    let part = reqwest::multipart::Part::bytes(bytes)
        .file_name(name.to_string())
        .mime_str(ct)
        .unwrap();
    let form = reqwest::multipart::Form::new().part("file", part);
    let mut rb = app
        .http
        .post(format!("{}/chat/{channel}/attachments", app.url))
        .multipart(form);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn download(app: &TestApp, id: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    let mut rb = app
        .http
        .get(format!("{}/chat/chat-main/attachments/{id}", app.url));
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().await.unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

/// Visitors send files within the 10 MiB cap and the channel's types; the
/// agent gets them with the message, and only the visitor can fetch theirs.
#[tokio::test]
async fn uploads_are_capped_typed_and_reach_the_agent() {
    let app = start(Backend::Embedded).await;
    let (sid, token) = session(&app, "chat-main", json!({})).await;
    let (_, stranger) = session(&app, "chat-main", json!({})).await;
    let big = vec![0u8; 10 * 1024 * 1024 + 1];
    let (s, v) = upload(&app, "chat-main", Some(&token), "big.png", "image/png", big).await;
    assert_eq!(
        (s, TestApp::problem_code(&v)),
        (413, "attachment_too_large")
    );
    let (s, v) = upload(
        &app,
        "chat-main",
        Some(&token),
        "page.html",
        "text/html",
        b"<script>".to_vec(),
    )
    .await;
    assert_eq!(
        (s, TestApp::problem_code(&v)),
        (415, "unsupported_media_type")
    );
    let (s, v) = upload(&app, "chat-main", None, "p.png", "image/png", png()).await;
    assert_eq!((s, TestApp::problem_code(&v)), (401, "unauthorized"));
    let (s, v) = upload(
        &app,
        "chat-main",
        Some(&token),
        "pixel.png",
        "image/png",
        png(),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let upload_id = v["id"].as_str().unwrap().to_string();
    // Only the uploader may fetch it, or attach it.
    assert_eq!(download(&app, &upload_id, Some(&token)).await, (200, png()));
    assert_eq!(download(&app, &upload_id, Some(&stranger)).await.0, 404);
    assert_eq!(download(&app, &upload_id, None).await.0, 401);
    let (s, v, _) = call(
        &app,
        "POST",
        "/chat/chat-main/messages",
        Some(&stranger),
        None,
        Some(json!({"client_message_id": "steal", "text": "", "attachments": [upload_id]})),
    )
    .await;
    assert_eq!((s, v["field"].clone()), (422, json!("attachments")));

    let mut ws = ws(&app, "chat-main", &token).await;
    ws.send(json!({"type": "message", "client_message_id": "f1", "text": "see this", "attachments": [upload_id]}))
        .await;
    let ack = ws.until("the ack", |f| f["type"] == "ack").await;
    assert_eq!(ack["seq"], 1);
    let case = case_of(&app, &sid).await;
    let i = app.interaction(case).await;
    let att = &i["messages"][0]["attachments"][0];
    assert_eq!(att["filename"], "pixel.png");
    assert_eq!(att["content_type"], "image/png");
    assert_eq!(att["size"], png().len());
    assert_eq!(att["state"], "stored", "{i}");
    assert!(att.get("source_url").is_none() && att.get("source_media_id").is_none());
    let att_id = att["id"].as_str().unwrap().to_string();
    let r = app
        .http
        .get(format!("{}/api/v1/attachments/{att_id}", app.url))
        .bearer_auth(ANNE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.bytes().await.unwrap().to_vec(), png());
    // The message frame names the stored attachment, which the visitor may fetch.
    let f = ws.until("the message", |f| f["type"] == "message").await;
    assert_eq!(f["message"]["attachments"][0]["id"], att_id.as_str());
    assert_eq!(download(&app, &att_id, Some(&token)).await, (200, png()));
    assert_eq!(download(&app, &att_id, Some(&stranger)).await.0, 404);

    // The agent's attachment comes back to the visitor, and only to them.
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    let form = reqwest::multipart::Form::new()
        .text("text", "here is the invoice")
        .part(
            "attachments",
            reqwest::multipart::Part::bytes(b"%PDF-1.4 invoice".to_vec())
                .file_name("invoice.pdf")
                .mime_str("application/pdf")
                .unwrap(),
        );
    let (status, body) = app
        .post_multipart(ANNE, &format!("/api/v1/interactions/{case}/replies"), form)
        .await;
    assert_eq!(status, 202, "{body}");
    let f = ws
        .until("the reply", |f| {
            f["type"] == "message" && f["message"]["direction"] == "outbound"
        })
        .await;
    let a = &f["message"]["attachments"][0];
    assert_eq!(a["filename"], "invoice.pdf");
    let id = a["id"].as_str().unwrap();
    assert_eq!(
        download(&app, id, Some(&token)).await,
        (200, b"%PDF-1.4 invoice".to_vec())
    );
    assert_eq!(download(&app, id, Some(&stranger)).await.0, 404);
    // A forged internal link fetches nothing.
    let r = app
        .http
        .get(format!(
            "{}/chat/chat-main/attachments/{upload_id}?internal=99999999999.{}",
            app.url,
            "0".repeat(64)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

/// The token proves the visitor is who they are; an agent, a routing engine
/// or an event sink that saw it could impersonate them.
#[tokio::test]
async fn the_session_token_never_reaches_agents_or_events() {
    let app = start(Backend::Embedded).await;
    let (sid, token) = session(
        &app,
        "chat-main",
        json!({"name": "Kerry", "email": "kerry@example.com"}),
    )
    .await;
    let mut ws = ws(&app, "chat-main", &token).await;
    ws.message("t1", "hello").await;
    ws.send(json!({"type": "typing", "state": "on"})).await;
    let case = case_of(&app, &sid).await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/replies"),
        json!({"text": "hi"}),
    )
    .await;
    ws.until("the reply", |f| {
        f["type"] == "message" && f["message"]["direction"] == "outbound"
    })
    .await;
    app.deliver().await;
    let digest = sha256_hex(&token);
    let mut seen = vec![
        app.interaction(case).await.to_string(),
        app.get(ANNE, "/api/v1/interactions?view=all")
            .await
            .1
            .to_string(),
        app.get(ANNE, &format!("/api/v1/interactions/{case}/contact"))
            .await
            .1
            .to_string(),
        serde_json::to_string(&app.events().await).unwrap(),
    ];
    let (_, feed) = app.get(ROUTER, "/api/v1/routing/events?limit=1000").await;
    seen.push(feed.to_string());
    for text in &seen {
        assert!(
            text.contains(&sid) || text.contains("hello"),
            "looked at something"
        );
        assert!(!text.contains(&token), "the token leaked: {text}");
        assert!(!text.contains(&digest), "the token's digest leaked: {text}");
    }
}

/// The widget is one script tag; the page shows it; both are plain files.
#[tokio::test]
async fn the_widget_and_its_page_are_served() {
    let app = start(Backend::Embedded).await;
    let r = app
        .http
        .get(format!("{}/chat/widget.js", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let js = r.text().await.unwrap();
    assert!(js.contains("data-channel") && js.contains("WebSocket"));
    let r = app
        .http
        .get(format!("{}/chat/widget.css", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = app
        .http
        .get(format!("{}/chat/chat-main", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    let html = r.text().await.unwrap();
    assert!(html.contains(r#"data-channel="chat-main""#), "{html}");
    assert!(html.contains("<title>Web chat</title>"), "{html}");
    let (s, v, _) = call(&app, "GET", "/chat/sms-main", None, None, None).await;
    assert_eq!((s, TestApp::problem_code(&v)), (404, "unknown_channel"));
}

/// Many gateway processes on one Redis: the visitor's socket on process A
/// gets the reply an agent sent through process B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_redis_fan_out_the_reply() {
    let a = start(Backend::Redis).await;
    let prefix = a.prefix.clone();
    let b = TestApp::start_with(Backend::Redis, &chat_channels(), move |s| {
        s.store.key_prefix = prefix;
    })
    .await;
    let (sid, token) = session(&a, "chat-main", json!({})).await;
    let mut ws = ws(&a, "chat-main", &token).await;
    assert_eq!(ws.message("r1", "hello from A").await["seq"], 1);
    // Process B sees the interaction and answers it.
    let case = case_of(&b, &sid).await;
    let (s, v) = b
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/assign"),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    b.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/typing"),
        json!({"state": "on"}),
    )
    .await;
    assert_eq!(
        ws.until("typing from B", |f| f["type"] == "typing").await["state"],
        "on"
    );
    let (s, v) = b
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": "answered by B"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let f = ws
        .until("B's reply on A's socket", |f| {
            f["type"] == "message" && f["message"]["direction"] == "outbound"
        })
        .await;
    assert_eq!(f["message"]["text"], "answered by B");
    assert_eq!(f["message"]["seq"], 2);
    // And the visitor's socket on B resumes the same timeline.
    let mut on_b = ws_on(&b, &token).await;
    on_b.send(json!({"type": "resume", "after_seq": 0})).await;
    let first = on_b.until("the replay", |f| f["type"] == "message").await;
    assert_eq!(first["message"]["text"], "hello from A");
}

async fn ws_on(app: &TestApp, token: &str) -> Ws {
    ws(app, "chat-main", token).await
}

/// One client address cannot mint sessions without end (providers.md A8: limits per IP).
#[tokio::test]
async fn new_sessions_are_limited_per_client_address() {
    let app = start(Backend::Embedded).await;
    // A proxy's X-Forwarded-For names the visitor; a made-up one keeps other tests' budget.
    let ip = format!("198.51.100.{}", rand_octet());
    let limit = switchboard::adapters::chat::NEW_SESSIONS_PER_MINUTE_PER_IP;
    let mut last = 0;
    for _ in 0..=limit {
        let r = app
            .http
            .post(format!("{}/chat/chat-main/sessions", app.url))
            .header("X-Forwarded-For", &ip)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        last = r.status().as_u16();
        if last != 201 {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["code"], "rate_limited");
            break;
        }
    }
    assert_eq!(last, 429, "the {}th new session is refused", limit + 1);
    // Resuming a session is not a new one.
    let (_, token) = session(&app, "chat-main", json!({})).await;
    let r = app
        .http
        .post(format!("{}/chat/chat-main/sessions", app.url))
        .header("X-Forwarded-For", &ip)
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

fn rand_octet() -> u8 {
    (uuid::Uuid::new_v4().as_bytes()[0] % 250) + 1
}

/// `switchboard simulate` for a chat channel talks to the gateway as the widget does.
#[tokio::test]
async fn simulate_visitor_writes_like_the_widget() {
    let app = start(Backend::Embedded).await;
    let sid = switchboard::adapters::chat::simulate_visitor(
        &app.url,
        "chat-main",
        "simulated hello",
        None,
    )
    .await
    .unwrap();
    let case = case_of(&app, &sid).await;
    let i = app.interaction(case).await;
    assert_eq!(i["messages"][0]["text"], "simulated hello");
    assert_eq!(i["contact"]["name"], "Simulated visitor");
    let err = switchboard::adapters::chat::simulate_visitor(&app.url, "sms-main", "x", None)
        .await
        .unwrap_err();
    assert!(err.contains("404"), "{err}");
}
