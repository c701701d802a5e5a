//! Messenger Platform webhook events into [`Inbound`] items: a pure function
//! of the parsed body, tested below on every file of `fixtures/facebook/` and
//! `fixtures/instagram/` (providers.md A3.2, A4.3).
//!
//! Only entries whose `id` is the channel's Page / Instagram account are
//! read (Meta may batch several Pages of one app in a webhook); every
//! `messaging[]` event of each is turned into at most one item:
//!
//! | event | becomes |
//! | --- | --- |
//! | `message` | [`Inbound::Message`] from `sender.id`, `provider_id` = `mid` |
//! | `message` with `is_echo` | [`Inbound::Echo`] to `recipient.id` (the customer), `echo_of` = `metadata` |
//! | `message` with `is_deleted` | [`Inbound::Retraction`] of `mid` |
//! | `postback` | [`Inbound::Message`], text = `title`, kind `postback` |
//! | `reaction` | [`Inbound::Reaction`], emoji `None` on `unreact` |
//! | `delivery` | [`Inbound::Watermark`] `Delivered` up to `watermark`, naming `mids` |
//! | `read` | [`Inbound::Watermark`] `Read` up to `watermark`, or up to the event's time when only `mid` is given (Instagram) |
//! | `optin`, `referral`, `policy_enforcement`, `message_edit`, ... ; `standby` and `changes` entries; another `object` | nothing |
//!
//! A body that is not the documented shape (no `object`, `entry` not an
//! array, a message without `mid` or a sender without `id`) is
//! [`IntakeError::Malformed`]. Events from the chat plugin's guests
//! (`sender.user_ref`, no PSID we could answer) are skipped.

use crate::adapters::{Inbound, InboundMessage, IntakeError, MediaRef, Reaction, Watermark};
use crate::domain::{ChannelKind, DeliveryStatus};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

type Object = Map<String, Value>;

fn malformed(message: impl Into<String>) -> IntakeError {
    IntakeError::Malformed(message.into())
}

/// Every item of a webhook body for the channel of `kind` whose Page or
/// Instagram account is `account_id`. `now` stands in where Meta gives no time.
pub fn normalize(
    kind: ChannelKind,
    account_id: &str,
    body: &Value,
    now: DateTime<Utc>,
) -> Result<Vec<Inbound>, IntakeError> {
    let body = body
        .as_object()
        .ok_or_else(|| malformed("the body is not a JSON object"))?;
    let object = match body.get("object") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(malformed("object is not a string")),
        None => return Err(malformed("object is missing")),
    };
    if object != super::webhook_object(kind) {
        // Correctly signed, but not a kind of event this channel handles.
        tracing::debug!(object, "ignoring a Meta webhook of another object");
        return Ok(vec![]);
    }
    let entries = match body.get("entry") {
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err(malformed("entry is not an array")),
        None => return Err(malformed("entry is missing")),
    };
    let mut out = vec![];
    for (n, entry) in entries.iter().enumerate() {
        let at = format!("entry[{n}]");
        let entry = object_at(entry, &at)?;
        let id = id_of(entry.get("id")).ok_or_else(|| malformed(format!("{at}.id is missing")))?;
        if id != account_id {
            tracing::debug!(entry = %id, "ignoring an entry for another Page or account");
            continue;
        }
        let events = match entry.get("messaging") {
            // `changes` (comments), `standby` (another app owns the thread).
            None | Some(Value::Null) => continue,
            Some(Value::Array(events)) => events,
            Some(_) => return Err(malformed(format!("{at}.messaging is not an array"))),
        };
        for (k, event) in events.iter().enumerate() {
            if let Some(item) = self::event(event, &format!("{at}.messaging[{k}]"), now)? {
                out.push(item);
            }
        }
    }
    Ok(out)
}

fn event(event: &Value, at: &str, now: DateTime<Utc>) -> Result<Option<Inbound>, IntakeError> {
    let ev = object_at(event, at)?;
    let stamp = ev.get("timestamp");
    let sent_at = stamp.and_then(millis).unwrap_or(now);
    if let Some(m) = ev.get("message") {
        message(ev, object_at(m, &format!("{at}.message"))?, at, sent_at)
    } else if let Some(p) = ev.get("postback") {
        postback(ev, object_at(p, &format!("{at}.postback"))?, at, sent_at)
    } else if let Some(r) = ev.get("reaction") {
        reaction(ev, object_at(r, &format!("{at}.reaction"))?, at, sent_at)
    } else if let Some(d) = ev.get("delivery") {
        delivery(ev, object_at(d, &format!("{at}.delivery"))?, at)
    } else if let Some(r) = ev.get("read") {
        read(ev, object_at(r, &format!("{at}.read"))?, at, sent_at)
    } else {
        Ok(None)
    }
}

fn message(
    ev: &Object,
    m: &Object,
    at: &str,
    sent_at: DateTime<Utc>,
) -> Result<Option<Inbound>, IntakeError> {
    let mid =
        text_of(m.get("mid")).ok_or_else(|| malformed(format!("{at}.message.mid is missing")))?;
    // An echo is the business's own message: `sender` is the Page or
    // account, `recipient` the customer.
    let echo = flag(m, "is_echo");
    let Some(customer) = party(ev, if echo { "recipient" } else { "sender" }, at)? else {
        return Ok(None);
    };
    if flag(m, "is_deleted") {
        return Ok(Some(Inbound::Retraction {
            provider_id: mid,
            from: customer,
        }));
    }
    let c = content(m, &format!("{at}.message"))?;
    let item = InboundMessage {
        provider_id: mid,
        from: customer,
        reply_to: c.reply_to,
        kind: c.kind,
        // Our message ID, set as `metadata` when we sent it (Messenger).
        echo_of: if echo {
            text_of(m.get("metadata"))
        } else {
            None
        },
        text: c.text,
        sent_at,
        media: c.media,
        ..InboundMessage::default()
    };
    Ok(Some(if echo {
        Inbound::Echo(item)
    } else {
        Inbound::Message(item)
    }))
}

