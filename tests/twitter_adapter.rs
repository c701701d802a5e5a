//! The X (Twitter) adapter against a fake X API (wiremock, with X's
//! documented request and answer shapes) and a real store: DM sends, media
//! upload, rate limits, the two-hour user tokens and their refresh shared
//! between processes (embedded and Redis), media downloads, and the
//! normalizer under arbitrary input.
//!
//! Each test's doc line says what a user would meet if it broke.

use base64::Engine;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::sync::LazyLock;
use std::time::Duration;
use switchboard::adapters::media::MediaClient;
use switchboard::adapters::twitter::{self, tokens, XChannel};
use switchboard::adapters::{
    Inbound, IntakeError, MediaRef, Outbound, OutgoingAttachment, OutgoingMessage, RawRequest,
    SendReceipt, SimulatedRequest, WebhookIntake,
};
use switchboard::config::ChannelConfig;
use switchboard::domain::ChannelKind;
use switchboard::store::embedded::EmbeddedStore;
use switchboard::store::redis::RedisStore;
use switchboard::store::DynStore;
use wiremock::matchers::{body_json, body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const OUR: &str = "1349812765430517760";
const KERRY: &str = "2874619305";
const SECRET: &str = "TEST_CONSUMER_SECRET";
const OLD: &str = "T0xELWFjY2Vzcy10b2tlbg";
const NEW: &str = "TkVXLWFjY2Vzcy10b2tlbg";
const NEWER: &str = "TkVXRVItYWNjZXNzLXRva2Vu";
const R1: &str = "UjEtcmVmcmVzaC10b2tlbg";
const R2: &str = "UjItcmVmcmVzaC10b2tlbg";
const R3: &str = "UjMtcmVmcmVzaC10b2tlbg";
const CLIENT_ID: &str = "rG9n6402A3dbUJKzXTNX4oWHJ";
const CLIENT_SECRET: &str = "c2VjcmV0LW9mLXRoZS1jbGllbnQ";
const DM_PATH: &str = "/2/dm_conversations/with/2874619305/messages";
const TOKEN_PATH: &str = "/2/oauth2/token";
const UPLOAD_PATH: &str = "/2/media/upload";
const RETENTION: Duration = Duration::from_secs(3600);

fn config(api_base: &str, access_token: &str, extra: &str) -> ChannelConfig {
    toml::from_str(&format!(
        r#"
        id = "x-main"
        kind = "twitter"
        queue = "support"
        api_base = "{api_base}"
        consumer_secret = "{SECRET}"
        user_id = "{OUR}"
        access_token = "{access_token}"
        {extra}
        "#
    ))
    .unwrap()
}

fn refreshing() -> String {
    format!(
        "client_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\nrefresh_token = \"{R1}\""
    )
}

/// An embedded store in a directory of its own (kept as long as the store).
struct Embedded {
    store: DynStore,
    _dir: tempfile::TempDir,
}

fn embedded() -> Embedded {
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = EmbeddedStore::open(dir.path(), RETENTION).unwrap();
    Embedded { store, _dir: dir }
}

fn channel(server: &MockServer, store: &DynStore, extra: &str) -> XChannel {
    XChannel::new(&config(&server.uri(), OLD, extra), store.clone()).unwrap()
}

fn reply(text: &str) -> OutgoingMessage {
    OutgoingMessage {
        id: "5f0c6a1e9b2d4c7e8a3f1b6d9e2c4a7b".into(),
        to: KERRY.into(),
        text: text.into(),
        ..OutgoingMessage::default()
    }
}

fn attachment(server: &MockServer, name: &str, content_type: &str) -> OutgoingAttachment {
    OutgoingAttachment {
        id: format!("att-{name}"),
        filename: name.into(),
        content_type: content_type.into(),
        size: 0,
        public_url: format!("{}/media/{name}?exp=1795604400&sig=9f2c", server.uri()),
    }
}

fn created(event_id: &str) -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_json(json!({
        "data": {"dm_conversation_id": format!("{KERRY}-{OUR}"), "dm_event_id": event_id}
    }))
}

fn unauthorized() -> ResponseTemplate {
    ResponseTemplate::new(401).set_body_json(json!({
        "title": "Unauthorized", "type": "about:blank", "status": 401, "detail": "Unauthorized"
    }))
}

fn tokens_answer(access: &str, refresh: &str, expires_in: i64) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "token_type": "bearer",
        "expires_in": expires_in,
        "access_token": access,
        "scope": "dm.read dm.write tweet.read users.read offline.access",
        "refresh_token": refresh,
    }))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn requests_to(server: &MockServer, p: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.url.path() == p)
        .collect()
}

fn form_of(r: &Request) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(&r.body).unwrap()
}

fn auth_of(r: &Request) -> Option<String> {
    r.headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_string())
}

