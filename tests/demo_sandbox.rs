//! The demo without a browser: its email channel (simulate in, the SMTP sink
//! out) and the sandbox's failures on purpose, through the agent API of a
//! gateway built from `demo::settings()`. (The browser test shows the same
//! to an agent; this one runs where Chromium is not installed.)

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use switchboard::app::Application;

struct Demo {
    url: String,
    anne: String,
    http: reqwest::Client,
    settings: switchboard::config::Settings,
    _dir: tempfile::TempDir,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Demo {
    async fn start() -> Demo {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = switchboard::demo::settings();
        settings.server.listen = "127.0.0.1:0".into();
        settings.store.path = dir.path().join("data");
        let anne = settings
            .agents
            .iter()
            .find(|a| a.id == "anne")
            .and_then(|a| a.token.clone())
            .unwrap();
        let app = Application::build(settings.clone()).await.unwrap();
        let url = app.url().to_string();
        let shutdown = app.shutdown_token();
        tokio::spawn(app.run_until_stopped());
        Demo {
            url,
            anne,
            http: reqwest::Client::new(),
            settings,
            _dir: dir,
            shutdown,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.anne);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Value {
        let (s, v) = self.call(reqwest::Method::GET, path, None).await;
        assert_eq!(s, 200, "GET {path}: {v}");
        v
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let (s, v) = self.call(reqwest::Method::POST, path, Some(body)).await;
        assert!((200..300).contains(&s), "POST {path}: {s} {v}");
        v
    }

    /// Posts what `switchboard simulate` would post.
    async fn simulate(&self, req: switchboard::simulate::SimulatedRequest) {
        let mut rb = self
            .http
            .post(format!("{}{}", self.url, req.path))
            .header("content-type", req.content_type.clone());
        for (k, v) in &req.headers {
            rb = rb.header(k, v);
        }
        let r = rb.body(req.body).send().await.unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }

    /// Waits until `f` of the interaction says yes; the interaction.
    async fn until(&self, case: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let i = self.get(&format!("/api/v1/interactions/{case}")).await;
            if f(&i) {
                return i;
            }
            assert!(Instant::now() < deadline, "{what} within 10 s: {i}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_email_channel_takes_simulated_mail_and_sends_through_the_smtp_sink() {
    let d = Demo::start().await;
    let ch = d.settings.channel("mail-main").unwrap().clone();
    let req = switchboard::simulate::build(
        &ch,
        &d.url,
        Some("Where is my parcel?\nIt was due on Monday."),
        None,
        Some("Kerry@Example.org"),
    )
    .unwrap();
    d.simulate(req).await;
    let list = d.get("/api/v1/interactions").await;
    let item = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["channel"]["id"] == "mail-main")
        .unwrap_or_else(|| panic!("the email reached the queue: {list}"))
        .clone();
    assert_eq!(item["digital_id"], "kerry@example.org");
    assert_eq!(item["subject"], "Where is my parcel?");
    let case = item["case_number"].as_u64().unwrap();
    d.post(&format!("/api/v1/interactions/{case}/assign"), json!({}))
        .await;
    d.post(
        &format!("/api/v1/interactions/{case}/replies"),
        json!({"text": "It left our warehouse today."}),
    )
    .await;
    d.until(case, "the reply sent", |i| {
        i["messages"][1]["status"] == "sent"
    })
    .await;

    // Outbound email with an attachment (multipart, as the inbox sends it).
    let form = reqwest::multipart::Form::new()
        .text("channel", "mail-main")
        .text("to", "anne.customer@example.com")
        .text("subject", "Your invoice")
        .text("text", "Hello, your invoice is attached.")
        .text("html", "<p>Hello, your <b>invoice</b> is attached.</p>")
        .text("contact", r#"{"name": "Anne Customer"}"#)
        .part(
            "attachments",
            reqwest::multipart::Part::bytes(b"%PDF-1.4 demo".to_vec())
                .file_name("invoice.pdf")
                .mime_str("application/pdf")
                .unwrap(),
        );
    let r = d
        .http
        .post(format!("{}/api/v1/outbound/email", d.url))
        .bearer_auth(&d.anne)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let v: Value = r.json().await.unwrap();
    let out = v["case_number"].as_u64().unwrap();
    d.until(out, "the outbound email sent", |i| {
        i["messages"][0]["status"] == "sent"
    })
    .await;

    let sink: Value = d
        .http
        .get(format!("{}/sandbox/smtp/messages", d.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sink["count"], 2, "{sink}");
    let newest = &sink["messages"][0];
    assert_eq!(newest["subject"], "Your invoice", "{sink}");
    assert_eq!(newest["mail_from"], "support@demo.example");
    assert_eq!(newest["rcpt_to"], json!(["anne.customer@example.com"]));
    assert_eq!(newest["attachments"], json!(["invoice.pdf"]));
    let reply = &sink["messages"][1];
    assert_eq!(reply["subject"], "Re: Where is my parcel?");
    assert_eq!(reply["rcpt_to"], json!(["kerry@example.org"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_fails_on_purpose_and_the_agent_gets_the_reason() {
    let d = Demo::start().await;
    let send = |path: &'static str, body: Value| {
        let d = &d;
        async move { d.post(path, body).await["case_number"].as_u64().unwrap() }
    };
    let failed = |i: &Value| i["messages"][0]["status"] == "failed";

    // The marker: accepted, then reported undelivered (ErrorCode 30003).
    let case = send(
        "/api/v1/outbound/sms",
        json!({"channel": "sms-main", "to": "+14155550188",
            "text": "Your table is booked [sandbox:fail]", "contact": {}}),
    )
    .await;
    let i = d.until(case, "the marked SMS failed", failed).await;
    assert_eq!(
        i["messages"][0]["error"],
        "ErrorCode 30003: unreachable handset"
    );
    assert!(
        i["messages"][0]["provider_id"]
            .as_str()
            .is_some_and(|s| s.starts_with("SM")),
        "Twilio accepted it first: {i}"
    );
    assert_eq!(i["status"], "open", "a failed reply reopens it: {i}");
    assert_eq!(i["in_queue"], true);

    // Twilio's test number for an invalid To: refused at once (21211).
    let case = send(
        "/api/v1/outbound/sms",
        json!({"channel": "sms-main", "to": "+15005550001", "text": "Hi", "contact": {}}),
    )
    .await;
    let i = d
        .until(case, "the SMS to the test number failed", failed)
        .await;
    let error = i["messages"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("21211") && error.contains("is not a valid phone number"),
        "{error}"
    );

    // Mail to fail.example: the SMTP sink refuses the recipient (550).
    let case = send(
        "/api/v1/outbound/email",
        json!({"channel": "mail-main", "to": "nobody@fail.example", "subject": "Hi",
            "text": "Hi", "contact": {}}),
    )
    .await;
    let i = d.until(case, "the refused email failed", failed).await;
    let error = i["messages"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("550") && error.contains("nobody@fail.example"),
        "{error}"
    );

    // Media: missing is 404 for good, flaky only the first time.
    let ch = d.settings.channel("sms-main").unwrap().clone();
    let form = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("MessageSid", "SM00000000000000000000000000000mms")
        .append_pair("AccountSid", switchboard::demo::DEMO_TWILIO_ACCOUNT_SID)
        .append_pair("From", "+14155550199")
        .append_pair("To", "+14155550100")
        .append_pair("Body", "Photos of the damage")
        .append_pair("NumMedia", "2")
        .append_pair(
            "MediaUrl0",
            &format!("{}/sandbox/media/missing-1.jpg", d.url),
        )
        .append_pair("MediaContentType0", "image/jpeg")
        .append_pair("MediaUrl1", &format!("{}/sandbox/media/flaky-1.png", d.url))
        .append_pair("MediaContentType1", "image/png")
        .finish();
    d.simulate(switchboard::adapters::sms::simulate_form(
        &ch,
        &d.url,
        form.as_bytes(),
    ))
    .await;
    let list = d.get("/api/v1/interactions").await;
    let case = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["digital_id"] == "+14155550199")
        .unwrap_or_else(|| panic!("the MMS arrived: {list}"))["case_number"]
        .as_u64()
        .unwrap();
    let i = d.get(&format!("/api/v1/interactions/{case}")).await;
    let atts = i["messages"][0]["attachments"].as_array().unwrap().clone();
    assert_eq!(atts.len(), 2, "{i}");
    for a in &atts {
        assert_eq!(a["state"], "failed", "{a}");
        assert_eq!(a["error"], "media download failed: HTTP 404", "{a}");
    }
    let retried = d
        .post(
            &format!(
                "/api/v1/attachments/{}/retry",
                atts[1]["id"].as_str().unwrap()
            ),
            json!({}),
        )
        .await;
    assert_eq!(retried["state"], "stored", "{retried}");
    assert_eq!(retried["content_type"], "image/png");
    let again = d
        .post(
            &format!(
                "/api/v1/attachments/{}/retry",
                atts[0]["id"].as_str().unwrap()
            ),
            json!({}),
        )
        .await;
    assert_eq!(again["state"], "failed", "{again}");
    let png = d
        .http
        .get(format!(
            "{}/api/v1/attachments/{}",
            d.url,
            atts[1]["id"].as_str().unwrap()
        ))
        .bearer_auth(&d.anne)
        .send()
        .await
        .unwrap();
    assert_eq!(png.status().as_u16(), 200);
    assert!(png.bytes().await.unwrap().starts_with(b"\x89PNG"));
}
