//! `loadgen`: the load generator behind `scripts/bench.sh`.
//!
//! It drives one run against a running gateway and prints one JSON line:
//! `{"name","requests","ok","errors","seconds","rps","p50_ms","p99_ms","max_ms", ...}`.
//!
//! * `--mode healthz`: `GET /healthz`, the baseline.
//! * `--mode sms`: signed Twilio webhooks `POST /webhooks/{channel}`, each with
//!   a distinct, random `MessageSid` (as Twilio's), from a few thousand
//!   distinct senders. They are
//!   built and signed before the clock starts (`simulate_inbound`), so signing
//!   is not in the measured path. With `--same-sid` every copy is the same
//!   webhook (a provider's retry), which stops at the dedupe check.
//! * `--mode fsync`: no HTTP; 8 KiB writes each made durable with `fdatasync`
//!   in `--dir`, the floor under a durable commit on this disk.
//!
//! Two ways to load:
//! * `--concurrency N`: closed loop, N connections each sending its next
//!   request as soon as the previous one is answered, for `--duration` seconds;
//!   latency is from send to the end of the response body.
//! * `--rate R`: open loop, request `i` is due at `start + i / R` whatever
//!   happened before; latency is measured from the due time, so a stall of the
//!   gateway shows up in the figures instead of slowing the generator down
//!   (no coordinated omission).
//!
//! `first_ms` is the latency of the first measured request: with
//! `--warmup 0` against a gateway just started, what its first caller waits.
//!
//! With `--pid`, it also reports the CPU time (user + system, from
//! `/proc/PID/stat`) that process spent per request during the measured window,
//! and always its own CPU time per request, since both share the machine,
//! and how much that process's resident memory grew per request (what the
//! gateway keeps per webhook; on a VM that hands freed memory back to its
//! host, memory taken for the first time is expensive).

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use parking_lot::Mutex;
use reqwest::{Client, Request};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::config::Settings;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// `GET /healthz`: the baseline.
    Healthz,
    /// Signed SMS webhooks.
    Sms,
    /// No HTTP: write 8 KiB into a file in `--dir` and `fdatasync` it, back to
    /// back, for `--duration` seconds. The floor under a durable commit on this disk.
    Fsync,
}

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "Drives a Switchboard gateway and reports rps and latency"
)]
struct Cli {
    /// The gateway's base URL, e.g. http://127.0.0.1:8080 (only local targets make sense).
    #[arg(long, required_unless_present = "dir")]
    url: Option<String>,
    /// `--mode fsync`: the directory to write the probe file in (it is removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, value_enum)]
    mode: Mode,
    /// The run's name in the JSON line.
    #[arg(long)]
    name: Option<String>,
    /// Closed loop with this many connections.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop at this many requests per second.
    #[arg(long)]
    rate: Option<u64>,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Requests sent (and not measured) before the clock starts, to open connections.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// Closed loop, sms: at most this many measured requests (they are built beforehand).
    #[arg(long, default_value_t = 300_000)]
    max_requests: usize,
    /// Open loop: at most this many requests in flight (later ones wait, and their wait counts).
    #[arg(long, default_value_t = 1024)]
    max_inflight: usize,
    /// The gateway's configuration file (sms mode): channel secrets and public_url.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The SMS channel to post to.
    #[arg(long, default_value = "sms-main")]
    channel: String,
    /// The URL Twilio signs (default: server.public_url of --config, else --url).
    #[arg(long)]
    public_url: Option<String>,
    /// Distinct sender numbers (+1 415 555 0000 and up).
    #[arg(long, default_value_t = 4000)]
    senders: usize,
    /// Every webhook with the same MessageSid: all but the first are a provider's
    /// retry, answered after the dedupe check (the cost of the path before the store).
    #[arg(long)]
    same_sid: bool,
    /// The gateway's process id, to report its CPU time per request.
    #[arg(long)]
    pid: Option<u32>,
    /// Another process whose CPU time per request to report (the Redis server).
    #[arg(long)]
    extra_pid: Option<u32>,
    /// Clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Per-request timeout in seconds (a timeout counts as an error).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Also write every measured request as CSV `due_ms,latency_ms,service_ms,ok`
    /// (offsets from the start of the measured window), to look for stalls.
    #[arg(long)]
    samples: Option<PathBuf>,
    /// Worker threads of the generator's runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// What one request came to.
#[derive(Clone, Copy)]
struct Sample {
    /// When it was due (open loop) or sent (closed loop).
    due: Instant,
    /// From the due time (open loop) or the send (closed loop) to the end of the body.
    latency: Duration,
    /// From the send to the end of the body.
    service: Duration,
    ok: bool,
}

/// The requests of a run: built on the fly (healthz) or beforehand (sms).
struct Source {
    client: Client,
    healthz: reqwest::Url,
    prebuilt: Vec<Mutex<Option<Request>>>,
    /// `--same-sid`: the one webhook, copied for every send.
    template: Option<Request>,
}

impl Source {
    fn take(&self, i: usize) -> Option<Request> {
        if let Some(t) = &self.template {
            t.try_clone()
        } else if self.prebuilt.is_empty() {
            self.client.get(self.healthz.clone()).build().ok()
        } else {
            self.prebuilt.get(i).and_then(|slot| slot.lock().take())
        }
    }
}

static ERRORS_SHOWN: AtomicUsize = AtomicUsize::new(0);

fn show_error(what: String) {
    if ERRORS_SHOWN.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!("loadgen: {what}");
    }
}

