//! The demo: a built-in configuration and a sandbox provider, so that
//! `cargo run --release` works fully offline.
//!
//! Every demo channel points at the sandbox under `/sandbox/` (mounted in
//! demo mode only). The sandbox accepts sends the way the provider does and
//! then reports them delivered through the provider's own signed status
//! callbacks, so the whole path in and out runs without any account. Email
//! channels send through the in-process SMTP sink of [`crate::demo_smtp`].
//!
//! The sandbox can fail on purpose, so that agents can see what failures
//! look like: an SMS whose text contains `[sandbox:fail]` is reported
//! undelivered, Twilio's test numbers (`+15005550001`, ...) are refused with
//! Twilio's errors, media under `/sandbox/media/missing…` is 404 (and
//! `/sandbox/media/flaky…` only the first time), and the SMTP sink refuses
//! every recipient at `fail.example`.

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
/// The Standard Webhooks secret of the demo email channel (`whsec_` + base64).
pub const DEMO_EMAIL_INBOUND_SECRET: &str = "whsec_ZGVtby1lbWFpbC1pbmJvdW5kLXNlY3JldA==";
/// The demo email channel's address.
pub const DEMO_EMAIL_ADDRESS: &str = "support@demo.example";

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
id = "mail-main"
kind = "email"
name = "Email {DEMO_EMAIL_ADDRESS}"
queue = "support"
address = "{DEMO_EMAIL_ADDRESS}"
inbound_secret = "{DEMO_EMAIL_INBOUND_SECRET}"
# At start the demo points this at its in-process SMTP sink (a free loopback port).
smtp = {{ host = "127.0.0.1", port = 2525, tls = "none" }}

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

/// Points every demo channel's provider API at the sandbox of this process,
/// and every email channel's `smtp` at the in-process SMTP sink at `smtp`.
pub fn point_at_sandbox(s: &mut Settings, smtp: Option<std::net::SocketAddr>) {
    let base = s.server.public_url();
    for c in &mut s.channels {
        use crate::domain::ChannelKind::*;
        match c.kind {
            Sms => c.api_base = Some(format!("{base}/sandbox/twilio")),
            Whatsapp | Facebook | Instagram => {
                c.api_base = Some(format!("{base}/sandbox/graph/v25.0"))
            }
            Twitter => c.api_base = Some(format!("{base}/sandbox/x")),
            Email => {
                if let Some(addr) = smtp {
                    let mut t = toml::map::Map::new();
                    t.insert("host".into(), addr.ip().to_string().into());
                    t.insert("port".into(), i64::from(addr.port()).into());
                    t.insert("tls".into(), "none".into());
                    c.settings.insert("smtp".into(), toml::Value::Table(t));
                }
            }
            _ => {}
        }
        let host = url::Url::parse(&base)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| "127.0.0.1".into());
        c.media_hosts = Some(vec![host]);
    }
}

/// The text marker that makes the SMS sandbox report a send undelivered.
pub const SANDBOX_FAIL_MARKER: &str = "[sandbox:fail]";

/// Twilio's test numbers that its test credentials refuse, answered the same
/// way: `(error code, message)`.
pub fn twilio_test_number_error(to: &str) -> Option<(u32, String)> {
    Some(match to {
        "+15005550001" => (21211, format!("The 'To' number {to} is not a valid phone number.")),
        "+15005550002" => (21612, format!("The 'To' phone number: {to}, is not currently reachable using the 'From' phone number via SMS.")),
        "+15005550003" => (21408, format!("Permission to send an SMS has not been enabled for the region indicated by the 'To' number: {to}.")),
        "+15005550004" => (21610, "Attempt to send to unsubscribed recipient".to_string()),
        "+15005550009" => (21614, format!("'To' number {to} is not a valid mobile number")),
        _ => return None,
    })
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
    .route("/sandbox/x/2/media/upload", web::post().to(x_upload))
    .route("/sandbox/media/{name}", web::get().to(media))
    .route("/sandbox/smtp/messages", web::get().to(smtp_messages));
}

/// A 1×1 PNG.
const PIXEL_PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0xda, 0x63, 0x64, 0xf8, 0xcf, 0x50,
    0x0f, 0x00, 0x03, 0x86, 0x01, 0x80, 0x5a, 0x34, 0x7d, 0x6b, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45,
    0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