async fn stored_tokens(store: &DynStore) -> Value {
    let raw = store
        .kv_get(&tokens::kv_key("x-main"))
        .await
        .unwrap()
        .expect("tokens are stored");
    serde_json::from_str(&raw).unwrap()
}

// ----- sends ---------------------------------------------------------------

/// If this breaks, agents' replies never reach the customer on X.
#[tokio::test]
async fn a_text_dm_is_posted_with_the_user_token() {
    let server = MockServer::start().await;
    let s = embedded();
    Mock::given(method("POST"))
        .and(path(DM_PATH))
        .and(header("authorization", bearer(OLD).as_str()))
        .and(body_json(json!({"text": "It ships today \u{1f4e6}"})))
        .respond_with(created("1861149375081234460"))
        .expect(1)
        .mount(&server)
        .await;
    let receipt = channel(&server, &s.store, "")
        .send(&reply("It ships today \u{1f4e6}"))
        .await
        .unwrap();
    assert_eq!(
        receipt,
        SendReceipt {
            provider_id: "1861149375081234460".into(),
            other_provider_ids: vec![],
        }
    );
    // Nothing is stored for a channel that does not refresh.
    assert_eq!(
        s.store.kv_get(&tokens::kv_key("x-main")).await.unwrap(),
        None
    );
}

fn multipart_field(body: &[u8], name: &str) -> Option<Vec<u8>> {
    let marker = format!("name=\"{name}\"");
    let start = body
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())?;
    let rest = &body[start..];
    let value_start = rest.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let value = &rest[value_start..];
    let end = value.windows(4).position(|w| w == b"\r\n--")?;
    Some(value[..end].to_vec())
}

fn field_text(r: &Request, name: &str) -> Option<String> {
    multipart_field(&r.body, name).map(|v| String::from_utf8(v).unwrap())
}

fn command(c: &'static str) -> impl Fn(&Request) -> bool {
    move |r: &Request| field_text(r, "command").as_deref() == Some(c)
}

/// If this breaks, photos agents attach never reach the customer, or go
/// without the media ID X gave them.
#[tokio::test]
async fn an_attachment_is_uploaded_first_and_sent_with_its_media_id() {
    let server = MockServer::start().await;
    let s = embedded();
    let image: Vec<u8> = (0..48_213u32).map(|n| (n % 251) as u8).collect();
    Mock::given(method("GET"))
        .and(path("/media/label.png"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "image/png")
                .set_body_bytes(image.clone()),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(UPLOAD_PATH))
        .and(command("INIT"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "data": {"id": "1880028106020515840", "media_key": "3_1880028106020515840", "expires_after_secs": 86400}
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(UPLOAD_PATH))
        .and(command("APPEND"))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(UPLOAD_PATH))
        .and(command("FINALIZE"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "data": {"id": "1880028106020515840", "media_key": "3_1880028106020515840", "size": 48213, "expires_after_secs": 86400}
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(DM_PATH))
        .and(header("authorization", bearer(OLD).as_str()))
        .and(body_json(json!({
            "text": "Here is your return label",
            "attachments": [{"media_id": "1880028106020515840"}],
        })))
        .respond_with(created("1861149375081234461"))
        .expect(1)
        .mount(&server)
        .await;
    let mut m = reply("Here is your return label");
    m.attachments = vec![attachment(&server, "label.png", "image/png")];
    let receipt = channel(&server, &s.store, "").send(&m).await.unwrap();
    assert_eq!(receipt.provider_id, "1861149375081234461");

    let all = server.received_requests().await.unwrap();
    let order: Vec<String> = all
        .iter()
        .map(|r| match r.url.path() {
            UPLOAD_PATH => field_text(r, "command").unwrap(),
            other => other.to_string(),
        })
        .collect();
    assert_eq!(
        order,
        ["/media/label.png", "INIT", "APPEND", "FINALIZE", DM_PATH]
    );
    // Our own link gets no X token; every X call does.
    assert_eq!(auth_of(&all[0]), None);
    for r in &all[1..] {
        assert_eq!(auth_of(r), Some(bearer(OLD)), "{}", r.url);
    }
    let init = &all[1];
    assert_eq!(field_text(init, "media_type").as_deref(), Some("image/png"));
    assert_eq!(
        field_text(init, "media_category").as_deref(),
        Some("dm_image")
    );
    assert_eq!(field_text(init, "total_bytes").as_deref(), Some("48213"));
    let append = &all[2];
    assert_eq!(
        field_text(append, "media_id").as_deref(),
        Some("1880028106020515840")
    );
    assert_eq!(field_text(append, "segment_index").as_deref(), Some("0"));
    assert_eq!(multipart_field(&append.body, "media"), Some(image));
    assert_eq!(
        field_text(&all[3], "media_id").as_deref(),
        Some("1880028106020515840")
    );
}

/// If this breaks, videos are sent before X has processed them (and X
/// refuses the DM), or a v1.1-shaped upload answer loses the media ID.
#[tokio::test]
async fn a_video_waits_for_processing_and_needs_no_text() {
    let server = MockServer::start().await;
    let s = embedded();
    Mock::given(method("GET"))
        .and(path("/media/clip.mp4"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![7u8; 5 * 1024 * 1024]))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(UPLOAD_PATH))
        .and(command("INIT"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "media_id": 601413451156586496u64, "media_id_string": "601413451156586496", "expires_after_secs": 3599
        })))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(UPLOAD_PATH))
        .and(command("APPEND"))
        .respond_with(ResponseTemplate::new(204))
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(UPLOAD_PATH))
        .and(command("FINALIZE"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "data": {"id": "601413451156586496", "processing_info": {"state": "pending", "check_after_secs": 1}}
        })))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(UPLOAD_PATH))
        .and(wiremock::matchers::query_param("command", "STATUS"))
        .and(wiremock::matchers::query_param(
            "media_id",
            "601413451156586496",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "data": {"id": "601413451156586496", "processing_info": {"state": "succeeded", "progress_percent": 100}}
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(DM_PATH))
        .and(body_json(
            json!({"attachments": [{"media_id": "601413451156586496"}]}),
        ))
        .respond_with(created("1861149375081234462"))
        .expect(1)
        .mount(&server)
        .await;
    let mut m = reply("");
    m.attachments = vec![attachment(&server, "clip.mp4", "video/mp4")];
    let receipt = channel(&server, &s.store, "").send(&m).await.unwrap();
    assert_eq!(receipt.provider_id, "1861149375081234462");
    let uploads = requests_to(&server, UPLOAD_PATH).await;
    let init = &uploads[0];
    assert_eq!(
        field_text(init, "media_category").as_deref(),
        Some("dm_video")
    );
    let appends: Vec<&Request> = uploads
        .iter()
        .filter(|r| field_text(r, "command").as_deref() == Some("APPEND"))
        .collect();
    assert_eq!(
        field_text(appends[1], "segment_index").as_deref(),
        Some("1")
    );
    assert_eq!(
        multipart_field(&appends[0].body, "media").unwrap().len()
            + multipart_field(&appends[1].body, "media").unwrap().len(),
        5 * 1024 * 1024
    );
}

