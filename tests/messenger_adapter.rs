//! The Messenger / Instagram adapter against a fake Graph API (wiremock, with
//! Meta's documented request and answer shapes), its simulated webhooks, its
//! media rules, and the normalizer under arbitrary input.
//!
//! Each test's doc line says what a user would meet if it broke.

use proptest::prelude::*;
use std::time::Duration;
use switchboard::adapters::media::MediaClient;
use switchboard::adapters::messenger::{self, MessengerChannel};
use switchboard::adapters::meta;
use switchboard::adapters::{
    DeliveryError, Inbound, IntakeError, Outbound, OutgoingAttachment, OutgoingMessage, RawRequest,
    SimulatedRequest, WebhookIntake,
};
use switchboard::config::ChannelConfig;
use switchboard::domain::{ChannelKind, DeliveryStatus};
use wiremock::matchers::{body_json, header, method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const PAGE: &str = "108402317654321";
const IG: &str = "17841405309211844";
const PSID: &str = "7412589630147852";
const IGSID: &str = "1043586204978312";
const PAGE_TOKEN: &str = "EAAGm0PX4ZCpsBAPageToken";
const IG_TOKEN: &str = "IGQWRInstagramToken";
const SECRET: &str = "test-app-secret";
const OUR_ID: &str = "5f0c6a1e9b2d4c7e8a3f1b6d9e2c4a7b";

fn config(kind: &str, api_base: &str, extra: &str) -> ChannelConfig {
    let specific = match kind {
        "facebook" => format!("page_access_token = \"{PAGE_TOKEN}\"\npage_id = \"{PAGE}\""),
        _ => format!("access_token = \"{IG_TOKEN}\"\nig_account_id = \"{IG}\""),
    };
    toml::from_str(&format!(
        r#"
        id = "{kind}-main"
        kind = "{kind}"
        queue = "support"
        api_base = "{api_base}"
        app_secret = "{SECRET}"
        verify_token = "meatyhamhock"
        {specific}
        {extra}
        "#
    ))
    .unwrap()
}

/// The Graph root of a fake server, with the version as Meta's has it.
fn graph(server: &MockServer) -> String {
    format!("{}/v25.0", server.uri())
}

fn facebook(server: &MockServer) -> MessengerChannel {
    MessengerChannel::new(&config("facebook", &graph(server), "")).unwrap()
}

fn instagram(server: &MockServer) -> MessengerChannel {
    MessengerChannel::new(&config("instagram", &graph(server), "")).unwrap()
}

fn reply(to: &str, text: &str) -> OutgoingMessage {
    OutgoingMessage {
        id: OUR_ID.into(),
        to: to.into(),
        text: text.into(),
        ..OutgoingMessage::default()
    }
}

fn attachment(name: &str, content_type: &str) -> OutgoingAttachment {
    OutgoingAttachment {
        id: format!("att-{name}"),
        filename: name.into(),
        content_type: content_type.into(),
        size: 48_213,
        public_url: format!("https://switchboard.example.com/media/{name}?exp=1795604400&sig=9f2c"),
    }
}

fn sent(message_id: &str, recipient: &str) -> ResponseTemplate {
    ResponseTemplate::new(200)
        .set_body_json(serde_json::json!({"recipient_id": recipient, "message_id": message_id}))
}

fn graph_error(status: u16, code: i64, subcode: Option<i64>, message: &str) -> ResponseTemplate {
    let mut error = serde_json::json!({
        "message": message,
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": "AbCdEfGh123",
    });
    if let Some(s) = subcode {
        error["error_subcode"] = s.into();
    }
    ResponseTemplate::new(status).set_body_json(serde_json::json!({ "error": error }))
}

async fn graph_answers(server: &MockServer, account: &str, answer: ResponseTemplate) {
    Mock::given(method("POST"))
        .and(path(format!("/v25.0/{account}/messages")))
        .respond_with(answer)
        .mount(server)
        .await;
}

fn body(req: &Request) -> serde_json::Value {
    serde_json::from_slice(&req.body).unwrap()
}

// ----- send ---------------------------------------------------------------

/// If this breaks, Messenger replies never reach customers: Meta refuses a
/// request that is not its Send API shape, or that lacks the Page token.
#[tokio::test]
async fn messenger_text_is_posted_exactly_as_the_send_api_wants() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/v25.0/{PAGE}/messages")))
        .and(header(
            "authorization",
            format!("Bearer {PAGE_TOKEN}").as_str(),
        ))
        .and(header("content-type", "application/json"))
        .and(body_json(serde_json::json!({
            "recipient": {"id": PSID},
            "messaging_type": "RESPONSE",
            "message": {"text": "It ships today 📦", "metadata": OUR_ID},
        })))
        .respond_with(sent("m_AG5Hz2Uq7tuwNEhXfYYKj8mJEM", PSID))
        .expect(1)
        .mount(&server)
        .await;
    let receipt = facebook(&server)
        .send(&reply(PSID, "It ships today 📦"))
        .await
        .unwrap();
    assert_eq!(receipt.provider_id, "m_AG5Hz2Uq7tuwNEhXfYYKj8mJEM");
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    assert!(
        requests[0].url.query().is_none(),
        "the token goes in the header, never the URL"
    );
}

