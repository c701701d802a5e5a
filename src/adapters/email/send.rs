//! SMTP delivery with lettre: STARTTLS, implicit TLS or plain (tests), with
//! authentication when a username is configured.
//!
//! Every reply goes `From` the channel's address with `Subject: Re: …`, our
//! own `Message-ID` (`<{token}@{domain}>`, the token derived from our
//! message ID so a retry sends the same ID), `In-Reply-To` the latest
//! customer message, `References` the thread, and a `Reply-To` carrying the
//! token. 4xx answers, timeouts and connection failures are retried; 5xx (a
//! refused login is 535), an untrusted relay certificate and a relay without
//! what the settings require (STARTTLS, a login mechanism) fail with the
//! reason kept (see [`deliver`]). A formatted message goes as `multipart/alternative` (text, then
//! the sanitized HTML), inside `multipart/mixed` with its attachments.

use super::parse::reply_subject;
use crate::adapters::{DeliveryError, OutgoingMessage};
use crate::config::ChannelConfig;
use lettre::message::{header, Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use std::time::Duration;
use tokio_rustls::rustls;

/// How the connection to the relay is secured (`smtp.tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Implicit TLS from the first byte (port 465): `"tls"`, `"implicit"`
    /// or `"ssl"`.
    Tls,
    /// Plain connection upgraded with STARTTLS, which the server must offer
    /// (port 587): `"starttls"`.
    StartTls,
    /// No TLS at all (local relays and tests): `"none"`, `"plain"`, `"off"`
    /// or `false`.
    None,
}

/// `smtp = {host, port, tls, username, password, ca_file}`.
#[derive(Clone)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Certificates (PEM) trusted besides the web PKI roots, for a relay
    /// with a private CA (`smtp.ca_file`).
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("extra_roots", &self.extra_roots.len())
            .finish_non_exhaustive()
    }
}

/// The modes `smtp.tls` takes, for error messages.
const TLS_MODES: &str = "use \"starttls\" (port 587), \"tls\" (implicit TLS, port 465) or \"none\"";