/// If this breaks, a reply X cannot carry is sent half (or refused by X).
#[tokio::test]
async fn unsendable_messages_make_no_request() {
    let server = MockServer::start().await;
    let s = embedded();
    let ch = channel(&server, &s.store, &refreshing());
    let long = ch.send(&reply(&"a".repeat(10_001))).await.unwrap_err();
    assert!(!long.retryable && !long.needs_reauth);
    assert_eq!(
        long.message,
        "the text is 10001 characters; X allows at most 10000"
    );
    let mut two = reply("two");
    two.attachments = vec![
        attachment(&server, "a.png", "image/png"),
        attachment(&server, "b.png", "image/png"),
    ];
    let e = ch.send(&two).await.unwrap_err();
    assert!(!e.retryable);
    assert_eq!(e.message, "X direct messages carry one attachment");
    assert!(server.received_requests().await.unwrap().is_empty());
}

/// If this breaks, we hammer X while rate limited (and get the app
/// suspended), or wait far longer than X asked.
#[tokio::test]
async fn a_rate_limited_send_is_retried_at_xs_reset_time() {
    let server = MockServer::start().await;
    let s = embedded();
    let reset = chrono::Utc::now().timestamp() + 120;
    Mock::given(method("POST"))
        .and(path(DM_PATH))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("x-rate-limit-limit", "200")
                .insert_header("x-rate-limit-remaining", "0")
                .insert_header("x-rate-limit-reset", reset.to_string().as_str())
                .set_body_json(json!({"title": "Too Many Requests", "detail": "Too Many Requests", "type": "about:blank", "status": 429})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let e = channel(&server, &s.store, "")
        .send(&reply("hello"))
        .await
        .unwrap_err();
    assert!(e.retryable && !e.needs_reauth, "{e:?}");
    let after = e.retry_after.expect("a retry_after").as_secs();
    assert!((117..=120).contains(&after), "{after}");
}

/// If this breaks, a blip at X fails a reply for good, or X's reason for a
/// refusal is lost.
#[tokio::test]
async fn server_errors_and_network_failures_are_retried_client_errors_are_final() {
    let server = MockServer::start().await;
    let s = embedded();
    Mock::given(method("POST"))
        .and(path(DM_PATH))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(DM_PATH))
        .respond_with(ResponseTemplate::new(403).set_body_json(json!({
            "detail": "You cannot send messages to users who are not following you.",
            "title": "Forbidden", "type": "about:blank", "status": 403
        })))
        .mount(&server)
        .await;
    let ch = channel(&server, &s.store, "");
    let e = ch.send(&reply("hello")).await.unwrap_err();
    assert!(e.retryable, "{e:?}");
    let e = ch.send(&reply("hello")).await.unwrap_err();
    assert!(!e.retryable && !e.needs_reauth, "{e:?}");
    assert_eq!(
        e.message,
        "You cannot send messages to users who are not following you."
    );
    // Nothing listens on port 9.
    let down = XChannel::new(&config("http://127.0.0.1:9", OLD, ""), s.store.clone()).unwrap();
    let e = down.send(&reply("hello")).await.unwrap_err();
    assert!(e.retryable, "{e:?}");
}

