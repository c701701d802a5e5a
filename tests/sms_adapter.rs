//! The SMS adapter and the media downloader against a fake Twilio (wiremock,
//! with Twilio's documented request and answer shapes).
//!
//! Each test's doc line says what a user would meet if it broke.

use base64::Engine;
use std::time::Duration;
use switchboard::adapters::media::{self, MediaClient};
use switchboard::adapters::sms::{self, SmsChannel};
use switchboard::adapters::{
    Inbound, MediaRef, Outbound, OutgoingAttachment, OutgoingMessage, RawRequest, WebhookIntake,
};
use switchboard::config::ChannelConfig;
use switchboard::domain::ChannelKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use wiremock::matchers::{basic_auth, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const ACCOUNT: &str = "AC5f1b0e6a2c4d4e8f9a0b1c2d3e4f5a6b";
const TOKEN: &str = "test-auth-token";
const PUBLIC_URL: &str = "https://switchboard.example.com";
const MESSAGES: &str = "/2010-04-01/Accounts/AC5f1b0e6a2c4d4e8f9a0b1c2d3e4f5a6b/Messages.json";
const CAP: usize = 10 * 1024 * 1024;

fn channel_config(api_base: &str, extra: &str) -> ChannelConfig {
    toml::from_str(&format!(
        r#"
        id = "sms-main"
        kind = "sms"
        queue = "support"
        api_base = "{api_base}"
        account_sid = "{ACCOUNT}"
        auth_token = "{TOKEN}"
        {extra}
        "#
    ))
    .unwrap()
}

fn sms_config(api_base: &str) -> ChannelConfig {
    channel_config(
        api_base,
        "from = \"+15035550100\"\nmedia_hosts = [\"127.0.0.1\"]",
    )
}

fn channel(server: &MockServer) -> SmsChannel {
    SmsChannel::new(&sms_config(&server.uri()), PUBLIC_URL).unwrap()
}

fn media_client(cfg: &ChannelConfig) -> MediaClient {
    MediaClient::new(
        cfg,
        switchboard::manifest::get(ChannelKind::Sms),
        sms::media_credentials(cfg),
    )
}

fn media(url: String) -> MediaRef {
    MediaRef {
        url,
        content_type: Some("image/jpeg".into()),
        filename: None,
        media_id: None,
    }
}

fn reply(text: &str, media_urls: &[&str]) -> OutgoingMessage {
    OutgoingMessage {
        id: "msg-1".into(),
        to: "+15035550142".into(),
        text: text.into(),
        attachments: media_urls
            .iter()
            .enumerate()
            .map(|(n, u)| OutgoingAttachment {
                id: format!("att-{n}"),
                filename: format!("photo-{n}.jpg"),
                content_type: "image/jpeg".into(),
                size: 1234,
                public_url: u.to_string(),
            })
            .collect(),
        ..OutgoingMessage::default()
    }
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn form(body: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(body).unwrap()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn twilio_answers(server: &MockServer, answer: ResponseTemplate) {
    Mock::given(method("POST"))
        .and(path(MESSAGES))
        .respond_with(answer)
        .mount(server)
        .await;
}

// ----- send ---------------------------------------------------------------

/// If this breaks, replies never reach customers: Twilio refuses or
/// misroutes a request that is not exactly its Messages API shape, and
/// without StatusCallback no delivery status ever comes back.
#[tokio::test]
async fn send_posts_the_exact_twilio_messages_request() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(MESSAGES))
        .and(basic_auth(ACCOUNT, TOKEN))
        .respond_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({
            "sid": "SM0123456789abcdef0123456789abcdef",
            "status": "queued",
            "num_segments": "1",
        })))
        .expect(1)
        .mount(&server)
        .await;
    let receipt = channel(&server)
        .send(&reply(
            "Your refund is on its way 💸",
            &[
                "https://switchboard.example.com/media/a1?sig=x",
                "https://switchboard.example.com/media/a2?sig=y",
            ],
        ))
        .await
        .unwrap();
    assert_eq!(receipt.provider_id, "SM0123456789abcdef0123456789abcdef");

    let requests = server.received_requests().await.unwrap();
    let req = &requests[0];
    assert_eq!(req.url.path(), MESSAGES);
    assert_eq!(
        req.headers.get("authorization").unwrap().to_str().unwrap(),
        basic(ACCOUNT, TOKEN)
    );
    assert_eq!(
        req.headers.get("content-type").unwrap().to_str().unwrap(),
        "application/x-www-form-urlencoded"
    );
    assert_eq!(
        form(&req.body),
        pairs(&[
            ("To", "+15035550142"),
            ("From", "+15035550100"),
            ("Body", "Your refund is on its way 💸"),
            (
                "StatusCallback",
                "https://switchboard.example.com/webhooks/sms-main"
            ),
            ("MediaUrl", "https://switchboard.example.com/media/a1?sig=x"),
            ("MediaUrl", "https://switchboard.example.com/media/a2?sig=y"),
        ])
    );
}