/// If this breaks, Instagram replies go to the wrong account, with the wrong
/// token, or carry a field Instagram does not document.
#[tokio::test]
async fn instagram_text_goes_to_the_account_with_its_token() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/v25.0/{IG}/messages")))
        .and(header(
            "authorization",
            format!("Bearer {IG_TOKEN}").as_str(),
        ))
        .and(body_json(serde_json::json!({
            "recipient": {"id": IGSID},
            "messaging_type": "RESPONSE",
            "message": {"text": "We do! Shipping to Norway takes 3–5 days."},
            "reply_to": {"mid": "aWdfaXRlbToxOklHTWVzc2FnZUlE"},
        })))
        .respond_with(sent("aWdfaXRlbToxOklHTWVzc2FnZUlEOjE3ODQx", IGSID))
        .expect(1)
        .mount(&server)
        .await;
    let mut m = reply(IGSID, "We do! Shipping to Norway takes 3–5 days.");
    m.reply_to = Some("aWdfaXRlbToxOklHTWVzc2FnZUlE".into());
    let receipt = instagram(&server).send(&m).await.unwrap();
    assert_eq!(receipt.provider_id, "aWdfaXRlbToxOklHTWVzc2FnZUlEOjE3ODQx");
}

/// If this breaks, replies between 24 hours and 7 days are refused by Meta
/// (or go out untagged, against its policy).
#[tokio::test]
async fn a_human_agent_reply_is_sent_as_a_tagged_message() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/v25.0/{PAGE}/messages")))
        .and(body_json(serde_json::json!({
            "recipient": {"id": PSID},
            "messaging_type": "MESSAGE_TAG",
            "tag": "HUMAN_AGENT",
            "message": {"text": "Sorry for the wait, your refund is done.", "metadata": OUR_ID},
        })))
        .respond_with(sent("m_tagged", PSID))
        .expect(1)
        .mount(&server)
        .await;
    let mut m = reply(PSID, "Sorry for the wait, your refund is done.");
    m.tag = Some("HUMAN_AGENT".into());
    assert_eq!(
        facebook(&server).send(&m).await.unwrap().provider_id,
        "m_tagged"
    );
}

