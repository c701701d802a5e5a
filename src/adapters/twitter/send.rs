//! Sending a direct message through X API v2 (providers.md A6.4).
//!
//! 1. Checks before any request: the recipient is an X user ID (digits, it
//!    goes into the path), at most one attachment ("Only 1 attachment is
//!    supported"), at most 10,000 characters of text (the manifest's
//!    `[text]`), an attachment X takes as DM media (image, GIF, video).
//! 2. The attachment is read from its public link (our own `/media/...`) and
//!    uploaded with the chunked media upload, documented for every media type:
//!    `POST {api_base}/2/media/upload` multipart `command=INIT` (`media_type`,
//!    `total_bytes`, `media_category` = `dm_image`, `dm_gif` or `dm_video`),
//!    then `APPEND` (`media_id`, `segment_index`, `media`) per 4 MiB, then
//!    `FINALIZE`; while FINALIZE (or `GET ...?command=STATUS`) says the media
//!    is `pending` or `in_progress`, it waits `check_after_secs`. The media ID
//!    is `data.id` (v2), or `media_id_string` in v1.1-shaped answers.
//! 3. `POST {api_base}/2/dm_conversations/with/{participant_id}/messages`
//!    with `{"text": ..., "attachments": [{"media_id": ...}]}` (no `text` when
//!    there is only the attachment). The receipt is `data.dm_event_id`, the ID
//!    the DM's echo carries in the Account Activity webhook.
//!
//! Every request carries the user access token as a bearer; a 401 refreshes
//! it once ([`super::tokens`]) and tries again. Errors, by what to do next:
//! 429 is retried after `x-rate-limit-reset` (epoch seconds) or
//! `Retry-After`; 5xx and network failures are retried; a second 401 is final
//! and `needs_reauth`; any other 4xx is final with X's problem `detail` /
//! `title` (and those of `errors[]`, RFC 7807 objects) kept for the agent.

use super::tokens::Tokens;
use crate::adapters::{DeliveryError, OutgoingAttachment, OutgoingMessage, SendReceipt};
use crate::domain::ChannelKind;
use crate::manifest::MAX_ATTACHMENT_BYTES;
use chrono::{DateTime, Utc};
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use std::time::Duration;

/// X's documented DM text limit, when the manifest names none.
pub const MAX_TEXT_CHARS: usize = 10_000;
/// Bytes per `APPEND` (X takes chunks up to 5 MB).
pub const CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// How long to wait in all for X to process uploaded media.
const PROCESSING_BUDGET: Duration = Duration::from_secs(60);

/// The X API root and an HTTP client for it.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    /// `https://api.x.com`, without a trailing slash.
    pub api_base: String,
}

impl Api {
    pub fn new(api_base: &str) -> Api {
        Api {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(60))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a client"),
            api_base: api_base.trim_end_matches('/').to_string(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.api_base, path.trim_start_matches('/'))
    }
}

/// A failed request: X refused the token (try one refresh), or anything else.
#[derive(Debug)]
pub enum Failure {
    Unauthorized(DeliveryError),
    Other(DeliveryError),
}

impl From<DeliveryError> for Failure {
    fn from(e: DeliveryError) -> Failure {
        Failure::Other(e)
    }
}

/// A reqwest error without the URL (our attachment links carry a signature).
pub fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else {
        let mut text = e.to_string();
        if let Some(url) = e.url() {
            text = text.replace(&format!(" for url ({url})"), "");
            text = text.replace(url.as_str(), "<url>");
        }
        text
    }
}

/// When X says to come back: `x-rate-limit-reset` (epoch seconds, the end of
/// the rate-limit window) counted from `now`, else `Retry-After` (seconds).
pub fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    if let Some(reset) = header("x-rate-limit-reset") {
        let wait = reset.saturating_sub(now.timestamp()).max(0);
        return Some(Duration::from_secs(wait as u64));
    }
    header("retry-after")
        .filter(|s| *s >= 0)
        .map(|s| Duration::from_secs(s as u64))
}

