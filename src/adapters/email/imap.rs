//! IMAP polling of an email channel's mailbox (providers.md A7.1).
//!
//! - The mailbox is opened with `EXAMINE` (read-only) and messages are read
//!   with `BODY.PEEK[]`: polling never sets `\Seen`, never stores flags,
//!   never moves or expunges (CONTRACT "Providers").
//! - A durable cursor per channel, `(mailbox, UIDVALIDITY, last UID stored)`,
//!   is kept in the store's kv and moves only after the gateway's commit of
//!   the message returned (so a crash re-reads at most what was not yet
//!   acknowledged, and the `msg:{channel}:{Message-ID}` claim dedupes it).
//! - When UIDVALIDITY changes (the mailbox was recreated or migrated), the
//!   whole mailbox is read again; Message-ID dedupe keeps it from doubling.
//! - A message that cannot be parsed or stored is tried [`MAX_ATTEMPTS`]
//!   times (counted in the store, across restarts), then quarantined: its
//!   raw bytes go to the blob store with a kv record, a log line and
//!   `switchboard_email_quarantined_total`, and the cursor moves past it.
//!   Messages behind a failing one are stored meanwhile; only the cursor
//!   waits.
//! - IDLE where the server offers it (re-issued every [`LEASE_RENEW`]),
//!   else a poll every `poll_seconds`.
//! - A connection, login or session failure is retried with backoff, counted
//!   in `switchboard_imap_errors_total` and shown as the channel's health
//!   `imap_failing` (in `/readyz`) until a pass succeeds again.
//! - One poller per mailbox across processes: on Redis it holds the store
//!   lease `imap:{channel}` while it works and renews it. The embedded store
//!   is one process by construction (its file is locked), so it needs none
//!   and a restarted gateway resumes at once.

use super::EmailChannel;
use crate::config::ChannelConfig;
use crate::domain::new_id;
use crate::gateway::Gateway;
use async_imap::Session;
use futures_util::TryStreamExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

/// Failed attempts at one message before it is quarantined.
pub const MAX_ATTEMPTS: u32 = 3;
/// How long the poller's lease lasts without renewal (after a crash, another
/// process takes the mailbox over at most this late).
pub const LEASE_TTL: Duration = Duration::from_secs(20);
/// How often the lease is renewed (and IDLE re-issued).
pub const LEASE_RENEW: Duration = Duration::from_secs(5);
/// Longest wait for one IMAP command or the connection.
const OP_TIMEOUT: Duration = Duration::from_secs(60);
/// Wait before retrying a message that failed (it is retried sooner than
/// the next poll so a transient failure costs little).
const RETRY_DELAY: Duration = Duration::from_millis(500);
/// The channel health while the mailbox cannot be polled.
pub const IMAP_FAILING: &str = "imap_failing";
/// How long a shutdown waits for the message in hand.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Most quarantine records listed under `email-quarantine:{channel}`.
const QUARANTINE_LIST_MAX: usize = 1000;

/// How the connection to the IMAP server is secured (`imap.tls`). Both TLS
/// kinds check the server's certificate against the web PKI roots (and
/// `imap.ca_file`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImapTls {
    /// TLS from the first byte (port 993): `true` or `"tls"`.
    Implicit,
    /// A plain connection upgraded with `STARTTLS` before anything else is
    /// said (port 143): `"starttls"`.
    StartTls,
    /// No TLS, for a server on the same host (and tests): `false` or `"none"`.
    None,
}

/// `imap = {host, port, tls, username, password, mailbox, poll_seconds}`.
#[derive(Clone, PartialEq)]
pub struct ImapSettings {
    pub host: String,
    pub port: u16,
    pub tls: ImapTls,
    pub username: String,
    pub password: String,
    pub mailbox: String,
    pub poll_seconds: u64,
    /// Certificates (PEM) trusted besides the web PKI roots, for a mail
    /// server with a private CA (`imap.ca_file`).
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// Reads the certificates of a PEM file.
pub(crate) fn read_roots(
    path: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path}: not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path}: no certificate in it"));
    }
    Ok(certs)
}

