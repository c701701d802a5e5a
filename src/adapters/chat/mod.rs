//! Web chat: the gateway is the provider (providers.md A8). Visitors talk to
//! the gateway itself through the widget (`/chat/widget.js`), so there is no
//! webhook to verify and nothing to call on the way out.
//!
//! | direction | what | where |
//! | --- | --- | --- |
//! | in | `POST /chat/{channel}/sessions`: a session ID (the visitor's digital ID) and a secret token; optional identity verification | [`visitor::create_session`], [`verify_identifier`] |
//! | in | WebSocket `message` frames (or `POST /chat/{channel}/messages`), deduplicated on `(session, client_message_id)` | [`visitor::send_message`] → `Gateway::receive_direct` |
//! | in | uploads, stored at once, attached by ID; the gateway copies them into the message through [`MediaResolver`] | [`visitor::store_upload`], [`ChatChannel::resolve`] |
//! | out | the agent's reply: [`Outbound::send`] only records it as sent; the visitor's socket follows the store's events (on Redis, those of every process) and pushes it | [`visitor::Follower`] |
//! | both | typing indicators | `Inbound::Typing`, `interaction.typing` events |
//!
//! | setting | meaning | default |
//! | --- | --- | --- |
//! | `allowed_origins` | origins (`https://shop.example`) whose pages may open sessions and sockets; `*` allows any. The gateway's own page is always allowed | required |
//! | `identity_secret` | key of `identifier_hash = hex(HMAC-SHA256(secret, identifier))` | none: identifiers are not verified |
//! | `attachment_types` | allowed upload types (`image/*` wildcards) | the manifest's (any) |
//! | `messages_per_minute` | per session, messages and uploads each | 20 |
//!
//! The session token is the visitor's alone: only its SHA-256 is stored, and
//! it never appears in an interaction, an event or a log line of ours.

pub mod visitor;

use super::media::{Credentials, MediaClient};
use super::{
    DeliveryError, Inbound, IntakeError, MediaRef, MediaResolver, Outbound, OutgoingMessage,
    RawRequest, SendReceipt, Verified, WebhookAck, WebhookIntake,
};
use crate::config::ChannelConfig;
use crate::domain::ChannelKind;
use crate::manifest::Manifest;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// Messages (and, separately, uploads) a session may send per minute by default.
pub const DEFAULT_MESSAGES_PER_MINUTE: u32 = 20;

/// New sessions one client address may open per minute (providers.md A8: limits per IP).
pub const NEW_SESSIONS_PER_MINUTE_PER_IP: u32 = 60;

/// How far a time-bound `identifier_hash` (`HMAC(secret, identifier.ts)`) may be off.
pub const IDENTITY_TS_SKEW_SECS: i64 = 300;

/// The channel settings of a web chat channel, read from its configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatSettings {
    pub allowed_origins: Vec<String>,
    pub identity_secret: Option<String>,
    pub attachment_types: Vec<String>,
    pub messages_per_minute: u32,
}

