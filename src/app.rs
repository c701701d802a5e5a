//! The composition root: `Application::build(settings)` opens the store,
//! builds the channels, binds the listener (port 0 works) and starts the
//! workers. `serve` and the black-box tests build the same application.

use crate::adapters::{media::MediaClient, messenger, sms, twitter, whatsapp};
use crate::config::{Backend, Settings};
use crate::domain::{new_secret, ChannelKind};
use crate::gateway::{ChannelRuntime, Gateway};
use crate::http::{self, auth::Tokens, State};
use crate::manifest;
use crate::metrics::Metrics;
use crate::store::{
    embedded::EmbeddedStore, redis::RedisStore, Claim, Commit, DynStore, StoreError,
};
use actix_web::{dev::Server, web, App, HttpServer};
use anyhow::Context;
use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Application {
    port: u16,
    url: String,
    pub gateway: Arc<Gateway>,
    server: Server,
    shutdown: CancellationToken,
    workers: Vec<JoinHandle<()>>,
}

/// Opens the configured store.
pub async fn open_store(settings: &Settings) -> anyhow::Result<DynStore> {
    let retention = Duration::from_secs(settings.routing.retention_hours * 3600);
    Ok(match settings.store.backend {
        Backend::Embedded => {
            EmbeddedStore::open(&settings.store.path, retention).with_context(|| {
                format!(
                    "opening the embedded store at {}",
                    settings.store.path.display()
                )
            })?
        }
        Backend::Redis => RedisStore::connect(
            &settings.store.redis_url,
            &settings.store.key_prefix,
            retention,
        )
        .await
        .with_context(|| format!("connecting to Redis at {}", settings.store.redis_url))?,
    })
}

/// The secret that signs public media links, shared by every process on one store.
async fn media_secret(store: &DynStore) -> anyhow::Result<Vec<u8>> {
    let candidate = new_secret();
    let commit = Commit {
        claims: vec![Claim {
            key: "media-secret".into(),
            value: candidate.clone(),
        }],
        ..Commit::default()
    };
    match store.commit(commit).await {
        Ok(_) => Ok(candidate.into_bytes()),
        Err(StoreError::Duplicate { value, .. }) => Ok(value.into_bytes()),
        Err(e) => Err(e.into()),
    }
}

/// Builds the runtime of every configured channel.
pub fn build_channels(
    settings: &Settings,
    store: &DynStore,
) -> anyhow::Result<HashMap<String, Arc<ChannelRuntime>>> {
    let public_url = settings.server.public_url();
    let mut out = HashMap::new();
    for c in &settings.channels {
        let m = manifest::get(c.kind);
        let runtime = match c.kind {
            ChannelKind::Sms => {
                let adapter = Arc::new(
                    sms::SmsChannel::new(c, &public_url)
                        .map_err(|e| anyhow::anyhow!("channel {}: {e}", c.id))?,
                );
                ChannelRuntime {
                    config: c.clone(),
                    manifest: m,
                    intake: adapter.clone(),
                    outbound: adapter,
                    media: MediaClient::new(c, m, sms::media_credentials(c)),
                    resolver: None,
                }
            }
            ChannelKind::Whatsapp => {
                let adapter =
                    Arc::new(whatsapp::WhatsAppChannel::new(c).map_err(anyhow::Error::msg)?);
                ChannelRuntime {
                    config: c.clone(),
                    manifest: m,
                    intake: adapter.clone(),
                    outbound: adapter.clone(),
                    // Meta's media URLs (lookaside.fbsbx.com) want the bearer token too.
                    media: MediaClient::new(c, m, whatsapp::media_credentials(c))
                        .with_credential_hosts(vec!["lookaside.fbsbx.com".into()]),
                    resolver: Some(adapter),
                }
            }
            ChannelKind::Twitter => {
                let adapter =
                    Arc::new(twitter::XChannel::new(c, store.clone()).map_err(anyhow::Error::msg)?);
                let token: Arc<dyn crate::adapters::media::TokenSource> = adapter.clone();
                ChannelRuntime {
                    config: c.clone(),
                    manifest: m,
                    intake: adapter.clone(),
                    outbound: adapter,
                    // DM media on ton.twitter.com needs the user token, which rotates.
                    media: MediaClient::new(
                        c,
                        m,
                        crate::adapters::media::Credentials::BearerFrom(token),
                    )
                    .with_credential_hosts(vec!["ton.twitter.com".into()]),
                    resolver: None,
                }
            }
            ChannelKind::Facebook | ChannelKind::Instagram => {
                let adapter = Arc::new(
                    messenger::MessengerChannel::new(c)
                        .map_err(|e| anyhow::anyhow!("channel {}: {e}", c.id))?,
                );
                ChannelRuntime {
                    config: c.clone(),
                    manifest: m,
                    intake: adapter.clone(),
                    outbound: adapter,
                    media: MediaClient::new(c, m, messenger::media_credentials(c)),
                    resolver: None,
                }
            }
            ChannelKind::Chat => {
                // The gateway is the provider: uploads are copied into messages
                // from this process's own address (see adapters::chat).
                let adapter = Arc::new(
                    crate::adapters::chat::ChatChannel::new(c, &settings.server.listen)
                        .map_err(anyhow::Error::msg)?,
                );
                ChannelRuntime {
                    config: c.clone(),
                    manifest: m,
                    intake: adapter.clone(),
                    outbound: adapter.clone(),
                    media: adapter.media_client(c, m),
                    resolver: Some(adapter),
                }
            }
            ChannelKind::Email => {
                let adapter = Arc::new(
                    crate::adapters::email::EmailChannel::new(c).map_err(anyhow::Error::msg)?,
                );
                ChannelRuntime {
                    config: c.clone(),
                    manifest: m,
                    intake: adapter.clone(),
                    outbound: adapter,
                    media: MediaClient::new(c, m, crate::adapters::media::Credentials::None),
                    resolver: None,
                }
            }
        };
        out.insert(c.id.clone(), Arc::new(runtime));
    }
    Ok(out)
}

