//! Black-box tests of the real `switchboard` binary: each test starts it as
//! child processes, each on its own port and data directory (or Redis
//! prefix), and talks to it over HTTP only.

mod process_support;

use futures_util::StreamExt;
use process_support::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The inbound `provider_id`s (MessageSids) of every message of every
/// interaction anne can see, one entry per stored message.
async fn stored_inbound_sids(api: &Api) -> Vec<String> {
    let mut sids = vec![];
    for item in api.all_cases().await {
        let case = item["case_number"].as_u64().unwrap();
        let i = api.interaction(case).await;
        for m in i["messages"].as_array().unwrap() {
            if m["direction"] == "inbound" {
                sids.push(
                    m["provider_id"]
                        .as_str()
                        .unwrap_or_else(|| panic!("an inbound message without provider_id: {m}"))
                        .to_string(),
                );
            }
        }
    }
    sids
}

/// Twilio answering every send with 201 and the given MessageSid.
async fn twilio_accepting(sid: &str) -> MockServer {
    let twilio = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(messages_path()))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "sid": sid, "status": "queued", "num_segments": "1",
            "error_code": null, "error_message": null, "account_sid": ACCOUNT_SID,
            "api_version": "2010-04-01", "direction": "outbound-api"
        })))
        .mount(&twilio)
        .await;
    twilio
}

async fn sends_received(twilio: &MockServer) -> usize {
    twilio
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.method.as_str() == "POST" && r.url.path() == messages_path())
        .count()
}

