//! Facebook Messenger and Instagram Direct over Meta's Messenger Platform
//! (providers.md A1, A3, A4). One adapter serves both kinds: their webhooks
//! are the same `messaging[]` events and their Send API is the same call;
//! Instagram adds story mentions, shares, reels, `is_unsupported` and read
//! events that name a `mid`.
//!
//! | direction | what | where |
//! | --- | --- | --- |
//! | in | `GET` handshake `hub.mode` / `hub.verify_token` / `hub.challenge` | [`super::meta::handshake`] |
//! | in | `POST /webhooks/{channel}`, JSON, `X-Hub-Signature-256` with the app secret (or the previous one) | [`super::meta::verify`] |
//! | in | every `entry[]` of the channel's Page / IG account, every `messaging[]` event: messages, echoes, postbacks, reactions, unsent messages, delivery and read watermarks | [`normalize`] |
//! | in | the answer: 200 `EVENT_RECEIVED` | [`super::meta::ack`] |
//! | out | `POST {api_base}/{page_id or ig_account_id}/messages`, bearer token; one send per attachment (by URL), then the text | [`send`] |
//! | media | pre-signed CDN URLs (`payload.url`): no credentials, only from `media_hosts` | [`media_credentials`], [`super::media`] |
//! | both | the payloads `switchboard simulate` sends | [`simulate_inbound`], [`simulate_payload`] |
//!
//! | setting | facebook | instagram |
//! | --- | --- | --- |
//! | webhook `object` | `page` | `instagram` |
//! | the channel's ID (`entry[].id`, the send path) | `page_id` | `ig_account_id` |
//! | Graph token | `page_access_token` | `access_token` |
//! | text limit | 2,000 characters | 1,000 UTF-8 bytes |
//! | `metadata` on sends (echoed back) | yes | no (not documented for Instagram) |

pub mod normalize;
pub mod send;

use super::media::Credentials;
use super::meta::{self, GraphClient};
use super::{
    DeliveryError, Inbound, IntakeError, Outbound, OutgoingMessage, RawRequest, SendReceipt,
    SimulatedRequest, Verified, WebhookAck, WebhookIntake,
};
use crate::config::ChannelConfig;
use crate::domain::ChannelKind;
use async_trait::async_trait;
use chrono::Utc;

/// Meta's default Graph API root (with the version), when neither the channel
/// nor the manifest names one.
const DEFAULT_API_BASE: &str = "https://graph.facebook.com/v25.0";

/// A Messenger (Facebook Page) or Instagram Direct channel.
pub struct MessengerChannel {
    kind: ChannelKind,
    /// The Page ID (facebook) or Instagram professional account ID (instagram).
    account_id: String,
    /// The app secret, then `app_secret_previous` during a rotation.
    app_secrets: Vec<String>,
    verify_token: String,
    graph: GraphClient,
}

impl std::fmt::Debug for MessengerChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets or the token.
        f.debug_struct("MessengerChannel")
            .field("kind", &self.kind)
            .field("account_id", &self.account_id)
            .field("api_base", &self.graph.api_base)
            .finish_non_exhaustive()
    }
}

/// The webhook `object` Meta uses for a kind.
pub fn webhook_object(kind: ChannelKind) -> &'static str {
    match kind {
        ChannelKind::Instagram => "instagram",
        _ => "page",
    }
}

/// The setting naming the channel's own ID: `page_id` or `ig_account_id`.
pub fn account_key(kind: ChannelKind) -> &'static str {
    match kind {
        ChannelKind::Instagram => "ig_account_id",
        _ => "page_id",
    }
}

/// The setting holding the Graph token: `page_access_token` or `access_token`.
pub fn token_key(kind: ChannelKind) -> &'static str {
    match kind {
        ChannelKind::Instagram => "access_token",
        _ => "page_access_token",
    }
}

