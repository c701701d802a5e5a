//! Channel adapters: only the provider-specific part of each channel.
//!
//! | kind | module | inbound | outbound | signature |
//! | --- | --- | --- | --- | --- |
//! | sms | [`sms`] | Twilio form webhooks, status callbacks, MMS media | `Messages.json` with `MediaUrl` | `X-Twilio-Signature` (HMAC-SHA1) |
//! | whatsapp | [`whatsapp`] | Cloud API webhooks: messages, statuses, reactions, media by ID | `/{phone_number_id}/messages`, media upload | `X-Hub-Signature-256` |
//! | facebook, instagram | [`messenger`] | Messenger Platform `messaging[]`: messages, echoes, reactions, watermarks | `/{page or account id}/messages` | `X-Hub-Signature-256` |
//! | email | [`email`] | IMAP polling, raw RFC 5322 over HTTP | SMTP | Standard Webhooks |
//! | twitter | [`twitter`] | Account Activity webhooks: DMs, echoes, typing, read, revoke | X API v2 DMs, chunked media upload, token refresh | `x-twitter-webhooks-signature` |
//! | chat | [`chat`] | our widget over WebSocket or HTTP (`/chat/...`) | the store's event stream to the visitor's socket | session token |
//!
//! Adapters are split by direction because channels differ: webhook intake
//! ([`WebhookIntake`]: handshake, verify, normalize, ack) and delivery
//! ([`Outbound`]: send). `verify` and `normalize` are pure functions of
//! values, so the fixtures in `fixtures/` test most of an adapter without a
//! network; only `send` and media downloads touch it.

pub mod chat;
pub mod email;
pub mod media;
pub mod messenger;
pub mod meta;
pub mod sms;
pub mod twitter;
pub mod whatsapp;

use crate::domain::DeliveryStatus;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::borrow::Cow;
use std::time::Duration;

/// A webhook request as it arrived: nothing in it is trusted yet.
#[derive(Debug, Clone, Copy)]
pub struct RawRequest<'a> {
    /// The path as requested, e.g. `/webhooks/sms-main`.
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: &'a str,
    /// Header lookup by name (any case).
    pub headers: Headers<'a>,
    pub content_type: &'a str,
    pub body: &'a [u8],
}

/// A request's headers as names and values: owned (a simulated request) or
/// borrowed from the HTTP server's own map (a webhook, which then copies no
/// header).
#[derive(Debug, Clone, Copy)]
pub enum Headers<'a> {
    Owned(&'a [(String, String)]),
    Borrowed(&'a [(&'a str, &'a str)]),
}

impl<'a> From<&'a [(String, String)]> for Headers<'a> {
    fn from(h: &'a [(String, String)]) -> Headers<'a> {
        Headers::Owned(h)
    }
}

impl<'a> From<&'a Vec<(String, String)>> for Headers<'a> {
    fn from(h: &'a Vec<(String, String)>) -> Headers<'a> {
        Headers::Owned(h)
    }
}

impl<'a> From<&'a [(&'a str, &'a str)]> for Headers<'a> {
    fn from(h: &'a [(&'a str, &'a str)]) -> Headers<'a> {
        Headers::Borrowed(h)
    }
}

impl<'a> Headers<'a> {
    /// The first value of the header `name` (any case).
    pub fn get(&self, name: &str) -> Option<&'a str> {
        match *self {
            Headers::Owned(h) => h
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str()),
            Headers::Borrowed(h) => h
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v),
        }
    }
}

impl<'a> RawRequest<'a> {
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers.get(name)
    }
}

/// A webhook exactly as a provider would post it to `path` on the gateway
/// (built by each adapter's `simulate_*` functions for `switchboard simulate`,
/// the demo sandbox and tests).
#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedRequest {
    pub path: String,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A request whose signature has been checked. Only an adapter's `verify`
/// makes one, so `normalize` cannot be handed unverified bytes.
#[derive(Debug)]
pub struct Verified<'a> {
    body: &'a [u8],
    content_type: &'a str,
    form: Option<sms::form::Pairs<'a>>,
}