/// If this fails, a gateway that crashes (power loss, OOM kill) loses
/// customer messages that Twilio was told were received, or stores them twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_with_sigkill_loses_no_acknowledged_webhook() {
    // Enough that the embedded store's checkpointer has written some of them
    // into redb in non-durable steps before the kill (about 3 keys a webhook,
    // 128 to 1,024 keys a step): those steps are rolled back and replayed from the log.
    const TOTAL: usize = 1200;
    const TASKS: usize = 10;
    const KILL_AFTER: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    let config = embedded_config(dir.path());
    let cfg = config.to_str().unwrap();
    let mut p = Proc::start(&["serve", "--config", cfg], &[], dir.path()).await;
    let api = Api::new(&p.url);
    let ch = Arc::new(sms_channel());
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let refused: Arc<Mutex<Vec<String>>> = Arc::default();
    let acks = Arc::new(AtomicUsize::new(0));
    let senders = [
        "+14158675301",
        "+14158675302",
        "+14158675303",
        "+14158675304",
    ];
    let mut tasks = vec![];
    for t in 0..TASKS {
        let (api, ch, acked, refused, acks) = (
            api.clone(),
            ch.clone(),
            acked.clone(),
            refused.clone(),
            acks.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for n in (t..TOTAL).step_by(TASKS) {
                let sid = format!("SMcrash{n:05}");
                let from = senders[n % senders.len()];
                match api.sms(&ch, from, &format!("message {n}"), &sid).await {
                    Ok((200, body)) => {
                        assert_eq!(body, TWIML);
                        acked.lock().unwrap().insert(sid);
                        acks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok((status, body)) => refused
                        .lock()
                        .unwrap()
                        .push(format!("{sid}: {status} {body}")),
                    // The process is gone: the rest of this task's stream is unanswered.
                    Err(_) => break,
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acks.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(
            Instant::now() < deadline,
            "only {} webhooks acknowledged in 30 s; refused: {:?}\n{}",
            acks.load(Ordering::SeqCst),
            refused.lock().unwrap(),
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    p.child.kill().unwrap(); // SIGKILL
    let status = p.child.wait().unwrap();
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status}");
    }
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        refused.lock().unwrap().is_empty(),
        "webhooks refused before the crash: {:?}",
        refused.lock().unwrap()
    );
    assert!(
        acked.len() >= KILL_AFTER && acked.len() < TOTAL,
        "the kill did not land mid-stream: {} of {TOTAL} acknowledged",
        acked.len()
    );
    drop(p);

    // Restart on the same data directory.
    let p = Proc::start(&["serve", "--config", cfg], &[], dir.path()).await;
    let api = Api::new(&p.url);
    let stored = stored_inbound_sids(&api).await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for s in &stored {
        *counts.entry(s.as_str()).or_default() += 1;
    }
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "messages stored twice: {dups:?}");
    let mut lost: Vec<_> = acked
        .iter()
        .filter(|s| !counts.contains_key(s.as_str()))
        .collect();
    lost.sort();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged webhooks lost after SIGKILL: {lost:?}",
        lost.len(),
        acked.len()
    );
    eprintln!(
        "crash: {} acknowledged, {} stored after restart, of {TOTAL} sent",
        acked.len(),
        stored.len()
    );
    for s in &stored {
        assert!(
            s.starts_with("SMcrash"),
            "a message nobody sent was stored: {s}"
        );
    }
    // Each stored message came with its event in the same commit.
    let received: Vec<String> = api
        .events(ROUTER)
        .await
        .iter()
        .filter(|e| e["type"] == "message.received")
        .map(|e| {
            e["data"]["message"]["provider_id"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    let mut a = received.clone();
    let mut b = stored.clone();
    a.sort();
    b.sort();
    assert_eq!(
        a, b,
        "message.received events differ from the stored messages"
    );
}

/// If this fails, a deploy or restart (SIGTERM from systemd or Kubernetes)
/// cuts requests off or is reported as a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = embedded_config(dir.path());
    let cfg = config.to_str().unwrap();
    let mut p = Proc::start(&["serve", "--config", cfg], &[], dir.path()).await;
    let api = Api::new(&p.url);
    let ch = sms_channel();
    let (s, body) = api
        .sms(&ch, "+14158675309", "before the restart", "SMterm1")
        .await
        .unwrap();
    assert_eq!((s, body.as_str()), (200, TWIML));
    // A long poll in flight when SIGTERM arrives must be answered, not cut off.
    let (s, v) = api.get(ROUTER, "/api/v1/routing/events").await;
    assert_eq!(s, 200, "{v}");
    let next = v["next"].as_str().unwrap().to_string();
    let poll = {
        let api = api.clone();
        tokio::spawn(async move {
            let r = api
                .http
                .get(format!(
                    "{}/api/v1/routing/events?after={next}&wait=30",
                    api.url
                ))
                .bearer_auth(ROUTER)
                .send()
                .await;
            r.map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.signal("TERM");
    let status = p.wait_exit(Duration::from_secs(15)).await;
    let status = status.unwrap_or_else(|| {
        panic!(
            "switchboard still running 15 s after SIGTERM:\n{}",
            p.output()
        )
    });
    assert_eq!(status.code(), Some(0), "{status}\n{}", p.output());
    let polled = poll.await.unwrap();
    assert!(
        matches!(polled, Ok(200)),
        "the long poll in flight at SIGTERM was not answered: {polled:?}"
    );
    // What was acknowledged before the stop is there after it.
    drop(p);
    let p = Proc::start(&["serve", "--config", cfg], &[], dir.path()).await;
    let stored = stored_inbound_sids(&Api::new(&p.url)).await;
    assert_eq!(stored, vec!["SMterm1".to_string()]);
}

/// The CPUs a thread of process `pid` may run on, by thread name, for the
/// threads whose name starts with `prefix`.
fn thread_cpus(pid: &str, prefix: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let name = field("Name:");
        if name.starts_with(prefix) {
            out.push((name, field("Cpus_allowed_list:")));
        }
    }
    out.sort();
    out
}

/// If this fails, `server.pin_workers` does not reach the HTTP worker
/// threads of the real binary (or breaks them): two workers may still queue
/// on one CPU while the other idles.
#[tokio::test]
async fn pinned_workers_each_keep_to_their_own_cpu_and_serve() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    let dir = tempfile::tempdir().unwrap();
    let config = embedded_config(dir.path());
    let cfg = config.to_str().unwrap();
    let envs = [
        ("SWITCHBOARD__SERVER__PIN_WORKERS", "true".to_string()),
        ("SWITCHBOARD__SERVER__WORKERS", "2".to_string()),
    ];
    let p = Proc::start(&["serve", "--config", cfg], &envs, dir.path()).await;
    let api = Api::new(&p.url);
    let (s, body) = api
        .sms(&sms_channel(), "+14158675309", "pinned", "SMpin1")
        .await
        .unwrap();
    assert_eq!((s, body.as_str()), (200, TWIML));
    let workers = thread_cpus(&p.pid(), "actix-server wo");
    assert_eq!(workers.len(), 2, "{workers:?}");
    for (name, allowed) in &workers {
        assert!(
            allowed.parse::<usize>().is_ok(),
            "{name} may run on {allowed}, not on one CPU"
        );
    }
    if cpus >= 2 {
        assert_ne!(workers[0].1, workers[1].1, "both workers on one CPU");
    }
    // Without the setting, workers run anywhere.
    drop(p);
    let p = Proc::start(&["serve", "--config", cfg], &[], dir.path()).await;
    let free = thread_cpus(&p.pid(), "actix-server wo");
    if cpus >= 2 {
        assert!(
            free.iter().all(|(_, a)| a.parse::<usize>().is_err()),
            "{free:?}"
        );
    }
    assert_eq!(
        stored_inbound_sids(&Api::new(&p.url)).await,
        vec!["SMpin1".to_string()]
    );
}

/// Opens anne's SSE stream and forwards each frame; returns once the
/// stream's `: connected` comment arrived.
async fn open_sse(api: &Api) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/events", api.url))
        .bearer_auth(ANNE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(Ok(chunk)) = stream.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(i) = buf.find("\n\n") {
                let frame: String = buf.drain(..i + 2).collect();
                if tx.send(frame.trim().to_string()).is_err() {
                    return;
                }
            }
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the SSE stream opens within 5 s")
        .expect("the SSE stream stays open");
    assert!(first.starts_with(": connected"), "{first}");
    rx
}

/// If this fails, running more than one gateway process on Redis (for
/// availability or load) loses, splits or doubles customers' conversations
/// and replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_on_one_redis_behave_as_one() {
    let keys = RedisKeys::new();
    let twilio = twilio_accepting("SMout0001").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchboard.toml");
    std::fs::write(
        &config,
        config_toml(&twilio.uri(), &dir.path().join("data"), "redis", &keys.0),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let pa = Proc::start(&["serve", "--config", cfg], &[], dir.path()).await;
    let pb = Proc::start(&["serve", "--config", cfg], &[], dir.path()).await;
    let (a, b) = (Api::new(&pa.url), Api::new(&pb.url));
    let ch = sms_channel();

    let mut sse_a = open_sse(&a).await;

    // A webhook taken by A is an interaction B's agents can work.
    let (s, body) = a
        .sms(&ch, "+14158675309", "Where is my parcel?", "SMtwo0001")
        .await
        .unwrap();
    assert_eq!((s, body.as_str()), (200, TWIML), "{}", pa.output());
    let items = b.all_cases().await;
    assert_eq!(items.len(), 1, "{items:?}");
    let case = items[0]["case_number"].as_u64().unwrap();
    let (s, v) = b
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/assign"),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = b
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": "It ships today"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");

    // A's agent stream hears what happened through B.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, sse_a.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("A's SSE stream did not carry interaction.resolved within 10 s")
            })
            .expect("A's SSE stream ended early");
        if frame.contains("event: interaction.resolved") {
            let data = frame
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap();
            let e: Value = serde_json::from_str(data).unwrap();
            assert_eq!(e["case_number"], case, "{e}");
            break;
        }
    }

    // Exactly one send reaches Twilio, although both processes run an outbox worker.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sends_received(&twilio).await == 0 {
        assert!(
            Instant::now() < deadline,
            "no send reached Twilio in 10 s\nA:\n{}\nB:\n{}",
            pa.output(),
            pb.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.wait_for(case, "sent", Duration::from_secs(10), |i| {
        i["messages"][1]["status"] == "sent"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sends_received(&twilio).await, 1, "the reply was sent twice");

    // The same webhook delivered to A and B at once is stored once,
    // for a new customer as for a known one.
    let racers = [
        ("+14155550201", "SMrace0001"),
        ("+14155550202", "SMrace0002"),
        ("+14155550203", "SMrace0003"),
        ("+14158675309", "SMrace0004"),
    ];
    for (from, sid) in racers {
        let (ra, rb) = tokio::join!(
            a.sms(&ch, from, "twice?", sid),
            b.sms(&ch, from, "twice?", sid)
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra, (200, TWIML.to_string()), "A answered {sid}");
        assert_eq!(rb, (200, TWIML.to_string()), "B answered {sid}");
    }
    for api in [&a, &b] {
        let items = api.all_cases().await;
        let mut by_sender: HashMap<String, usize> = HashMap::new();
        for i in &items {
            *by_sender
                .entry(i["digital_id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        for (from, _) in racers {
            assert_eq!(
                by_sender.get(from),
                Some(&1),
                "interactions per sender on {}: {by_sender:?}",
                api.url
            );
        }
        let stored = stored_inbound_sids(api).await;
        for (_, sid) in racers {
            assert_eq!(
                stored.iter().filter(|s| *s == sid).count(),
                1,
                "{sid} stored {stored:?}"
            );
        }
    }

    // One routing feed, the same through either process.
    let (ea, eb) = (a.events(ROUTER).await, b.events(ROUTER).await);
    assert_eq!(ea, eb, "the routing feed differs between A and B");
    let types: Vec<&str> = ea.iter().filter_map(|e| e["type"].as_str()).collect();
    for t in [
        "interaction.created",
        "message.received",
        "interaction.resolved",
        "message.sent",
    ] {
        assert!(types.contains(&t), "no {t} in {types:?}");
    }
    let received = ea
        .iter()
        .filter(|e| e["type"] == "message.received")
        .count();
    assert_eq!(received, 1 + racers.len(), "{types:?}");
    drop((pa, pb));
    drop(keys);
}

/// If this fails, a new user's first `cargo run --release` and
/// `switchboard simulate` (the README's first steps) do not work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_starts_without_config_and_simulate_reaches_the_agent_api() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let p = Proc::start(
        &["serve", "--demo"],
        &[("SWITCHBOARD__STORE__PATH", data.display().to_string())],
        dir.path(),
    )
    .await;
    let anne = p
        .wait_line("agent anne token ", Duration::from_secs(5))
        .await
        .trim()
        .to_string();
    let router = p
        .wait_line("service router token ", Duration::from_secs(5))
        .await
        .trim()
        .to_string();
    assert!(!anne.is_empty() && !anne.contains(' '), "{anne:?}");

    let mut sim = tokio::process::Command::from(command(dir.path()));
    let out = sim
        .args([
            "simulate",
            "sms-main",
            "--url",
            p.url.as_str(),
            "--text",
            "hello demo",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "simulate failed ({}): {}{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        p.output()
    );
    assert!(
        data.is_dir(),
        "no data directory at SWITCHBOARD__STORE__PATH {}",
        data.display()
    );

    let api = Api::new(&p.url);
    let (s, v) = api.get(&anne, "/api/v1/interactions").await;
    assert_eq!(s, 200, "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{v}");
    let case = items[0]["case_number"].as_u64().unwrap();
    let (s, i) = api
        .get(&anne, &format!("/api/v1/interactions/{case}"))
        .await;
    assert_eq!(s, 200, "{i}");
    assert_eq!(i["messages"][0]["text"], "hello demo", "{i}");

    let (s, v) = api
        .post(
            &anne,
            &format!("/api/v1/interactions/{case}/assign"),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = api
        .post(
            &anne,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": "Hello from the demo"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let i = loop {
        let (s, i) = api
            .get(&anne, &format!("/api/v1/interactions/{case}"))
            .await;
        assert_eq!(s, 200, "{i}");
        if i["messages"][1]["status"] == "delivered" {
            break i;
        }
        assert!(
            Instant::now() < deadline,
            "the sandbox did not report the reply delivered within 10 s: {i}\n{}",
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        i["messages"][1]["provider_id"]
            .as_str()
            .is_some_and(|s| s.starts_with("SM")),
        "{i}"
    );
    // The feed shows it accepted (sent) and then delivered.
    let events = api.events(&router).await;
    let sent = events.iter().position(|e| e["type"] == "message.sent");
    let delivered = events
        .iter()
        .position(|e| e["type"] == "message.status" && e["data"]["status"] == "delivered");
    assert!(
        matches!((sent, delivered), (Some(s), Some(d)) if s < d),
        "expected message.sent then message.status delivered: {events:?}"
    );
}

/// The demo's WhatsApp, Messenger, Instagram, X and email channels work
/// offline: `simulate` reaches the agent, and a reply goes through the
/// sandbox (email: the in-process SMTP sink) and comes back delivered, or
/// sent where the provider reports no delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_meta_channels_simulate_and_deliver() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let p = Proc::start(
        &["serve", "--demo"],
        &[("SWITCHBOARD__STORE__PATH", data.display().to_string())],
        dir.path(),
    )
    .await;
    let anne = p
        .wait_line("agent anne token ", Duration::from_secs(5))
        .await
        .trim()
        .to_string();
    p.wait_line("channel mail-main (email): try ", Duration::from_secs(5))
        .await;
    let sink = p.wait_line("SMTP sink:", Duration::from_secs(5)).await;
    assert!(sink.contains("127.0.0.1:"), "{sink}");
    let api = Api::new(&p.url);
    for (channel, text, last_status) in [
        ("wa-main", "hola desde WhatsApp", "delivered"),
        ("fb-main", "hi from Messenger", "delivered"),
        ("ig-main", "hi from Instagram", "delivered"),
        // X reports no delivery for DMs: accepted (sent) is as far as it goes.
        ("x-main", "hi from X", "sent"),
        // SMTP has no delivery reports either: the sink took it.
        ("mail-main", "hi by email", "sent"),
    ] {
        let out = tokio::process::Command::from(command(dir.path()))
            .args(["simulate", channel, "--url", p.url.as_str(), "--text", text])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "simulate {channel}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let (_, v) = api.get(&anne, "/api/v1/interactions?view=all").await;
        let item = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["channel"]["id"] == channel)
            .unwrap_or_else(|| panic!("no {channel} interaction: {v}"))
            .clone();
        let case = item["case_number"].as_u64().unwrap();
        let (_, i) = api
            .get(&anne, &format!("/api/v1/interactions/{case}"))
            .await;
        assert_eq!(i["messages"][0]["text"], text, "{i}");
        api.post(
            &anne,
            &format!("/api/v1/interactions/{case}/assign"),
            json!({}),
        )
        .await;
        let (s, v) = api
            .post(
                &anne,
                &format!("/api/v1/interactions/{case}/replies"),
                json!({"text": "thanks!"}),
            )
            .await;
        assert_eq!(s, 202, "{v}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, i) = api
                .get(&anne, &format!("/api/v1/interactions/{case}"))
                .await;
            if i["messages"][1]["status"] == last_status {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{channel}: not delivered within 10 s: {i}\n{}",
                p.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Web chat across nodes: a visitor connected to process A gets the reply an
/// agent sent through process B, because the fan-out travels through Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_chat_reply_through_one_process_reaches_a_visitor_on_another() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    let keys = RedisKeys::new();
    let twilio = twilio_accepting("SMunused").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchboard.toml");
    let mut text = config_toml(&twilio.uri(), &dir.path().join("data"), "redis", &keys.0);
    text.push_str(
        r#"
[[channels]]
id = "chat-main"
kind = "chat"
name = "Web chat"
queue = "support"
allowed_origins = ["https://shop.example"]
"#,
    );
    std::fs::write(&config, text).unwrap();
    let cfg = config.to_str().unwrap();
    let pa = Proc::start(&["serve", "--config", cfg], &[], dir.path()).await;
    let pb = Proc::start(&["serve", "--config", cfg], &[], dir.path()).await;
    let http = reqwest::Client::new();
    let session: Value = http
        .post(format!("{}/chat/chat-main/sessions", pa.url))
        .header("origin", "https://shop.example")
        .json(&json!({"name": "Visitor"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = session["token"]
        .as_str()
        .expect("a session token")
        .to_string();
    let ws_url = format!(
        "{}/chat/chat-main/ws?token={token}",
        pa.url.replacen("http", "ws", 1)
    );
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        ws_url.as_str(),
    )
    .unwrap();
    req.headers_mut()
        .insert("Origin", "https://shop.example".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("the socket opens on A");
    ws.send(WsMessage::text(
        json!({"type": "message", "client_message_id": "c1", "text": "is anyone there?"})
            .to_string(),
    ))
    .await
    .unwrap();
    let b = Api::new(&pb.url);
    let deadline = Instant::now() + Duration::from_secs(10);
    let case = loop {
        let items = b.all_cases().await;
        if let Some(i) = items.iter().find(|i| i["channel"]["id"] == "chat-main") {
            break i["case_number"].as_u64().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the visitor's message never reached B: {}",
            pa.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    b.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    let (s, v) = b
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": "Yes, Anne here"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = tokio::time::timeout(left, ws.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the reply sent through B never reached the visitor on A\nA: {}\nB: {}",
                    pa.output(),
                    pb.output()
                )
            })
            .expect("the socket stays open")
            .expect("a frame");
        if let WsMessage::Text(t) = frame {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "message" && v["message"]["direction"] == "outbound" {
                assert_eq!(v["message"]["text"], "Yes, Anne here", "{v}");
                break;
            }
        }
    }
}

/// Runs `switchboard check-config --config FILE` with `envs`; (exit code, stdout).
fn check_config(file: &std::path::Path, envs: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = command(file.parent().unwrap());
    cmd.args(["check-config", "--config", file.to_str().unwrap()]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{stdout}{}",
            if stderr.is_empty() {
                String::new()
            } else {
                format!("\n[stderr] {stderr}")
            }
        ),
    )
}

const BAD_CONFIG: &str = r#"
[[queues]]
id = "support"
name = "Support"
kind = "digital"

[[queues]]
id = "omni"
name = "Omni"
kind = "omnichannel"

[[agents]]
id = "dave"
name = "Dave"
queues = ["support"]

[[channels]]
id = "sms-lost"
kind = "sms"
queue = "nowhere"
account_sid = "AC1"
auth_token = "t"
from = "+14155550100"

[[channels]]
id = "sms-omni"
kind = "sms"
queue = "omni"
account_sid = "AC1"
auth_token = "t"
from = "+14155550101"

[[channels]]
id = "sms-main"
kind = "sms"
queue = "support"
account_sid = "AC1"
from = "+14155550102"

[[channels]]
id = "sms-extra"
kind = "sms"
queue = "support"
account_sid = "AC1"
auth_token = "t"
from = "+14155550103"
colour = "blue"

[[channels]]
id = "sms-local"
kind = "sms"
queue = "support"
account_sid = "AC1"
auth_token = "t"
from = "4155550104"
"#;

/// The lines of `out` that name both `who` and `key`.
fn lines_naming<'a>(out: &'a str, who: &str, key: &str) -> Vec<&'a str> {
    out.lines()
        .filter(|l| l.contains(who) && l.contains(key))
        .collect()
}

/// If this fails, an operator fixing a configuration learns of its problems
/// one at a time, or not at all, or without knowing where they are.
#[test]
fn check_config_lists_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, BAD_CONFIG).unwrap();
    let (code, out) = check_config(&file, &[]);
    assert_eq!(code, 1, "{out}");
    let expected = [
        ("sms-lost", "queue"),
        ("sms-lost", "nowhere"),
        ("sms-omni", "queue"),
        ("sms-omni", "digital"),
        ("agent dave", "token"),
        ("sms-main", "auth_token"),
        ("sms-extra", "colour"),
        ("sms-local", "E.164"),
    ];
    for (who, key) in expected {
        assert!(
            !lines_naming(&out, who, key).is_empty(),
            "no problem line naming {who} and {key}:\n{out}"
        );
    }

    // An environment override that supplies the missing secret removes that
    // problem, and only that one.
    let (code, fixed) = check_config(
        &file,
        &[("SWITCHBOARD__CHANNELS__SMS_MAIN__AUTH_TOKEN", "x")],
    );
    assert_eq!(code, 1, "{fixed}");
    assert!(
        lines_naming(&fixed, "sms-main", "auth_token").is_empty(),
        "the override did not fix auth_token:\n{fixed}"
    );
    for (who, key) in expected.iter().filter(|(w, _)| *w != "sms-main") {
        assert!(
            !lines_naming(&fixed, who, key).is_empty(),
            "with the override, no line naming {who} and {key}:\n{fixed}"
        );
    }
}

/// If this fails, a correct configuration is refused (and deployments that
/// run check-config first never start).
/// Without a file, check-config checks the demo configuration.
#[test]
fn check_config_without_a_file_checks_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let out = command(dir.path()).arg("check-config").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("demo configuration would be used: ok"),
        "{stdout}"
    );
}

#[test]
fn check_config_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("good.toml");
    let good = config_toml(
        "https://api.twilio.com",
        &dir.path().join("data"),
        "embedded",
        "x",
    );
    std::fs::write(&file, &good).unwrap();
    let (code, out) = check_config(&file, &[]);
    assert_eq!(code, 0, "{out}");

    // The secret may come from the environment only.
    let without_secret = dir.path().join("no-secret.toml");
    std::fs::write(
        &without_secret,
        good.replace(&format!("auth_token = \"{AUTH_TOKEN}\"\n"), ""),
    )
    .unwrap();
    let (code, out) = check_config(&without_secret, &[]);
    assert_eq!(code, 1, "a channel without auth_token was accepted: {out}");
    let (code, out) = check_config(
        &without_secret,
        &[("SWITCHBOARD__CHANNELS__SMS_MAIN__AUTH_TOKEN", "from-env")],
    );
    assert_eq!(code, 0, "{out}");
}