/// If this breaks, channels on a Messaging Service send from nowhere, and
/// picture-only MMS carry an empty Body Twilio may refuse.
#[tokio::test]
async fn send_through_a_messaging_service_and_media_only_omits_body() {
    let server = MockServer::start().await;
    twilio_answers(
        &server,
        ResponseTemplate::new(201)
            .set_body_json(serde_json::json!({"sid": "MM1", "status": "accepted"})),
    )
    .await;
    let cfg = channel_config(
        &format!("{}/", server.uri()),
        "messaging_service_sid = \"MG0d2f4a6c8e1b3d5f7a9c1e3b5d7f9a2c\"",
    );
    let ch = SmsChannel::new(&cfg, "https://gw.example.com/").unwrap();
    let receipt = ch
        .send(&reply("", &["https://gw.example.com/media/a1"]))
        .await
        .unwrap();
    assert_eq!(receipt.provider_id, "MM1");
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests[0].url.path(), MESSAGES, "no double slash");
    assert_eq!(
        form(&requests[0].body),
        pairs(&[
            ("To", "+15035550142"),
            ("MessagingServiceSid", "MG0d2f4a6c8e1b3d5f7a9c1e3b5d7f9a2c"),
            ("StatusCallback", "https://gw.example.com/webhooks/sms-main"),
            ("MediaUrl", "https://gw.example.com/media/a1"),
        ])
    );
}

/// If this breaks, the outbox keeps retrying a text to someone who replied
/// STOP (and Twilio keeps refusing), instead of failing it for the agent.
#[tokio::test]
async fn unsubscribed_recipient_fails_permanently_with_the_code() {
    let server = MockServer::start().await;
    twilio_answers(
        &server,
        ResponseTemplate::new(400).set_body_json(serde_json::json!({
            "code": 21610,
            "message": "Attempt to send to unsubscribed recipient",
            "more_info": "https://www.twilio.com/docs/errors/21610",
            "status": 400,
        })),
    )
    .await;
    let err = channel(&server).send(&reply("hi", &[])).await.unwrap_err();
    assert!(!err.is_retryable());
    assert!(!err.needs_reauth);
    assert_eq!(err.code.as_deref(), Some("21610"));
    assert_eq!(
        err.message,
        "Twilio error 21610 (HTTP 400): Attempt to send to unsubscribed recipient"
    );
}

/// If this breaks, a rate-limited burst either fails replies outright or
/// retries them at once and is throttled again, ignoring Twilio's Retry-After.
#[tokio::test]
async fn too_many_requests_is_retried_after_twilios_delay() {
    let server = MockServer::start().await;
    twilio_answers(
        &server,
        ResponseTemplate::new(429)
            .insert_header("Retry-After", "30")
            .set_body_json(serde_json::json!({
                "code": 20429, "message": "Too Many Requests", "status": 429,
            })),
    )
    .await;
    let err = channel(&server).send(&reply("hi", &[])).await.unwrap_err();
    assert!(err.is_retryable());
    assert_eq!(err.code.as_deref(), Some("20429"));
    assert_eq!(err.retry_after, Some(Duration::from_secs(30)));
}