impl<'a> Verified<'a> {
    /// For adapters' `verify` only.
    pub(crate) fn new(req: &RawRequest<'a>) -> Verified<'a> {
        Verified {
            body: req.body,
            content_type: req.content_type,
            form: None,
        }
    }
    /// The same, keeping the form fields `verify` already parsed so that
    /// `normalize` need not parse the body again.
    pub(crate) fn with_form(req: &RawRequest<'a>, form: sms::form::Pairs<'a>) -> Verified<'a> {
        Verified {
            form: Some(form),
            ..Verified::new(req)
        }
    }
    /// The form fields `verify` parsed, if it kept them.
    pub fn form(&self) -> Option<&[(Cow<'a, str>, Cow<'a, str>)]> {
        self.form.as_deref()
    }
    pub fn body(&self) -> &'a [u8] {
        self.body
    }
    pub fn content_type(&self) -> &'a str {
        self.content_type
    }
}

/// Media a provider holds for an inbound message, to download at once.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MediaRef {
    /// Where to download it (empty when only `media_id` is known).
    pub url: String,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    /// A provider media ID that must be resolved into a URL first
    /// (WhatsApp), by the channel's [`MediaResolver`].
    pub media_id: Option<String>,
}

/// A file that came inside the message itself (email parts), so there is
/// nothing to download: the gateway stores the bytes as they are.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InboundFile {
    pub filename: String,
    pub content_type: String,
    /// The part's `Content-ID` without brackets (inline images).
    pub content_id: Option<String>,
    pub bytes: Vec<u8>,
    /// The file was over the 10 MiB limit: `bytes` is empty and it is
    /// recorded as omitted with this real size.
    pub omitted_size: Option<u64>,
}

/// What SMS keywords do to a contact's consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consent {
    OptOut,
    OptIn,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct InboundMessage {
    pub provider_id: String,
    /// The sender's ID as the provider gave it; the gateway canonicalises it.
    /// For an [`Inbound::Echo`], the customer the message went to.
    pub from: String,
    /// Other IDs of the same sender (WhatsApp: the business-scoped `user_id`
    /// beside the `wa_id`). The contact keeps them all.
    pub aliases: Vec<String>,
    /// The provider ID of the message this one answers (a quoted reply).
    pub reply_to: Option<String>,
    /// What kind of message it was when not plain text or media
    /// (`location`, `contacts`, `unsupported`, `story_mention`, ...).
    pub kind: Option<String>,
    /// For an echo: our own message ID, when the provider carried it back
    /// (Messenger's `metadata`).
    pub echo_of: Option<String>,
    pub contact_name: Option<String>,
    pub text: String,
    /// The provider's timestamp (or the receive time where it gives none).
    pub sent_at: DateTime<Utc>,
    pub media: Vec<MediaRef>,
    /// Files carried in the message itself (email), stored as they are.
    pub files: Vec<InboundFile>,
    /// Email: the raw message, kept in the blob store for audit.
    pub raw: Option<Vec<u8>>,
    pub consent: Option<Consent>,
    /// Email: the subject.
    pub subject: Option<String>,
    /// Email: the sanitized HTML alternative, when there was one.
    pub html: Option<String>,
    /// Email: provider IDs (Message-IDs) of the thread this message answers,
    /// best first (In-Reply-To, References newest first, our reply token's
    /// Message-ID). The message joins the interaction of the first one the
    /// store knows, when it belongs to the same contact.
    pub thread_refs: Vec<String>,
    /// Email: the message starts a new thread (no In-Reply-To, no
    /// References): it opens a new interaction.
    pub new_thread: bool,
    /// Email: an auto-reply; it never reopens an interaction.
    pub automatic: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    /// The provider's ID of our outbound message.
    pub provider_id: String,
    pub status: DeliveryStatus,
    pub error: Option<String>,
}

/// A customer's reaction to a message (an emoji), or its removal.
#[derive(Debug, Clone, PartialEq)]
pub struct Reaction {
    /// A unique ID of this reaction event, for dedupe.
    pub provider_id: String,
    pub from: String,
    /// The provider ID of the message reacted to.
    pub target_provider_id: String,
    /// `None` when the reaction was removed.
    pub emoji: Option<String>,
    pub sent_at: DateTime<Utc>,
}

