//! Twilio's `X-Twilio-Signature` (providers.md A5.1).
//!
//! The signature is `base64(HMAC-SHA1(auth_token, url + params))` where
//! `url` is the full URL Twilio called (scheme, host, path and query) and
//! `params` are the POST parameters sorted by name, each as `name + value`
//! with no separator; a name given several times contributes each distinct
//! value, sorted. Twilio's back ends are inconsistent about ports, so, like
//! Twilio's own SDKs (twilio-python `request_validator.py`), we accept the
//! signature over the URL with the default port added (`:443`, `:80`) and
//! over the URL with any port removed.
//!
//! For JSON bodies Twilio puts `bodySHA256=<hex>` in the query, signs the
//! URL alone and expects the body hash to be checked; [`body_sha256_matches`]
//! does that part (the SMS webhooks we take are all form-encoded).

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha1 = Hmac<Sha1>;

/// The string Twilio signs: the URL, then each parameter as `name + value`,
/// names sorted, repeated names' values sorted and de-duplicated.
pub fn string_to_sign<N: AsRef<str>, V: AsRef<str>>(url: &str, params: &[(N, V)]) -> String {
    let mut pairs: Vec<(&str, &str)> = params
        .iter()
        .map(|(n, v)| (n.as_ref(), v.as_ref()))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    let len = url.len() + pairs.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>();
    let mut s = String::with_capacity(len);
    s.push_str(url);
    for (name, value) in pairs {
        s.push_str(name);
        s.push_str(value);
    }
    s
}

fn mac<N: AsRef<str>, V: AsRef<str>>(auth_token: &str, url: &str, params: &[(N, V)]) -> HmacSha1 {
    mac_of(auth_token, url, &string_to_sign("", params))
}

/// The MAC of `url` followed by the already sorted parameters.
fn mac_of(auth_token: &str, url: &str, sorted_params: &str) -> HmacSha1 {
    let mut mac =
        HmacSha1::new_from_slice(auth_token.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(url.as_bytes());
    mac.update(sorted_params.as_bytes());
    mac
}

/// The `X-Twilio-Signature` Twilio sends for these exact URL and parameters.
pub fn compute<N: AsRef<str>, V: AsRef<str>>(
    auth_token: &str,
    url: &str,
    params: &[(N, V)],
) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(mac(auth_token, url, params).finalize().into_bytes())
}

/// Where the authority (`host[:port]`) of a URL starts and ends, and where its
/// host part ends (the start of `:port`, or the authority's end).
fn authority(url: &str) -> Option<(usize, usize, usize)> {
    let start = url.find("://")? + 3;
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    // Skip any `user:password@`.
    let host_start = url[start..end].rfind('@').map_or(start, |i| start + i + 1);
    let host = &url[host_start..end];
    let host_end = if host.starts_with('[') {
        // An IPv6 literal: the port follows the closing bracket.
        host.find(']').map_or(end, |i| host_start + i + 1)
    } else {
        host.rfind(':').map_or(end, |i| host_start + i)
    };
    Some((host_start, host_end, end))
}

/// The URL with an explicit port: kept when present, else 443 for https and 80 otherwise.
pub fn with_port(url: &str) -> String {
    match authority(url) {
        Some((_, host_end, end)) if host_end == end => {
            let https = url
                .get(..8)
                .is_some_and(|p| p.eq_ignore_ascii_case("https://"));
            let port = if https { 443 } else { 80 };
            format!("{}:{port}{}", &url[..end], &url[end..])
        }
        _ => url.to_string(),
    }
}

/// The URL with any port removed.
pub fn without_port(url: &str) -> String {
    match authority(url) {
        Some((_, host_end, end)) if host_end < end => {
            format!("{}{}", &url[..host_end], &url[end..])
        }
        _ => url.to_string(),
    }
}

/// Whether `signature` is Twilio's signature of the URL and parameters with
/// any of `auth_tokens` (the current one first; a previous one during a
/// rotation), the URL taken with and without its port. Compared in constant time.
pub fn validate<N: AsRef<str>, V: AsRef<str>>(
    auth_tokens: &[&str],
    url: &str,
    params: &[(N, V)],
    signature: &str,
) -> bool {
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return false;
    };
    // The parameters are sorted once for every token and URL form. Each
    // comparison is constant-time. The search stops at the first match: a
    // forged signature is checked against every token and form, and for a
    // genuine one, which token or form matched is no secret.
    let sorted = string_to_sign("", params);
    let matches = |u: &str| {
        auth_tokens
            .iter()
            .any(|token| mac_of(token, u, &sorted).verify_slice(&given).is_ok())
    };
    // The URL as configured first: it is the one Twilio signs in most cases,
    // and the other forms are only worked out when it does not match.
    matches(url)
        || [with_port(url), without_port(url)]
            .iter()
            .any(|other| other != url && matches(other))
}

