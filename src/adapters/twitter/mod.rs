//! X (Twitter) direct messages: Account Activity API webhooks in, X API v2
//! out (providers.md A6, A9).
//!
//! | direction | what | where |
//! | --- | --- | --- |
//! | in | `GET /webhooks/{channel}?crc_token=...` answered 200 JSON `{"response_token": "sha256=<base64 HMAC-SHA256(consumer_secret, crc_token)>"}` | [`crc_response`] |
//! | in | `POST /webhooks/{channel}`, JSON, `x-twitter-webhooks-signature: sha256=<base64 HMAC-SHA256(consumer_secret, raw body)>`, compared in constant time | [`verify`] |
//! | in | DMs (text, one media attachment, quick-reply answers), echoes of our account's DMs, typing, reads, authorization revoked — for the channel's `user_id` only | [`normalize`] |
//! | in | the answer: 200, empty | [`WebhookIntake::ack`] |
//! | out | `POST {api_base}/2/dm_conversations/with/{participant_id}/messages`, the attachment uploaded first through `POST {api_base}/2/media/upload` | [`send`] |
//! | tokens | OAuth 2.0 user access token (two hours), refreshed with `client_id` / `client_secret` / `refresh_token`, rotated tokens kept in the store | [`tokens`] |
//! | media | `media_url_https` on ton.twitter.com, with the user access token as a bearer | [`media_credentials`], [`XChannel::current_token`] |
//! | both | the payloads `switchboard simulate` sends | [`simulate_inbound`], [`simulate_payload`] |
//!
//! Settings (`channels/twitter.toml`): `consumer_secret` (the app's API key
//! secret: CRC and signatures), `user_id` (the numeric ID of the account whose
//! DMs this channel handles), `access_token` (OAuth 2.0 user context; the DM
//! scopes `dm.read dm.write tweet.read users.read`, `media.write` for uploads
//! and `offline.access` for a refresh token — the exact list is unverified,
//! providers.md A6.4), and, to refresh it, `client_id`, `client_secret`
//! (confidential clients) and `refresh_token`.

pub mod normalize;
pub mod send;
pub mod tokens;

use super::media::Credentials;
use super::{
    DeliveryError, Inbound, IntakeError, Outbound, OutgoingMessage, RawRequest, SendReceipt,
    SimulatedRequest, Verified, WebhookAck, WebhookIntake,
};
use crate::config::ChannelConfig;
use crate::domain::ChannelKind;
use crate::store::DynStore;
use async_trait::async_trait;
use base64::Engine;
use chrono::Utc;
use hmac::{Hmac, Mac};

/// The header X signs webhooks with.
pub const SIGNATURE_HEADER: &str = "x-twitter-webhooks-signature";

/// X's API root, when neither the channel nor the manifest names one.
const DEFAULT_API_BASE: &str = "https://api.x.com";

fn hmac_base64(secret: &str, message: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(message);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The `response_token` of the CRC check: `sha256=` and the base64
/// HMAC-SHA256 of `crc_token` keyed with the consumer secret.
pub fn crc_response(consumer_secret: &str, crc_token: &str) -> String {
    format!(
        "sha256={}",
        hmac_base64(consumer_secret, crc_token.as_bytes())
    )
}

/// The signature header value X sends with `body` (for `simulate` and tests).
pub fn sign(consumer_secret: &str, body: &[u8]) -> String {
    format!("sha256={}", hmac_base64(consumer_secret, body))
}

/// Answers X's CRC check: `GET ?crc_token=...` is 200 with
/// `{"response_token": "sha256=..."}` as JSON.
pub fn handshake(query: &str, consumer_secret: &str) -> Result<WebhookAck, IntakeError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|_| IntakeError::Malformed("the CRC query could not be read".into()))?;
    let token = pairs
        .iter()
        .find(|(k, _)| k == "crc_token")
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| IntakeError::Malformed("expected crc_token".into()))?;
    let body = serde_json::json!({"response_token": crc_response(consumer_secret, token)});
    Ok(WebhookAck {
        status: 200,
        content_type: "application/json",
        body: body.to_string().into_bytes(),
    })
}