/// Delivery or read up to a moment, for every message to one customer
/// (Messenger and Instagram watermarks).
#[derive(Debug, Clone, PartialEq)]
pub struct Watermark {
    /// The customer whose client reported it.
    pub from: String,
    pub status: DeliveryStatus,
    /// Every message sent up to this moment is covered.
    pub up_to: DateTime<Utc>,
    /// Messages named explicitly (Messenger `delivery.mids`).
    pub provider_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Message(InboundMessage),
    Status(StatusUpdate),
    Reaction(Reaction),
    /// The customer deleted (unsent) a message: it is marked retracted, not removed.
    Retraction {
        provider_id: String,
        from: String,
    },
    /// A message the business sent, echoed back by the provider: ours
    /// (matched, never a customer message) or sent elsewhere (recorded as outbound).
    Echo(InboundMessage),
    Watermark(Watermark),
    /// The customer is typing (`on`) or stopped; shown live, never stored as a message.
    Typing {
        from: String,
        on: bool,
    },
    /// The provider says the channel's authorization was revoked: it needs re-authorisation.
    Revoked,
}

/// The answer a provider expects.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookAck {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IntakeError {
    #[error("{0}")]
    InvalidSignature(String),
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    VerifyTokenMismatch(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
}

pub trait WebhookIntake: Send + Sync {
    /// Answers a provider handshake (GET), or `None` when the kind has none.
    fn handshake(&self, _query: &str) -> Option<Result<WebhookAck, IntakeError>> {
        None
    }
    /// Checks the provider's signature over the raw bytes.
    fn verify<'a>(&self, req: &RawRequest<'a>) -> Result<Verified<'a>, IntakeError>;
    /// Turns a verified body into messages and statuses (every one in a batch).
    fn normalize(&self, req: &Verified<'_>) -> Result<Vec<Inbound>, IntakeError>;
    /// What to answer once everything is stored (and for a duplicate).
    fn ack(&self) -> WebhookAck;
}

/// An attachment of an outbound message.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingAttachment {
    pub id: String,
    pub filename: String,
    pub content_type: String,
    pub size: u64,
    /// A public, expiring link to it, for providers that fetch media by URL.
    pub public_url: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct OutgoingMessage {
    /// Our message ID.
    pub id: String,
    /// The contact's digital ID.
    pub to: String,
    pub text: String,
    /// Email: the sanitized HTML alternative of `text`, when the agent wrote one.
    pub html: Option<String>,
    pub attachments: Vec<OutgoingAttachment>,
    /// The provider ID of the customer's message this reply quotes.
    pub reply_to: Option<String>,
    /// A message tag that extends the window (`HUMAN_AGENT`), when needed.
    pub tag: Option<String>,
    /// Email: the interaction's subject.
    pub subject: Option<String>,
    /// Email: the provider ID (Message-ID) of the latest customer message.
    pub in_reply_to: Option<String>,
    /// Email: every Message-ID of the thread, oldest first.
    pub references: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SendReceipt {
    /// The provider's ID of the message (the last part, when it took several requests).
    pub provider_id: String,
    /// IDs of the earlier parts (attachments sent one request each), so their
    /// echoes and statuses are recognised as ours.
    pub other_provider_ids: Vec<String>,
}

/// A failed send, classified by what to do next.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct DeliveryError {
    pub message: String,
    /// The provider's error code, when it gave one.
    pub code: Option<String>,
    pub retryable: bool,
    /// The provider said when to come back (`Retry-After`).
    pub retry_after: Option<Duration>,
    /// The channel's credentials were refused: the channel needs re-authorisation.
    pub needs_reauth: bool,
    /// The provider refused because the messaging window is closed.
    pub window_closed: bool,
}

impl DeliveryError {
    pub fn retryable(message: impl Into<String>) -> DeliveryError {
        DeliveryError {
            message: message.into(),
            code: None,
            retryable: true,
            retry_after: None,
            needs_reauth: false,
            window_closed: false,
        }
    }
    pub fn permanent(message: impl Into<String>) -> DeliveryError {
        DeliveryError {
            retryable: false,
            ..DeliveryError::retryable(message)
        }
    }
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

/// Turns a provider media ID into something [`media::MediaClient`] can download.
#[async_trait]
pub trait MediaResolver: Send + Sync {
    async fn resolve(&self, media: &MediaRef) -> Result<MediaRef, String>;
}

#[async_trait]
pub trait Outbound: Send + Sync {
    async fn send(&self, msg: &OutgoingMessage) -> Result<SendReceipt, DeliveryError>;
}
