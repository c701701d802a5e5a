//! SMS and MMS over Twilio Programmable Messaging (providers.md A5).
//!
//! | direction | what | where |
//! | --- | --- | --- |
//! | in | `POST /webhooks/{channel}`, form-encoded, signed with `X-Twilio-Signature` | [`signature`], [`SmsChannel::verify`](WebhookIntake::verify) |
//! | in | inbound SMS/MMS (`MessageSid`, `From`, `Body`, `MediaUrlN`) and status callbacks (`MessageStatus`, `ErrorCode`) | [`WebhookIntake::normalize`] |
//! | in | the answer: empty TwiML as `text/xml` | [`EMPTY_TWIML`] |
//! | out | `POST {api_base}/2010-04-01/Accounts/{sid}/Messages.json`, Basic auth, `MediaUrl` per attachment, `StatusCallback` back to us | [`Outbound::send`] |
//! | media | Twilio-hosted `MediaUrlN`, Basic auth at `api.twilio.com` only, redirects to its CDN | [`media_credentials`], [`super::media`] |
//! | both | the payloads `switchboard simulate` sends | [`simulate_inbound`], [`simulate_status`], [`simulate_form`] |
//! | preview | GSM-7 / UCS-2 and segment count | [`segments`] |
//!
//! Twilio gives no timestamp on inbound messages, so `sent_at` is the time we
//! receive them. Opt-out keywords (STOP and the others Twilio honours on long
//! codes) and Advanced Opt-Out's `OptOutType` become [`Consent`].

pub(crate) mod form;
pub mod segments;

/// Twilio's error code for a recipient who opted out (STOP): the send is refused for good.
pub const UNSUBSCRIBED_CODE: &str = "21610";
pub mod signature;

use super::media::Credentials;
use super::{
    Consent, DeliveryError, Inbound, InboundMessage, IntakeError, MediaRef, Outbound,
    OutgoingMessage, RawRequest, SendReceipt, StatusUpdate, Verified, WebhookAck, WebhookIntake,
};
use crate::config::ChannelConfig;
use crate::domain::{ChannelKind, DeliveryStatus, PhoneNumber};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use std::borrow::Cow;
use std::time::Duration;

/// What we answer every Twilio webhook: "reply nothing".
pub const EMPTY_TWIML: &str = r#"<?xml version="1.0" encoding="UTF-8"?><Response/>"#;

/// The only body type Twilio's messaging webhooks use.
pub const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded";

/// Bodies that opt a contact out; Twilio honours them by default on long codes.
pub const OPT_OUT_WORDS: [&str; 8] = [
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "REVOKE",
    "OPTOUT",
];

/// Bodies that opt a contact back in.
pub const OPT_IN_WORDS: [&str; 3] = ["START", "YES", "UNSTOP"];

/// Used as `To` in simulated status callbacks, and as our number when the
/// channel sends through a Messaging Service: Twilio's magic test number.
const PLACEHOLDER_NUMBER: &str = "+15005550006";

/// The channel's Twilio account, sender and API, for intake and delivery.
pub struct SmsChannel {
    account_sid: String,
    /// The current auth token first, then `auth_token_previous` during a rotation.
    auth_tokens: Vec<String>,
    sender: Sender,
    /// No trailing slash.
    api_base: String,
    /// No trailing slash; what Twilio calls and signs.
    public_url: String,
    /// `public_url/webhooks/{channel_id}`.
    status_callback: String,
    http: reqwest::Client,
}

/// A channel's sender (`from`) as Twilio takes it: a phone number, put in
/// E.164 form however it is written; a short code (digits only, 3 to 8
/// of them); or an alphanumeric sender ID (up to 11 letters,
/// digits and spaces, at least one letter; one-way, so customers cannot
/// answer it). Anything else is the problem `check-config` lists: a number
/// without its `+` and country code included, which Twilio would refuse
/// or, for a US number, read as its own guess.
pub fn own_number(channel_id: &str, from: &str) -> Result<String, String> {
    let from = from.trim();
    if from.starts_with('+') {
        if let Ok(n) = PhoneNumber::from_provider(from) {
            return Ok(n.as_str().to_string());
        }
    } else {
        let short_code = (3..=8).contains(&from.len()) && from.bytes().all(|b| b.is_ascii_digit());
        let alphanumeric = (1..=11).contains(&from.len())
            && from.bytes().all(|b| b.is_ascii_alphanumeric() || b == b' ')
            && from.bytes().any(|b| b.is_ascii_alphabetic());
        if short_code || alphanumeric {
            return Ok(from.to_string());
        }
    }
    Err(format!(
        "channel {channel_id}: from: not a phone number in E.164 form (+, country code, \
         number), a short code or an alphanumeric sender ID: {from}"
    ))
}

enum Sender {
    From(String),
    MessagingService(String),
}

pub use super::SimulatedRequest;

/// `api_base` of a channel: the configured one or Twilio's, without a trailing slash.
pub fn api_base(cfg: &ChannelConfig) -> String {
    cfg.api_base
        .as_deref()
        .or(crate::manifest::get(ChannelKind::Sms)
            .default_api_base
            .as_deref())
        .unwrap_or("https://api.twilio.com")
        .trim_end_matches('/')
        .to_string()
}