/// Sends one request and reads the whole answer.
/// The cumulative buckets `(le seconds, count)` of the gateway's SMS webhook
/// duration histogram (`+Inf` last), if it exposes one.
async fn server_histogram(client: &Client, url: &str) -> Option<Vec<(f64, u64)>> {
    let text = client.get(url).send().await.ok()?.text().await.ok()?;
    let mut buckets = vec![];
    for line in text.lines() {
        let Some(rest) =
            line.strip_prefix(r#"switchboard_webhook_duration_seconds_bucket{kind="sms",le=""#)
        else {
            continue;
        };
        let (le, count) = rest.split_once("\"} ")?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        buckets.push((le, count.trim().parse().ok()?));
    }
    (!buckets.is_empty()).then_some(buckets)
}

async fn send(client: &Client, req: Request) -> (bool, Instant) {
    let ok = match client.execute(req).await {
        Ok(resp) => {
            let status = resp.status();
            match resp.bytes().await {
                Ok(_) if status.is_success() => true,
                Ok(body) => {
                    show_error(format!(
                        "{status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(300)])
                    ));
                    false
                }
                Err(e) => {
                    show_error(format!("reading the body: {e}"));
                    false
                }
            }
        }
        Err(e) => {
            show_error(format!("request failed: {e}"));
            false
        }
    };
    (ok, Instant::now())
}

/// User + system CPU time of a process so far, in seconds.
fn cpu_seconds(pid: &str, clk_tck: u64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')' comes field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck as f64)
}

/// Bytes a process has caused to be written to storage so far (`write_bytes`
/// of `/proc/PID/io`).
fn written_bytes(pid: &str) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A process's resident memory (`VmRSS` of `/proc/PID/status`), in KiB.
fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time the whole machine has spent busy so far (all cores), in seconds:
/// the `cpu` line of `/proc/stat` less idle and iowait.
fn machine_busy_seconds(clk_tck: u64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    Some(busy as f64 / clk_tck as f64)
}

