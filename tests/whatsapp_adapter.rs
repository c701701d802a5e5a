//! The WhatsApp adapter against a fake Graph API (wiremock, with Meta's
//! documented request and answer shapes): sends, uploads, every error
//! class, media resolution and download, and the simulated webhooks.
//!
//! Each test's doc line says what a user would meet if it broke.

use serde_json::{json, Value};
use switchboard::adapters::media::MediaClient;
use switchboard::adapters::whatsapp::{self, WhatsAppChannel};
use switchboard::adapters::{
    Inbound, MediaRef, MediaResolver, Outbound, OutgoingAttachment, OutgoingMessage, RawRequest,
    SimulatedRequest, WebhookIntake,
};
use switchboard::config::ChannelConfig;
use switchboard::domain::{ChannelKind, DeliveryStatus};
use wiremock::matchers::{bearer_token, body_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const PNID: &str = "106540352242922";
const TOKEN: &str = "EAAtest-token";
const SECRET: &str = "test-app-secret";
const CUSTOMER: &str = "16505551234";
const MESSAGES: &str = "/v25.0/106540352242922/messages";
const UPLOAD: &str = "/v25.0/106540352242922/media";

/// A channel whose Graph API is `server` (with the version in `api_base`,
/// as the contract says) and whose media may come from 127.0.0.1.
fn config(server: &MockServer) -> ChannelConfig {
    toml::from_str(&format!(
        r#"
        id = "wa-main"
        kind = "whatsapp"
        queue = "support"
        api_base = "{}/v25.0"
        media_hosts = ["127.0.0.1"]
        app_secret = "{SECRET}"
        verify_token = "meatyhamhock"
        access_token = "{TOKEN}"
        phone_number_id = "{PNID}"
        "#,
        server.uri()
    ))
    .unwrap()
}

fn channel(server: &MockServer) -> WhatsAppChannel {
    WhatsAppChannel::new(&config(server)).unwrap()
}

fn text(body: &str) -> OutgoingMessage {
    OutgoingMessage {
        id: "msg-1".into(),
        to: CUSTOMER.into(),
        text: body.into(),
        attachments: vec![],
        reply_to: None,
        tag: None,
        ..OutgoingMessage::default()
    }
}

fn attachment(server: &MockServer, name: &str, content_type: &str) -> OutgoingAttachment {
    OutgoingAttachment {
        id: format!("att-{name}"),
        filename: name.into(),
        content_type: content_type.into(),
        size: 9,
        public_url: format!("{}/media/{name}?sig=abc", server.uri()),
    }
}

/// Meta's answer to an accepted send.
fn accepted(wamid: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "messaging_product": "whatsapp",
        "contacts": [{"input": CUSTOMER, "wa_id": CUSTOMER}],
        "messages": [{"id": wamid, "message_status": "accepted"}]
    }))
}

fn graph_error(status: u16, code: i64, message: &str, details: Option<&str>) -> ResponseTemplate {
    let mut error = json!({
        "message": message,
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": "AbCdEfGh123"
    });
    if let Some(d) = details {
        error["error_data"] = json!({"messaging_product": "whatsapp", "details": d});
    }
    ResponseTemplate::new(status).set_body_json(json!({ "error": error }))
}

async fn serve_file(server: &MockServer, name: &str, bytes: &[u8]) {
    Mock::given(method("GET"))
        .and(path(format!("/media/{name}")))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(bytes.to_vec()))
        .mount(server)
        .await;
}

fn requests_to<'a>(all: &'a [wiremock::Request], p: &str) -> Vec<&'a wiremock::Request> {
    all.iter().filter(|r| r.url.path() == p).collect()
}

fn json_of(r: &wiremock::Request) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

// ----- sending -----------------------------------------------------------

/// If this breaks, agents' WhatsApp replies never reach the customer.
#[tokio::test]
async fn a_text_reply_is_metas_exact_messages_request() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(MESSAGES))
        .and(bearer_token(TOKEN))
        .and(body_json(json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": CUSTOMER,
            "type": "text",
            "text": {"preview_url": false, "body": "It ships today 📦"}
        })))
        .respond_with(accepted("wamid.OUT1"))
        .expect(1)
        .mount(&server)
        .await;
    let receipt = channel(&server)
        .send(&text("It ships today 📦"))
        .await
        .unwrap();
    assert_eq!(receipt.provider_id, "wamid.OUT1");
    let all = server.received_requests().await.unwrap();
    assert_eq!(
        all[0].headers.get("content-type").unwrap(),
        "application/json"
    );
}