/// The URL Twilio calls for a channel (and signs): `public_url/webhooks/{id}`.
pub fn webhook_url(cfg: &ChannelConfig, public_url: &str) -> String {
    format!("{}/webhooks/{}", public_url.trim_end_matches('/'), cfg.id)
}

/// Twilio media downloads use the account's Basic auth (when "enforce HTTP
/// auth on media" is on); [`super::media::MediaClient`] sends it to the
/// `api_base` host only.
pub fn media_credentials(cfg: &ChannelConfig) -> Credentials {
    match (cfg.str("account_sid"), cfg.str("auth_token")) {
        (Some(user), Some(password)) => Credentials::Basic {
            user: user.to_string(),
            password: password.to_string(),
        },
        _ => Credentials::None,
    }
}

impl SmsChannel {
    pub fn new(cfg: &ChannelConfig, public_url: &str) -> Result<SmsChannel, String> {
        let need = |key: &str| {
            cfg.str(key).map(str::to_string).ok_or_else(|| {
                format!(
                    "channel {}: {key}: missing (required for sms channels)",
                    cfg.id
                )
            })
        };
        let account_sid = need("account_sid")?;
        let mut auth_tokens = vec![need("auth_token")?];
        auth_tokens.extend(cfg.str("auth_token_previous").map(str::to_string));
        let sender = match (cfg.str("from"), cfg.str("messaging_service_sid")) {
            (Some(from), _) => Sender::From(own_number(&cfg.id, from)?),
            (None, Some(sid)) => Sender::MessagingService(sid.to_string()),
            (None, None) => {
                return Err(format!(
                    "channel {}: from or messaging_service_sid: set one of them",
                    cfg.id
                ))
            }
        };
        let api_base = api_base(cfg);
        url::Url::parse(&api_base)
            .map_err(|e| format!("channel {}: api_base: not a URL ({e}): {api_base}", cfg.id))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("channel {}: cannot build an HTTP client: {e}", cfg.id))?;
        let public_url = public_url.trim_end_matches('/').to_string();
        Ok(SmsChannel {
            status_callback: webhook_url(cfg, &public_url),
            account_sid,
            auth_tokens,
            sender,
            api_base,
            public_url,
            http,
        })
    }

    /// The URL Twilio signed for a request to `path` with `query`.
    fn signed_url(&self, path: &str, query: &str) -> String {
        if query.is_empty() {
            format!("{}{path}", self.public_url)
        } else {
            format!("{}{path}?{query}", self.public_url)
        }
    }
}

fn is_form(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case(FORM_CONTENT_TYPE)
}

impl WebhookIntake for SmsChannel {
    fn verify<'a>(&self, req: &RawRequest<'a>) -> Result<Verified<'a>, IntakeError> {
        let signature = req
            .header("x-twilio-signature")
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| IntakeError::InvalidSignature("missing X-Twilio-Signature".into()))?;
        if !is_form(req.content_type) {
            return Err(IntakeError::UnsupportedMediaType(format!(
                "Twilio webhooks are {FORM_CONTENT_TYPE}, not {}",
                if req.content_type.is_empty() {
                    "without a Content-Type"
                } else {
                    req.content_type
                }
            )));
        }
        // The signature is checked before we say anything about the body: a
        // body the strict parser refuses is read leniently for the check, and
        // refused as malformed only once the signature holds.
        let strict = form::parse(req.body);
        let lenient: form::Pairs;
        let params = match &strict {
            Ok(params) => params,
            Err(_) => {
                lenient = url::form_urlencoded::parse(req.body).collect();
                &lenient
            }
        };
        let url = self.signed_url(req.path, req.query);
        let tokens: Vec<&str> = self.auth_tokens.iter().map(String::as_str).collect();
        if !signature::validate(&tokens, &url, params, signature) {
            return Err(IntakeError::InvalidSignature(format!(
                "X-Twilio-Signature does not match: check the channel's auth_token, and that \
                 server.public_url is the URL Twilio calls (we checked {url})"
            )));
        }
        Ok(Verified::with_form(
            req,
            strict.map_err(IntakeError::Malformed)?,
        ))
    }

    fn normalize(&self, req: &Verified<'_>) -> Result<Vec<Inbound>, IntakeError> {
        match req.form() {
            Some(params) => normalize_params(&Params(params), Utc::now()),
            None => {
                let params = form::parse(req.body()).map_err(IntakeError::Malformed)?;
                normalize_params(&Params(&params), Utc::now())
            }
        }
    }

    fn ack(&self) -> WebhookAck {
        WebhookAck {
            status: 200,
            content_type: "text/xml",
            body: EMPTY_TWIML.as_bytes().to_vec(),
        }
    }
}

/// Form parameters, looked up by name (first value).
struct Params<'a>(&'a [(Cow<'a, str>, Cow<'a, str>)]);

impl Params<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }
    /// A value that is present and not blank.
    fn value(&self, name: &str) -> Option<&str> {
        self.get(name).map(str::trim).filter(|v| !v.is_empty())
    }
}

fn malformed(message: impl Into<String>) -> IntakeError {
    IntakeError::Malformed(message.into())
}

