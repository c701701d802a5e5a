//! WhatsApp over Meta's Cloud API (providers.md A1, A2).
//!
//! | direction | what | where |
//! | --- | --- | --- |
//! | in | `GET` subscription handshake (`hub.verify_token`) | [`super::meta::handshake`] |
//! | in | `POST /webhooks/{channel}`, JSON signed with `X-Hub-Signature-256` (the app secret, or the previous one during rotation) | [`super::meta::verify`] |
//! | in | `messages[]` (every type), reactions, `statuses[]`, in every `entry[]` and `changes[]` of a batch | [`normalize`] |
//! | out | `POST {api_base}/{phone_number_id}/messages` with the bearer token; attachments uploaded to `/{phone_number_id}/media` first | [`send`] |
//! | media | `GET {api_base}/{media_id}` (never with `phone_number_id`) → a 5-minute URL on `lookaside.fbsbx.com`, fetched with the bearer token | [`MediaResolver`], [`media_credentials`] |
//! | both | the payloads `switchboard simulate` sends | [`simulate_inbound`], [`simulate_status`], [`simulate_payload`] |
//!
//! A contact's digital ID is the `wa_id` (the phone number in digits) when
//! Meta gives one, else the business-scoped user ID (`US.…`); when both
//! come, the other is an alias (CONTRACT "WhatsApp digital ID").

pub mod normalize;
pub mod send;

use super::media::Credentials;
use super::meta::{self, GraphClient};
use super::{
    DeliveryError, Inbound, IntakeError, MediaRef, MediaResolver, Outbound, OutgoingMessage,
    RawRequest, SendReceipt, SimulatedRequest, Verified, WebhookAck, WebhookIntake,
};
use crate::config::ChannelConfig;
use crate::domain::ChannelKind;
use async_trait::async_trait;
use chrono::Utc;
use serde_json::{json, Value};

/// Where Meta's Graph API lives when the manifest says nothing.
const FALLBACK_API_BASE: &str = "https://graph.facebook.com/v25.0";

/// The WhatsApp Business Account ID in simulated webhooks (`entry[].id`);
/// the gateway does not read it.
const SIMULATED_WABA_ID: &str = "100000000000001";
/// Our number as simulated webhooks show it (`metadata.display_phone_number`).
const SIMULATED_DISPLAY_NUMBER: &str = "15550000001";

/// `api_base` of a channel: the configured one or the manifest's (with the
/// Graph version), without a trailing slash.
pub fn api_base(cfg: &ChannelConfig) -> String {
    cfg.api_base
        .as_deref()
        .or(crate::manifest::get(ChannelKind::Whatsapp)
            .default_api_base
            .as_deref())
        .unwrap_or(FALLBACK_API_BASE)
        .trim_end_matches('/')
        .to_string()
}

/// Media downloads use the channel's bearer token, at the Graph host and at
/// Meta's lookaside CDN (`MediaClient::with_credential_hosts`).
pub fn media_credentials(cfg: &ChannelConfig) -> Credentials {
    match cfg.str("access_token") {
        Some(token) => Credentials::Bearer(token.to_string()),
        None => Credentials::None,
    }
}

/// One WhatsApp business number: intake, delivery and media resolution.
pub struct WhatsAppChannel {
    /// The app secret first, then `app_secret_previous` during a rotation.
    app_secrets: Vec<String>,
    verify_token: String,
    phone_number_id: String,
    graph: GraphClient,
}

impl std::fmt::Debug for WhatsAppChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the secrets.
        f.debug_struct("WhatsAppChannel")
            .field("phone_number_id", &self.phone_number_id)
            .field("api_base", &self.graph.api_base)
            .finish_non_exhaustive()
    }
}