impl std::fmt::Debug for ImapSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("mailbox", &self.mailbox)
            .field("poll_seconds", &self.poll_seconds)
            .finish_non_exhaustive()
    }
}

impl ImapSettings {
    /// Reads the channel's `imap` table; `None` when the channel has none
    /// (mail then arrives over HTTP only). Every problem is listed.
    pub fn from_config(cfg: &ChannelConfig) -> Result<Option<ImapSettings>, Vec<String>> {
        let Some(v) = cfg.settings.get("imap") else {
            return Ok(None);
        };
        let id = &cfg.id;
        let Some(t) = v.as_table() else {
            return Err(vec![format!(
                "channel {id}: imap: must be a table {{host, port, tls, username, password, mailbox, poll_seconds}}"
            )]);
        };
        let mut problems = vec![];
        for k in t.keys() {
            if ![
                "host",
                "port",
                "tls",
                "username",
                "password",
                "mailbox",
                "poll_seconds",
                "ca_file",
            ]
            .contains(&k.as_str())
            {
                problems.push(format!("channel {id}: imap.{k}: unknown key"));
            }
        }
        let mut text = |k: &str, required: bool| -> Option<String> {
            match t.get(k) {
                Some(toml::Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
                Some(toml::Value::String(_)) | None => {
                    if required {
                        problems.push(format!("channel {id}: imap.{k}: missing"));
                    }
                    None
                }
                Some(_) => {
                    problems.push(format!("channel {id}: imap.{k}: must be a string"));
                    None
                }
            }
        };
        let host = text("host", true);
        let username = text("username", true);
        let password = text("password", true);
        let mailbox = text("mailbox", false).unwrap_or_else(|| "INBOX".into());
        let ca_file = text("ca_file", false);
        let extra_roots = match ca_file.as_deref().map(read_roots) {
            None => vec![],
            Some(Ok(certs)) => certs,
            Some(Err(e)) => {
                problems.push(format!("channel {id}: imap.ca_file: {e}"));
                vec![]
            }
        };
        const TLS_CHOICES: &str =
            "use true (implicit TLS, port 993), \"starttls\" (port 143) or false";
        let tls = match t.get("tls") {
            None | Some(toml::Value::Boolean(true)) => ImapTls::Implicit,
            Some(toml::Value::Boolean(false)) => ImapTls::None,
            Some(toml::Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                "tls" | "implicit" | "ssl" => ImapTls::Implicit,
                "starttls" => ImapTls::StartTls,
                "none" | "plain" | "off" => ImapTls::None,
                other => {
                    problems.push(format!("channel {id}: imap.tls: {other}: {TLS_CHOICES}"));
                    ImapTls::Implicit
                }
            },
            Some(_) => {
                problems.push(format!("channel {id}: imap.tls: {TLS_CHOICES}"));
                ImapTls::Implicit
            }
        };
        let port = match t.get("port") {
            None => Some(if tls == ImapTls::Implicit { 993 } else { 143 }),
            Some(p) => {
                let port = p
                    .as_integer()
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p > 0);
                if port.is_none() {
                    problems.push(format!("channel {id}: imap.port: not a port number"));
                }
                port
            }
        };
        let poll_seconds = match t.get("poll_seconds") {
            None => Some(60),
            Some(p) => {
                let s = p
                    .as_integer()
                    .filter(|s| (1..=86_400).contains(s))
                    .map(|s| s as u64);
                if s.is_none() {
                    problems.push(format!(
                        "channel {id}: imap.poll_seconds: a whole number of seconds from 1 to 86400"
                    ));
                }
                s
            }
        };
        match (host, username, password, port, poll_seconds) {
            (Some(host), Some(username), Some(password), Some(port), Some(poll_seconds))
                if problems.is_empty() =>
            {
                Ok(Some(ImapSettings {
                    host,
                    port,
                    tls,
                    username,
                    password,
                    mailbox,
                    poll_seconds,
                    extra_roots,
                }))
            }
            _ => Err(problems),
        }
    }
}

/// The connection: plain TCP or implicit TLS.
pub enum ImapStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl std::fmt::Debug for ImapStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImapStream::Plain(_) => "ImapStream::Plain",
            ImapStream::Tls(_) => "ImapStream::Tls",
        })
    }
}