/// Checks `x-twitter-webhooks-signature: sha256=<base64>` over the raw body
/// with the consumer secret, in constant time. Nothing is parsed before it passes.
pub fn verify<'a>(
    req: &RawRequest<'a>,
    consumer_secret: &str,
) -> Result<Verified<'a>, IntakeError> {
    let header = req.header(SIGNATURE_HEADER).ok_or_else(|| {
        IntakeError::InvalidSignature("missing x-twitter-webhooks-signature".into())
    })?;
    let sig = header
        .strip_prefix("sha256=")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .filter(|s| s.len() == 32)
        .ok_or_else(|| {
            IntakeError::InvalidSignature(
                "x-twitter-webhooks-signature is not sha256= and a base64 SHA-256 digest".into(),
            )
        })?;
    if consumer_secret.is_empty() {
        return Err(IntakeError::InvalidSignature(
            "the channel has no consumer_secret".into(),
        ));
    }
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(consumer_secret.as_bytes()).expect("any key length");
    mac.update(req.body);
    mac.verify_slice(&sig).map_err(|_| {
        IntakeError::InvalidSignature("x-twitter-webhooks-signature does not match".into())
    })?;
    Ok(Verified::new(req))
}

/// Parses a verified body as JSON, or says why not.
fn json_body(v: &Verified<'_>) -> Result<serde_json::Value, IntakeError> {
    if !v.content_type().is_empty() && !v.content_type().starts_with("application/json") {
        return Err(IntakeError::UnsupportedMediaType(format!(
            "X webhooks are application/json, not {}",
            v.content_type()
        )));
    }
    let body = std::str::from_utf8(v.body())
        .map_err(|_| IntakeError::Malformed("the body is not UTF-8".into()))?;
    serde_json::from_str(body)
        .map_err(|e| IntakeError::Malformed(format!("the body is not JSON: {e}")))
}

/// `api_base` of a channel: the configured one or the manifest's, without a trailing slash.
pub fn api_base(cfg: &ChannelConfig) -> String {
    cfg.api_base
        .as_deref()
        .or(crate::manifest::get(ChannelKind::Twitter)
            .default_api_base
            .as_deref())
        .unwrap_or(DEFAULT_API_BASE)
        .trim_end_matches('/')
        .to_string()
}

/// Credentials for media downloads: the configured user access token as a
/// bearer (CONTRACT: it serves media download too). It rotates every two
/// hours once refreshing is configured: [`XChannel::current_token`] has the
/// one in force.
pub fn media_credentials(cfg: &ChannelConfig) -> Credentials {
    match cfg.str("access_token") {
        Some(t) => Credentials::Bearer(t.to_string()),
        None => Credentials::None,
    }
}

/// An X direct-message channel: one X account (`user_id`) of one X app.
pub struct XChannel {
    id: String,
    user_id: String,
    consumer_secret: String,
    api: send::Api,
    tokens: tokens::Tokens,
}

impl std::fmt::Debug for XChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets or the tokens.
        f.debug_struct("XChannel")
            .field("id", &self.id)
            .field("user_id", &self.user_id)
            .field("api_base", &self.api.api_base)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl XChannel {
    pub fn new(cfg: &ChannelConfig, store: DynStore) -> Result<XChannel, String> {
        if cfg.kind != ChannelKind::Twitter {
            return Err(format!(
                "channel {}: the X adapter serves twitter channels, not {}",
                cfg.id, cfg.kind
            ));
        }
        let need = |key: &str| {
            cfg.str(key).map(str::to_string).ok_or_else(|| {
                format!(
                    "channel {}: {key}: missing (required for twitter channels)",
                    cfg.id
                )
            })
        };
        let consumer_secret = need("consumer_secret")?;
        let user_id = need("user_id")?;
        let access_token = need("access_token")?;
        if !user_id.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!(
                "channel {}: user_id: not an X user ID (digits expected): {user_id}",
                cfg.id
            ));
        }
        let client_id = cfg.str("client_id");
        let refresh_token = cfg.str("refresh_token");
        match (client_id, refresh_token) {
            (Some(_), None) => {
                return Err(format!(
                    "channel {}: refresh_token: missing (client_id is set: both are needed to refresh the access token)",
                    cfg.id
                ))
            }
            (None, Some(_)) => {
                return Err(format!(
                    "channel {}: client_id: missing (refresh_token is set: both are needed to refresh the access token)",
                    cfg.id
                ))
            }
            _ => {}
        }
        if cfg.str("client_secret").is_some() && client_id.is_none() {
            return Err(format!(
                "channel {}: client_id: missing (client_secret is set)",
                cfg.id
            ));
        }
        let api_base = api_base(cfg);
        match url::Url::parse(&api_base) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            Ok(_) => {
                return Err(format!(
                    "channel {}: api_base: not an http(s) URL: {api_base}",
                    cfg.id
                ))
            }
            Err(e) => {
                return Err(format!(
                    "channel {}: api_base: not a URL ({e}): {api_base}",
                    cfg.id
                ))
            }
        }
        let client = client_id.map(|id| tokens::Client {
            id: id.to_string(),
            secret: cfg.str("client_secret").map(str::to_string),
        });
        Ok(XChannel {
            id: cfg.id.clone(),
            tokens: tokens::Tokens::new(
                store,
                &cfg.id,
                &api_base,
                &access_token,
                refresh_token,
                client,
            ),
            api: send::Api::new(&api_base),
            user_id,
            consumer_secret,
        })
    }

    /// The X account whose DMs this channel handles.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The X API root, without a trailing slash.
    pub fn api_base(&self) -> &str {
        &self.api.api_base
    }

    /// Whether the channel refreshes its access token (client_id and refresh_token set).
    pub fn refreshes_tokens(&self) -> bool {
        self.tokens.can_refresh()
    }

    /// The user access token in force, refreshed first when it is about to
    /// expire: for media downloads, whose credentials must follow the rotation.
    pub async fn current_token(&self) -> Result<String, DeliveryError> {
        self.tokens.current().await
    }
}