impl WhatsAppChannel {
    pub fn new(cfg: &ChannelConfig) -> Result<WhatsAppChannel, String> {
        let need = |key: &str| {
            cfg.str(key).map(str::to_string).ok_or_else(|| {
                format!(
                    "channel {}: {key}: missing (required for whatsapp channels)",
                    cfg.id
                )
            })
        };
        let mut app_secrets = vec![need("app_secret")?];
        app_secrets.extend(cfg.str("app_secret_previous").map(str::to_string));
        let verify_token = need("verify_token")?;
        let access_token = need("access_token")?;
        let phone_number_id = need("phone_number_id")?;
        if !phone_number_id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!(
                "channel {}: phone_number_id: not a Meta ID: {phone_number_id}",
                cfg.id
            ));
        }
        let api_base = api_base(cfg);
        url::Url::parse(&api_base)
            .map_err(|e| format!("channel {}: api_base: not a URL ({e}): {api_base}", cfg.id))?;
        Ok(WhatsAppChannel {
            app_secrets,
            verify_token,
            graph: GraphClient::new(&api_base, &access_token),
            phone_number_id,
        })
    }

    /// The business number this channel answers for (`metadata.phone_number_id`).
    pub fn phone_number_id(&self) -> &str {
        &self.phone_number_id
    }
}

impl WebhookIntake for WhatsAppChannel {
    fn handshake(&self, query: &str) -> Option<Result<WebhookAck, IntakeError>> {
        Some(meta::handshake(query, &self.verify_token))
    }

    fn verify<'a>(&self, req: &RawRequest<'a>) -> Result<Verified<'a>, IntakeError> {
        let secrets: Vec<&str> = self.app_secrets.iter().map(String::as_str).collect();
        meta::verify(req, &secrets)
    }

    fn normalize(&self, req: &Verified<'_>) -> Result<Vec<Inbound>, IntakeError> {
        let body = meta::json_body(req)?;
        normalize::normalize(&body, &self.phone_number_id, Utc::now())
    }

    fn ack(&self) -> WebhookAck {
        meta::ack()
    }
}

#[async_trait]
impl Outbound for WhatsAppChannel {
    async fn send(&self, msg: &OutgoingMessage) -> Result<SendReceipt, DeliveryError> {
        send::send(&self.graph, &self.phone_number_id, msg)
            .await
            .map(|provider_id| SendReceipt {
                provider_id,
                ..SendReceipt::default()
            })
    }
}

/// A media ID as Meta makes them (digits); anything else could steer the
/// request elsewhere on the Graph API, so it is refused.
fn valid_media_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[async_trait]
impl MediaResolver for WhatsAppChannel {
    /// `GET {api_base}/{media_id}` with the bearer token and no
    /// `phone_number_id`: Meta processes that parameter only for media
    /// uploaded on that number, which inbound media never is (Chatwoot PR #13319).
    async fn resolve(&self, media: &MediaRef) -> Result<MediaRef, String> {
        let id = media
            .media_id
            .as_deref()
            .ok_or_else(|| "WhatsApp media without a media id".to_string())?;
        if !valid_media_id(id) {
            return Err(format!("WhatsApp media id is not a Meta ID: {id}"));
        }
        let answer = self
            .graph
            .get(id)
            .await
            .map_err(|e| format!("WhatsApp media {id} could not be resolved: {}", e.message))?;
        let url = answer
            .get("url")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| format!("WhatsApp media {id}: Meta answered no url"))?;
        Ok(MediaRef {
            url: url.to_string(),
            content_type: answer
                .get("mime_type")
                .and_then(Value::as_str)
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .or_else(|| media.content_type.clone()),
            filename: media.filename.clone(),
            media_id: media.media_id.clone(),
        })
    }
}

/// JSON as Meta writes it: every non-ASCII character escaped as `\uXXXX`
/// (UTF-16, lower-case hex), which is what Meta signs (providers.md 0.1).
fn meta_json(v: &Value) -> Vec<u8> {
    let text = serde_json::to_string(v).expect("a JSON value always serializes");
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out.into_bytes()
}

