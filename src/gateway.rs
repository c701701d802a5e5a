//! The gateway service: every use case, written once over the store port.
//!
//! Webhook intake, agent actions and delivery results all follow one
//! pattern: load the records, run the domain rule, commit with a version
//! check, and on a conflict (another request or another process got there
//! first) load again and retry. Dedupe is a claim inside the same commit, so
//! a provider message is stored once however often it arrives.

use crate::adapters::{
    media, Consent, DeliveryError, Inbound, InboundMessage, IntakeError, Outbound, RawRequest,
    StatusUpdate, WebhookAck, WebhookIntake,
};
use crate::config::{ChannelConfig, QueueKind, Settings};
use crate::domain::{
    contact_key, new_id, Actor, Attachment, ChannelKind, ChannelRef, Contact, DeliveryStatus,
    DigitalId, Direction, Event, Interaction, Message, NewInteraction, Refusal, Status,
};
use crate::manifest::{self, Manifest, MAX_ATTACHMENT_BYTES};
use crate::metrics::Metrics;
use crate::store::{Claim, Commit, DynStore, Listed, OutboxJob, StoreError};
use chrono::{DateTime, Duration, Utc};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Notify;

/// Errors of the service, mapped to problem+json at the HTTP edge.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    NotFound(String),
    #[error("no channel {0}")]
    UnknownChannel(String),
    #[error("no queue {0}")]
    UnknownQueue(String),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Intake(#[from] IntakeError),
    #[error("{field}: {message}")]
    Validation { field: String, message: String },
    #[error("{0}")]
    AttachmentTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    WindowClosed(String),
    #[error("{0}")]
    OptedOut(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

pub type GResult<T> = Result<T, GatewayError>;

fn validation(field: &str, message: impl Into<String>) -> GatewayError {
    GatewayError::Validation {
        field: field.into(),
        message: message.into(),
    }
}

/// A configured channel with its adapter.
pub struct ChannelRuntime {
    pub config: ChannelConfig,
    pub manifest: &'static Manifest,
    pub intake: Arc<dyn WebhookIntake>,
    pub outbound: Arc<dyn Outbound>,
    pub media: media::MediaClient,
    /// Resolves provider media IDs into URLs (WhatsApp); `None` for URL-only kinds.
    pub resolver: Option<Arc<dyn crate::adapters::MediaResolver>>,
}

/// A file an agent attaches to a reply or an outbound message.
#[derive(Debug, Clone)]
pub struct Upload {
    pub filename: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
}

/// The outcome of one webhook.
pub struct IngestOutcome {
    pub ack: WebhookAck,
    pub stored: usize,
    pub duplicates: usize,
}

pub struct Gateway {
    pub settings: Arc<Settings>,
    pub store: DynStore,
    pub channels: HashMap<String, Arc<ChannelRuntime>>,
    pub metrics: Metrics,
    /// Wakes the outbox worker when a reply is queued.
    pub outbox_wake: Notify,
    /// Signs expiring public links to attachments (shared by every process through the store).
    pub media_secret: Vec<u8>,
}

const MAX_RETRIES: usize = 32;

/// How much of an interaction a change reads.
#[derive(Clone, Copy)]
enum Read<'a> {
    /// All of it, messages included.
    Whole,
    /// What adding messages needs ([`crate::store::Store::interaction_to_append`]):
    /// everything but the stored messages. Also what a read that shows no
    /// message takes.
    ToAppend,
    /// Everything but the stored messages other than this one
    /// ([`crate::store::Store::interaction_with_message`]).
    Message(&'a str),
}

/// How long one webhook may spend downloading its media before answering.
const MEDIA_BUDGET: std::time::Duration = std::time::Duration::from_secs(8);

impl Gateway {
    pub fn channel(&self, id: &str) -> GResult<&Arc<ChannelRuntime>> {
        self.channels
            .get(id)
            .ok_or_else(|| GatewayError::UnknownChannel(id.to_string()))
    }

    fn new_interaction_after(&self) -> Duration {
        Duration::hours(self.settings.server.new_interaction_after_hours as i64)
    }

    // ----- intake -------------------------------------------------------

    /// Verifies, normalizes and durably stores one webhook. Answers only
    /// once everything it carried is stored.
    pub async fn ingest(&self, channel_id: &str, req: &RawRequest<'_>) -> GResult<IngestOutcome> {
        let started = std::time::Instant::now();
        let ch = self.channel(channel_id)?.clone();
        let kind = ch.config.kind;
        self.metrics.webhook_received(kind);
        let outcome = self.verify_and_process(&ch, req).await;
        self.metrics.webhook_duration(kind, started.elapsed());
        outcome
    }

    async fn verify_and_process(
        &self,
        ch: &Arc<ChannelRuntime>,
        req: &RawRequest<'_>,
    ) -> GResult<IngestOutcome> {
        let kind = ch.config.kind;
        let verified = match ch.intake.verify(req) {
            Ok(v) => v,
            Err(e) => {
                self.metrics.webhook_rejected(kind, "signature");
                return Err(e.into());
            }
        };
        let items = match ch.intake.normalize(&verified) {
            Ok(items) => items,
            Err(e) => {
                self.metrics.webhook_rejected(kind, "malformed");
                return Err(e.into());
            }
        };
        self.process(ch, items).await
    }

    /// Stores items that did not come through a provider webhook (web chat,
    /// IMAP polling): the same rules, dedupe and events as a webhook.
    pub async fn receive_direct(
        &self,
        channel_id: &str,
        items: Vec<Inbound>,
    ) -> GResult<IngestOutcome> {
        let ch = self.channel(channel_id)?.clone();
        self.process(&ch, items).await
    }

    async fn process(
        &self,
        ch: &Arc<ChannelRuntime>,
        items: Vec<Inbound>,
    ) -> GResult<IngestOutcome> {
        let kind = ch.config.kind;
        // Canonicalise every sender before storing anything, so a bad item
        // refuses the whole webhook and nothing is stored half-way.
        let mut prepared = Vec::with_capacity(items.len());
        for item in items {
            let from = match &item {
                Inbound::Message(m) | Inbound::Echo(m) => Some(m.from.as_str()),
                Inbound::Reaction(r) => Some(r.from.as_str()),
                Inbound::Retraction { from, .. } => Some(from.as_str()),
                Inbound::Watermark(w) => Some(w.from.as_str()),
                Inbound::Typing { from, .. } => Some(from.as_str()),
                Inbound::Status(_) | Inbound::Revoked => None,
            };
            let id = match from {
                Some(f) => Some(DigitalId::from_provider(kind, f).map_err(|e| {
                    self.metrics.webhook_rejected(kind, "malformed");
                    IntakeError::Malformed(format!("sender: {e}"))
                })?),
                None => None,
            };
            prepared.push((id, item));
        }
        let mut outcome = IngestOutcome {
            ack: ch.intake.ack(),
            stored: 0,
            duplicates: 0,
        };
        for (id, item) in prepared {
            let fresh = match (item, id) {
                (Inbound::Message(m), Some(id)) => self.receive_message(ch, id, m).await?,
                (Inbound::Echo(m), Some(id)) => self.receive_echo(ch, id, m).await?,
                (Inbound::Reaction(r), Some(id)) => self.receive_reaction(ch, id, r).await?,
                (Inbound::Retraction { provider_id, .. }, Some(_)) => {
                    self.receive_retraction(ch, &provider_id).await?
                }
                (Inbound::Watermark(w), Some(id)) => self.receive_watermark(ch, id, w).await?,
                (Inbound::Status(s), _) => self.receive_status(ch, s).await?,
                (Inbound::Typing { on, .. }, Some(id)) => self.receive_typing(ch, id, on).await?,
                (Inbound::Revoked, _) => {
                    self.set_channel_health(&ch.config.id, "needs_reauth").await;
                    true
                }
                (_, None) => unreachable!("every item with a sender is prepared with its id"),
            };
            if fresh {
                outcome.stored += 1;
            } else {
                outcome.duplicates += 1;
                self.metrics.webhook_deduplicated(kind);
            }
        }
        Ok(outcome)
    }

    /// Puts a file in the attachment store and counts it (see
    /// [`Metrics::file_stored`] for the sources).
    pub async fn put_file(
        &self,
        source: &'static str,
        id: &str,
        bytes: &[u8],
    ) -> crate::store::StoreResult<()> {
        self.store.put_blob(id, bytes).await?;
        self.metrics.file_stored(source, bytes.len());
        Ok(())
    }

    /// Downloads one provider media item into the blob store, within `budget`.
    async fn fetch_media(
        &self,
        ch: &ChannelRuntime,
        media: &crate::adapters::MediaRef,
        id: String,
        fallback_name: &str,
        budget: std::time::Duration,
    ) -> Attachment {
        let fetch = async {
            let resolved = match (&ch.resolver, &media.media_id) {
                (Some(r), Some(_)) => r.resolve(media).await?,
                _ => media.clone(),
            };
            ch.media.fetch(&resolved).await
        };
        let fetched = match tokio::time::timeout(budget, fetch).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "media download timed out after {} s",
                budget.as_secs()
            )),
        };
        let result = match fetched {
            Ok(file) => {
                let filename = media
                    .filename
                    .clone()
                    .unwrap_or_else(|| media::filename_for(fallback_name, &file.content_type));
                match self.put_file("inbound", &id, &file.bytes).await {
                    Ok(()) => Ok(Attachment {
                        id: id.clone(),
                        filename,
                        content_type: file.content_type,
                        size: file.bytes.len() as u64,
                        state: "stored".into(),
                        error: None,
                        source_url: Some(media.url.clone()).filter(|u| !u.is_empty()),
                        source_media_id: media.media_id.clone(),
                        content_id: None,
                    }),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(e),
        };
        result.unwrap_or_else(|e| {
            tracing::warn!(channel = %ch.config.id, error = %e, "media download failed");
            failed_attachment(id, fallback_name.to_string(), media, e)
        })
    }

    async fn download_media(&self, ch: &ChannelRuntime, m: &InboundMessage) -> Vec<Attachment> {
        let mut out = vec![];
        // Twilio waits 15 s in all for our answer: downloads get a shared
        // budget well inside it, and what does not fit is marked failed
        // (retryable later) rather than making the provider retry.
        let deadline = tokio::time::Instant::now() + MEDIA_BUDGET;
        for (n, media) in m.media.iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let name = format!("attachment-{}", n + 1);
            out.push(self.fetch_media(ch, media, new_id(), &name, left).await);
        }
        out
    }

    /// Stores what a message carried itself (email): its files, oversize
    /// ones recorded as `omitted` with their size, inline images linked from
    /// the HTML by their `Content-ID`, and the raw message for audit.
    /// Answers the raw message's entry and the HTML to keep.
    async fn store_carried(
        &self,
        m: &InboundMessage,
        attachments: &mut Vec<Attachment>,
    ) -> GResult<(Option<Attachment>, Option<String>)> {
        let mut html = m.html.clone();
        for f in &m.files {
            let mut a = Attachment {
                id: new_id(),
                filename: f.filename.clone(),
                content_type: f.content_type.clone(),
                size: f.bytes.len() as u64,
                state: "stored".into(),
                error: None,
                source_url: None,
                source_media_id: None,
                content_id: f.content_id.clone(),
            };
            match f.omitted_size {
                Some(size) => {
                    a.size = size;
                    a.state = "omitted".into();
                    a.error = Some(format!(
                        "{size} bytes, over the {} MiB limit",
                        MAX_ATTACHMENT_BYTES / (1024 * 1024)
                    ));
                }
                None => {
                    self.put_file("inbound", &a.id, &f.bytes).await?;
                    if let (Some(h), Some(cid)) = (html.as_mut(), &f.content_id) {
                        *h = crate::adapters::email::parse::link_inline(
                            h,
                            cid,
                            &format!("/api/v1/attachments/{}", a.id),
                        );
                    }
                }
            }
            attachments.push(a);
        }
        let raw = match &m.raw {
            Some(bytes) => {
                let id = new_id();
                self.put_file("raw_email", &id, bytes).await?;
                Some(Attachment {
                    id,
                    filename: "message.eml".into(),
                    content_type: "message/rfc822".into(),
                    size: bytes.len() as u64,
                    state: "stored".into(),
                    error: None,
                    source_url: None,
                    source_media_id: None,
                    content_id: None,
                })
            }
            None => None,
        };
        Ok((raw, html))
    }

    /// Tries a failed download again (an agent asked to), keeping the attachment's ID.
    pub async fn retry_attachment(
        &self,
        actor: &Actor,
        attachment_id: &str,
    ) -> GResult<Attachment> {
        let (case, mid) = self
            .store
            .lookup(&format!("att:{attachment_id}"))
            .await?
            .and_then(|v| parse_target(&v))
            .ok_or_else(|| GatewayError::NotFound(format!("no attachment {attachment_id}")))?;
        let i = self.read_visible(actor, case, Read::Message(&mid)).await?;
        let att = i
            .messages
            .iter()
            .flat_map(|m| m.attachments.iter())
            .find(|a| a.id == attachment_id)
            .cloned()
            .ok_or_else(|| GatewayError::NotFound(format!("no attachment {attachment_id}")))?;
        if att.state != "failed" {
            return Err(Refusal::InvalidTransition(format!(
                "attachment {attachment_id} is already {}",
                att.state
            ))
            .into());
        }
        let ch = self.channel(&i.channel_id)?.clone();
        let media = crate::adapters::MediaRef {
            url: att.source_url.clone().unwrap_or_default(),
            content_type: Some(att.content_type.clone()),
            filename: None,
            media_id: att.source_media_id.clone(),
        };
        if media.url.is_empty() && media.media_id.is_none() {
            return Err(Refusal::InvalidTransition(
                "the provider's link to this file is not known".into(),
            )
            .into());
        }
        let fresh = self
            .fetch_media(&ch, &media, att.id.clone(), &att.filename, MEDIA_BUDGET)
            .await;
        let claim = format!("att-retry:{}:{}", att.id, new_id());
        let stored = fresh.clone();
        self.change_message(case, &mid, claim, move |m| {
            match m.attachments.iter_mut().find(|a| a.id == stored.id) {
                Some(a) if a.state == "failed" => {
                    let name = a.filename.clone();
                    *a = stored.clone();
                    a.filename = if stored.state == "stored" && !name.starts_with("attachment-") {
                        name
                    } else {
                        stored.filename.clone()
                    };
                    true
                }
                _ => false,
            }
        })
        .await?;
        Ok(fresh)
    }

    /// A customer message's files, put in the attachment store: the
    /// provider's media, an email's attachments and the email as received,
    /// and its HTML body with inline images linked to them.
    async fn receive_files(
        &self,
        ch: &ChannelRuntime,
        m: &InboundMessage,
    ) -> GResult<(Vec<Attachment>, Option<Attachment>, Option<String>)> {
        let mut attachments = self.download_media(ch, m).await;
        let (raw, html) = self.store_carried(m, &mut attachments).await?;
        Ok((attachments, raw, html))
    }

    /// Stores one customer message; false when it was a duplicate.
    async fn receive_message(
        &self,
        ch: &ChannelRuntime,
        digital_id: DigitalId,
        m: InboundMessage,
    ) -> GResult<bool> {
        let channel_id = &ch.config.id;
        let kind = ch.config.kind;
        let claim_key = format!("msg:{channel_id}:{}", m.provider_id);
        // Fast path for a provider's retry: no media download, no write. The
        // sender's contact is read in the same go; the first attempt below
        // starts from it.
        let (claimed, mut known) = self
            .store
            .lookup_and_contact(
                &claim_key,
                &contact_key(kind, channel_id, digital_id.as_str()),
            )
            .await?;
        if claimed.is_some() {
            return Ok(false);
        }
        // Files are stored before the commit that refers to them; an
        // auto-reply's only once it is known to be kept (below), so that one
        // that is dropped leaves nothing behind.
        let mut files = if m.automatic {
            None
        } else {
            Some(self.receive_files(ch, &m).await?)
        };
        let aliases: Vec<DigitalId> = m
            .aliases
            .iter()
            .filter_map(|a| DigitalId::from_provider(kind, a).ok())
            .filter(|a| *a != digital_id)
            .collect();
        let message_id = new_id();
        let reply_to = match &m.reply_to {
            Some(pid) => self.find_message(channel_id, pid).await?,
            None => None,
        };
        // Email: the thread decides (In-Reply-To, References, our reply token).
        let mut thread = None;
        for pid in &m.thread_refs {
            if let Some((case, _)) = self.find_message(channel_id, pid).await? {
                thread = Some(case);
                break;
            }
        }
        for _ in 0..MAX_RETRIES {
            let now = Utc::now();
            let mut contact = match known.take() {
                Some(c) => c,
                None => {
                    self.find_or_new_contact(ch, &digital_id, &aliases, now)
                        .await?
                }
            };
            let as_read = (contact.version > 0).then(|| contact.clone());
            let mut index = vec![];
            for alias in &aliases {
                if !contact.aliases.iter().any(|a| a == alias.as_str())
                    && contact.digital_id != alias.as_str()
                {
                    contact.aliases.push(alias.to_string());
                }
            }
            if contact.digital_id != digital_id.as_str()
                && !contact.aliases.iter().any(|a| a == digital_id.as_str())
            {
                contact.aliases.push(digital_id.to_string());
            }
            for alias in &contact.aliases {
                index.push(Claim {
                    key: format!("contact-alias:{}", contact_key(kind, channel_id, alias)),
                    value: contact.key.clone(),
                });
            }
            if let Some(name) = &m.contact_name {
                contact.name = Some(name.clone());
            }
            match m.consent {
                Some(Consent::OptOut) => contact.opted_out = true,
                Some(Consent::OptIn) => contact.opted_out = false,
                None => {}
            }
            let existing = match (thread, m.new_thread) {
                // Someone else's thread never takes this sender in: their own interaction.
                (Some(case), _) => self
                    .store
                    .interaction(case)
                    .await?
                    .filter(|i| i.contact_id == contact.id),
                // For email, a new thread is a new interaction.
                (None, true) => None,
                // Only a message is added: the stored ones may stay where they are.
                (None, false) => match contact.latest.get(channel_id) {
                    Some(case) => self.store.interaction_to_append(*case).await?,
                    None => None,
                },
            };
            // An auto-reply (out of office) never opens or reopens an interaction.
            if m.automatic {
                let open = existing.as_ref().is_some_and(|i| {
                    !i.is_closed_for_new_messages(now, self.new_interaction_after()) && i.in_queue
                });
                if !open {
                    let commit = Commit {
                        claims: vec![Claim {
                            key: claim_key.clone(),
                            value: "auto-reply".into(),
                        }],
                        ..Commit::default()
                    };
                    if let Some(stored) = self.try_commit(commit).await? {
                        return Ok(stored);
                    }
                    continue;
                }
            }
            if files.is_none() {
                files = Some(self.receive_files(ch, &m).await?);
            }
            let (attachments, raw, html) = files.as_ref().expect("stored just above");
            let (mut interaction, created) = match existing {
                Some(i) if !i.is_closed_for_new_messages(now, self.new_interaction_after()) => {
                    (i, false)
                }
                _ => {
                    let case_number = self.store.next_case_number().await?;
                    let mut i = Interaction::new(NewInteraction {
                        case_number,
                        channel_id: channel_id.clone(),
                        channel_kind: kind,
                        digital_id: digital_id.to_string(),
                        contact_id: contact.id.clone(),
                        contact_name: contact.name.clone(),
                        queue: ch.config.queue.clone(),
                        now,
                    });
                    i.subject = m.subject.clone();
                    contact.cases.push(case_number);
                    contact.latest.insert(channel_id.clone(), case_number);
                    (i, true)
                }
            };
            if m.contact_name.is_some() {
                interaction.contact_name = m.contact_name.clone();
            }
            let msg = Message {
                id: message_id.clone(),
                direction: Direction::Inbound,
                text: m.text.clone(),
                attachments: attachments.clone(),
                sent_at: m.sent_at,
                status: DeliveryStatus::Received,
                error: None,
                provider_id: Some(m.provider_id.clone()),
                author: None,
                sms: None,
                reply_to: reply_to
                    .as_ref()
                    .filter(|(case, _)| *case == interaction.case_number)
                    .map(|(_, mid)| mid.clone()),
                reactions: vec![],
                retracted: false,
                kind: m.kind.clone(),
                html: html.clone(),
                raw: raw.clone().map(Box::new),
            };
            let events = interaction.receive(msg, now, created);
            let case_number = interaction.case_number;
            index.extend(attachment_index(case_number, &message_id, attachments));
            index.extend(attachment_index(case_number, &message_id, raw.as_slice()));
            let commit = Commit {
                contact_unchanged: as_read.as_ref() == Some(&contact),
                contact: Some(contact),
                interaction: Some(interaction),
                claims: vec![Claim {
                    key: claim_key.clone(),
                    value: format!("{case_number}:{message_id}"),
                }],
                index,
                events,
                ..Commit::default()
            };
            if let Some(stored) = self.try_commit(commit).await? {
                return Ok(stored);
            }
        }
        Err(too_busy())
    }

    /// The contact holding any of these IDs (the first is the primary), or a new one.
    async fn find_or_new_contact(
        &self,
        ch: &ChannelRuntime,
        digital_id: &DigitalId,
        aliases: &[DigitalId],
        now: DateTime<Utc>,
    ) -> GResult<Contact> {
        let kind = ch.config.kind;
        let channel_id = &ch.config.id;
        for id in std::iter::once(digital_id).chain(aliases) {
            let key = contact_key(kind, channel_id, id.as_str());
            if let Some(c) = self.store.contact(&key).await? {
                return Ok(c);
            }
            if let Some(primary) = self.store.lookup(&format!("contact-alias:{key}")).await? {
                if let Some(c) = self.store.contact(&primary).await? {
                    return Ok(c);
                }
            }
        }
        Ok(Contact {
            id: new_id(),
            key: contact_key(kind, channel_id, digital_id.as_str()),
            version: 0,
            channel_kind: kind,
            digital_id: digital_id.to_string(),
            name: None,
            aliases: vec![],
            cases: vec![],
            latest: Default::default(),
            opted_out: false,
            created_at: now,
        })
    }

    /// Our `(case, message id)` of a provider message ID, inbound or outbound.
    async fn find_message(
        &self,
        channel_id: &str,
        provider_id: &str,
    ) -> GResult<Option<(u64, String)>> {
        for prefix in ["msg", "out"] {
            if let Some(v) = self
                .store
                .lookup(&format!("{prefix}:{channel_id}:{provider_id}"))
                .await?
            {
                return Ok(parse_target(&v));
            }
        }
        Ok(None)
    }

    /// Changes one message of an interaction, with a dedupe claim, and
    /// emits `message.updated`. Reads that message alone.
    async fn change_message(
        &self,
        case: u64,
        message_id: &str,
        claim: String,
        f: impl Fn(&mut Message) -> bool,
    ) -> GResult<bool> {
        for _ in 0..MAX_RETRIES {
            let Some(mut i) = self
                .store
                .interaction_with_message(case, message_id)
                .await?
            else {
                return Ok(true);
            };
            let Some(m) = i
                .messages
                .iter_mut()
                .find(|m| m.id == message_id)
                .map(Arc::make_mut)
            else {
                return Ok(true);
            };
            let changed = f(m);
            let snapshot = m.public();
            let mut commit = Commit {
                claims: vec![Claim {
                    key: claim.clone(),
                    value: format!("{case}:{message_id}"),
                }],
                ..Commit::default()
            };
            if changed {
                commit.events = vec![i.event(
                    "message.updated",
                    Utc::now(),
                    &serde_json::json!({"message": snapshot}),
                )];
                commit.interaction = Some(i);
            }
            if let Some(stored) = self.try_commit(commit).await? {
                return Ok(stored);
            }
        }
        Err(too_busy())
    }

    /// A reaction is stored on the message it reacts to; an unknown target is ignored.
    async fn receive_reaction(
        &self,
        ch: &ChannelRuntime,
        from: DigitalId,
        r: crate::adapters::Reaction,
    ) -> GResult<bool> {
        let claim = format!("reaction:{}:{}", ch.config.id, r.provider_id);
        if self.store.lookup(&claim).await?.is_some() {
            return Ok(false);
        }
        let Some((case, mid)) = self
            .find_message(&ch.config.id, &r.target_provider_id)
            .await?
        else {
            return Ok(true);
        };
        let emoji = r.emoji.clone();
        self.change_message(case, &mid, claim, |m| {
            m.react(from.as_str(), emoji.as_deref(), r.sent_at)
        })
        .await
    }

    /// A message the customer deleted is marked retracted.
    async fn receive_retraction(&self, ch: &ChannelRuntime, provider_id: &str) -> GResult<bool> {
        let claim = format!("retract:{}:{provider_id}", ch.config.id);
        if self.store.lookup(&claim).await?.is_some() {
            return Ok(false);
        }
        let Some((case, mid)) = self.find_message(&ch.config.id, provider_id).await? else {
            return Ok(true);
        };
        self.change_message(case, &mid, claim, |m| {
            let was = m.retracted;
            m.retracted = true;
            !was
        })
        .await
    }

    /// The assigned agent is typing: an `interaction.typing` event (web chat shows it to the visitor).
    pub async fn agent_typing(&self, actor: &Actor, case: u64, on: bool) -> GResult<()> {
        let i = self.visible(actor, case).await?;
        if let Actor::Agent(a) = actor {
            if i.assigned_to.as_deref() != Some(a.as_str()) {
                return Err(Refusal::NotAssigned.into());
            }
        }
        let event = i.event(
            "interaction.typing",
            Utc::now(),
            &serde_json::json!({"who": "agent", "agent": actor.id(), "state": if on { "on" } else { "off" }}),
        );
        self.store
            .commit(Commit {
                events: vec![event],
                ..Commit::default()
            })
            .await?;
        Ok(())
    }

    /// Typing: an `interaction.typing` event for live views; nothing is stored but the event.
    async fn receive_typing(
        &self,
        ch: &ChannelRuntime,
        from: DigitalId,
        on: bool,
    ) -> GResult<bool> {
        let key = contact_key(ch.config.kind, &ch.config.id, from.as_str());
        let Some(case) = self
            .store
            .contact(&key)
            .await?
            .and_then(|c| c.latest.get(&ch.config.id).copied())
        else {
            return Ok(true);
        };
        let event = crate::domain::EventDraft::new(
            "interaction.typing",
            Utc::now(),
            case,
            &ChannelRef {
                id: &ch.config.id,
                kind: ch.config.kind,
            },
            &serde_json::json!({"who": "customer", "state": if on { "on" } else { "off" }}),
        );
        self.store
            .commit(Commit {
                events: vec![event],
                ..Commit::default()
            })
            .await?;
        Ok(true)
    }

    /// Delivery and read watermarks move every covered message of the customer's latest interaction.
    async fn receive_watermark(
        &self,
        ch: &ChannelRuntime,
        from: DigitalId,
        w: crate::adapters::Watermark,
    ) -> GResult<bool> {
        let key = contact_key(ch.config.kind, &ch.config.id, from.as_str());
        let Some(contact) = self.store.contact(&key).await? else {
            return Ok(true);
        };
        let Some(case) = contact.latest.get(&ch.config.id).copied() else {
            return Ok(true);
        };
        for _ in 0..MAX_RETRIES {
            let Some(mut i) = self.store.interaction(case).await? else {
                return Ok(true);
            };
            let now = Utc::now();
            let covered: Vec<String> = i
                .messages
                .iter()
                .filter(|m| m.direction == Direction::Outbound)
                .filter(|m| {
                    m.provider_id
                        .as_ref()
                        .is_some_and(|p| w.provider_ids.contains(p))
                        || (m.provider_id.is_some() && m.sent_at <= w.up_to)
                })
                .map(|m| m.id.clone())
                .collect();
            let mut events = vec![];
            for mid in covered {
                events.extend(i.apply_delivery(&mid, w.status, None, None, now));
            }
            if events.is_empty() {
                return Ok(true);
            }
            let commit = Commit {
                events,
                interaction: Some(i),
                ..Commit::default()
            };
            match self.store.commit(commit).await {
                Ok(_) => return Ok(true),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(too_busy())
    }

    /// A business message echoed back by the provider. Ours is matched (and
    /// counts as accepted); one sent elsewhere (the Page inbox) is recorded
    /// as outbound. Never a customer message.
    async fn receive_echo(
        &self,
        ch: &ChannelRuntime,
        to: DigitalId,
        m: InboundMessage,
    ) -> GResult<bool> {
        let channel_id = &ch.config.id;
        let kind = ch.config.kind;
        let claim_key = format!("echo:{channel_id}:{}", m.provider_id);
        if self.store.lookup(&claim_key).await?.is_some() {
            return Ok(false);
        }
        if let Some((case, mid)) = self.find_message(channel_id, &m.provider_id).await? {
            return self
                .apply_delivery(
                    case,
                    &mid,
                    DeliveryStatus::Sent,
                    None,
                    None,
                    Some(claim_key),
                )
                .await;
        }
        let key = contact_key(kind, channel_id, to.as_str());
        let contact = self.store.contact(&key).await?;
        let latest = contact
            .as_ref()
            .and_then(|c| c.latest.get(channel_id).copied());
        if let Some(case) = latest {
            if let Some(i) = self.store.interaction(case).await? {
                // Ours, echoed before our own record of the send landed: the
                // metadata names it, or it is the one queued with the same text.
                let ours = i.messages.iter().find(|x| {
                    x.direction == Direction::Outbound
                        && (m.echo_of.as_deref() == Some(x.id.as_str())
                            || (m.echo_of.is_none()
                                && x.status == DeliveryStatus::Queued
                                && x.text == m.text))
                });
                if let Some(x) = ours {
                    return self
                        .apply_delivery(
                            case,
                            &x.id.clone(),
                            DeliveryStatus::Sent,
                            Some(m.provider_id.clone()),
                            None,
                            Some(claim_key),
                        )
                        .await;
                }
            }
        }
        // Sent from elsewhere: record it on the contact's interaction.
        let attachments = self.download_media(ch, &m).await;
        let message_id = new_id();
        for _ in 0..MAX_RETRIES {
            let now = Utc::now();
            let mut contact = self.find_or_new_contact(ch, &to, &[], now).await?;
            let existing = match contact.latest.get(channel_id) {
                Some(case) => self.store.interaction(*case).await?,
                None => None,
            };
            let mut i = match existing {
                Some(i) => i,
                None => {
                    let case_number = self.store.next_case_number().await?;
                    let mut i = Interaction::new(NewInteraction {
                        case_number,
                        channel_id: channel_id.clone(),
                        channel_kind: kind,
                        digital_id: to.to_string(),
                        contact_id: contact.id.clone(),
                        contact_name: contact.name.clone(),
                        queue: ch.config.queue.clone(),
                        now,
                    });
                    i.status = Status::Resolved;
                    i.in_queue = false;
                    contact.cases.push(case_number);
                    contact.latest.insert(channel_id.clone(), case_number);
                    i
                }
            };
            let msg = Message {
                id: message_id.clone(),
                direction: Direction::Outbound,
                text: m.text.clone(),
                attachments: attachments.clone(),
                sent_at: m.sent_at,
                status: DeliveryStatus::Sent,
                error: None,
                provider_id: Some(m.provider_id.clone()),
                author: None,
                sms: None,
                reply_to: None,
                reactions: vec![],
                retracted: false,
                kind: Some("sent_elsewhere".into()),
                html: None,
                raw: None,
            };
            let event = crate::domain::EventDraft::new(
                "message.sent",
                now,
                i.case_number,
                &ChannelRef {
                    id: channel_id,
                    kind,
                },
                &serde_json::json!({"message_id": message_id, "status": "sent", "provider_id": m.provider_id, "sent_elsewhere": true, "message": msg.public()}),
            );
            i.messages.push(Arc::new(msg));
            let case_number = i.case_number;
            let mut index = attachment_index(case_number, &message_id, &attachments);
            index.push(Claim {
                key: format!("out:{channel_id}:{}", m.provider_id),
                value: format!("{case_number}:{message_id}"),
            });
            let commit = Commit {
                contact: Some(contact),
                interaction: Some(i),
                claims: vec![Claim {
                    key: claim_key.clone(),
                    value: format!("{case_number}:{message_id}"),
                }],
                index,
                events: vec![event],
                ..Commit::default()
            };
            if let Some(stored) = self.try_commit(commit).await? {
                return Ok(stored);
            }
        }
        Err(too_busy())
    }

    /// Applies a provider's delivery status; false when it was a duplicate.
    async fn receive_status(&self, ch: &ChannelRuntime, s: StatusUpdate) -> GResult<bool> {
        let channel_id = &ch.config.id;
        let claim_key = format!(
            "status:{channel_id}:{}:{}",
            s.provider_id,
            s.status.as_str()
        );
        let Some(target) = self
            .store
            .lookup(&format!("out:{channel_id}:{}", s.provider_id))
            .await?
        else {
            // A status for a message we have not recorded (yet: the callback
            // can overtake our own send's answer). Keep it for the outbox to apply.
            let pending = serde_json::json!({"status": s.status, "error": s.error}).to_string();
            self.store
                .kv_set(
                    &format!("pending-status:{channel_id}:{}", s.provider_id),
                    &pending,
                )
                .await?;
            return Ok(true);
        };
        let Some((case, message_id)) = parse_target(&target) else {
            return Ok(true);
        };
        self.apply_delivery(case, &message_id, s.status, None, s.error, Some(claim_key))
            .await
    }

    /// Moves a message's delivery status (never backwards) and stores the
    /// events. Reads that message alone, however long the conversation: a
    /// reply's statuses come back several times each.
    pub async fn apply_delivery(
        &self,
        case: u64,
        message_id: &str,
        status: DeliveryStatus,
        provider_id: Option<String>,
        error: Option<String>,
        claim: Option<String>,
    ) -> GResult<bool> {
        for _ in 0..MAX_RETRIES {
            let Some(mut i) = self
                .store
                .interaction_with_message(case, message_id)
                .await?
            else {
                return Ok(true);
            };
            let events = i.apply_delivery(
                message_id,
                status,
                provider_id.clone(),
                error.clone(),
                Utc::now(),
            );
            let changed = !events.is_empty();
            let mut commit = Commit {
                claims: claim
                    .iter()
                    .map(|k| Claim {
                        key: k.clone(),
                        value: format!("{case}:{message_id}"),
                    })
                    .collect(),
                ..Commit::default()
            };
            if let Some(pid) = &provider_id {
                commit.index.push(Claim {
                    key: format!("out:{}:{pid}", i.channel_id),
                    value: format!("{case}:{message_id}"),
                });
            }
            if changed {
                commit.events = events;
                commit.interaction = Some(i);
            }
            if commit.claims.is_empty() && commit.index.is_empty() && commit.interaction.is_none() {
                return Ok(true);
            }
            if let Some(stored) = self.try_commit(commit).await? {
                return Ok(stored);
            }
        }
        Err(too_busy())
    }

    // ----- agents -------------------------------------------------------

    /// One attempt of a load-change-commit loop: `Some(true)` stored,
    /// `Some(false)` a claim was already taken (a duplicate), `None` a
    /// version conflict (load again and retry).
    async fn try_commit(&self, commit: Commit) -> GResult<Option<bool>> {
        match self.store.commit(commit).await {
            Ok(_) => Ok(Some(true)),
            Err(StoreError::Conflict) => Ok(None),
            Err(StoreError::Duplicate { .. }) => Ok(Some(false)),
            Err(e) => Err(e.into()),
        }
    }

    /// The queues an actor may see (a service sees all).
    pub fn visible_queues(&self, actor: &Actor) -> Vec<String> {
        match actor {
            Actor::Service(_) => self.settings.queues.iter().map(|q| q.id.clone()).collect(),
            Actor::Agent(a) => self
                .settings
                .agents
                .iter()
                .find(|x| x.id == *a)
                .map(|x| x.queues.clone())
                .unwrap_or_default(),
        }
    }

    /// Loads an interaction the actor may see: in their queues or assigned to them.
    pub async fn visible(&self, actor: &Actor, case: u64) -> GResult<Interaction> {
        self.read_visible(actor, case, Read::Whole).await
    }

    async fn read_visible(&self, actor: &Actor, case: u64, read: Read<'_>) -> GResult<Interaction> {
        let found = match read {
            Read::Whole => self.store.interaction(case).await?,
            Read::ToAppend => self.store.interaction_to_append(case).await?,
            Read::Message(id) => self.store.interaction_with_message(case, id).await?,
        };
        let i = found.ok_or_else(|| GatewayError::NotFound(format!("no interaction {case}")))?;
        let mine = matches!(actor, Actor::Agent(a) if i.assigned_to.as_deref() == Some(a.as_str()));
        if mine || self.visible_queues(actor).contains(&i.queue) {
            Ok(i)
        } else {
            Err(Refusal::NotPermitted(format!("interaction {case} is not in your queues")).into())
        }
    }

    /// Runs a domain change on an interaction with retries on conflict.
    pub async fn change<F>(&self, actor: &Actor, case: u64, f: F) -> GResult<Interaction>
    where
        F: FnMut(
            &mut Interaction,
            DateTime<Utc>,
        ) -> Result<(Vec<crate::domain::EventDraft>, Commit), GatewayError>,
    {
        self.change_read(actor, case, Read::Whole, f).await
    }

    /// [`Gateway::change`] on an interaction read as `read` says: a change
    /// that only adds messages (a reply) needs none of the stored ones.
    async fn change_read<F>(
        &self,
        actor: &Actor,
        case: u64,
        read: Read<'_>,
        mut f: F,
    ) -> GResult<Interaction>
    where
        F: FnMut(
            &mut Interaction,
            DateTime<Utc>,
        ) -> Result<(Vec<crate::domain::EventDraft>, Commit), GatewayError>,
    {
        for _ in 0..MAX_RETRIES {
            let mut i = self.read_visible(actor, case, read).await?;
            let before = i.clone();
            let (events, mut commit) = f(&mut i, Utc::now())?;
            // Nothing to store only when nothing changed: re-opening one's own
            // interaction emits no event but still marks it read.
            if events.is_empty()
                && commit.outbox_add.is_empty()
                && commit.claims.is_empty()
                && i == before
            {
                return Ok(i);
            }
            commit.events = events;
            commit.interaction = Some(i.clone());
            match self.store.commit(commit).await {
                Ok(_) => {
                    i.version += 1;
                    return Ok(i);
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(too_busy())
    }

    pub async fn assign(
        &self,
        actor: &Actor,
        case: u64,
        agent: Option<&str>,
    ) -> GResult<Interaction> {
        let target = match (actor, agent) {
            (Actor::Agent(a), None) => a.clone(),
            (Actor::Agent(a), Some(b)) if a == b => a.clone(),
            (Actor::Agent(_), Some(_)) => {
                return Err(Refusal::NotPermitted(
                    "only a service may give an interaction to another agent".into(),
                )
                .into())
            }
            (Actor::Service(_), Some(b)) => {
                if !self.settings.agents.iter().any(|x| x.id == b) {
                    return Err(validation("agent", format!("no agent {b}")));
                }
                b.to_string()
            }
            (Actor::Service(_), None) => {
                return Err(validation("agent", "name the agent to assign"))
            }
        };
        self.change(actor, case, |i, now| {
            Ok((i.assign(actor, &target, now)?, Commit::default()))
        })
        .await
    }

    pub async fn resolve(&self, actor: &Actor, case: u64) -> GResult<Interaction> {
        self.change(actor, case, |i, now| {
            Ok((i.resolve(actor, now)?, Commit::default()))
        })
        .await
    }

    pub async fn end(
        &self,
        actor: &Actor,
        case: u64,
        related_name: Option<String>,
        related_case: Option<String>,
        notes: Option<String>,
    ) -> GResult<Interaction> {
        let i = self
            .change(actor, case, |i, now| {
                Ok((
                    i.end(actor, related_name.clone(), related_case.clone(), now)?,
                    Commit::default(),
                ))
            })
            .await?;
        if let (Some(notes), Actor::Agent(a)) = (notes, actor) {
            self.store.put_note(a, &i.contact_id, &notes).await?;
        }
        Ok(i)
    }

    pub async fn transfer(&self, actor: &Actor, case: u64, queue: &str) -> GResult<Interaction> {
        let q = self
            .settings
            .queue(queue)
            .ok_or_else(|| GatewayError::UnknownQueue(queue.to_string()))?;
        if q.kind != QueueKind::Digital {
            return Err(Refusal::InvalidQueue(format!("{queue} is not a digital queue")).into());
        }
        if let Actor::Agent(a) = actor {
            let can = self
                .settings
                .agents
                .iter()
                .any(|x| x.id == *a && x.can_transfer);
            if !can {
                return Err(
                    Refusal::NotPermitted("you may not transfer interactions".into()).into(),
                );
            }
        }
        let members = self.settings.queue_members(queue);
        self.change(actor, case, |i, now| {
            Ok((
                i.transfer(actor, queue, &members, now, new_id)?,
                Commit::default(),
            ))
        })
        .await
    }

    /// `PATCH`: tags, priority, contact name, related name and case.
    pub async fn update(
        &self,
        actor: &Actor,
        case: u64,
        patch: &serde_json::Value,
    ) -> GResult<Interaction> {
        let obj = patch
            .as_object()
            .ok_or_else(|| validation("body", "expected a JSON object"))?;
        let mut tags: Option<Vec<String>> = None;
        let mut priority: Option<i64> = None;
        let mut strings: Vec<(&str, Option<String>)> = vec![];
        for (k, v) in obj {
            match k.as_str() {
                "tags" => {
                    let list = v
                        .as_array()
                        .and_then(|a| {
                            a.iter()
                                .map(|t| t.as_str().map(|s| s.trim().to_string()))
                                .collect::<Option<Vec<_>>>()
                        })
                        .ok_or_else(|| validation("tags", "expected a list of strings"))?;
                    if list.iter().any(|t| t.is_empty() || t.len() > 64) {
                        return Err(validation("tags", "tags are 1 to 64 characters"));
                    }
                    let mut list = list;
                    list.sort();
                    list.dedup();
                    tags = Some(list);
                }
                "priority" => {
                    priority = Some(
                        v.as_i64()
                            .ok_or_else(|| validation("priority", "expected an integer"))?,
                    )
                }
                "contact_name" | "related_name" | "related_case" => {
                    if !(v.is_string() || v.is_null()) {
                        return Err(validation(k, "expected a string or null"));
                    }
                    strings.push((k.as_str(), v.as_str().map(str::to_string)));
                }
                other => return Err(validation(other, "not a field you can change")),
            }
        }
        self.change(actor, case, |i, now| {
            if let Some(t) = &tags {
                i.tags = t.clone();
            }
            if let Some(p) = priority {
                i.priority = p;
            }
            for (k, v) in &strings {
                match *k {
                    "contact_name" => i.contact_name = v.clone(),
                    "related_name" => i.related_name = v.clone(),
                    _ => i.related_case = v.clone(),
                }
            }
            let ev = i.event("interaction.updated", now, &patch);
            Ok((vec![ev], Commit::default()))
        })
        .await
    }

    /// The messaging window of an interaction, for channels that have one.
    pub fn window(&self, i: &Interaction, now: DateTime<Utc>) -> Option<serde_json::Value> {
        let m = manifest::get(i.channel_kind);
        let hours = m.window.hours?;
        let Some(last) = i.last_customer_at else {
            return Some(serde_json::json!({"open": false, "closes_at": null, "tag": null}));
        };
        let mut closes = last + Duration::hours(hours as i64);
        let mut tag = serde_json::Value::Null;
        let human = self
            .channels
            .get(&i.channel_id)
            .and_then(|c| c.config.bool("human_agent_tag"))
            .unwrap_or(false);
        if now > closes && human {
            if let Some(h) = m.window.human_agent_hours {
                closes = last + Duration::hours(h as i64);
                tag = serde_json::json!("HUMAN_AGENT");
            }
        }
        Some(serde_json::json!({"open": now <= closes, "closes_at": closes, "tag": tag}))
    }

    /// Checks a text and files against the channel's manifest before anything is queued.
    fn precheck(&self, kind: ChannelKind, text: &str, uploads: &[Upload]) -> GResult<()> {
        let m = manifest::get(kind);
        if text.trim().is_empty() && uploads.is_empty() {
            return Err(validation("text", "write a message or attach a file"));
        }
        if let Some(max) = m.text.max_chars {
            let n = text.chars().count();
            if n > max {
                return Err(validation(
                    "text",
                    format!("{n} characters; {kind} allows {max}"),
                ));
            }
        }
        if let Some(max) = m.text.max_bytes {
            if text.len() > max {
                return Err(validation(
                    "text",
                    format!("{} bytes; {kind} allows {max}", text.len()),
                ));
            }
        }
        if !uploads.is_empty() && !m.attachments.allowed {
            return Err(GatewayError::UnsupportedMediaType(format!(
                "{kind} messages cannot carry attachments"
            )));
        }
        if let Some(max) = m.attachments.max_count {
            if uploads.len() > max {
                return Err(validation(
                    "attachments",
                    format!("{} files; {kind} allows {max}", uploads.len()),
                ));
            }
        }
        for u in uploads {
            let cap = m
                .attachments
                .max_bytes
                .unwrap_or(MAX_ATTACHMENT_BYTES)
                .min(MAX_ATTACHMENT_BYTES);
            if u.bytes.len() as u64 > cap {
                return Err(GatewayError::AttachmentTooLarge(format!(
                    "{} is {} bytes; the limit is {cap} bytes",
                    u.filename,
                    u.bytes.len()
                )));
            }
            if !manifest::type_allowed(&m.attachments.types, &u.content_type) {
                return Err(GatewayError::UnsupportedMediaType(format!(
                    "{} ({}) cannot be sent on {kind}",
                    u.filename, u.content_type
                )));
            }
        }
        Ok(())
    }

    async fn store_uploads(&self, uploads: &[Upload]) -> GResult<Vec<Attachment>> {
        let mut out = vec![];
        for u in uploads {
            let id = new_id();
            self.put_file("agent", &id, &u.bytes).await?;
            out.push(Attachment {
                id,
                filename: u.filename.clone(),
                content_type: u.content_type.clone(),
                size: u.bytes.len() as u64,
                state: "stored".into(),
                error: None,
                source_url: None,
                source_media_id: None,
                content_id: None,
            });
        }
        Ok(out)
    }

    fn outgoing_message(
        &self,
        kind: ChannelKind,
        agent: &str,
        text: &str,
        attachments: Vec<Attachment>,
        now: DateTime<Utc>,
    ) -> Message {
        let sms = (kind == ChannelKind::Sms).then(|| {
            let s = crate::adapters::sms::segments::analyze(text);
            serde_json::json!({"encoding": s.encoding, "segments": s.segments, "characters": s.characters})
        });
        Message {
            id: new_id(),
            direction: Direction::Outbound,
            text: text.to_string(),
            attachments,
            sent_at: now,
            status: DeliveryStatus::Queued,
            error: None,
            provider_id: None,
            author: Some(agent.to_string()),
            sms,
            reply_to: None,
            reactions: vec![],
            retracted: false,
            kind: None,
            html: None,
            raw: None,
        }
    }

    /// A reply from the assigned agent: checked, queued durably, then delivered by the outbox.
    /// `html` is a formatted body (kept, sanitized, on email; see [`formatted_body`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn reply(
        &self,
        actor: &Actor,
        case: u64,
        text: &str,
        html: Option<&str>,
        uploads: &[Upload],
        idempotency_key: Option<&str>,
        reply_to: Option<&str>,
    ) -> GResult<(Interaction, Message)> {
        let idem = idempotency_key.map(|k| format!("idem:{}:{k}", actor.id()));
        if let Some(key) = &idem {
            if let Some(found) = self.idempotent_result(key).await? {
                return Ok(found);
            }
        }
        // A reply only adds a message: the stored ones are not fetched (a
        // long conversation costs no more to answer than a short one),
        // except to find the one it answers (`reply_to`, below).
        let current = self.read_visible(actor, case, Read::ToAppend).await?;
        if let Actor::Agent(a) = actor {
            if current.assigned_to.as_deref() != Some(a.as_str()) {
                return Err(Refusal::NotAssigned.into());
            }
        }
        let (text, html) = formatted_body(current.channel_kind, text, html);
        let text = text.as_str();
        self.precheck(current.channel_kind, text, uploads)?;
        let now = Utc::now();
        if let Some(w) = self.window(&current, now) {
            if w["open"] == serde_json::json!(false) {
                return Err(GatewayError::WindowClosed(format!(
                    "the {} messaging window closed at {}; the customer must write first",
                    current.channel_kind,
                    w["closes_at"].as_str().unwrap_or("an unknown time")
                )));
            }
        }
        if current.channel_kind == ChannelKind::Sms {
            let key = contact_key(
                current.channel_kind,
                &current.channel_id,
                &current.digital_id,
            );
            if self.store.contact(&key).await?.is_some_and(|c| c.opted_out) {
                return Err(GatewayError::OptedOut(format!(
                    "{} has opted out of SMS (STOP); they must send START first",
                    current.digital_id
                )));
            }
        }
        let attachments = self.store_uploads(uploads).await?;
        let mut msg =
            self.outgoing_message(current.channel_kind, actor.id(), text, attachments, now);
        msg.html = html;
        if let Some(rid) = reply_to {
            let whole = self.visible(actor, case).await?;
            if !whole
                .messages
                .iter()
                .any(|m| m.id == rid && m.provider_id.is_some())
            {
                return Err(validation(
                    "reply_to",
                    format!("no message {rid} in this interaction"),
                ));
            }
            msg.reply_to = Some(rid.to_string());
        }
        let channel_id = current.channel_id.clone();
        let result = self
            .change_read(actor, case, Read::ToAppend, |i, now| {
                let events = i.reply(actor, msg.clone(), now)?;
                let commit = Commit {
                    claims: idem
                        .iter()
                        .map(|k| Claim {
                            key: k.clone(),
                            value: format!("{case}:{}", msg.id),
                        })
                        .collect(),
                    index: attachment_index(case, &msg.id, &msg.attachments),
                    outbox_add: vec![OutboxJob {
                        id: msg.id.clone(),
                        case_number: case,
                        message_id: msg.id.clone(),
                        channel_id: channel_id.clone(),
                        attempts: 0,
                        due_at: now,
                        created_at: now,
                    }],
                    ..Commit::default()
                };
                Ok((events, commit))
            })
            .await;
        match result {
            Ok(i) => {
                self.outbox_wake.notify_one();
                Ok((i, msg))
            }
            // A concurrent request with the same key won: answer as it did.
            Err(GatewayError::Store(StoreError::Duplicate { key, .. })) => {
                self.idempotent_result(&key).await?.ok_or_else(|| {
                    StoreError::Unavailable("idempotency record vanished".into()).into()
                })
            }
            Err(e) => Err(e),
        }
    }

    async fn idempotent_result(&self, key: &str) -> GResult<Option<(Interaction, Message)>> {
        let Some(v) = self.store.lookup(key).await? else {
            return Ok(None);
        };
        let Some((case, mid)) = parse_target(&v) else {
            return Ok(None);
        };
        let Some(i) = self.store.interaction(case).await? else {
            return Ok(None);
        };
        let m = i
            .messages
            .iter()
            .find(|m| m.id == mid)
            .map(|m| Message::clone(m));
        Ok(m.map(|m| (i, m)))
    }

    /// Outbound SMS (or, later, email) started by an agent of an outbound queue.
    pub async fn start_outbound(
        &self,
        actor: &Actor,
        req: OutboundRequest<'_>,
    ) -> GResult<(Interaction, Message)> {
        let OutboundRequest {
            queue_kind,
            channel_id,
            to,
            text,
            html,
            subject,
            uploads,
            contact,
        } = req;
        let Actor::Agent(agent) = actor else {
            return Err(
                Refusal::NotPermitted("outbound messages are started by agents".into()).into(),
            );
        };
        let member = self
            .visible_queues(actor)
            .iter()
            .any(|q| self.settings.queue(q).is_some_and(|q| q.kind == queue_kind));
        if !member {
            return Err(Refusal::NotPermitted(format!(
                "only agents of an {} queue may start one",
                serde_json::to_value(queue_kind)
                    .unwrap()
                    .as_str()
                    .unwrap_or("outbound")
            ))
            .into());
        }
        let ch = self.channel(channel_id)?.clone();
        let wanted = match queue_kind {
            QueueKind::OutboundSms => ChannelKind::Sms,
            _ => ChannelKind::Email,
        };
        if ch.config.kind != wanted {
            return Err(validation(
                "channel",
                format!("{channel_id} is not an {wanted} channel"),
            ));
        }
        let digital_id = DigitalId::parse(wanted, to).map_err(|e| validation("to", e))?;
        let (text, html) = formatted_body(wanted, text, html);
        let text = text.as_str();
        self.precheck(wanted, text, uploads)?;
        let name = contact
            .get("name")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let related_name = contact
            .get("related_name")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let related_case = contact
            .get("related_case")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let notes = contact
            .get("notes")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let key = contact_key(wanted, channel_id, digital_id.as_str());
        if let Some(c) = self.store.contact(&key).await? {
            if c.opted_out && wanted == ChannelKind::Sms {
                return Err(GatewayError::OptedOut(format!(
                    "{} has opted out of SMS (STOP); they must send START first",
                    digital_id
                )));
            }
        }
        let attachments = self.store_uploads(uploads).await?;
        for _ in 0..MAX_RETRIES {
            let now = Utc::now();
            let mut contact = self.store.contact(&key).await?.unwrap_or_else(|| Contact {
                id: new_id(),
                key: key.clone(),
                version: 0,
                channel_kind: wanted,
                digital_id: digital_id.to_string(),
                name: None,
                aliases: vec![],
                cases: vec![],
                latest: Default::default(),
                opted_out: false,
                created_at: now,
            });
            if name.is_some() {
                contact.name = name.clone();
            }
            let case_number = self.store.next_case_number().await?;
            let mut i = Interaction::new(NewInteraction {
                case_number,
                channel_id: channel_id.to_string(),
                channel_kind: wanted,
                digital_id: digital_id.to_string(),
                contact_id: contact.id.clone(),
                contact_name: contact.name.clone(),
                queue: ch.config.queue.clone(),
                now,
            });
            i.subject = subject.clone();
            i.related_name = related_name.clone();
            i.related_case = related_case.clone();
            i.assigned_to = Some(agent.clone());
            i.opened_by.insert(agent.clone(), now);
            let mut msg = self.outgoing_message(wanted, agent, text, attachments.clone(), now);
            msg.html = html.clone();
            let mut events = vec![crate::domain::EventDraft::new(
                "interaction.created",
                now,
                case_number,
                &ChannelRef {
                    id: channel_id,
                    kind: wanted,
                },
                &serde_json::json!({"queue": i.queue, "digital_id": i.digital_id, "outbound": true,
                    "contact": {"id": contact.id, "name": contact.name}}),
            )];
            events.extend(i.reply(actor, msg.clone(), now)?);
            i.received_at = now;
            contact.cases.push(case_number);
            contact.latest.insert(channel_id.to_string(), case_number);
            let contact_id = contact.id.clone();
            let commit = Commit {
                contact: Some(contact),
                interaction: Some(i.clone()),
                index: attachment_index(case_number, &msg.id, &msg.attachments),
                events,
                outbox_add: vec![OutboxJob {
                    id: msg.id.clone(),
                    case_number,
                    message_id: msg.id.clone(),
                    channel_id: channel_id.to_string(),
                    attempts: 0,
                    due_at: now,
                    created_at: now,
                }],
                ..Commit::default()
            };
            match self.store.commit(commit).await {
                Ok(_) => {
                    if let Some(n) = &notes {
                        self.store.put_note(agent, &contact_id, n).await?;
                    }
                    self.outbox_wake.notify_one();
                    i.version += 1;
                    return Ok((i, msg));
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(too_busy())
    }

    /// The list an agent works from (CONTRACT.md, "Lists and feeds").
    pub async fn list(
        &self,
        actor: &Actor,
        q: &ListQuery,
    ) -> GResult<(Vec<Listed>, Option<String>)> {
        let mut queues = self.visible_queues(actor);
        if let Some(only) = &q.queue {
            if !queues.contains(only) {
                if self.settings.queue(only).is_none() {
                    return Err(GatewayError::UnknownQueue(only.clone()));
                }
                return Err(Refusal::NotPermitted(format!("you are not in queue {only}")).into());
            }
            queues = vec![only.clone()];
        }
        let agent = actor.agent();
        // The store gives a superset of the view, from the index that fits
        // it best; the rules below decide.
        let candidates = match q.view.as_str() {
            "mine" => self.store.interactions_for(&[], agent).await?,
            "all" => self.store.interactions_for(&queues, agent).await?,
            _ => self.store.waiting_for(&queues, agent).await?,
        };
        let items: Vec<Listed> = candidates
            .into_iter()
            .filter(|l| in_view(&q.view, agent, &queues, &l.interaction))
            .filter(|l| q.status.is_none_or(|s| l.interaction.status == s))
            .filter(|l| q.tags.is_empty() || l.interaction.tags.iter().any(|t| q.tags.contains(t)))
            .collect();
        let sort = ListSort::parse(&q.sort);
        let mut keyed: Vec<(SortKey, Listed)> = items
            .into_iter()
            .map(|l| (sort.key(&l.interaction), l))
            .collect();
        keyed.sort_unstable_by_key(|a| a.0);
        // A cursor names the sort key of the last item shown, not a
        // position: an interaction that moves to the top meanwhile (a new
        // message) does not shift the next page, which would then skip one
        // item or show one twice.
        let start = match q.cursor.as_deref() {
            None => 0,
            Some(c) => match sort.parse_cursor(c) {
                Some(Cursor::After(after)) => keyed.partition_point(|(k, _)| *k <= after),
                Some(Cursor::Offset(n)) => n,
                None => {
                    return Err(validation(
                        "cursor",
                        "cursor is a next_cursor of this list with the same sort",
                    ))
                }
            },
        };
        let limit = q.limit.clamp(1, 500);
        let total = keyed.len();
        let end = start.saturating_add(limit).min(total);
        let next = (end < total && end > start).then(|| sort.cursor(&keyed[end - 1].0));
        let page: Vec<Listed> = keyed
            .into_iter()
            .skip(start)
            .take(limit)
            .map(|(_, l)| l)
            .collect();
        Ok((page, next))
    }

    /// Contact details: the caller's own notes and the contact's other
    /// interactions. It shows no message, so it reads none: a regular
    /// customer's history would otherwise copy every conversation they had.
    pub async fn contact_details(&self, actor: &Actor, case: u64) -> GResult<serde_json::Value> {
        let i = self.read_visible(actor, case, Read::ToAppend).await?;
        let contact = self.store.contact_by_id(&i.contact_id).await?;
        let notes = match actor {
            Actor::Agent(a) => self.store.note(a, &i.contact_id).await?,
            Actor::Service(_) => None,
        };
        let mut history = vec![];
        if let Some(c) = &contact {
            for case_number in c.cases.iter().rev() {
                if *case_number == case {
                    continue;
                }
                if let Some(h) = self.store.interaction_to_append(*case_number).await? {
                    let mut v = h.to_api(Some(actor.id()), None);
                    v.as_object_mut().map(|o| o.remove("messages"));
                    history.push(v);
                }
            }
        }
        Ok(serde_json::json!({
            "case_number": i.case_number,
            "digital_id": i.digital_id,
            "contact": {"id": i.contact_id, "name": i.contact_name.clone().or(contact.as_ref().and_then(|c| c.name.clone()))},
            "related_name": i.related_name,
            "related_case": i.related_case,
            "notes": notes,
            "history": history,
        }))
    }

    /// Saves the caller's private notes on a contact they can see.
    pub async fn put_notes(&self, actor: &Actor, contact_id: &str, notes: &str) -> GResult<()> {
        let Actor::Agent(agent) = actor else {
            return Err(Refusal::NotPermitted("notes belong to agents".into()).into());
        };
        let contact = self
            .store
            .contact_by_id(contact_id)
            .await?
            .ok_or_else(|| GatewayError::NotFound(format!("no contact {contact_id}")))?;
        let queues = self.visible_queues(actor);
        let mut allowed = false;
        for case in &contact.cases {
            if let Some(i) = self.store.interaction_to_append(*case).await? {
                if queues.contains(&i.queue) || i.assigned_to.as_deref() == Some(agent) {
                    allowed = true;
                    break;
                }
            }
        }
        if !allowed {
            return Err(Refusal::NotPermitted(format!(
                "contact {contact_id} is not in your queues"
            ))
            .into());
        }
        self.store.put_note(agent, contact_id, notes).await?;
        Ok(())
    }

    /// Whether an event concerns one of the actor's queues (for SSE and the
    /// feed). Asked for every event an agent's stream or page holds, so it
    /// reads the interaction without its messages.
    pub async fn event_visible(&self, actor: &Actor, queues: &[String], e: &Event) -> bool {
        if matches!(actor, Actor::Service(_)) {
            return true;
        }
        match self.store.interaction_to_append(e.case_number).await {
            Ok(Some(i)) => {
                queues.contains(&i.queue)
                    || i.assigned_to.as_deref() == Some(actor.id())
                    || e.data_str("from").is_some_and(|f| queues.contains(&f))
            }
            _ => false,
        }
    }

    /// Marks an SMS contact opted out because the provider said so (Twilio
    /// 21610: the recipient sent STOP where we did not see it).
    pub async fn mark_opted_out(&self, case: u64) -> GResult<()> {
        let Some(i) = self.store.interaction_to_append(case).await? else {
            return Ok(());
        };
        let key = contact_key(i.channel_kind, &i.channel_id, &i.digital_id);
        for _ in 0..MAX_RETRIES {
            let Some(mut c) = self.store.contact(&key).await? else {
                return Ok(());
            };
            if c.opted_out {
                return Ok(());
            }
            c.opted_out = true;
            match self
                .store
                .commit(Commit {
                    contact: Some(c),
                    ..Commit::default()
                })
                .await
            {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Records a delivery failure of a channel's credentials (health shown in `/readyz`).
    pub async fn set_channel_health(&self, channel_id: &str, state: &str) {
        let _ = self
            .store
            .kv_set(&format!("channel-health:{channel_id}"), state)
            .await;
    }

    pub async fn channel_health(&self, channel_id: &str) -> String {
        self.store
            .kv_get(&format!("channel-health:{channel_id}"))
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| "ok".into())
    }

    /// A public link to an outbound attachment, valid for `ttl` (providers
    /// such as Twilio fetch media by URL). Unguessable: signed with the
    /// store-wide media secret.
    pub fn media_url(&self, case: u64, attachment_id: &str, ttl: Duration) -> String {
        let expires = (Utc::now() + ttl).timestamp();
        let payload = format!("{case}.{attachment_id}.{expires}");
        format!(
            "{}/media/{payload}.{}",
            self.settings.server.public_url(),
            self.media_signature(&payload)
        )
    }

    fn media_signature(&self, payload: &str) -> String {
        use hmac::{Hmac, Mac};
        let mut mac =
            Hmac::<sha2::Sha256>::new_from_slice(&self.media_secret).expect("any key length");
        mac.update(payload.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// The case and attachment a media token names, if it is genuine and unexpired.
    pub fn verify_media_token(&self, token: &str, now: DateTime<Utc>) -> Option<(u64, String)> {
        let (payload, sig) = token.rsplit_once('.')?;
        let expected = self.media_signature(payload);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            expected.as_bytes(),
            sig.as_bytes(),
        )) {
            return None;
        }
        let mut parts = payload.split('.');
        let case = parts.next()?.parse().ok()?;
        let att = parts.next()?.to_string();
        let expires: i64 = parts.next()?.parse().ok()?;
        (now.timestamp() <= expires).then_some((case, att))
    }

    /// The tags in use where the caller works: on the interactions of
    /// their queues and those assigned to them (what `view=all` lists).
    pub async fn tags(&self, actor: &Actor) -> GResult<Vec<String>> {
        let queues = self.visible_queues(actor);
        let agent = actor.agent();
        Ok(self.store.tags_for(&queues, agent).await?)
    }

    /// What is unread in an agent's default view (`view=queue`), all of
    /// it rather than a page: how many, and the case numbers of those
    /// assigned to the agent (the agent UI's badge for "My interactions").
    /// It reads only what waits, as the default list does: what an agent
    /// was assigned and has finished is not read.
    pub async fn unread(&self, actor: &Actor) -> GResult<Unread> {
        let Some(agent) = actor.agent() else {
            return Ok(Unread::default());
        };
        let queues = self.visible_queues(actor);
        let mut unread = Unread::default();
        for Listed { interaction: i, .. } in self.store.waiting_for(&queues, Some(agent)).await? {
            if !in_view("queue", Some(agent), &queues, &i) || !i.unread_for(agent) {
                continue;
            }
            unread.count += 1;
            if i.assigned_to.as_deref() == Some(agent) {
                unread.mine.push(i.case_number);
            }
        }
        unread.mine.sort_unstable();
        Ok(unread)
    }
}

/// See [`Gateway::unread`].
#[derive(Debug, Default)]
pub struct Unread {
    pub count: usize,
    pub mine: Vec<u64>,
}

/// Whether `i` belongs in `view` for `agent` (CONTRACT.md, "Lists and
/// feeds"); `queues` are those the caller sees.
fn in_view(view: &str, agent: Option<&str>, queues: &[String], i: &Interaction) -> bool {
    let mine = agent.is_some() && i.assigned_to.as_deref() == agent;
    let in_queues = queues.contains(&i.queue);
    match view {
        "mine" => mine,
        "all" => in_queues || mine,
        _ => i.in_queue && (mine || (in_queues && i.assigned_to.is_none())),
    }
}

/// What an agent gives to start an outbound conversation.
pub struct OutboundRequest<'a> {
    pub queue_kind: QueueKind,
    pub channel_id: &'a str,
    pub to: &'a str,
    pub text: &'a str,
    /// Email: a formatted body; sanitized, and rendered as plain text when
    /// `text` is empty.
    pub html: Option<&'a str>,
    pub subject: Option<String>,
    pub uploads: &'a [Upload],
    pub contact: &'a serde_json::Value,
}

/// The body of an agent's message: the text as given (or a plain rendering
/// of the HTML, link addresses kept, when only HTML is given) and, on
/// email, the HTML sanitized as inbound HTML is; other channels keep only
/// the text.
fn formatted_body(kind: ChannelKind, text: &str, html: Option<&str>) -> (String, Option<String>) {
    use crate::adapters::email::{parse::sanitize_html, send::plain_rendering};
    let html = html
        .filter(|h| !h.trim().is_empty())
        .map(sanitize_html)
        .filter(|h| !h.trim().is_empty());
    let text = match &html {
        Some(h) if text.trim().is_empty() => plain_rendering(h),
        _ => text.to_string(),
    };
    (text, html.filter(|_| kind == ChannelKind::Email))
}

/// How a list is sorted (CONTRACT.md, "Lists and feeds"): newest customer
/// message first, ties by case number; `priority` and `channel` sort by
/// those first.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ListSort {
    Received,
    Priority,
    Channel,
}

/// An item's place in a sorted list: ascending order is the list's order.
type SortKey = (i128, i128, u64);

enum Cursor {
    /// Items after this key.
    After(SortKey),
    /// A cursor from before keys: the position itself.
    Offset(usize),
}

impl ListSort {
    fn parse(s: &str) -> ListSort {
        match s {
            "priority" => ListSort::Priority,
            "channel" => ListSort::Channel,
            _ => ListSort::Received,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            ListSort::Received => "r",
            ListSort::Priority => "p",
            ListSort::Channel => "c",
        }
    }

    fn key(self, i: &Interaction) -> SortKey {
        let newest_first = -i128::from(i.received_at.timestamp_nanos_opt().unwrap_or(i64::MAX));
        match self {
            ListSort::Received => (newest_first, 0, i.case_number),
            ListSort::Priority => (-i128::from(i.priority), newest_first, i.case_number),
            ListSort::Channel => (i.channel_kind as i128, newest_first, i.case_number),
        }
    }

    fn cursor(self, (a, b, case): &SortKey) -> String {
        format!("{}.{a}.{b}.{case}", self.tag())
    }

    fn parse_cursor(self, s: &str) -> Option<Cursor> {
        if let Ok(n) = s.parse() {
            return Some(Cursor::Offset(n));
        }
        let mut parts = s.split('.');
        if parts.next()? != self.tag() {
            return None;
        }
        let key = (
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
        );
        parts.next().is_none().then_some(Cursor::After(key))
    }
}

/// Query of `GET /api/v1/interactions`.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub queue: Option<String>,
    pub view: String,
    pub status: Option<Status>,
    pub tags: Vec<String>,
    pub sort: String,
    pub limit: usize,
    pub cursor: Option<String>,
}

impl Default for ListQuery {
    fn default() -> Self {
        ListQuery {
            queue: None,
            view: "queue".into(),
            status: None,
            tags: vec![],
            sort: "received".into(),
            limit: 50,
            cursor: None,
        }
    }
}

fn failed_attachment(
    id: String,
    filename: String,
    media: &crate::adapters::MediaRef,
    error: String,
) -> Attachment {
    Attachment {
        id,
        filename,
        content_type: media
            .content_type
            .clone()
            .unwrap_or_else(|| "application/octet-stream".into()),
        size: 0,
        state: "failed".into(),
        error: Some(error),
        source_url: Some(media.url.clone()).filter(|u| !u.is_empty()),
        source_media_id: media.media_id.clone(),
        content_id: None,
    }
}

/// What a retry loop answers when every attempt lost a race.
fn too_busy() -> GatewayError {
    StoreError::Unavailable("too many concurrent changes; try again".into()).into()
}

/// Index entries that find an attachment's interaction from its ID.
fn attachment_index(case: u64, message_id: &str, attachments: &[Attachment]) -> Vec<Claim> {
    attachments
        .iter()
        .map(|a| Claim {
            key: format!("att:{}", a.id),
            value: format!("{case}:{message_id}"),
        })
        .collect()
}

/// Parses a `{case}:{message_id}` lookup value.
pub fn parse_target(v: &str) -> Option<(u64, String)> {
    let (case, mid) = v.split_once(':')?;
    Some((case.parse().ok()?, mid.to_string()))
}

/// A classified delivery failure, as the outbox records it.
pub fn failure_text(e: &DeliveryError) -> String {
    match &e.code {
        Some(code) => format!("{code}: {}", e.message),
        None => e.message.clone(),
    }
}
