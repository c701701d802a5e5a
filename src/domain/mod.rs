//! Channel-agnostic types and rules. Imports no web framework and no store.

pub mod ids;
pub mod interaction;

pub use ids::{new_id, new_secret, ChannelKind, DigitalId, EmailAddress, PhoneNumber};
pub use interaction::{
    Actor, Attachment, DeliveryStatus, Direction, Disposition, EventDraft, Interaction, Message,
    NewInteraction, Refusal, Status,
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A contact: one digital ID on one channel kind (on one channel for kinds
/// whose IDs are scoped to a page or widget). Never merged across kinds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contact {
    pub id: String,
    /// The store key: `{scope}:{digital_id}` (see [`contact_key`]).
    pub key: String,
    pub version: u64,
    pub channel_kind: ChannelKind,
    pub digital_id: String,
    pub name: Option<String>,
    /// Other IDs the same contact is known by (WhatsApp `user_id` beside `wa_id`).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Every interaction of this contact, oldest first.
    #[serde(default)]
    pub cases: Vec<u64>,
    /// The latest interaction per channel id.
    #[serde(default)]
    pub latest: BTreeMap<String, u64>,
    /// SMS: the contact sent STOP (or another opt-out word) and not START since.
    #[serde(default)]
    pub opted_out: bool,
    pub created_at: DateTime<Utc>,
}

/// The key a contact is stored under: global per kind, or per channel for
/// kinds whose IDs are scoped to a page, account or widget.
pub fn contact_key(kind: ChannelKind, channel_id: &str, digital_id: &str) -> String {
    if kind.ids_scoped_to_channel() {
        format!("{}:{}:{}", kind.as_str(), channel_id, digital_id)
    } else {
        format!("{}:{}", kind.as_str(), digital_id)
    }
}

/// An event as the feed, SSE and sinks carry it. Its JSON parts are shared:
/// the store's feed, the commit's caller and every subscriber hold the same
/// trees, so passing an event on never copies a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub at: DateTime<Utc>,
    pub case_number: u64,
    pub channel: Arc<serde_json::Value>,
    pub data: Arc<serde_json::Value>,
}

impl Event {
    pub fn from_draft(id: String, d: EventDraft) -> Event {
        Event {
            id,
            kind: d.kind,
            at: d.at,
            case_number: d.case_number,
            channel: Arc::new(d.channel),
            data: Arc::new(d.data),
        }
    }
}

/// Event IDs are `{milliseconds}-{sequence}` on both stores (on Redis, the
/// stream entry ID), and compare numerically.
pub fn parse_event_id(s: &str) -> Option<(u64, u64)> {
    let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}
