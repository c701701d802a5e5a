//! `switchboard simulate`: a webhook exactly as a channel's provider would send it.

use crate::adapters::{messenger, sms, twitter, whatsapp};
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
        other => anyhow::bail!("simulate does not support {other} channels yet"),
    }
}