/// `server.pin_workers`: worker threads take the CPUs the process may use
/// in turn, one each, the first time they build their services.
struct WorkerPinning {
    cpus: Vec<core_affinity::CoreId>,
    next: std::sync::atomic::AtomicUsize,
}

thread_local! {
    static PINNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl WorkerPinning {
    fn new() -> WorkerPinning {
        WorkerPinning {
            cpus: core_affinity::get_core_ids().unwrap_or_default(),
            next: Default::default(),
        }
    }

    /// Pins the calling thread to the next CPU, once per thread. Returns the
    /// CPU, or `None` when the thread was pinned before or pinning failed.
    fn pin_this_thread(&self) -> Option<usize> {
        if self.cpus.is_empty() || PINNED.with(|p| p.replace(true)) {
            return None;
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cpu = self.cpus[i % self.cpus.len()];
        if core_affinity::set_for_current(cpu) {
            Some(cpu.id)
        } else {
            tracing::warn!(cpu = cpu.id, "could not pin an HTTP worker to its CPU");
            None
        }
    }
}

impl Application {
    pub async fn build(mut settings: Settings) -> anyhow::Result<Application> {
        let listener = TcpListener::bind(&settings.server.listen)
            .with_context(|| format!("binding {}", settings.server.listen))?;
        let addr = listener.local_addr()?;
        let url = format!("http://{addr}");
        settings.server.listen = addr.to_string();
        if settings.server.public_url.is_none() {
            settings.server.public_url = Some(url.clone());
        }
        // The demo's SMTP sink, on a free loopback port, for its email channels.
        let smtp_sink = if settings.demo {
            let sink = crate::demo_smtp::SmtpSink::bind("127.0.0.1:0")
                .context("binding the demo SMTP sink")?;
            crate::demo::point_at_sandbox(&mut settings, Some(sink.local_addr()));
            Some(sink)
        } else {
            None
        };
        let sink_log = smtp_sink.as_ref().map(|s| web::Data::from(s.log()));
        let settings = settings.validate()?;
        if settings.channels.iter().any(|c| c.kind == ChannelKind::Sms) {
            // The phone-number metadata before the first webhook, not inside
            // it. Validation has already parsed each channel's own phone
            // number (`from`), which compiled the patterns of its country,
            // where most customers write from; a channel sending from a
            // short code, a sender ID or a messaging service has none.
            tokio::task::spawn_blocking(crate::domain::PhoneNumber::load_metadata).await?;
        }
        let store = open_store(&settings).await?;
        let media_secret = media_secret(&store).await?;
        let channels = build_channels(&settings, &store)?;
        let gateway = Arc::new(Gateway {
            settings: Arc::new(settings.clone()),
            store,
            channels,
            metrics: Metrics::new(),
            outbox_wake: Notify::new(),
            media_secret,
        });
        let shutdown = CancellationToken::new();
        let state = web::Data::new(State {
            gateway: gateway.clone(),
            tokens: Tokens::from_settings(&settings),
            shutdown: shutdown.clone(),
        });
        let demo = settings.demo;
        let pinning = settings
            .server
            .pin_workers
            .then(|| Arc::new(WorkerPinning::new()));
        let workers = settings.server.workers;
        let server = HttpServer::new(move || {
            // Called on each worker thread as it builds its services.
            if let Some(p) = &pinning {
                p.pin_this_thread();
            }
            let app = App::new()
                .app_data(state.clone())
                .app_data(web::PayloadConfig::new(2 * 1024 * 1024))
                .wrap(tracing_actix())
                .configure(|cfg| {
                    let ids: Vec<&str> =
                        state.gateway.channels.keys().map(String::as_str).collect();
                    http::configure(cfg, &ids)
                })
                .default_service(web::to(http::no_route));
            if demo {
                let app = match &sink_log {
                    Some(log) => app.app_data(log.clone()),
                    None => app,
                };
                app.configure(crate::demo::configure_sandbox)
            } else {
                app
            }
        })
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(10)
        .listen(listener)?
        .run();

        let mut workers = vec![tokio::spawn(crate::outbox::run(
            gateway.clone(),
            shutdown.clone(),
        ))];
        if let Some(sink) = smtp_sink {
            workers.push(tokio::spawn(sink.run(shutdown.clone())));
        }
        let owner = crate::domain::new_id();
        // IMAP polling of every email channel with `imap` (one poller per
        // mailbox across processes: each holds a lease in the store).
        for c in &settings.channels {
            if c.kind != ChannelKind::Email {
                continue;
            }
            if let Some(imap) = crate::adapters::email::imap::ImapSettings::from_config(c)
                .map_err(|p| anyhow::anyhow!(p.join("\n")))?
            {
                let poller = crate::adapters::email::imap::Poller::new(
                    gateway.clone(),
                    c,
                    imap,
                    owner.clone(),
                    shutdown.clone(),
                )
                .map_err(anyhow::Error::msg)?;
                workers.push(tokio::spawn(poller.run()));
            }
        }
        for (i, sink) in settings.event_sinks.iter().enumerate() {
            workers.push(tokio::spawn(crate::routing::run_sink(
                gateway.clone(),
                i,
                sink.clone(),
                owner.clone(),
                shutdown.clone(),
            )));
        }
        Ok(Application {
            port: addr.port(),
            url,
            gateway,
            server,
            shutdown,
            workers,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A token that stops the application when cancelled (as SIGTERM does).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until SIGTERM/SIGINT or the shutdown token, then drains:
    /// stops accepting, finishes in-flight requests and the delivery in progress.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let token = self.shutdown.clone();
        let stopper = tokio::spawn(async move {
            wait_for_signal(&token).await;
            token.cancel();
            handle.stop(true).await;
        });
        self.server.await?;
        self.shutdown.cancel();
        for w in self.workers {
            let _ = w.await;
        }
        stopper.abort();
        Ok(())
    }
}

async fn wait_for_signal(token: &CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
            _ = token.cancelled() => {}
        }
    }
    #[cfg(not(unix))]
    {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = token.cancelled() => {}
        }
    }
}

/// One log line per HTTP request: method, path (never the query, which may
/// carry a web chat token), status and time.
fn tracing_actix() -> actix_web::middleware::Logger {
    actix_web::middleware::Logger::new("%m %U %s %Dms").log_target("switchboard::http")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// If this fails, `server.pin_workers` leaves workers free to pile up on
    /// one CPU, or pins a worker again (to another CPU) each time it builds
    /// its services.
    #[test]
    fn worker_threads_take_the_cpus_in_turn_once_each() {
        let pinning = Arc::new(WorkerPinning::new());
        let cpus: Vec<usize> = pinning.cpus.iter().map(|c| c.id).collect();
        assert!(!cpus.is_empty(), "no CPU to run on");
        for i in 0..cpus.len() + 1 {
            let p = pinning.clone();
            let (first, again, allowed) = std::thread::spawn(move || {
                let first = p.pin_this_thread();
                let again = p.pin_this_thread();
                let allowed: Vec<usize> = core_affinity::get_core_ids()
                    .unwrap_or_default()
                    .iter()
                    .map(|c| c.id)
                    .collect();
                (first, again, allowed)
            })
            .join()
            .unwrap();
            let cpu = cpus[i % cpus.len()];
            assert_eq!(first, Some(cpu), "worker {i}");
            assert_eq!(again, None, "worker {i} was pinned twice");
            assert_eq!(allowed, vec![cpu], "worker {i} may still run elsewhere");
        }
    }
}