/// If this breaks, a Twilio outage fails every reply instead of delivering
/// them once Twilio is back.
#[tokio::test]
async fn server_errors_and_unreachable_twilio_are_retryable() {
    let server = MockServer::start().await;
    twilio_answers(
        &server,
        ResponseTemplate::new(500).set_body_string("upstream error"),
    )
    .await;
    let err = channel(&server).send(&reply("hi", &[])).await.unwrap_err();
    assert!(err.is_retryable());
    assert!(!err.needs_reauth);
    assert_eq!(err.code, None);
    assert_eq!(err.message, "Twilio answered HTTP 500");

    // Nothing listening at all.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let ch = SmsChannel::new(&sms_config(&format!("http://{addr}")), PUBLIC_URL).unwrap();
    let err = ch.send(&reply("hi", &[])).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
}

/// If this breaks, a revoked auth token looks like a string of failed
/// messages instead of a channel that needs its credentials fixed.
#[tokio::test]
async fn refused_credentials_need_reauth() {
    let server = MockServer::start().await;
    twilio_answers(
        &server,
        ResponseTemplate::new(401).set_body_json(serde_json::json!({
            "code": 20003, "message": "Authenticate",
            "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401,
        })),
    )
    .await;
    let err = channel(&server).send(&reply("hi", &[])).await.unwrap_err();
    assert!(err.needs_reauth);
    assert!(!err.is_retryable());
    assert_eq!(err.code.as_deref(), Some("20003"));
    assert!(err
        .message
        .contains("check the channel's account_sid and auth_token"));
}

// ----- media --------------------------------------------------------------

/// If this breaks, customers' MMS pictures are lost when the account
/// enforces HTTP auth on media.
#[tokio::test]
async fn media_from_the_api_host_is_fetched_with_basic_auth() {
    let server = MockServer::start().await;
    let media_path = format!("/2010-04-01/Accounts/{ACCOUNT}/Messages/MM1/Media/ME1");
    Mock::given(method("GET"))
        .and(path(media_path.clone()))
        .and(basic_auth(ACCOUNT, TOKEN))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "image/png")
                .set_body_bytes(b"\x89PNG fake".to_vec()),
        )
        .expect(1)
        .mount(&server)
        .await;
    let cfg = sms_config(&server.uri());
    let got = media_client(&cfg)
        .fetch(&media(format!("{}{media_path}", server.uri())))
        .await
        .unwrap();
    assert_eq!(got.bytes, b"\x89PNG fake");
    assert_eq!(got.content_type, "image/png");
    assert_eq!(
        media::filename_for("attachment-1", &got.content_type),
        "attachment-1.png"
    );
}

/// If this breaks, attachments whose host sends no type are stored as
/// anonymous octet streams although Twilio told us what they are.
#[tokio::test]
async fn the_webhooks_content_type_is_used_when_the_host_gives_none() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/m/1"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(b"jpeg".to_vec()))
        .mount(&server)
        .await;
    let cfg = sms_config(&server.uri());
    let got = media_client(&cfg)
        .fetch(&media(format!("{}/m/1", server.uri())))
        .await
        .unwrap();
    assert_eq!(got.content_type, "image/jpeg");
}

/// If this breaks, our Twilio auth token is handed to a CDN (or whoever
/// Twilio's redirect names), or redirected media is lost.
#[tokio::test]
async fn a_redirect_to_an_allowed_host_is_followed_without_credentials() {
    let api = MockServer::start().await;
    let cdn = MockServer::start().await;
    let cdn_url = format!("http://localhost:{}/cdn/photo.jpg", cdn.address().port());
    Mock::given(method("GET"))
        .and(path("/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1"))
        .respond_with(ResponseTemplate::new(307).insert_header("location", cdn_url.as_str()))
        .mount(&api)
        .await;
    Mock::given(method("GET"))
        .and(path("/cdn/photo.jpg"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "image/jpeg")
                .set_body_bytes(b"the photo".to_vec()),
        )
        .mount(&cdn)
        .await;
    let cfg = channel_config(
        &api.uri(),
        "from = \"+15035550100\"\nmedia_hosts = [\"127.0.0.1\", \"localhost\"]",
    );
    let got = media_client(&cfg)
        .fetch(&media(format!(
            "{}/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1",
            api.uri()
        )))
        .await
        .unwrap();
    assert_eq!(got.bytes, b"the photo");

    let at_api = api.received_requests().await.unwrap();
    assert_eq!(
        at_api[0]
            .headers
            .get("authorization")
            .unwrap()
            .to_str()
            .unwrap(),
        basic(ACCOUNT, TOKEN)
    );
    let at_cdn = cdn.received_requests().await.unwrap();
    assert_eq!(at_cdn.len(), 1);
    assert!(
        at_cdn[0].headers.get("authorization").is_none(),
        "credentials leaked to the CDN: {:?}",
        at_cdn[0].headers
    );
}

