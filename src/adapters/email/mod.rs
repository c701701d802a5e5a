//! Email (providers.md A7): the channel's mailbox polled over IMAP
//! ([`imap`]) and/or raw RFC 5322 over HTTP (Standard Webhooks signed with
//! the channel's `inbound_secret`), parsed by [`parse`].
//!
//! | part | where |
//! | --- | --- |
//! | parsing: charsets, RFC 2047/2231, text/HTML (sanitized), attachments, oversize, auto-replies, bounces | [`parse`] |
//! | HTTP intake: signature and 5-minute window | [`EmailChannel::verify`] |
//! | IMAP polling: read-only (`EXAMINE`, `BODY.PEEK[]`), UID/UIDVALIDITY cursor, IDLE, quarantine, one poller per mailbox | [`imap`] |
//! | into the gateway: text, sanitized `html`, attachments and inline images (`InboundMessage::files`), the raw message (`InboundMessage::raw`) | [`EmailChannel::inbound_from_raw`] |
//! | threading | the thread's Message-IDs go to the gateway in `InboundMessage::thread_refs` (In-Reply-To first, then References newest first, then the reply token of our `Reply-To`) |
//! | SMTP sending with lettre: STARTTLS, implicit TLS or plain, AUTH, `smtp.ca_file`; which failures are retried | [`send`] |
//! | formatted mail: `multipart/alternative` text + sanitized HTML (`OutgoingMessage::html`), `multipart/mixed` with attachments | [`send::build`] |
//! | check-config: address, inbound_secret, smtp (tls mode, ca_file), imap | [`config_problems`] |
//!
//! Identifiers: a customer message's provider ID is its Message-ID without
//! brackets (or `sha256:<hex>` of the raw bytes when it has none), so the
//! gateway's `msg:{channel}:{id}` claim dedupes it for good; our own
//! messages get the Message-ID `<{token}@{domain}>` and the `Reply-To`
//! `{local}+{token}@{domain}`, so a reply token leads back to the same
//! `out:{channel}:{token}@{domain}` entry the gateway writes for every send.

pub mod imap;
pub mod parse;
pub mod send;

use super::{
    DeliveryError, Inbound, InboundFile, InboundMessage, IntakeError, Outbound, OutgoingMessage,
    RawRequest, SendReceipt, SimulatedRequest, StatusUpdate, Verified, WebhookAck, WebhookIntake,
};
use crate::config::ChannelConfig;
use crate::domain::DeliveryStatus;
use async_trait::async_trait;
use chrono::Utc;
use parse::{Automatic, ParsedEmail};

/// How far a `webhook-timestamp` may be from now (CONTRACT: 5 minutes).
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 300;

/// The `+` tag of our `Reply-To` address that carries the reply token.
pub const TOKEN_TAG: &str = "r-";

pub struct EmailChannel {
    channel_id: String,
    /// The channel's own address, lower-cased.
    address: String,
    /// The Standard Webhooks key of `inbound_secret`, when mail may arrive over HTTP.
    inbound_key: Option<Vec<u8>>,
    /// The channel's display name, the `From` name of replies.
    name: Option<String>,
    smtp: Option<send::SmtpSettings>,
    http: reqwest::Client,
}