/// Builds `count` signed webhooks, each with its own MessageSid.
fn build_sms(
    cli: &Cli,
    base: &str,
    client: &Client,
    count: usize,
) -> anyhow::Result<Vec<Mutex<Option<Request>>>> {
    let path = cli
        .config
        .as_ref()
        .context("--mode sms needs --config (the gateway's configuration file)")?;
    let settings = Settings::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ch = settings
        .channel(&cli.channel)
        .with_context(|| format!("no channel {} in {}", cli.channel, path.display()))?
        .clone();
    let base = base.to_string();
    let public_url = cli
        .public_url
        .clone()
        .or_else(|| settings.server.public_url.clone())
        .unwrap_or_else(|| base.clone());
    let public_url = public_url.trim_end_matches('/').to_string();
    if cli.senders == 0 || cli.senders > 10_000 {
        bail!("--senders must be between 1 and 10000");
    }
    let senders: Vec<String> = (0..cli.senders)
        .map(|n| format!("+1415555{n:04}"))
        .collect();
    for s in &senders {
        switchboard::domain::ids::PhoneNumber::parse(s)
            .map_err(|e| anyhow::anyhow!("sender {s}: {e}"))?;
    }
    const TEXTS: [&str; 4] = [
        "Where is my order? It was due yesterday.",
        "Hi, can I change the delivery address please",
        "Thanks! That works for me.",
        "My card was charged twice for order 4417, can you check?",
    ];
    // "SM" and 32 random hex digits, as Twilio's: they fall all over a
    // store's dedupe index. (Numbered ones, as this used before, arrive in
    // key order and made that index look cheaper than real traffic does.)
    let same = format!("SM{}", uuid::Uuid::new_v4().simple());
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let sid = if cli.same_sid {
            same.clone()
        } else {
            format!("SM{}", uuid::Uuid::new_v4().simple())
        };
        let from = &senders[i % senders.len()];
        let sim = switchboard::adapters::sms::simulate_inbound(
            &ch,
            &public_url,
            from,
            TEXTS[i % TEXTS.len()],
            &sid,
        );
        let mut rb = client
            .post(format!("{base}{}", sim.path))
            .header("content-type", sim.content_type);
        for (k, v) in &sim.headers {
            rb = rb.header(k.as_str(), v.as_str());
        }
        out.push(Mutex::new(Some(rb.body(sim.body).build()?)));
    }
    Ok(out)
}

/// Closed loop: `concurrency` workers, each sending its next request when the
/// previous one is answered, until `deadline` or request `limit`.
async fn closed_loop(
    source: Arc<Source>,
    next: Arc<AtomicUsize>,
    concurrency: usize,
    limit: usize,
    deadline: Option<Instant>,
) -> Vec<Sample> {
    // Every sample has its room before the clock starts. The requests were
    // built on this thread, so their memory belongs to its malloc arena, and
    // the workers that free them take that arena's lock: an allocation here
    // while they run (collecting a finished worker's samples) let glibc
    // consolidate hundreds of thousands of freed chunks under that lock,
    // and the last requests in flight waited 65–250 ms for it.
    // Without prebuilt requests (`/healthz`, `--same-sid`) there is no
    // limit, and the workers build their own requests: no room is needed.
    let (expected, share) = if !source.prebuilt.is_empty() {
        let expected = limit.min(source.prebuilt.len());
        let share = expected.div_ceil(concurrency.max(1)) * 2 + 64;
        (expected, share.min(expected))
    } else {
        (0, 8192)
    };
    let mut all = Vec::with_capacity(expected);
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let source = source.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(share);
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= limit {
                    break;
                }
                let Some(req) = source.take(i) else { break };
                let start = Instant::now();
                let (ok, done) = send(&source.client, req).await;
                let latency = done - start;
                samples.push(Sample {
                    due: start,
                    latency,
                    service: latency,
                    ok,
                });
            }
            samples
        }));
    }
    for w in workers {
        if let Ok(s) = w.await {
            all.extend(s);
        }
    }
    all
}