/// If this breaks, a media URL on an allowed CDN host gets our auth token.
#[tokio::test]
async fn an_allowed_host_that_is_not_the_api_host_gets_no_credentials() {
    let api = MockServer::start().await;
    let cdn = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(b"x".to_vec()))
        .mount(&cdn)
        .await;
    let cfg = channel_config(
        &api.uri(),
        "from = \"+15035550100\"\nmedia_hosts = [\"127.0.0.1\", \"localhost\"]",
    );
    media_client(&cfg)
        .fetch(&media(format!(
            "http://localhost:{}/m",
            cdn.address().port()
        )))
        .await
        .unwrap();
    let at_cdn = cdn.received_requests().await.unwrap();
    assert!(at_cdn[0].headers.get("authorization").is_none());
}

/// If this breaks, a webhook's redirect can make the gateway fetch from
/// anywhere (internal services included).
#[tokio::test]
async fn a_redirect_to_a_host_not_allowed_is_refused() {
    let api = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(302).insert_header("location", "http://evil.example/steal"),
        )
        .mount(&api)
        .await;
    let cfg = sms_config(&api.uri());
    let err = media_client(&cfg)
        .fetch(&media(format!("{}/m/1", api.uri())))
        .await
        .unwrap_err();
    assert_eq!(err, "media host evil.example is not allowed");
}

/// If this breaks, a media URL in a webhook makes the gateway call any host.
#[tokio::test]
async fn a_url_on_a_host_not_allowed_is_refused_before_any_request() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(b"x".to_vec()))
        .mount(&server)
        .await;
    // The same server, named by a host that is not in media_hosts.
    let cfg = sms_config(&server.uri());
    let err = media_client(&cfg)
        .fetch(&media(format!(
            "http://localhost:{}/m/1",
            server.address().port()
        )))
        .await
        .unwrap_err();
    assert_eq!(err, "media host localhost is not allowed");
    assert!(server.received_requests().await.unwrap().is_empty());
}

/// If this breaks, a redirect loop hangs the webhook that carried the media.
#[tokio::test]
async fn redirects_stop_after_five() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(302).insert_header("location", "/again"))
        .mount(&server)
        .await;
    let cfg = sms_config(&server.uri());
    let err = media_client(&cfg)
        .fetch(&media(format!("{}/start", server.uri())))
        .await
        .unwrap_err();
    assert_eq!(err, "media download failed: more than 5 redirects");
    assert_eq!(server.received_requests().await.unwrap().len(), 6);
}

/// If this breaks, agents see a vague failure for media Twilio no longer has.
#[tokio::test]
async fn a_missing_media_file_says_its_http_status() {
    let server = MockServer::start().await;
    let cfg = sms_config(&server.uri());
    let err = media_client(&cfg)
        .fetch(&media(format!("{}/gone", server.uri())))
        .await
        .unwrap_err();
    assert_eq!(err, "media download failed: HTTP 404");
}

/// If this breaks, an attachment of exactly 10 MiB, which the product
/// allows, is refused.
#[tokio::test]
async fn media_of_exactly_the_cap_is_accepted() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![7u8; CAP]))
        .mount(&server)
        .await;
    let cfg = sms_config(&server.uri());
    let got = media_client(&cfg)
        .fetch(&media(format!("{}/big", server.uri())))
        .await
        .unwrap();
    assert_eq!(got.bytes.len(), CAP);
}