/// Classifies an X API error answer by what to do next, keeping X's words.
pub fn classify(status: u16, headers: &HeaderMap, body: &[u8], now: DateTime<Utc>) -> Failure {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut parts: Vec<String> = vec![];
    let mut push = |s: Option<&str>| {
        if let Some(s) = s.map(str::trim).filter(|s| !s.is_empty()) {
            if !parts.iter().any(|p| p == s) {
                parts.push(s.to_string());
            }
        }
    };
    push(v["detail"].as_str().or(v["title"].as_str()));
    let errors = v["errors"].as_array().cloned().unwrap_or_default();
    for e in &errors {
        push(
            e["detail"]
                .as_str()
                .or(e["message"].as_str())
                .or(e["title"].as_str()),
        );
    }
    let text = if parts.is_empty() {
        format!("X API answered HTTP {status}")
    } else {
        parts.join("; ")
    };
    // The problem type's last segment (`usage-capped`, `invalid-request`), or a v1.1 code.
    let code = v["type"]
        .as_str()
        .or(errors.first().and_then(|e| e["type"].as_str()))
        .and_then(|t| t.rsplit('/').next())
        .filter(|t| !t.is_empty() && *t != "about:blank")
        .map(str::to_string)
        .or_else(|| {
            errors
                .first()
                .and_then(|e| e["code"].as_i64())
                .map(|c| c.to_string())
        });
    let mut e = DeliveryError::permanent(text);
    e.code = code;
    match status {
        401 => {
            e.message = format!(
                "X refused the access token ({}): re-authorise the channel",
                e.message
            );
            e.needs_reauth = true;
            Failure::Unauthorized(e)
        }
        429 => {
            e.retryable = true;
            e.retry_after = retry_after(headers, now);
            Failure::Other(e)
        }
        s if s >= 500 => {
            e.retryable = true;
            e.retry_after = retry_after(headers, now);
            Failure::Other(e)
        }
        _ => Failure::Other(e),
    }
}

/// Why a text is too long for an X DM, if it is.
pub fn text_problem(text: &str) -> Option<String> {
    let max = crate::manifest::get(ChannelKind::Twitter)
        .text
        .max_chars
        .unwrap_or(MAX_TEXT_CHARS);
    let n = text.chars().count();
    (n > max).then(|| format!("the text is {n} characters; X allows at most {max}"))
}

/// The `media_category` of a DM attachment by content type.
pub fn media_category(content_type: &str) -> Result<&'static str, DeliveryError> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.split('/').next().unwrap_or("") {
        _ if essence == "image/gif" => Ok("dm_gif"),
        "image" => Ok("dm_image"),
        "video" => Ok("dm_video"),
        _ => Err(DeliveryError::permanent(format!(
            "X direct messages carry images, GIFs and videos, not {}",
            if essence.is_empty() {
                "files without a type"
            } else {
                essence.as_str()
            }
        ))),
    }
}

/// Everything that makes a message unsendable, checked before any request.
pub fn check(msg: &OutgoingMessage) -> Result<(), DeliveryError> {
    if msg.to.is_empty() || !msg.to.chars().all(|c| c.is_ascii_digit()) {
        return Err(DeliveryError::permanent(format!(
            "the recipient is not an X user ID: {:?}",
            msg.to
        )));
    }
    if msg.attachments.len() > 1 {
        return Err(DeliveryError::permanent(
            "X direct messages carry one attachment",
        ));
    }
    if msg.text.is_empty() && msg.attachments.is_empty() {
        return Err(DeliveryError::permanent(
            "nothing to send: the message has no text and no attachment",
        ));
    }
    if let Some(problem) = text_problem(&msg.text) {
        return Err(DeliveryError::permanent(problem));
    }
    if let Some(a) = msg.attachments.first() {
        media_category(&a.content_type)?;
        if a.public_url.trim().is_empty() {
            return Err(DeliveryError::permanent(format!(
                "attachment {} has no link to read it from",
                a.filename
            )));
        }
    }
    Ok(())
}