/// For JSON webhooks: whether the `bodySHA256` query parameter of `url` is
/// the hex SHA-256 of `body`. Missing or different: false.
pub fn body_sha256_matches(url: &str, body: &[u8]) -> bool {
    let Some(query) = url
        .split_once('?')
        .map(|(_, q)| q.split('#').next().unwrap_or(q))
    else {
        return false;
    };
    let expected = hex::encode(Sha256::digest(body));
    query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("bodySHA256="))
        .any(|given| {
            bool::from(
                given
                    .to_ascii_lowercase()
                    .as_bytes()
                    .ct_eq(expected.as_bytes()),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "12345";
    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    fn params() -> Vec<(String, String)> {
        [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn repeated() -> Vec<(String, String)> {
        [
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
            ("Digits", "1234"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// A5.1 / appendix 4: the string to sign and the signature.
    #[test]
    fn official_vector_string_and_signature() {
        assert_eq!(
            string_to_sign(URL, &params()),
            "https://mycompany.com/myapp.php?foo=1&bar=2CallSidCA1234567890ABCDECaller+14158675309Digits1234From+14158675309To+18005551212"
        );
        assert_eq!(
            compute(TOKEN, URL, &params()),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        assert!(validate(
            &[TOKEN],
            URL,
            &params(),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
    }

    /// A5.1 / appendix 5-6 and the :1234 vector: what each URL form signs to.
    #[test]
    fn official_port_vectors() {
        let cases = [
            (
                "https://mycompany.com:443/myapp.php?foo=1&bar=2",
                "kvajT1Ptam85bY51eRf/AJRuM3w=",
            ),
            (
                "http://mycompany.com:80/myapp.php?foo=1&bar=2",
                "0ZXoZLH/DfblKGATFgpif+LLRf4=",
            ),
            (
                "http://mycompany.com:1234/myapp.php?foo=1&bar=2",
                "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(compute(TOKEN, url, &params()), expected, "{url}");
        }
    }

    /// Twilio may sign with or without the port: a URL configured without a
    /// port accepts the signature over `:443`, and one with a port accepts
    /// the signature over the URL without it.
    #[test]
    fn ports_are_accepted_added_or_removed() {
        // Configured without port; Twilio signed with :443.
        assert!(validate(
            &[TOKEN],
            URL,
            &params(),
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        ));
        // Configured with :443; Twilio signed without.
        let with_443 = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
        assert!(validate(
            &[TOKEN],
            with_443,
            &params(),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        // http without port; Twilio signed with :80.
        let http = "http://mycompany.com/myapp.php?foo=1&bar=2";
        assert!(validate(
            &[TOKEN],
            http,
            &params(),
            "0ZXoZLH/DfblKGATFgpif+LLRf4="
        ));
        // A non-default port is kept as given, or removed.
        let custom = "http://mycompany.com:1234/myapp.php?foo=1&bar=2";
        assert!(validate(
            &[TOKEN],
            custom,
            &params(),
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
        ));
        // ...but a port is never invented: :1234 does not validate for the portless URL.
        assert!(!validate(
            &[TOKEN],
            URL,
            &params(),
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
        ));
    }

    /// A5.1 / appendix 7: repeated names, values sorted and de-duplicated.
    #[test]
    fn official_repeated_params_vector() {
        assert!(string_to_sign(URL, &repeated())
            .ends_with("Digits1234Digits5678SidCA123SidAccountAC123"));
        assert_eq!(
            compute(TOKEN, URL, &repeated()),
            "IK+Dwps556ElfBT0I3Rgjkr1wJU="
        );
        assert!(validate(
            &[TOKEN],
            URL,
            &repeated(),
            "IK+Dwps556ElfBT0I3Rgjkr1wJU="
        ));
    }

    /// A5.1 / appendix 8: JSON body, bodySHA256 in the URL, no params signed.
    #[test]
    fn official_json_body_vector() {
        let body = br#"{"property": "value", "boolean": true}"#;
        let hash = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
        assert_eq!(hex::encode(Sha256::digest(body)), hash);
        let url = format!("{URL}&bodySHA256={hash}");
        assert_eq!(
            compute::<&str, &str>(TOKEN, &url, &[]),
            "a9nBmqA0ju/hNViExpshrM61xv4="
        );
        assert!(validate::<&str, &str>(
            &[TOKEN],
            &url,
            &[],
            "a9nBmqA0ju/hNViExpshrM61xv4="
        ));
        assert!(body_sha256_matches(&url, body));
        assert!(!body_sha256_matches(&url, b"{\"property\": \"other\"}"));
        assert!(!body_sha256_matches(URL, body));
    }

    #[test]
    fn wrong_token_params_or_garbage_are_refused() {
        let good = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
        assert!(!validate(&["54321"], URL, &params(), good));
        let mut tampered = params();
        tampered[2].1 = "9999".into();
        assert!(!validate(&[TOKEN], URL, &tampered, good));
        assert!(!validate(&[TOKEN], URL, &params(), "not base64!"));
        assert!(!validate(&[TOKEN], URL, &params(), ""));
        assert!(!validate(
            &[TOKEN],
            "https://mycompany.com/other.php?foo=1&bar=2",
            &params(),
            good
        ));
    }

    #[test]
    fn a_previous_token_still_validates_during_rotation() {
        let good = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
        assert!(validate(&["new-token", TOKEN], URL, &params(), good));
    }

    #[test]
    fn port_rewriting_keeps_everything_else() {
        assert_eq!(
            with_port("https://a.example/x?y=1"),
            "https://a.example:443/x?y=1"
        );
        assert_eq!(with_port("http://a.example"), "http://a.example:80");
        assert_eq!(with_port("HTTPS://a.example/x"), "HTTPS://a.example:443/x");
        assert_eq!(
            with_port("http://a.example:8080/x"),
            "http://a.example:8080/x"
        );
        assert_eq!(
            without_port("http://a.example:8080/x?p=a:b"),
            "http://a.example/x?p=a:b"
        );
        assert_eq!(
            without_port("https://u:p@a.example:1/x"),
            "https://u:p@a.example/x"
        );
        assert_eq!(with_port("http://[::1]/x"), "http://[::1]:80/x");
        assert_eq!(without_port("http://[::1]:8080/x"), "http://[::1]/x");
        assert_eq!(without_port("https://a.example/x"), "https://a.example/x");
    }
}
