//! The demo: a built-in configuration and a sandbox provider, so that
//! `cargo run --release` works fully offline.
//!
//! Every demo channel points at the sandbox under `/sandbox/` (mounted in
//! demo mode only). The sandbox accepts sends the way the provider does and
//! then reports them delivered through the provider's own signed status
//! callbacks, so the whole path in and out runs without any account.

use crate::adapters::sms;
use crate::config::{AgentConfig, QueueConfig, QueueKind, ServiceConfig, Settings};
use crate::domain::new_id;
use crate::http::State;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;
use std::collections::HashMap;

/// Demo channel secrets are fixed so that `switchboard simulate` can sign
/// webhooks for a running demo without reading anything from it.
pub const DEMO_TWILIO_ACCOUNT_SID: &str = "AC00000000000000000000000000000000";
pub const DEMO_TWILIO_AUTH_TOKEN: &str = "demo-twilio-auth-token";
pub const DEMO_META_APP_SECRET: &str = "demo-meta-app-secret";
pub const DEMO_META_VERIFY_TOKEN: &str = "demo-meta-verify-token";
pub const DEMO_META_ACCESS_TOKEN: &str = "demo-meta-access-token";
pub const DEMO_X_CONSUMER_SECRET: &str = "demo-x-consumer-secret";
pub const DEMO_X_USER_ID: &str = "1000000000000000001";
pub const DEMO_X_ACCESS_TOKEN: &str = "demo-x-access-token";

/// The demo configuration, with fresh random agent and service tokens.
pub fn settings() -> Settings {
    let mut s: Settings = toml::from_str(&format!(
        r#"
demo = true

[store]
path = "./data"

[[queues]]
id = "support"
name = "Support"
kind = "digital"

[[queues]]
id = "sales"
name = "Sales"
kind = "digital"

[[queues]]
id = "tea-time"
name = "Tea time"
kind = "digital"

[[queues]]
id = "omni"
name = "Omnichannel"
kind = "omnichannel"

[[queues]]
id = "outbound-sms"
name = "Outbound SMS"
kind = "outbound_sms"

[[queues]]
id = "outbound-email"
name = "Outbound email"
kind = "outbound_email"

[[channels]]
id = "sms-main"
kind = "sms"
name = "SMS +1 415 555 0100"
queue = "support"
account_sid = "{DEMO_TWILIO_ACCOUNT_SID}"
auth_token = "{DEMO_TWILIO_AUTH_TOKEN}"
from = "+14155550100"

[[channels]]
id = "wa-main"
kind = "whatsapp"
name = "WhatsApp +1 415 555 0101"
queue = "support"
app_secret = "{DEMO_META_APP_SECRET}"
verify_token = "{DEMO_META_VERIFY_TOKEN}"
access_token = "{DEMO_META_ACCESS_TOKEN}"
phone_number_id = "100000000000001"

[[channels]]
id = "fb-main"
kind = "facebook"
name = "Messenger: Demo Page"
queue = "support"
app_secret = "{DEMO_META_APP_SECRET}"
verify_token = "{DEMO_META_VERIFY_TOKEN}"
page_access_token = "{DEMO_META_ACCESS_TOKEN}"
page_id = "200000000000001"
human_agent_tag = true

[[channels]]
id = "ig-main"
kind = "instagram"
name = "Instagram: @demo"
queue = "sales"
app_secret = "{DEMO_META_APP_SECRET}"
verify_token = "{DEMO_META_VERIFY_TOKEN}"
access_token = "{DEMO_META_ACCESS_TOKEN}"
ig_account_id = "17841400000000000"

[[channels]]
id = "x-main"
kind = "twitter"
name = "X: @demo"
queue = "support"
consumer_secret = "{DEMO_X_CONSUMER_SECRET}"
user_id = "{DEMO_X_USER_ID}"
access_token = "{DEMO_X_ACCESS_TOKEN}"

[[channels]]
id = "chat-main"
kind = "chat"
name = "Web chat"
queue = "support"
allowed_origins = ["http://127.0.0.1:8080", "http://localhost:8080"]
"#
    ))
    .expect("the demo configuration parses");
    s.agents = vec![
        AgentConfig {
            id: "anne".into(),
            name: "Anne Shirley".into(),
            token_sha256: None,
            token: Some(crate::domain::new_secret()),
            queues: s.queues.iter().map(|q| q.id.clone()).collect(),
            can_transfer: true,
        },
        AgentConfig {
            id: "bob".into(),
            name: "Bob Cratchit".into(),
            token_sha256: None,
            token: Some(crate::domain::new_secret()),
            queues: vec!["support".into(), "sales".into()],
            can_transfer: true,
        },
    ];
    s.services = vec![ServiceConfig {
        id: "router".into(),
        token_sha256: None,
        token: Some(crate::domain::new_secret()),
    }];
    let _: &Vec<QueueConfig> = &s.queues;
    debug_assert!(s.queues.iter().any(|q| q.kind == QueueKind::OutboundSms));
    s
}

