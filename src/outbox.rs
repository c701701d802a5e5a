//! The delivery worker: takes replies from the durable outbox and sends
//! them through their channel.
//!
//! A job is leased before it is sent, so no two workers (or processes)
//! send it at once; it leaves the outbox in the same commit that records
//! the provider's acceptance. Failures are classified by the adapter:
//! retryable ones come back with exponential backoff and jitter (or the
//! provider's `Retry-After`) until `server.delivery_give_up_seconds`;
//! permanent ones mark the message `failed` with the provider's reason,
//! which reopens the interaction for the agent.
//!
//! One gap is inherent: if the process dies after the provider accepted a
//! message but before the commit, the job is sent again after its lease
//! expires. Providers without an idempotency key (Twilio) cannot dedupe it.

use crate::adapters::{DeliveryError, OutgoingAttachment, OutgoingMessage};
use crate::domain::{ChannelKind, DeliveryStatus, Direction};
use crate::gateway::{failure_text, Gateway};
use crate::store::{Claim, Commit, OutboxJob, StoreError};
use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const LEASE: Duration = Duration::from_secs(60);
const MEDIA_LINK_TTL_HOURS: i64 = 24;

/// The delay before retry number `attempt` (1-based): exponential from one
/// second, doubling, capped at ten minutes, with jitter.
pub fn backoff(attempt: u32) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(600))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempt.saturating_sub(1) as usize)
        .unwrap_or(Duration::from_secs(600))
}

/// What one step of the worker did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StepReport {
    pub sent: usize,
    pub retried: usize,
    pub failed: usize,
}

/// Delivers every job due now, once. Tests call this to drive the outbox
/// without sleeping.
pub async fn step(g: &Arc<Gateway>) -> Result<StepReport, StoreError> {
    let jobs = g.store.outbox_lease(Utc::now(), LEASE, 32).await?;
    let mut report = StepReport::default();
    let results = futures_util::future::join_all(jobs.into_iter().map(|job| {
        let g = g.clone();
        async move { deliver(&g, job).await }
    }))
    .await;
    for r in results {
        match r? {
            Outcome::Sent => report.sent += 1,
            Outcome::Retried => report.retried += 1,
            Outcome::Failed => report.failed += 1,
            Outcome::Dropped => {}
        }
    }
    Ok(report)
}

