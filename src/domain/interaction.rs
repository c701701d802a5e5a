//! The interaction ("case") and its state machine, written once.
//!
//! Every rule of PRODUCT.md about statuses, assignment, reply, resolve, end,
//! transfer and delivery status lives here as a method that changes the
//! interaction in memory and returns the events it caused. Stores persist the
//! result with a version check; no backend re-implements a rule.

use super::ids::ChannelKind;
use super::time::{rfc3339, rfc3339_opt};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    New,
    Open,
    Resolved,
}

impl Status {
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "new" => Some(Status::New),
            "open" => Some(Status::Open),
            "resolved" => Some(Status::Resolved),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

/// Delivery status of a message. Outbound: `queued < sent < delivered < read`,
/// with `failed` possible after anything but `read`, and nothing after
/// `failed`. Inbound messages are `received`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Received,
    Queued,
    Sent,
    Delivered,
    Read,
    Failed,
}

impl DeliveryStatus {
    fn rank(self) -> u8 {
        match self {
            DeliveryStatus::Received => 0,
            DeliveryStatus::Queued => 1,
            DeliveryStatus::Sent => 2,
            DeliveryStatus::Delivered => 3,
            DeliveryStatus::Read => 4,
            DeliveryStatus::Failed => 5,
        }
    }

    /// Whether a message in status `self` may move to `next`.
    pub fn may_become(self, next: DeliveryStatus) -> bool {
        use DeliveryStatus::*;
        match (self, next) {
            (Received, _) | (_, Received) => false,
            (Failed, _) => false,
            (Read, Failed) => false,
            (_, Failed) => true,
            (a, b) => b.rank() > a.rank(),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Received => "received",
            DeliveryStatus::Queued => "queued",
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Read => "read",
            DeliveryStatus::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub id: String,
    pub filename: String,
    pub content_type: String,
    pub size: u64,
    /// `stored`, `failed` when the download from the provider failed
    /// (the agent sees it rather than a silently missing file), or `omitted`
    /// when it was over the 10 MiB limit (`size` is then its real size).
    #[serde(default = "stored")]
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where the provider serves it, kept so a failed download can be retried.
    /// Stored, but never shown: [`Message::public`] strips it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_url: Option<String>,
    /// The provider's media ID, for providers that serve media by ID (WhatsApp); never shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_media_id: Option<String>,
    /// Email: the part's `Content-ID` (without brackets), for inline images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_id: Option<String>,
}

fn stored() -> String {
    "stored".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: String,
    pub direction: Direction,
    pub text: String,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// For inbound, the provider's timestamp when known; for outbound, when
    /// the agent sent it.
    #[serde(serialize_with = "rfc3339")]
    pub sent_at: DateTime<Utc>,
    pub status: DeliveryStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The provider's ID for this message (MessageSid, wamid, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    /// The agent who wrote an outbound message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// SMS only: `{"encoding", "segments"}` of an outbound text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms: Option<serde_json::Value>,
    /// Our ID of the message this one quotes (a reply in context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Reactions to this message, one per person at most.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reactions: Vec<MessageReaction>,
    /// The customer deleted (unsent) it; the text stays for the record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retracted: bool,
    /// What it was when not plain text or media (`location`, `unsupported`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Email: the sanitized HTML body (never the raw HTML); inline images
    /// point at `/api/v1/attachments/{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// Email: the message exactly as received (`message/rfc822`), kept for
    /// audit and downloadable like an attachment. Boxed: only email has
    /// one, and inline it made every message of every channel 190 bytes
    /// larger in the store's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<Box<Attachment>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageReaction {
    /// The digital ID of who reacted.
    pub from: String,
    pub emoji: String,
    #[serde(serialize_with = "rfc3339")]
    pub at: DateTime<Utc>,
}

impl Message {
    /// Sets (or with `None` removes) `from`'s reaction. Returns whether anything changed.
    pub fn react(&mut self, from: &str, emoji: Option<&str>, at: DateTime<Utc>) -> bool {
        let before = self.reactions.clone();
        self.reactions.retain(|r| r.from != from);
        if let Some(e) = emoji {
            self.reactions.push(MessageReaction {
                from: from.to_string(),
                emoji: e.to_string(),
                at,
            });
        }
        self.reactions != before
    }

    /// [`Message::public`], without copying the message when it has
    /// nothing to hide.
    pub fn public_view(&self) -> std::borrow::Cow<'_, Message> {
        let hidden = self
            .attachments
            .iter()
            .any(|a| a.source_url.is_some() || a.source_media_id.is_some());
        if hidden {
            std::borrow::Cow::Owned(self.public())
        } else {
            std::borrow::Cow::Borrowed(self)
        }
    }

    /// The message as agents, events and routing engines see it: without
    /// the provider's media URLs (kept only to retry a failed download).
    pub fn public(&self) -> Message {
        let mut m = self.clone();
        for a in &mut m.attachments {
            a.source_url = None;
            a.source_media_id = None;
        }
        m
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Disposition {
    pub related_name: Option<String>,
    pub related_case: Option<String>,
    pub ended_by: String,
    #[serde(serialize_with = "rfc3339")]
    pub ended_at: DateTime<Utc>,
}

/// Stored as JSON by both stores; empty fields are left out of the record
/// (and read back as empty), which keeps the record written on every
/// message small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    pub case_number: u64,
    /// Bumped on every stored change; stores refuse a write whose version is stale.
    pub version: u64,
    pub channel_id: String,
    pub channel_kind: ChannelKind,
    pub digital_id: String,
    pub contact_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_name: Option<String>,
    pub status: Status,
    pub queue: String,
    pub in_queue: bool,
    pub priority: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// When the gateway received the latest customer message.
    #[serde(serialize_with = "rfc3339")]
    pub received_at: DateTime<Utc>,
    /// The provider's timestamp of the latest customer message (the window runs from it).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339_opt"
    )]
    pub last_customer_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_to: Option<String>,
    /// When each agent last opened (was assigned) the interaction; drives unread.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub opened_by: BTreeMap<String, DateTime<Utc>>,
    pub transfer_count: u32,
    pub master_contact_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related_case: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339_opt"
    )]
    pub ended_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disposition: Option<Disposition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<Arc<Message>>,
    /// The messages as the store handed them out (see [`StoredMessages`]).
    #[serde(skip)]
    pub stored: StoredMessages,
}