/// If this breaks, attachments are lost, arrive after the text, or the
/// receipt names a message that is not the last one sent.
#[tokio::test]
async fn attachments_go_by_url_one_each_before_the_text() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/v25.0/{PAGE}/messages")))
        .respond_with(|req: &Request| {
            let b = body(req);
            let id = match b["message"]["attachment"]["type"].as_str() {
                Some(t) => format!("m_{t}"),
                None => "m_text".to_string(),
            };
            sent(&id, PSID)
        })
        .expect(3)
        .mount(&server)
        .await;
    let mut m = reply(PSID, "Here is your label and invoice");
    m.attachments = vec![
        attachment("label.png", "image/png"),
        attachment("invoice.pdf", "application/pdf"),
    ];
    let receipt = facebook(&server).send(&m).await.unwrap();
    assert_eq!(receipt.provider_id, "m_text");
    let bodies: Vec<serde_json::Value> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(body)
        .collect();
    assert_eq!(
        bodies[0],
        serde_json::json!({
            "recipient": {"id": PSID},
            "messaging_type": "RESPONSE",
            "message": {
                "attachment": {"type": "image", "payload": {
                    "url": "https://switchboard.example.com/media/label.png?exp=1795604400&sig=9f2c",
                    "is_reusable": false,
                }},
                "metadata": OUR_ID,
            },
        })
    );
    assert_eq!(bodies[1]["message"]["attachment"]["type"], "file");
    assert_eq!(
        bodies[1]["message"]["attachment"]["payload"]["url"],
        "https://switchboard.example.com/media/invoice.pdf?exp=1795604400&sig=9f2c"
    );
    assert_eq!(
        bodies[2]["message"],
        serde_json::json!({"text": "Here is your label and invoice", "metadata": OUR_ID})
    );
}

/// If this breaks, a retry after a half-sent message sends the customer the
/// same picture twice.
#[tokio::test]
async fn a_failure_after_an_attachment_was_sent_is_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/v25.0/{IG}/messages")))
        .respond_with(|req: &Request| {
            if body(req)["message"].get("attachment").is_some() {
                sent("aWdfaXRlbTpwaWM", IGSID)
            } else {
                graph_error(
                    400,
                    613,
                    None,
                    "(#613) Calls to this api have exceeded the rate limit.",
                )
            }
        })
        .mount(&server)
        .await;
    let mut m = reply(IGSID, "and the text");
    m.attachments = vec![attachment("photo.jpg", "image/jpeg")];
    let err = instagram(&server).send(&m).await.unwrap_err();
    assert!(!err.retryable, "{err:?}");
    assert_eq!(err.code.as_deref(), Some("613"));
    assert!(
        err.message
            .starts_with("1 of 2 parts were sent before this failure"),
        "{}",
        err.message
    );
    assert!(err
        .message
        .ends_with("(#613) Calls to this api have exceeded the rate limit."));
}

async fn send_error(kind: &str, answer: ResponseTemplate) -> DeliveryError {
    let server = MockServer::start().await;
    let (account, to) = match kind {
        "facebook" => (PAGE, PSID),
        _ => (IG, IGSID),
    };
    graph_answers(&server, account, answer).await;
    let ch = MessengerChannel::new(&config(kind, &graph(&server), "")).unwrap();
    ch.send(&reply(to, "Hello again")).await.unwrap_err()
}

/// If this breaks, a reply outside Messenger's window is retried for a day
/// instead of telling the agent the window is closed.
#[tokio::test]
async fn messenger_outside_the_window_is_window_closed() {
    let e = send_error(
        "facebook",
        graph_error(
            400,
            10,
            Some(2018278),
            "(#10) This message is sent outside of allowed window.",
        ),
    )
    .await;
    assert!(e.window_closed && !e.retryable && !e.needs_reauth, "{e:?}");
    assert_eq!(e.code.as_deref(), Some("10/2018278"));
    assert_eq!(
        e.message,
        "(#10) This message is sent outside of allowed window."
    );
}

/// If this breaks, Instagram's window refusal is retried or shown as a vague failure.
#[tokio::test]
async fn instagram_outside_the_window_is_window_closed() {
    let e = send_error(
        "instagram",
        graph_error(
            400,
            10,
            Some(2534022),
            "This message is sent outside of allowed window.",
        ),
    )
    .await;
    assert!(e.window_closed && !e.retryable, "{e:?}");
    assert_eq!(e.code.as_deref(), Some("10/2534022"));
}

/// If this breaks, an expired Page token fails every reply without the
/// channel being flagged for re-authorisation.
#[tokio::test]
async fn an_invalid_token_needs_reauth() {
    for kind in ["facebook", "instagram"] {
        let e = send_error(
            kind,
            graph_error(
                401,
                190,
                Some(463),
                "Error validating access token: Session has expired.",
            ),
        )
        .await;
        assert!(
            e.needs_reauth && !e.retryable && !e.window_closed,
            "{kind}: {e:?}"
        );
        assert_eq!(e.code.as_deref(), Some("190/463"));
    }
}