/// Runs until `shutdown`, then finishes the step in progress.
pub async fn run(g: Arc<Gateway>, shutdown: CancellationToken) {
    loop {
        match step(&g).await {
            Ok(r) if r.sent + r.retried + r.failed > 0 => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "outbox step failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = g.outbox_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

enum Outcome {
    Sent,
    Retried,
    Failed,
    Dropped,
}

async fn drop_job(g: &Gateway, job: &OutboxJob) -> Result<Outcome, StoreError> {
    g.store
        .commit(Commit {
            outbox_remove: vec![job.id.clone()],
            ..Commit::default()
        })
        .await?;
    Ok(Outcome::Dropped)
}

async fn deliver(g: &Arc<Gateway>, job: OutboxJob) -> Result<Outcome, StoreError> {
    // An email names every earlier message of its thread (`References`),
    // so it reads the conversation; any other channel needs the message
    // alone, and the one it quotes.
    let channel = g.channel(&job.channel_id).ok();
    let threaded = channel.is_some_and(|c| c.config.kind == ChannelKind::Email);
    let read = if threaded {
        g.store.interaction(job.case_number).await?
    } else {
        g.store
            .interaction_with_message(job.case_number, &job.message_id)
            .await?
    };
    let Some(i) = read else {
        return drop_job(g, &job).await;
    };
    let Some(msg) = i
        .messages
        .iter()
        .find(|m| m.id == job.message_id && m.direction == Direction::Outbound)
        .cloned()
    else {
        return drop_job(g, &job).await;
    };
    if msg.status != DeliveryStatus::Queued {
        // Already delivered (or failed) by an earlier attempt.
        return drop_job(g, &job).await;
    }
    let Some(ch) = channel else {
        return finish(
            g,
            &job,
            Err(DeliveryError::permanent(format!(
                "channel {} is no longer configured",
                job.channel_id
            ))),
        )
        .await;
    };
    let kind = ch.config.kind;
    let reply_to = match &msg.reply_to {
        Some(rid) if threaded => i
            .messages
            .iter()
            .find(|m| m.id == *rid)
            .and_then(|m| m.provider_id.clone()),
        Some(rid) => g
            .store
            .interaction_with_message(job.case_number, rid)
            .await?
            .and_then(|q| q.messages.into_iter().find(|m| m.id == *rid))
            .and_then(|m| m.provider_id.clone()),
        None => None,
    };
    // Past the standard window, a channel configured for it sends with the
    // HUMAN_AGENT tag (the window computation says when).
    let tag = g
        .window(&i, Utc::now())
        .and_then(|w| w["tag"].as_str().map(str::to_string));
    let out = OutgoingMessage {
        reply_to,
        tag,
        subject: i.subject.clone(),
        in_reply_to: i
            .messages
            .iter()
            .rev()
            .find(|m| m.direction == Direction::Inbound)
            .and_then(|m| m.provider_id.clone()),
        references: i
            .messages
            .iter()
            .filter(|m| m.id != msg.id)
            .filter_map(|m| m.provider_id.clone())
            .collect(),
        id: msg.id.clone(),
        to: i.digital_id.clone(),
        text: msg.text.clone(),
        html: msg.html.clone(),
        attachments: msg
            .attachments
            .iter()
            .map(|a| OutgoingAttachment {
                id: a.id.clone(),
                filename: a.filename.clone(),
                content_type: a.content_type.clone(),
                size: a.size,
                public_url: g.media_url(
                    i.case_number,
                    &a.id,
                    chrono::Duration::hours(MEDIA_LINK_TTL_HOURS),
                ),
            })
            .collect(),
    };
    let span = tracing::info_span!("deliver", channel = %job.channel_id, kind = %kind, case = job.case_number, attempt = job.attempts + 1);
    let _enter = span.enter();
    let result = ch.outbound.send(&out).await;
    drop(_enter);
    let outcome = finish(g, &job, result).await?;
    g.metrics.delivery(
        kind,
        match outcome {
            Outcome::Sent => "sent",
            Outcome::Retried => "retried",
            _ => "failed",
        },
    );
    Ok(outcome)
}

async fn finish(
    g: &Arc<Gateway>,
    job: &OutboxJob,
    result: Result<crate::adapters::SendReceipt, DeliveryError>,
) -> Result<Outcome, StoreError> {
    match result {
        Ok(receipt) => {
            record(
                g,
                job,
                DeliveryStatus::Sent,
                Some(receipt.provider_id.clone()),
                None,
            )
            .await?;
            // A status callback may have overtaken our own record of the send.
            let pending_key = format!("pending-status:{}:{}", job.channel_id, receipt.provider_id);
            if let Some(p) = g.store.kv_get(&pending_key).await? {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&p) {
                    if let Ok(status) =
                        serde_json::from_value::<DeliveryStatus>(v["status"].clone())
                    {
                        let error = v["error"].as_str().map(str::to_string);
                        let _ = g
                            .apply_delivery(
                                job.case_number,
                                &job.message_id,
                                status,
                                None,
                                error,
                                None,
                            )
                            .await;
                    }
                }
            }
            Ok(Outcome::Sent)
        }
        Err(e) => {
            let age = Utc::now() - job.created_at;
            let give_up =
                chrono::Duration::seconds(g.settings.server.delivery_give_up_seconds as i64);
            if e.needs_reauth {
                g.set_channel_health(&job.channel_id, "needs_reauth").await;
            }
            if e.code.as_deref() == Some(crate::adapters::sms::UNSUBSCRIBED_CODE) {
                let _ = g.mark_opted_out(job.case_number).await;
            }
            if e.is_retryable() && age < give_up {
                let attempts = job.attempts + 1;
                let delay = e.retry_after.unwrap_or_default().max(backoff(attempts));
                let next = OutboxJob {
                    attempts,
                    due_at: Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default(),
                    ..job.clone()
                };
                tracing::info!(error = %e, attempts, delay_ms = delay.as_millis() as u64, "delivery will be retried");
                g.store.outbox_reschedule(&next).await?;
                Ok(Outcome::Retried)
            } else {
                let why = if e.is_retryable() {
                    format!(
                        "gave up after {} attempts: {}",
                        job.attempts + 1,
                        failure_text(&e)
                    )
                } else {
                    failure_text(&e)
                };
                tracing::warn!(error = %why, "delivery failed");
                record(g, job, DeliveryStatus::Failed, None, Some(why)).await?;
                Ok(Outcome::Failed)
            }
        }
    }
}

/// Records a send's result and removes the job, in one commit.
async fn record(
    g: &Gateway,
    job: &OutboxJob,
    status: DeliveryStatus,
    provider_id: Option<String>,
    error: Option<String>,
) -> Result<(), StoreError> {
    for _ in 0..32 {
        let Some(mut i) = g
            .store
            .interaction_with_message(job.case_number, &job.message_id)
            .await?
        else {
            return Ok(());
        };
        let events = i.apply_delivery(
            &job.message_id,
            status,
            provider_id.clone(),
            error.clone(),
            Utc::now(),
        );
        let mut commit = Commit {
            outbox_remove: vec![job.id.clone()],
            ..Commit::default()
        };
        if let Some(pid) = &provider_id {
            commit.index.push(Claim {
                key: format!("out:{}:{pid}", job.channel_id),
                value: format!("{}:{}", job.case_number, job.message_id),
            });
        }
        if !events.is_empty() {
            commit.events = events;
            commit.interaction = Some(i);
        }
        match g.store.commit(commit).await {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Unavailable(
        "too many concurrent changes".into(),
    ))
}
