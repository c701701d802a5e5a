//! The routing feed and event sinks.

use base64::Engine;

/// The HMAC key of a Standard Webhooks secret (`whsec_` + base64).
pub fn sink_key(secret: &str) -> Option<Vec<u8>> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .filter(|k| !k.is_empty())
}