/// The messages of an interaction as a store read them, shared with the
/// interaction rather than copied. Messages change copy-on-write, so a
/// message that is still the same allocation as its stored copy did not
/// change: a store that writes an interaction's messages one by one (Redis)
/// writes only the new and the changed ones. It is not part of the
/// interaction's value: never serialized, equal to any other, and empty
/// for an interaction no store has handed out (every message is then new).
///
/// A store may also hand out an interaction for appending with none of its
/// messages loaded ([`StoredMessages::left_out`]): its `messages` then
/// hold only what was added since, and only that store's commit takes it.
#[derive(Clone, Default)]
pub struct StoredMessages(Stored);

#[derive(Clone, Default)]
enum Stored {
    #[default]
    Unknown,
    Read(Arc<[Arc<Message>]>),
    LeftOut(usize),
    One {
        index: usize,
        count: usize,
    },
}

impl StoredMessages {
    /// The messages as they are now, as a store hands them out.
    pub fn of(messages: &[Arc<Message>]) -> StoredMessages {
        StoredMessages(Stored::Read(messages.into()))
    }

    /// `count` stored messages that were not loaded: the interaction's
    /// `messages` are the ones after them.
    pub fn left_out(count: usize) -> StoredMessages {
        StoredMessages(Stored::LeftOut(count))
    }