impl WebhookIntake for XChannel {
    fn handshake(&self, query: &str) -> Option<Result<WebhookAck, IntakeError>> {
        Some(handshake(query, &self.consumer_secret))
    }

    fn verify<'a>(&self, req: &RawRequest<'a>) -> Result<Verified<'a>, IntakeError> {
        verify(req, &self.consumer_secret)
    }

    fn normalize(&self, req: &Verified<'_>) -> Result<Vec<Inbound>, IntakeError> {
        let body = json_body(req)?;
        normalize::normalize(&self.user_id, &body, Utc::now())
    }

    fn ack(&self) -> WebhookAck {
        WebhookAck {
            status: 200,
            content_type: "text/plain",
            body: vec![],
        }
    }
}

#[async_trait]
impl Outbound for XChannel {
    async fn send(&self, msg: &OutgoingMessage) -> Result<SendReceipt, DeliveryError> {
        send::send(&self.api, &self.tokens, msg).await
    }
}

/// Any body signed with the channel's `consumer_secret` as X would post it
/// to the channel's webhook: for `simulate --file` with a file of
/// `fixtures/twitter/`. The bytes go as they are (without trailing
/// whitespace), so a broken body reaches the gateway broken, correctly
/// signed, and is answered `malformed_payload`.
pub fn simulate_payload(cfg: &ChannelConfig, body: &[u8]) -> SimulatedRequest {
    let body = body.trim_ascii_end().to_vec();
    let secret = cfg.str("consumer_secret").unwrap_or("");
    SimulatedRequest {
        path: format!("/webhooks/{}", cfg.id),
        content_type: "application/json".to_string(),
        headers: vec![(SIGNATURE_HEADER.to_string(), sign(secret, &body))],
        body,
    }
}

/// A DM from the X user `from` (numeric ID) named `name`, exactly as the
/// Account Activity API posts it: one `message_create` event with ID
/// `event_id` for the channel's `user_id`, the `users` map, signed with the
/// channel's `consumer_secret`.
pub fn simulate_inbound(
    cfg: &ChannelConfig,
    from: &str,
    name: &str,
    text: &str,
    event_id: &str,
) -> SimulatedRequest {
    let us = cfg.str("user_id").unwrap_or("0");
    let now = Utc::now().timestamp_millis().to_string();
    let user = |id: &str, name: &str| {
        let screen: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(15)
            .collect();
        serde_json::json!({
            "id": id,
            "created_timestamp": "1422556069340",
            "name": name,
            "screen_name": if screen.is_empty() { format!("user{id}") } else { screen },
            "protected": false,
            "verified": false,
            "followers_count": 0,
            "friends_count": 0,
            "statuses_count": 0,
            "profile_image_url_https": "https://abs.twimg.com/sticky/default_profile_images/default_profile_normal.png",
        })
    };
    let mut users = serde_json::Map::new();
    users.insert(from.to_string(), user(from, name));
    users.insert(
        us.to_string(),
        user(us, cfg.name.as_deref().unwrap_or("us")),
    );
    let body = serde_json::json!({
        "for_user_id": us,
        "direct_message_events": [{
            "type": "message_create",
            "id": event_id,
            "created_timestamp": now,
            "message_create": {
                "target": {"recipient_id": us},
                "sender_id": from,
                "message_data": {
                    "text": text,
                    "entities": {"hashtags": [], "symbols": [], "user_mentions": [], "urls": []},
                },
            },
        }],
        "users": users,
    });
    simulate_payload(cfg, body.to_string().as_bytes())
}