/// `api_base` of a channel: the configured one or the manifest's, without a trailing slash.
pub fn api_base(cfg: &ChannelConfig) -> String {
    cfg.api_base
        .as_deref()
        .or(crate::manifest::get(cfg.kind).default_api_base.as_deref())
        .unwrap_or(DEFAULT_API_BASE)
        .trim_end_matches('/')
        .to_string()
}

/// Messenger and Instagram attachment URLs are pre-signed CDN links: no
/// credentials are sent with them (and the Graph token never leaves `api_base`).
pub fn media_credentials(_cfg: &ChannelConfig) -> Credentials {
    Credentials::None
}

impl MessengerChannel {
    pub fn new(cfg: &ChannelConfig) -> Result<MessengerChannel, String> {
        let kind = cfg.kind;
        if !matches!(kind, ChannelKind::Facebook | ChannelKind::Instagram) {
            return Err(format!(
                "channel {}: the Messenger adapter serves facebook and instagram channels, not {kind}",
                cfg.id
            ));
        }
        let need = |key: &str| {
            cfg.str(key).map(str::to_string).ok_or_else(|| {
                format!(
                    "channel {}: {key}: missing (required for {kind} channels)",
                    cfg.id
                )
            })
        };
        let mut app_secrets = vec![need("app_secret")?];
        app_secrets.extend(cfg.str("app_secret_previous").map(str::to_string));
        let verify_token = need("verify_token")?;
        let token = need(token_key(kind))?;
        let account_id = need(account_key(kind))?;
        // It goes into the send path: digits as Meta gives them, nothing that
        // could change the URL.
        if !account_id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!(
                "channel {}: {}: not a Meta ID (digits expected): {account_id}",
                cfg.id,
                account_key(kind)
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
        Ok(MessengerChannel {
            kind,
            account_id,
            app_secrets,
            verify_token,
            graph: GraphClient::new(&api_base, &token),
        })
    }

    pub fn kind(&self) -> ChannelKind {
        self.kind
    }

    /// The Page ID or Instagram account ID this channel answers for.
    pub fn account_id(&self) -> &str {
        &self.account_id
    }

    /// The Graph API root, without a trailing slash.
    pub fn api_base(&self) -> &str {
        &self.graph.api_base
    }
}

impl WebhookIntake for MessengerChannel {
    fn handshake(&self, query: &str) -> Option<Result<WebhookAck, IntakeError>> {
        Some(meta::handshake(query, &self.verify_token))
    }

    fn verify<'a>(&self, req: &RawRequest<'a>) -> Result<Verified<'a>, IntakeError> {
        let secrets: Vec<&str> = self.app_secrets.iter().map(String::as_str).collect();
        meta::verify(req, &secrets)
    }

    fn normalize(&self, req: &Verified<'_>) -> Result<Vec<Inbound>, IntakeError> {
        let body = meta::json_body(req)?;
        normalize::normalize(self.kind, &self.account_id, &body, Utc::now())
    }

    fn ack(&self) -> WebhookAck {
        meta::ack()
    }
}

#[async_trait]
impl Outbound for MessengerChannel {
    async fn send(&self, msg: &OutgoingMessage) -> Result<SendReceipt, DeliveryError> {
        send::send(&self.graph, self.kind, &self.account_id, msg).await
    }
}