/// If this breaks, a throttled or briefly failing Graph API loses replies
/// (or a retry ignores Meta's Retry-After).
#[tokio::test]
async fn throttling_and_server_errors_are_retried() {
    for (code, status) in [(4, 400), (613, 400), (80007, 400)] {
        let e = send_error(
            "facebook",
            graph_error(status, code, None, "(#4) Application request limit reached"),
        )
        .await;
        assert!(
            e.retryable && !e.window_closed && !e.needs_reauth,
            "{code}: {e:?}"
        );
    }
    let e = send_error(
        "instagram",
        ResponseTemplate::new(500).set_body_string("<html>oops</html>"),
    )
    .await;
    assert!(e.retryable, "{e:?}");
    assert_eq!(e.message, "Graph API answered 500");
    let e = send_error(
        "facebook",
        graph_error(
            400,
            613,
            None,
            "(#613) Calls to this api have exceeded the rate limit.",
        )
        .insert_header("retry-after", "30"),
    )
    .await;
    assert_eq!(e.retry_after, Some(Duration::from_secs(30)));
}

/// If this breaks, the agent sees no reason for a refused reply, or it is retried forever.
#[tokio::test]
async fn other_errors_fail_with_metas_message() {
    let e = send_error(
        "facebook",
        graph_error(400, 100, Some(2018001), "(#100) No matching user found"),
    )
    .await;
    assert!(!e.retryable && !e.window_closed && !e.needs_reauth, "{e:?}");
    assert_eq!(e.message, "(#100) No matching user found");
    assert_eq!(e.code.as_deref(), Some("100/2018001"));
}

/// If this breaks, Meta's outage loses the reply instead of retrying it.
#[tokio::test]
async fn an_unreachable_graph_api_is_retried() {
    // A port nothing listens on (wiremock keeps dropped servers alive in a pool).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}/v25.0");
    let ch = MessengerChannel::new(&config("facebook", &base, "")).unwrap();
    let e = ch.send(&reply(PSID, "hi")).await.unwrap_err();
    assert!(e.retryable, "{e:?}");
}

/// If this breaks, a reply Meta took is sent again (the customer gets it twice).
#[tokio::test]
async fn an_answer_without_message_id_is_final() {
    let e = send_error(
        "facebook",
        ResponseTemplate::new(200).set_body_json(serde_json::json!({"recipient_id": PSID})),
    )
    .await;
    assert!(!e.retryable, "{e:?}");
    assert!(e.message.contains("without a message_id"), "{}", e.message);
}

/// If this breaks, an over-long reply reaches Meta and fails there, or the
/// agent is not told the limit.
#[tokio::test]
async fn text_limits_are_checked_before_any_request() {
    let server = MockServer::start().await;
    graph_answers(&server, PAGE, sent("m_never", PSID)).await;
    graph_answers(&server, IG, sent("m_never", IGSID)).await;
    let e = facebook(&server)
        .send(&reply(PSID, &"ø".repeat(2001)))
        .await
        .unwrap_err();
    assert_eq!(
        e.message,
        "the text is 2001 characters; Messenger allows at most 2000"
    );
    assert!(!e.retryable);
    let e = instagram(&server)
        .send(&reply(IGSID, &"ø".repeat(501)))
        .await
        .unwrap_err();
    assert!(e
        .message
        .starts_with("the text is 1002 bytes in UTF-8; Instagram allows at most 1000 bytes"));
    assert!(server.received_requests().await.unwrap().is_empty());
    // At the limits, they go.
    facebook(&server)
        .send(&reply(PSID, &"ø".repeat(2000)))
        .await
        .unwrap();
    instagram(&server)
        .send(&reply(IGSID, &"ø".repeat(500)))
        .await
        .unwrap();
}

// ----- webhooks -----------------------------------------------------------

fn intake(ch: &MessengerChannel, sim: &SimulatedRequest) -> Result<Vec<Inbound>, IntakeError> {
    let req = RawRequest {
        path: &sim.path,
        query: "",
        headers: (&sim.headers).into(),
        content_type: &sim.content_type,
        body: &sim.body,
    };
    let verified = ch.verify(&req)?;
    ch.normalize(&verified)
}