#[derive(Default)]
struct Content {
    text: String,
    kind: Option<String>,
    media: Vec<MediaRef>,
    reply_to: Option<String>,
}

fn content(m: &Object, at: &str) -> Result<Content, IntakeError> {
    let mut c = Content {
        text: match m.get("text") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(malformed(format!("{at}.text is not a string"))),
        },
        ..Content::default()
    };
    if let Some(Value::Object(q)) = m.get("quick_reply") {
        // The text is the button's title, as the customer saw it.
        c.kind = Some("quick_reply".into());
        if c.text.is_empty() {
            c.text = text_of(q.get("payload")).unwrap_or_default();
        }
    }
    match m.get("attachments") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for (n, a) in list.iter().enumerate() {
                attachment(object_at(a, &format!("{at}.attachments[{n}]"))?, &mut c);
            }
        }
        Some(_) => return Err(malformed(format!("{at}.attachments is not an array"))),
    }
    if let Some(Value::Object(r)) = m.get("reply_to") {
        c.reply_to = text_of(r.get("mid"));
        if r.contains_key("story") && c.kind.is_none() {
            // An answer to one of the account's stories (Instagram).
            c.kind = Some("story_reply".into());
        }
    }
    if flag(m, "is_unsupported") {
        // Instagram: a GIF, sticker or other content the API does not carry.
        c.kind = Some("unsupported".into());
    }
    if c.text.is_empty() && c.media.is_empty() && c.kind.is_none() {
        c.kind = Some("unsupported".into());
    }
    Ok(c)
}

/// One `attachments[]` element: media by URL, or text.
fn attachment(a: &Object, c: &mut Content) {
    let kind = a.get("type").and_then(Value::as_str).unwrap_or("");
    let payload = a.get("payload").and_then(Value::as_object);
    let url = payload
        .and_then(|p| p.get("url"))
        .and_then(Value::as_str)
        .filter(|u| is_web_url(u));
    let media = |url: &str| MediaRef {
        url: url.to_string(),
        ..MediaRef::default()
    };
    match kind {
        // Plain media (Messenger stickers are images with a `sticker_id`).
        "image" | "audio" | "video" | "file" => c.media.extend(url.map(media)),
        // A shared link (`fallback`) or a template: their words, as text.
        "fallback" | "template" => {
            for piece in attachment_text(a, payload) {
                append(&mut c.text, &piece);
            }
        }
        "location" => {
            c.kind.get_or_insert_with(|| "location".into());
            let coordinates = payload.and_then(|p| p.get("coordinates"));
            let lat = coordinates
                .and_then(|x| x.get("lat"))
                .and_then(Value::as_f64);
            let long = coordinates
                .and_then(|x| x.get("long"))
                .and_then(Value::as_f64);
            if let (Some(lat), Some(long)) = (lat, long) {
                append(&mut c.text, &format!("{lat}, {long}"));
            }
        }
        // Instagram's heart "sticker".
        "like_heart" => {
            c.kind.get_or_insert_with(|| "like_heart".into());
            if c.text.is_empty() {
                c.text = "\u{2764}\u{fe0f}".into();
            }
        }
        "" => {}
        // `story_mention`, `share`, `ig_reel`, `reel`, ...: kept as what they
        // are, with the media when Meta gives a URL.
        other => {
            c.kind.get_or_insert_with(|| other.to_string());
            c.media.extend(url.map(media));
        }
    }
}

/// The title and link of a `fallback` attachment (in `payload`, or beside it
/// in older payloads), or the titles of a template's elements.
fn attachment_text(a: &Object, payload: Option<&Object>) -> Vec<String> {
    let field = |k: &str| {
        payload
            .and_then(|p| text_of(p.get(k)))
            .or_else(|| text_of(a.get(k)))
    };
    let mut out: Vec<String> = [field("title"), field("url").or_else(|| field("URL"))]
        .into_iter()
        .flatten()
        .collect();
    let elements = payload.into_iter().flat_map(|p| {
        [
            p.get("elements"),
            p.get("product").and_then(|x| x.get("elements")),
        ]
        .into_iter()
        .flatten()
        .filter_map(Value::as_array)
        .flatten()
    });
    out.extend(elements.filter_map(|e| text_of(e.get("title"))));
    out
}

/// Adds a line to the text unless the text already holds it.
fn append(text: &mut String, piece: &str) {
    let piece = piece.trim();
    if piece.is_empty() || text.contains(piece) {
        return;
    }
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(piece);
}

fn postback(
    ev: &Object,
    p: &Object,
    at: &str,
    sent_at: DateTime<Utc>,
) -> Result<Option<Inbound>, IntakeError> {
    let Some(customer) = party(ev, "sender", at)? else {
        return Ok(None);
    };
    // `mid` since Graph v11.0; before it, the sender and time identify it.
    let provider_id =
        text_of(p.get("mid")).unwrap_or_else(|| format!("postback:{customer}:{}", stamp_text(ev)));
    Ok(Some(Inbound::Message(InboundMessage {
        provider_id,
        from: customer,
        kind: Some("postback".into()),
        text: text_of(p.get("title"))
            .or_else(|| text_of(p.get("payload")))
            .unwrap_or_default(),
        sent_at,
        ..InboundMessage::default()
    })))
}

fn reaction(
    ev: &Object,
    r: &Object,
    at: &str,
    sent_at: DateTime<Utc>,
) -> Result<Option<Inbound>, IntakeError> {
    let target =
        text_of(r.get("mid")).ok_or_else(|| malformed(format!("{at}.reaction.mid is missing")))?;
    let Some(customer) = party(ev, "sender", at)? else {
        return Ok(None);
    };
    let action = r.get("action").and_then(Value::as_str).unwrap_or("react");
    let emoji = match action {
        "react" => {
            let emoji = text_of(r.get("emoji")).or_else(|| {
                r.get("reaction")
                    .and_then(Value::as_str)
                    .filter(|n| !n.is_empty())
                    .map(emoji_for)
            });
            match emoji {
                Some(e) => Some(e),
                None => return Ok(None),
            }
        }
        "unreact" => None,
        other => {
            tracing::debug!(action = other, "ignoring a reaction action");
            return Ok(None);
        }
    };
    Ok(Some(Inbound::Reaction(Reaction {
        // Meta gives a reaction no ID of its own: this is stable across retries.
        provider_id: format!("{target}:{customer}:{action}:{}", stamp_text(ev)),
        from: customer,
        target_provider_id: target,
        emoji,
        sent_at,
    })))
}