    /// `count` stored messages of which only the one at `index` was
    /// loaded, to change it: it is the interaction's first message, and
    /// any after it were added since.
    pub fn one_of(index: usize, count: usize) -> StoredMessages {
        StoredMessages(Stored::One { index, count })
    }

    /// For a store that left messages out: how many are stored, and the
    /// index of the one the interaction's first message is (when one was
    /// loaded). Every later message of the interaction is new.
    pub fn partial(&self) -> Option<(usize, Option<usize>)> {
        match self.0 {
            Stored::LeftOut(count) => Some((count, None)),
            Stored::One { index, count } => Some((count, Some(index))),
            _ => None,
        }
    }

    /// The stored messages, when the store read them.
    pub fn get(&self) -> Option<&[Arc<Message>]> {
        match &self.0 {
            Stored::Read(m) => Some(m),
            _ => None,
        }
    }
}

impl PartialEq for StoredMessages {
    fn eq(&self, _: &StoredMessages) -> bool {
        true
    }
}

impl std::fmt::Debug for StoredMessages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Stored::Read(m) => write!(f, "StoredMessages({})", m.len()),
            Stored::LeftOut(n) => write!(f, "StoredMessages(left out: {n})"),
            Stored::One { index, count } => {
                write!(f, "StoredMessages(only {index} of {count})")
            }
            Stored::Unknown => f.write_str("StoredMessages(unknown)"),
        }
    }
}

/// What an event says happened, before the store gives it an ID. Its
/// channel and data are JSON text from the start (see [`crate::domain::Event`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventDraft {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(serialize_with = "rfc3339")]
    pub at: DateTime<Utc>,
    pub case_number: u64,
    pub channel: Box<RawValue>,
    pub data: Box<RawValue>,
}

impl EventDraft {
    pub fn new(
        kind: &str,
        at: DateTime<Utc>,
        case_number: u64,
        channel: &impl Serialize,
        data: &impl Serialize,
    ) -> EventDraft {
        EventDraft {
            kind: kind.into(),
            at,
            case_number,
            channel: serde_json::value::to_raw_value(channel).expect("event parts serialize"),
            data: serde_json::value::to_raw_value(data).expect("event parts serialize"),
        }
    }

    /// The draft's `data` as a JSON value.
    pub fn data_value(&self) -> serde_json::Value {
        serde_json::from_str(self.data.get()).expect("drafts hold JSON")
    }

    /// The draft's `channel` as a JSON value.
    pub fn channel_value(&self) -> serde_json::Value {
        serde_json::from_str(self.channel.get()).expect("drafts hold JSON")
    }
}

impl PartialEq for EventDraft {
    fn eq(&self, other: &EventDraft) -> bool {
        self.kind == other.kind
            && self.at == other.at
            && self.case_number == other.case_number
            && self.channel.get() == other.channel.get()
            && self.data.get() == other.data.get()
    }
}

/// An event's `channel`: `{"id", "kind"}`, serialized without building a tree.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ChannelRef<'a> {
    pub id: &'a str,
    pub kind: ChannelKind,
}

/// The data of `message.received`, serialized without building a tree.
#[derive(Serialize)]
struct MessageEvent<'a> {
    message: std::borrow::Cow<'a, Message>,
}

/// Why a requested change is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the interaction is not assigned to you")]
    NotAssigned,
    #[error("the interaction is assigned to {0}")]
    AlreadyAssigned(String),
    #[error("{0}")]
    InvalidTransition(String),
    #[error("{0}")]
    NotPermitted(String),
    #[error("{0}")]
    InvalidQueue(String),
}

/// Who is acting: an agent, or a machine client (routing engine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    Agent(String),
    Service(String),
}

impl Actor {
    pub fn id(&self) -> &str {
        match self {
            Actor::Agent(a) | Actor::Service(a) => a,
        }
    }