/// JSON as Meta writes it: `/` as `\/` and everything outside ASCII as
/// lower-case `\uXXXX` (UTF-16, surrogate pairs above the BMP). Meta signs
/// these bytes, so a simulated webhook must carry them, not re-encoded UTF-8
/// (providers.md section 0 rule 1).
pub fn meta_json(value: &serde_json::Value) -> Vec<u8> {
    let plain = value.to_string();
    let mut out = String::with_capacity(plain.len() + plain.len() / 8);
    for c in plain.chars() {
        match c {
            // `/` and non-ASCII only ever occur inside JSON strings.
            '/' => out.push_str("\\/"),
            c if c.is_ascii() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.into_bytes()
}

/// Any body signed with the channel's `app_secret` as Meta would post it to
/// the channel's webhook: for `simulate --file` with a file of
/// `fixtures/facebook/` or `fixtures/instagram/`. The bytes go as they are
/// (without trailing whitespace), so a broken body reaches the gateway broken,
/// correctly signed, and is answered `malformed_payload`.
pub fn simulate_payload(cfg: &ChannelConfig, body: &[u8]) -> SimulatedRequest {
    let body = body.trim_ascii_end().to_vec();
    let secret = cfg.str("app_secret").unwrap_or("");
    SimulatedRequest {
        path: format!("/webhooks/{}", cfg.id),
        content_type: "application/json".to_string(),
        headers: vec![(
            meta::SIGNATURE_HEADER.to_string(),
            meta::sign(secret, &body),
        )],
        body,
    }
}

/// A customer's text message from `from` (a PSID or IGSID), exactly as Meta
/// posts it: object `page` or `instagram`, one entry for the channel's Page /
/// account, one `messaging[]` event, signed with the channel's `app_secret`.
pub fn simulate_inbound(
    cfg: &ChannelConfig,
    from: &str,
    text: &str,
    mid: &str,
) -> SimulatedRequest {
    let account = cfg.str(account_key(cfg.kind)).unwrap_or("0");
    let now = Utc::now().timestamp_millis();
    let body = serde_json::json!({
        "object": webhook_object(cfg.kind),
        "entry": [{
            "id": account,
            "time": now,
            "messaging": [{
                "sender": {"id": from},
                "recipient": {"id": account},
                "timestamp": now,
                "message": {"mid": mid, "text": text},
            }],
        }],
    });
    simulate_payload(cfg, &meta_json(&body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::InboundMessage;

    const SECRET: &str = "test-app-secret";

    fn cfg(kind: &str) -> ChannelConfig {
        let specific = match kind {
            "facebook" => "page_access_token = \"EAAPage\"\npage_id = \"108402317654321\"",
            _ => "access_token = \"IGQAccount\"\nig_account_id = \"17841405309211844\"",
        };
        toml::from_str(&format!(
            r#"
            id = "{kind}-main"
            kind = "{kind}"
            queue = "support"
            app_secret = "{SECRET}"
            verify_token = "meatyhamhock"
            {specific}
            "#
        ))
        .unwrap()
    }

    fn raw<'a>(headers: &'a [(String, String)], body: &'a [u8]) -> RawRequest<'a> {
        RawRequest {
            path: "/webhooks/facebook-main",
            query: "",
            headers: headers.into(),
            content_type: "application/json",
            body,
        }
    }

    fn signed(secret: &str, body: &[u8]) -> Vec<(String, String)> {
        vec![(meta::SIGNATURE_HEADER.to_string(), meta::sign(secret, body))]
    }

    fn through(ch: &MessengerChannel, sim: &SimulatedRequest) -> Result<Vec<Inbound>, IntakeError> {
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

    /// If this breaks, channels start with the wrong Graph root or credentials.
    #[test]
    fn new_reads_each_kinds_settings() {
        let fb = MessengerChannel::new(&cfg("facebook")).unwrap();
        assert_eq!(fb.kind(), ChannelKind::Facebook);
        assert_eq!(fb.account_id(), "108402317654321");
        assert_eq!(fb.api_base(), "https://graph.facebook.com/v25.0");
        assert_eq!(fb.graph.token(), "EAAPage");
        let ig = MessengerChannel::new(&cfg("instagram")).unwrap();
        assert_eq!(ig.kind(), ChannelKind::Instagram);
        assert_eq!(ig.account_id(), "17841405309211844");
        assert_eq!(ig.graph.token(), "IGQAccount");
        let mut c = cfg("instagram");
        c.api_base = Some("https://graph.instagram.com/v25.0/".into());
        assert_eq!(
            MessengerChannel::new(&c).unwrap().api_base(),
            "https://graph.instagram.com/v25.0"
        );
    }

    /// If this breaks, a misconfigured channel starts and fails on every webhook.
    #[test]
    fn new_names_the_missing_or_bad_setting() {
        for (kind, key) in [
            ("facebook", "app_secret"),
            ("facebook", "verify_token"),
            ("facebook", "page_access_token"),
            ("facebook", "page_id"),
            ("instagram", "access_token"),
            ("instagram", "ig_account_id"),
        ] {
            let mut c = cfg(kind);
            c.settings.remove(key);
            assert_eq!(
                MessengerChannel::new(&c).err().unwrap(),
                format!("channel {kind}-main: {key}: missing (required for {kind} channels)")
            );
        }
        let mut c = cfg("facebook");
        c.settings.insert("page_id".into(), "1084/../me".into());
        assert_eq!(
            MessengerChannel::new(&c).err().unwrap(),
            "channel facebook-main: page_id: not a Meta ID (digits expected): 1084/../me"
        );
        let mut c = cfg("facebook");
        c.api_base = Some("graph.facebook.com".into());
        assert!(MessengerChannel::new(&c)
            .err()
            .unwrap()
            .starts_with("channel facebook-main: api_base: not a URL"));
        let mut c = cfg("facebook");
        c.kind = ChannelKind::Sms;
        assert!(MessengerChannel::new(&c).is_err());
    }

    /// If this breaks, Meta cannot subscribe the webhook (or anyone can).
    #[test]
    fn the_handshake_uses_the_channels_verify_token() {
        let ch = MessengerChannel::new(&cfg("instagram")).unwrap();
        let ok = ch
            .handshake("hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=meatyhamhock")
            .unwrap()
            .unwrap();
        assert_eq!((ok.status, ok.body), (200, b"1158201444".to_vec()));
        assert!(matches!(
            ch.handshake("hub.mode=subscribe&hub.challenge=1&hub.verify_token=nope"),
            Some(Err(IntakeError::VerifyTokenMismatch(_)))
        ));
    }

    /// If this breaks, forged webhooks are accepted, or Meta's are refused
    /// during an app secret rotation.
    #[test]
    fn verify_takes_the_app_secret_or_the_previous_one() {
        let body = br#"{"object":"page","entry":[]}"#;
        let ch = MessengerChannel::new(&cfg("facebook")).unwrap();
        assert!(ch.verify(&raw(&signed(SECRET, body), body)).is_ok());
        assert!(matches!(
            ch.verify(&raw(&signed("another", body), body)),
            Err(IntakeError::InvalidSignature(_))
        ));
        assert!(matches!(
            ch.verify(&raw(&[], body)),
            Err(IntakeError::InvalidSignature(_))
        ));
        let mut c = cfg("facebook");
        c.settings.insert("app_secret".into(), "rotated".into());
        c.settings
            .insert("app_secret_previous".into(), SECRET.into());
        let rotated = MessengerChannel::new(&c).unwrap();
        assert!(rotated.verify(&raw(&signed(SECRET, body), body)).is_ok());
        assert!(rotated.verify(&raw(&signed("rotated", body), body)).is_ok());
        assert!(rotated.verify(&raw(&signed("other", body), body)).is_err());
    }

    /// If this breaks, a signed webhook that is not JSON is stored as garbage
    /// or crashes intake instead of being answered 400/415.
    #[test]
    fn normalize_refuses_bodies_that_are_not_json() {
        let ch = MessengerChannel::new(&cfg("facebook")).unwrap();
        let body = b"hub.mode=subscribe";
        let headers = signed(SECRET, body);
        let v = ch.verify(&raw(&headers, body)).unwrap();
        assert!(matches!(ch.normalize(&v), Err(IntakeError::Malformed(_))));
        let mut req = raw(&headers, body);
        req.content_type = "application/x-www-form-urlencoded";
        let v = ch.verify(&req).unwrap();
        assert!(matches!(
            ch.normalize(&v),
            Err(IntakeError::UnsupportedMediaType(_))
        ));
    }

    /// If this breaks, Meta's retries stop: it wants a 200 for every stored event.
    #[test]
    fn ack_is_200() {
        let ack = MessengerChannel::new(&cfg("facebook")).unwrap().ack();
        assert_eq!(ack.status, 200);
    }

    /// If this breaks, simulated webhooks are refused or are not what Meta sends.
    #[test]
    fn simulated_inbound_is_verified_and_normalized_for_both_kinds() {
        for (kind, object, account) in [
            ("facebook", "page", "108402317654321"),
            ("instagram", "instagram", "17841405309211844"),
        ] {
            let c = cfg(kind);
            let sim = simulate_inbound(
                &c,
                "7412589630147852",
                "Où est ma commande? 📦 a/b",
                "m_sim1",
            );
            assert_eq!(sim.path, format!("/webhooks/{kind}-main"));
            assert_eq!(sim.content_type, "application/json");
            let text = std::str::from_utf8(&sim.body).unwrap();
            assert!(text.is_ascii(), "Meta escapes non-ASCII: {text}");
            assert!(
                text.contains(r"O\u00f9 est ma commande? \ud83d\udce6 a\/b"),
                "{text}"
            );
            let v: serde_json::Value = serde_json::from_slice(&sim.body).unwrap();
            assert_eq!(v["object"], object);
            assert_eq!(v["entry"][0]["id"], account);
            assert_eq!(v["entry"][0]["messaging"][0]["recipient"]["id"], account);
            let ch = MessengerChannel::new(&c).unwrap();
            match through(&ch, &sim).unwrap().as_slice() {
                [Inbound::Message(InboundMessage {
                    provider_id,
                    from,
                    text,
                    ..
                })] => {
                    assert_eq!(provider_id, "m_sim1");
                    assert_eq!(from, "7412589630147852");
                    assert_eq!(text, "Où est ma commande? 📦 a/b");
                }
                other => panic!("{kind}: {other:?}"),
            }
        }
    }

    /// If this breaks, `simulate --file` sends something other than the file,
    /// or signs it with the wrong secret.
    #[test]
    fn simulated_payload_is_the_file_signed() {
        let c = cfg("instagram");
        let file = include_bytes!("../../../fixtures/instagram/story_mention.json");
        let sim = simulate_payload(&c, file);
        assert_eq!(sim.body, file.trim_ascii_end());
        let ch = MessengerChannel::new(&c).unwrap();
        let items = through(&ch, &sim).unwrap();
        assert!(
            matches!(&items[..], [Inbound::Message(m)] if m.kind.as_deref() == Some("story_mention")),
            "{items:?}"
        );
        // A facebook channel's secret differs: its webhook would refuse it.
        let mut other = cfg("facebook");
        other.settings.insert("app_secret".into(), "other".into());
        let fb = MessengerChannel::new(&other).unwrap();
        assert!(matches!(
            through(&fb, &sim),
            Err(IntakeError::InvalidSignature(_))
        ));
    }

    #[test]
    fn meta_json_escapes_like_meta() {
        let v = serde_json::json!(["äöå", "https://x/y", "😀", "plain"]);
        assert_eq!(
            String::from_utf8(meta_json(&v)).unwrap(),
            r#"["\u00e4\u00f6\u00e5","https:\/\/x\/y","\ud83d\ude00","plain"]"#
        );
        // Round trip.
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&meta_json(&v)).unwrap(),
            v
        );
    }

    #[test]
    fn media_needs_no_credentials() {
        assert!(matches!(
            media_credentials(&cfg("facebook")),
            Credentials::None
        ));
    }
}