/// Points every demo channel's provider API at the sandbox of this process.
pub fn point_at_sandbox(s: &mut Settings) {
    let base = s.server.public_url();
    for c in &mut s.channels {
        use crate::domain::ChannelKind::*;
        match c.kind {
            Sms => c.api_base = Some(format!("{base}/sandbox/twilio")),
            Whatsapp | Facebook | Instagram => {
                c.api_base = Some(format!("{base}/sandbox/graph/v25.0"))
            }
            Twitter => c.api_base = Some(format!("{base}/sandbox/x")),
            _ => {}
        }
        let host = url::Url::parse(&base)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| "127.0.0.1".into());
        c.media_hosts = Some(vec![host]);
    }
}

pub fn configure_sandbox(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/sandbox/twilio/2010-04-01/Accounts/{sid}/Messages.json",
        web::post().to(twilio_send),
    )
    .route(
        "/sandbox/graph/v25.0/{id}/messages",
        web::post().to(graph_send),
    )
    .route(
        "/sandbox/graph/v25.0/{id}/media",
        web::post().to(graph_upload),
    )
    .route(
        "/sandbox/x/2/dm_conversations/with/{participant}/messages",
        web::post().to(x_send),
    )
    .route("/sandbox/x/2/media/upload", web::post().to(x_upload));
}

fn x_authorized(state: &State, req: &HttpRequest) -> bool {
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    state.gateway.settings.channels.iter().any(|c| {
        c.kind == crate::domain::ChannelKind::Twitter && c.str("access_token") == Some(presented)
    })
}

fn x_unauthorized() -> HttpResponse {
    HttpResponse::Unauthorized().json(
        json!({"title": "Unauthorized", "type": "about:blank", "status": 401, "detail": "Unauthorized"}),
    )
}

/// Accepts an X API v2 direct message as X does. (X reports no delivery for DMs.)
async fn x_send(
    state: web::Data<State>,
    path: web::Path<String>,
    req: HttpRequest,
) -> HttpResponse {
    if !x_authorized(&state, &req) {
        return x_unauthorized();
    }
    let event_id = format!(
        "{}",
        1_900_000_000_000_000_000u64 + rand::random::<u32>() as u64
    );
    HttpResponse::Created().json(json!({"data": {
        "dm_conversation_id": format!("{DEMO_X_USER_ID}-{}", path.into_inner()),
        "dm_event_id": event_id}}))
}

/// Accepts every step of X's chunked media upload (INIT, APPEND, FINALIZE).
async fn x_upload(state: web::Data<State>, req: HttpRequest) -> HttpResponse {
    if !x_authorized(&state, &req) {
        return x_unauthorized();
    }
    HttpResponse::Ok().json(json!({"data": {"id": "1880000000000000001",
        "media_key": "3_1880000000000000001", "expires_after_secs": 86400}}))
}

/// The Meta channel whose phone number, page or account id is `id`, if the bearer token is its own.
fn meta_channel(
    state: &State,
    id: &str,
    req: &HttpRequest,
) -> Result<crate::config::ChannelConfig, Box<HttpResponse>> {
    let ch = state
        .gateway
        .settings
        .channels
        .iter()
        .find(|c| [c.str("phone_number_id"), c.str("page_id"), c.str("ig_account_id")].contains(&Some(id)))
        .cloned()
        .ok_or_else(|| {
            Box::new(HttpResponse::BadRequest().json(json!({"error": {"message": format!("Unsupported post request. Object with ID '{id}' does not exist"), "type": "GraphMethodException", "code": 100}})))
        })?;
    let token = ch
        .str("access_token")
        .or(ch.str("page_access_token"))
        .unwrap_or("");
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if presented != token {
        return Err(Box::new(HttpResponse::Unauthorized().json(json!({"error": {"message": "Invalid OAuth access token - Cannot parse access token", "type": "OAuthException", "code": 190}}))));
    }
    Ok(ch)
}

/// Posts a signed webhook to this gateway, as the provider would, a little later.
fn deliver_later(public_url: String, requests: Vec<crate::adapters::SimulatedRequest>) {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        for r in requests {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let mut rb = http
                .post(format!("{public_url}{}", r.path))
                .header("content-type", r.content_type.clone());
            for (k, v) in &r.headers {
                rb = rb.header(k, v);
            }
            if let Err(e) = rb.body(r.body.clone()).send().await {
                tracing::warn!(error = %e, "sandbox webhook failed");
            }
        }
    });
}