/// Reads an HTTP request head from a raw socket.
async fn read_head(sock: &mut tokio::net::TcpStream) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut byte).await.unwrap();
        assert!(n > 0, "client closed before sending a request");
        buf.extend_from_slice(&byte[..n]);
    }
}

/// If this breaks, a provider (or an attacker's redirect) announcing a huge
/// file makes the gateway wait for and buffer it.
#[tokio::test]
async fn a_content_length_over_the_cap_is_refused_up_front() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        read_head(&mut sock).await;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: {}\r\n\r\n",
            CAP + 1
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        // Never send the body: only an up-front refusal answers in time.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let cfg = sms_config(&format!("http://{addr}"));
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        media_client(&cfg).fetch(&media(format!("http://{addr}/huge.mp4"))),
    )
    .await
    .expect("refused without waiting for the body")
    .unwrap_err();
    assert_eq!(err, "media is larger than 10485760 bytes");
    server.abort();
}

/// If this breaks, a file sent without a Content-Length is buffered
/// whole, however large: memory for anyone who can post a media URL.
#[tokio::test]
async fn a_streamed_body_over_the_cap_is_refused_without_reading_it_all() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        read_head(&mut sock).await;
        sock.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0usize;
        // Offer 64 MiB; the client should hang up a little past 10.
        for _ in 0..1024 {
            let frame = [
                format!("{:x}\r\n", chunk.len()).into_bytes(),
                chunk.clone(),
                b"\r\n".to_vec(),
            ]
            .concat();
            if sock.write_all(&frame).await.is_err() {
                return (sent, false);
            }
            sent += chunk.len();
        }
        let finished = sock.write_all(b"0\r\n\r\n").await.is_ok();
        (sent, finished)
    });
    let cfg = sms_config(&format!("http://{addr}"));
    let client = media_client(&cfg);
    let err = client
        .fetch(&media(format!("http://{addr}/stream.mp4")))
        .await
        .unwrap_err();
    assert_eq!(err, "media is larger than 10485760 bytes");
    drop(client);
    let (sent, finished) = tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("the client hung up")
        .unwrap();
    assert!(!finished, "the whole 64 MiB was read");
    assert!(sent < 32 * 1024 * 1024, "{sent} bytes were taken");
}

// ----- simulate -------------------------------------------------------------

/// If this breaks, `switchboard simulate`, the demo and the end-to-end
/// tests post SMS the gateway refuses (or reads wrongly).
#[tokio::test]
async fn simulated_inbound_is_accepted_and_normalized() {
    let server = MockServer::start().await;
    let cfg = sms_config(&server.uri());
    let sim = sms::simulate_inbound(
        &cfg,
        PUBLIC_URL,
        "+15035550142",
        "Is the café open on Sunday? ☕",
        "SMsim0001",
    );
    assert_eq!(sim.path, "/webhooks/sms-main");
    assert_eq!(sim.content_type, "application/x-www-form-urlencoded");
    let req = RawRequest {
        path: &sim.path,
        query: "",
        headers: (&sim.headers).into(),
        content_type: &sim.content_type,
        body: &sim.body,
    };
    let ch = SmsChannel::new(&cfg, PUBLIC_URL).unwrap();
    let verified = ch.verify(&req).unwrap();
    let items = ch.normalize(&verified).unwrap();
    let [Inbound::Message(m)] = items.as_slice() else {
        panic!("expected one message: {items:?}");
    };
    assert_eq!(m.provider_id, "SMsim0001");
    assert_eq!(m.from, "+15035550142");
    assert_eq!(m.text, "Is the café open on Sunday? ☕");
    assert!(m.media.is_empty());
    assert_eq!(m.consent, None);

    // Signed for this gateway only: another public URL refuses it.
    let elsewhere = SmsChannel::new(&cfg, "https://other.example.com").unwrap();
    assert!(elsewhere.verify(&req).is_err());
}