/// A list setting given as a TOML array or as one comma-separated string
/// (what an environment override gives).
fn string_list(cfg: &ChannelConfig, key: &str) -> Vec<String> {
    match cfg.settings.get(key) {
        Some(toml::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        Some(toml::Value::String(s)) => s
            .split([',', ' '])
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        _ => vec![],
    }
}

impl ChatSettings {
    pub fn from_config(cfg: &ChannelConfig, manifest: &Manifest) -> ChatSettings {
        let types = string_list(cfg, "attachment_types");
        let per_minute = cfg
            .settings
            .get("messages_per_minute")
            .and_then(|v| v.as_integer())
            .filter(|n| *n > 0)
            .map(|n| n.min(u32::MAX as i64) as u32)
            .unwrap_or(DEFAULT_MESSAGES_PER_MINUTE);
        ChatSettings {
            allowed_origins: string_list(cfg, "allowed_origins")
                .into_iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            identity_secret: cfg.str("identity_secret").map(str::to_string),
            attachment_types: if types.is_empty() {
                manifest.attachments.types.clone()
            } else {
                types
            },
            messages_per_minute: per_minute,
        }
    }

    /// Whether a page of `origin` may use this channel. `own` is the
    /// gateway's own origin (its `/chat/{id}` page), always allowed.
    pub fn origin_allowed(&self, origin: &str, own: &[String]) -> bool {
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        if origin.is_empty() || origin == "null" {
            return false;
        }
        own.contains(&origin)
            || self
                .allowed_origins
                .iter()
                .any(|a| a == "*" || *a == origin)
    }
}

/// The origin (`scheme://host[:port]`) of a URL, lower case, as browsers send it.
pub fn origin_of(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    let o = u.origin();
    o.is_tuple()
        .then(|| o.ascii_serialization().to_ascii_lowercase())
}

/// Checks `identifier_hash = hex(HMAC-SHA256(secret, message))` in constant
/// time; `message` is the identifier, or `identifier.ts` for the time-bound form.
pub fn verify_identifier(secret: &str, message: &str, hash_hex: &str) -> bool {
    let Ok(given) = hex::decode(hash_hex.trim()) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(message.as_bytes());
    let expected = mac.finalize().into_bytes();
    given.len() == expected.len() && bool::from(expected.as_slice().ct_eq(&given))
}

/// The hex HMAC a host site computes for an identifier (tests and docs).
pub fn identifier_hash(secret: &str, message: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// What the store keeps of a session token: its SHA-256, hex.
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A visitor's session, as stored under `chat-session:{id}` and
/// `chat-token:{sha256(token)}`. Holds no token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatSession {
    pub session_id: String,
    pub channel_id: String,
    /// The contact's digital ID: the session ID, or the verified identifier.
    pub digital_id: String,
    pub verified: bool,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// An upload, stored at once under its ID; its metadata under `chat-upload:{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatUpload {
    pub id: String,
    pub session_id: String,
    pub channel_id: String,
    pub filename: String,
    pub content_type: String,
    pub size: u64,
    pub created_at: DateTime<Utc>,
}

/// The media ID an uploaded file is attached by (resolved by [`ChatChannel`]).
pub fn upload_media_id(upload_id: &str) -> String {
    format!("chat-upload:{upload_id}")
}

/// A per-process key that signs the gateway's internal links to uploads.
/// The link is fetched by the same process that signed it (see [`ChatChannel::resolve`]).
fn internal_key() -> &'static [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    KEY.get_or_init(rand::random)
}

fn internal_signature(payload: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(internal_key()).expect("any key length");
    mac.update(payload.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// A short-lived signature for the internal download of an upload: `{expires}.{hex}`.
pub fn sign_internal(channel_id: &str, upload_id: &str, ttl: Duration) -> String {
    let expires = Utc::now().timestamp() + ttl.as_secs() as i64;
    let sig = internal_signature(&format!("{channel_id}:{upload_id}:{expires}"));
    format!("{expires}.{sig}")
}

/// Whether `token` (from [`sign_internal`]) is genuine, for this upload, and unexpired.
pub fn verify_internal(channel_id: &str, upload_id: &str, token: &str, now: i64) -> bool {
    let Some((expires, sig)) = token.split_once('.') else {
        return false;
    };
    let Ok(exp) = expires.parse::<i64>() else {
        return false;
    };
    let expected = internal_signature(&format!("{channel_id}:{upload_id}:{exp}"));
    bool::from(expected.as_bytes().ct_eq(sig.as_bytes())) && now <= exp
}

/// A sliding one-minute window per key (a session's messages, its uploads).
/// Per process: with several gateway processes a visitor whose reconnects
/// land on different ones gets at most that many times the limit.
pub struct RateLimiter {
    hits: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new()
    }
}

impl RateLimiter {
    pub fn new() -> RateLimiter {
        RateLimiter {
            hits: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one hit for `key`; `Err(seconds until one is allowed)` when over `per_minute`.
    pub fn check(&self, key: &str, per_minute: u32, now: Instant) -> Result<(), u64> {
        let window = Duration::from_secs(60);
        let mut hits = self.hits.lock();
        if hits.len() > 10_000 {
            hits.retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) < window));
        }
        let q = hits.entry(key.to_string()).or_default();
        while q.front().is_some_and(|t| now.duration_since(*t) >= window) {
            q.pop_front();
        }
        if q.len() >= per_minute as usize {
            let oldest = *q.front().expect("non-empty when at the limit");
            let wait = window.saturating_sub(now.duration_since(oldest));
            return Err(wait.as_secs().max(1));
        }
        q.push_back(now);
        Ok(())
    }
}

/// The process-wide limiter of web chat sessions.
pub fn rate_limiter() -> &'static RateLimiter {
    static LIMITER: OnceLock<RateLimiter> = OnceLock::new();
    LIMITER.get_or_init(RateLimiter::new)
}

