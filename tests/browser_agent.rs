//! The agent's inbox (`/agent/`) in a real browser: starts the gateway with
//! the DEMO configuration (sandbox providers, agents anne and bob), then runs
//! `node --test tests/browser/agent.spec.mjs` (playwright-core driving
//! Debian's Chromium) with both agents signed in at once. The node test
//! simulates customers with `switchboard simulate` (`SWITCHBOARD_BIN`).
//! Needs `chromium` (apt) and `npm ci --prefix tests/browser`; a missing one
//! is a failure, not a skip. `SWITCHBOARD_SKIP_BROWSER=1` skips it, saying so.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use switchboard::app::Application;

fn chromium_path() -> PathBuf {
    std::env::var_os("CHROMIUM_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// What is missing to run the browser test, in words that say how to fix it.
fn missing(browser_dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node {
        out.push("node is not on PATH (install Node.js 20 or later)".to_string());
    }
    if !chromium_path().exists() {
        out.push(format!(
            "{} does not exist (apt-get install -y chromium, or set CHROMIUM_PATH)",
            chromium_path().display()
        ));
    }
    if !browser_dir.join("node_modules/playwright-core").exists() {
        out.push(format!(
            "playwright-core is not installed (npm ci --prefix {})",
            browser_dir.display()
        ));
    }
    out
}

fn token_of(settings: &switchboard::config::Settings, agent: &str) -> String {
    settings
        .agents
        .iter()
        .find(|a| a.id == agent)
        .and_then(|a| a.token.clone())
        .unwrap_or_else(|| panic!("the demo has agent {agent} with a token"))
}

/// Two agents work the demo inbox side by side: a simulated SMS appears live
/// for both, the one who clicks gets it, replies with an attachment, ends it
/// with a disposition; notes stay private; set as resolved, transfer, switch,
/// outbound SMS and email (through the demo's SMTP sink) only for the right
/// agent; an HTML email shown formatted and safe, with its inline image;
/// failed deliveries and failed attachment downloads (the sandbox failing on
/// purpose) shown in words, with the download tried again; the Spanish
/// interface; "Reconnecting…" while the live-update stream is cut, and the
/// list caught up once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_inbox_works_in_a_real_browser() {
    if std::env::var("SWITCHBOARD_SKIP_BROWSER").as_deref() == Ok("1") {
        println!("SKIPPED the_agent_inbox_works_in_a_real_browser: SWITCHBOARD_SKIP_BROWSER=1");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    let problems = missing(&browser_dir);
    assert!(
        problems.is_empty(),
        "the browser test cannot run (SWITCHBOARD_SKIP_BROWSER=1 skips it):\n  {}",
        problems.join("\n  ")
    );
    let dir = tempfile::tempdir().unwrap();
    let mut settings = switchboard::demo::settings();
    settings.server.listen = "127.0.0.1:0".into();
    settings.store.path = dir.path().join("data");
    assert!(settings.demo, "the demo uses the sandbox providers");
    let anne = token_of(&settings, "anne");
    let bob = token_of(&settings, "bob");
    let app = Application::build(settings)
        .await
        .expect("the demo application starts");
    let url = app.url().to_string();
    let shutdown = app.shutdown_token();
    tokio::spawn(app.run_until_stopped());

    let artifacts = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("browser-artifacts");
    let child = tokio::process::Command::new("node")
        .arg("--test")
        .arg("--test-reporter=spec")
        .arg(browser_dir.join("agent.spec.mjs"))
        .current_dir(&browser_dir)
        .env("SWITCHBOARD_URL", &url)
        .env("ANNE_TOKEN", &anne)
        .env("BOB_TOKEN", &bob)
        .env("SWITCHBOARD_BIN", env!("CARGO_BIN_EXE_switchboard"))
        // `simulate` must sign with the demo's secrets, not another file's.
        .env_remove("SWITCHBOARD_CONFIG")
        .env("ARTIFACTS_DIR", &artifacts)
        .env("CHROMIUM_PATH", chromium_path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node starts");
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .expect("the browser test finishes within 5 minutes")
        .expect("node runs");
    shutdown.cancel();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "the browser test failed (screenshots in {}):\n{stdout}\n{stderr}",
        artifacts.display()
    );
    for shot in [
        "agent-signin.png",
        "agent-list-live.png",
        "agent-thread-reply.png",
        "agent-contact.png",
        "agent-outbound-sms.png",
        "agent-outbound-email.png",
        "agent-email-sent.png",
        "agent-email-html.png",
        "agent-failed-delivery.png",
        "agent-failed-attachment.png",
        "agent-es.png",
    ] {
        assert!(
            artifacts.join(shot).exists(),
            "the test saved its screenshot {shot}"
        );
    }
}