// ----- tokens ----------------------------------------------------------------

async fn mount_dm_for(server: &MockServer, token: &str, respond: ResponseTemplate) {
    Mock::given(method("POST"))
        .and(path(DM_PATH))
        .and(header("authorization", bearer(token).as_str()))
        .respond_with(respond)
        .mount(server)
        .await;
}

async fn mount_refresh(server: &MockServer, from: &str, respond: ResponseTemplate) {
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .and(body_string_contains(format!("refresh_token={from}")))
        .respond_with(respond)
        .mount(server)
        .await;
}

/// If this breaks, every X channel stops sending two hours after start-up,
/// or a second process keeps using (and refreshing with) spent tokens.
#[tokio::test]
async fn a_refused_token_is_refreshed_once_and_the_rotated_tokens_are_shared() {
    let server = MockServer::start().await;
    let s = embedded();
    mount_dm_for(&server, OLD, unauthorized()).await;
    mount_dm_for(&server, NEW, created("1861149375081234463")).await;
    mount_refresh(&server, R1, tokens_answer(NEW, R2, 7200)).await;
    let a = channel(&server, &s.store, &refreshing());
    let receipt = a.send(&reply("hello")).await.unwrap();
    assert_eq!(receipt.provider_id, "1861149375081234463");

    let refreshes = requests_to(&server, TOKEN_PATH).await;
    assert_eq!(refreshes.len(), 1);
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    assert_eq!(auth_of(&refreshes[0]), Some(format!("Basic {basic}")));
    assert_eq!(
        refreshes[0]
            .headers
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap(),
        "application/x-www-form-urlencoded"
    );
    let mut form = form_of(&refreshes[0]);
    form.sort();
    assert_eq!(
        form,
        vec![
            ("client_id".to_string(), CLIENT_ID.to_string()),
            ("grant_type".to_string(), "refresh_token".to_string()),
            ("refresh_token".to_string(), R1.to_string()),
        ]
    );
    let dms: Vec<Option<String>> = requests_to(&server, DM_PATH)
        .await
        .iter()
        .map(auth_of)
        .collect();
    assert_eq!(dms, vec![Some(bearer(OLD)), Some(bearer(NEW))]);

    let stored = stored_tokens(&s.store).await;
    assert_eq!(stored["v"], "V1");
    assert_eq!(stored["access_token"], NEW);
    assert_eq!(stored["refresh_token"], R2);
    let expires: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(stored["expires_at"].clone()).unwrap();
    let left = (expires - chrono::Utc::now()).num_seconds();
    assert!((7100..=7200).contains(&left), "{left}");

    // Another process (a channel built from the same configuration, on the
    // same store) uses the rotated token at once, without refreshing.
    let b = channel(&server, &s.store, &refreshing());
    assert_eq!(b.current_token().await.unwrap(), NEW);
    b.send(&reply("again")).await.unwrap();
    let dms = requests_to(&server, DM_PATH).await;
    assert_eq!(auth_of(dms.last().unwrap()), Some(bearer(NEW)));
    assert_eq!(requests_to(&server, TOKEN_PATH).await.len(), 1);
}

/// If this breaks, a token about to expire is used until X refuses it (a
/// failed request on every send at the two-hour mark).
#[tokio::test]
async fn a_token_about_to_expire_is_refreshed_before_sending() {
    let server = MockServer::start().await;
    let s = embedded();
    mount_dm_for(&server, OLD, unauthorized()).await;
    mount_dm_for(&server, NEW, created("1861149375081234464")).await;
    mount_dm_for(&server, NEWER, created("1861149375081234465")).await;
    // X answers a token that lasts two minutes: inside the five-minute margin.
    mount_refresh(&server, R1, tokens_answer(NEW, R2, 120)).await;
    mount_refresh(&server, R2, tokens_answer(NEWER, R3, 7200)).await;
    let ch = channel(&server, &s.store, &refreshing());
    ch.send(&reply("first")).await.unwrap();
    let receipt = ch.send(&reply("second")).await.unwrap();
    assert_eq!(receipt.provider_id, "1861149375081234465");
    let dms: Vec<Option<String>> = requests_to(&server, DM_PATH)
        .await
        .iter()
        .map(auth_of)
        .collect();
    // The second send never tried the expiring token.
    assert_eq!(
        dms,
        vec![Some(bearer(OLD)), Some(bearer(NEW)), Some(bearer(NEWER))]
    );
    assert_eq!(stored_tokens(&s.store).await["refresh_token"], R3);
    assert_eq!(ch.current_token().await.unwrap(), NEWER);
}