/// A web chat channel. The gateway is the provider, so this adapter only
/// refuses webhooks, records sends and resolves uploads.
#[derive(Debug)]
pub struct ChatChannel {
    channel_id: String,
    /// Where this process serves itself (`http://127.0.0.1:{port}`), for internal upload links.
    internal_base: String,
}

/// The address this process can reach itself at, from the bound listen address.
pub fn internal_base(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(addr) => {
            let ip = match addr.ip() {
                std::net::IpAddr::V4(v4) if v4.is_unspecified() => {
                    std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
                }
                std::net::IpAddr::V6(v6) if v6.is_unspecified() => {
                    std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
                }
                ip => ip,
            };
            format!("http://{}", std::net::SocketAddr::new(ip, addr.port()))
        }
        Err(_) => format!("http://{listen}"),
    }
}

impl ChatChannel {
    /// `listen` is the address the server bound (port 0 already resolved).
    pub fn new(cfg: &ChannelConfig, listen: &str) -> Result<ChatChannel, String> {
        if cfg.kind != ChannelKind::Chat {
            return Err(format!(
                "channel {}: the web chat adapter serves chat channels, not {}",
                cfg.id, cfg.kind
            ));
        }
        Ok(ChatChannel {
            channel_id: cfg.id.clone(),
            internal_base: internal_base(listen),
        })
    }

    /// The media client that copies uploads into messages: it may fetch only
    /// from this process's own address, with no credentials.
    pub fn media_client(&self, cfg: &ChannelConfig, manifest: &Manifest) -> MediaClient {
        let mut own = cfg.clone();
        own.api_base = Some(self.internal_base.clone());
        let host = url::Url::parse(&self.internal_base)
            .ok()
            .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()))
            .unwrap_or_default();
        own.media_hosts = Some(vec![host]);
        MediaClient::new(&own, manifest, Credentials::None)
    }
}

impl WebhookIntake for ChatChannel {
    /// Web chat has no provider: nothing may post to `/webhooks/{id}`.
    fn verify<'a>(&self, _req: &RawRequest<'a>) -> Result<Verified<'a>, IntakeError> {
        Err(IntakeError::InvalidSignature(format!(
            "web chat channel {} takes no webhooks; visitors use /chat/{}",
            self.channel_id, self.channel_id
        )))
    }

    fn normalize(&self, _req: &Verified<'_>) -> Result<Vec<Inbound>, IntakeError> {
        Ok(vec![])
    }

    fn ack(&self) -> WebhookAck {
        WebhookAck {
            status: 200,
            content_type: "application/json",
            body: b"{}".to_vec(),
        }
    }
}

#[async_trait]
impl Outbound for ChatChannel {
    /// The reply is already in the store; the visitor's socket (on whichever
    /// process holds it) pushes it from the store's events.
    async fn send(&self, msg: &OutgoingMessage) -> Result<SendReceipt, DeliveryError> {
        Ok(SendReceipt {
            provider_id: format!("chat:{}", msg.id),
            ..SendReceipt::default()
        })
    }
}

#[async_trait]
impl MediaResolver for ChatChannel {
    /// An upload (`chat-upload:{id}`) becomes a signed, one-minute link to
    /// this process's own `GET /chat/{channel}/attachments/{id}`, so the
    /// gateway copies it into the message like any provider's media.
    async fn resolve(&self, media: &MediaRef) -> Result<MediaRef, String> {
        let id = media
            .media_id
            .as_deref()
            .and_then(|m| m.strip_prefix("chat-upload:"))
            .ok_or_else(|| "not a web chat upload".to_string())?;
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!("not a web chat upload: {id}"));
        }
        let token = sign_internal(&self.channel_id, id, Duration::from_secs(60));
        Ok(MediaRef {
            url: format!(
                "{}/chat/{}/attachments/{id}?internal={token}",
                self.internal_base, self.channel_id
            ),
            content_type: media.content_type.clone(),
            filename: media.filename.clone(),
            media_id: None,
        })
    }
}

