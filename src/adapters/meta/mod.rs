//! What WhatsApp, Messenger and Instagram share: Meta's subscription
//! handshake, the `X-Hub-Signature-256` check, the Graph API error envelope
//! and a small Graph client. Each channel adds only what is its own.
//!
//! Facts: providers.md A1 (Meta webhooks), A1.4 (errors); Meta's
//! "Getting started with webhooks" and the Cloud API error codes.

use super::{DeliveryError, IntakeError, RawRequest, Verified, WebhookAck};
use hmac::{Hmac, Mac};
use serde_json::Value;
use std::time::Duration;

/// The header Meta signs webhooks with.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";

/// Answers Meta's subscription handshake:
/// `GET ?hub.mode=subscribe&hub.verify_token=...&hub.challenge=...` is 200
/// with exactly the challenge as `text/plain` when the token matches, and
/// 403 `verify_token_mismatch` otherwise.
pub fn handshake(query: &str, verify_token: &str) -> Result<WebhookAck, IntakeError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|_| {
        IntakeError::VerifyTokenMismatch("the handshake query could not be read".into())
    })?;
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let (Some(mode), Some(token), Some(challenge)) = (
        get("hub.mode"),
        get("hub.verify_token"),
        get("hub.challenge"),
    ) else {
        return Err(IntakeError::VerifyTokenMismatch(
            "expected hub.mode, hub.verify_token and hub.challenge".into(),
        ));
    };
    if mode != "subscribe" {
        return Err(IntakeError::VerifyTokenMismatch(format!(
            "hub.mode is {mode}, not subscribe"
        )));
    }
    if !bool::from(subtle::ConstantTimeEq::ct_eq(
        token.as_bytes(),
        verify_token.as_bytes(),
    )) {
        return Err(IntakeError::VerifyTokenMismatch(
            "hub.verify_token does not match".into(),
        ));
    }
    Ok(WebhookAck {
        status: 200,
        content_type: "text/plain",
        body: challenge.as_bytes().to_vec(),
    })
}

/// Checks `X-Hub-Signature-256: sha256=<hex>` over the raw body with any of
/// `secrets` (the app secret, and the previous one during rotation), in
/// constant time. The body is not parsed before this passes.
pub fn verify<'a>(req: &RawRequest<'a>, secrets: &[&str]) -> Result<Verified<'a>, IntakeError> {
    let header = req
        .header(SIGNATURE_HEADER)
        .ok_or_else(|| IntakeError::InvalidSignature("missing X-Hub-Signature-256".into()))?;
    let hex_sig = header
        .strip_prefix("sha256=")
        .filter(|h| h.len() == 64)
        .ok_or_else(|| {
            IntakeError::InvalidSignature(
                "X-Hub-Signature-256 is not sha256= and 64 hex digits".into(),
            )
        })?;
    let sig = hex::decode(hex_sig)
        .map_err(|_| IntakeError::InvalidSignature("X-Hub-Signature-256 is not hex".into()))?;
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        let mut mac =
            Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
        mac.update(req.body);
        if mac.verify_slice(&sig).is_ok() {
            return Ok(Verified::new(req));
        }
    }
    Err(IntakeError::InvalidSignature(
        "X-Hub-Signature-256 does not match".into(),
    ))
}

/// The signature header value Meta would send for `body` (for `simulate` and tests).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What Meta expects back once the webhook is stored: any 200.
pub fn ack() -> WebhookAck {
    WebhookAck {
        status: 200,
        content_type: "text/plain",
        body: b"EVENT_RECEIVED".to_vec(),
    }
}

/// Parses a verified body as JSON, or says why not.
pub fn json_body(v: &Verified<'_>) -> Result<Value, IntakeError> {
    if !v.content_type().is_empty() && !v.content_type().starts_with("application/json") {
        return Err(IntakeError::UnsupportedMediaType(format!(
            "Meta webhooks are application/json, not {}",
            v.content_type()
        )));
    }
    let body = std::str::from_utf8(v.body())
        .map_err(|_| IntakeError::Malformed("the body is not UTF-8".into()))?;
    serde_json::from_str(body)
        .map_err(|e| IntakeError::Malformed(format!("the body is not JSON: {e}")))
}

/// Graph error codes that mean "retry later" (throttling, temporary errors).
const RETRYABLE_CODES: [i64; 7] = [1, 2, 4, 613, 80007, 130429, 131048];
/// More that Meta documents as temporary (spam rate limit, pair rate limit, service unavailable).
const RETRYABLE_EXTRA: [i64; 3] = [131056, 131000, 133004];