/// If this breaks, a channel whose X authorization is gone keeps failing
/// quietly instead of asking to be re-authorised.
#[tokio::test]
async fn a_failed_refresh_needs_reauth() {
    let server = MockServer::start().await;
    let s = embedded();
    mount_dm_for(&server, OLD, unauthorized()).await;
    mount_refresh(
        &server,
        R1,
        ResponseTemplate::new(400).set_body_json(json!({
            "error": "invalid_request",
            "error_description": "Value passed for the token was invalid."
        })),
    )
    .await;
    let e = channel(&server, &s.store, &refreshing())
        .send(&reply("hello"))
        .await
        .unwrap_err();
    assert!(e.needs_reauth && !e.retryable, "{e:?}");
    assert_eq!(
        e.message,
        "X refused to refresh the access token (invalid_request: Value passed for the token was invalid.): re-authorise the channel"
    );
    assert_eq!(requests_to(&server, DM_PATH).await.len(), 1);
    // Nothing was stored: the configured tokens still stand for the operator to replace.
    assert_eq!(
        s.store.kv_get(&tokens::kv_key("x-main")).await.unwrap(),
        None
    );
}

/// If this breaks, a refused refreshed token loops, or is retried for a day.
#[tokio::test]
async fn still_refused_after_a_refresh_needs_reauth_and_is_not_retried() {
    let server = MockServer::start().await;
    let s = embedded();
    mount_dm_for(&server, OLD, unauthorized()).await;
    mount_dm_for(&server, NEW, unauthorized()).await;
    mount_refresh(&server, R1, tokens_answer(NEW, R2, 7200)).await;
    let e = channel(&server, &s.store, &refreshing())
        .send(&reply("hello"))
        .await
        .unwrap_err();
    assert!(e.needs_reauth && !e.retryable, "{e:?}");
    assert_eq!(requests_to(&server, DM_PATH).await.len(), 2);
    assert_eq!(requests_to(&server, TOKEN_PATH).await.len(), 1);
}

/// If this breaks, a channel without refresh settings cannot tell the
/// operator its token has expired.
#[tokio::test]
async fn without_refresh_settings_a_refused_token_needs_reauth_at_once() {
    let server = MockServer::start().await;
    let s = embedded();
    mount_dm_for(&server, OLD, unauthorized()).await;
    let e = channel(&server, &s.store, "")
        .send(&reply("hello"))
        .await
        .unwrap_err();
    assert!(e.needs_reauth && !e.retryable, "{e:?}");
    assert_eq!(requests_to(&server, TOKEN_PATH).await.len(), 0);
}

/// If this breaks, an X outage at the token endpoint marks a healthy channel
/// as needing re-authorisation.
#[tokio::test]
async fn a_token_endpoint_outage_is_retried_not_reauth() {
    let server = MockServer::start().await;
    let s = embedded();
    mount_dm_for(&server, OLD, unauthorized()).await;
    mount_refresh(
        &server,
        R1,
        ResponseTemplate::new(503).insert_header("retry-after", "12"),
    )
    .await;
    let e = channel(&server, &s.store, &refreshing())
        .send(&reply("hello"))
        .await
        .unwrap_err();
    assert!(e.retryable && !e.needs_reauth, "{e:?}");
    assert_eq!(e.retry_after, Some(Duration::from_secs(12)));
}

/// If this breaks, an X outage at the token endpoint stops sends although
/// the token in hand still has minutes to run.
#[tokio::test]
async fn an_expiring_token_is_still_used_while_the_refresh_is_unavailable() {
    let server = MockServer::start().await;
    let s = embedded();
    mount_dm_for(&server, OLD, unauthorized()).await;
    mount_dm_for(&server, NEW, created("1861149375081234471")).await;
    mount_refresh(&server, R1, tokens_answer(NEW, R2, 120)).await;
    mount_refresh(&server, R2, ResponseTemplate::new(503)).await;
    let ch = channel(&server, &s.store, &refreshing());
    ch.send(&reply("first")).await.unwrap();
    let receipt = ch.send(&reply("second")).await.unwrap();
    assert_eq!(receipt.provider_id, "1861149375081234471");
    // It tried to refresh before sending, and will again next time.
    assert_eq!(requests_to(&server, TOKEN_PATH).await.len(), 2);
    assert_eq!(stored_tokens(&s.store).await["refresh_token"], R2);
}