    /// The agent's ID; `None` for a service.
    pub fn agent(&self) -> Option<&str> {
        match self {
            Actor::Agent(a) => Some(a),
            Actor::Service(_) => None,
        }
    }
}

pub struct NewInteraction {
    pub case_number: u64,
    pub channel_id: String,
    pub channel_kind: ChannelKind,
    pub digital_id: String,
    pub contact_id: String,
    pub contact_name: Option<String>,
    pub queue: String,
    pub now: DateTime<Utc>,
}

impl Interaction {
    pub fn new(n: NewInteraction) -> Interaction {
        Interaction {
            case_number: n.case_number,
            version: 0,
            channel_id: n.channel_id,
            channel_kind: n.channel_kind,
            digital_id: n.digital_id,
            contact_id: n.contact_id.clone(),
            contact_name: n.contact_name,
            status: Status::New,
            queue: n.queue,
            in_queue: true,
            priority: 0,
            tags: vec![],
            received_at: n.now,
            last_customer_at: None,
            created_at: n.now,
            assigned_to: None,
            opened_by: BTreeMap::new(),
            transfer_count: 0,
            master_contact_id: n.contact_id,
            related_name: None,
            related_case: None,
            ended_at: None,
            disposition: None,
            subject: None,
            messages: vec![],
            stored: StoredMessages::default(),
        }
    }

    /// A copy of everything but the messages (which are not copied): what a
    /// store hands out to append a message to (see
    /// [`StoredMessages::left_out`]).
    pub fn without_messages(&self) -> Interaction {
        // Named one by one, so that a new field cannot be forgotten here.
        let Interaction {
            case_number,
            version,
            channel_id,
            channel_kind,
            digital_id,
            contact_id,
            contact_name,
            status,
            queue,
            in_queue,
            priority,
            tags,
            received_at,
            last_customer_at,
            created_at,
            assigned_to,
            opened_by,
            transfer_count,
            master_contact_id,
            related_name,
            related_case,
            ended_at,
            disposition,
            subject,
            messages: _,
            stored: _,
        } = self;
        Interaction {
            case_number: *case_number,
            version: *version,
            channel_id: channel_id.clone(),
            channel_kind: *channel_kind,
            digital_id: digital_id.clone(),
            contact_id: contact_id.clone(),
            contact_name: contact_name.clone(),
            status: *status,
            queue: queue.clone(),
            in_queue: *in_queue,
            priority: *priority,
            tags: tags.clone(),
            received_at: *received_at,
            last_customer_at: *last_customer_at,
            created_at: *created_at,
            assigned_to: assigned_to.clone(),
            opened_by: opened_by.clone(),
            transfer_count: *transfer_count,
            master_contact_id: master_contact_id.clone(),
            related_name: related_name.clone(),
            related_case: related_case.clone(),
            ended_at: *ended_at,
            disposition: disposition.clone(),
            subject: subject.clone(),
            messages: vec![],
            stored: StoredMessages::default(),
        }
    }

    /// An event about this interaction: its case number and channel, `data`.
    pub fn event(&self, kind: &str, at: DateTime<Utc>, data: &impl Serialize) -> EventDraft {
        EventDraft::new(kind, at, self.case_number, &self.channel_ref(), data)
    }

