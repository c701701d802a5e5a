//! Helpers for the process tests: the real `switchboard` binary as a child
//! process on its own port, its output drained in the background, killed
//! when dropped.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

pub const AUTH_TOKEN: &str = "test-auth-token";
pub const ACCOUNT_SID: &str = "ACtest0000000000000000000000000000";
pub const ANNE: &str = "anne-token";
pub const ROUTER: &str = "router-token";
pub const TWIML: &str = r#"<?xml version="1.0" encoding="UTF-8"?><Response/>"#;

pub fn redis_url() -> String {
    std::env::var("SWITCHBOARD_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

pub fn messages_path() -> String {
    format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json")
}

/// A command for the binary with none of the caller's `SWITCHBOARD*`
/// variables, so the tests see only what they set.
pub fn command(cwd: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHBOARD") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(cwd).stdin(Stdio::null());
    cmd
}

/// The configuration the process tests start from (the shape of
/// `tests/common/mod.rs::config_toml`). `backend` is `embedded` or `redis`.
pub fn config_toml(twilio: &str, data: &Path, backend: &str, prefix: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[store]
backend = "{backend}"
path = "{path}"
redis_url = "{redis}"
key_prefix = "{prefix}"

[[queues]]
id = "support"
name = "Support"
kind = "digital"

[[queues]]
id = "omni"
name = "Omni"
kind = "omnichannel"

[[agents]]
id = "anne"
name = "Anne Shirley"
token = "{ANNE}"
queues = ["support", "omni"]
can_transfer = true

[[services]]
id = "router"
token = "{ROUTER}"

[[channels]]
id = "sms-main"
kind = "sms"
name = "SMS"
queue = "support"
api_base = "{twilio}"
media_hosts = ["127.0.0.1"]
account_sid = "{ACCOUNT_SID}"
auth_token = "{AUTH_TOKEN}"
from = "+14155550100"
"#,
        path = data.display(),
        redis = redis_url(),
    )
}

/// Writes an embedded-store configuration (data in `dir/data`, Twilio
/// unreachable) to `dir/switchboard.toml` and returns its path.
pub fn embedded_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("switchboard.toml");
    let text = config_toml("http://127.0.0.1:9", &dir.join("data"), "embedded", "x");
    std::fs::write(&config, text).unwrap();
    config
}

/// The `sms-main` channel as the config above declares it (to sign webhooks).
pub fn sms_channel() -> switchboard::config::ChannelConfig {
    let text = config_toml(
        "http://127.0.0.1:9",
        Path::new("/nonexistent"),
        "embedded",
        "x",
    );
    let s = switchboard::config::Settings::from_toml_with_env(&text, Vec::new()).unwrap();
    s.channel("sms-main").unwrap().clone()
}

type Lines = Arc<Mutex<Vec<String>>>;

fn drain(r: impl Read + Send + 'static) -> Lines {
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            match line {
                Ok(l) => sink.lock().unwrap().push(l),
                Err(_) => break,
            }
        }
    });
    lines
}

/// A running `switchboard` child process. Killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub url: String,
    out: Lines,
    err: Lines,
}