/// If this breaks, a quoted reply loses the customer's message it answers.
#[tokio::test]
async fn a_reply_quotes_the_customers_message_with_context() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(MESSAGES))
        .and(body_json(json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": "US.13491208655302741918",
            "type": "text",
            "text": {"preview_url": false, "body": "Yes, that one"},
            "context": {"message_id": "wamid.CUSTOMER1"}
        })))
        .respond_with(accepted("wamid.OUT2"))
        .expect(1)
        .mount(&server)
        .await;
    let mut msg = text("Yes, that one");
    msg.to = "US.13491208655302741918".into();
    msg.reply_to = Some("wamid.CUSTOMER1".into());
    assert_eq!(
        channel(&server).send(&msg).await.unwrap().provider_id,
        "wamid.OUT2"
    );
}

/// If this breaks, agents' attachments never reach the customer (or Meta
/// is asked to fetch our links, which it often fails to do).
#[tokio::test]
async fn an_attachment_is_uploaded_then_sent_by_id_with_the_caption() {
    let server = MockServer::start().await;
    serve_file(&server, "photo.jpg", b"jpeg-bytes").await;
    Mock::given(method("POST"))
        .and(path(UPLOAD))
        .and(bearer_token(TOKEN))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "4490709327384033"})))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(MESSAGES))
        .and(bearer_token(TOKEN))
        .and(body_json(json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": CUSTOMER,
            "type": "image",
            "image": {"id": "4490709327384033", "caption": "Here is the label"}
        })))
        .respond_with(accepted("wamid.OUT3"))
        .expect(1)
        .mount(&server)
        .await;
    let mut msg = text("Here is the label");
    msg.attachments = vec![attachment(&server, "photo.jpg", "image/jpeg")];
    assert_eq!(
        channel(&server).send(&msg).await.unwrap().provider_id,
        "wamid.OUT3"
    );

    let all = server.received_requests().await.unwrap();
    let fetch = requests_to(&all, "/media/photo.jpg");
    assert!(
        fetch[0].headers.get("authorization").is_none(),
        "our token must not go to our own media link"
    );
    let upload = requests_to(&all, UPLOAD)[0];
    let content_type = upload
        .headers
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(content_type.starts_with("multipart/form-data; boundary="));
    let body = String::from_utf8_lossy(&upload.body);
    for part in [
        "name=\"messaging_product\"\r\n\r\nwhatsapp\r\n",
        "name=\"type\"\r\n\r\nimage/jpeg\r\n",
        "name=\"file\"; filename=\"photo.jpg\"\r\nContent-Type: image/jpeg\r\n\r\njpeg-bytes\r\n",
    ] {
        assert!(body.contains(part), "{part:?} not in {body}");
    }
    // Every upload happens before any message.
    let order: Vec<&str> = all.iter().map(|r| r.url.path()).collect();
    assert_eq!(order, vec!["/media/photo.jpg", UPLOAD, MESSAGES]);
}

/// If this breaks, a reply with several files loses its text, a document
/// arrives without its name, or status webhooks match no message.
#[tokio::test]
async fn several_attachments_send_the_text_first_and_answer_the_last_id() {
    let server = MockServer::start().await;
    serve_file(&server, "invoice.pdf", b"%PDF-1.7").await;
    serve_file(&server, "note.ogg", b"OggS").await;
    let ids = ["111", "222"];
    for id in ids {
        Mock::given(method("POST"))
            .and(path(UPLOAD))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "id": id })))
            .up_to_n_times(1)
            .mount(&server)
            .await;
    }
    for (n, wamid) in ["wamid.T", "wamid.D", "wamid.A"].iter().enumerate() {
        Mock::given(method("POST"))
            .and(path(MESSAGES))
            .respond_with(accepted(wamid))
            .up_to_n_times(1)
            .with_priority(n as u8 + 1)
            .mount(&server)
            .await;
    }
    let mut msg = text("Two files for you");
    msg.reply_to = Some("wamid.Q".into());
    msg.attachments = vec![
        attachment(&server, "invoice.pdf", "application/pdf"),
        attachment(&server, "note.ogg", "audio/ogg"),
    ];
    assert_eq!(
        channel(&server).send(&msg).await.unwrap().provider_id,
        "wamid.A"
    );
    let all = server.received_requests().await.unwrap();
    let sends: Vec<Value> = requests_to(&all, MESSAGES)
        .into_iter()
        .map(json_of)
        .collect();
    let common =
        json!({"messaging_product": "whatsapp", "recipient_type": "individual", "to": CUSTOMER});
    let with = |extra: Value| {
        let mut v = common.clone();
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    assert_eq!(
        sends,
        vec![
            with(
                json!({"type": "text", "text": {"preview_url": false, "body": "Two files for you"},
                        "context": {"message_id": "wamid.Q"}})
            ),
            with(json!({"type": "document", "document": {"id": "111", "filename": "invoice.pdf"}})),
            with(json!({"type": "audio", "audio": {"id": "222"}})),
        ]
    );
}