/// If this breaks, `switchboard simulate` cannot try a Messenger or Instagram channel.
#[tokio::test]
async fn simulated_messages_are_verified_and_normalized() {
    let server = MockServer::start().await;
    for (kind, ch, from) in [
        ("facebook", facebook(&server), PSID),
        ("instagram", instagram(&server), IGSID),
    ] {
        let cfg = config(kind, &graph(&server), "");
        let sim = messenger::simulate_inbound(&cfg, from, "Where is my order? 🧐", "m_sim_42");
        assert_eq!(sim.path, format!("/webhooks/{kind}-main"));
        assert_eq!(sim.content_type, "application/json");
        let (name, value) = &sim.headers[0];
        assert_eq!(name, "x-hub-signature-256");
        assert_eq!(value, &meta::sign(SECRET, &sim.body));
        match intake(&ch, &sim).unwrap().as_slice() {
            [Inbound::Message(m)] => {
                assert_eq!(
                    (m.provider_id.as_str(), m.from.as_str(), m.text.as_str()),
                    ("m_sim_42", from, "Where is my order? 🧐")
                );
            }
            other => panic!("{kind}: {other:?}"),
        }
        // Tampered bytes are refused.
        let mut bad = sim.clone();
        bad.body = String::from_utf8(bad.body)
            .unwrap()
            .replace("m_sim_42", "m_sim_43")
            .into_bytes();
        assert!(matches!(
            intake(&ch, &bad),
            Err(IntakeError::InvalidSignature(_))
        ));
    }
}

/// If this breaks, `simulate --file` with a fixture is refused or misread.
#[tokio::test]
async fn simulated_fixture_payloads_are_verified_and_normalized() {
    let server = MockServer::start().await;
    let fb_cfg = config("facebook", &graph(&server), "");
    let sim =
        messenger::simulate_payload(&fb_cfg, include_bytes!("../fixtures/facebook/batch.json"));
    let items = intake(&facebook(&server), &sim).unwrap();
    assert_eq!(
        items.len(),
        4,
        "every event for our Page, none for the other: {items:?}"
    );
    assert!(matches!(&items[1], Inbound::Watermark(w) if w.status == DeliveryStatus::Delivered));
    assert!(matches!(&items[2], Inbound::Watermark(w) if w.status == DeliveryStatus::Read));

    let ig_cfg = config("instagram", &graph(&server), "");
    let sim =
        messenger::simulate_payload(&ig_cfg, include_bytes!("../fixtures/instagram/echo.json"));
    let items = intake(&instagram(&server), &sim).unwrap();
    assert!(
        matches!(&items[..], [Inbound::Echo(m)] if m.from == IGSID && m.echo_of.is_none()),
        "{items:?}"
    );
    // A Page's webhook posted to the Instagram channel: signed, but not its object.
    let sim =
        messenger::simulate_payload(&ig_cfg, include_bytes!("../fixtures/facebook/text.json"));
    assert_eq!(intake(&instagram(&server), &sim).unwrap(), vec![]);
    // A broken file is still signed, and refused as malformed.
    let sim = messenger::simulate_payload(&ig_cfg, b"{\"object\":\"instagram\",\"entry\":");
    assert!(matches!(
        intake(&instagram(&server), &sim),
        Err(IntakeError::Malformed(_))
    ));
}

// ----- media --------------------------------------------------------------

fn media_client(cfg: &ChannelConfig) -> MediaClient {
    MediaClient::new(
        cfg,
        switchboard::manifest::get(cfg.kind),
        messenger::media_credentials(cfg),
    )
}

/// The first media reference of a webhook carrying one image at `url`.
fn inbound_media(
    ch: &MessengerChannel,
    cfg: &ChannelConfig,
    url: &str,
) -> switchboard::adapters::MediaRef {
    let body = serde_json::json!({
        "object": "page",
        "entry": [{"id": PAGE, "time": 1795600800412_i64, "messaging": [{
            "sender": {"id": PSID}, "recipient": {"id": PAGE}, "timestamp": 1795600800000_i64,
            "message": {"mid": "m_media", "attachments": [{"type": "image", "payload": {"url": url}}]},
        }]}],
    });
    let sim = messenger::simulate_payload(cfg, &messenger::meta_json(&body));
    match intake(ch, &sim).unwrap().as_slice() {
        [Inbound::Message(m)] => m.media[0].clone(),
        other => panic!("{other:?}"),
    }
}