/// The emoji of a reaction Meta names only (`love`, `like`, ...).
fn emoji_for(name: &str) -> String {
    match name {
        "like" => "\u{1f44d}",
        "dislike" => "\u{1f44e}",
        "love" => "\u{2764}\u{fe0f}",
        "smile" | "laugh" => "\u{1f606}",
        "wow" => "\u{1f62e}",
        "sad" => "\u{1f622}",
        "angry" => "\u{1f620}",
        other => other,
    }
    .to_string()
}

fn delivery(ev: &Object, d: &Object, at: &str) -> Result<Option<Inbound>, IntakeError> {
    let Some(customer) = party(ev, "sender", at)? else {
        return Ok(None);
    };
    let mids: Vec<String> = match d.get("mids") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(list)) => list.iter().filter_map(|v| text_of(Some(v))).collect(),
        Some(_) => return Err(malformed(format!("{at}.delivery.mids is not an array"))),
    };
    let up_to = d.get("watermark").and_then(millis);
    if up_to.is_none() && mids.is_empty() {
        return Ok(None);
    }
    Ok(Some(Inbound::Watermark(Watermark {
        from: customer,
        status: DeliveryStatus::Delivered,
        // Without a watermark only the named messages are covered.
        up_to: up_to.unwrap_or(DateTime::UNIX_EPOCH),
        provider_ids: mids,
    })))
}

fn read(
    ev: &Object,
    r: &Object,
    at: &str,
    sent_at: DateTime<Utc>,
) -> Result<Option<Inbound>, IntakeError> {
    let Some(customer) = party(ev, "sender", at)? else {
        return Ok(None);
    };
    let mid = text_of(r.get("mid"));
    // Messenger gives a watermark; Instagram names the message read, so
    // everything sent before the moment it was read counts as read.
    let up_to = match r.get("watermark").and_then(millis) {
        Some(w) => w,
        None if mid.is_some() => sent_at,
        None => return Ok(None),
    };
    Ok(Some(Inbound::Watermark(Watermark {
        from: customer,
        status: DeliveryStatus::Read,
        up_to,
        provider_ids: mid.into_iter().collect(),
    })))
}

// ----- small readers ---------------------------------------------------

fn object_at<'a>(v: &'a Value, at: &str) -> Result<&'a Object, IntakeError> {
    v.as_object()
        .ok_or_else(|| malformed(format!("{at} is not an object")))
}

/// The ID of `sender` or `recipient`; `None` for a chat plugin guest
/// (`user_ref` instead of an ID).
fn party(ev: &Object, side: &str, at: &str) -> Result<Option<String>, IntakeError> {
    let p = match ev.get(side) {
        Some(Value::Object(p)) => p,
        Some(_) => return Err(malformed(format!("{at}.{side} is not an object"))),
        None => return Err(malformed(format!("{at}.{side} is missing"))),
    };
    match id_of(p.get("id")) {
        Some(id) => Ok(Some(id)),
        None if p.contains_key("user_ref") => {
            tracing::debug!("skipping an event of a chat plugin guest (user_ref)");
            Ok(None)
        }
        None => Err(malformed(format!("{at}.{side}.id is missing"))),
    }
}

/// A Meta ID: a non-empty string, or a number in older payloads.
fn id_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

/// A non-empty string.
fn text_of(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn flag(o: &Object, key: &str) -> bool {
    o.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// The event's `timestamp` as Meta wrote it, for IDs that must not change on a retry.
fn stamp_text(ev: &Object) -> String {
    match ev.get("timestamp") {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    }
}

/// A time in milliseconds since the epoch (Meta's `timestamp` and `watermark`).
fn millis(v: &Value) -> Option<DateTime<Utc>> {
    let ms = match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && f.abs() < 1e15)
                .map(|f| f as i64)
        })?,
        Value::String(s) => s.trim().parse::<i64>().ok()?,
        _ => return None,
    };
    if ms <= 0 {
        return None;
    }
    DateTime::from_timestamp_millis(ms)
}