/// `from` as Meta writes it: a phone number in digits without `+`, or a BSUID.
fn wire_id(id: &str) -> (String, bool) {
    let id = id.trim();
    let digits = id.strip_prefix('+').unwrap_or(id);
    if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) {
        (digits.to_string(), true)
    } else {
        (id.to_string(), false)
    }
}

fn envelope(cfg: &ChannelConfig, value: Value) -> Value {
    let mut value = value;
    value["messaging_product"] = json!("whatsapp");
    value["metadata"] = json!({
        "display_phone_number": SIMULATED_DISPLAY_NUMBER,
        "phone_number_id": cfg.str("phone_number_id").unwrap_or(""),
    });
    json!({
        "object": normalize::OBJECT,
        "entry": [{"id": SIMULATED_WABA_ID, "changes": [{"value": value, "field": "messages"}]}]
    })
}

/// Any body (a file of `fixtures/whatsapp/`, say) signed with the channel's
/// `app_secret` as Meta would post it to the channel's webhook: for
/// `simulate --file`. The bytes go as they are (without trailing
/// whitespace), so a broken body arrives broken and correctly signed.
pub fn simulate_payload(cfg: &ChannelConfig, body: &[u8]) -> SimulatedRequest {
    let body = body.trim_ascii_end();
    SimulatedRequest {
        path: format!("/webhooks/{}", cfg.id),
        content_type: "application/json".to_string(),
        headers: vec![(
            "X-Hub-Signature-256".to_string(),
            meta::sign(cfg.str("app_secret").unwrap_or(""), body),
        )],
        body: body.to_vec(),
    }
}

/// A text message from `from` (a phone number or a BSUID) named `name`, as
/// Meta posts it: the phone in `from` and `contacts[].wa_id`, or a BSUID in
/// `from_user_id` and `contacts[].user_id` with no phone at all.
pub fn simulate_inbound(
    cfg: &ChannelConfig,
    from: &str,
    name: &str,
    text: &str,
    message_id: &str,
) -> SimulatedRequest {
    let (id, is_phone) = wire_id(from);
    let mut contact = json!({});
    if !name.is_empty() {
        contact["profile"] = json!({ "name": name });
    }
    let mut message = json!({
        "id": message_id,
        "timestamp": Utc::now().timestamp().to_string(),
        "type": "text",
        "text": {"body": text},
    });
    if is_phone {
        contact["wa_id"] = json!(id);
        message["from"] = json!(id);
    } else {
        contact["user_id"] = json!(id);
        message["from_user_id"] = json!(id);
    }
    let body = envelope(cfg, json!({"contacts": [contact], "messages": [message]}));
    simulate_payload(cfg, &meta_json(&body))
}

/// A status webhook for our message `wamid` (`sent`, `delivered`, `read` or
/// `failed`) to `recipient`; a failure carries error 131026 (undeliverable).
pub fn simulate_status(
    cfg: &ChannelConfig,
    wamid: &str,
    status: &str,
    recipient: &str,
) -> SimulatedRequest {
    let (id, is_phone) = wire_id(recipient);
    let mut s = json!({
        "id": wamid,
        "status": status,
        "timestamp": Utc::now().timestamp().to_string(),
    });
    if is_phone {
        s["recipient_id"] = json!(id);
    } else {
        s["user_id"] = json!(id);
    }
    match status {
        "sent" | "delivered" => {
            s["conversation"] = json!({
                "id": format!("{:032x}", rand::random::<u128>()),
                "origin": {"type": "service"}
            });
            s["pricing"] = json!({
                "billable": false,
                "pricing_model": "PMP",
                "category": "service",
                "type": "free_customer_service"
            });
        }
        "failed" => {
            s["errors"] = json!([{
                "code": 131026,
                "title": "Message undeliverable",
                "message": "Message undeliverable",
                "error_data": {"details": "Message Undeliverable."},
                "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"
            }]);
        }
        _ => {}
    }
    let body = envelope(cfg, json!({ "statuses": [s] }));
    simulate_payload(cfg, &meta_json(&body))
}

#[cfg(test)]
mod tests;