fn normalize_params(p: &Params, now: DateTime<Utc>) -> Result<Vec<Inbound>, IntakeError> {
    let sid = p
        .value("MessageSid")
        .ok_or_else(|| malformed("MessageSid is missing"))?;
    let message_status = p.value("MessageStatus");
    let sms_status = p.value("SmsStatus");
    let received = |s: Option<&str>| s.is_none_or(|s| s.eq_ignore_ascii_case("received"));
    let has_content = p.get("Body").is_some() || p.get("NumMedia").is_some();
    if has_content && received(message_status) && received(sms_status) {
        return Ok(vec![Inbound::Message(inbound_message(p, sid, now)?)]);
    }
    let Some(status) = message_status.or(sms_status) else {
        return Err(malformed(
            "neither an inbound message (Body, NumMedia) nor a status callback (MessageStatus)",
        ));
    };
    Ok(status_update(p, sid, status)
        .into_iter()
        .map(Inbound::Status)
        .collect())
}

fn inbound_message(
    p: &Params,
    sid: &str,
    now: DateTime<Utc>,
) -> Result<InboundMessage, IntakeError> {
    let from = p
        .value("From")
        .ok_or_else(|| malformed("From is missing"))?;
    let num_media: usize = match p.value("NumMedia") {
        None => 0,
        Some(n) => n
            .parse()
            .map_err(|_| malformed(format!("NumMedia is not a number: {n}")))?,
    };
    let mut media = Vec::with_capacity(num_media.min(10));
    for n in 0..num_media {
        let url = p.value(&format!("MediaUrl{n}")).ok_or_else(|| {
            malformed(format!(
                "NumMedia is {num_media} but MediaUrl{n} is missing"
            ))
        })?;
        media.push(MediaRef {
            url: url.to_string(),
            content_type: p.value(&format!("MediaContentType{n}")).map(str::to_string),
            filename: None,
            media_id: None,
        });
    }
    let text = p.get("Body").unwrap_or("").to_string();
    Ok(InboundMessage {
        provider_id: sid.to_string(),
        from: from.to_string(),
        contact_name: p.value("ProfileName").map(str::to_string),
        consent: consent(p.value("OptOutType"), &text),
        text,
        sent_at: now,
        media,
        ..InboundMessage::default()
    })
}

/// What a message does to consent: Advanced Opt-Out's `OptOutType` when it
/// says STOP or START, else the body as a keyword (trimmed, any case).
pub fn consent(opt_out_type: Option<&str>, body: &str) -> Option<Consent> {
    match opt_out_type
        .map(|t| t.trim().to_ascii_uppercase())
        .as_deref()
    {
        Some("STOP") => return Some(Consent::OptOut),
        Some("START") => return Some(Consent::OptIn),
        _ => {}
    }
    let word = body.trim().to_uppercase();
    if OPT_OUT_WORDS.contains(&word.as_str()) {
        Some(Consent::OptOut)
    } else if OPT_IN_WORDS.contains(&word.as_str()) {
        Some(Consent::OptIn)
    } else {
        None
    }
}

/// What a Twilio error code means, for the ones agents meet most
/// (providers.md A5.3 and Twilio's error dictionary).
pub fn error_meaning(code: &str) -> Option<&'static str> {
    Some(match code {
        "20003" => "authentication failed: check account_sid and auth_token",
        "20429" => "too many requests",
        "21211" => "invalid To number",
        "21408" => "sending to this region is not enabled",
        "21610" => "the recipient has unsubscribed (replied STOP)",
        "21614" => "To is not a mobile number",
        "21617" => "the text is longer than 1600 characters",
        "21623" => "more than 10 media",
        "30001" => "queue overflow",
        "30002" => "account suspended",
        "30003" => "unreachable handset",
        "30004" => "message blocked",
        "30005" => "unknown number",
        "30006" => "landline or unreachable carrier",
        "30007" => "carrier filtering",
        "30008" => "unknown error",
        "30034" => "sender not registered for A2P 10DLC",
        "11751" | "63034" => "media exceeds the size limit",
        "63016" => "outside the messaging window",
        _ => return None,
    })
}

/// `ErrorCode 30003: unreachable handset`, from a callback's fields.
fn describe_error(code: Option<&str>, message: Option<&str>, status: &str) -> String {
    match (code, code.and_then(error_meaning), message) {
        (Some(c), Some(meaning), _) => format!("ErrorCode {c}: {meaning}"),
        (Some(c), None, Some(m)) => format!("ErrorCode {c}: {m}"),
        (Some(c), None, None) => format!("ErrorCode {c}"),
        (None, _, Some(m)) => m.to_string(),
        (None, _, None) => format!("Twilio reported the message {status}"),
    }
}

fn status_update(p: &Params, sid: &str, status: &str) -> Option<StatusUpdate> {
    let lower = status.to_ascii_lowercase();
    let mapped = match lower.as_str() {
        "queued" | "accepted" | "scheduled" | "sending" => DeliveryStatus::Queued,
        "sent" => DeliveryStatus::Sent,
        // Some recipients or parts delivered: Twilio took it, not all arrived.
        "partially_delivered" => DeliveryStatus::Sent,
        "delivered" => DeliveryStatus::Delivered,
        "read" => DeliveryStatus::Read,
        "failed" | "undelivered" | "canceled" => DeliveryStatus::Failed,
        // Statuses of messages to us, not of our messages.
        "receiving" | "received" => return None,
        other => {
            tracing::debug!(status = other, "ignoring an unknown Twilio message status");
            return None;
        }
    };
    let error = (mapped == DeliveryStatus::Failed)
        .then(|| describe_error(p.value("ErrorCode"), p.value("ErrorMessage"), &lower));
    Some(StatusUpdate {
        provider_id: sid.to_string(),
        status: mapped,
        error,
    })
}