    /// The interaction's channel, as events carry it.
    pub fn channel_ref(&self) -> ChannelRef<'_> {
        ChannelRef {
            id: &self.channel_id,
            kind: self.channel_kind,
        }
    }

    /// Whether a message from this contact should start a new interaction
    /// rather than join this one: it was ended longer ago than the limit.
    pub fn is_closed_for_new_messages(&self, now: DateTime<Utc>, after: Duration) -> bool {
        matches!(self.ended_at, Some(ended) if now - ended > after)
    }

    /// A customer message arrives (rules 1 and 4, and End's "writes again").
    /// `created` says the interaction was made for this message.
    pub fn receive(&mut self, msg: Message, now: DateTime<Utc>, created: bool) -> Vec<EventDraft> {
        let mut events = vec![];
        if created {
            events.push(self.event(
                "interaction.created",
                now,
                &serde_json::json!({"queue": self.queue, "digital_id": self.digital_id,
                    "contact": {"id": self.contact_id, "name": self.contact_name}}),
            ));
        }
        let reopened = match self.status {
            Status::Resolved => true,
            // An ended interaction that the customer writes to again re-enters
            // the queue as Open, whatever its status was (PRODUCT.md, End).
            _ => self.ended_at.is_some(),
        };
        if reopened {
            self.status = Status::Open;
            events.push(self.event(
                "interaction.reopened",
                now,
                &serde_json::json!({"queue": self.queue}),
            ));
        }
        if self.ended_at.is_some() {
            self.ended_at = None;
            self.assigned_to = None;
        }
        self.in_queue = true;
        self.received_at = now;
        self.last_customer_at = Some(msg.sent_at);
        events.push(self.event(
            "message.received",
            now,
            &MessageEvent {
                message: msg.public_view(),
            },
        ));
        self.messages.push(Arc::new(msg));
        events
    }

    /// An agent takes the interaction, or a service gives it to an agent.
    pub fn assign(
        &mut self,
        actor: &Actor,
        agent: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<EventDraft>, Refusal> {
        if let (Actor::Agent(_), Some(holder)) = (actor, &self.assigned_to) {
            if holder != agent {
                return Err(Refusal::AlreadyAssigned(holder.clone()));
            }
        }
        let changed = self.assigned_to.as_deref() != Some(agent);
        self.assigned_to = Some(agent.to_string());
        self.opened_by.insert(agent.to_string(), now);
        if changed {
            Ok(vec![self.event(
                "interaction.assigned",
                now,
                &serde_json::json!({"agent": agent}),
            )])
        } else {
            Ok(vec![])
        }
    }

    fn require_holder(&self, actor: &Actor) -> Result<(), Refusal> {
        match actor {
            Actor::Service(_) => Ok(()),
            Actor::Agent(a) if self.assigned_to.as_deref() == Some(a.as_str()) => Ok(()),
            Actor::Agent(_) => Err(Refusal::NotAssigned),
        }
    }

    /// The assigned agent sends a reply (rule 3). The message starts `queued`.
    pub fn reply(
        &mut self,
        actor: &Actor,
        msg: Message,
        now: DateTime<Utc>,
    ) -> Result<Vec<EventDraft>, Refusal> {
        self.require_holder(actor)?;
        let mut events = vec![];
        self.messages.push(Arc::new(msg.clone()));
        if self.status != Status::Resolved || self.in_queue {
            self.status = Status::Resolved;
            self.in_queue = false;
            events.push(self.event(
                "interaction.resolved",
                now,
                &serde_json::json!({"by": actor.id(), "message": msg.public()}),
            ));
        }
        Ok(events)
    }

    /// Set as resolved without sending anything (rule 5).
    pub fn resolve(
        &mut self,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Vec<EventDraft>, Refusal> {
        self.require_holder(actor)?;
        if self.status == Status::Resolved && !self.in_queue {
            return Err(Refusal::InvalidTransition(
                "the interaction is already resolved".into(),
            ));
        }
        self.status = Status::Resolved;
        self.in_queue = false;
        Ok(vec![self.event(
            "interaction.resolved",
            now,
            &serde_json::json!({"by": actor.id()}),
        )])
    }

    /// End with a disposition (rule 6): unassigns and leaves the queue; status stays.
    pub fn end(
        &mut self,
        actor: &Actor,
        related_name: Option<String>,
        related_case: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<Vec<EventDraft>, Refusal> {
        self.require_holder(actor)?;
        if self.ended_at.is_some() {
            return Err(Refusal::InvalidTransition(
                "the interaction is already ended".into(),
            ));
        }
        if related_name.is_some() {
            self.related_name = related_name.clone();
        }
        if related_case.is_some() {
            self.related_case = related_case.clone();
        }
        self.assigned_to = None;
        self.in_queue = false;
        self.ended_at = Some(now);
        self.disposition = Some(Disposition {
            related_name: self.related_name.clone(),
            related_case: self.related_case.clone(),
            ended_by: actor.id().to_string(),
            ended_at: now,
        });
        Ok(vec![self.event(
            "interaction.ended",
            now,
            &serde_json::json!({"by": actor.id(), "disposition": self.disposition}),
        )])
    }

    /// Transfer to another digital queue (rule 7). `target_members` are the
    /// agents of the target queue. A new master contact ID is minted from
    /// the 3rd transfer on.
    pub fn transfer(
        &mut self,
        actor: &Actor,
        target: &str,
        target_members: &[String],
        now: DateTime<Utc>,
        new_master_id: impl FnOnce() -> String,
    ) -> Result<Vec<EventDraft>, Refusal> {
        self.require_holder(actor)?;
        if target == self.queue {
            return Err(Refusal::InvalidTransition(format!(
                "the interaction is already in queue {target}"
            )));
        }
        let mut events = vec![];
        if self.status == Status::Resolved {
            self.status = Status::Open;
            events.push(self.event(
                "interaction.reopened",
                now,
                &serde_json::json!({"queue": self.queue}),
            ));
        }
        let from = std::mem::replace(&mut self.queue, target.to_string());
        self.transfer_count += 1;
        if self.transfer_count >= 3 {
            self.master_contact_id = new_master_id();
        }
        self.in_queue = true;
        self.ended_at = None;
        self.assigned_to = match actor {
            Actor::Agent(a) if target_members.len() == 1 && target_members[0] == *a => {
                Some(a.clone())
            }
            _ => None,
        };
        events.push(self.event(
            "interaction.transferred",
            now,
            &serde_json::json!({"from": from, "to": target, "by": actor.id(),
                "assigned_to": self.assigned_to, "transfer_count": self.transfer_count,
                "master_contact_id": self.master_contact_id}),
        ));
        Ok(events)
    }

    /// A delivery status for one of our messages. Returns no events when the
    /// status would move backwards (providers report out of order).
    pub fn apply_delivery(
        &mut self,
        message_id: &str,
        status: DeliveryStatus,
        provider_id: Option<String>,
        error: Option<String>,
        now: DateTime<Utc>,
    ) -> Vec<EventDraft> {
        let Some(idx) = self.messages.iter().position(|m| m.id == message_id) else {
            return vec![];
        };
        let current = self.messages[idx].status;
        if !current.may_become(status) {
            return vec![];
        }
        let msg = Arc::make_mut(&mut self.messages[idx]);
        msg.status = status;
        if provider_id.is_some() {
            msg.provider_id = provider_id;
        }
        if error.is_some() {
            msg.error = error;
        }
        let snapshot = Message::clone(msg);
        let kind = if current == DeliveryStatus::Queued && status == DeliveryStatus::Sent {
            "message.sent"
        } else {
            "message.status"
        };
        let mut events = vec![self.event(
            kind,
            now,
            &serde_json::json!({"message_id": snapshot.id, "status": status, "provider_id": snapshot.provider_id, "error": snapshot.error}),
        )];
        if status == DeliveryStatus::Failed {
            // The customer must not be left unanswered: back on the queue, still assigned.
            let was = self.status;
            self.status = Status::Open;
            self.in_queue = true;
            // Back on the queue means no longer ended (CONTRACT: `in_queue` is
            // "new or open, and not ended"); an ended one has no agent to keep.
            self.ended_at = None;
            if was == Status::Resolved {
                events.push(self.event(
                    "interaction.reopened",
                    now,
                    &serde_json::json!({"queue": self.queue, "reason": "delivery_failed"}),
                ));
            }
        }
        events
    }

    /// Unread for an agent: a customer message arrived after they last
    /// opened it. Only a customer message sets `last_customer_at`, so this
    /// reads no message (lists carry none).
    pub fn unread_for(&self, agent: &str) -> bool {
        match (self.last_customer_at, self.opened_by.get(agent)) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(_), Some(opened)) => self.received_at > *opened,
        }
    }

    pub fn message_by_provider_id(&self, provider_id: &str) -> Option<&Message> {
        self.messages
            .iter()
            .find(|m| m.provider_id.as_deref() == Some(provider_id))
            .map(|m| &**m)
    }

    /// The interaction as the API shows it to `viewer` (unread is per agent).
    pub fn to_api(
        &self,
        viewer: Option<&str>,
        window: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let mut v = serde_json::json!({
            "case_number": self.case_number,
            "channel": self.channel_ref(),
            "digital_id": self.digital_id,
            "contact": {"id": self.contact_id, "name": self.contact_name},
            "status": self.status,
            "queue": self.queue,
            "in_queue": self.in_queue,
            "priority": self.priority,
            "tags": self.tags,
            "received_at": self.received_at,
            "created_at": self.created_at,
            "assigned_to": self.assigned_to,
            "unread": viewer.map(|a| self.unread_for(a)).unwrap_or(false),
            "transfer_count": self.transfer_count,
            "master_contact_id": self.master_contact_id,
            "related_name": self.related_name,
            "related_case": self.related_case,
            "ended_at": self.ended_at,
            "disposition": self.disposition,
            "messages": self.messages.iter().map(|m| m.public()).collect::<Vec<_>>(),
            "version": self.version,
        });
        if let Some(subject) = &self.subject {
            v["subject"] = serde_json::json!(subject);
        }
        if let Some(w) = window {
            v["window"] = w;
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded store keeps every message in memory, so a message's own
    /// size is the store's size per message (before its text and IDs). An
    /// email's raw copy is boxed to keep the other channels' messages small;
    /// an allocation of up to 320 bytes holds one with its `Arc` counts.
    #[test]
    fn a_message_fits_in_320_bytes_with_its_reference_counts() {
        // An `Arc`'s allocation: its two counts, then the value.
        let allocation = 2 * std::mem::size_of::<usize>() + std::mem::size_of::<Message>();
        assert!(
            allocation <= 320,
            "an Arc<Message> takes {allocation} bytes"
        );
    }

    /// Records written before empty fields were left out spell them as
    /// `null`, `[]` and `{}`: they read back the same as the short form.
    #[test]
    fn an_interaction_record_with_its_empty_fields_spelled_out_reads_the_same() {
        let i = Interaction::new(NewInteraction {
            case_number: 1001,
            channel_id: "sms-main".into(),
            channel_kind: ChannelKind::Sms,
            digital_id: "+15551230000".into(),
            contact_id: "c1".into(),
            contact_name: None,
            queue: "support".into(),
            now: Utc::now(),
        });
        let short = serde_json::to_value(&i).unwrap();
        assert!(short.get("assigned_to").is_none(), "{short}");
        let mut long = short.clone();
        for (k, v) in [
            ("contact_name", serde_json::Value::Null),
            ("tags", serde_json::json!([])),
            ("last_customer_at", serde_json::Value::Null),
            ("assigned_to", serde_json::Value::Null),
            ("opened_by", serde_json::json!({})),
            ("related_name", serde_json::Value::Null),
            ("related_case", serde_json::Value::Null),
            ("ended_at", serde_json::Value::Null),
            ("disposition", serde_json::Value::Null),
            ("subject", serde_json::Value::Null),
            ("messages", serde_json::json!([])),
        ] {
            long[k] = v;
        }
        let read: Interaction = serde_json::from_value(long).unwrap();
        assert_eq!(read, i);
        let read: Interaction = serde_json::from_value(short).unwrap();
        assert_eq!(read, i);
    }
}