/// Open loop: request `first + k` is due at `start + k / rate`.
async fn open_loop(
    source: Arc<Source>,
    first: usize,
    count: usize,
    rate: u64,
    max_inflight: usize,
    start: Instant,
) -> Vec<Sample> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    // A plain thread keeps the schedule: its sleeps are finer than tokio's 1 ms timer.
    let pacer = std::thread::spawn(move || {
        for k in 0..count {
            let due = start + Duration::from_secs_f64(k as f64 / rate as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tx.send((first + k, due)).is_err() {
                break;
            }
        }
    });
    let inflight = Arc::new(tokio::sync::Semaphore::new(max_inflight));
    let mut tasks = Vec::with_capacity(count);
    while let Some((i, due)) = rx.recv().await {
        let permit = inflight
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let source = source.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let req = source.take(i)?;
            let sent = Instant::now();
            let (ok, done) = send(&source.client, req).await;
            Some(Sample {
                due,
                latency: done - due,
                service: done - sent,
                ok,
            })
        }));
    }
    let _ = pacer.join();
    let mut all = Vec::with_capacity(count);
    for t in tasks {
        if let Ok(Some(s)) = t.await {
            all.push(s);
        }
    }
    all
}

/// The value at quantile `q` (nearest rank) of sorted durations, in ms.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    ms(sorted[rank - 1])
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// `--mode fsync`: back-to-back 8 KiB overwrites of a file, each made durable
/// with `fdatasync`, as the embedded store's writer does once per batch.
fn fsync_probe(cli: &Cli, dir: &std::path::Path) -> anyhow::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    const PAGE: usize = 8192;
    const PAGES: usize = 256;
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    let result = (|| -> anyhow::Result<Vec<Duration>> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        // Written and synced beforehand: the probe overwrites allocated blocks.
        f.write_all(&vec![0u8; PAGE * PAGES])?;
        f.sync_all()?;
        let page = vec![0x5au8; PAGE];
        let deadline = Instant::now() + Duration::from_secs_f64(cli.duration);
        let mut out = vec![];
        let mut i = 0usize;
        while Instant::now() < deadline && out.len() < cli.max_requests {
            f.seek(SeekFrom::Start(((i % PAGES) * PAGE) as u64))?;
            f.write_all(&page)?;
            let t = Instant::now();
            f.sync_data()?;
            out.push(t.elapsed());
            i += 1;
        }
        Ok(out)
    })();
    let _ = std::fs::remove_file(&path);
    let mut lat = result?;
    let seconds: f64 = lat.iter().map(Duration::as_secs_f64).sum();
    lat.sort_unstable();
    let line = json!({
        "name": cli.name.clone().unwrap_or_else(|| "fsync".into()),
        "requests": lat.len(),
        "ok": lat.len(),
        "errors": 0,
        "seconds": round(seconds, 3),
        "rps": round(lat.len() as f64 / seconds.max(1e-9), 1),
        "p50_ms": quantile_ms(&lat, 0.50),
        "p99_ms": quantile_ms(&lat, 0.99),
        "max_ms": quantile_ms(&lat, 1.0),
        "p999_ms": quantile_ms(&lat, 0.999),
        "p90_ms": quantile_ms(&lat, 0.90),
        "mode": "fsync",
    });
    println!("{line}");
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.mode == Mode::Fsync {
        let dir = cli.dir.clone().context("--mode fsync needs --dir")?;
        return tokio::task::spawn_blocking(move || fsync_probe(&cli, &dir)).await?;
    }
    let base = cli
        .url
        .as_deref()
        .context("--url is needed")?
        .trim_end_matches('/')
        .to_string();
    let client = Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(90))
        .timeout(Duration::from_secs_f64(cli.timeout))
        .build()?;
    let measured = match (cli.concurrency, cli.rate) {
        // Requests made as they go: only the duration bounds them.
        (Some(_), _) if cli.mode == Mode::Healthz || cli.same_sid => usize::MAX - cli.warmup,
        (Some(_), _) => cli.max_requests,
        (None, Some(rate)) => (rate as f64 * cli.duration).round() as usize,
        (None, None) => bail!("give --concurrency or --rate"),
    };
    if measured == 0 {
        bail!("nothing to send");
    }
    let total = cli.warmup + measured;
    let mut template = None;
    let prebuilt = match cli.mode {
        Mode::Healthz | Mode::Fsync => vec![],
        Mode::Sms if cli.same_sid => {
            template = build_sms(&cli, &base, &client, 1)?
                .pop()
                .and_then(|slot| slot.into_inner());
            vec![]
        }
        Mode::Sms => {
            let t = Instant::now();
            let v = build_sms(&cli, &base, &client, total)?;
            eprintln!(
                "loadgen: built and signed {total} webhooks in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            v
        }
    };
    let source = Arc::new(Source {
        client: client.clone(),
        healthz: format!("{base}/healthz").parse()?,
        prebuilt,
        template,
    });
    let next = Arc::new(AtomicUsize::new(0));

    // Warm-up: open the connections, not measured.
    let warm_conc = cli.concurrency.unwrap_or(8).min(cli.warmup.max(1));
    let warm = closed_loop(source.clone(), next.clone(), warm_conc, cli.warmup, None).await;
    let warm_errors = warm.iter().filter(|s| !s.ok).count();
    if warm_errors > 0 {
        bail!("{warm_errors} of {} warm-up requests failed", warm.len());
    }
    next.store(cli.warmup, Ordering::SeqCst);

    let pid = cli.pid.map(|p| p.to_string());
    let server_cpu_before = pid.as_deref().and_then(|p| cpu_seconds(p, cli.clk_tck));
    let self_cpu_before = cpu_seconds("self", cli.clk_tck);
    let written_before = pid.as_deref().and_then(written_bytes);
    let rss_before = pid.as_deref().and_then(rss_kib);
    let machine_before = machine_busy_seconds(cli.clk_tck);
    let extra_pid = cli.extra_pid.map(|p| p.to_string());
    let extra_cpu_before = extra_pid
        .as_deref()
        .and_then(|p| cpu_seconds(p, cli.clk_tck));
    let metrics_url = format!("{base}/metrics");
    let server_hist_before = server_histogram(&client, &metrics_url).await;
    let start = Instant::now();
    let samples = match (cli.concurrency, cli.rate) {
        (Some(c), _) => {
            let deadline = start + Duration::from_secs_f64(cli.duration);
            closed_loop(source.clone(), next.clone(), c, total, Some(deadline)).await
        }
        (None, Some(rate)) => {
            open_loop(
                source.clone(),
                cli.warmup,
                measured,
                rate,
                cli.max_inflight,
                start,
            )
            .await
        }
        (None, None) => unreachable!(),
    };
    let seconds = start.elapsed().as_secs_f64();
    // The gateway's own view: its webhook duration histogram over the run.
    let server_hist = server_histogram(&client, &metrics_url)
        .await
        .zip(server_hist_before)
        .map(|(after, before)| {
            after
                .iter()
                .map(|(le, n)| {
                    let was = before.iter().find(|(l, _)| l == le).map_or(0, |(_, n)| *n);
                    (*le, n - was)
                })
                .collect::<Vec<_>>()
        })
        .filter(|h| h.last().is_some_and(|(_, n)| *n > 0));
    let server_bucket = |q: f64| {
        server_hist.as_ref().and_then(|h| {
            let total = h.last()?.1 as f64;
            h.iter()
                .find(|(_, n)| *n as f64 >= q * total)
                .map(|(le, _)| round(le * 1e3, 3))
        })
    };
    let server_under_5ms = server_hist.as_ref().and_then(|h| {
        let total = h.last()?.1 as f64;
        let under = h.iter().find(|(le, _)| (*le - 0.005).abs() < 1e-9)?.1 as f64;
        Some(round(100.0 * under / total, 2))
    });
    let server_cpu = pid
        .as_deref()
        .and_then(|p| cpu_seconds(p, cli.clk_tck))
        .zip(server_cpu_before)
        .map(|(after, before)| after - before);
    let self_cpu = cpu_seconds("self", cli.clk_tck)
        .zip(self_cpu_before)
        .map(|(after, before)| after - before);
    let written = pid
        .as_deref()
        .and_then(written_bytes)
        .zip(written_before)
        .map(|(after, before)| after.saturating_sub(before));
    let rss_grew = pid
        .as_deref()
        .and_then(rss_kib)
        .zip(rss_before)
        .map(|(after, before)| after as f64 - before as f64);
    let extra_cpu = extra_pid
        .as_deref()
        .and_then(|p| cpu_seconds(p, cli.clk_tck))
        .zip(extra_cpu_before)
        .map(|(after, before)| after - before);
    // What else kept the machine busy meanwhile (other processes): it should be near 0.
    let other_cpu = machine_busy_seconds(cli.clk_tck)
        .zip(machine_before)
        .map(|(after, before)| {
            after
                - before
                - self_cpu.unwrap_or(0.0)
                - server_cpu.unwrap_or(0.0)
                - extra_cpu.unwrap_or(0.0)
        });

    if let Some(path) = &cli.samples {
        let mut csv = String::from("due_ms,latency_ms,service_ms,ok\n");
        for s in &samples {
            csv.push_str(&format!(
                "{},{},{},{}\n",
                ms(s.due.saturating_duration_since(start)),
                ms(s.latency),
                ms(s.service),
                u8::from(s.ok)
            ));
        }
        std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))?;
    }
    let requests = samples.len();
    let ok = samples.iter().filter(|s| s.ok).count();
    // The first measured request (the earliest due): with `--warmup 0`
    // against a gateway just started, what its first caller waits.
    let first = samples.iter().min_by_key(|s| s.due).map(|s| s.latency);
    let mut latency: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    let mut service: Vec<Duration> = samples.iter().map(|s| s.service).collect();
    latency.sort_unstable();
    service.sort_unstable();
    let per_request_us = |cpu: Option<f64>| {
        cpu.filter(|_| requests > 0)
            .map(|c| round(c * 1e6 / requests as f64, 1))
    };
    let name = cli
        .name
        .clone()
        .unwrap_or_else(|| match (cli.mode, cli.rate) {
            (Mode::Sms, None) => "sms".into(),
            (Mode::Sms, Some(r)) => format!("sms@{r}"),
            (_, None) => "healthz".into(),
            (_, Some(r)) => format!("healthz@{r}"),
        });
    let line = json!({
        "name": name,
        "requests": requests,
        "ok": ok,
        "errors": requests - ok,
        "seconds": round(seconds, 3),
        "rps": round(requests as f64 / seconds, 1),
        "p50_ms": quantile_ms(&latency, 0.50),
        "p99_ms": quantile_ms(&latency, 0.99),
        "max_ms": quantile_ms(&latency, 1.0),
        "first_ms": first.map(ms),
        "p999_ms": quantile_ms(&latency, 0.999),
        "service_p50_ms": quantile_ms(&service, 0.50),
        "service_p99_ms": quantile_ms(&service, 0.99),
        "server_p50_le_ms": server_bucket(0.50),
        "server_p99_le_ms": server_bucket(0.99),
        "server_pct_under_5ms": server_under_5ms,
        "mode": format!("{:?}", cli.mode).to_lowercase(),
        "concurrency": cli.concurrency,
        "rate": cli.rate,
        "server_cpu_s": server_cpu.map(|c| round(c, 2)),
        "server_cpu_us_per_req": per_request_us(server_cpu),
        "extra_cpu_us_per_req": per_request_us(extra_cpu),
        "server_written_kb_per_req": written
            .filter(|_| requests > 0)
            .map(|w| round(w as f64 / 1024.0 / requests as f64, 2)),
        "server_rss_grew_kb_per_req": rss_grew
            .filter(|_| requests > 0)
            .map(|g| round(g / requests as f64, 2)),
        "loadgen_cpu_us_per_req": per_request_us(self_cpu),
        "loadgen_cpu_s": self_cpu.map(|c| round(c, 2)),
        "other_cpu_s": other_cpu.map(|c| round(c.max(0.0), 2)),
    });
    println!("{line}");
    if requests < measured && cli.rate.is_some() {
        bail!("only {requests} of {measured} scheduled requests completed");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