/// Classifies a Graph API error answer by what to do next (CONVENTIONS habit 6):
/// 131047, 10/2018278 and 10/2534022 close the window; 190 needs
/// re-authorisation; throttling codes and 5xx are retried; anything else is
/// final, with Meta's message kept for the agent.
pub fn classify(status: u16, body: &[u8], retry_after: Option<Duration>) -> DeliveryError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let e = &v["error"];
    let code = e["code"].as_i64();
    let sub = e["error_subcode"].as_i64();
    let message = e["message"].as_str().unwrap_or("").to_string();
    let details = e["error_data"]["details"].as_str().map(str::to_string);
    let code_text = match (code, sub) {
        (Some(c), Some(s)) => Some(format!("{c}/{s}")),
        (Some(c), None) => Some(c.to_string()),
        _ => None,
    };
    let text = match (&details, message.is_empty()) {
        (Some(d), _) => format!("{message}: {d}")
            .trim_start_matches(": ")
            .to_string(),
        (None, false) => message.clone(),
        (None, true) => format!("Graph API answered {status}"),
    };
    let mut err = DeliveryError::permanent(text);
    err.code = code_text;
    err.retry_after = retry_after;
    match (code, sub) {
        (Some(131047), _) | (Some(10), Some(2018278)) | (Some(10), Some(2534022)) => {
            err.window_closed = true
        }
        (Some(190), _) => err.needs_reauth = true,
        (Some(c), _) if RETRYABLE_CODES.contains(&c) || RETRYABLE_EXTRA.contains(&c) => {
            err.retryable = true
        }
        _ if status >= 500 || status == 429 => err.retryable = true,
        _ => {}
    }
    err
}

/// `Retry-After` in seconds, when a response carries it.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// A minimal Graph API client: the bearer token goes only to `api_base`.
#[derive(Clone)]
pub struct GraphClient {
    pub http: reqwest::Client,
    /// The API root including the version, without a trailing slash.
    pub api_base: String,
    token: String,
}