/// Names under `/sandbox/media/flaky-…` already asked for once.
static FLAKY_SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// A provider's media host: `missing…` is always 404, `flaky…` is 404 the
/// first time and there after that, anything else is there (a 1×1 PNG for
/// `.png`, else a line of text).
async fn media(path: web::Path<String>) -> HttpResponse {
    let name = path.into_inner();
    let not_found = || {
        HttpResponse::NotFound().json(json!({"code": 20404, "message": format!("The requested resource /sandbox/media/{name} was not found"), "more_info": "https://www.twilio.com/docs/errors/20404", "status": 404}))
    };
    if name.starts_with("missing") {
        return not_found();
    }
    if name.starts_with("flaky") {
        let mut seen = FLAKY_SEEN.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= 10_000 {
            seen.clear();
        }
        if !seen.contains(&name) {
            seen.push(name.clone());
            return not_found();
        }
    }
    if name.to_ascii_lowercase().ends_with(".png") {
        HttpResponse::Ok().content_type("image/png").body(PIXEL_PNG)
    } else {
        HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .body(format!("{name}: a file from the demo sandbox\n"))
    }
}

/// What the demo SMTP sink accepted: a count and the latest summaries.
async fn smtp_messages(log: Option<web::Data<crate::demo_smtp::SinkLog>>) -> HttpResponse {
    match log {
        Some(log) => {
            HttpResponse::Ok().json(json!({"count": log.count(), "messages": log.latest()}))
        }
        None => HttpResponse::NotFound().json(json!({"detail": "the SMTP sink is not running"})),
    }
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
/// delivered through signed status callbacks. Deterministic failures: a
/// text containing [`SANDBOX_FAIL_MARKER`] is reported `undelivered`
/// (ErrorCode 30003), and Twilio's test numbers are refused as Twilio
/// refuses them ([`twilio_test_number_error`]).
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
    if let Some((code, message)) = twilio_test_number_error(&to) {
        return HttpResponse::BadRequest().json(json!({"code": code, "message": message,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": 400}));
    }
    // The marker makes the carrier report the message undelivered, as a
    // switched-off handset would (Twilio's error 30003).
    let statuses: [(&str, Option<&str>); 2] =
        if get("Body").is_some_and(|b| b.to_ascii_lowercase().contains(SANDBOX_FAIL_MARKER)) {
            [("sent", None), ("undelivered", Some("30003"))]
        } else {
            [("sent", None), ("delivered", None)]
        };
    let sid = format!("SM{}", new_id());
    let public_url = g.settings.server.public_url();
    let sid2 = sid.clone();
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        for (status, error_code) in statuses {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let r = sms::simulate_status(&ch, &public_url, &sid2, status, error_code);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_configuration_passes_check_config_with_an_email_channel() {
        let mut s = settings();
        assert_eq!(s.problems(), Vec::<String>::new());
        let mail = s
            .channel("mail-main")
            .expect("the demo has an email channel");
        assert_eq!(mail.kind, crate::domain::ChannelKind::Email);
        assert!(
            mail.str("inbound_secret").is_some(),
            "simulate can sign for it"
        );
        s.server.public_url = Some("http://127.0.0.1:9999".into());
        point_at_sandbox(&mut s, Some("127.0.0.1:40025".parse().unwrap()));
        assert_eq!(s.problems(), Vec::<String>::new());
        let smtp = crate::adapters::email::send::SmtpSettings::from_config(
            s.channel("mail-main").unwrap(),
        )
        .unwrap()
        .expect("smtp is set");
        assert_eq!((smtp.host.as_str(), smtp.port), ("127.0.0.1", 40025));
        assert_eq!(smtp.tls, crate::adapters::email::send::SmtpTls::None);
        assert_eq!(
            s.channel("sms-main").unwrap().api_base.as_deref(),
            Some("http://127.0.0.1:9999/sandbox/twilio")
        );
    }

    #[test]
    fn twilio_test_numbers_are_numbers_the_gateway_accepts() {
        for n in ["+15005550001", "+15005550004"] {
            assert!(twilio_test_number_error(n).is_some());
            assert_eq!(
                crate::domain::PhoneNumber::parse(n)
                    .map(|p| p.to_string())
                    .ok()
                    .as_deref(),
                Some(n),
                "the gateway sends to {n}, so the sandbox can refuse it"
            );
        }
        assert!(twilio_test_number_error("+14155550100").is_none());
    }
}