fn is_web_url(u: &str) -> bool {
    url::Url::parse(u)
        .map(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "108402317654321";
    const PSID: &str = "7412589630147852";
    const IG: &str = "17841405309211844";
    const IGSID: &str = "1043586204978312";
    /// 2026-11-25T10:00:00Z, the first fixture's `timestamp`.
    const T: i64 = 1_795_600_800_000;
    /// Messages we sent (their `message_id`s), as the fixtures name them.
    const OUR1: &str = "m_ZmItb3Vycy0xQx7Lm2Vb9KcQ7kNvgH3aB1cZ";
    const OUR2: &str = "m_ZmItb3Vycy0yQx7Lm2Vb9KcQ7kNvgH3aB1cZ";
    const OUR3: &str = "m_ZmItb3Vycy0zQx7Lm2Vb9KcQ7kNvgH3aB1cZ";
    const IG_OUR1: &str = "aWdfaXRlbToxOklHTWVzc2FnZUlEOjE3ODQxNDA1MzA5MjExODQ0OjM0MDI4MjM2Njg0MTcxMDMwMDk0OTEyODE1NDMyMTA5ODc2NTQzMg";
    const IG_OUR2: &str = "aWdfaXRlbToxOklHTWVzc2FnZUlEOjE3ODQxNDA1MzA5MjExODQ0OjM0MDI4MjM2Njg0MTcxMDMwMDk0OTEyODE1NDMyMTA5ODc2NTQzMw";

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    /// The time normalization is run at (never in a fixture).
    fn now() -> DateTime<Utc> {
        at(T + 86_400_000)
    }

    fn fb_mid(tag: &str) -> String {
        use base64::Engine;
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("fb-{tag}"));
        format!("m_{b}Qx7Lm2Vb9KcQ7kNvgH3aB1cZ")
    }

    fn ig_mid(n: u32) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(format!(
            "ig_item:1:IGMessageID:{IG}:3402823668417103009491281543210000000{n:02}"
        ))
    }

    fn fixture(kind: ChannelKind, name: &str) -> &'static str {
        match (kind, name) {
            (ChannelKind::Facebook, "text") => include_str!("../../../fixtures/facebook/text.json"),
            (ChannelKind::Facebook, "image") => {
                include_str!("../../../fixtures/facebook/image.json")
            }
            (ChannelKind::Facebook, "audio") => {
                include_str!("../../../fixtures/facebook/audio.json")
            }
            (ChannelKind::Facebook, "video") => {
                include_str!("../../../fixtures/facebook/video.json")
            }
            (ChannelKind::Facebook, "file") => include_str!("../../../fixtures/facebook/file.json"),
            (ChannelKind::Facebook, "fallback") => {
                include_str!("../../../fixtures/facebook/fallback.json")
            }
            (ChannelKind::Facebook, "quick_reply") => {
                include_str!("../../../fixtures/facebook/quick_reply.json")
            }
            (ChannelKind::Facebook, "postback") => {
                include_str!("../../../fixtures/facebook/postback.json")
            }
            (ChannelKind::Facebook, "reply_to") => {
                include_str!("../../../fixtures/facebook/reply_to.json")
            }
            (ChannelKind::Facebook, "reaction_react") => {
                include_str!("../../../fixtures/facebook/reaction_react.json")
            }
            (ChannelKind::Facebook, "reaction_unreact") => {
                include_str!("../../../fixtures/facebook/reaction_unreact.json")
            }
            (ChannelKind::Facebook, "deleted") => {
                include_str!("../../../fixtures/facebook/deleted.json")
            }
            (ChannelKind::Facebook, "echo_ours") => {
                include_str!("../../../fixtures/facebook/echo_ours.json")
            }
            (ChannelKind::Facebook, "echo_page_inbox") => {
                include_str!("../../../fixtures/facebook/echo_page_inbox.json")
            }
            (ChannelKind::Facebook, "delivery") => {
                include_str!("../../../fixtures/facebook/delivery.json")
            }
            (ChannelKind::Facebook, "read") => include_str!("../../../fixtures/facebook/read.json"),
            (ChannelKind::Facebook, "batch") => {
                include_str!("../../../fixtures/facebook/batch.json")
            }
            (ChannelKind::Instagram, "text") => {
                include_str!("../../../fixtures/instagram/text.json")
            }
            (ChannelKind::Instagram, "image") => {
                include_str!("../../../fixtures/instagram/image.json")
            }
            (ChannelKind::Instagram, "audio") => {
                include_str!("../../../fixtures/instagram/audio.json")
            }
            (ChannelKind::Instagram, "video") => {
                include_str!("../../../fixtures/instagram/video.json")
            }
            (ChannelKind::Instagram, "story_mention") => {
                include_str!("../../../fixtures/instagram/story_mention.json")
            }
            (ChannelKind::Instagram, "share") => {
                include_str!("../../../fixtures/instagram/share.json")
            }
            (ChannelKind::Instagram, "ig_reel") => {
                include_str!("../../../fixtures/instagram/ig_reel.json")
            }
            (ChannelKind::Instagram, "unsupported") => {
                include_str!("../../../fixtures/instagram/unsupported.json")
            }
            (ChannelKind::Instagram, "quick_reply") => {
                include_str!("../../../fixtures/instagram/quick_reply.json")
            }
            (ChannelKind::Instagram, "postback") => {
                include_str!("../../../fixtures/instagram/postback.json")
            }
            (ChannelKind::Instagram, "reply_to") => {
                include_str!("../../../fixtures/instagram/reply_to.json")
            }
            (ChannelKind::Instagram, "story_reply") => {
                include_str!("../../../fixtures/instagram/story_reply.json")
            }
            (ChannelKind::Instagram, "reaction_react") => {
                include_str!("../../../fixtures/instagram/reaction_react.json")
            }
            (ChannelKind::Instagram, "reaction_unreact") => {
                include_str!("../../../fixtures/instagram/reaction_unreact.json")
            }
            (ChannelKind::Instagram, "deleted") => {
                include_str!("../../../fixtures/instagram/deleted.json")
            }
            (ChannelKind::Instagram, "echo") => {
                include_str!("../../../fixtures/instagram/echo.json")
            }
            (ChannelKind::Instagram, "read") => {
                include_str!("../../../fixtures/instagram/read.json")
            }
            (ChannelKind::Instagram, "comments") => {
                include_str!("../../../fixtures/instagram/comments.json")
            }
            (ChannelKind::Instagram, "batch") => {
                include_str!("../../../fixtures/instagram/batch.json")
            }
            _ => panic!("no fixture {kind}/{name}"),
        }
    }

    fn run(kind: ChannelKind, body: &str) -> Result<Vec<Inbound>, IntakeError> {
        let account = match kind {
            ChannelKind::Instagram => IG,
            _ => PAGE,
        };
        let v: Value = serde_json::from_str(body).expect("fixtures are JSON");
        normalize(kind, account, &v, now())
    }

    fn fb(name: &str) -> Vec<Inbound> {
        run(ChannelKind::Facebook, fixture(ChannelKind::Facebook, name)).unwrap()
    }

    fn ig(name: &str) -> Vec<Inbound> {
        run(
            ChannelKind::Instagram,
            fixture(ChannelKind::Instagram, name),
        )
        .unwrap()
    }

    fn media(url: &str) -> MediaRef {
        MediaRef {
            url: url.into(),
            ..MediaRef::default()
        }
    }

    fn message(provider_id: &str, from: &str, text: &str, sent_at: i64) -> InboundMessage {
        InboundMessage {
            provider_id: provider_id.into(),
            from: from.into(),
            text: text.into(),
            sent_at: at(sent_at),
            ..InboundMessage::default()
        }
    }

    fn lookaside(asset: &str, signature: &str) -> String {
        format!(
            "https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id={asset}&signature={signature}"
        )
    }

    // ----- Messenger ---------------------------------------------------

    /// If this breaks, customers' words are lost or garbled (Meta escapes non-ASCII).
    #[test]
    fn messenger_text_becomes_a_message_with_meta_time() {
        assert_eq!(
            fb("text"),
            vec![Inbound::Message(message(
                &fb_mid("text"),
                PSID,
                "Hi! My order #4411 hasn\u{2019}t arrived yet \u{1f4e6} Can you check?",
                T
            ))]
        );
    }

    /// If this breaks, photos customers send never reach the agent.
    #[test]
    fn messenger_images_become_media_with_unescaped_urls() {
        let mut m = message(&fb_mid("image"), PSID, "", T + 60_000);
        m.media = vec![
            media("https://scontent.xx.fbcdn.net/v/t1.15752-9/471203958_1093847562019384_6102938475610293847_n.jpg?_nc_cat=108&ccb=1-7&_nc_sid=fc17b8&_nc_ohc=Qx7Lm2Vb9KcQ7kNvgH3aB1c&_nc_ad=z-m&_nc_cid=0&_nc_ht=scontent.xx&oh=03_Q7cD1QHk2mZpR8sT&oe=6A1F0C3D"),
            media("https://scontent.xx.fbcdn.net/v/t1.15752-9/471203959_2203948576102938_7162039485716203948_n.png?_nc_cat=103&ccb=1-7&_nc_sid=fc17b8&_nc_ohc=Zr4Tk8Wq1LmQ7kNvgF2bC3d&_nc_ad=z-m&_nc_cid=0&_nc_ht=scontent.xx&oh=03_Q7cD1QGx9LpN4vW&oe=6A1F1E2F"),
        ];
        assert_eq!(fb("image"), vec![Inbound::Message(m)]);
    }

    /// If this breaks, voice notes, videos and documents are dropped.
    #[test]
    fn messenger_audio_video_and_file_become_media() {
        let mut audio = message(&fb_mid("audio"), PSID, "", T + 120_000);
        audio.media = vec![media("https://cdn.fbsbx.com/v/t59.3654-21/470112233_1029384756102938_5647382910564738291_n.mp4/audioclip-1795600920000-4312.mp4?_nc_cat=104&ccb=1-7&_nc_sid=d61c36&_nc_ohc=Lm3KxP9qR2sQ7kNvgE5cD4e&_nc_ht=cdn.fbsbx.com&oh=03_Q7cD1QFa2BcD3eF&oe=6A1F2B4C")];
        assert_eq!(fb("audio"), vec![Inbound::Message(audio)]);
        let mut video = message(&fb_mid("video"), PSID, "It arrived like this", T + 180_000);
        video.media = vec![media("https://cdn.fbsbx.com/v/t42.3356-2/470556677_1122334455667788_9988776655443322110_n.mp4/video-1795600980000.mp4?_nc_cat=105&ccb=1-7&_nc_sid=060d78&_nc_ohc=Vb8Nm1Zx4QwQ7kNvgD6dE5f&_nc_ht=cdn.fbsbx.com&oh=03_Q7cD1QE7fGh8iJ&oe=6A1F3C5D")];
        assert_eq!(fb("video"), vec![Inbound::Message(video)]);
        let mut file = message(&fb_mid("file"), PSID, "", T + 240_000);
        file.media = vec![media("https://cdn.fbsbx.com/v/t59.2708-21/470998877_1234509876543210_9081726354453627180_n.pdf/invoice-4411.pdf?_nc_cat=101&ccb=1-7&_nc_sid=0cab14&_nc_ohc=Pd5Fq7Hs2JkQ7kNvgC7eF6g&_nc_ht=cdn.fbsbx.com&oh=03_Q7cD1QD4kLm5nO&oe=6A1F4D6E")];
        assert_eq!(fb("file"), vec![Inbound::Message(file)]);
    }

    /// If this breaks, a shared link arrives as an empty message.
    #[test]
    fn a_shared_link_fallback_becomes_text() {
        assert_eq!(
            fb("fallback"),
            vec![Inbound::Message(message(
                &fb_mid("fallback"),
                PSID,
                "This one please\nBlue kettle \u{2013} Example Shop\nhttps://shop.example.com/products/blue-kettle",
                T + 270_000
            ))]
        );
    }

    /// If this breaks, an agent sees a button's code instead of what the customer tapped.
    #[test]
    fn a_quick_reply_is_its_visible_text() {
        let mut m = message(&fb_mid("quick-reply"), PSID, "Track my order", T + 300_000);
        m.kind = Some("quick_reply".into());
        assert_eq!(fb("quick_reply"), vec![Inbound::Message(m)]);
    }

    /// If this breaks, button taps ("Talk to an agent") never reach a queue.
    #[test]
    fn a_postback_is_a_message_with_its_title() {
        let mut m = message(&fb_mid("postback"), PSID, "Talk to an agent", T + 360_000);
        m.kind = Some("postback".into());
        assert_eq!(fb("postback"), vec![Inbound::Message(m)]);
    }

    /// If this breaks, quoted replies lose the message they answer.
    #[test]
    fn reply_to_names_the_quoted_message() {
        let mut m = message(&fb_mid("reply-to"), PSID, "Yes, that one", T + 420_000);
        m.reply_to = Some(OUR1.into());
        assert_eq!(fb("reply_to"), vec![Inbound::Message(m)]);
    }

    /// If this breaks, reactions are lost, or a removed one stays shown.
    #[test]
    fn reactions_and_their_removal() {
        assert_eq!(
            fb("reaction_react"),
            vec![Inbound::Reaction(Reaction {
                provider_id: format!("{OUR1}:{PSID}:react:{}", T + 480_000),
                from: PSID.into(),
                target_provider_id: OUR1.into(),
                emoji: Some("\u{2764}\u{fe0f}".into()),
                sent_at: at(T + 480_000),
            })]
        );
        assert_eq!(
            fb("reaction_unreact"),
            vec![Inbound::Reaction(Reaction {
                provider_id: format!("{OUR1}:{PSID}:unreact:{}", T + 540_000),
                from: PSID.into(),
                target_provider_id: OUR1.into(),
                emoji: None,
                sent_at: at(T + 540_000),
            })]
        );
    }

    /// If this breaks, an unsent message is shown as new, or kept as if still there.
    #[test]
    fn an_unsent_message_is_a_retraction() {
        assert_eq!(
            fb("deleted"),
            vec![Inbound::Retraction {
                provider_id: fb_mid("text"),
                from: PSID.into(),
            }]
        );
    }

    /// If this breaks, our own replies come back as customer messages.
    #[test]
    fn our_echo_names_the_customer_and_our_message() {
        let mut m = message(OUR2, PSID, "It ships today", T + 660_000);
        m.echo_of = Some("5f0c6a1e9b2d4c7e8a3f1b6d9e2c4a7b".into());
        assert_eq!(fb("echo_ours"), vec![Inbound::Echo(m)]);
    }

    /// If this breaks, what staff write in the Page inbox is missing from the interaction.
    #[test]
    fn an_echo_from_the_page_inbox_has_no_echo_of() {
        let mut m = message(
            &fb_mid("inbox"),
            PSID,
            "Hi, this is Maria from the shop \u{1f44b}",
            T + 720_000,
        );
        m.media = vec![media("https://scontent.xx.fbcdn.net/v/t1.15752-9/471203959_2203948576102938_7162039485716203948_n.png?_nc_cat=103&ccb=1-7&_nc_sid=fc17b8&_nc_ohc=Zr4Tk8Wq1LmQ7kNvgF2bC3d&_nc_ad=z-m&_nc_cid=0&_nc_ht=scontent.xx&oh=03_Q7cD1QGx9LpN4vW&oe=6A1F1E2F")];
        assert_eq!(fb("echo_page_inbox"), vec![Inbound::Echo(m)]);
    }

    /// If this breaks, replies never show as delivered or read.
    #[test]
    fn delivery_and_read_are_watermarks() {
        assert_eq!(
            fb("delivery"),
            vec![Inbound::Watermark(Watermark {
                from: PSID.into(),
                status: DeliveryStatus::Delivered,
                up_to: at(T + 779_500),
                provider_ids: vec![OUR1.into(), OUR2.into()],
            })]
        );
        assert_eq!(
            fb("read"),
            vec![Inbound::Watermark(Watermark {
                from: PSID.into(),
                status: DeliveryStatus::Read,
                up_to: at(T + 839_000),
                provider_ids: vec![],
            })]
        );
    }

    /// If this breaks, all but the first event of a batch are lost (Chatwoot's
    /// bug), or another Page's customers land on this channel.
    #[test]
    fn every_event_of_a_batch_for_this_page_only() {
        let psid2 = "6923014587412365";
        assert_eq!(
            fb("batch"),
            vec![
                Inbound::Message(message(
                    &fb_mid("batch-1"),
                    psid2,
                    "Are you open on Sunday?",
                    T + 900_000
                )),
                Inbound::Watermark(Watermark {
                    from: PSID.into(),
                    status: DeliveryStatus::Delivered,
                    up_to: at(T + 900_050),
                    provider_ids: vec![OUR3.into()],
                }),
                Inbound::Watermark(Watermark {
                    from: PSID.into(),
                    status: DeliveryStatus::Read,
                    up_to: at(T + 900_150),
                    provider_ids: vec![],
                }),
                Inbound::Message(message(&fb_mid("batch-2"), PSID, "Thanks!", T + 900_300)),
            ]
        );
    }

    // ----- Instagram ---------------------------------------------------

    #[test]
    fn instagram_text_becomes_a_message() {
        assert_eq!(
            ig("text"),
            vec![Inbound::Message(message(
                &ig_mid(1),
                IGSID,
                "Do you ship to Troms\u{f8}? \u{1f1f3}\u{1f1f4}",
                T
            ))]
        );
    }

    /// If this breaks, Instagram photos, voice notes and videos are dropped.
    #[test]
    fn instagram_image_audio_and_video_become_media() {
        for (name, n, offset, asset, signature) in [
            (
                "image",
                2,
                60_000,
                "18045123456789012",
                "AbzX9qLm2Vb9KcNvgH3aB1cZr4Tk8Wq1Lm",
            ),
            (
                "audio",
                3,
                120_000,
                "18045123456789013",
                "AbyW8pKl1Ua8JbMufG2zA0bYq3Sj7Vp0Kl",
            ),
            (
                "video",
                4,
                180_000,
                "18045123456789014",
                "AbxV7oJk0Tz7IaLteF1yZ9aXp2Ri6Uo9Jk",
            ),
        ] {
            let mut m = message(&ig_mid(n), IGSID, "", T + offset);
            m.media = vec![media(&lookaside(asset, signature))];
            assert_eq!(ig(name), vec![Inbound::Message(m)], "{name}");
        }
    }

    /// If this breaks, story mentions, shared posts and reels arrive empty or unlabelled.
    #[test]
    fn story_mentions_shares_and_reels_keep_their_kind_and_media() {
        for (name, n, offset, asset, signature) in [
            (
                "story_mention",
                5,
                240_000,
                "18045123456789015",
                "AbwU6nIj9Sy6HzKsdE0xY8zWo1Qh5Tn8Ij",
            ),
            (
                "share",
                6,
                300_000,
                "18045123456789016",
                "AbvT5mHi8Rx5GyJrcD9wX7yVn0Pg4Sm7Hi",
            ),
            (
                "ig_reel",
                7,
                360_000,
                "18045123456789017",
                "AbuS4lGh7Qw4FxIqbC8vW6xUm9Of3Rl6Gh",
            ),
        ] {
            let mut m = message(&ig_mid(n), IGSID, "", T + offset);
            m.kind = Some(name.into());
            m.media = vec![media(&lookaside(asset, signature))];
            assert_eq!(ig(name), vec![Inbound::Message(m)], "{name}");
        }
    }

    /// If this breaks, a GIF or sticker the API cannot carry vanishes without a trace.
    #[test]
    fn unsupported_content_is_a_placeholder() {
        let mut m = message(&ig_mid(8), IGSID, "", T + 420_000);
        m.kind = Some("unsupported".into());
        assert_eq!(ig("unsupported"), vec![Inbound::Message(m)]);
    }

    #[test]
    fn instagram_quick_replies_and_icebreakers() {
        let mut q = message(&ig_mid(9), IGSID, "Opening hours", T + 480_000);
        q.kind = Some("quick_reply".into());
        assert_eq!(ig("quick_reply"), vec![Inbound::Message(q)]);
        let mut p = message(&ig_mid(10), IGSID, "Where is my order?", T + 540_000);
        p.kind = Some("postback".into());
        assert_eq!(ig("postback"), vec![Inbound::Message(p)]);
    }

    #[test]
    fn instagram_replies_to_a_message_or_a_story() {
        let mut m = message(&ig_mid(11), IGSID, "Perfect, thank you!", T + 600_000);
        m.reply_to = Some(IG_OUR1.into());
        assert_eq!(ig("reply_to"), vec![Inbound::Message(m)]);
        let mut s = message(&ig_mid(12), IGSID, "Love this colour!", T + 660_000);
        s.kind = Some("story_reply".into());
        assert_eq!(ig("story_reply"), vec![Inbound::Message(s)]);
    }

    #[test]
    fn instagram_reactions_deletions_and_echoes() {
        assert_eq!(
            ig("reaction_react"),
            vec![Inbound::Reaction(Reaction {
                provider_id: format!("{IG_OUR1}:{IGSID}:react:{}", T + 720_000),
                from: IGSID.into(),
                target_provider_id: IG_OUR1.into(),
                emoji: Some("\u{2764}\u{fe0f}".into()),
                sent_at: at(T + 720_000),
            })]
        );
        assert_eq!(
            ig("reaction_unreact"),
            vec![Inbound::Reaction(Reaction {
                provider_id: format!("{IG_OUR1}:{IGSID}:unreact:{}", T + 780_000),
                from: IGSID.into(),
                target_provider_id: IG_OUR1.into(),
                emoji: None,
                sent_at: at(T + 780_000),
            })]
        );
        assert_eq!(
            ig("deleted"),
            vec![Inbound::Retraction {
                provider_id: ig_mid(1),
                from: IGSID.into(),
            }]
        );
        assert_eq!(
            ig("echo"),
            vec![Inbound::Echo(message(
                IG_OUR2,
                IGSID,
                "We do! Shipping to Norway takes 3\u{2013}5 days.",
                T + 900_000
            ))]
        );
    }

    /// If this breaks, Instagram replies never show as read.
    #[test]
    fn an_instagram_read_names_the_message_and_its_moment() {
        assert_eq!(
            ig("read"),
            vec![Inbound::Watermark(Watermark {
                from: IGSID.into(),
                status: DeliveryStatus::Read,
                up_to: at(T + 960_000),
                provider_ids: vec![IG_OUR2.into()],
            })]
        );
    }

    #[test]
    fn an_instagram_batch_for_this_account_only() {
        assert_eq!(
            ig("batch"),
            vec![
                Inbound::Message(message(
                    &ig_mid(20),
                    "2287690135546671",
                    "Hello? \u{1f440}",
                    T + 1_020_000
                )),
                Inbound::Reaction(Reaction {
                    provider_id: format!("{IG_OUR2}:{IGSID}:react:{}", T + 1_020_100),
                    from: IGSID.into(),
                    target_provider_id: IG_OUR2.into(),
                    emoji: Some("\u{1f44d}".into()),
                    sent_at: at(T + 1_020_100),
                }),
                Inbound::Watermark(Watermark {
                    from: IGSID.into(),
                    status: DeliveryStatus::Read,
                    up_to: at(T + 1_020_200),
                    provider_ids: vec![IG_OUR2.into()],
                }),
            ]
        );
    }

    /// If this breaks, comment webhooks are refused and Meta retries them for a day.
    #[test]
    fn comments_are_not_messages() {
        assert_eq!(ig("comments"), vec![]);
    }

    // ----- the edges ---------------------------------------------------

    /// If this breaks, a webhook of the other kind (or another product) is
    /// stored on this channel, or refused and retried by Meta.
    #[test]
    fn another_object_is_ignored() {
        assert_eq!(
            run(
                ChannelKind::Instagram,
                fixture(ChannelKind::Facebook, "text")
            ),
            Ok(vec![])
        );
        assert_eq!(
            run(
                ChannelKind::Facebook,
                fixture(ChannelKind::Instagram, "text")
            ),
            Ok(vec![])
        );
        assert_eq!(
            run(
                ChannelKind::Facebook,
                r#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[]}]}"#
            ),
            Ok(vec![])
        );
    }

    #[test]
    fn malformed_bodies_say_what_is_wrong() {
        let cases = [
            ("[]", "the body is not a JSON object"),
            (r#"{"entry":[]}"#, "object is missing"),
            (r#"{"object":1,"entry":[]}"#, "object is not a string"),
            (r#"{"object":"page"}"#, "entry is missing"),
            (r#"{"object":"page","entry":{}}"#, "entry is not an array"),
            (
                r#"{"object":"page","entry":[7]}"#,
                "entry[0] is not an object",
            ),
            (
                r#"{"object":"page","entry":[{"messaging":[]}]}"#,
                "entry[0].id is missing",
            ),
            (
                r#"{"object":"page","entry":[{"id":"108402317654321","messaging":{}}]}"#,
                "entry[0].messaging is not an array",
            ),
            (
                r#"{"object":"page","entry":[{"id":"108402317654321","messaging":[{"sender":{"id":"1"},"message":{"text":"x"}}]}]}"#,
                "entry[0].messaging[0].message.mid is missing",
            ),
            (
                r#"{"object":"page","entry":[{"id":"108402317654321","messaging":[{"recipient":{"id":"1"},"message":{"mid":"m_1"}}]}]}"#,
                "entry[0].messaging[0].sender is missing",
            ),
            (
                r#"{"object":"page","entry":[{"id":"108402317654321","messaging":[{"sender":{},"message":{"mid":"m_1"}}]}]}"#,
                "entry[0].messaging[0].sender.id is missing",
            ),
            (
                r#"{"object":"page","entry":[{"id":"108402317654321","messaging":[{"sender":{"id":"1"},"message":{"mid":"m_1","text":5}}]}]}"#,
                "entry[0].messaging[0].message.text is not a string",
            ),
            (
                r#"{"object":"page","entry":[{"id":"108402317654321","messaging":[{"sender":{"id":"1"},"reaction":{"action":"react"}}]}]}"#,
                "entry[0].messaging[0].reaction.mid is missing",
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(
                run(ChannelKind::Facebook, body),
                Err(IntakeError::Malformed(expected.into())),
                "{body}"
            );
        }
    }

    /// If this breaks, a malformed event of another Page refuses this Page's batch.
    #[test]
    fn another_pages_entry_is_not_even_read() {
        let body = r#"{"object":"page","entry":[{"id":"999","messaging":[{"nonsense":true},7]}]}"#;
        assert_eq!(run(ChannelKind::Facebook, body), Ok(vec![]));
    }

    #[test]
    fn events_we_do_not_handle_and_plugin_guests_are_skipped() {
        let body = r#"{"object":"page","entry":[{"id":"108402317654321","time":1,"messaging":[
            {"sender":{"id":"1"},"recipient":{"id":"108402317654321"},"timestamp":1,"optin":{"ref":"x"}},
            {"sender":{"id":"1"},"recipient":{"id":"108402317654321"},"timestamp":1,"referral":{"ref":"x","source":"SHORTLINK"}},
            {"sender":{"user_ref":"guest-1"},"recipient":{"id":"108402317654321"},"timestamp":1,"message":{"mid":"m_g","text":"hi"}},
            {"sender":{"id":"1"},"recipient":{"id":"108402317654321"},"timestamp":1,"reaction":{"mid":"m_1","action":"poke"}},
            {"sender":{"id":"1"},"recipient":{"id":"108402317654321"},"timestamp":1,"delivery":{}},
            {"sender":{"id":"1"},"recipient":{"id":"108402317654321"},"timestamp":1,"read":{}}
        ]},{"id":"108402317654321","time":1,"standby":[{"sender":{"id":"1"},"message":{"mid":"m_s"}}]}]}"#;
        assert_eq!(run(ChannelKind::Facebook, body), Ok(vec![]));
    }

    #[test]
    fn times_ids_and_reaction_names_are_read_leniently() {
        let body = r#"{"object":"page","entry":[{"id":108402317654321,"messaging":[
            {"sender":{"id":7412589630147852},"recipient":{"id":"108402317654321"},"timestamp":"1795600800000","message":{"mid":"m_1","text":"a"}},
            {"sender":{"id":"1"},"recipient":{"id":"108402317654321"},"message":{"mid":"m_2","text":"b"}},
            {"sender":{"id":"1"},"recipient":{"id":"108402317654321"},"timestamp":-5,"reaction":{"mid":"m_1","action":"react","reaction":"wow"}}
        ]}]}"#;
        let items = run(ChannelKind::Facebook, body).unwrap();
        assert_eq!(
            items[0],
            Inbound::Message(message("m_1", PSID, "a", T)),
            "numeric IDs and a string timestamp"
        );
        assert_eq!(
            items[1],
            Inbound::Message(InboundMessage {
                sent_at: now(),
                ..message("m_2", "1", "b", 0)
            }),
            "no timestamp: the receive time"
        );
        match &items[2] {
            Inbound::Reaction(r) => {
                assert_eq!(r.emoji.as_deref(), Some("\u{1f62e}"));
                assert_eq!(r.sent_at, now());
                assert_eq!(r.provider_id, "m_1:1:react:-5");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_delivery_without_watermark_covers_only_its_mids() {
        let body = r#"{"object":"instagram","entry":[{"id":"17841405309211844","messaging":[
            {"sender":{"id":"5"},"recipient":{"id":"17841405309211844"},"timestamp":1795600800000,"delivery":{"mids":["m_a"]}}
        ]}]}"#;
        assert_eq!(
            run(ChannelKind::Instagram, body),
            Ok(vec![Inbound::Watermark(Watermark {
                from: "5".into(),
                status: DeliveryStatus::Delivered,
                up_to: DateTime::UNIX_EPOCH,
                provider_ids: vec!["m_a".into()],
            })])
        );
    }

    #[test]
    fn media_urls_that_are_not_web_urls_are_not_fetched() {
        let body = r#"{"object":"instagram","entry":[{"id":"17841405309211844","messaging":[
            {"sender":{"id":"5"},"recipient":{"id":"17841405309211844"},"timestamp":1795600800000,
             "message":{"mid":"m_r","attachments":[
                {"type":"ig_reel","payload":{"url":"/reel/123451234512345/","reel_video_id":123451234512345}},
                {"type":"image","payload":{"url":"file:///etc/passwd"}},
                {"type":"like_heart"}]}}
        ]}]}"#;
        let mut m = message("m_r", "5", "\u{2764}\u{fe0f}", T);
        m.kind = Some("ig_reel".into());
        assert_eq!(
            run(ChannelKind::Instagram, body),
            Ok(vec![Inbound::Message(m)])
        );
    }

    #[test]
    fn templates_and_locations_become_text() {
        let body = r#"{"object":"page","entry":[{"id":"108402317654321","messaging":[
            {"sender":{"id":"5"},"recipient":{"id":"108402317654321"},"timestamp":1795600800000,
             "message":{"mid":"m_t","attachments":[
                {"type":"template","payload":{"product":{"elements":[{"id":"1","title":"Blue kettle"},{"id":"2","title":"Red kettle"}]}}},
                {"type":"location","payload":{"coordinates":{"lat":59.91,"long":10.75}}}]}}
        ]}]}"#;
        let mut m = message("m_t", "5", "Blue kettle\nRed kettle\n59.91, 10.75", T);
        m.kind = Some("location".into());
        assert_eq!(
            run(ChannelKind::Facebook, body),
            Ok(vec![Inbound::Message(m)])
        );
    }
}