/// Accepts a Graph API send (WhatsApp, Messenger, Instagram) and reports it delivered.
async fn graph_send(
    state: web::Data<State>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let ch = match meta_channel(&state, &path, &req) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let public_url = state.gateway.settings.server.public_url();
    match ch.kind {
        crate::domain::ChannelKind::Whatsapp => {
            let to = v["to"].as_str().unwrap_or("").to_string();
            let wamid = format!("wamid.{}", new_id());
            deliver_later(
                public_url,
                vec![
                    crate::adapters::whatsapp::simulate_status(&ch, &wamid, "sent", &to),
                    crate::adapters::whatsapp::simulate_status(&ch, &wamid, "delivered", &to),
                ],
            );
            HttpResponse::Ok().json(json!({"messaging_product": "whatsapp", "contacts": [{"input": to, "wa_id": to}], "messages": [{"id": wamid}]}))
        }
        _ => {
            let to = v["recipient"]["id"].as_str().unwrap_or("").to_string();
            let mid = format!("m_{}", new_id());
            let object = if ch.kind == crate::domain::ChannelKind::Facebook {
                "page"
            } else {
                "instagram"
            };
            let delivery = json!({"object": object, "entry": [{"id": path.as_str(), "time": chrono::Utc::now().timestamp_millis(),
                "messaging": [{"sender": {"id": to}, "recipient": {"id": path.as_str()},
                    "delivery": {"mids": [mid], "watermark": chrono::Utc::now().timestamp_millis() + 1000}}]}]});
            deliver_later(
                public_url,
                vec![crate::adapters::messenger::simulate_payload(
                    &ch,
                    &serde_json::to_vec(&delivery).unwrap_or_default(),
                )],
            );
            HttpResponse::Ok().json(json!({"recipient_id": to, "message_id": mid}))
        }
    }
}

/// Accepts a WhatsApp media upload.
async fn graph_upload(
    state: web::Data<State>,
    path: web::Path<String>,
    req: HttpRequest,
) -> HttpResponse {
    match meta_channel(&state, &path, &req) {
        Ok(_) => HttpResponse::Ok().json(json!({"id": format!("{}", rand::random::<u64>())})),
        Err(resp) => *resp,
    }
}

/// Accepts a send as Twilio's Messages API does, then reports it sent and
/// delivered through signed status callbacks.
async fn twilio_send(
    state: web::Data<State>,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let g = state.gateway.clone();
    let Some(ch) = g
        .settings
        .channels
        .iter()
        .find(|c| c.str("account_sid") == Some(path.as_str()))
        .cloned()
    else {
        return HttpResponse::NotFound().json(json!({"code": 20404, "message": "The requested resource was not found", "status": 404}));
    };
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b).ok())
        .is_some_and(|creds| {
            creds == format!("{}:{}", path, ch.str("auth_token").unwrap_or("")).into_bytes()
        });
    if !authorized {
        return HttpResponse::Unauthorized()
            .json(json!({"code": 20003, "message": "Authenticate", "status": 401}));
    }
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let (Some(to), Some(callback)) = (get("To"), get("StatusCallback")) else {
        return HttpResponse::BadRequest().json(
            json!({"code": 21604, "message": "A 'To' phone number is required.", "status": 400}),
        );
    };
    let sid = format!("SM{}", new_id());
    let public_url = g.settings.server.public_url();
    let sid2 = sid.clone();
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        for status in ["sent", "delivered"] {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let r = sms::simulate_status(&ch, &public_url, &sid2, status, None);
            let target = if callback.starts_with(&public_url) {
                callback.clone()
            } else {
                format!("{public_url}{}", r.path)
            };
            let mut rb = http
                .post(&target)
                .header("content-type", r.content_type.clone());
            for (k, v) in &r.headers {
                rb = rb.header(k, v);
            }
            if let Err(e) = rb.body(r.body.clone()).send().await {
                tracing::warn!(error = %e, "sandbox status callback failed");
            }
        }
    });
    let mut extra = HashMap::new();
    extra.insert("num_media", get("MediaUrl").map(|_| "1").unwrap_or("0"));
    HttpResponse::Created().json(json!({
        "sid": sid, "account_sid": path.into_inner(), "to": to, "from": get("From"),
        "messaging_service_sid": get("MessagingServiceSid"), "body": get("Body").unwrap_or_default(),
        "status": "queued", "num_segments": "1", "num_media": extra["num_media"], "direction": "outbound-api",
        "api_version": "2010-04-01", "error_code": null, "error_message": null,
    }))
}