impl Proc {
    /// Starts the binary with `args` (`SWITCHBOARD__SERVER__LISTEN=127.0.0.1:0`
    /// plus `envs`) in `cwd` and waits for its `switchboard listening on` line.
    pub async fn start(args: &[&str], envs: &[(&str, String)], cwd: &Path) -> Proc {
        let mut cmd = command(cwd);
        cmd.args(args)
            .env("SWITCHBOARD__SERVER__LISTEN", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("the switchboard binary starts");
        let out = drain(child.stdout.take().unwrap());
        let err = drain(child.stderr.take().unwrap());
        let mut p = Proc {
            child,
            url: String::new(),
            out,
            err,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(rest) = p.line_after("switchboard listening on ") {
                p.url = rest.trim().trim_end_matches('/').to_string();
                return p;
            }
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!(
                    "switchboard exited ({status}) before listening:\n{}",
                    p.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "switchboard did not print its listening line within 30 s:\n{}",
                p.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// What follows `prefix` on the first stdout line that starts with it.
    pub fn line_after(&self, prefix: &str) -> Option<String> {
        self.out
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| l.strip_prefix(prefix).map(str::to_string))
    }

    /// Waits up to `timeout` for a stdout line starting with `prefix`.
    pub async fn wait_line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(rest) = self.line_after(prefix) {
                return rest;
            }
            assert!(
                Instant::now() < deadline,
                "no stdout line starting with {prefix:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stdout and the last lines of stderr, for failure messages.
    pub fn output(&self) -> String {
        let out = self.out.lock().unwrap().join("\n");
        let err = self.err.lock().unwrap();
        let tail = err[err.len().saturating_sub(40)..].join("\n");
        format!("--- stdout ---\n{out}\n--- stderr (tail) ---\n{tail}")
    }

    /// Sends a signal with the `kill` command (`TERM`, `KILL`, ...).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([format!("-{sig}"), self.pid()])
            .status()
            .expect("kill runs");
        assert!(st.success(), "kill -{sig} {} failed", self.pid());
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deletes every Redis key of a test's prefix when dropped.
pub struct RedisKeys(pub String);

impl RedisKeys {
    pub fn new() -> RedisKeys {
        RedisKeys(format!("sbtest:{}", uuid::Uuid::new_v4().simple()))
    }
}

impl Drop for RedisKeys {
    fn drop(&mut self) {
        if let Ok(client) = redis::Client::open(redis_url()) {
            if let Ok(mut con) = client.get_connection() {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{}:*", self.0))
                    .query(&mut con)
                    .unwrap_or_default();
                for chunk in keys.chunks(500) {
                    let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query(&mut con);
                }
            }
        }
    }
}

/// An HTTP client for one gateway process.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(url: &str) -> Api {
        Api {
            url: url.to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        }
    }

    /// Posts a signed inbound SMS, signed for this gateway's URL.
    pub async fn sms(
        &self,
        ch: &switchboard::config::ChannelConfig,
        from: &str,
        text: &str,
        sid: &str,
    ) -> reqwest::Result<(u16, String)> {
        let req = switchboard::adapters::sms::simulate_inbound(ch, &self.url, from, text, sid);
        let mut rb = self
            .http
            .post(format!("{}{}", self.url, req.path))
            .header("content-type", req.content_type.clone());
        for (k, v) in &req.headers {
            rb = rb.header(k, v);
        }
        let r = rb.body(req.body).send().await?;
        let status = r.status().as_u16();
        Ok((status, r.text().await?))
    }

    pub async fn get(&self, token: &str, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, token: &str, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Every interaction anne can see (`view=all`).
    pub async fn all_cases(&self) -> Vec<Value> {
        let (s, v) = self
            .get(ANNE, "/api/v1/interactions?view=all&limit=500")
            .await;
        assert_eq!(s, 200, "{v}");
        v["items"].as_array().unwrap().clone()
    }

    pub async fn interaction(&self, case: u64) -> Value {
        let (s, v) = self
            .get(ANNE, &format!("/api/v1/interactions/{case}"))
            .await;
        assert_eq!(s, 200, "{v}");
        v
    }

    /// The routing feed, as the service `router` reads it.
    pub async fn events(&self, token: &str) -> Vec<Value> {
        let (s, v) = self.get(token, "/api/v1/routing/events?limit=1000").await;
        assert_eq!(s, 200, "{v}");
        v["events"].as_array().unwrap().clone()
    }

    /// Polls the interaction until `f` holds (up to `timeout`).
    pub async fn wait_for(
        &self,
        case: u64,
        what: &str,
        timeout: Duration,
        f: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.interaction(case).await;
            if f(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