impl AsyncRead for ImapStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ImapStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

pub type ImapSession = Session<ImapStream>;

fn tls_config(s: &ImapSettings) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for c in &s.extra_roots {
        roots
            .add(c.clone())
            .map_err(|e| format!("imap.ca_file: {e}"))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: no answer within {} s",
            OP_TIMEOUT.as_secs()
        )),
    }
}

async fn tls_handshake(
    s: &ImapSettings,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let name = rustls::pki_types::ServerName::try_from(s.host.clone())
        .map_err(|e| format!("imap.host {}: {e}", s.host))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(s)?));
    timed("TLS handshake", connector.connect(name, tcp)).await
}

/// A client over `stream`, once the server's greeting has been read.
async fn greeted<T>(stream: T) -> Result<async_imap::Client<T>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + std::fmt::Debug + Send,
{
    let mut client = async_imap::Client::new(stream);
    match timed("reading the greeting", client.read_response()).await? {
        Some(_) => Ok(client),
        None => Err("the server closed the connection before its greeting".into()),
    }
}

/// Connects and logs in.
pub async fn connect(s: &ImapSettings) -> Result<ImapSession, String> {
    let tcp = timed("connecting", TcpStream::connect((s.host.as_str(), s.port))).await?;
    let client = match s.tls {
        ImapTls::Implicit => {
            let tls = tls_handshake(s, tcp).await?;
            greeted(ImapStream::Tls(Box::new(tls))).await?
        }
        ImapTls::None => greeted(ImapStream::Plain(tcp)).await?,
        ImapTls::StartTls => {
            let mut plain = greeted(tcp).await?;
            timed("STARTTLS", plain.run_command_and_check_ok("STARTTLS", None)).await?;
            // Anything the server sent after its OK stays behind with the
            // plain client: from here on only the TLS stream is read (no
            // plaintext injected before the handshake is taken as an answer).
            let tls = tls_handshake(s, plain.into_inner()).await?;
            // No greeting follows STARTTLS.
            async_imap::Client::new(ImapStream::Tls(Box::new(tls)))
        }
    };
    match tokio::time::timeout(OP_TIMEOUT, client.login(&s.username, &s.password)).await {
        Ok(Ok(session)) => Ok(session),
        Ok(Err((e, _))) => Err(format!("login as {}: {e}", s.username)),
        Err(_) => Err("login: no answer".into()),
    }
}

/// Where polling stands: the last UID stored under one UIDVALIDITY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub mailbox: String,
    pub uid_validity: u32,
    pub last_uid: u32,
}

impl Cursor {
    fn encode(&self) -> String {
        serde_json::json!({"mailbox": self.mailbox, "uid_validity": self.uid_validity, "last_uid": self.last_uid})
            .to_string()
    }
    fn decode(s: &str) -> Option<Cursor> {
        let v: serde_json::Value = serde_json::from_str(s).ok()?;
        Some(Cursor {
            mailbox: v["mailbox"].as_str()?.to_string(),
            uid_validity: u32::try_from(v["uid_validity"].as_u64()?).ok()?,
            last_uid: u32::try_from(v["last_uid"].as_u64()?).ok()?,
        })
    }
}

pub fn cursor_key(channel_id: &str) -> String {
    format!("imap-cursor:{channel_id}")
}

pub fn quarantine_list_key(channel_id: &str) -> String {
    format!("email-quarantine:{channel_id}")
}

/// The records of the mail channel `channel_id`'s poller quarantined,
/// oldest first (at most [`QUARANTINE_LIST_MAX`]).
pub async fn quarantined(
    store: &crate::store::DynStore,
    channel_id: &str,
) -> crate::store::StoreResult<Vec<serde_json::Value>> {
    Ok(store
        .kv_get(&quarantine_list_key(channel_id))
        .await?
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default())
}

fn attempts_key(channel_id: &str, c: &Cursor, uid: u32) -> String {
    format!(
        "imap-attempts:{channel_id}:{}:{}:{uid}",
        c.mailbox, c.uid_validity
    )
}