/// The JSON body of the DM request.
pub fn message_body(text: &str, media_id: Option<&str>) -> Value {
    let mut body = json!({});
    if !text.is_empty() {
        body["text"] = json!(text);
    }
    if let Some(id) = media_id {
        body["attachments"] = json!([{ "media_id": id }]);
    }
    body
}

/// Sends `msg` with the channel's token, refreshing it once if X refuses it.
pub async fn send(
    api: &Api,
    tokens: &Tokens,
    msg: &OutgoingMessage,
) -> Result<SendReceipt, DeliveryError> {
    check(msg)?;
    let attachment = match msg.attachments.first() {
        Some(a) => Some((a, fetch_attachment(&api.http, a).await?)),
        None => None,
    };
    let mut token = tokens.current().await?;
    let mut refreshed = false;
    loop {
        let attempt = async {
            let media_id = match &attachment {
                Some((a, bytes)) => Some(upload(api, &token, a, bytes).await?),
                None => None,
            };
            post_dm(
                api,
                &token,
                &msg.to,
                &message_body(&msg.text, media_id.as_deref()),
            )
            .await
        };
        match attempt.await {
            Ok(receipt) => return Ok(receipt),
            Err(Failure::Other(e)) => return Err(e),
            Err(Failure::Unauthorized(e)) if refreshed => return Err(e),
            Err(Failure::Unauthorized(e)) => match tokens.after_rejection(&token).await? {
                Some(fresh) => {
                    tracing::info!(
                        "X refused the access token; retrying once with a refreshed one"
                    );
                    token = fresh;
                    refreshed = true;
                }
                None => return Err(e),
            },
        }
    }
}

/// Reads the answer of one X API request: JSON on 2xx, else classified.
async fn answer(
    resp: Result<reqwest::Response, reqwest::Error>,
    what: &str,
) -> Result<Value, Failure> {
    let resp = resp.map_err(|e| {
        DeliveryError::retryable(format!("X API unreachable ({what}): {}", describe(&e)))
    })?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.map_err(|e| {
        DeliveryError::retryable(format!("X API answer cut short ({what}): {}", describe(&e)))
    })?;
    if (200..300).contains(&status) {
        // APPEND answers with an empty body.
        Ok(serde_json::from_slice(&body).unwrap_or(Value::Null))
    } else {
        Err(classify(status, &headers, &body, Utc::now()))
    }
}

/// `POST .../dm_conversations/with/{to}/messages`; the receipt names `dm_event_id`.
async fn post_dm(api: &Api, token: &str, to: &str, body: &Value) -> Result<SendReceipt, Failure> {
    let url = api.url(&format!("2/dm_conversations/with/{to}/messages"));
    let v = answer(
        api.http
            .post(url)
            .bearer_auth(token)
            .json(body)
            .send()
            .await,
        "send",
    )
    .await?;
    match v["data"]["dm_event_id"]
        .as_str()
        .filter(|id| !id.is_empty())
    {
        Some(id) => Ok(SendReceipt {
            provider_id: id.to_string(),
            other_provider_ids: vec![],
        }),
        // X has taken it: a retry would message the customer twice.
        None => Err(Failure::Other(DeliveryError::permanent(
            "X accepted the message but answered without a dm_event_id; not retried, \
             so the customer does not get it twice",
        ))),
    }
}