async fn send_answered(answer: ResponseTemplate) -> switchboard::adapters::DeliveryError {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(MESSAGES))
        .respond_with(answer)
        .expect(1)
        .mount(&server)
        .await;
    channel(&server).send(&text("hello")).await.unwrap_err()
}

/// If this breaks, a reply after 24 h is retried for a day instead of
/// telling the agent the window closed.
#[tokio::test]
async fn error_131047_closes_the_window() {
    let e = send_answered(graph_error(
        400,
        131047,
        "Re-engagement message",
        Some("Message failed to send because more than 24 hours have passed since the customer last replied to this number."),
    ))
    .await;
    assert!(e.window_closed && !e.retryable && !e.needs_reauth, "{e:?}");
    assert_eq!(e.code.as_deref(), Some("131047"));
    assert!(e.message.contains("more than 24 hours"), "{}", e.message);
}

/// If this breaks, an expired token is retried forever instead of marking
/// the channel as needing re-authorisation.
#[tokio::test]
async fn error_190_needs_reauth() {
    let e = send_answered(graph_error(
        401,
        190,
        "Error validating access token: Session has expired",
        None,
    ))
    .await;
    assert!(e.needs_reauth && !e.retryable && !e.window_closed, "{e:?}");
    assert_eq!(e.code.as_deref(), Some("190"));
}

/// If this breaks, throttled replies are dropped instead of retried.
#[tokio::test]
async fn throttling_codes_and_server_errors_are_retried() {
    for code in [4, 80007, 130429, 131048, 131056] {
        let e = send_answered(
            graph_error(400, code, "(#130429) Rate limit hit", None)
                .insert_header("retry-after", "30"),
        )
        .await;
        assert!(
            e.retryable && !e.window_closed && !e.needs_reauth,
            "{code}: {e:?}"
        );
        assert_eq!(e.code, Some(code.to_string()));
        assert_eq!(e.retry_after, Some(std::time::Duration::from_secs(30)));
    }
    let e = send_answered(ResponseTemplate::new(500).set_body_string("oops")).await;
    assert!(e.retryable, "{e:?}");
    let e = send_answered(graph_error(503, 1, "An unknown error occurred", None)).await;
    assert!(e.retryable, "{e:?}");
}

/// If this breaks, a bad request is retried for a day, or the agent is
/// not told what Meta said.
#[tokio::test]
async fn other_errors_fail_with_metas_message() {
    let e = send_answered(graph_error(
        400,
        100,
        "(#100) Invalid parameter",
        Some("Parameter 'to' is not a valid WhatsApp ID"),
    ))
    .await;
    assert!(!e.retryable && !e.window_closed && !e.needs_reauth, "{e:?}");
    assert_eq!(e.code.as_deref(), Some("100"));
    assert_eq!(
        e.message,
        "(#100) Invalid parameter: Parameter 'to' is not a valid WhatsApp ID"
    );
}

/// If this breaks, an outage of Meta loses replies instead of retrying them.
#[tokio::test]
async fn an_unreachable_graph_api_is_retried() {
    let server = MockServer::start().await;
    let mut cfg = config(&server);
    // Nothing listening at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    cfg.api_base = Some(format!("http://{}/v25.0", closed.local_addr().unwrap()));
    drop(closed);
    let e = WhatsAppChannel::new(&cfg)
        .unwrap()
        .send(&text("hello"))
        .await
        .unwrap_err();
    assert!(e.retryable, "{e:?}");
}

/// If this breaks, a failed upload is retried after part of the reply
/// already went out, and the customer gets the text twice.
#[tokio::test]
async fn a_failed_upload_sends_nothing_and_is_retried() {
    let server = MockServer::start().await;
    serve_file(&server, "a.pdf", b"%PDF").await;
    Mock::given(method("POST"))
        .and(path(UPLOAD))
        .respond_with(graph_error(500, 2, "Service temporarily unavailable", None))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(MESSAGES))
        .respond_with(accepted("wamid.X"))
        .expect(0)
        .mount(&server)
        .await;
    let mut msg = text("Text and a file");
    msg.attachments = vec![
        attachment(&server, "a.pdf", "application/pdf"),
        attachment(&server, "a.pdf", "application/pdf"),
    ];
    let e = channel(&server).send(&msg).await.unwrap_err();
    assert!(e.retryable, "{e:?}");
}

