//! Channel-agnostic types and rules. Imports no web framework and no store.

pub mod ids;
pub mod interaction;
pub mod time;

pub use ids::{new_id, new_secret, ChannelKind, DigitalId, EmailAddress, PhoneNumber};
pub use interaction::{
    Actor, Attachment, ChannelRef, DeliveryStatus, Direction, Disposition, EventDraft, Interaction,
    Message, NewInteraction, Refusal, Status, StoredMessages,
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
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
    #[serde(serialize_with = "time::rfc3339")]
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

/// An event as the feed, SSE and sinks carry it. Its JSON parts are kept
/// serialized and shared: the store's feed, the commit's caller and every
/// subscriber hold the same text, which goes into the log, the feed and
/// every SSE frame as it is. (Kept as `Value` trees, the week of events the
/// feed holds cost several times the memory, and each was serialized again
/// for every reader.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(serialize_with = "time::rfc3339")]
    pub at: DateTime<Utc>,
    pub case_number: u64,
    pub channel: Arc<RawValue>,
    pub data: Arc<RawValue>,
}

impl PartialEq for Event {
    fn eq(&self, other: &Event) -> bool {
        self.id == other.id
            && self.kind == other.kind
            && self.at == other.at
            && self.case_number == other.case_number
            && self.channel.get() == other.channel.get()
            && self.data.get() == other.data.get()
    }
}

impl Event {
    pub fn from_draft(id: String, d: EventDraft) -> Event {
        Event {
            id,
            kind: d.kind,
            at: d.at,
            case_number: d.case_number,
            channel: Arc::from(d.channel),
            data: Arc::from(d.data),
        }
    }

    /// A string field at the top of `data` (`None` when absent or not a string).
    pub fn data_str(&self, key: &str) -> Option<String> {
        top_level_str(&self.data, key)
    }

    /// The ID of the event's channel.
    pub fn channel_id(&self) -> Option<String> {
        top_level_str(&self.channel, "id")
    }
}

/// One string field of a JSON object, read without building the rest.
fn top_level_str(raw: &RawValue, key: &str) -> Option<String> {
    let fields: HashMap<Cow<str>, &RawValue> = serde_json::from_str(raw.get()).ok()?;
    serde_json::from_str(fields.get(key)?.get()).ok()
}

/// Event IDs are `{milliseconds}-{sequence}` on both stores (on Redis, the
/// stream entry ID), and compare numerically.
pub fn parse_event_id(s: &str) -> Option<(u64, u64)> {
    let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft() -> EventDraft {
        EventDraft::new(
            "interaction.transferred",
            "2026-12-06T10:00:00Z".parse().unwrap(),
            1001,
            &serde_json::json!({"id": "sms-main", "kind": "sms"}),
            &serde_json::json!({"from": "support \"east\"", "to": "vip", "count": 2}),
        )
    }

    #[test]
    fn an_event_serializes_as_its_draft_did_and_reads_back_equal() {
        let e = Event::from_draft("1796581438388-0".into(), draft());
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            serde_json::json!({
                "id": "1796581438388-0", "type": "interaction.transferred",
                "at": "2026-12-06T10:00:00Z", "case_number": 1001,
                "channel": {"id": "sms-main", "kind": "sms"},
                "data": {"from": "support \"east\"", "to": "vip", "count": 2},
            })
        );
        let back: Event = serde_json::from_str(&text).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn an_events_fields_are_read_from_its_text() {
        let e = Event::from_draft("1-0".into(), draft());
        assert_eq!(e.channel_id().as_deref(), Some("sms-main"));
        // Escapes are decoded; a field that is not a string, or is absent, is None.
        assert_eq!(e.data_str("from").as_deref(), Some("support \"east\""));
        assert_eq!(e.data_str("count"), None);
        assert_eq!(e.data_str("agent"), None);
    }
}
