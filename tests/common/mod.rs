//! The black-box harness: the real application on port 0, a wiremock
//! server as Twilio, agents with tokens, and signed provider webhooks.
#![allow(dead_code)]

/// Runs each named `async fn name(b: Backend)` as two tests, one per store.
#[allow(unused_macros)]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Backend::Embedded).await } )*
        }
        mod redis_store {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Backend::Redis).await } )*
        }
    };
}

use serde_json::{json, Value};
use std::time::Duration;
use switchboard::app::Application;
use switchboard::config::Settings;
use wiremock::MockServer;

pub const AUTH_TOKEN: &str = "test-auth-token";
pub const ACCOUNT_SID: &str = "ACtest0000000000000000000000000000";
pub const ANNE: &str = "anne-token";
pub const BOB: &str = "bob-token";
pub const CAROL: &str = "carol-token";
pub const ROUTER: &str = "router-token";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Redis,
}

pub fn redis_url() -> String {
    std::env::var("SWITCHBOARD_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

pub struct TestApp {
    pub url: String,
    pub gateway: std::sync::Arc<switchboard::gateway::Gateway>,
    pub twilio: MockServer,
    pub http: reqwest::Client,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub prefix: String,
    pub backend: Backend,
    _dir: tempfile::TempDir,
}

/// The configuration every black-box test starts from. `extra` is appended
/// TOML (sinks, more channels).
pub fn config_toml(
    twilio: &str,
    dir: &std::path::Path,
    backend: Backend,
    prefix: &str,
    extra: &str,
) -> String {
    let backend = match backend {
        Backend::Embedded => "embedded",
        Backend::Redis => "redis",
    };
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
id = "sales"
name = "Sales"
kind = "digital"

[[queues]]
id = "vip"
name = "VIP"
kind = "digital"

[[queues]]
id = "omni"
name = "Omni"
kind = "omnichannel"

[[queues]]
id = "outbound-sms"
name = "Outbound SMS"
kind = "outbound_sms"

[[agents]]
id = "anne"
name = "Anne Shirley"
token = "{ANNE}"
queues = ["support", "sales", "outbound-sms", "omni"]
can_transfer = true

[[agents]]
id = "bob"
name = "Bob Cratchit"
token_sha256 = "{bob_sha}"
queues = ["support", "sales"]
can_transfer = false

[[agents]]
id = "carol"
name = "Carol Danvers"
token = "{CAROL}"
queues = ["vip"]
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
{extra}
"#,
        extra = extra.replace("{provider}", twilio),
        path = dir.join("data").display(),
        redis = redis_url(),
        bob_sha = sha256_hex(BOB),
    )
}

pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

impl TestApp {
    pub async fn start(backend: Backend) -> TestApp {
        TestApp::start_with(backend, "", |_| {}).await
    }

    pub async fn start_with(
        backend: Backend,
        extra: &str,
        tweak: impl FnOnce(&mut Settings),
    ) -> TestApp {
        let twilio = MockServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let prefix = format!("sbtest:{}", uuid::Uuid::new_v4().simple());
        let text = config_toml(&twilio.uri(), dir.path(), backend, &prefix, extra);
        let mut settings = Settings::from_toml_with_env(&text, Vec::new()).unwrap();
        tweak(&mut settings);
        let app = Application::build(settings)
            .await
            .expect("the application starts");
        let url = app.url().to_string();
        let gateway = app.gateway.clone();
        let shutdown = app.shutdown_token();
        tokio::spawn(app.run_until_stopped());
        TestApp {
            url,
            gateway,
            twilio,
            http: reqwest::Client::new(),
            shutdown,
            prefix,
            backend,
            _dir: dir,
        }
    }

    pub fn sms_channel(&self) -> switchboard::config::ChannelConfig {
        self.gateway.settings.channel("sms-main").unwrap().clone()
    }

    /// Posts a signed inbound SMS as Twilio would; returns status and body.
    pub async fn sms_from(&self, from: &str, text: &str, sid: &str) -> (u16, String) {
        let req = switchboard::adapters::sms::simulate_inbound(
            &self.sms_channel(),
            &self.url,
            from,
            text,
            sid,
        );
        self.post_simulated(req).await
    }

    pub async fn post_simulated(
        &self,
        req: switchboard::adapters::sms::SimulatedRequest,
    ) -> (u16, String) {
        let mut rb = self
            .http
            .post(format!("{}{}", self.url, req.path))
            .header("content-type", req.content_type.clone());
        for (k, v) in &req.headers {
            rb = rb.header(k, v);
        }
        let r = rb.body(req.body).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Posts a signed Twilio status callback.
    pub async fn sms_status(
        &self,
        sid: &str,
        status: &str,
        error_code: Option<&str>,
    ) -> (u16, String) {
        let req = switchboard::adapters::sms::simulate_status(
            &self.sms_channel(),
            &self.url,
            sid,
            status,
            error_code,
        );
        self.post_simulated(req).await
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

    pub async fn send(&self, method: &str, token: &str, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.url))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, token: &str, path: &str, body: Value) -> (u16, Value) {
        self.send("POST", token, path, body).await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of the first `/metrics` line that starts with `line_start`
    /// (a metric's name, with its labels for one series).
    pub async fn metric(&self, line_start: &str) -> Option<f64> {
        let text = self.metrics().await;
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// POSTs a multipart form (a reply or outbound message with files).
    pub async fn post_multipart(
        &self,
        token: &str,
        path: &str,
        form: reqwest::multipart::Form,
    ) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(token)
            .multipart(form)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The only interaction of the SMS channel's queue, for tests with one customer.
    pub async fn only_case(&self) -> u64 {
        let (s, v) = self.get(ANNE, "/api/v1/interactions?view=all").await;
        assert_eq!(s, 200, "{v}");
        let items = v["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{v}");
        items[0]["case_number"].as_u64().unwrap()
    }

    pub async fn interaction(&self, case: u64) -> Value {
        let (s, v) = self
            .get(ANNE, &format!("/api/v1/interactions/{case}"))
            .await;
        assert_eq!(s, 200, "{v}");
        v
    }

    /// Drives the outbox until nothing is due (no sleeping on timers).
    pub async fn deliver(&self) -> switchboard::outbox::StepReport {
        let mut total = switchboard::outbox::StepReport::default();
        for _ in 0..10 {
            let r = switchboard::outbox::step(&self.gateway).await.unwrap();
            if r.sent + r.retried + r.failed == 0 {
                break;
            }
            total.sent += r.sent;
            total.retried += r.retried;
            total.failed += r.failed;
        }
        total
    }

    /// Waits until `f` holds for the interaction (deliveries run in the background too).
    pub async fn wait_for(&self, case: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..100 {
            let v = self.interaction(case).await;
            if f(&v) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "timed out waiting for {what}: {}",
            self.interaction(case).await
        );
    }

    pub async fn events(&self) -> Vec<Value> {
        let (s, v) = self.get(ROUTER, "/api/v1/routing/events?limit=1000").await;
        assert_eq!(s, 200, "{v}");
        v["events"].as_array().unwrap().clone()
    }

    pub fn problem_code(v: &Value) -> &str {
        v["code"].as_str().unwrap_or("")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if self.backend == Backend::Redis {
            let prefix = self.prefix.clone();
            // Remove every key of this test's prefix.
            if let Ok(client) = redis::Client::open(redis_url()) {
                if let Ok(mut con) = client.get_connection() {
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(format!("{prefix}:*"))
                        .query(&mut con)
                        .unwrap_or_default();
                    for chunk in keys.chunks(500) {
                        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query(&mut con);
                    }
                }
            }
        }
    }
}

/// A Twilio Messages.json success answer.
pub fn twilio_created(sid: &str) -> Value {
    json!({"sid": sid, "status": "queued", "num_segments": "1", "error_code": null, "error_message": null,
        "account_sid": ACCOUNT_SID, "api_version": "2010-04-01", "direction": "outbound-api"})
}

/// The form fields of a request wiremock received.
pub fn form_of(req: &wiremock::Request) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(&req.body).unwrap()
}

pub fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}
