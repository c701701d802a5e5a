//! SMTP delivery with lettre: STARTTLS, implicit TLS or plain (tests), with
//! authentication when a username is configured.
//!
//! Every reply goes `From` the channel's address with `Subject: Re: …`, our
//! own `Message-ID` (`<{token}@{domain}>`, the token derived from our
//! message ID so a retry sends the same ID), `In-Reply-To` the latest
//! customer message, `References` the thread, and a `Reply-To` carrying the
//! token. 4xx answers and connection failures are retried; 5xx fail with the
//! server's reply kept.

use super::parse::reply_subject;
use crate::adapters::{DeliveryError, OutgoingMessage};
use crate::config::ChannelConfig;
use lettre::message::{header, Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use std::time::Duration;

/// How the connection to the relay is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Implicit TLS (port 465).
    Tls,
    /// STARTTLS, required.
    StartTls,
    /// No TLS at all (local relays and tests).
    None,
}

#[derive(Debug, Clone)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl SmtpSettings {
    /// Reads `smtp = {host, port, tls, username, password}`; `None` when absent.
    pub fn from_config(cfg: &ChannelConfig) -> Result<Option<SmtpSettings>, String> {
        let Some(v) = cfg.settings.get("smtp") else {
            return Ok(None);
        };
        let t = v
            .as_table()
            .ok_or_else(|| format!("channel {}: smtp: must be a table", cfg.id))?;
        let s = |k: &str| t.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let host = s("host").ok_or_else(|| format!("channel {}: smtp.host: missing", cfg.id))?;
        let port = match t.get("port") {
            Some(p) => p
                .as_integer()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| format!("channel {}: smtp.port: not a port number", cfg.id))?,
            None => 587,
        };
        let tls = match t.get("tls") {
            None => {
                if port == 465 {
                    SmtpTls::Tls
                } else {
                    SmtpTls::StartTls
                }
            }
            Some(toml::Value::Boolean(false)) => SmtpTls::None,
            Some(toml::Value::Boolean(true)) => {
                if port == 465 {
                    SmtpTls::Tls
                } else {
                    SmtpTls::StartTls
                }
            }
            Some(toml::Value::String(m)) => match m.to_ascii_lowercase().as_str() {
                "tls" | "implicit" | "ssl" => SmtpTls::Tls,
                "starttls" => SmtpTls::StartTls,
                "none" | "plain" | "off" => SmtpTls::None,
                other => {
                    return Err(format!(
                        "channel {}: smtp.tls: {other}: use \"tls\", \"starttls\" or \"none\"",
                        cfg.id
                    ))
                }
            },
            Some(_) => {
                return Err(format!(
                    "channel {}: smtp.tls: use \"tls\", \"starttls\" or \"none\"",
                    cfg.id
                ))
            }
        };
        Ok(Some(SmtpSettings {
            host,
            port,
            tls,
            username: s("username"),
            password: s("password"),
        }))
    }

    pub fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
        let builder = match self.tls {
            SmtpTls::None => {
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(self.host.as_str())
            }
            SmtpTls::Tls | SmtpTls::StartTls => {
                let params = TlsParameters::new(self.host.clone()).map_err(|e| e.to_string())?;
                let tls = if self.tls == SmtpTls::Tls {
                    Tls::Wrapper(params)
                } else {
                    Tls::Required(params)
                };
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(self.host.as_str()).tls(tls)
            }
        };
        let mut builder = builder
            .port(self.port)
            .timeout(Some(Duration::from_secs(30)));
        if let Some(user) = &self.username {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                self.password.clone().unwrap_or_default(),
            ));
        }
        Ok(builder.build())
    }
}

/// The token of our message ID: lower-case alphanumerics of it.
pub fn token_of(message_id: &str) -> String {
    message_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// The thread a reply continues. [`OutgoingMessage`] does not carry these
/// yet (see [`thread_of`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Thread {
    /// The interaction's subject (a reply gets `Re: ` before it).
    pub subject: Option<String>,
    /// An HTML alternative of the text.
    pub html: Option<String>,
    /// The Message-ID of the latest customer message, for `In-Reply-To`.
    pub in_reply_to: Option<String>,
    /// The Message-IDs of the thread, oldest first, for `References`.
    pub references: Vec<String>,
}