impl SmtpSettings {
    /// Reads `smtp = {host, port, tls, username, password, ca_file}`; `None`
    /// when absent. `tls` defaults to implicit TLS on port 465 and STARTTLS
    /// on any other port (`true` means the same); `port` defaults to 587.
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
        let by_port = if port == 465 {
            SmtpTls::Tls
        } else {
            SmtpTls::StartTls
        };
        let tls = match t.get("tls") {
            None | Some(toml::Value::Boolean(true)) => by_port,
            Some(toml::Value::Boolean(false)) => SmtpTls::None,
            Some(toml::Value::String(m)) => match m.trim().to_ascii_lowercase().as_str() {
                "tls" | "implicit" | "ssl" => SmtpTls::Tls,
                "starttls" => SmtpTls::StartTls,
                "none" | "plain" | "off" => SmtpTls::None,
                other => {
                    return Err(format!(
                        "channel {}: smtp.tls: {other}: {TLS_MODES}",
                        cfg.id
                    ))
                }
            },
            Some(_) => return Err(format!("channel {}: smtp.tls: {TLS_MODES}", cfg.id)),
        };
        let extra_roots = match s("ca_file") {
            Some(path) => super::imap::read_roots(&path)
                .map_err(|e| format!("channel {}: smtp.ca_file: {e}", cfg.id))?,
            None => vec![],
        };
        Ok(Some(SmtpSettings {
            host,
            port,
            tls,
            username: s("username"),
            password: s("password"),
            extra_roots,
        }))
    }

    pub fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
        let builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(self.host.as_str());
        let builder = match self.tls {
            SmtpTls::None => builder,
            SmtpTls::Tls | SmtpTls::StartTls => {
                let mut params = TlsParameters::builder(self.host.clone());
                for c in &self.extra_roots {
                    params = params.add_root_certificate(
                        Certificate::from_der(c.to_vec())
                            .map_err(|e| format!("smtp.ca_file: {e}"))?,
                    );
                }
                let params = params.build_rustls().map_err(|e| e.to_string())?;
                builder.tls(if self.tls == SmtpTls::Tls {
                    Tls::Wrapper(params)
                } else {
                    Tls::Required(params)
                })
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

/// The plain-text alternative of sanitized HTML: its text, with each
/// link's address after its label (`label (https://...)`) unless the label
/// is the address, so a reader without HTML still has the links.
pub fn plain_rendering(sanitized_html: &str) -> String {
    let mut out = String::with_capacity(sanitized_html.len());
    let mut rest = sanitized_html;
    while let Some(start) = rest.find("<a ") {
        let Some(open_end) = rest[start..].find('>').map(|e| start + e + 1) else {
            break;
        };
        let Some(close) = rest[open_end..].find("</a>").map(|e| open_end + e) else {
            break;
        };
        let tag = &rest[start..open_end];
        let label = &rest[open_end..close];
        out.push_str(&rest[..close]);
        let href = tag
            .split_once("href=\"")
            .and_then(|(_, v)| v.split_once('"'))
            .map(|(v, _)| v.trim());
        if let Some(href) = href.filter(|h| !h.is_empty()) {
            let label_text = super::parse::html_to_text(label);
            let shown = href.strip_prefix("mailto:").unwrap_or(href);
            if label_text.trim() != super::parse::html_to_text(shown).trim() {
                out.push_str(&format!(" ({href})"));
            }
        }
        out.push_str("</a>");
        rest = &rest[close + 4..];
    }
    out.push_str(rest);
    super::parse::html_to_text(&out)
}

/// The token of our message ID: lower-case alphanumerics of it.
pub fn token_of(message_id: &str) -> String {
    message_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// The thread a reply continues and its HTML alternative (see [`thread_of`]).
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
        html: msg.html.clone(),
        in_reply_to,
        references,
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

/// The certificate problem when the relay's TLS certificate was refused.
fn certificate_refused(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        // An io::Error's `source` skips the error it wraps: look inside too.
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in [Some(err), inner].into_iter().flatten() {
            if let Some(rustls::Error::InvalidCertificate(c)) =
                candidate.downcast_ref::<rustls::Error>()
            {
                return Some(format!("{c:?}"));
            }
        }
        cur = err.source();
    }
    None
}

/// Sends one built message; classifies the SMTP answer: a 5xx reply, a
/// refused login (535), a relay certificate we do not trust and a relay
/// without what the settings require (STARTTLS, a login mechanism) fail at
/// once (retrying cannot help before someone changes the configuration);
/// 4xx replies, timeouts and connection failures (refused, reset, DNS) are
/// retried.
pub async fn deliver(
    transport: &AsyncSmtpTransport<Tokio1Executor>,
    email: &lettre::Message,
) -> Result<(), DeliveryError> {
    match transport.send(email.clone()).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let code = e.status().map(|c| c.to_string());
            if let Some(why) = certificate_refused(&e) {
                return Err(DeliveryError::permanent(format!(
                    "smtp: the server's TLS certificate is not trusted ({why}); \
                     trust a private CA with smtp.ca_file"
                )));
            }
            let message = format!("smtp: {e}");
            // Client errors are what the server lacks (STARTTLS, a login
            // mechanism, SMTPUTF8): the same on every attempt.
            let mut err = if e.is_permanent() || e.is_client() {
                DeliveryError::permanent(message)
            } else {
                DeliveryError::retryable(message)
            };
            err.code = code;
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(smtp: &str) -> Result<Option<SmtpSettings>, String> {
        let doc = format!(
            "id = \"mail\"\nkind = \"email\"\nqueue = \"support\"\naddress = \"support@shop.example\"\nsmtp = {smtp}\n"
        );
        SmtpSettings::from_config(&toml::from_str(&doc).unwrap())
    }

    fn tls_of(smtp: &str) -> SmtpTls {
        settings(smtp).unwrap().unwrap().tls
    }

    #[test]
    fn every_tls_mode_is_accepted_and_the_default_follows_the_port() {
        let h = r#"host = "smtp.example.com""#;
        for (smtp, want) in [
            (format!("{{{h}}}"), SmtpTls::StartTls),
            (format!("{{{h}, port = 465}}"), SmtpTls::Tls),
            (format!("{{{h}, port = 465, tls = true}}"), SmtpTls::Tls),
            (
                format!("{{{h}, port = 587, tls = true}}"),
                SmtpTls::StartTls,
            ),
            (format!("{{{h}, tls = false}}"), SmtpTls::None),
            (format!("{{{h}, tls = \"starttls\"}}"), SmtpTls::StartTls),
            (format!("{{{h}, tls = \"STARTTLS\"}}"), SmtpTls::StartTls),
            (format!("{{{h}, tls = \"tls\"}}"), SmtpTls::Tls),
            (format!("{{{h}, tls = \"implicit\"}}"), SmtpTls::Tls),
            (format!("{{{h}, tls = \"ssl\"}}"), SmtpTls::Tls),
            (format!("{{{h}, tls = \"none\"}}"), SmtpTls::None),
            (format!("{{{h}, tls = \"plain\"}}"), SmtpTls::None),
            (format!("{{{h}, tls = \"off\"}}"), SmtpTls::None),
        ] {
            assert_eq!(tls_of(&smtp), want, "{smtp}");
        }
        assert_eq!(settings(&format!("{{{h}}}")).unwrap().unwrap().port, 587);
        let e = settings(&format!("{{{h}, tls = \"maybe\"}}")).unwrap_err();
        assert!(
            e.contains("smtp.tls: maybe") && e.contains("starttls"),
            "{e}"
        );
        let e = settings(&format!("{{{h}, tls = 1}}")).unwrap_err();
        assert!(e.starts_with("channel mail: smtp.tls"), "{e}");
    }

    #[test]
    fn the_plain_rendering_keeps_link_addresses() {
        let html = super::super::parse::sanitize_html(
            r#"<p>Track <a href="https://shop.example/t?a=1&b=2">your parcel</a> or see <a href="https://shop.example">https://shop.example</a>.</p><p>Mail <a href="mailto:help@shop.example">help@shop.example</a> &amp; <a>nothing</a></p>"#,
        );
        assert_eq!(
            plain_rendering(&html),
            "Track your parcel (https://shop.example/t?a=1&b=2) or see https://shop.example.\nMail help@shop.example & nothing"
        );
        assert_eq!(plain_rendering("<p>no links</p>"), "no links");
        assert_eq!(plain_rendering("<a href=\"x\">unclosed"), "unclosed");
    }

    #[test]
    fn ca_file_is_read_and_checked_and_no_password_is_logged() {
        let h = r#"host = "smtp.example.com", username = "u", password = "hunter2""#;
        let e = settings(&format!("{{{h}, ca_file = \"/nonexistent/ca.pem\"}}")).unwrap_err();
        assert!(
            e.contains("channel mail: smtp.ca_file: cannot read /nonexistent/ca.pem"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = settings(&format!("{{{h}, ca_file = \"{}\"}}", junk.display())).unwrap_err();
        assert!(
            e.contains("smtp.ca_file") && e.contains("no certificate"),
            "{e}"
        );
        let s = settings(&format!("{{{h}}}")).unwrap().unwrap();
        assert!(s.extra_roots.is_empty());
        assert!(!format!("{s:?}").contains("hunter2"), "{s:?}");
    }
}
