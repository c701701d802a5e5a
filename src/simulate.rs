//! `switchboard simulate`: a webhook exactly as a channel's provider would send it.

use crate::adapters::{email, messenger, sms, twitter, whatsapp};
use crate::config::ChannelConfig;
use crate::domain::{new_id, ChannelKind};
use std::path::Path;

pub use crate::adapters::sms::SimulatedRequest;

/// Builds the signed request a provider would send for a customer message.
pub fn build(
    ch: &ChannelConfig,
    public_url: &str,
    text: Option<&str>,
    file: Option<&Path>,
    from: Option<&str>,
) -> anyhow::Result<SimulatedRequest> {
    match ch.kind {
        ChannelKind::Sms => {
            let from = from.unwrap_or("+14155550123");
            if let Some(path) = file {
                let body = std::fs::read(path)?;
                return Ok(sms::simulate_form(ch, public_url, &body));
            }
            let sid = format!("SM{}", new_id());
            Ok(sms::simulate_inbound(
                ch,
                public_url,
                from,
                text.unwrap_or("Hello from the simulator"),
                &sid,
            ))
        }
        ChannelKind::Whatsapp => {
            if let Some(path) = file {
                return Ok(whatsapp::simulate_payload(ch, &std::fs::read(path)?));
            }
            let id = format!("wamid.{}", new_id());
            Ok(whatsapp::simulate_inbound(
                ch,
                from.unwrap_or("16315551181"),
                "Kerry Fisher",
                text.unwrap_or("Hello from the simulator"),
                &id,
            ))
        }
        ChannelKind::Facebook | ChannelKind::Instagram => {
            if let Some(path) = file {
                return Ok(messenger::simulate_payload(ch, &std::fs::read(path)?));
            }
            let mid = format!("m_{}", new_id());
            let default_from = if ch.kind == ChannelKind::Facebook {
                "6543210987654321"
            } else {
                "17841400000000001"
            };
            Ok(messenger::simulate_inbound(
                ch,
                from.unwrap_or(default_from),
                text.unwrap_or("Hello from the simulator"),
                &mid,
            ))
        }
        ChannelKind::Twitter => {
            if let Some(path) = file {
                return Ok(twitter::simulate_payload(ch, &std::fs::read(path)?));
            }
            // X event IDs are numeric.
            let id = chrono::Utc::now()
                .timestamp_nanos_opt()
                .unwrap_or_default()
                .to_string();
            Ok(twitter::simulate_inbound(
                ch,
                from.unwrap_or("2874619305"),
                "Kerry Lindqvist",
                text.unwrap_or("Hello from the simulator"),
                &id,
            ))
        }
        ChannelKind::Email => {
            let secret = ch.str("inbound_secret").ok_or_else(|| {
                anyhow::anyhow!(
                    "channel {}: inbound_secret: missing (simulate signs mail posted over HTTP with it)",
                    ch.id
                )
            })?;
            let raw = match file {
                Some(path) => std::fs::read(path)?,
                None => sample_email(
                    ch.str("address").unwrap_or("support@example.com"),
                    from,
                    text.unwrap_or("Hello from the simulator"),
                    chrono::Utc::now(),
                ),
            };
            email::simulate_raw(&ch.id, secret, &raw, chrono::Utc::now().timestamp())
                .map_err(anyhow::Error::msg)
        }
        other => anyhow::bail!("simulate does not support {other} channels yet"),
    }
}

/// A customer's plain-text email to `to`, starting a new thread: the
/// subject is the text's first line (shortened), the body the whole text.
pub fn sample_email(
    to: &str,
    from: Option<&str>,
    text: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<u8> {
    let from_header = match from {
        Some(a) => format!("<{a}>"),
        None => "Kerry Fisher <kerry@example.com>".to_string(),
    };
    let domain = from
        .and_then(|a| a.rsplit_once('@'))
        .map(|(_, d)| d)
        .unwrap_or("example.com");
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let mut subject: String = first.chars().take(60).collect();
    if first.chars().count() > 60 {
        subject.push('…');
    }
    if subject.is_empty() {
        subject = "Hello".into();
    }
    let subject = if subject.is_ascii() {
        subject
    } else {
        use base64::Engine;
        format!(
            "=?UTF-8?B?{}?=",
            base64::engine::general_purpose::STANDARD.encode(subject.as_bytes())
        )
    };
    let body = text.replace("\r\n", "\n").replace('\n', "\r\n");
    format!(
        "From: {from_header}\r\nTo: <{to}>\r\nSubject: {subject}\r\nDate: {}\r\nMessage-ID: <{}@{domain}>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{body}\r\n",
        now.to_rfc2822(),
        new_id(),
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_email_parses_as_a_new_thread_from_the_customer() {
        let raw = sample_email(
            "support@demo.example",
            Some("Kerry@Example.org"),
            "¿Dónde está mi pedido?\nGracias",
            chrono::Utc::now(),
        );
        let p = crate::adapters::email::parse::parse(&raw).unwrap();
        assert_eq!(p.from_address, "kerry@example.org");
        assert_eq!(p.subject, "¿Dónde está mi pedido?");
        assert_eq!(
            p.text.replace("\r\n", "\n").trim_end(),
            "¿Dónde está mi pedido?\nGracias"
        );
        assert!(p.in_reply_to.is_empty() && p.references.is_empty());
        let default = sample_email("support@demo.example", None, "hi", chrono::Utc::now());
        let p = crate::adapters::email::parse::parse(&default).unwrap();
        assert_eq!(p.from_address, "kerry@example.com");
        assert_eq!(p.from_name.as_deref(), Some("Kerry Fisher"));
    }

    #[test]
    fn simulate_signs_email_for_the_demo_channel() {
        let s = crate::demo::settings();
        let ch = s
            .channel("mail-main")
            .expect("the demo has an email channel");
        let req = build(
            ch,
            "http://127.0.0.1:8080",
            Some("Where is my order?"),
            None,
            None,
        )
        .unwrap();
        assert_eq!(req.path, "/webhooks/mail-main");
        assert_eq!(req.content_type, "message/rfc822");
        let adapter = crate::adapters::email::EmailChannel::new(ch).unwrap();
        let raw = crate::adapters::RawRequest {
            path: &req.path,
            query: "",
            headers: (&req.headers).into(),
            content_type: &req.content_type,
            body: &req.body,
        };
        use crate::adapters::WebhookIntake;
        assert!(adapter.verify(&raw).is_ok());
    }
}
