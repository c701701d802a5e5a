//! `application/x-www-form-urlencoded`, read strictly.
//!
//! `form_urlencoded` (and so `serde_urlencoded`) replaces invalid UTF-8 with
//! U+FFFD without a word; a webhook whose text would be silently changed
//! should be refused instead, so we decode by hand.

use std::borrow::Cow;

/// A form's pairs in order, names and values decoded: borrowed from the
/// body where there was nothing to decode (most names, and values such as
/// IDs and numbers), so a webhook's twenty-odd fields cost no allocation
/// each.
pub type Pairs<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

/// The pairs of a form body in order, names and values decoded.
pub fn parse(body: &[u8]) -> Result<Pairs<'_>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the form body is not UTF-8".to_string())?;
    // Twilio sends twenty-odd fields: room for all of them at once, not
    // four reallocations on the way.
    let mut pairs = Vec::with_capacity(text.bytes().filter(|&b| b == b'&').count() + 1);
    for part in text.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        pairs.push((decode(name)?, decode(value)?));
    }
    Ok(pairs)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Percent-decodes one name or value, `+` meaning space. A `%` not followed
/// by two hex digits is kept as it is, as browsers and Twilio's SDKs do.
fn decode(s: &str) -> Result<Cow<'_, str>, String> {
    let bytes = s.as_bytes();
    if !bytes.iter().any(|b| matches!(b, b'%' | b'+')) {
        // Nothing to decode: the text is already checked UTF-8.
        return Ok(Cow::Borrowed(s));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| format!("a form field is not UTF-8 once decoded: {s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<(String, String)> {
        parse(s.as_bytes())
            .unwrap()
            .into_iter()
            .map(|(n, v)| (n.into_owned(), v.into_owned()))
            .collect()
    }

    #[test]
    fn fields_with_nothing_to_decode_are_borrowed() {
        let pairs = parse(b"MessageSid=SM1&Body=a+b").unwrap();
        assert!(matches!(pairs[0].0, Cow::Borrowed("MessageSid")));
        assert!(matches!(pairs[0].1, Cow::Borrowed("SM1")));
        assert!(matches!(&pairs[1].1, Cow::Owned(v) if v == "a b"));
    }

    #[test]
    fn decodes_plus_percent_and_utf8() {
        assert_eq!(
            p("Body=Hello+there%21+%F0%9F%98%80&From=%2B15551234567"),
            vec![
                ("Body".to_string(), "Hello there! 😀".to_string()),
                ("From".to_string(), "+15551234567".to_string())
            ]
        );
    }

    #[test]
    fn keeps_order_repeats_and_empty_values() {
        assert_eq!(
            p("a=1&&a=2&b=&c"),
            vec![
                ("a".to_string(), "1".to_string()),
                ("a".to_string(), "2".to_string()),
                ("b".to_string(), String::new()),
                ("c".to_string(), String::new())
            ]
        );
    }

    #[test]
    fn a_stray_percent_is_kept() {
        assert_eq!(
            p("x=100%&y=%zz&z=%4"),
            vec![
                ("x".to_string(), "100%".to_string()),
                ("y".to_string(), "%zz".to_string()),
                ("z".to_string(), "%4".to_string())
            ]
        );
    }

    #[test]
    fn invalid_utf8_is_refused_not_replaced() {
        assert!(parse(b"Body=caf\xe9").is_err());
        assert!(parse(b"Body=caf%E9").is_err());
    }
}