/// If this breaks, a reply that failed half-way is retried and the
/// customer gets its first part again.
#[tokio::test]
async fn a_failure_after_part_of_the_reply_went_out_is_final() {
    let server = MockServer::start().await;
    serve_file(&server, "a.mp4", b"mp4").await;
    serve_file(&server, "b.mp4", b"mp4").await;
    Mock::given(method("POST"))
        .and(path(UPLOAD))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "9"})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(MESSAGES))
        .respond_with(accepted("wamid.FIRST"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(MESSAGES))
        .respond_with(ResponseTemplate::new(502))
        .with_priority(2)
        .mount(&server)
        .await;
    let mut msg = text("");
    msg.attachments = vec![
        attachment(&server, "a.mp4", "video/mp4"),
        attachment(&server, "b.mp4", "video/mp4"),
    ];
    let e = channel(&server).send(&msg).await.unwrap_err();
    assert!(!e.retryable, "{e:?}");
    assert!(
        e.message.starts_with("sent 1 of 2 parts, then: "),
        "{}",
        e.message
    );
}

/// If this breaks, a reply Meta accepted is retried (and sent twice)
/// because its answer could not be read.
#[tokio::test]
async fn an_accepted_send_without_an_id_is_not_retried() {
    let e = send_answered(
        ResponseTemplate::new(200).set_body_json(json!({"messaging_product": "whatsapp"})),
    )
    .await;
    assert!(!e.retryable, "{e:?}");
}

// ----- media ---------------------------------------------------------------

/// The image fixture, signed and normalized as the gateway would.
fn fixture_media(ch: &WhatsAppChannel, cfg: &ChannelConfig) -> MediaRef {
    let body = std::fs::read("fixtures/whatsapp/image.json").unwrap();
    let items = through(ch, &whatsapp::simulate_payload(cfg, &body));
    match &items[..] {
        [Inbound::Message(m)] => m.media[0].clone(),
        other => panic!("{other:?}"),
    }
}

/// If this breaks, customers' WhatsApp photos, voice notes and documents
/// are lost (Meta gives an id, the gateway needs a URL and the token).
#[tokio::test]
async fn media_is_resolved_by_id_without_phone_number_id_then_downloaded() {
    let server = MockServer::start().await;
    let cdn_path = "/lookaside/whatsapp_business/attachments/";
    Mock::given(method("GET"))
        .and(path("/v25.0/1479537139650973"))
        .and(bearer_token(TOKEN))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "messaging_product": "whatsapp",
            "url": format!("{}{cdn_path}?mid=1479537139650973&ext=1767225600&hash=ATt0", server.uri()),
            "mime_type": "image/jpeg",
            "sha256": "6Hq1n5cGZ7XwQ2fO0rW9m1p3kZy8vJ4aL0dT2sE5uBc=",
            "file_size": 10,
            "id": "1479537139650973"
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(cdn_path))
        .and(bearer_token(TOKEN))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "image/jpeg")
                .set_body_bytes(b"jpeg-photo".to_vec()),
        )
        .expect(1)
        .mount(&server)
        .await;
    let cfg = config(&server);
    let ch = WhatsAppChannel::new(&cfg).unwrap();
    let media = fixture_media(&ch, &cfg);
    assert_eq!(media.url, "");
    let resolved = ch.resolve(&media).await.unwrap();
    assert!(resolved.url.contains(cdn_path));
    assert_eq!(resolved.content_type.as_deref(), Some("image/jpeg"));
    assert_eq!(resolved.media_id.as_deref(), Some("1479537139650973"));

    let client = MediaClient::new(
        &cfg,
        switchboard::manifest::get(ChannelKind::Whatsapp),
        whatsapp::media_credentials(&cfg),
    )
    .with_credential_hosts(vec!["lookaside.fbsbx.com".into()]);
    let got = client.fetch(&resolved).await.unwrap();
    assert_eq!(got.bytes, b"jpeg-photo");
    assert_eq!(got.content_type, "image/jpeg");

    let all = server.received_requests().await.unwrap();
    let resolve = requests_to(&all, "/v25.0/1479537139650973")[0];
    assert!(
        !resolve
            .url
            .query_pairs()
            .any(|(k, _)| k == "phone_number_id"),
        "Meta refuses inbound media asked for with phone_number_id: {}",
        resolve.url
    );
    assert_eq!(resolve.url.query(), None);
}