/// The stored cursor of a channel, if any.
pub async fn load_cursor(g: &Gateway, channel_id: &str) -> Result<Option<Cursor>, String> {
    Ok(g.store
        .kv_get(&cursor_key(channel_id))
        .await
        .map_err(|e| e.to_string())?
        .and_then(|s| Cursor::decode(&s)))
}

/// What became of one message.
enum Outcome {
    /// Stored (or already there): the cursor may move past it.
    Done,
    /// Failed this time; to be tried again.
    Failed,
}

/// The poller of one channel's mailbox. Runs until `shutdown`.
pub struct Poller {
    gateway: Arc<Gateway>,
    channel: Arc<EmailChannel>,
    channel_id: String,
    settings: ImapSettings,
    owner: String,
    shutdown: CancellationToken,
}

impl Poller {
    pub fn new(
        gateway: Arc<Gateway>,
        cfg: &ChannelConfig,
        settings: ImapSettings,
        owner: String,
        shutdown: CancellationToken,
    ) -> Result<Poller, String> {
        Ok(Poller {
            gateway,
            channel: Arc::new(EmailChannel::new(cfg)?),
            channel_id: cfg.id.clone(),
            settings,
            owner,
            shutdown,
        })
    }

    fn lease_name(&self) -> String {
        format!("imap:{}", self.channel_id)
    }

    /// Only a shared store (Redis) has other processes to keep out.
    fn needs_lease(&self) -> bool {
        self.gateway.settings.store.backend != crate::config::Backend::Embedded
    }

    async fn hold_lease(&self) -> bool {
        if !self.needs_lease() {
            return true;
        }
        matches!(
            self.gateway
                .store
                .try_lease(&self.lease_name(), &self.owner, LEASE_TTL)
                .await,
            Ok(true)
        )
    }

    async fn renew(&self) -> Result<(), String> {
        if self.hold_lease().await {
            Ok(())
        } else {
            Err("the polling lease went to another process (or the store is unreachable)".into())
        }
    }

