//! The email normalizer: raw RFC 5322 bytes in, a [`ParsedEmail`] out.
//!
//! Pure and total over bytes: anything `mailparse` can split into headers
//! and a body parses (the worst case is an empty text); only a message with
//! no usable sender is refused, so IMAP polling can quarantine it.
//!
//! - text: the first `text/plain` alternative, else the HTML turned into text;
//! - html: the first `text/html` part, sanitized with `ammonia` (inline
//!   images keep their `cid:` links, everything active is removed);
//! - charsets: whatever `mailparse` decodes (`charset` over `encoding_rs`:
//!   UTF-8, ISO-8859-1, Windows-1252, Shift_JIS, ISO-2022-JP, ...); RFC 2047
//!   in headers and RFC 2231 in parameters are decoded by `mailparse` too;
//! - attachments up to [`MAX_ATTACHMENT_BYTES`] each; larger ones are
//!   recorded in `omitted` with their name and size, never dropped silently;
//! - auto-replies (`Auto-Submitted`, `X-Autoreply`, `Precedence: auto_reply`)
//!   and delivery status notifications (`multipart/report;
//!   report-type=delivery-status`, with the Message-ID they bounce).

use chrono::{DateTime, TimeZone, Utc};
use mailparse::{DispositionType, MailHeaderMap, ParsedMail};
use sha2::Digest;
use std::collections::HashSet;

/// The largest attachment kept (CONTRACT: 10 MiB per file).
pub const MAX_ATTACHMENT_BYTES: usize = 10 * 1024 * 1024;

/// A file carried by the message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Attachment {
    pub filename: Option<String>,
    pub content_type: String,
    /// `Content-ID` without angle brackets (inline images).
    pub content_id: Option<String>,
    pub inline: bool,
    pub data: Vec<u8>,
}

/// An attachment that was too large to keep.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Omitted {
    pub filename: Option<String>,
    pub content_type: String,
    pub size: usize,
}

/// What kind of automatic message it is, if any.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Automatic {
    #[default]
    No,
    /// An out-of-office or other auto-reply: never reopens an interaction.
    AutoReply,
    /// A delivery status notification; `original` is the Message-ID (without
    /// brackets) of the message that bounced, when the report carries it.
    Bounce {
        original: Option<String>,
        permanent: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedEmail {
    /// The Message-ID without angle brackets, or `sha256:<hex>` of the raw
    /// bytes when the message has none (the dedupe key either way).
    pub message_id: String,
    pub has_message_id: bool,
    pub in_reply_to: Vec<String>,
    pub references: Vec<String>,
    /// The sender's address, lower-cased.
    pub from_address: String,
    pub from_name: Option<String>,
    /// Every recipient address (To, Cc, Delivered-To), lower-cased: where a
    /// reply token we put in `Reply-To` comes back.
    pub recipients: Vec<String>,
    pub subject: String,
    pub text: String,
    /// Sanitized HTML, when the message had an HTML part.
    pub html: Option<String>,
    pub date: Option<DateTime<Utc>>,
    pub attachments: Vec<Attachment>,
    pub omitted: Vec<Omitted>,
    pub automatic: Automatic,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error("not a mail message: {0}")]
    Unparsable(String),
    #[error("the message has no sender address")]
    NoSender,
}

/// Strips the angle brackets and surrounding space of one Message-ID.
pub fn bare_id(id: &str) -> String {
    id.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim()
        .to_string()
}

/// Every `<id>` in a header value (References, In-Reply-To), in order,
/// tolerant of the junk real clients put there.
pub fn message_ids(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        match after.find('>') {
            Some(end) => {
                let id = after[..end].trim();
                if !id.is_empty() && !id.contains(char::is_whitespace) {
                    out.push(id.to_string());
                }
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    if out.is_empty() {
        // Some clients omit the brackets.
        for w in value.split_whitespace() {
            if w.contains('@') {
                out.push(bare_id(w));
            }
        }
    }
    out
}

/// The sha256 of the raw bytes, the dedupe key of a message without Message-ID.
pub fn content_hash(raw: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(raw)))
}