/// If this breaks, a failed lookup is silent, or an id from a webhook can
/// point the token-bearing request anywhere on the Graph API.
#[tokio::test]
async fn media_that_cannot_be_resolved_says_why() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v25.0/404404"))
        .respond_with(graph_error(400, 100, "Unsupported get request.", None))
        .mount(&server)
        .await;
    let ch = channel(&server);
    let m = |id: &str| MediaRef {
        media_id: Some(id.into()),
        ..MediaRef::default()
    };
    let e = ch.resolve(&m("404404")).await.unwrap_err();
    assert!(e.contains("Unsupported get request."), "{e}");
    let e = ch.resolve(&m("../me/accounts")).await.unwrap_err();
    assert!(e.contains("not a Meta ID"), "{e}");
    assert!(ch.resolve(&MediaRef::default()).await.is_err());
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

/// If this breaks, the WhatsApp token travels in clear text to a host
/// that was only meant to get it over https.
#[tokio::test]
async fn credential_hosts_never_get_the_token_over_plain_http() {
    let api = MockServer::start().await;
    let cdn = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(b"x".to_vec()))
        .mount(&cdn)
        .await;
    let mut cfg = config(&api);
    cfg.media_hosts = Some(vec!["127.0.0.1".into(), "localhost".into()]);
    let client = MediaClient::new(
        &cfg,
        switchboard::manifest::get(ChannelKind::Whatsapp),
        whatsapp::media_credentials(&cfg),
    )
    .with_credential_hosts(vec!["localhost".into()]);
    client
        .fetch(&MediaRef {
            url: format!("http://localhost:{}/m", cdn.address().port()),
            ..MediaRef::default()
        })
        .await
        .unwrap();
    let at_cdn = cdn.received_requests().await.unwrap();
    assert!(at_cdn[0].headers.get("authorization").is_none());
}

// ----- simulate --------------------------------------------------------------

fn through(ch: &WhatsAppChannel, sim: &SimulatedRequest) -> Vec<Inbound> {
    let req = RawRequest {
        path: &sim.path,
        query: "",
        headers: (&sim.headers).into(),
        content_type: &sim.content_type,
        body: &sim.body,
    };
    ch.normalize(&ch.verify(&req).unwrap()).unwrap()
}

/// If this breaks, `switchboard simulate` posts WhatsApp webhooks the
/// gateway refuses (or that no real Meta webhook looks like).
#[tokio::test]
async fn simulated_webhooks_are_verified_and_normalized_by_the_adapter() {
    let server = MockServer::start().await;
    let cfg = config(&server);
    let ch = channel(&server);

    let sim = whatsapp::simulate_inbound(
        &cfg,
        CUSTOMER,
        "Kerry Fisher",
        "Where is my order?",
        "wamid.SIM",
    );
    assert_eq!(sim.path, "/webhooks/wa-main");
    assert!(sim
        .headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("x-hub-signature-256") && v.starts_with("sha256=")));
    match &through(&ch, &sim)[..] {
        [Inbound::Message(m)] => {
            assert_eq!(
                (m.provider_id.as_str(), m.from.as_str(), m.text.as_str()),
                ("wamid.SIM", CUSTOMER, "Where is my order?")
            );
            assert_eq!(m.contact_name.as_deref(), Some("Kerry Fisher"));
        }
        other => panic!("{other:?}"),
    }

    let sim = whatsapp::simulate_status(&cfg, "wamid.OUT1", "read", CUSTOMER);
    match &through(&ch, &sim)[..] {
        [Inbound::Status(s)] => {
            assert_eq!(
                (s.provider_id.as_str(), s.status),
                ("wamid.OUT1", DeliveryStatus::Read)
            )
        }
        other => panic!("{other:?}"),
    }

    // Every fixture, signed as Meta would sign it, passes the adapter.
    for entry in std::fs::read_dir("fixtures/whatsapp").unwrap() {
        let p = entry.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let body = std::fs::read(&p).unwrap();
        let items = through(&ch, &whatsapp::simulate_payload(&cfg, &body));
        assert!(!items.is_empty(), "{}", p.display());
    }

    // A body signed with another secret is refused.
    let mut other = cfg.clone();
    other
        .settings
        .insert("app_secret".into(), "someone-else".into());
    let sim = whatsapp::simulate_payload(&other, b"{}");
    let req = RawRequest {
        path: &sim.path,
        query: "",
        headers: (&sim.headers).into(),
        content_type: &sim.content_type,
        body: &sim.body,
    };
    assert!(ch.verify(&req).is_err());
}