#[async_trait::async_trait]
impl crate::adapters::media::TokenSource for XChannel {
    async fn bearer(&self) -> Result<String, String> {
        self.current_token().await.map_err(|e| e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::InboundMessage;
    use crate::store::embedded::EmbeddedStore;
    use std::time::Duration;

    const SECRET: &str = "TEST_CONSUMER_SECRET";
    const OUR: &str = "1349812765430517760";

    fn cfg(extra: &str) -> ChannelConfig {
        toml::from_str(&format!(
            r#"
            id = "x-main"
            kind = "twitter"
            queue = "support"
            consumer_secret = "{SECRET}"
            user_id = "{OUR}"
            access_token = "VGhlQWNjZXNzVG9rZW4"
            {extra}
            "#
        ))
        .unwrap()
    }

    fn store() -> (DynStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let s: DynStore = EmbeddedStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        (s, dir)
    }

    fn channel(extra: &str) -> (XChannel, tempfile::TempDir) {
        let (s, dir) = store();
        (XChannel::new(&cfg(extra), s).unwrap(), dir)
    }

    fn raw<'a>(headers: &'a [(String, String)], body: &'a [u8]) -> RawRequest<'a> {
        RawRequest {
            path: "/webhooks/x-main",
            query: "",
            headers: headers.into(),
            content_type: "application/json",
            body,
        }
    }

    fn header(value: &str) -> Vec<(String, String)> {
        vec![(SIGNATURE_HEADER.to_string(), value.to_string())]
    }

    /// providers.md appendix row 9 (checked independently with Python's
    /// `hmac`): if this breaks, X marks the webhook invalid and stops
    /// delivering DMs.
    #[test]
    fn the_crc_answer_matches_the_vector() {
        assert_eq!(
            crc_response("TEST_CONSUMER_SECRET", "challenge_string"),
            "sha256=up1n6pdhR9u5Q3J9tQx1h/D3GpBw+nRvrCiWJWPFY8E="
        );
        let (ch, _dir) = channel("");
        let ack = ch
            .handshake("crc_token=challenge_string&nonce=abc")
            .unwrap()
            .unwrap();
        assert_eq!(ack.status, 200);
        assert_eq!(ack.content_type, "application/json");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&ack.body).unwrap(),
            serde_json::json!({"response_token": "sha256=up1n6pdhR9u5Q3J9tQx1h/D3GpBw+nRvrCiWJWPFY8E="})
        );
        // Percent-encoded tokens are decoded before signing.
        let ack = ch.handshake("crc_token=a%2Bb%3D").unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&ack.body).unwrap();
        assert_eq!(v["response_token"], crc_response(SECRET, "a+b="));
    }

    #[test]
    fn a_handshake_without_crc_token_is_malformed() {
        let (ch, _dir) = channel("");
        for q in ["", "crc_token=", "hub.challenge=1"] {
            assert!(
                matches!(ch.handshake(q), Some(Err(IntakeError::Malformed(_)))),
                "{q}"
            );
        }
    }

    /// providers.md appendix row 10: if this breaks, X's webhooks are refused.
    #[test]
    fn the_post_vector_verifies() {
        let body = br#"{"for_user_id":"2244994945"}"#;
        assert_eq!(
            sign(SECRET, body),
            "sha256=4BbSaYAbO7VgHcSje7pyj3YESiR5/co8zv5EjOfAMBI="
        );
        let (ch, _dir) = channel("");
        let h = header("sha256=4BbSaYAbO7VgHcSje7pyj3YESiR5/co8zv5EjOfAMBI=");
        assert!(ch.verify(&raw(&h, body)).is_ok());
    }

    /// If this breaks, anyone can post DMs into the gateway.
    #[test]
    fn forged_missing_and_malformed_signatures_are_refused() {
        let body = br#"{"for_user_id":"2244994945"}"#;
        let (ch, _dir) = channel("");
        let forged = [
            sign("ANOTHER_SECRET", body),
            // The right signature of another body.
            sign(SECRET, br#"{"for_user_id":"2244994946"}"#),
            // Hex, as Meta would send it, is not X's format.
            format!(
                "sha256={}",
                hex::encode(
                    base64::engine::general_purpose::STANDARD
                        .decode("4BbSaYAbO7VgHcSje7pyj3YESiR5/co8zv5EjOfAMBI=")
                        .unwrap()
                )
            ),
            "sha256=".into(),
            "4BbSaYAbO7VgHcSje7pyj3YESiR5/co8zv5EjOfAMBI=".into(),
            "sha1=4BbSaYAbO7VgHcSje7pyj3YESiR5/co8zv5EjOfAMBI=".into(),
            "sha256=4BbSaYAbO7VgHcSje7pyj3YESiR5".into(),
            "sha256=not base64!".into(),
        ];
        for value in forged {
            assert!(
                matches!(
                    ch.verify(&raw(&header(&value), body)),
                    Err(IntakeError::InvalidSignature(_))
                ),
                "{value}"
            );
        }
        assert_eq!(
            ch.verify(&raw(&[], body)).unwrap_err(),
            IntakeError::InvalidSignature("missing x-twitter-webhooks-signature".into())
        );
        // The header name is case-insensitive, as HTTP's are.
        let upper = vec![(
            "X-Twitter-Webhooks-Signature".to_string(),
            sign(SECRET, body),
        )];
        assert!(ch.verify(&raw(&upper, body)).is_ok());
    }

    fn through(ch: &XChannel, sim: &SimulatedRequest) -> Result<Vec<Inbound>, IntakeError> {
        let req = RawRequest {
            path: &sim.path,
            query: "",
            headers: (&sim.headers).into(),
            content_type: &sim.content_type,
            body: &sim.body,
        };
        let v = ch.verify(&req)?;
        ch.normalize(&v)
    }

    /// If this breaks, `switchboard simulate` posts something the channel refuses.
    #[test]
    fn simulate_inbound_is_signed_and_normalizes_to_the_dm() {
        let (ch, _dir) = channel("");
        let c = cfg("");
        let sim = simulate_inbound(
            &c,
            "2874619305",
            "Kerry Lindqvist",
            "Hej 👋",
            "1861149375081234490",
        );
        assert_eq!(sim.path, "/webhooks/x-main");
        assert_eq!(sim.content_type, "application/json");
        let items = through(&ch, &sim).unwrap();
        assert_eq!(items.len(), 1);
        match &items[0] {
            Inbound::Message(m) => {
                let sent_at = m.sent_at;
                assert!((Utc::now() - sent_at).num_seconds().abs() < 60);
                assert_eq!(
                    m,
                    &InboundMessage {
                        provider_id: "1861149375081234490".into(),
                        from: "2874619305".into(),
                        contact_name: Some("Kerry Lindqvist".into()),
                        text: "Hej 👋".into(),
                        sent_at,
                        ..InboundMessage::default()
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        // Tampered with after signing: refused.
        let mut bad = sim.clone();
        bad.body.push(b' ');
        assert!(matches!(
            through(&ch, &bad),
            Err(IntakeError::InvalidSignature(_))
        ));
    }

    /// If this breaks, `simulate --file` of a fixture is refused or normalized differently.
    #[test]
    fn simulate_payload_signs_fixtures_as_they_are() {
        let (ch, _dir) = channel("");
        let path = format!("{}/fixtures/twitter/echo.json", env!("CARGO_MANIFEST_DIR"));
        let body = std::fs::read(path).unwrap();
        let sim = simulate_payload(&cfg(""), &body);
        assert_eq!(sim.body, body.trim_ascii_end());
        assert!(matches!(
            through(&ch, &sim).unwrap().as_slice(),
            [Inbound::Echo(_)]
        ));
        let broken = simulate_payload(&cfg(""), b"{not json");
        assert!(matches!(
            through(&ch, &broken),
            Err(IntakeError::Malformed(_))
        ));
        let unhandled = simulate_payload(
            &cfg(""),
            format!(r#"{{"for_user_id":"{OUR}","follow_events":[]}}"#).as_bytes(),
        );
        assert_eq!(through(&ch, &unhandled), Ok(vec![]));
    }

    #[test]
    fn other_content_types_are_refused_after_verification() {
        let (ch, _dir) = channel("");
        let body = b"for_user_id=1";
        let h = header(&sign(SECRET, body));
        let req = RawRequest {
            content_type: "application/x-www-form-urlencoded",
            ..raw(&h, body)
        };
        let v = ch.verify(&req).unwrap();
        assert!(matches!(
            ch.normalize(&v),
            Err(IntakeError::UnsupportedMediaType(_))
        ));
    }

    /// If this breaks, channels start with the wrong API root or identity.
    #[test]
    fn new_reads_the_settings() {
        let (ch, _dir) = channel("");
        assert_eq!(ch.user_id(), OUR);
        assert_eq!(ch.api_base(), "https://api.x.com");
        assert!(!ch.refreshes_tokens());
        let mut c = cfg(r#"client_id = "cid"
            client_secret = "csecret"
            refresh_token = "rtok""#);
        c.api_base = Some("http://127.0.0.1:9/".into());
        let (s, _d) = store();
        let ch = XChannel::new(&c, s).unwrap();
        assert_eq!(ch.api_base(), "http://127.0.0.1:9");
        assert!(ch.refreshes_tokens());
        // A public client has no secret.
        let (s, _d) = store();
        let ch = XChannel::new(&cfg("client_id = \"cid\"\nrefresh_token = \"rtok\""), s).unwrap();
        assert!(ch.refreshes_tokens());
        assert!(!format!("{ch:?}").contains("VGhlQWNjZXNzVG9rZW4"));
        assert!(!format!("{ch:?}").contains(SECRET));
    }

    /// If this breaks, a misconfigured channel starts and fails on every webhook or send.
    #[test]
    fn new_names_the_missing_or_bad_setting() {
        for key in ["consumer_secret", "user_id", "access_token"] {
            let mut c = cfg("");
            c.settings.remove(key);
            let (s, _d) = store();
            assert_eq!(
                XChannel::new(&c, s).err().unwrap(),
                format!("channel x-main: {key}: missing (required for twitter channels)")
            );
        }
        let bad = [
            (
                "client_id = \"cid\"",
                "channel x-main: refresh_token: missing (client_id is set: both are needed to refresh the access token)",
            ),
            (
                "refresh_token = \"r\"",
                "channel x-main: client_id: missing (refresh_token is set: both are needed to refresh the access token)",
            ),
            (
                "client_secret = \"s\"",
                "channel x-main: client_id: missing (client_secret is set)",
            ),
        ];
        for (extra, expected) in bad {
            let (s, _d) = store();
            assert_eq!(XChannel::new(&cfg(extra), s).err().unwrap(), expected);
        }
        let mut c = cfg("");
        c.settings.insert("user_id".into(), "AcmeSupport".into());
        let (s, _d) = store();
        assert_eq!(
            XChannel::new(&c, s).err().unwrap(),
            "channel x-main: user_id: not an X user ID (digits expected): AcmeSupport"
        );
        let mut c = cfg("");
        c.api_base = Some("api.x.com".into());
        let (s, _d) = store();
        assert!(XChannel::new(&c, s)
            .err()
            .unwrap()
            .starts_with("channel x-main: api_base: not a URL"));
        let mut c = cfg("");
        c.kind = ChannelKind::Sms;
        let (s, _d) = store();
        assert!(XChannel::new(&c, s).is_err());
    }

    #[test]
    fn the_ack_is_an_empty_200_and_media_use_the_bearer_token() {
        let (ch, _dir) = channel("");
        let ack = ch.ack();
        assert_eq!((ack.status, ack.body.len()), (200, 0));
        match media_credentials(&cfg("")) {
            Credentials::Bearer(t) => assert_eq!(t, "VGhlQWNjZXNzVG9rZW4"),
            other => panic!("{other:?}"),
        }
    }

    /// If this breaks, media downloads use a token other than the one in force.
    #[tokio::test]
    async fn without_refresh_settings_the_configured_token_is_current() {
        let (ch, _dir) = channel("");
        assert_eq!(ch.current_token().await.unwrap(), "VGhlQWNjZXNzVG9rZW4");
    }
}