/// The media ID in an upload answer: `data.id` (v2), or `media_id_string` (v1.1 shape).
pub fn media_id_of(v: &Value) -> Option<String> {
    let id = |x: &Value| match x {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    id(&v["data"]["id"])
        .or_else(|| id(&v["data"]["media_id_string"]))
        .or_else(|| id(&v["media_id_string"]))
        .filter(|s| s.chars().all(|c| c.is_ascii_digit()))
}

fn form(fields: &[(&str, String)]) -> reqwest::multipart::Form {
    fields
        .iter()
        .fold(reqwest::multipart::Form::new(), |f, (k, v)| {
            f.text(k.to_string(), v.clone())
        })
}

/// Uploads one attachment (INIT, APPEND per chunk, FINALIZE, STATUS while
/// processing) and answers its media ID.
async fn upload(
    api: &Api,
    token: &str,
    a: &OutgoingAttachment,
    bytes: &[u8],
) -> Result<String, Failure> {
    let url = api.url("2/media/upload");
    let category = media_category(&a.content_type)?;
    let media_type = a
        .content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let init = answer(
        api.http
            .post(&url)
            .bearer_auth(token)
            .multipart(form(&[
                ("command", "INIT".into()),
                ("media_type", media_type.clone()),
                ("total_bytes", bytes.len().to_string()),
                ("media_category", category.into()),
            ]))
            .send()
            .await,
        "media upload INIT",
    )
    .await?;
    let media_id = media_id_of(&init).ok_or_else(|| {
        DeliveryError::retryable("X answered the media upload INIT without a media id")
    })?;
    for (n, chunk) in bytes.chunks(CHUNK_BYTES).enumerate() {
        let part = reqwest::multipart::Part::bytes(chunk.to_vec())
            .file_name(a.filename.clone())
            .mime_str("application/octet-stream")
            .expect("a valid mime type");
        let f = form(&[
            ("command", "APPEND".into()),
            ("media_id", media_id.clone()),
            ("segment_index", n.to_string()),
        ])
        .part("media", part);
        answer(
            api.http
                .post(&url)
                .bearer_auth(token)
                .multipart(f)
                .send()
                .await,
            "media upload APPEND",
        )
        .await?;
    }
    let mut state = answer(
        api.http
            .post(&url)
            .bearer_auth(token)
            .multipart(form(&[
                ("command", "FINALIZE".into()),
                ("media_id", media_id.clone()),
            ]))
            .send()
            .await,
        "media upload FINALIZE",
    )
    .await?;
    let deadline = tokio::time::Instant::now() + PROCESSING_BUDGET;
    loop {
        let info = state["data"]["processing_info"].clone();
        let info = if info.is_null() {
            state["processing_info"].clone()
        } else {
            info
        };
        match info["state"].as_str() {
            None | Some("succeeded") => return Ok(media_id),
            Some("failed") => {
                let why = info["error"]["message"]
                    .as_str()
                    .or(info["error"]["name"].as_str())
                    .unwrap_or("no reason given");
                return Err(Failure::Other(DeliveryError::permanent(format!(
                    "X could not process attachment {}: {why}",
                    a.filename
                ))));
            }
            Some(_) => {}
        }
        let wait = Duration::from_secs(info["check_after_secs"].as_u64().unwrap_or(1).clamp(1, 10));
        if tokio::time::Instant::now() + wait > deadline {
            return Err(Failure::Other(DeliveryError::retryable(format!(
                "X was still processing attachment {} after {} s",
                a.filename,
                PROCESSING_BUDGET.as_secs()
            ))));
        }
        tokio::time::sleep(wait).await;
        state = answer(
            api.http
                .get(&url)
                .bearer_auth(token)
                .query(&[("command", "STATUS"), ("media_id", media_id.as_str())])
                .send()
                .await,
            "media upload STATUS",
        )
        .await?;
    }
}

/// Reads an attachment from its public link (our own `/media/...`, no
/// credentials), at most [`MAX_ATTACHMENT_BYTES`].
async fn fetch_attachment(
    http: &reqwest::Client,
    a: &OutgoingAttachment,
) -> Result<Vec<u8>, DeliveryError> {
    let fail = |what: String, retry: bool| {
        let message = format!("cannot read attachment {}: {what}", a.filename);
        if retry {
            DeliveryError::retryable(message)
        } else {
            DeliveryError::permanent(message)
        }
    };
    let mut resp = http
        .get(&a.public_url)
        .send()
        .await
        .map_err(|e| fail(describe(&e), true))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(fail(
            format!("HTTP {}", status.as_u16()),
            status.is_server_error() || status.as_u16() == 429,
        ));
    }
    let too_large = || fail(format!("larger than {MAX_ATTACHMENT_BYTES} bytes"), false);
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_ATTACHMENT_BYTES)
    {
        return Err(too_large());
    }
    let mut bytes = vec![];
    while let Some(chunk) = resp.chunk().await.map_err(|e| fail(describe(&e), true))? {
        if (bytes.len() + chunk.len()) as u64 > MAX_ATTACHMENT_BYTES {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    if bytes.is_empty() {
        return Err(fail("it is empty".into(), false));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn msg(text: &str) -> OutgoingMessage {
        OutgoingMessage {
            id: "5f0c6a1e9b2d4c7e8a3f1b6d9e2c4a7b".into(),
            to: "2874619305".into(),
            text: text.into(),
            ..OutgoingMessage::default()
        }
    }

    fn file(name: &str, content_type: &str) -> OutgoingAttachment {
        OutgoingAttachment {
            id: format!("att-{name}"),
            filename: name.into(),
            content_type: content_type.into(),
            size: 2048,
            public_url: format!("https://switchboard.example.com/media/{name}?sig=abc"),
        }
    }

    fn permanent(r: Result<(), DeliveryError>) -> String {
        let e = r.unwrap_err();
        assert!(!e.retryable && !e.needs_reauth, "{e:?}");
        e.message
    }

    fn other(f: Failure) -> DeliveryError {
        match f {
            Failure::Other(e) => e,
            Failure::Unauthorized(e) => panic!("unexpected 401 class: {e:?}"),
        }
    }

    /// If this breaks, X refuses our DMs (or gets an empty `attachments`).
    #[test]
    fn the_body_is_text_and_at_most_one_media_id() {
        assert_eq!(
            message_body("It ships today", None),
            json!({"text": "It ships today"})
        );
        assert_eq!(
            message_body("Here is the label", Some("1880028106020515840")),
            json!({"text": "Here is the label", "attachments": [{"media_id": "1880028106020515840"}]})
        );
        assert_eq!(
            message_body("", Some("1880028106020515840")),
            json!({"attachments": [{"media_id": "1880028106020515840"}]})
        );
    }

    /// If this breaks, an over-long reply is sent and refused by X, or a
    /// valid one is refused by us.
    #[test]
    fn text_over_ten_thousand_characters_is_refused_before_sending() {
        assert!(check(&msg(&"é".repeat(10_000))).is_ok());
        assert!(check(&msg(&"😀".repeat(10_000))).is_ok());
        assert_eq!(
            permanent(check(&msg(&"a".repeat(10_001)))),
            "the text is 10001 characters; X allows at most 10000"
        );
    }

    /// If this breaks, the second attachment of a reply silently disappears.
    #[test]
    fn more_than_one_attachment_is_refused() {
        let mut m = msg("two files");
        m.attachments = vec![file("a.png", "image/png"), file("b.png", "image/png")];
        assert_eq!(
            permanent(check(&m)),
            "X direct messages carry one attachment"
        );
        m.attachments.pop();
        assert!(check(&m).is_ok());
        m.text.clear();
        assert!(check(&m).is_ok(), "an attachment alone is a message");
    }

    #[test]
    fn recipients_media_types_and_empty_messages_are_checked() {
        let mut m = msg("hi");
        m.to = "2874619305/../../2/tweets".into();
        assert!(permanent(check(&m)).starts_with("the recipient is not an X user ID"));
        m.to = String::new();
        assert!(check(&m).is_err());
        assert_eq!(
            permanent(check(&msg(""))),
            "nothing to send: the message has no text and no attachment"
        );
        let mut m = msg("");
        m.attachments = vec![file("invoice.pdf", "application/pdf")];
        assert_eq!(
            permanent(check(&m)),
            "X direct messages carry images, GIFs and videos, not application/pdf"
        );
        let mut a = file("x.png", "image/png");
        a.public_url = " ".into();
        m.attachments = vec![a];
        assert_eq!(
            permanent(check(&m)),
            "attachment x.png has no link to read it from"
        );
    }

    #[test]
    fn media_categories_by_content_type() {
        for (ct, cat) in [
            ("image/jpeg", "dm_image"),
            ("IMAGE/PNG", "dm_image"),
            ("image/webp", "dm_image"),
            ("image/gif", "dm_gif"),
            ("image/GIF; charset=binary", "dm_gif"),
            ("video/mp4", "dm_video"),
            ("video/quicktime", "dm_video"),
        ] {
            assert_eq!(media_category(ct).unwrap(), cat, "{ct}");
        }
        assert!(media_category("audio/mpeg").is_err());
        assert!(media_category("").is_err());
    }

    #[test]
    fn the_media_id_is_data_id_or_media_id_string() {
        assert_eq!(
            media_id_of(
                &json!({"data": {"id": "1880028106020515840", "media_key": "3_1880028106020515840"}})
            ),
            Some("1880028106020515840".into())
        );
        assert_eq!(
            media_id_of(
                &json!({"media_id": 601413451156586496u64, "media_id_string": "601413451156586496"})
            ),
            Some("601413451156586496".into())
        );
        assert_eq!(media_id_of(&json!({"data": {}})), None);
        assert_eq!(media_id_of(&json!({"data": {"id": "../x"}})), None);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    /// If this breaks, we hammer X while rate limited, or wait far too long.
    #[test]
    fn rate_limits_come_back_at_the_reset_time() {
        let now = DateTime::from_timestamp(1_795_600_800, 0).unwrap();
        let h = headers(&[
            ("x-rate-limit-reset", "1795600890"),
            ("x-rate-limit-remaining", "0"),
        ]);
        let e = other(classify(
            429,
            &h,
            br#"{"title":"Too Many Requests","detail":"Too Many Requests","type":"about:blank","status":429}"#,
            now,
        ));
        assert!(e.retryable && !e.needs_reauth);
        assert_eq!(e.retry_after, Some(Duration::from_secs(90)));
        assert_eq!(e.message, "Too Many Requests");
        assert_eq!(e.code, None);
        // A reset already past: come back at once (the worker's backoff still applies).
        let past = headers(&[("x-rate-limit-reset", "1795600000")]);
        assert_eq!(retry_after(&past, now), Some(Duration::ZERO));
        let plain = headers(&[("retry-after", "30")]);
        assert_eq!(retry_after(&plain, now), Some(Duration::from_secs(30)));
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    /// If this breaks, agents see "HTTP 403" instead of why X refused the DM.
    #[test]
    fn other_client_errors_are_final_with_xs_words() {
        let now = Utc::now();
        let e = other(classify(
            403,
            &HeaderMap::new(),
            br#"{"detail":"You are not permitted to send this DM.","title":"Forbidden","type":"about:blank","status":403}"#,
            now,
        ));
        assert!(!e.retryable && !e.needs_reauth);
        assert_eq!(e.message, "You are not permitted to send this DM.");
        let e = other(classify(
            400,
            &HeaderMap::new(),
            br#"{"errors":[{"parameters":{"participant_id":["12"]},"message":"The `participant_id` query parameter value [12] is not valid"}],"title":"Invalid Request","detail":"One or more parameters to your request was invalid.","type":"https://api.twitter.com/2/problems/invalid-request"}"#,
            now,
        ));
        assert!(!e.retryable);
        assert_eq!(
            e.message,
            "One or more parameters to your request was invalid.; The `participant_id` query parameter value [12] is not valid"
        );
        assert_eq!(e.code.as_deref(), Some("invalid-request"));
        let e = other(classify(400, &HeaderMap::new(), b"<html>", now));
        assert_eq!(e.message, "X API answered HTTP 400");
    }

    #[test]
    fn server_errors_are_retried_and_401_is_its_own_class() {
        let now = Utc::now();
        let e = other(classify(503, &headers(&[("retry-after", "7")]), b"", now));
        assert!(e.retryable);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        match classify(
            401,
            &HeaderMap::new(),
            br#"{"title":"Unauthorized","type":"about:blank","status":401,"detail":"Unauthorized"}"#,
            now,
        ) {
            Failure::Unauthorized(e) => {
                assert!(e.needs_reauth && !e.retryable);
                assert_eq!(
                    e.message,
                    "X refused the access token (Unauthorized): re-authorise the channel"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
