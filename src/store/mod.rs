//! The storage port and its two backends.
//!
//! | backend | module | for |
//! | --- | --- | --- |
//! | embedded | [`embedded`] | one node, no server: redb with group commit, state mirrored in memory |
//! | redis | [`redis`] | many nodes sharing state; events on the stream `{prefix}:routing` |
//!
//! The port is small on purpose: [`Store::commit`] is the one way state
//! changes, atomically and with version checks, so every rule lives in the
//! domain and the gateway service, never in a backend. The contract suite in
//! `tests/store_contract.rs` runs every case against both backends.

pub mod embedded;
pub mod redis;

use crate::domain::{Contact, Event, EventDraft, Interaction, Message};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A version check failed: someone else changed the record first. Reload and retry.
    #[error("conflicting concurrent change")]
    Conflict,
    /// A claim (dedupe key) is already held; `value` is what it was claimed with.
    #[error("already claimed: {key}")]
    Duplicate { key: String, value: String },
    /// The store cannot be reached or failed to write.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A job in the outbox: deliver one outbound message through its channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxJob {
    pub id: String,
    pub case_number: u64,
    pub message_id: String,
    pub channel_id: String,
    pub attempts: u32,
    pub due_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// Persisted records are versioned so an upgrade never chokes on yesterday's outbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "v")]
pub enum OutboxRecord {
    V1(OutboxJob),
}

/// A claim on a key that may be taken once, ever (provider message IDs,
/// idempotency keys). The value is kept so later lookups find what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub key: String,
    pub value: String,
}

/// An interaction as an agent's list shows it: everything but its messages
/// ([`Interaction::without_messages`]), and the latest message as a
/// preview. A list holds every interaction of the agent's queues, and a long
/// conversation's messages would otherwise be copied for each, on every
/// list an agent loads.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub interaction: Interaction,
    pub last_message: Option<Arc<Message>>,
}

/// One atomic change. Everything in it is written, or nothing is.
#[derive(Debug, Default)]
pub struct Commit {
    /// Written if its `version` still matches the stored one (0: must not
    /// exist yet). The store bumps the version.
    pub contact: Option<Contact>,
    /// The contact is as it was read: its version is checked as above, but
    /// it is not written and its version stays (a message from a known
    /// sender changes the interaction, not the contact).
    pub contact_unchanged: bool,
    /// The same, for an interaction.
    pub interaction: Option<Interaction>,
    /// Keys that must not be claimed yet; all are claimed by this commit.
    pub claims: Vec<Claim>,
    /// Lookup entries written unconditionally (e.g. a provider message ID
    /// learnt after sending, mapped to our message).
    pub index: Vec<Claim>,
    pub events: Vec<EventDraft>,
    pub outbox_add: Vec<OutboxJob>,
    pub outbox_remove: Vec<String>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies a commit atomically; returns the stored events with their IDs.
    async fn commit(&self, commit: Commit) -> StoreResult<Vec<Event>>;

    async fn next_case_number(&self) -> StoreResult<u64>;
    async fn interaction(&self, case_number: u64) -> StoreResult<Option<Interaction>>;
    /// Interactions sitting in any of `queues`, plus those assigned to
    /// `agent`, without their messages but the latest.
    async fn interactions_for(
        &self,
        queues: &[String],
        agent: Option<&str>,
    ) -> StoreResult<Vec<Listed>>;
    /// What [`Store::interactions_for`] gives, but only those waiting
    /// (`in_queue`): an agent's default list. The store keeps them apart
    /// from the rest, so that this list grows with the work waiting, not
    /// with every interaction the queues ever had.
    async fn waiting_for(&self, queues: &[String], agent: Option<&str>)
        -> StoreResult<Vec<Listed>>;
    /// The tags carried by the interactions [`Store::interactions_for`]
    /// gives, each once, sorted: the tags an agent can filter by. The store
    /// counts them as interactions change, so that this reads no
    /// interaction.
    async fn tags_for(&self, queues: &[String], agent: Option<&str>) -> StoreResult<Vec<String>>;
    async fn contact(&self, key: &str) -> StoreResult<Option<Contact>>;
    async fn contact_by_id(&self, id: &str) -> StoreResult<Option<Contact>>;
    /// The value a claim or index entry holds.
    async fn lookup(&self, key: &str) -> StoreResult<Option<String>>;
    /// The interaction `case_number` for adding messages to it and nothing
    /// else (what receiving a message does), or for showing it without its
    /// messages (a contact's history): a store may leave the stored
    /// messages out (see [`crate::domain::StoredMessages::left_out`]; both
    /// stores do), so that a new message costs the same however long the
    /// conversation. Only the store that handed it out takes it back, and
    /// its commit appends the new messages after the stored ones. The
    /// default is the whole interaction.
    async fn interaction_to_append(&self, case_number: u64) -> StoreResult<Option<Interaction>> {
        self.interaction(case_number).await
    }
    /// The interaction `case_number` for changing its message `message_id`
    /// (a delivery's result, a provider's status callback): a store may
    /// hand out that message alone (see
    /// [`crate::domain::StoredMessages::one_of`]; both stores do), or none
    /// when the interaction has no such message. As with
    /// [`Store::interaction_to_append`], only the store that handed it out
    /// takes it back. The default is the whole interaction.
    async fn interaction_with_message(
        &self,
        case_number: u64,
        message_id: &str,
    ) -> StoreResult<Option<Interaction>> {
        let _ = message_id;
        self.interaction(case_number).await
    }
    /// [`Store::lookup`] of `claim` and [`Store::contact`] of `contact_key`
    /// together: what receiving a message reads first (on Redis, one round
    /// trip instead of two). Neither read waits for the other, so the two
    /// may be a moment apart; a commit checks the contact's version anyway.
    async fn lookup_and_contact(
        &self,
        claim: &str,
        contact_key: &str,
    ) -> StoreResult<(Option<String>, Option<Contact>)> {
        Ok((self.lookup(claim).await?, self.contact(contact_key).await?))
    }

    async fn note(&self, agent: &str, contact_id: &str) -> StoreResult<Option<String>>;
    async fn put_note(&self, agent: &str, contact_id: &str, notes: &str) -> StoreResult<()>;

    /// Events after `after` (exclusive), oldest first, at most `limit`.
    async fn events_after(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Event>>;
    /// Events as they are stored, from this process or (Redis) any other.
    fn subscribe(&self) -> broadcast::Receiver<Event>;

    /// Outbox jobs due by `now`, leased for `lease` so no other worker takes them meanwhile.
    async fn outbox_lease(
        &self,
        now: DateTime<Utc>,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<OutboxJob>>;
    /// Puts a job back with a new due time and attempt count.
    async fn outbox_reschedule(&self, job: &OutboxJob) -> StoreResult<()>;
    async fn outbox_depth(&self) -> StoreResult<u64>;

    async fn put_blob(&self, id: &str, bytes: &[u8]) -> StoreResult<()>;
    async fn blob(&self, id: &str) -> StoreResult<Option<Vec<u8>>>;

    /// Small shared values (sink cursors, channel health, tokens).
    async fn kv_get(&self, key: &str) -> StoreResult<Option<String>>;
    async fn kv_set(&self, key: &str, value: &str) -> StoreResult<()>;
    /// Takes or renews a named lease for `owner`; false when another owner holds it.
    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool>;

    /// Answers when the store is reachable.
    async fn ping(&self) -> StoreResult<()>;
}

pub type DynStore = Arc<dyn Store>;