/// If this breaks, re-authorising a channel (new tokens in its
/// configuration) has no effect: the spent stored chain keeps winning.
#[tokio::test]
async fn newly_configured_tokens_win_over_the_stored_chain() {
    let server = MockServer::start().await;
    let s = embedded();
    mount_dm_for(&server, OLD, unauthorized()).await;
    mount_dm_for(&server, NEW, created("1861149375081234466")).await;
    mount_refresh(&server, R1, tokens_answer(NEW, R2, 7200)).await;
    channel(&server, &s.store, &refreshing())
        .send(&reply("hello"))
        .await
        .unwrap();
    // The operator re-authorised and configured fresh tokens.
    let fresh = XChannel::new(
        &config(
            &server.uri(),
            "RlJFU0gtYWNjZXNz",
            &format!("client_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\nrefresh_token = \"RlJFU0gtcmVmcmVzaA\""),
        ),
        s.store.clone(),
    )
    .unwrap();
    assert_eq!(fresh.current_token().await.unwrap(), "RlJFU0gtYWNjZXNz");
    // The old configuration still follows its own chain.
    assert_eq!(
        channel(&server, &s.store, &refreshing())
            .current_token()
            .await
            .unwrap(),
        NEW
    );
}

/// Several channels of one store (processes) refused at the same moment:
/// exactly one refresh, and every send goes out with the new token.
async fn race_refused_token(stores: Vec<DynStore>) {
    let server = MockServer::start().await;
    mount_dm_for(&server, OLD, unauthorized()).await;
    mount_dm_for(&server, NEW, created("1861149375081234467")).await;
    // Slow enough that the others are refused while it is under way.
    mount_refresh(
        &server,
        R1,
        tokens_answer(NEW, R2, 7200).set_delay(Duration::from_millis(600)),
    )
    .await;
    // R2 must never be used by a second refresh: X would have invalidated R1.
    mount_refresh(
        &server,
        R2,
        ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_request"})),
    )
    .await;
    let channels: Vec<XChannel> = stores
        .iter()
        .map(|s| channel(&server, s, &refreshing()))
        .collect();
    let msg = reply("hello");
    let results = futures_util::future::join_all(channels.iter().map(|c| c.send(&msg))).await;
    for r in &results {
        assert_eq!(
            r.as_ref().map(|r| r.provider_id.as_str()),
            Ok("1861149375081234467")
        );
    }
    assert_eq!(requests_to(&server, TOKEN_PATH).await.len(), 1);
    let refused = requests_to(&server, DM_PATH)
        .await
        .iter()
        .filter(|r| auth_of(r) == Some(bearer(OLD)))
        .count();
    assert_eq!(refused, channels.len(), "every channel was refused once");
    assert_eq!(stored_tokens(&stores[0]).await["access_token"], NEW);
}

/// If this breaks, two gateway processes on one embedded store refresh at
/// once; X rotates the refresh token, so one of them breaks the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_channels_on_the_embedded_store_refresh_once() {
    let s = embedded();
    race_refused_token(vec![s.store.clone(), s.store.clone(), s.store.clone()]).await;
}

fn redis_url() -> String {
    std::env::var("SWITCHBOARD_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_string())
}

/// Deletes every key under its prefix when dropped, also when a test panics.
struct RedisKeys {
    prefix: String,
}

impl Drop for RedisKeys {
    fn drop(&mut self) {
        use redis::Commands;
        let Ok(client) = redis::Client::open(redis_url()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = match conn.scan_match(format!("{}:*", self.prefix)) {
            Ok(iter) => iter.collect(),
            Err(_) => return,
        };
        for chunk in keys.chunks(500) {
            let _: redis::RedisResult<()> = conn.del(chunk);
        }
    }
}

/// If this breaks, gateway processes sharing Redis each refresh the token,
/// and all but one are left with a spent refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_processes_on_redis_refresh_once() {
    let keys = RedisKeys {
        prefix: format!("sbtest:{}", uuid::Uuid::new_v4().simple()),
    };
    let mut stores = vec![];
    for _ in 0..3 {
        let s: DynStore = RedisStore::connect(&redis_url(), &keys.prefix, RETENTION)
            .await
            .expect("connect to Redis (is it running?)");
        stores.push(s);
    }
    race_refused_token(stores).await;
}

/// If this breaks, processes whose tokens expire together refresh together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_channels_refresh_an_expiring_token_once() {
    let server = MockServer::start().await;
    let s = embedded();
    mount_dm_for(&server, OLD, unauthorized()).await;
    mount_dm_for(&server, NEW, created("1861149375081234468")).await;
    mount_dm_for(&server, NEWER, created("1861149375081234469")).await;
    mount_refresh(&server, R1, tokens_answer(NEW, R2, 60)).await;
    mount_refresh(
        &server,
        R2,
        tokens_answer(NEWER, R3, 7200).set_delay(Duration::from_millis(600)),
    )
    .await;
    mount_refresh(
        &server,
        R3,
        ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_request"})),
    )
    .await;
    channel(&server, &s.store, &refreshing())
        .send(&reply("first"))
        .await
        .unwrap();
    // Now the stored token expires within a minute: every channel wants a new one.
    let channels: Vec<XChannel> = (0..3)
        .map(|_| channel(&server, &s.store, &refreshing()))
        .collect();
    let msg = reply("second");
    let results = futures_util::future::join_all(channels.iter().map(|c| c.send(&msg))).await;
    for r in &results {
        assert_eq!(
            r.as_ref().map(|r| r.provider_id.as_str()),
            Ok("1861149375081234469")
        );
    }
    let refreshes: Vec<String> = requests_to(&server, TOKEN_PATH)
        .await
        .iter()
        .map(|r| {
            form_of(r)
                .into_iter()
                .find(|(k, _)| k == "refresh_token")
                .unwrap()
                .1
        })
        .collect();
    assert_eq!(refreshes, vec![R1.to_string(), R2.to_string()]);
}