/// If this breaks, customers' photos cannot be downloaded, or the Page token
/// leaks to a CDN.
#[tokio::test]
async fn media_is_fetched_from_an_allowed_host_without_credentials() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v/t1.15752-9/photo.jpg"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "image/jpeg")
                .set_body_bytes(vec![0xff, 0xd8, 0xff, 0xe0]),
        )
        .expect(1)
        .mount(&server)
        .await;
    let cfg = config("facebook", &graph(&server), "media_hosts = [\"127.0.0.1\"]");
    let ch = MessengerChannel::new(&cfg).unwrap();
    let media = inbound_media(
        &ch,
        &cfg,
        &format!("{}/v/t1.15752-9/photo.jpg?oh=1&oe=2", server.uri()),
    );
    let got = media_client(&cfg).fetch(&media).await.unwrap();
    assert_eq!(got.bytes, vec![0xff, 0xd8, 0xff, 0xe0]);
    assert_eq!(got.content_type, "image/jpeg");
    let requests = server.received_requests().await.unwrap();
    assert!(
        requests[0].headers.get("authorization").is_none(),
        "pre-signed CDN links get no credentials"
    );
}

/// If this breaks, a media URL in a webhook makes the gateway call any host.
#[tokio::test]
async fn media_from_a_host_not_allowed_is_refused_before_any_request() {
    let server = MockServer::start().await;
    // Default media_hosts: Meta's CDNs and the api_base host, not this one.
    let cfg = config("instagram", "https://graph.facebook.com/v25.0", "");
    let ch = MessengerChannel::new(&cfg).unwrap();
    let url = format!(
        "http://localhost:{}/ig_messaging_cdn/?asset_id=1",
        server.address().port()
    );
    let body = serde_json::json!({
        "object": "instagram",
        "entry": [{"id": IG, "messaging": [{
            "sender": {"id": IGSID}, "recipient": {"id": IG}, "timestamp": 1795600800000_i64,
            "message": {"mid": "m_story", "attachments": [{"type": "story_mention", "payload": {"url": url}}]},
        }]}],
    });
    let sim = messenger::simulate_payload(&cfg, &messenger::meta_json(&body));
    let media = match intake(&ch, &sim).unwrap().as_slice() {
        [Inbound::Message(m)] => m.media[0].clone(),
        other => panic!("{other:?}"),
    };
    let err = media_client(&cfg).fetch(&media).await.unwrap_err();
    assert_eq!(err, "media host localhost is not allowed");
    assert!(server.received_requests().await.unwrap().is_empty());
}

/// If this breaks, a customer's 50 MB video fills the blob store.
#[tokio::test]
async fn media_over_10_mib_is_refused() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![1u8; 10 * 1024 * 1024 + 1]))
        .mount(&server)
        .await;
    let cfg = config("facebook", &graph(&server), "media_hosts = [\"127.0.0.1\"]");
    let ch = MessengerChannel::new(&cfg).unwrap();
    let media = inbound_media(&ch, &cfg, &format!("{}/v/big.mp4", server.uri()));
    assert!(media_client(&cfg).fetch(&media).await.is_err());
}

// ----- fuzz: the normalizers never panic -----------------------------------

fn fuzz_channel(kind: &str) -> (MessengerChannel, ChannelConfig) {
    let cfg = config(kind, "https://graph.facebook.com/v25.0", "");
    (MessengerChannel::new(&cfg).unwrap(), cfg)
}