/// `Retry-After` in seconds, or as an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = DateTime::parse_from_rfc2822(value).ok()?;
    let secs = (at.with_timezone(&Utc) - Utc::now()).num_seconds().max(0);
    Some(Duration::from_secs(secs as u64))
}

/// Twilio's error body: `{"code": 21610, "message": "...", "more_info": "...", "status": 400}`.
#[derive(serde::Deserialize)]
struct TwilioError {
    code: Option<serde_json::Value>,
    message: Option<String>,
}

fn classify(status: reqwest::StatusCode, headers: &HeaderMap, body: &[u8]) -> DeliveryError {
    let parsed: Option<TwilioError> = serde_json::from_slice(body).ok();
    let code = parsed.as_ref().and_then(|e| match &e.code {
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    });
    let text = parsed
        .as_ref()
        .and_then(|e| e.message.clone())
        .or_else(|| code.as_deref().and_then(error_meaning).map(str::to_string));
    let http = status.as_u16();
    let mut message = match (&code, text) {
        (Some(c), Some(t)) => format!("Twilio error {c} (HTTP {http}): {t}"),
        (Some(c), None) => format!("Twilio error {c} (HTTP {http})"),
        (None, Some(t)) => format!("Twilio answered HTTP {http}: {t}"),
        (None, None) => format!("Twilio answered HTTP {http}"),
    };
    let code_is = |c: &str| code.as_deref() == Some(c);
    let mut err = if http == 401 || code_is("20003") {
        message.push_str("; check the channel's account_sid and auth_token");
        DeliveryError {
            needs_reauth: true,
            ..DeliveryError::permanent(message)
        }
    } else if http == 429 || code_is("20429") || status.is_server_error() || http == 408 {
        DeliveryError {
            retry_after: retry_after(headers),
            ..DeliveryError::retryable(message)
        }
    } else {
        DeliveryError::permanent(message)
    };
    err.code = code;
    err
}

/// A reqwest error, without the URL.
fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else {
        e.without_url().to_string()
    }
}

#[derive(serde::Deserialize)]
struct Created {
    sid: Option<String>,
}

#[async_trait]
impl Outbound for SmsChannel {
    async fn send(&self, msg: &OutgoingMessage) -> Result<SendReceipt, DeliveryError> {
        if msg.to.trim().is_empty() {
            return Err(DeliveryError::permanent("the message has no recipient"));
        }
        if msg.text.is_empty() && msg.attachments.is_empty() {
            return Err(DeliveryError::permanent(
                "nothing to send: the message has no text and no attachments",
            ));
        }
        let mut fields: Vec<(&str, &str)> = vec![("To", &msg.to)];
        match &self.sender {
            Sender::From(from) => fields.push(("From", from)),
            Sender::MessagingService(sid) => fields.push(("MessagingServiceSid", sid)),
        }
        if !msg.text.is_empty() || msg.attachments.is_empty() {
            fields.push(("Body", &msg.text));
        }
        fields.push(("StatusCallback", &self.status_callback));
        for a in &msg.attachments {
            fields.push(("MediaUrl", &a.public_url));
        }
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            self.api_base, self.account_sid
        );
        let resp = self
            .http
            .post(&url)
            .basic_auth(&self.account_sid, Some(&self.auth_tokens[0]))
            .form(&fields)
            .send()
            .await
            .map_err(|e| DeliveryError::retryable(format!("Twilio: {}", describe(e))))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await;
        if !status.is_success() {
            let body = body.unwrap_or_default();
            return Err(classify(status, &headers, &body));
        }
        // Twilio has taken the message: retrying now would text the customer
        // twice, so an unreadable answer is final.
        let sid = body
            .ok()
            .and_then(|b| serde_json::from_slice::<Created>(&b).ok())
            .and_then(|c| c.sid)
            .filter(|s| !s.is_empty());
        match sid {
            Some(provider_id) => Ok(SendReceipt {
                provider_id,
                ..SendReceipt::default()
            }),
            None => Err(DeliveryError::permanent(format!(
                "Twilio accepted the message (HTTP {}) but its answer had no sid; \
                 not retried, so the customer is not texted twice",
                status.as_u16()
            ))),
        }
    }
}

/// Signs form parameters as Twilio would for a post to the channel's webhook.
fn signed(cfg: &ChannelConfig, public_url: &str, params: &[(String, String)]) -> SimulatedRequest {
    let url = webhook_url(cfg, public_url);
    let token = cfg.str("auth_token").unwrap_or("");
    let body = serde_urlencoded::to_string(params).expect("string pairs always encode");
    SimulatedRequest {
        path: format!("/webhooks/{}", cfg.id),
        content_type: FORM_CONTENT_TYPE.to_string(),
        headers: vec![
            (
                "X-Twilio-Signature".to_string(),
                signature::compute(token, &url, params),
            ),
            (
                "I-Twilio-Idempotency-Token".to_string(),
                uuid::Uuid::new_v4().to_string(),
            ),
        ],
        body: body.into_bytes(),
    }
}

