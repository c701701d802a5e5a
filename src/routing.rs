//! The routing feed's push side: event sinks.
//!
//! Every configured sink receives every event, in order, as the body of a
//! POST signed with the Standard Webhooks scheme: `webhook-id` (the event
//! ID, the same on every retry), `webhook-timestamp` and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`
//! keyed with the base64-decoded secret after `whsec_`.
//!
//! Each sink has a cursor in the store (the last event it acknowledged)
//! and a lease, so with several processes exactly one delivers to it. A
//! failing sink is retried with exponential backoff; an event it has
//! refused for longer than [`GIVE_UP`] is skipped so one poison event cannot
//! stop the feed for good.

use crate::config::SinkConfig;
use crate::domain::Event;
use crate::gateway::Gateway;
use base64::Engine;
use hmac::{Hmac, Mac};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long one event is retried before it is skipped.
pub const GIVE_UP: Duration = Duration::from_secs(25 * 3600);

/// The HMAC key of a Standard Webhooks secret (`whsec_` + base64).
pub fn sink_key(secret: &str) -> Option<Vec<u8>> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .filter(|k| !k.is_empty())
}

/// `v1,<signature>` for a message, as Standard Webhooks defines it.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

fn cursor_key(index: usize, sink: &SinkConfig) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(sink.url.as_bytes());
    format!("sink-cursor:{index}:{}", hex::encode(&h[..8]))
}

/// Posts one event; Ok when the sink answered 2xx.
pub async fn post_event(
    http: &reqwest::Client,
    sink: &SinkConfig,
    key: &[u8],
    e: &Event,
) -> Result<(), String> {
    let body = serde_json::to_vec(e).expect("events serialize");
    let ts = chrono::Utc::now().timestamp();
    let resp = http
        .post(&sink.url)
        .header("content-type", "application/json")
        .header("webhook-id", &e.id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sign(key, &e.id, ts, &body))
        .body(body)
        .send()
        .await
        .map_err(|err| format!("sink unreachable: {err}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("sink answered {}", resp.status()))
    }
}

/// Delivers events to one sink until `shutdown`.
pub async fn run_sink(
    g: Arc<Gateway>,
    index: usize,
    sink: SinkConfig,
    owner: String,
    shutdown: CancellationToken,
) {
    let Some(key) = sink_key(&sink.secret) else {
        tracing::error!(
            sink = index,
            "event sink secret is not valid base64; sink disabled"
        );
        return;
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("a client");
    let cursor_name = cursor_key(index, &sink);
    let lease_name = format!("sink-lease:{index}");
    let mut rx = g.store.subscribe();
    let mut failures: u32 = 0;
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        let mut idle = true;
        if let Ok(true) = g
            .store
            .try_lease(&lease_name, &owner, Duration::from_secs(30))
            .await
        {
            let cursor = g.store.kv_get(&cursor_name).await.ok().flatten();
            match g.store.events_after(cursor.as_deref(), 50).await {
                Ok(events) => {
                    for e in events {
                        match post_event(&http, &sink, &key, &e).await {
                            Ok(()) => {
                                failures = 0;
                                failing_since = None;
                                let _ = g.store.kv_set(&cursor_name, &e.id).await;
                                idle = false;
                            }
                            Err(err) => {
                                let since =
                                    *failing_since.get_or_insert_with(std::time::Instant::now);
                                if since.elapsed() > GIVE_UP {
                                    tracing::error!(sink = index, event = %e.id, error = %err, "event skipped after retrying for 25 hours");
                                    let _ = g.store.kv_set(&cursor_name, &e.id).await;
                                    failing_since = None;
                                    failures = 0;
                                    idle = false;
                                    continue;
                                }
                                failures += 1;
                                let delay = crate::outbox::backoff(failures);
                                tracing::warn!(sink = index, event = %e.id, error = %err, retry_in_ms = delay.as_millis() as u64, "event sink failed");
                                tokio::select! {
                                    _ = shutdown.cancelled() => return,
                                    _ = tokio::time::sleep(delay) => {}
                                }
                                break;
                            }
                        }
                    }
                }
                Err(err) => tracing::warn!(error = %err, "event sink could not read the feed"),
            }
        }
        if idle {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = rx.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks reference vector (standard-webhooks spec,
    /// libraries' shared test): a receiver using any official library must
    /// accept our signatures.
    #[test]
    fn signature_matches_the_standard_webhooks_vector() {
        let key = sink_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