/// Every item names a sender and an ID the gateway can key on.
fn check_items(result: Result<Vec<Inbound>, IntakeError>) -> Result<(), TestCaseError> {
    match result {
        Ok(items) => {
            for item in items {
                let (from, id) = match &item {
                    Inbound::Message(m) | Inbound::Echo(m) => {
                        (m.from.clone(), m.provider_id.clone())
                    }
                    Inbound::Reaction(r) => (r.from.clone(), r.provider_id.clone()),
                    Inbound::Retraction { provider_id, from } => {
                        (from.clone(), provider_id.clone())
                    }
                    Inbound::Watermark(w) => (w.from.clone(), "watermark".into()),
                    Inbound::Status(_) | Inbound::Typing { .. } | Inbound::Revoked => {
                        return Err(TestCaseError::fail(
                            "Messenger yields no statuses, typing or revocations",
                        ))
                    }
                };
                prop_assert!(!from.is_empty() && !id.is_empty(), "{item:?}");
            }
            Ok(())
        }
        Err(IntakeError::Malformed(_)) | Err(IntakeError::UnsupportedMediaType(_)) => Ok(()),
        Err(e) => Err(TestCaseError::fail(format!("unexpected error {e:?}"))),
    }
}

/// JSON built from Meta's own vocabulary, so that most cases get deep into an event.
fn meta_like_json() -> impl Strategy<Value = serde_json::Value> {
    let keys = prop::sample::select(vec![
        "object",
        "entry",
        "id",
        "time",
        "messaging",
        "sender",
        "recipient",
        "timestamp",
        "message",
        "mid",
        "text",
        "attachments",
        "type",
        "payload",
        "url",
        "quick_reply",
        "reply_to",
        "story",
        "is_echo",
        "is_deleted",
        "is_unsupported",
        "metadata",
        "app_id",
        "postback",
        "title",
        "reaction",
        "emoji",
        "action",
        "delivery",
        "mids",
        "watermark",
        "read",
        "user_ref",
        "coordinates",
        "lat",
        "long",
        "elements",
        "product",
        "changes",
    ]);
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        prop::sample::select(vec![
            "page",
            "instagram",
            PAGE,
            IG,
            PSID,
            "react",
            "unreact",
            "image",
            "story_mention",
            "fallback",
            "template",
            "location",
            "like_heart",
            "https://cdn.fbsbx.com/a.jpg",
            "/reel/1/",
            "",
            "1795600800000",
        ])
        .prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(6, 96, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::vec((keys.clone(), inner), 0..6).prop_map(|pairs| {
                serde_json::Value::Object(
                    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                )
            }),
        ]
    })
}

/// An `attachments[]` element of a documented type with arbitrary contents.
fn attachment_like() -> impl Strategy<Value = serde_json::Value> {
    let kind = prop::sample::select(vec![
        "image",
        "audio",
        "video",
        "file",
        "fallback",
        "template",
        "location",
        "like_heart",
        "story_mention",
        "share",
        "ig_reel",
        "sticker",
        "",
    ]);
    let payload = prop_oneof![
        Just(None),
        meta_like_json().prop_map(Some),
        prop::sample::select(vec![
            "https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=1",
            "/reel/1/",
            "file:///etc/passwd",
            "http://[::1",
        ])
        .prop_map(|u| Some(serde_json::json!({"url": u, "title": "t"}))),
    ];
    (kind, payload).prop_map(|(kind, payload)| {
        let mut a = serde_json::json!({ "type": kind });
        if let Some(p) = payload {
            a["payload"] = p;
        }
        a
    })
}