impl EmailChannel {
    pub fn new(cfg: &ChannelConfig) -> Result<EmailChannel, String> {
        let address = cfg
            .str("address")
            .ok_or_else(|| {
                format!(
                    "channel {}: address: missing (required for email channels)",
                    cfg.id
                )
            })?
            .trim()
            .to_lowercase();
        if !address.contains('@') {
            return Err(format!(
                "channel {}: address: not an email address: {address}",
                cfg.id
            ));
        }
        let inbound_key = match cfg.str("inbound_secret") {
            Some(s) => Some(crate::routing::sink_key(s).ok_or_else(|| {
                format!(
                    "channel {}: inbound_secret: not a Standard Webhooks secret (whsec_ + base64)",
                    cfg.id
                )
            })?),
            None => None,
        };
        Ok(EmailChannel {
            channel_id: cfg.id.clone(),
            address,
            inbound_key,
            name: cfg.name.clone(),
            smtp: send::SmtpSettings::from_config(cfg)?,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(60))
                .build()
                .map_err(|e| e.to_string())?,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    fn domain(&self) -> &str {
        self.address.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
    }

    /// Our Message-ID (without brackets) for a reply token.
    pub fn message_id_for(&self, token: &str) -> String {
        format!("{token}@{}", self.domain())
    }

    /// The `Reply-To` address carrying a reply token.
    pub fn reply_to_for(&self, token: &str) -> String {
        let (local, domain) = self.address.rsplit_once('@').unwrap_or((&self.address, ""));
        let local = local.split('+').next().unwrap_or(local);
        format!("{local}+{TOKEN_TAG}{token}@{domain}")
    }

    /// The reply token in a recipient address of ours, if any.
    pub fn token_in(&self, recipient: &str) -> Option<String> {
        let (local, domain) = recipient.rsplit_once('@')?;
        let (own_local, own_domain) = self.address.rsplit_once('@')?;
        if !domain.eq_ignore_ascii_case(own_domain) {
            return None;
        }
        let (base, tag) = local.split_once('+')?;
        if !base.eq_ignore_ascii_case(own_local.split('+').next().unwrap_or(own_local)) {
            return None;
        }
        let token = tag.strip_prefix(TOKEN_TAG)?;
        (!token.is_empty() && token.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            .then(|| token.to_ascii_lowercase())
    }

    /// Turns one parsed message into what the gateway stores.
    pub fn to_inbound(&self, p: &ParsedEmail) -> Vec<Inbound> {
        if let Automatic::Bounce { original, .. } = &p.automatic {
            // A bounce marks the message it refers to failed; it never
            // opens or reopens an interaction.
            return original
                .iter()
                .map(|id| {
                    Inbound::Status(StatusUpdate {
                        provider_id: id.clone(),
                        status: DeliveryStatus::Failed,
                        error: Some(format!("bounced: {}", first_line(&p.text))),
                    })
                })
                .collect();
        }
        let mut thread_refs: Vec<String> = p.in_reply_to.clone();
        for r in p.references.iter().rev() {
            if !thread_refs.contains(r) {
                thread_refs.push(r.clone());
            }
        }
        for rcpt in &p.recipients {
            if let Some(t) = self.token_in(rcpt) {
                let id = self.message_id_for(&t);
                if !thread_refs.contains(&id) {
                    thread_refs.push(id);
                }
            }
        }
        let mut text = p.text.clone();
        for o in &p.omitted {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&format!(
                "[attachment omitted: {} ({}, {} bytes, over the 10 MiB limit)]",
                o.filename.as_deref().unwrap_or("unnamed"),
                o.content_type,
                o.size
            ));
        }
        let mut files: Vec<InboundFile> = p
            .attachments
            .iter()
            .enumerate()
            .map(|(n, a)| InboundFile {
                filename: a.filename.clone().unwrap_or_else(|| {
                    super::media::filename_for(&format!("attachment-{}", n + 1), &a.content_type)
                }),
                content_type: a.content_type.clone(),
                content_id: a.content_id.clone(),
                bytes: a.data.clone(),
                omitted_size: None,
            })
            .collect();
        files.extend(p.omitted.iter().map(|o| InboundFile {
            filename: o.filename.clone().unwrap_or_else(|| "unnamed".into()),
            content_type: o.content_type.clone(),
            content_id: None,
            bytes: vec![],
            omitted_size: Some(o.size as u64),
        }));
        let kind = match p.automatic {
            Automatic::AutoReply => Some("auto_reply".to_string()),
            _ => None,
        };
        vec![Inbound::Message(InboundMessage {
            provider_id: p.message_id.clone(),
            from: p.from_address.clone(),
            contact_name: p.from_name.clone(),
            reply_to: p.in_reply_to.first().cloned(),
            kind,
            text,
            sent_at: p.date.unwrap_or_else(Utc::now),
            subject: Some(p.subject.clone()),
            html: p.html.clone(),
            thread_refs,
            new_thread: p.in_reply_to.is_empty() && p.references.is_empty(),
            automatic: p.automatic != Automatic::No,
            files,
            ..InboundMessage::default()
        })]
    }

    /// Parses one raw message into what the gateway stores, the raw bytes
    /// kept with it for audit (HTTP intake and IMAP polling alike).
    pub fn inbound_from_raw(&self, raw: &[u8]) -> Result<Vec<Inbound>, parse::ParseError> {
        let parsed = parse::parse(raw)?;
        let mut items = self.to_inbound(&parsed);
        for item in &mut items {
            if let Inbound::Message(m) = item {
                m.raw = Some(raw.to_vec());
            }
        }
        Ok(items)
    }
}

/// What `check-config` says about an email channel's own keys: the
/// address, `inbound_secret`, `smtp` and `imap` (every problem, each naming
/// the channel and key).
pub fn config_problems(cfg: &ChannelConfig) -> Vec<String> {
    let mut p = vec![];
    if cfg.settings.contains_key("address") {
        if let Err(e) = EmailChannel::new(cfg) {
            p.push(e);
        }
    }
    if let Err(e) = imap::ImapSettings::from_config(cfg) {
        p.extend(e);
    }
    p
}

fn first_line(s: &str) -> &str {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

/// Checks a Standard Webhooks signature and its timestamp window.
pub fn verify_standard_webhooks(
    key: &[u8],
    req: &RawRequest<'_>,
    now: i64,
) -> Result<(), IntakeError> {
    let bad = |m: &str| IntakeError::InvalidSignature(m.to_string());
    let id = req
        .header("webhook-id")
        .ok_or_else(|| bad("webhook-id is missing"))?;
    let ts_raw = req
        .header("webhook-timestamp")
        .ok_or_else(|| bad("webhook-timestamp is missing"))?;
    let ts: i64 = ts_raw
        .trim()
        .parse()
        .map_err(|_| bad("webhook-timestamp is not a number"))?;
    if (now - ts).abs() > TIMESTAMP_TOLERANCE_SECS {
        return Err(bad("webhook-timestamp is more than 5 minutes off"));
    }
    let sigs = req
        .header("webhook-signature")
        .ok_or_else(|| bad("webhook-signature is missing"))?;
    let expected = crate::routing::sign(key, id, ts, req.body);
    let ok = sigs.split_whitespace().any(|s| {
        use subtle::ConstantTimeEq;
        s.len() == expected.len() && bool::from(s.as_bytes().ct_eq(expected.as_bytes()))
    });
    if ok {
        Ok(())
    } else {
        Err(bad("webhook-signature does not match"))
    }
}

/// A raw message posted as a mail server would pipe it in, signed.
pub fn simulate_raw(
    channel_id: &str,
    secret: &str,
    raw: &[u8],
    timestamp: i64,
) -> Result<SimulatedRequest, String> {
    let key = crate::routing::sink_key(secret).ok_or("inbound_secret: not whsec_ + base64")?;
    let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    Ok(SimulatedRequest {
        path: format!("/webhooks/{channel_id}"),
        content_type: "message/rfc822".into(),
        headers: vec![
            ("webhook-id".into(), id.clone()),
            ("webhook-timestamp".into(), timestamp.to_string()),
            (
                "webhook-signature".into(),
                crate::routing::sign(&key, &id, timestamp, raw),
            ),
        ],
        body: raw.to_vec(),
    })
}

impl WebhookIntake for EmailChannel {
    fn verify<'a>(&self, req: &RawRequest<'a>) -> Result<Verified<'a>, IntakeError> {
        let key = self.inbound_key.as_deref().ok_or_else(|| {
            IntakeError::InvalidSignature(format!(
                "email channel {} has no inbound_secret: mail over HTTP is refused",
                self.channel_id
            ))
        })?;
        verify_standard_webhooks(key, req, Utc::now().timestamp())?;
        Ok(Verified::new(req))
    }

    fn normalize(&self, req: &Verified<'_>) -> Result<Vec<Inbound>, IntakeError> {
        let ct = req.content_type().to_ascii_lowercase();
        if !ct.starts_with("message/rfc822") {
            return Err(IntakeError::UnsupportedMediaType(format!(
                "email is posted as message/rfc822, not {ct}"
            )));
        }
        self.inbound_from_raw(req.body())
            .map_err(|e| IntakeError::Malformed(e.to_string()))
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
impl Outbound for EmailChannel {
    async fn send(&self, msg: &OutgoingMessage) -> Result<SendReceipt, DeliveryError> {
        let Some(smtp) = &self.smtp else {
            return Err(DeliveryError::permanent(format!(
                "email channel {} has no smtp settings: it cannot send",
                self.channel_id
            )));
        };
        let token = send::token_of(&msg.id);
        if token.is_empty() {
            return Err(DeliveryError::permanent("message without an ID"));
        }
        let message_id = self.message_id_for(&token);
        let reply_to = self.reply_to_for(&token);
        let mut files = Vec::with_capacity(msg.attachments.len());
        for a in &msg.attachments {
            let r =
                self.http.get(&a.public_url).send().await.map_err(|e| {
                    DeliveryError::retryable(format!("attachment {}: {e}", a.filename))
                })?;
            if !r.status().is_success() {
                return Err(DeliveryError::retryable(format!(
                    "attachment {}: {}",
                    a.filename,
                    r.status()
                )));
            }
            let bytes = r
                .bytes()
                .await
                .map_err(|e| DeliveryError::retryable(format!("attachment {}: {e}", a.filename)))?;
            files.push(bytes.to_vec());
        }
        let email = send::build(
            msg,
            &send::Envelope {
                thread: send::thread_of(msg),
                from: &self.address,
                from_name: self.name.as_deref(),
                message_id: &message_id,
                reply_to: &reply_to,
                files,
            },
        )?;
        let transport = smtp.transport().map_err(DeliveryError::permanent)?;
        send::deliver(&transport, &email).await?;
        Ok(SendReceipt {
            provider_id: message_id,
            ..SendReceipt::default()
        })
    }
}

#[cfg(test)]
mod tests;