/// The thread of an outgoing message: `In-Reply-To` names the latest
/// customer message (or the quoted one), `References` lists the thread.
pub fn thread_of(msg: &OutgoingMessage) -> Thread {
    let in_reply_to = msg.reply_to.clone().or_else(|| msg.in_reply_to.clone());
    let mut references = msg.references.clone();
    if let Some(r) = &in_reply_to {
        if !references.contains(r) {
            references.push(r.clone());
        }
    }
    Thread {
        subject: msg.subject.clone(),
        in_reply_to,
        references,
        ..Thread::default()
    }
}

/// What one reply needs beyond the [`OutgoingMessage`].
pub struct Envelope<'a> {
    pub thread: Thread,
    pub from: &'a str,
    pub from_name: Option<&'a str>,
    /// Our Message-ID, without brackets.
    pub message_id: &'a str,
    pub reply_to: &'a str,
    /// The attachments' bytes, in the order of `msg.attachments`.
    pub files: Vec<Vec<u8>>,
}

fn angle(id: &str) -> String {
    format!("<{id}>")
}

/// Builds the RFC 5322 message of one reply.
pub fn build(msg: &OutgoingMessage, env: &Envelope<'_>) -> Result<lettre::Message, DeliveryError> {
    let bad = |what: &str, e: String| DeliveryError::permanent(format!("{what}: {e}"));
    let from = Mailbox::new(
        env.from_name.map(str::to_string),
        env.from.parse().map_err(|e| bad("from", format!("{e}")))?,
    );
    let to: Mailbox = msg
        .to
        .parse()
        .map_err(|e| bad("recipient", format!("{e}")))?;
    let reply_to: Mailbox = env
        .reply_to
        .parse()
        .map_err(|e| bad("reply-to", format!("{e}")))?;
    let t = &env.thread;
    let subject = match (&t.subject, &t.in_reply_to) {
        (Some(s), Some(_)) => reply_subject(s),
        (Some(s), None) => s.clone(),
        (None, _) => "Re:".to_string(),
    };
    let mut b = lettre::Message::builder()
        .from(from)
        .to(to)
        .reply_to(reply_to)
        .subject(subject)
        .message_id(Some(angle(env.message_id)));
    if let Some(parent) = &t.in_reply_to {
        b = b.in_reply_to(angle(parent));
    }
    let mut refs: Vec<String> = t.references.iter().map(|r| angle(r)).collect();
    if let Some(parent) = &t.in_reply_to {
        let p = angle(parent);
        if !refs.contains(&p) {
            refs.push(p);
        }
    }
    if !refs.is_empty() {
        b = b.references(refs.join(" "));
    }
    let text = SinglePart::builder()
        .header(header::ContentType::TEXT_PLAIN)
        .body(msg.text.clone());
    let body = match &t.html {
        Some(html) => MultiPart::alternative().singlepart(text).singlepart(
            SinglePart::builder()
                .header(header::ContentType::TEXT_HTML)
                .body(html.clone()),
        ),
        None => MultiPart::mixed().singlepart(text),
    };
    let mut body = if msg.attachments.is_empty() {
        body
    } else {
        MultiPart::mixed().multipart(body)
    };
    for (a, data) in msg.attachments.iter().zip(env.files.iter()) {
        let ct = header::ContentType::parse(&a.content_type)
            .unwrap_or_else(|_| header::ContentType::parse("application/octet-stream").unwrap());
        body = body.singlepart(Attachment::new(a.filename.clone()).body(data.clone(), ct));
    }
    b.multipart(body)
        .map_err(|e| DeliveryError::permanent(format!("building the message: {e}")))
}

/// Sends one built message; classifies the SMTP answer.
pub async fn deliver(
    transport: &AsyncSmtpTransport<Tokio1Executor>,
    email: &lettre::Message,
) -> Result<(), DeliveryError> {
    match transport.send(email.clone()).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let code = e.status().map(|c| c.to_string());
            let message = format!("smtp: {e}");
            let mut err = if e.is_permanent() {
                DeliveryError::permanent(message)
            } else {
                DeliveryError::retryable(message)
            };
            err.code = code;
            Err(err)
        }
    }
}