/// What `switchboard simulate` does for a web chat channel: a visitor opens
/// a session at the gateway `url` and sends `text` over the HTTP fallback,
/// as the widget would. Answers the session ID (the visitor's digital ID).
pub async fn simulate_visitor(
    url: &str,
    channel_id: &str,
    text: &str,
    name: Option<&str>,
) -> Result<String, String> {
    let http = reqwest::Client::new();
    let base = url.trim_end_matches('/');
    let fail = |what: &str, e: String| format!("web chat {what}: {e}");
    let r = http
        .post(format!("{base}/chat/{channel_id}/sessions"))
        .json(&serde_json::json!({"name": name.unwrap_or("Simulated visitor")}))
        .send()
        .await
        .map_err(|e| fail("session", e.to_string()))?;
    let status = r.status();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    if !status.is_success() {
        return Err(fail("session", format!("HTTP {status}: {v}")));
    }
    let (Some(session_id), Some(token)) = (v["session_id"].as_str(), v["token"].as_str()) else {
        return Err(fail("session", format!("unexpected answer {v}")));
    };
    let r = http
        .post(format!("{base}/chat/{channel_id}/messages"))
        .bearer_auth(token)
        .json(&serde_json::json!({"client_message_id": crate::domain::new_id(), "text": text}))
        .send()
        .await
        .map_err(|e| fail("message", e.to_string()))?;
    let status = r.status();
    if !status.is_success() {
        let body = r.text().await.unwrap_or_default();
        return Err(fail("message", format!("HTTP {status}: {body}")));
    }
    Ok(session_id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> ChannelConfig {
        toml::from_str(&format!(
            "id = \"chat-main\"\nkind = \"chat\"\nqueue = \"support\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn the_identity_hash_matches_the_published_vector() {
        // providers.md appendix, vector 12.
        let h = "aa747c502a898200f9e4fa21bac68136f886a0e27aec70ba06daf2e2a5cb5597";
        assert_eq!(identifier_hash("secret", "Message"), h);
        assert!(verify_identifier("secret", "Message", h));
        assert!(verify_identifier("secret", "Message", &h.to_uppercase()));
        assert!(!verify_identifier("secret", "Message2", h));
        assert!(!verify_identifier("secret2", "Message", h));
        assert!(!verify_identifier("secret", "Message", &h[..62]));
        assert!(!verify_identifier("secret", "Message", "zz"));
    }

    #[test]
    fn settings_read_lists_from_arrays_and_strings() {
        let m = crate::manifest::get(ChannelKind::Chat);
        let s = ChatSettings::from_config(
            &cfg("allowed_origins = [\"https://Shop.example/\"]\nmessages_per_minute = 3\nattachment_types = \"image/*, application/pdf\""),
            m,
        );
        assert_eq!(s.allowed_origins, vec!["https://shop.example"]);
        assert_eq!(s.messages_per_minute, 3);
        assert_eq!(s.attachment_types, vec!["image/*", "application/pdf"]);
        let d = ChatSettings::from_config(&cfg("allowed_origins = \"https://a.example\""), m);
        assert_eq!(d.messages_per_minute, DEFAULT_MESSAGES_PER_MINUTE);
        assert_eq!(d.attachment_types, m.attachments.types);
        assert!(d.origin_allowed("https://a.example", &[]));
        assert!(!d.origin_allowed("https://b.example", &[]));
        assert!(!d.origin_allowed("null", &[]));
        assert!(d.origin_allowed("http://127.0.0.1:8080", &["http://127.0.0.1:8080".into()]));
    }

    #[test]
    fn internal_links_are_bound_to_the_upload_and_expire() {
        let t = sign_internal("chat-main", "abc", Duration::from_secs(60));
        let now = Utc::now().timestamp();
        assert!(verify_internal("chat-main", "abc", &t, now));
        assert!(!verify_internal("chat-main", "abd", &t, now));
        assert!(!verify_internal("chat-other", "abc", &t, now));
        assert!(!verify_internal("chat-main", "abc", &t, now + 61));
        assert!(!verify_internal("chat-main", "abc", "1.00", now));
    }

    #[test]
    fn the_rate_limit_is_a_sliding_minute() {
        let l = RateLimiter::new();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check("s", 3, t0).is_ok());
        }
        assert!(l.check("s", 3, t0).is_err());
        assert!(l.check("other", 3, t0).is_ok());
        assert!(l.check("s", 3, t0 + Duration::from_secs(61)).is_ok());
    }

    #[test]
    fn the_internal_base_reaches_this_process() {
        assert_eq!(internal_base("0.0.0.0:8080"), "http://127.0.0.1:8080");
        assert_eq!(internal_base("[::]:80"), "http://[::1]:80");
        assert_eq!(internal_base("127.0.0.1:9"), "http://127.0.0.1:9");
    }
}
