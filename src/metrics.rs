//! Prometheus metrics. Labels come from closed sets (channel kind, outcome,
//! reason), never from raw IDs, so cardinality stays bounded.

use crate::domain::ChannelKind;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    received: IntCounterVec,
    rejected: IntCounterVec,
    deduplicated: IntCounterVec,
    webhook_seconds: HistogramVec,
    deliveries: IntCounterVec,
    pub outbox_depth: IntGauge,
    channels_unhealthy: prometheus::IntGaugeVec,
    email_quarantined: IntCounterVec,
    imap_errors: prometheus::IntCounter,
    files_stored: IntCounterVec,
    file_bytes_stored: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let received = IntCounterVec::new(
            Opts::new(
                "switchboard_webhooks_received_total",
                "Webhooks received, by channel kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let rejected = IntCounterVec::new(
            Opts::new(
                "switchboard_webhooks_rejected_total",
                "Webhooks refused, by channel kind and reason",
            ),
            &["kind", "reason"],
        )
        .expect("valid metric");
        let deduplicated = IntCounterVec::new(
            Opts::new(
                "switchboard_webhooks_deduplicated_total",
                "Provider messages received again (retries) and not stored twice",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let webhook_seconds = HistogramVec::new(
            HistogramOpts::new(
                "switchboard_webhook_duration_seconds",
                "Time from a webhook's body read to its answer being ready (verify, normalize, durable store), by channel kind",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ]),
            &["kind"],
        )
        .expect("valid metric");
        let deliveries = IntCounterVec::new(
            Opts::new(
                "switchboard_deliveries_total",
                "Outbound delivery attempts, by channel kind and outcome",
            ),
            &["kind", "outcome"],
        )
        .expect("valid metric");
        let channels_unhealthy = prometheus::IntGaugeVec::new(
            Opts::new(
                "switchboard_channels_unhealthy",
                "Channels in a health state other than ok (e.g. needs_reauth), by kind and state",
            ),
            &["kind", "state"],
        )
        .expect("valid metric");
        let email_quarantined = IntCounterVec::new(
            Opts::new(
                "switchboard_email_quarantined_total",
                "Polled emails that could not be stored and were quarantined, by reason (unparsable, refused, too_large)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let imap_errors = prometheus::IntCounter::new(
            "switchboard_imap_errors_total",
            "IMAP connections or sessions that failed (the poller reconnects with backoff)",
        )
        .expect("valid metric");
        let files_stored = IntCounterVec::new(
            Opts::new(
                "switchboard_files_stored_total",
                "Files put in the attachment store, by source (inbound, raw_email, agent, chat_visitor, quarantine)",
            ),
            &["source"],
        )
        .expect("valid metric");
        let file_bytes_stored = IntCounterVec::new(
            Opts::new(
                "switchboard_file_bytes_stored_total",
                "Bytes put in the attachment store, by source (as switchboard_files_stored_total)",
            ),
            &["source"],
        )
        .expect("valid metric");
        let outbox_depth =
            IntGauge::new("switchboard_outbox_depth", "Replies waiting in the outbox")
                .expect("valid metric");
        for c in [
            &received,
            &rejected,
            &deduplicated,
            &deliveries,
            &email_quarantined,
            &files_stored,
            &file_bytes_stored,
        ] {
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
        }
        registry
            .register(Box::new(webhook_seconds.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(outbox_depth.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(imap_errors.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(channels_unhealthy.clone()))
            .expect("unique metric");
        // The process's own resident memory, CPU time and open files: the
        // embedded store keeps its whole history in memory, so memory is
        // what an operator sizes the machine by.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        Metrics {
            registry,
            received,
            rejected,
            deduplicated,
            webhook_seconds,
            deliveries,
            outbox_depth,
            channels_unhealthy,
            email_quarantined,
            imap_errors,
            files_stored,
            file_bytes_stored,
        }
    }

    /// `reason`: `unparsable`, `refused` or `too_large`.
    pub fn email_quarantined(&self, reason: &'static str) {
        self.email_quarantined.with_label_values(&[reason]).inc();
    }
    pub fn imap_error(&self) {
        self.imap_errors.inc();
    }

    /// A file put in the attachment store. `source`: `inbound` (a
    /// customer's media or email attachment), `raw_email` (a message kept as
    /// received), `agent` (a reply's attachment), `chat_visitor` (a web chat
    /// upload) or `quarantine` (mail that could not be stored).
    pub fn file_stored(&self, source: &'static str, bytes: usize) {
        self.files_stored.with_label_values(&[source]).inc();
        self.file_bytes_stored
            .with_label_values(&[source])
            .inc_by(bytes as u64);
    }

    pub fn webhook_received(&self, kind: ChannelKind) {
        self.received.with_label_values(&[kind.as_str()]).inc();
    }
    pub fn webhook_rejected(&self, kind: ChannelKind, reason: &'static str) {
        self.rejected
            .with_label_values(&[kind.as_str(), reason])
            .inc();
    }
    pub fn webhook_deduplicated(&self, kind: ChannelKind) {
        self.deduplicated.with_label_values(&[kind.as_str()]).inc();
    }
    /// How long the gateway took over one webhook, whatever its answer.
    pub fn webhook_duration(&self, kind: ChannelKind, took: std::time::Duration) {
        self.webhook_seconds
            .with_label_values(&[kind.as_str()])
            .observe(took.as_secs_f64());
    }
    /// `outcome`: `sent`, `retried`, `failed`.
    pub fn delivery(&self, kind: ChannelKind, outcome: &'static str) {
        self.deliveries
            .with_label_values(&[kind.as_str(), outcome])
            .inc();
    }

    /// Sets how many channels of a kind are in an unhealthy `state` (`needs_reauth`, ...).
    pub fn set_unhealthy(&self, kind: ChannelKind, state: &'static str, count: i64) {
        self.channels_unhealthy
            .with_label_values(&[kind.as_str(), state])
            .set(count);
    }

    pub fn render(&self) -> String {
        let mut buf = vec![];
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}