/// A `messaging[]` event of a documented type with arbitrary contents
/// (messages, with attachments, most often).
fn event_like(account: &'static str) -> impl Strategy<Value = serde_json::Value> {
    let field = prop::sample::select(vec![
        "message", "message", "message", "message", "postback", "reaction", "delivery", "read",
    ]);
    let flags = (any::<bool>(), any::<bool>(), any::<bool>());
    (
        field,
        meta_like_json(),
        prop_oneof![meta_like_json(), Just(serde_json::json!(1795600800000_i64))],
        flags,
        prop::option::of("[a-zA-Z0-9_]{0,10}"),
        prop::collection::vec(attachment_like(), 0..3),
        reaction_like(),
        any::<i64>(),
    )
        .prop_map(
            move |(
                field,
                inner,
                timestamp,
                (echo, deleted, marked),
                mid,
                attachments,
                reaction,
                watermark,
            )| {
                let mut inner = match inner {
                    serde_json::Value::Object(o) => o,
                    _ => serde_json::Map::new(),
                };
                if let Some(mid) = mid {
                    if field == "delivery" {
                        inner.insert("mids".into(), serde_json::json!([mid.clone(), 7]));
                    }
                    inner.insert("mid".into(), mid.into());
                }
                match field {
                    "message" => {
                        if echo {
                            inner.insert("is_echo".into(), true.into());
                        }
                        if deleted {
                            inner.insert("is_deleted".into(), true.into());
                        }
                        if !attachments.is_empty() {
                            inner.insert("attachments".into(), attachments.into());
                        }
                    }
                    "reaction" => inner.extend(reaction),
                    _ => {}
                }
                if marked {
                    inner.insert("watermark".into(), watermark.into());
                }
                let mut event = serde_json::json!({
                    "sender": {"id": PSID},
                    "recipient": {"id": account},
                    "timestamp": timestamp,
                });
                event[field] = serde_json::Value::Object(inner);
                event
            },
        )
}

/// The fields of a `reaction`: an action, a name and maybe an emoji.
fn reaction_like() -> impl Strategy<Value = serde_json::Map<String, serde_json::Value>> {
    (
        prop::sample::select(vec!["react", "unreact", "poke", ""]),
        prop::sample::select(vec![
            "like", "dislike", "love", "smile", "laugh", "wow", "sad", "angry", "other", "",
        ]),
        prop::option::of(".{0,3}"),
    )
        .prop_map(|(action, name, emoji)| {
            let mut r = serde_json::Map::new();
            r.insert("action".into(), action.into());
            r.insert("reaction".into(), name.into());
            if let Some(e) = emoji {
                r.insert("emoji".into(), e.into());
            }
            r
        })
}

/// A body in the documented shape around arbitrary events.
fn meta_like_body(kind: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let (object, account) = match kind {
        "facebook" => ("page", PAGE),
        _ => ("instagram", IG),
    };
    let event = prop_oneof![1 => meta_like_json(), 3 => event_like(account)];
    prop::collection::vec(event, 0..4).prop_map(move |events| {
        messenger::meta_json(&serde_json::json!({
            "object": object,
            "entry": [{"id": account, "time": 1, "messaging": events}],
        }))
    })
}

fn fuzz(kind: &str, body: &[u8]) -> Result<(), TestCaseError> {
    let (ch, cfg) = fuzz_channel(kind);
    let sim = messenger::simulate_payload(&cfg, body);
    check_items(intake(&ch, &sim))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// If this breaks, one odd webhook crashes intake for the Page.
    #[test]
    fn facebook_normalize_never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzz("facebook", &body)?;
    }

    #[test]
    fn instagram_normalize_never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzz("instagram", &body)?;
    }

    #[test]
    fn facebook_normalize_never_panics_on_meta_like_json(v in meta_like_json()) {
        fuzz("facebook", &messenger::meta_json(&v))?;
    }

    #[test]
    fn instagram_normalize_never_panics_on_meta_like_json(v in meta_like_json()) {
        fuzz("instagram", &messenger::meta_json(&v))?;
    }
}

proptest! {
    // Event-shaped bodies reach the deep paths: more of them.
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn facebook_normalize_never_panics_on_arbitrary_events(body in meta_like_body("facebook")) {
        fuzz("facebook", &body)?;
    }

    #[test]
    fn instagram_normalize_never_panics_on_arbitrary_events(body in meta_like_body("instagram")) {
        fuzz("instagram", &body)?;
    }
}

/// If this breaks, the gateway could build this adapter for a channel of
/// another kind, which would then misread every webhook.
#[test]
fn only_facebook_and_instagram_channels_are_served() {
    let cfg = config("facebook", "https://graph.facebook.com/v25.0", "");
    assert!(MessengerChannel::new(&cfg).is_ok());
    let mut other = cfg.clone();
    other.kind = ChannelKind::Whatsapp;
    assert_eq!(
        MessengerChannel::new(&other).err().unwrap(),
        "channel facebook-main: the Messenger adapter serves facebook and instagram channels, not whatsapp"
    );
}