    /// Sleeps `d`, or less when shutting down; false on shutdown.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    pub async fn run(self) {
        let mut failures = 0u32;
        tracing::info!(channel = %self.channel_id, host = %self.settings.host, mailbox = %self.settings.mailbox, "IMAP polling starts");
        while !self.shutdown.is_cancelled() {
            if !self.hold_lease().await {
                // Another process polls this mailbox (or the store is down).
                if !self.pause(LEASE_RENEW).await {
                    break;
                }
                continue;
            }
            let started = tokio::time::Instant::now();
            // Shutdown is noticed between messages and in every wait; a
            // network call that hangs gets a short grace, then is dropped
            // (the cursor has not moved past what it was doing).
            let session = self.session();
            tokio::pin!(session);
            let result = tokio::select! {
                r = &mut session => r,
                _ = async {
                    self.shutdown.cancelled().await;
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                } => Ok(()),
            };
            match result {
                Ok(()) => break,
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(60) {
                        failures = 0;
                    }
                    failures += 1;
                    // Shown in /readyz and the agents' channel list until a
                    // pass succeeds again (a needs_reauth stays as it is).
                    if self.gateway.channel_health(&self.channel_id).await == "ok" {
                        self.gateway
                            .set_channel_health(&self.channel_id, IMAP_FAILING)
                            .await;
                    }
                    self.gateway.metrics.imap_error();
                    let delay = crate::outbox::backoff(failures)
                        .min(Duration::from_secs(self.settings.poll_seconds.max(5)));
                    tracing::warn!(channel = %self.channel_id, error = %e, retry_in_ms = delay.as_millis() as u64, "IMAP polling failed");
                    if !self.pause(delay).await {
                        break;
                    }
                }
            }
        }
        tracing::info!(channel = %self.channel_id, "IMAP polling stopped");
    }

    /// One connection: passes over the mailbox until shutdown (`Ok`) or an
    /// error (`Err`, reconnect).
    async fn session(&self) -> Result<(), String> {
        let mut session = connect(&self.settings).await?;
        let caps = timed("CAPABILITY", session.capabilities()).await?;
        let idle = caps.has_str("IDLE");
        let wait = Duration::from_secs(self.settings.poll_seconds);
        let mut healthy = false;
        loop {
            if self.shutdown.is_cancelled() {
                let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
                return Ok(());
            }
            let pending = self.pass(&mut session).await?;
            if !healthy {
                healthy = true;
                if self.gateway.channel_health(&self.channel_id).await == IMAP_FAILING {
                    self.gateway
                        .set_channel_health(&self.channel_id, "ok")
                        .await;
                }
            }
            if self.shutdown.is_cancelled() {
                continue;
            }
            self.renew().await?;
            if pending {
                self.pause(RETRY_DELAY).await;
            } else if idle {
                // Without a lease to renew, IDLE waits the whole poll interval
                // (servers drop IDLE after about 30 minutes).
                let most = if self.needs_lease() {
                    LEASE_RENEW
                } else {
                    Duration::from_secs(25 * 60)
                };
                session = self.idle(session, wait.min(most)).await?;
            } else {
                // A plain poll: sleep `poll_seconds`, renewing the lease meanwhile.
                let until = tokio::time::Instant::now() + wait;
                loop {
                    let left = until.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() || !self.pause(left.min(LEASE_RENEW)).await {
                        break;
                    }
                    self.renew().await?;
                }
            }
        }
    }

    /// Waits for news with IDLE, at most `wait` (or until shutdown).
    async fn idle(&self, session: ImapSession, wait: Duration) -> Result<ImapSession, String> {
        let mut handle = session.idle();
        timed("IDLE", handle.init()).await?;
        let result = {
            let (fut, _stop) = handle.wait_with_timeout(wait);
            tokio::select! {
                r = fut => Some(r),
                _ = self.shutdown.cancelled() => None,
            }
        };
        if let Some(Err(e)) = result {
            return Err(format!("IDLE: {e}"));
        }
        timed("DONE", handle.done()).await
    }

    /// Reads every message past the cursor. Answers whether a failed
    /// message waits for another try.
    async fn pass(&self, session: &mut ImapSession) -> Result<bool, String> {
        let g = &self.gateway;
        let mailbox = timed("EXAMINE", session.examine(self.settings.mailbox.as_str())).await?;
        let uid_validity = mailbox
            .uid_validity
            .ok_or("the server gave no UIDVALIDITY: it does not support UIDs")?;
        let stored = load_cursor(g, &self.channel_id).await?;
        let mut cursor = match stored {
            Some(c) if c.mailbox == self.settings.mailbox && c.uid_validity == uid_validity => c,
            other => {
                if let Some(old) = &other {
                    tracing::warn!(channel = %self.channel_id, mailbox = %self.settings.mailbox, old = old.uid_validity, new = uid_validity, "UIDVALIDITY changed (or another mailbox): reading the whole mailbox again; Message-IDs keep it from doubling");
                }
                let c = Cursor {
                    mailbox: self.settings.mailbox.clone(),
                    uid_validity,
                    last_uid: 0,
                };
                self.save(&c).await?;
                c
            }
        };
        if mailbox.exists == 0 || mailbox.uid_next.is_some_and(|n| n <= cursor.last_uid + 1) {
            return Ok(false);
        }
        let listing: Vec<_> = timed("UID FETCH (listing)", async {
            session
                .uid_fetch(format!("{}:*", cursor.last_uid + 1), "(UID RFC822.SIZE)")
                .await?
                .try_collect::<Vec<_>>()
                .await
        })
        .await?;
        let mut todo: Vec<(u32, u32)> = listing
            .iter()
            .filter_map(|f| Some((f.uid?, f.size.unwrap_or(0))))
            .filter(|(uid, _)| *uid > cursor.last_uid)
            .collect();
        todo.sort_unstable();
        todo.dedup();
        let mut pending = false;
        for (uid, size) in todo {
            if self.shutdown.is_cancelled() {
                break;
            }
            let outcome = self.one(session, &cursor, uid, size).await?;
            match outcome {
                Outcome::Done if !pending => {
                    cursor.last_uid = uid;
                    self.save(&cursor).await?;
                }
                Outcome::Done => {}
                Outcome::Failed => pending = true,
            }
        }
        Ok(pending)
    }

    async fn save(&self, c: &Cursor) -> Result<(), String> {
        self.gateway
            .store
            .kv_set(&cursor_key(&self.channel_id), &c.encode())
            .await
            .map_err(|e| format!("saving the cursor: {e}"))
    }

    /// Fetches, parses and stores one message; counts failures and
    /// quarantines after [`MAX_ATTEMPTS`].
    async fn one(
        &self,
        session: &mut ImapSession,
        cursor: &Cursor,
        uid: u32,
        size: u32,
    ) -> Result<Outcome, String> {
        let max = self.gateway.settings.server.max_email_bytes;
        if size as usize > max {
            self.quarantine(
                cursor,
                uid,
                None,
                "too_large",
                &format!("{size} bytes, over server.max_email_bytes ({max})"),
            )
            .await?;
            return Ok(Outcome::Done);
        }
        let fetched: Vec<_> = timed("UID FETCH BODY.PEEK[]", async {
            session
                .uid_fetch(uid.to_string(), "(UID BODY.PEEK[])")
                .await?
                .try_collect::<Vec<_>>()
                .await
        })
        .await?;
        let Some(raw) = fetched
            .iter()
            .find(|f| f.uid == Some(uid))
            .and_then(|f| f.body())
            .map(<[u8]>::to_vec)
        else {
            // Expunged by someone else meanwhile: nothing to store.
            return Ok(Outcome::Done);
        };
        // Parsing a large message is CPU work: off the async workers (and a
        // parser panic counts as a failure of this message, not of the poller).
        let (channel, bytes) = (self.channel.clone(), raw.clone());
        let parsed =
            match tokio::task::spawn_blocking(move || channel.inbound_from_raw(&bytes)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(format!("the parser failed: {e}")),
            };
        let result = match parsed {
            Ok(items) => self
                .gateway
                .receive_direct(&self.channel_id, items)
                .await
                .map(|_| ())
                .map_err(|e| ("refused", e.to_string())),
            Err(e) => Err(("unparsable", e)),
        };
        let (reason, error) = match result {
            Ok(()) => return Ok(Outcome::Done),
            Err(e) => e,
        };
        let key = attempts_key(&self.channel_id, cursor, uid);
        let store = &self.gateway.store;
        let attempts = store
            .kv_get(&key)
            .await
            .map_err(|e| e.to_string())?
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
            + 1;
        if attempts >= MAX_ATTEMPTS {
            self.quarantine(cursor, uid, Some(&raw), reason, &error)
                .await?;
            return Ok(Outcome::Done);
        }
        store
            .kv_set(&key, &attempts.to_string())
            .await
            .map_err(|e| e.to_string())?;
        tracing::warn!(channel = %self.channel_id, uid, attempts, error = %error, "an IMAP message failed; it will be tried again");
        Ok(Outcome::Failed)
    }

    /// Keeps a message that cannot be stored: raw bytes in the blob store,
    /// a kv record, a log line and a metric. Never fetched again.
    async fn quarantine(
        &self,
        cursor: &Cursor,
        uid: u32,
        raw: Option<&[u8]>,
        reason: &'static str,
        error: &str,
    ) -> Result<(), String> {
        let store = &self.gateway.store;
        let blob = match raw {
            Some(bytes) => {
                let id = new_id();
                self.gateway
                    .put_file("quarantine", &id, bytes)
                    .await
                    .map_err(|e| e.to_string())?;
                Some(id)
            }
            None => None,
        };
        let message_id = raw
            .and_then(|r| mailparse::parse_headers(r).ok())
            .and_then(|(h, _)| {
                use mailparse::MailHeaderMap;
                h.get_first_value("Message-ID")
            });
        let record = serde_json::json!({
            "channel": self.channel_id,
            "mailbox": cursor.mailbox,
            "uid_validity": cursor.uid_validity,
            "uid": uid,
            "message_id": message_id,
            "blob": blob,
            "size": raw.map(<[u8]>::len),
            "reason": reason,
            "error": error,
            "at": chrono::Utc::now(),
        });
        let list_key = quarantine_list_key(&self.channel_id);
        let mut list = quarantined(store, &self.channel_id)
            .await
            .map_err(|e| e.to_string())?;
        list.push(record);
        if list.len() > QUARANTINE_LIST_MAX {
            let extra = list.len() - QUARANTINE_LIST_MAX;
            list.drain(..extra);
        }
        store
            .kv_set(&list_key, &serde_json::Value::Array(list).to_string())
            .await
            .map_err(|e| e.to_string())?;
        store
            .kv_set(&attempts_key(&self.channel_id, cursor, uid), "quarantined")
            .await
            .map_err(|e| e.to_string())?;
        self.gateway.metrics.email_quarantined(reason);
        tracing::error!(channel = %self.channel_id, mailbox = %cursor.mailbox, uid, reason, error = %error, blob = blob.as_deref().unwrap_or(""), "an email was quarantined: it is kept but not stored as a message");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(imap: &str) -> ChannelConfig {
        let doc = format!(
            "id = \"mail\"\nkind = \"email\"\nqueue = \"support\"\naddress = \"support@shop.example\"\nimap = {imap}\n"
        );
        toml::from_str(&doc).unwrap()
    }

    #[test]
    fn settings_have_defaults_and_every_problem_is_named() {
        let s = ImapSettings::from_config(&cfg(
            r#"{host = "imap.example.com", username = "u", password = "p"}"#,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            (s.port, s.tls, s.mailbox.as_str(), s.poll_seconds),
            (993, ImapTls::Implicit, "INBOX", 60)
        );
        let s = ImapSettings::from_config(&cfg(
            r#"{host = "127.0.0.1", port = 1143, tls = false, username = "u", password = "p", mailbox = "Support", poll_seconds = 1}"#,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            (s.port, s.tls, s.mailbox.as_str()),
            (1143, ImapTls::None, "Support")
        );
        let s = ImapSettings::from_config(&cfg(
            r#"{host = "imap.example.com", tls = "starttls", username = "u", password = "p"}"#,
        ))
        .unwrap()
        .unwrap();
        assert_eq!((s.port, s.tls), (143, ImapTls::StartTls));
        assert!(!format!("{s:?}").contains("\"p\""), "no password in logs");

        let p = ImapSettings::from_config(&cfg(
            r#"{port = 70000, tls = "maybe", poll_seconds = 0, folder = "x", ca_file = "/nonexistent/ca.pem"}"#,
        ))
        .unwrap_err();
        for want in [
            "imap.host: missing",
            "imap.username: missing",
            "imap.password: missing",
            "imap.port: not a port number",
            "imap.tls: maybe: use true (implicit TLS, port 993), \"starttls\" (port 143) or false",
            "imap.poll_seconds",
            "imap.folder: unknown key",
            "imap.ca_file: cannot read /nonexistent/ca.pem",
        ] {
            assert!(p.iter().any(|l| l.contains(want)), "{want} in {p:?}");
        }
        assert!(p.iter().all(|l| l.starts_with("channel mail: ")), "{p:?}");
        assert!(ImapSettings::from_config(&cfg("\"imap.example.com\"")).is_err());
    }

    #[test]
    fn check_config_lists_imap_problems() {
        let doc = r#"
[[queues]]
id = "support"
name = "Support"
kind = "digital"

[[channels]]
id = "mail"
kind = "email"
queue = "support"
address = "support@shop.example"
imap = { host = "imap.example.com", port = "993", username = "u" }
smtp = { port = 25 }
"#;
        let s = crate::config::Settings::from_toml_with_env(doc, Vec::new()).unwrap();
        let p = s.problems();
        for want in [
            "channel mail: imap.port: not a port number",
            "channel mail: imap.password: missing",
            "channel mail: smtp.host: missing",
        ] {
            assert!(p.iter().any(|l| l == want), "{want} in {p:?}");
        }
    }

    #[test]
    fn the_cursor_round_trips() {
        let c = Cursor {
            mailbox: "INBOX".into(),
            uid_validity: 1_700_000_000,
            last_uid: 42,
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("garbage"), None);
    }
}