fn owned(pairs: Vec<(&str, &str)>) -> Vec<(String, String)> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn our_number(cfg: &ChannelConfig) -> &str {
    cfg.str("from").unwrap_or(PLACEHOLDER_NUMBER)
}

fn account_sid(cfg: &ChannelConfig) -> &str {
    cfg.str("account_sid")
        .unwrap_or("AC00000000000000000000000000000000")
}

/// An inbound SMS from `from` as Twilio posts it to the channel's webhook,
/// signed with the channel's `auth_token`.
pub fn simulate_inbound(
    cfg: &ChannelConfig,
    public_url: &str,
    from: &str,
    text: &str,
    message_sid: &str,
) -> SimulatedRequest {
    let segments = segments::analyze(text).segments.max(1).to_string();
    let mut params = vec![
        ("SmsMessageSid", message_sid),
        ("NumMedia", "0"),
        ("SmsSid", message_sid),
        ("SmsStatus", "received"),
        ("Body", text),
        ("To", our_number(cfg)),
        ("NumSegments", &segments),
        ("MessageSid", message_sid),
        ("AccountSid", account_sid(cfg)),
        ("From", from),
        ("ApiVersion", "2010-04-01"),
    ];
    if let Some(service) = cfg.str("messaging_service_sid") {
        params.push(("MessagingServiceSid", service));
    }
    signed(cfg, public_url, &owned(params))
}

/// A status callback for our message `message_sid`, as Twilio posts it to
/// the `StatusCallback` we set (the channel's webhook).
pub fn simulate_status(
    cfg: &ChannelConfig,
    public_url: &str,
    message_sid: &str,
    status: &str,
    error_code: Option<&str>,
) -> SimulatedRequest {
    let mut params = vec![];
    if let Some(code) = error_code {
        params.push(("ErrorCode", code));
    }
    params.extend([
        ("SmsSid", message_sid),
        ("SmsStatus", status),
        ("MessageStatus", status),
        ("To", PLACEHOLDER_NUMBER),
        ("MessageSid", message_sid),
        ("AccountSid", account_sid(cfg)),
        ("From", our_number(cfg)),
        ("ApiVersion", "2010-04-01"),
    ]);
    if let Some(service) = cfg.str("messaging_service_sid") {
        params.push(("MessagingServiceSid", service));
    }
    signed(cfg, public_url, &owned(params))
}