// ----- media -----------------------------------------------------------------

/// If this breaks, photos customers send on X are not downloaded (X wants
/// the user token), or the token leaks to other hosts.
#[tokio::test]
async fn inbound_media_is_fetched_with_the_current_token() {
    let server = MockServer::start().await;
    let s = embedded();
    let dm_path = "/1.1/ton/data/dm/1861149375081234402/1861149370012345678/Qm3xT9bZ.jpg";
    Mock::given(method("GET"))
        .and(path(dm_path))
        .and(header("authorization", bearer(NEW).as_str()))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "image/jpeg")
                .set_body_bytes(vec![0xff, 0xd8, 0xff, 0xe0]),
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/too-large.jpg"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![0u8; 10 * 1024 * 1024 + 1]))
        .mount(&server)
        .await;
    mount_dm_for(&server, OLD, unauthorized()).await;
    mount_dm_for(&server, NEW, created("1861149375081234470")).await;
    mount_refresh(&server, R1, tokens_answer(NEW, R2, 7200)).await;
    let cfg = config(&server.uri(), OLD, &refreshing());
    let ch = XChannel::new(&cfg, s.store.clone()).unwrap();
    ch.send(&reply("rotate the token")).await.unwrap();

    // What the gateway does: the media client with the token in force.
    let mut media = MediaClient::new(
        &cfg,
        switchboard::manifest::get(ChannelKind::Twitter),
        twitter::media_credentials(&cfg),
    )
    .with_credential_hosts(vec!["ton.twitter.com".into()]);
    media.credentials =
        switchboard::adapters::media::Credentials::Bearer(ch.current_token().await.unwrap());
    let fetched = media
        .fetch(&MediaRef {
            url: format!("{}{dm_path}", server.uri()),
            ..MediaRef::default()
        })
        .await
        .unwrap();
    assert_eq!(fetched.bytes, vec![0xff, 0xd8, 0xff, 0xe0]);
    assert_eq!(fetched.content_type, "image/jpeg");
    let too_large = media
        .fetch(&MediaRef {
            url: format!("{}/too-large.jpg", server.uri()),
            ..MediaRef::default()
        })
        .await
        .unwrap_err();
    assert_eq!(too_large, "media is larger than 10485760 bytes");
    // The configured (spent) token is what the static credentials would carry.
    match twitter::media_credentials(&cfg) {
        switchboard::adapters::media::Credentials::Bearer(t) => assert_eq!(t, OLD),
        other => panic!("{other:?}"),
    }
}

// ----- intake ----------------------------------------------------------------

fn intake(ch: &XChannel, sim: &SimulatedRequest) -> Result<Vec<Inbound>, IntakeError> {
    let req = RawRequest {
        path: &sim.path,
        query: "",
        headers: (&sim.headers).into(),
        content_type: &sim.content_type,
        body: &sim.body,
    };
    let v = ch.verify(&req)?;
    ch.normalize(&v)
}

/// If this breaks, `simulate --file fixtures/twitter/...` does not show
/// what the fixture says.
#[test]
fn every_fixture_goes_through_verify_and_normalize() {
    let s = embedded();
    let cfg = config("https://api.x.com", OLD, "");
    let ch = XChannel::new(&cfg, s.store.clone()).unwrap();
    let dir = format!("{}/fixtures/twitter", env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        seen += 1;
        let body = std::fs::read(&p).unwrap();
        let items = intake(&ch, &twitter::simulate_payload(&cfg, &body))
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let name = p.file_stem().unwrap().to_str().unwrap();
        let expected = match name {
            "text" | "media" | "quick_reply" => 1,
            "echo" | "typing" | "read" | "revoke" => 1,
            "batch" => 3,
            "other_account" => 0,
            other => panic!("a fixture without an expectation here: {other}"),
        };
        assert_eq!(items.len(), expected, "{name}: {items:?}");
    }
    assert_eq!(seen, 9);
}

