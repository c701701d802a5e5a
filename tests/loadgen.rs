//! The benchmark's load generator (`src/bin/loadgen.rs`) against the real
//! gateway: each of its closed loops sends what it says, counts what came
//! back, and the webhooks it signs are accepted and stored. A short run
//! each; the figures themselves are the benchmark's business.

mod common;

use common::*;
use serde_json::Value;

/// Runs a short closed loop of the load generator (4 connections, half a
/// second, 20 warm-up requests) with `args` against `app`; its JSON line.
async fn loadgen(app: &TestApp, args: &[&str]) -> Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg("--url")
        .arg(&app.url)
        .args(["--concurrency", "4", "--duration", "0.5", "--warmup", "20"])
        .args(args)
        .output()
        .await
        .expect("the load generator runs");
    assert!(
        out.status.success(),
        "loadgen {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_runs_each_closed_loop_against_the_gateway() {
    let app = TestApp::start(Backend::Embedded).await;
    // The configuration the gateway runs on, for the webhooks' signing key.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchboard.toml");
    let mut text = config_toml(
        &app.twilio.uri(),
        dir.path(),
        Backend::Embedded,
        "unused",
        "",
    );
    text = text.replacen(
        "[server]\n",
        &format!("[server]\npublic_url = \"{}\"\n", app.url),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let config = config.to_str().unwrap();

    let healthz = loadgen(&app, &["--mode", "healthz"]).await;
    assert!(count(&healthz, "requests") > 0, "{healthz}");
    assert_eq!(count(&healthz, "errors"), 0, "{healthz}");

    let sms = loadgen(
        &app,
        &[
            "--mode",
            "sms",
            "--max-requests",
            "400",
            "--senders",
            "10",
            "--config",
            config,
        ],
    )
    .await;
    let sent = count(&sms, "requests");
    assert!(sent > 0, "{sms}");
    assert_eq!(count(&sms, "errors"), 0, "{sms}");
    assert_eq!(count(&sms, "ok"), sent, "{sms}");
    // The gateway received every webhook sent, warm-up ones included.
    let received = app
        .metric("switchboard_webhooks_received_total{kind=\"sms\"}")
        .await
        .unwrap_or(0.0);
    assert_eq!(received as u64, sent + 20, "{sms}");

    let retries = loadgen(&app, &["--mode", "sms", "--same-sid", "--config", config]).await;
    assert!(count(&retries, "requests") > 0, "{retries}");
    assert_eq!(count(&retries, "errors"), 0, "{retries}");
}
