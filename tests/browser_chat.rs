//! The web chat widget in a real browser: starts the gateway, then runs
//! `node --test tests/browser/chat.spec.mjs` (playwright-core driving
//! Debian's Chromium) against it. Needs `chromium` (apt) and
//! `npm ci --prefix tests/browser`; a missing one is a failure, not a skip.
//! `SWITCHBOARD_SKIP_BROWSER=1` skips it, saying so.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// A web chat channel whose allowed site is `http://127.0.0.1:{embed_port}`.
fn chat_channel(embed_port: u16) -> String {
    format!(
        r#"
[[channels]]
id = "chat-main"
kind = "chat"
name = "Talk to us"
queue = "support"
allowed_origins = ["https://shop.example", "http://127.0.0.1:{embed_port}"]
"#
    )
}

/// A port nobody listens on now, for the test's "customer site".
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

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

/// A visitor writes in the widget page (and in the widget embedded on a
/// customer's site), the agent sees it and answers, the answer appears, and
/// a reload keeps the history. If it fails, the widget
/// that visitors actually use is broken, whatever the protocol tests say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_widget_works_in_a_real_browser() {
    if std::env::var("SWITCHBOARD_SKIP_BROWSER").as_deref() == Ok("1") {
        println!("SKIPPED the_widget_works_in_a_real_browser: SWITCHBOARD_SKIP_BROWSER=1");
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
    let embed_port = free_port();
    let app = TestApp::start_with(Backend::Embedded, &chat_channel(embed_port), |_| {}).await;
    let artifacts = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("browser-artifacts");
    let child = tokio::process::Command::new("node")
        .arg("--test")
        .arg("--test-reporter=spec")
        .arg(browser_dir.join("chat.spec.mjs"))
        .current_dir(&browser_dir)
        .env("SWITCHBOARD_URL", &app.url)
        .env("SWITCHBOARD_CHANNEL", "chat-main")
        .env("SWITCHBOARD_AGENT", ANNE)
        .env("EMBED_PORT", embed_port.to_string())
        .env("ARTIFACTS_DIR", &artifacts)
        .env("CHROMIUM_PATH", chromium_path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node starts");
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .expect("the browser test finishes within 3 minutes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "the browser test failed (screenshots in {}):\n{stdout}\n{stderr}",
        artifacts.display()
    );
    assert!(
        artifacts.join("chat-after-reload.png").exists(),
        "the test saved its screenshot"
    );
}