/// If this breaks, the CRC answer X receives over HTTP is wrong.
#[test]
fn the_crc_handshake_answers_json() {
    let s = embedded();
    let ch = XChannel::new(&config("https://api.x.com", OLD, ""), s.store.clone()).unwrap();
    let ack = ch
        .handshake("crc_token=challenge_string")
        .expect("X has a handshake")
        .unwrap();
    assert_eq!((ack.status, ack.content_type), (200, "application/json"));
    assert_eq!(
        String::from_utf8(ack.body).unwrap(),
        r#"{"response_token":"sha256=up1n6pdhR9u5Q3J9tQx1h/D3GpBw+nRvrCiWJWPFY8E="}"#
    );
}

static FUZZ: LazyLock<(XChannel, ChannelConfig, Embedded)> = LazyLock::new(|| {
    let s = embedded();
    let cfg = config("https://api.x.com", OLD, "");
    (XChannel::new(&cfg, s.store.clone()).unwrap(), cfg, s)
});

fn fuzz(body: &[u8]) -> Result<(), TestCaseError> {
    let (ch, cfg, _) = &*FUZZ;
    match intake(ch, &twitter::simulate_payload(cfg, body)) {
        Ok(items) => {
            for item in items {
                match item {
                    Inbound::Message(m) | Inbound::Echo(m) => {
                        prop_assert!(!m.provider_id.is_empty());
                        prop_assert!(!m.from.is_empty());
                        for media in &m.media {
                            prop_assert!(media.url.starts_with("https://"));
                        }
                    }
                    Inbound::Typing { from, .. } => prop_assert!(!from.is_empty()),
                    Inbound::Watermark(w) => prop_assert!(!w.from.is_empty()),
                    Inbound::Revoked => {}
                    other => prop_assert!(false, "X yields no {other:?}"),
                }
            }
            Ok(())
        }
        Err(IntakeError::Malformed(_)) => Ok(()),
        Err(e) => Err(TestCaseError::fail(format!("{e:?}"))),
    }
}

fn json_like() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![
            OUR,
            KERRY,
            "",
            "1795600800000",
            "https://ton.twitter.com/a.jpg",
            "message_create",
            "https://t.co/x"
        ])
        .prop_map(Value::from),
        ".{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "type",
                        "id",
                        "created_timestamp",
                        "message_create",
                        "sender_id",
                        "target",
                        "recipient_id",
                        "message_data",
                        "text",
                        "attachment",
                        "media",
                        "media_url_https",
                        "url",
                        "entities",
                        "urls",
                        "expanded_url",
                        "quick_reply_response",
                        "metadata",
                        "last_read_event_id",
                        "revoke",
                        "source",
                        "user_id",
                        "name",
                    ]),
                    inner
                ),
                0..5
            )
            .prop_map(|fields| Value::Object(
                fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect()
            )),
        ]
    })
}

/// A body in the documented shape around arbitrary events.
fn x_like_body() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![
            "direct_message_events",
            "direct_message_indicate_typing_events",
            "direct_message_mark_read_events",
            "user_event",
        ]),
        prop::collection::vec(json_like(), 0..4),
        json_like(),
        any::<bool>(),
    )
        .prop_map(|(key, events, users, ours)| {
            let mut body = json!({"users": users});
            if ours {
                body["for_user_id"] = json!(OUR);
            }
            body[key] = if key == "user_event" {
                json!({"revoke": events.first().cloned().unwrap_or(Value::Null)})
            } else {
                Value::from(events)
            };
            body.to_string().into_bytes()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// If this breaks, one odd webhook crashes intake for the channel.
    #[test]
    fn normalize_never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzz(&body)?;
    }

    #[test]
    fn normalize_never_panics_on_arbitrary_json(v in json_like()) {
        fuzz(v.to_string().as_bytes())?;
    }
}

proptest! {
    // Event-shaped bodies reach the deep paths: more of them.
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn normalize_never_panics_on_x_shaped_events(body in x_like_body()) {
        fuzz(&body)?;
    }
}

/// If this breaks, the gateway could build this adapter for another kind of channel.
#[test]
fn only_twitter_channels_are_served() {
    let s = embedded();
    let mut cfg = config("https://api.x.com", OLD, "");
    assert!(XChannel::new(&cfg, s.store.clone()).is_ok());
    cfg.kind = ChannelKind::Facebook;
    assert!(XChannel::new(&cfg, s.store.clone()).is_err());
}