impl GraphClient {
    pub fn new(api_base: &str, token: &str) -> GraphClient {
        GraphClient {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(30))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a client"),
            api_base: api_base.trim_end_matches('/').to_string(),
            token: token.to_string(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.api_base, path.trim_start_matches('/'))
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    async fn answer(
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<Value, DeliveryError> {
        let resp =
            resp.map_err(|e| DeliveryError::retryable(format!("Graph API unreachable: {e}")))?;
        let status = resp.status().as_u16();
        let after = retry_after(resp.headers());
        let body = resp
            .bytes()
            .await
            .map_err(|e| DeliveryError::retryable(format!("Graph API answer cut short: {e}")))?;
        if (200..300).contains(&status) {
            serde_json::from_slice(&body).map_err(|_| {
                DeliveryError::permanent("Graph API answered with something other than JSON")
            })
        } else {
            Err(classify(status, &body, after))
        }
    }

    /// `POST {api_base}/{path}` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, DeliveryError> {
        Self::answer(
            self.http
                .post(self.url(path))
                .bearer_auth(&self.token)
                .json(body)
                .send()
                .await,
        )
        .await
    }

    /// `POST {api_base}/{path}` with a multipart form (media uploads).
    pub async fn post_multipart(
        &self,
        path: &str,
        form: reqwest::multipart::Form,
    ) -> Result<Value, DeliveryError> {
        Self::answer(
            self.http
                .post(self.url(path))
                .bearer_auth(&self.token)
                .multipart(form)
                .send()
                .await,
        )
        .await
    }

    /// `GET {api_base}/{path}`.
    pub async fn get(&self, path: &str) -> Result<Value, DeliveryError> {
        Self::answer(
            self.http
                .get(self.url(path))
                .bearer_auth(&self.token)
                .send()
                .await,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(headers: &'a [(String, String)], body: &'a [u8]) -> RawRequest<'a> {
        RawRequest {
            path: "/webhooks/wa",
            query: "",
            headers: headers.into(),
            content_type: "application/json",
            body,
        }
    }

    /// Meta's official vector (WhatsApp Node.js SDK): a body Meta signed must verify.
    #[test]
    fn the_official_vector_verifies() {
        assert_eq!(
            sign("TEST_APP_SECRET", b"test"),
            "sha256=0c61947b610d4f45e65f3d680e26027121ec2413e77598bcb6cfc6e0d9888221"
        );
        let h = vec![(
            SIGNATURE_HEADER.to_string(),
            sign("TEST_APP_SECRET", b"test"),
        )];
        assert!(verify(&req(&h, b"test"), &["TEST_APP_SECRET"]).is_ok());
    }

    /// Non-ASCII arrives escaped; the raw bytes are what Meta signed, never re-serialized JSON.
    #[test]
    fn escaped_unicode_is_verified_over_the_raw_bytes() {
        let raw = br#"{"text":"\u00e4\u00f6\u00e5"}"#;
        let h = vec![(
            SIGNATURE_HEADER.to_string(),
            "sha256=c7965e8a7e9d455bab9496c4845f741db162a67da7e88fa9884e9c976d713061".to_string(),
        )];
        assert!(verify(&req(&h, raw), &["TEST_APP_SECRET"]).is_ok());
        let reserialized = "{\"text\":\"äöå\"}".as_bytes();
        assert!(verify(&req(&h, reserialized), &["TEST_APP_SECRET"]).is_err());
    }

    #[test]
    fn the_previous_secret_is_accepted_during_rotation() {
        let h = vec![(SIGNATURE_HEADER.to_string(), sign("old", b"x"))];
        assert!(verify(&req(&h, b"x"), &["new", "old"]).is_ok());
        assert!(verify(&req(&h, b"x"), &["new"]).is_err());
        assert!(verify(&req(&h, b"x"), &["new", ""]).is_err());
    }

    #[test]
    fn malformed_or_missing_headers_are_invalid_signatures() {
        for value in ["", "sha1=abc", "sha256=zz", "sha256=0c61947b"] {
            let h = vec![(SIGNATURE_HEADER.to_string(), value.to_string())];
            assert!(matches!(
                verify(&req(&h, b"test"), &["s"]),
                Err(IntakeError::InvalidSignature(_))
            ));
        }
        assert!(matches!(
            verify(&req(&[], b"test"), &["s"]),
            Err(IntakeError::InvalidSignature(_))
        ));
    }

    #[test]
    fn the_handshake_echoes_the_challenge_only_for_the_right_token() {
        let ok = handshake(
            "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=meatyhamhock",
            "meatyhamhock",
        )
        .unwrap();
        assert_eq!(
            (ok.status, ok.content_type, ok.body.as_slice()),
            (200, "text/plain", b"1158201444".as_slice())
        );
        for q in [
            "hub.mode=subscribe&hub.challenge=1&hub.verify_token=wrong",
            "hub.mode=unsubscribe&hub.challenge=1&hub.verify_token=meatyhamhock",
            "hub.challenge=1",
            "",
        ] {
            assert!(
                matches!(
                    handshake(q, "meatyhamhock"),
                    Err(IntakeError::VerifyTokenMismatch(_))
                ),
                "{q}"
            );
        }
    }

    #[test]
    fn graph_errors_are_classified_by_code() {
        let e = |body: &str, status| classify(status, body.as_bytes(), None);
        let w = e(
            r#"{"error":{"message":"Re-engagement message","code":131047,"error_data":{"details":"more than 24 hours"}}}"#,
            400,
        );
        assert!(w.window_closed && !w.retryable);
        assert_eq!(w.code.as_deref(), Some("131047"));
        assert!(w.message.contains("more than 24 hours"));
        assert!(
            e(
                r#"{"error":{"message":"outside window","code":10,"error_subcode":2018278}}"#,
                400
            )
            .window_closed
        );
        assert!(
            e(
                r#"{"error":{"message":"outside window","code":10,"error_subcode":2534022}}"#,
                400
            )
            .window_closed
        );
        let auth = e(
            r#"{"error":{"message":"Error validating access token","type":"OAuthException","code":190}}"#,
            401,
        );
        assert!(auth.needs_reauth && !auth.retryable);
        for code in [4, 80007, 130429, 131048, 131056, 613] {
            assert!(
                e(
                    &format!(r#"{{"error":{{"message":"slow down","code":{code}}}}}"#),
                    400
                )
                .retryable,
                "{code}"
            );
        }
        assert!(e("", 503).retryable);
        let other = e(
            r#"{"error":{"message":"(#100) Invalid parameter","code":100}}"#,
            400,
        );
        assert!(!other.retryable && !other.window_closed && !other.needs_reauth);
        assert_eq!(other.message, "(#100) Invalid parameter");
    }
}