fn addresses(headers: &[mailparse::MailHeader<'_>], key: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for h in headers.get_all_headers(key) {
        if let Ok(list) = mailparse::addrparse_header(h) {
            for a in list.iter() {
                match a {
                    mailparse::MailAddr::Single(s) => {
                        out.push((s.addr.trim().to_lowercase(), s.display_name.clone()))
                    }
                    mailparse::MailAddr::Group(g) => {
                        for s in &g.addrs {
                            out.push((s.addr.trim().to_lowercase(), s.display_name.clone()))
                        }
                    }
                }
            }
        }
    }
    out.retain(|(a, _)| a.contains('@'));
    out
}

/// Turns HTML into the plain text shown to agents.
pub fn html_to_text(html: &str) -> String {
    // Line breaks where blocks end, then every tag removed by ammonia.
    let mut s = html.to_string();
    for tag in [
        "<br", "<BR", "</p", "</P", "</div", "</DIV", "</li", "</tr", "</h",
    ] {
        s = s.replace(tag, &format!("\n{tag}"));
    }
    let stripped = ammonia::Builder::empty()
        .clean_content_tags(["script", "style", "head", "title"].into_iter().collect())
        .clean(&s)
        .to_string();
    let text = unescape(&stripped);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut out = String::new();
    let mut blank = 0;
    for l in lines {
        if l.is_empty() {
            blank += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        out.push_str(l);
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("\u{a0}", " ")
        .replace("&amp;", "&")
}

/// Sanitizes HTML for serving to agents: no scripts, no event handlers, no
/// remote loads but `cid:` inline images, `https:`/`mailto:` links.
pub fn sanitize_html(html: &str) -> String {
    ammonia::Builder::default()
        .url_schemes(["https", "http", "mailto", "cid"].into_iter().collect())
        .link_rel(Some("noopener noreferrer nofollow"))
        // A document's <head> (its <title> above all) is not part of the
        // message: its text would show as the first line of the body.
        .clean_content_tags(["script", "style", "head", "title"].into_iter().collect())
        .clean(html)
        .to_string()
}

#[derive(Default)]
struct Walk {
    text: Option<String>,
    html: Option<String>,
    attachments: Vec<Attachment>,
    omitted: Vec<Omitted>,
    bounced: Option<String>,
    permanent: bool,
}

fn walk(part: &ParsedMail<'_>, out: &mut Walk, depth: usize) {
    let mime = part.ctype.mimetype.to_ascii_lowercase();
    if depth > 32 {
        return;
    }
    if mime.starts_with("multipart/") {
        for p in &part.subparts {
            walk(p, out, depth + 1);
        }
        return;
    }
    let disp = part.get_content_disposition();
    let filename = disp
        .params
        .get("filename")
        .or_else(|| part.ctype.params.get("name"))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let is_attachment = disp.disposition == DispositionType::Attachment;
    if !is_attachment && filename.is_none() {
        if mime == "text/plain" && out.text.is_none() {
            out.text = Some(part.get_body().unwrap_or_default());
            return;
        }
        if mime == "text/html" && out.html.is_none() {
            out.html = Some(part.get_body().unwrap_or_default());
            return;
        }
        if mime == "message/delivery-status" {
            let body = part.get_body().unwrap_or_default();
            for line in body.lines() {
                let l = line.trim().to_ascii_lowercase();
                if let Some(v) = l.strip_prefix("status:") {
                    if v.trim().starts_with('5') {
                        out.permanent = true;
                    }
                }
            }
            return;
        }
        if mime == "message/rfc822" || mime == "text/rfc822-headers" {
            if out.bounced.is_none() {
                let raw = part.get_body_raw().unwrap_or_default();
                if let Ok((hs, _)) = mailparse::parse_headers(&raw) {
                    if let Some(id) = hs.get_first_value("Message-ID") {
                        out.bounced = message_ids(&id).into_iter().next();
                    }
                }
            }
            // A forwarded message is also kept as a file below.
            if mime == "text/rfc822-headers" {
                return;
            }
        }
    }
    let data = part.get_body_raw().unwrap_or_default();
    let content_id = part
        .headers
        .get_first_value("Content-ID")
        .map(|c| bare_id(&c))
        .filter(|c| !c.is_empty());
    let inline = disp.disposition == DispositionType::Inline && content_id.is_some()
        || (content_id.is_some() && !is_attachment);
    if data.len() > MAX_ATTACHMENT_BYTES {
        out.omitted.push(Omitted {
            filename,
            content_type: mime,
            size: data.len(),
        });
    } else {
        out.attachments.push(Attachment {
            filename,
            content_type: mime,
            content_id,
            inline,
            data,
        });
    }
}

/// Parses one raw message.
pub fn parse(raw: &[u8]) -> Result<ParsedEmail, ParseError> {
    let mail = mailparse::parse_mail(raw).map_err(|e| ParseError::Unparsable(e.to_string()))?;
    let h = &mail.headers;
    let from = addresses(h, "From")
        .into_iter()
        .next()
        .or_else(|| addresses(h, "Sender").into_iter().next())
        .ok_or(ParseError::NoSender)?;
    let message_id = h
        .get_first_value("Message-ID")
        .and_then(|v| message_ids(&v).into_iter().next());
    let has_message_id = message_id.is_some();
    let message_id = message_id.unwrap_or_else(|| content_hash(raw));
    let in_reply_to = h
        .get_first_value("In-Reply-To")
        .map(|v| message_ids(&v))
        .unwrap_or_default();
    let references = h
        .get_all_values("References")
        .iter()
        .flat_map(|v| message_ids(v))
        .collect();
    let mut recipients = Vec::new();
    let mut seen = HashSet::new();
    for key in ["To", "Cc", "Delivered-To", "X-Original-To"] {
        for (a, _) in addresses(h, key) {
            if seen.insert(a.clone()) {
                recipients.push(a);
            }
        }
    }
    let subject = h
        .get_first_value("Subject")
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let date = h
        .get_first_value("Date")
        .and_then(|d| mailparse::dateparse(&d).ok())
        .and_then(|t| Utc.timestamp_opt(t, 0).single());

    let mut w = Walk::default();
    walk(&mail, &mut w, 0);

    let mime = mail.ctype.mimetype.to_ascii_lowercase();
    let report_type = mail
        .ctype
        .params
        .get("report-type")
        .map(|s| s.to_ascii_lowercase());
    let auto_submitted = h
        .get_first_value("Auto-Submitted")
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty() && v != "no");
    let precedence = h
        .get_first_value("Precedence")
        .map(|v| v.trim().to_ascii_lowercase());
    let automatic =
        if mime == "multipart/report" && report_type.as_deref() == Some("delivery-status") {
            Automatic::Bounce {
                original: w.bounced.clone(),
                permanent: w.permanent,
            }
        } else if auto_submitted.is_some()
            || h.get_first_header("X-Autoreply").is_some()
            || h.get_first_header("X-Autorespond").is_some()
            || precedence.as_deref() == Some("auto_reply")
        {
            Automatic::AutoReply
        } else {
            Automatic::No
        };

    let html = w.html.as_deref().map(sanitize_html);
    let text = match w.text {
        Some(t) => t.replace("\r\n", "\n").trim_end().to_string(),
        None => w.html.as_deref().map(html_to_text).unwrap_or_default(),
    };
    Ok(ParsedEmail {
        message_id,
        has_message_id,
        in_reply_to,
        references,
        from_address: from.0,
        from_name: from
            .1
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty()),
        recipients,
        subject,
        text,
        html,
        date,
        attachments: w.attachments,
        omitted: w.omitted,
        automatic,
    })
}

/// Points the sanitized HTML's `cid:` links to one inline image at `url`
/// (RFC 2392; the sanitizer keeps attribute values double-quoted). A
/// Content-ID with characters the sanitizer escapes is left alone.
pub fn link_inline(html: &str, content_id: &str, url: &str) -> String {
    if content_id.is_empty() || content_id.contains(['"', '&', '<', '>', '\'']) {
        return html.to_string();
    }
    let mut out = html.to_string();
    for scheme in ["cid:", "CID:", "Cid:"] {
        out = out.replace(&format!("\"{scheme}{content_id}\""), &format!("\"{url}\""));
    }
    out
}

/// The subject of a reply: `Re: <original>`, without stacking prefixes.
pub fn reply_subject(original: &str) -> String {
    let t = original.trim();
    let lower = t.to_ascii_lowercase();
    if lower.starts_with("re:") || lower.starts_with("aw:") || lower.starts_with("sv:") {
        t.to_string()
    } else if t.is_empty() {
        "Re:".to_string()
    } else {
        format!("Re: {t}")
    }
}