/// Any form body (a file of `fixtures/sms/`, say) signed as Twilio would
/// post it to the channel's webhook: for `simulate --file`. The body is sent
/// byte for byte (without trailing whitespace), so a broken one reaches the
/// gateway broken, correctly signed, and is answered `malformed_payload`.
pub fn simulate_form(cfg: &ChannelConfig, public_url: &str, body: &[u8]) -> SimulatedRequest {
    let body = body.trim_ascii_end();
    let params: Vec<(String, String)> = url::form_urlencoded::parse(body).into_owned().collect();
    let mut req = signed(cfg, public_url, &params);
    // The signature covers the decoded params, so the original bytes go as they are.
    req.body = body.to_vec();
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "test-auth-token";
    const PUBLIC_URL: &str = "https://switchboard.example.com";

    fn cfg() -> ChannelConfig {
        toml::from_str(
            r#"
            id = "sms-main"
            kind = "sms"
            queue = "support"
            account_sid = "AC5f1b0e6a2c4d4e8f9a0b1c2d3e4f5a6b"
            auth_token = "test-auth-token"
            from = "+15035550100"
            "#,
        )
        .unwrap()
    }

    fn channel() -> SmsChannel {
        SmsChannel::new(&cfg(), PUBLIC_URL).unwrap()
    }

    fn fixture(name: &str) -> &'static [u8] {
        let text = match name {
            "inbound" => include_str!("../../../fixtures/sms/inbound.form"),
            "mms" => include_str!("../../../fixtures/sms/mms.form"),
            "stop" => include_str!("../../../fixtures/sms/stop.form"),
            "start" => include_str!("../../../fixtures/sms/start.form"),
            "opt_out_type" => include_str!("../../../fixtures/sms/opt_out_type.form"),
            "status_sent" => include_str!("../../../fixtures/sms/status_sent.form"),
            "status_delivered" => include_str!("../../../fixtures/sms/status_delivered.form"),
            "status_undelivered" => include_str!("../../../fixtures/sms/status_undelivered.form"),
            _ => panic!("no fixture {name}"),
        };
        text.trim_end().as_bytes()
    }

    fn raw<'a>(headers: &'a [(String, String)], body: &'a [u8]) -> RawRequest<'a> {
        RawRequest {
            path: "/webhooks/sms-main",
            query: "",
            headers: headers.into(),
            content_type: FORM_CONTENT_TYPE,
            body,
        }
    }

    fn normalize(body: &[u8]) -> Result<Vec<Inbound>, IntakeError> {
        let headers = vec![];
        let req = raw(&headers, body);
        channel().normalize(&Verified::new(&req))
    }

    fn message(body: &[u8]) -> InboundMessage {
        match normalize(body).unwrap().as_slice() {
            [Inbound::Message(m)] => m.clone(),
            other => panic!("expected one message, got {other:?}"),
        }
    }

    fn status(body: &[u8]) -> StatusUpdate {
        match normalize(body).unwrap().as_slice() {
            [Inbound::Status(s)] => s.clone(),
            other => panic!("expected one status, got {other:?}"),
        }
    }

    fn sign(body: &[u8], url: &str) -> Vec<(String, String)> {
        let params = form::parse(body).unwrap();
        vec![(
            "X-Twilio-Signature".to_string(),
            signature::compute(TOKEN, url, &params),
        )]
    }

    #[test]
    fn plain_inbound_becomes_a_message() {
        let before = Utc::now();
        let m = message(fixture("inbound"));
        assert_eq!(m.provider_id, "SM1f0e3c5a7b9d4e2f8a6c4b2d0e9f7a5c");
        assert_eq!(m.from, "+15035550142");
        assert_eq!(
            m.text,
            "Hi, my order #4411 hasn't arrived yet. Can you check?"
        );
        assert_eq!(m.contact_name, None);
        assert!(m.media.is_empty());
        assert_eq!(m.consent, None);
        assert!(
            m.sent_at >= before,
            "Twilio gives no timestamp: receive time"
        );
    }

    #[test]
    fn mms_carries_each_media_url_and_type() {
        let m = message(fixture("mms"));
        assert_eq!(m.text, "Here is the damaged box 📦");
        let base = "https://api.twilio.com/2010-04-01/Accounts/AC5f1b0e6a2c4d4e8f9a0b1c2d3e4f5a6b/Messages/MM8c2a4e6f0b1d3c5e7a9b0c2d4e6f8a1b/Media";
        assert_eq!(
            m.media,
            vec![
                MediaRef {
                    url: format!("{base}/ME1a3c5e7b9d0f2a4c6e8b0d2f4a6c8e9b"),
                    content_type: Some("image/jpeg".into()),
                    filename: None,
                    media_id: None,
                },
                MediaRef {
                    url: format!("{base}/ME2b4d6f8a0c1e3b5d7f9a1c3e5b7d9f0a"),
                    content_type: Some("application/pdf".into()),
                    filename: None,
                    media_id: None,
                },
            ]
        );
    }

    #[test]
    fn stop_and_start_change_consent() {
        assert_eq!(message(fixture("stop")).consent, Some(Consent::OptOut));
        assert_eq!(message(fixture("stop")).text, " Stop ");
        assert_eq!(message(fixture("start")).consent, Some(Consent::OptIn));
    }

    #[test]
    fn advanced_opt_out_type_is_honoured() {
        let m = message(fixture("opt_out_type"));
        assert_eq!(m.text, "Please stop texting me");
        assert_eq!(m.consent, Some(Consent::OptOut));
        assert_eq!(consent(Some("START"), "sure"), Some(Consent::OptIn));
        assert_eq!(consent(Some("HELP"), "help"), None);
    }

    #[test]
    fn every_standard_keyword_in_any_case() {
        for w in OPT_OUT_WORDS {
            assert_eq!(consent(None, w), Some(Consent::OptOut), "{w}");
            assert_eq!(
                consent(None, &format!("  {}\n", w.to_lowercase())),
                Some(Consent::OptOut),
                "{w}"
            );
        }
        for w in OPT_IN_WORDS {
            assert_eq!(consent(None, w), Some(Consent::OptIn), "{w}");
            assert_eq!(
                consent(None, &w.to_lowercase()),
                Some(Consent::OptIn),
                "{w}"
            );
        }
        assert_eq!(consent(None, "please stop"), None);
        assert_eq!(consent(None, "STOP IT"), None);
        assert_eq!(consent(None, "stopp"), None);
        assert_eq!(consent(None, ""), None);
    }

    #[test]
    fn status_callbacks_map_to_delivery_statuses() {
        let s = status(fixture("status_sent"));
        assert_eq!(s.provider_id, "SM9e1a3c5b7d8f0a2c4e6b8d0f2a4c6e7a");
        assert_eq!((s.status, s.error), (DeliveryStatus::Sent, None));
        let s = status(fixture("status_delivered"));
        assert_eq!((s.status, s.error), (DeliveryStatus::Delivered, None));
        let s = status(fixture("status_undelivered"));
        assert_eq!(s.provider_id, "SMa0b2c4d6e8f1a3b5c7d9e0f2a4b6c8d9");
        assert_eq!(s.status, DeliveryStatus::Failed);
        assert_eq!(
            s.error.as_deref(),
            Some("ErrorCode 30003: unreachable handset")
        );
    }

    #[test]
    fn every_twilio_status_has_a_meaning() {
        let cases = [
            ("queued", Some(DeliveryStatus::Queued)),
            ("accepted", Some(DeliveryStatus::Queued)),
            ("scheduled", Some(DeliveryStatus::Queued)),
            ("sending", Some(DeliveryStatus::Queued)),
            ("sent", Some(DeliveryStatus::Sent)),
            ("partially_delivered", Some(DeliveryStatus::Sent)),
            ("delivered", Some(DeliveryStatus::Delivered)),
            ("read", Some(DeliveryStatus::Read)),
            ("failed", Some(DeliveryStatus::Failed)),
            ("undelivered", Some(DeliveryStatus::Failed)),
            ("canceled", Some(DeliveryStatus::Failed)),
            ("receiving", None),
            ("received", None),
            ("something_new", None),
        ];
        for (name, expected) in cases {
            let body = format!("MessageSid=SM1&MessageStatus={name}&SmsStatus={name}");
            let got = normalize(body.as_bytes()).unwrap();
            let got = got.first().map(|i| match i {
                Inbound::Status(s) => s.status,
                other => panic!("{name}: {other:?}"),
            });
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn failures_explain_the_error_code() {
        let s = status(b"MessageSid=SM1&MessageStatus=failed&ErrorCode=21610");
        assert_eq!(
            s.error.as_deref(),
            Some("ErrorCode 21610: the recipient has unsubscribed (replied STOP)")
        );
        let s = status(b"MessageSid=SM1&MessageStatus=undelivered&ErrorCode=30007");
        assert_eq!(
            s.error.as_deref(),
            Some("ErrorCode 30007: carrier filtering")
        );
        let s = status(b"MessageSid=SM1&MessageStatus=failed&ErrorCode=12345");
        assert_eq!(s.error.as_deref(), Some("ErrorCode 12345"));
        let s = status(b"MessageSid=SM1&MessageStatus=failed");
        assert_eq!(
            s.error.as_deref(),
            Some("Twilio reported the message failed")
        );
        let s = status(b"MessageSid=SM1&MessageStatus=delivered&ErrorCode=30003");
        assert_eq!(s.error, None, "only failures carry an error");
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let cases: [(&[u8], &str); 5] = [
            (b"Body=hi&From=%2B15551234567", "MessageSid is missing"),
            (
                b"MessageSid=SM1&From=%2B1555&Body=x&NumMedia=two",
                "NumMedia is not a number: two",
            ),
            (
                b"MessageSid=SM1&From=%2B1555&NumMedia=2&MediaUrl0=https%3A%2F%2Fa",
                "NumMedia is 2 but MediaUrl1 is missing",
            ),
            (b"MessageSid=SM1&Body=hi", "From is missing"),
            (
                b"MessageSid=SM1&AccountSid=AC1",
                "neither an inbound message (Body, NumMedia) nor a status callback (MessageStatus)",
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(
                normalize(body),
                Err(IntakeError::Malformed(expected.into())),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn whatsapp_profile_name_becomes_the_contact_name() {
        let m = message(b"MessageSid=SM1&From=whatsapp%3A%2B15551234567&Body=hi&ProfileName=Kerry");
        assert_eq!(m.contact_name.as_deref(), Some("Kerry"));
    }

    #[test]
    fn verify_accepts_twilio_signature_over_public_url_and_path() {
        let body = fixture("inbound");
        let headers = sign(body, "https://switchboard.example.com/webhooks/sms-main");
        let v = channel().verify(&raw(&headers, body)).unwrap();
        assert_eq!(v.body(), body);
        // Twilio sometimes signs with the default port.
        let headers = sign(
            body,
            "https://switchboard.example.com:443/webhooks/sms-main",
        );
        assert!(channel().verify(&raw(&headers, body)).is_ok());
    }

    #[test]
    fn verify_includes_the_query_string() {
        let body = fixture("inbound");
        let headers = sign(
            body,
            "https://switchboard.example.com/webhooks/sms-main?src=tw",
        );
        let mut req = raw(&headers, body);
        req.query = "src=tw";
        assert!(channel().verify(&req).is_ok());
        req.query = "";
        assert!(channel().verify(&req).is_err());
    }

    #[test]
    fn verify_refuses_missing_and_wrong_signatures() {
        let body = fixture("inbound");
        assert_eq!(
            channel().verify(&raw(&[], body)).unwrap_err(),
            IntakeError::InvalidSignature("missing X-Twilio-Signature".into())
        );
        let headers = sign(body, "https://other.example.com/webhooks/sms-main");
        match channel().verify(&raw(&headers, body)).unwrap_err() {
            IntakeError::InvalidSignature(m) => {
                assert!(m.contains("does not match"), "{m}");
                assert!(
                    m.contains("https://switchboard.example.com/webhooks/sms-main"),
                    "{m}"
                );
            }
            other => panic!("{other:?}"),
        }
        // A changed body no longer matches.
        let headers = sign(body, "https://switchboard.example.com/webhooks/sms-main");
        let tampered = String::from_utf8(body.to_vec())
            .unwrap()
            .replace("4411", "4412");
        assert!(matches!(
            channel().verify(&raw(&headers, tampered.as_bytes())),
            Err(IntakeError::InvalidSignature(_))
        ));
    }

    #[test]
    fn verify_accepts_the_previous_token_during_rotation() {
        let mut c = cfg();
        c.settings.insert("auth_token".into(), "new-token".into());
        c.settings
            .insert("auth_token_previous".into(), TOKEN.into());
        let ch = SmsChannel::new(&c, PUBLIC_URL).unwrap();
        let body = fixture("inbound");
        let headers = sign(body, "https://switchboard.example.com/webhooks/sms-main");
        assert!(ch.verify(&raw(&headers, body)).is_ok());
    }

    #[test]
    fn verify_wants_a_form_body() {
        let body = br#"{"MessageSid":"SM1"}"#;
        let headers = vec![("X-Twilio-Signature".to_string(), "x".to_string())];
        let mut req = raw(&headers, body);
        req.content_type = "application/json";
        assert!(matches!(
            channel().verify(&req),
            Err(IntakeError::UnsupportedMediaType(m)) if m.contains("application/json")
        ));
        // A charset parameter is fine.
        let body = fixture("inbound");
        let headers = sign(body, "https://switchboard.example.com/webhooks/sms-main");
        let mut req = raw(&headers, body);
        req.content_type = "application/x-www-form-urlencoded; charset=UTF-8";
        assert!(channel().verify(&req).is_ok());
    }

    #[test]
    fn a_signed_body_that_is_not_utf8_is_malformed() {
        let body = b"MessageSid=SM1&From=%2B15551234567&Body=caf%E9";
        let lossy: Vec<(String, String)> = url::form_urlencoded::parse(body).into_owned().collect();
        let headers = vec![(
            "X-Twilio-Signature".to_string(),
            signature::compute(
                TOKEN,
                "https://switchboard.example.com/webhooks/sms-main",
                &lossy,
            ),
        )];
        assert!(matches!(
            channel().verify(&raw(&headers, body)),
            Err(IntakeError::Malformed(_))
        ));
    }

    #[test]
    fn ack_is_empty_twiml_as_text_xml() {
        let ack = channel().ack();
        assert_eq!(ack.status, 200);
        assert_eq!(ack.content_type, "text/xml");
        assert_eq!(
            String::from_utf8(ack.body).unwrap(),
            r#"<?xml version="1.0" encoding="UTF-8"?><Response/>"#
        );
    }

    #[test]
    fn simulated_status_is_verified_and_normalized() {
        let sim = simulate_status(&cfg(), PUBLIC_URL, "SM42", "undelivered", Some("30005"));
        let req = RawRequest {
            path: &sim.path,
            query: "",
            headers: (&sim.headers).into(),
            content_type: &sim.content_type,
            body: &sim.body,
        };
        let ch = channel();
        let items = ch.normalize(&ch.verify(&req).unwrap()).unwrap();
        assert_eq!(
            items,
            vec![Inbound::Status(StatusUpdate {
                provider_id: "SM42".into(),
                status: DeliveryStatus::Failed,
                error: Some("ErrorCode 30005: unknown number".into()),
            })]
        );
    }

    #[test]
    fn simulated_fixture_payload_is_verified() {
        let sim = simulate_form(&cfg(), PUBLIC_URL, fixture("mms"));
        assert_eq!(sim.body, fixture("mms"));
        let req = RawRequest {
            path: &sim.path,
            query: "",
            headers: (&sim.headers).into(),
            content_type: &sim.content_type,
            body: &sim.body,
        };
        let ch = channel();
        let items = ch.normalize(&ch.verify(&req).unwrap()).unwrap();
        assert!(matches!(&items[..], [Inbound::Message(m)] if m.media.len() == 2));
    }

    #[test]
    fn new_names_the_missing_setting() {
        let mut c = cfg();
        c.settings.remove("auth_token");
        assert_eq!(
            SmsChannel::new(&c, PUBLIC_URL).err().unwrap(),
            "channel sms-main: auth_token: missing (required for sms channels)"
        );
        let mut c = cfg();
        c.settings.remove("from");
        assert_eq!(
            SmsChannel::new(&c, PUBLIC_URL).err().unwrap(),
            "channel sms-main: from or messaging_service_sid: set one of them"
        );
        let mut c = cfg();
        c.settings.insert("from".into(), "5035550100".into());
        assert_eq!(
            SmsChannel::new(&c, PUBLIC_URL).err().unwrap(),
            "channel sms-main: from: not a phone number in E.164 form (+, country code, number), \
             a short code or an alphanumeric sender ID: 5035550100"
        );
        for bad in ["+1 555", "ACME-SUPPORT", "Acme Support Team", "12", "   "] {
            c.settings.insert("from".into(), bad.into());
            let e = SmsChannel::new(&c, PUBLIC_URL).err().unwrap();
            assert!(
                e.starts_with("channel sms-main: from: not a phone number"),
                "{bad}: {e}"
            );
        }
    }

    /// Twilio also sends from short codes and alphanumeric sender IDs: kept
    /// as they are.
    #[test]
    fn short_codes_and_alphanumeric_senders_are_kept() {
        for sender in ["12345", "894546", "Acme", "ACME Help 1"] {
            let mut c = cfg();
            c.settings.insert("from".into(), sender.into());
            let ch = SmsChannel::new(&c, PUBLIC_URL).unwrap();
            assert!(
                matches!(&ch.sender, Sender::From(n) if n == sender),
                "{sender}"
            );
        }
    }

    /// The channel's number is sent to Twilio in E.164 form, however written.
    #[test]
    fn the_channels_number_is_kept_in_e164_form() {
        let mut c = cfg();
        c.settings.insert("from".into(), "+1 (503) 555-0100".into());
        let ch = SmsChannel::new(&c, PUBLIC_URL).unwrap();
        assert!(matches!(&ch.sender, Sender::From(n) if n == "+15035550100"));
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO), "a date in the past");
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
