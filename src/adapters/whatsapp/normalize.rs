//! WhatsApp Cloud API webhooks into [`Inbound`] items (providers.md A2.2).
//!
//! | webhook | becomes |
//! | --- | --- |
//! | `messages[]` of type `text`, `image`, `audio` (voice notes too), `video`, `document`, `sticker` | [`Inbound::Message`] with the caption as text and a [`MediaRef`] by `media_id` |
//! | `location`, `contacts`, `interactive` (`button_reply`, `list_reply`, `nfm_reply`), `button`, `system` | [`Inbound::Message`] with readable text and `kind` |
//! | `unsupported`, `unknown` and any other type | [`Inbound::Message`] with a visible placeholder, `kind` `unsupported` |
//! | `reaction` | [`Inbound::Reaction`] on `reaction.message_id` (`emoji` `None` when removed) |
//! | `statuses[]` `sent`, `delivered`, `read`, `failed` | [`Inbound::Status`] (failed: `code: title: details`) |
//!
//! Every `entry[]`, every `changes[]` and every element of `messages[]` and
//! `statuses[]` is read (Meta batches). Changes for another
//! `phone_number_id`, fields other than `messages`, and group messages are
//! ignored. The sender is the `wa_id` when Meta gives one, else the
//! business-scoped user ID (BSUID); the other goes in `aliases`.

use crate::adapters::{Inbound, InboundMessage, IntakeError, MediaRef, Reaction, StatusUpdate};
use crate::domain::DeliveryStatus;
use chrono::{DateTime, Utc};
use serde_json::Value;

/// The `object` of WhatsApp Business Account webhooks.
pub const OBJECT: &str = "whatsapp_business_account";

/// The media message types: the key of their media object is the type.
const MEDIA_TYPES: [&str; 6] = ["image", "audio", "voice", "video", "document", "sticker"];

fn malformed(message: impl Into<String>) -> IntakeError {
    IntakeError::Malformed(message.into())
}

/// A non-blank string at `key`, trimmed.
fn text_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// As [`text_at`], but a number is read as its digits too (IDs and codes
/// are numbers in some payloads).
fn owned_at(v: &Value, key: &str) -> Option<String> {
    match v.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// The array at `key`: empty when absent or null, an error when something else.
fn array<'a>(v: &'a Value, key: &str, at: &str) -> Result<&'a [Value], IntakeError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(malformed(format!("{at}.{key} is not an array"))),
    }
}

/// Meta's Unix-seconds timestamp (a string, or a number in some payloads),
/// or `now` when it is missing or unreadable.
fn timestamp(v: &Value, now: DateTime<Utc>) -> DateTime<Utc> {
    let secs = match v.get("timestamp") {
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        Some(Value::Number(n)) => n.as_i64(),
        _ => None,
    };
    secs.and_then(|s| DateTime::from_timestamp(s, 0))
        .unwrap_or(now)
}

/// Turns a parsed webhook into items for the channel whose number is
/// `phone_number_id`. `now` stands in for a missing timestamp.
pub fn normalize(
    body: &Value,
    phone_number_id: &str,
    now: DateTime<Utc>,
) -> Result<Vec<Inbound>, IntakeError> {
    let Some(root) = body.as_object() else {
        return Err(malformed("the body is not a JSON object"));
    };
    match root.get("object").and_then(Value::as_str) {
        Some(OBJECT) => {}
        Some(other) => {
            tracing::debug!(object = other, "ignoring a webhook of another object");
            return Ok(vec![]);
        }
        None => return Err(malformed("object is missing")),
    }
    let entries = match root.get("entry") {
        Some(Value::Array(entries)) => entries,
        _ => return Err(malformed("entry is missing or not an array")),
    };
    let mut out = vec![];
    for (e, entry) in entries.iter().enumerate() {
        let at = format!("entry[{e}]");
        if !entry.is_object() {
            return Err(malformed(format!("{at} is not an object")));
        }
        for (c, change) in array(entry, "changes", &at)?.iter().enumerate() {
            let at = format!("{at}.changes[{c}]");
            if !change.is_object() {
                return Err(malformed(format!("{at} is not an object")));
            }
            if change.get("field").and_then(Value::as_str) != Some("messages") {
                // Template, quality and account updates: not messages.
                continue;
            }
            let value = change.get("value").unwrap_or(&Value::Null);
            if !value.is_object() {
                return Err(malformed(format!("{at}.value is not an object")));
            }
            let ours = value
                .get("metadata")
                .and_then(|m| owned_at(m, "phone_number_id"));
            if ours.as_deref() != Some(phone_number_id) {
                // Another number of the same business account (or an app
                // subscribed to several): not this channel's, not an error.
                tracing::debug!(
                    phone_number_id = ?ours,
                    "ignoring a change for another phone number"
                );
                continue;
            }
            change_items(value, &at, now, &mut out)?;
        }
    }
    Ok(out)
}

fn change_items(
    value: &Value,
    at: &str,
    now: DateTime<Utc>,
    out: &mut Vec<Inbound>,
) -> Result<(), IntakeError> {
    let at = format!("{at}.value");
    let contacts = array(value, "contacts", &at)?;
    for error in array(value, "errors", &at)? {
        tracing::warn!(error = %error, "WhatsApp reported an error in a webhook");
    }
    for (n, m) in array(value, "messages", &at)?.iter().enumerate() {
        let at = format!("{at}.messages[{n}]");
        if !m.is_object() {
            return Err(malformed(format!("{at} is not an object")));
        }
        if m.get("group_id").is_some_and(|g| !g.is_null()) {
            tracing::debug!("ignoring a group message");
            continue;
        }
        out.push(message(m, contacts, &at, now)?);
    }
    for (n, s) in array(value, "statuses", &at)?.iter().enumerate() {
        let at = format!("{at}.statuses[{n}]");
        if !s.is_object() {
            return Err(malformed(format!("{at} is not an object")));
        }
        out.extend(status(s, &at)?.map(Inbound::Status));
    }
    Ok(())
}

/// Who sent a message: the `wa_id` (digits) and the BSUID, as far as given.
struct Sender {
    from: String,
    aliases: Vec<String>,
    name: Option<String>,
}

fn sender(m: &Value, contacts: &[Value], at: &str) -> Result<Sender, IntakeError> {
    let phone = text_at(m, "from")
        .filter(|f| looks_like_phone(f))
        .map(str::to_string);
    // A BSUID may also arrive in `from` (nyaruka/courier `hello_bsuid_in_from`).
    let bsuid = text_at(m, "from_user_id")
        .or_else(|| text_at(m, "from").filter(|f| !looks_like_phone(f)))
        .map(str::to_string);
    let contact = contacts.iter().find(|c| {
        let wa_id = text_at(c, "wa_id");
        let user_id = text_at(c, "user_id");
        (phone.is_some() && wa_id == phone.as_deref())
            || (bsuid.is_some() && (user_id == bsuid.as_deref() || wa_id == bsuid.as_deref()))
    });
    let contact_phone = contact
        .and_then(|c| text_at(c, "wa_id"))
        .filter(|w| looks_like_phone(w))
        .map(str::to_string);
    let contact_bsuid = contact
        .and_then(|c| text_at(c, "user_id"))
        .map(str::to_string);
    let phone = phone.or(contact_phone);
    let bsuid = bsuid.or(contact_bsuid);
    let name = contact
        .and_then(|c| c.get("profile"))
        .and_then(|p| text_at(p, "name"))
        .map(str::to_string);
    match (phone, bsuid) {
        (Some(p), Some(b)) if p != b => Ok(Sender {
            from: p,
            aliases: vec![b],
            name,
        }),
        (Some(id), _) | (None, Some(id)) => Ok(Sender {
            from: id,
            aliases: vec![],
            name,
        }),
        (None, None) => Err(malformed(format!("{at} has neither from nor from_user_id"))),
    }
}

/// A `wa_id` is the phone number in digits; a BSUID is `CC.<alnum>`.
fn looks_like_phone(id: &str) -> bool {
    !id.is_empty() && id.chars().all(|c| c.is_ascii_digit())
}

fn message(
    m: &Value,
    contacts: &[Value],
    at: &str,
    now: DateTime<Utc>,
) -> Result<Inbound, IntakeError> {
    let provider_id = text_at(m, "id")
        .ok_or_else(|| malformed(format!("{at}.id is missing")))?
        .to_string();
    let who = sender(m, contacts, at)?;
    let sent_at = timestamp(m, now);
    let kind = text_at(m, "type").unwrap_or("unknown");
    if kind == "reaction" {
        let r = m.get("reaction").unwrap_or(&Value::Null);
        let target = text_at(r, "message_id")
            .ok_or_else(|| malformed(format!("{at}.reaction.message_id is missing")))?;
        return Ok(Inbound::Reaction(Reaction {
            provider_id,
            from: who.from,
            target_provider_id: target.to_string(),
            emoji: text_at(r, "emoji").map(str::to_string),
            sent_at,
        }));
    }
    let (text, media, label) = content(m, kind);
    Ok(Inbound::Message(InboundMessage {
        provider_id,
        from: who.from,
        aliases: who.aliases,
        reply_to: m
            .get("context")
            .and_then(|c| text_at(c, "id"))
            .map(str::to_string),
        kind: label,
        contact_name: who.name,
        text,
        sent_at,
        media,
        ..InboundMessage::default()
    }))
}

/// The text, media and kind of a message of type `kind`.
fn content(m: &Value, kind: &str) -> (String, Vec<MediaRef>, Option<String>) {
    let body = m.get(kind).unwrap_or(&Value::Null);
    let plain = |s: Option<&str>| s.unwrap_or("").to_string();
    match kind {
        "text" => (
            body.get("body")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            vec![],
            None,
        ),
        _ if MEDIA_TYPES.contains(&kind) => media_message(body, kind),
        "location" => (location(body), vec![], Some("location".into())),
        "contacts" => (contact_cards(body), vec![], Some("contacts".into())),
        "interactive" => {
            let reply_type = text_at(body, "type").unwrap_or("");
            let reply = body.get(reply_type).unwrap_or(&Value::Null);
            let text = match reply_type {
                // A WhatsApp Flow's answer: its body, else the JSON it returned.
                "nfm_reply" => text_at(reply, "body")
                    .or_else(|| text_at(reply, "response_json"))
                    .map(str::to_string)
                    .unwrap_or_else(|| "[form response]".into()),
                // button_reply, list_reply: what the customer tapped.
                _ => text_at(reply, "title")
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("[interactive reply: {reply_type}]")),
            };
            (text, vec![], Some("interactive".into()))
        }
        "button" => (plain(text_at(body, "text")), vec![], Some("button".into())),
        // e.g. `user_changed_number`: Meta writes a sentence in `body`.
        "system" => (plain(text_at(body, "body")), vec![], Some("system".into())),
        other => (unsupported(m, other), vec![], Some("unsupported".into())),
    }
}

fn media_message(body: &Value, kind: &str) -> (String, Vec<MediaRef>, Option<String>) {
    let caption = body
        .get("caption")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let label = match kind {
        "sticker" => Some("sticker".to_string()),
        "voice" => Some("voice".to_string()),
        "audio" if body.get("voice").and_then(Value::as_bool) == Some(true) => {
            Some("voice".to_string())
        }
        _ => None,
    };
    let media = match owned_at(body, "id") {
        Some(id) => vec![MediaRef {
            url: String::new(),
            content_type: text_at(body, "mime_type").map(str::to_string),
            filename: text_at(body, "filename").map(str::to_string),
            media_id: Some(id),
        }],
        None => vec![],
    };
    (caption, media, label)
}

/// A coordinate as Meta sent it (a number, or now and then a string).
fn coordinate(v: &Value, key: &str) -> Option<String> {
    match v.get(key) {
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        _ => None,
    }
}

/// `📍 name, address (latitude, longitude)`, leaving out what is missing.
fn location(l: &Value) -> String {
    let mut text = String::from("📍");
    let place: Vec<&str> = [text_at(l, "name"), text_at(l, "address")]
        .into_iter()
        .flatten()
        .collect();
    if !place.is_empty() {
        text.push(' ');
        text.push_str(&place.join(", "));
    }
    if let (Some(lat), Some(long)) = (coordinate(l, "latitude"), coordinate(l, "longitude")) {
        text.push_str(&format!(" ({lat}, {long})"));
    }
    text
}

/// One line per shared contact card: `👤 name: phone, phone, email`.
fn contact_cards(cards: &Value) -> String {
    let Some(cards) = cards.as_array() else {
        return "👤".into();
    };
    let lines: Vec<String> = cards
        .iter()
        .map(|card| {
            let name = card.get("name").unwrap_or(&Value::Null);
            let name = text_at(name, "formatted_name")
                .map(str::to_string)
                .or_else(|| {
                    let parts: Vec<&str> =
                        [text_at(name, "first_name"), text_at(name, "last_name")]
                            .into_iter()
                            .flatten()
                            .collect();
                    (!parts.is_empty()).then(|| parts.join(" "))
                })
                .unwrap_or_else(|| "(no name)".into());
            let list = |key: &str, field: &str| -> Vec<String> {
                card.get(key)
                    .and_then(Value::as_array)
                    .map(|items| {
                        items
                            .iter()
                            .filter_map(|i| text_at(i, field).map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let details: Vec<String> = list("phones", "phone")
                .into_iter()
                .chain(list("emails", "email"))
                .collect();
            if details.is_empty() {
                format!("👤 {name}")
            } else {
                format!("👤 {name}: {}", details.join(", "))
            }
        })
        .collect();
    if lines.is_empty() {
        "👤".into()
    } else {
        lines.join("\n")
    }
}

/// The placeholder an agent sees for a message we cannot show:
/// `[unsupported message: <error title>]`, or the type when Meta gave no error.
fn unsupported(m: &Value, kind: &str) -> String {
    let title = m
        .get("errors")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
        .and_then(|e| text_at(e, "title").or_else(|| text_at(e, "message")));
    match (title, kind) {
        (Some(t), _) => format!("[unsupported message: {t}]"),
        (None, "unsupported" | "unknown") => "[unsupported message]".into(),
        (None, other) => format!("[unsupported message: {other}]"),
    }
}

/// `<code>: <title>: <details>` of a failed status, leaving out what is missing.
fn status_error(s: &Value) -> String {
    let Some(e) = s
        .get("errors")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    else {
        return "WhatsApp reported the message failed".into();
    };
    let parts: Vec<String> = [
        owned_at(e, "code"),
        text_at(e, "title")
            .or_else(|| text_at(e, "message"))
            .map(str::to_string),
        e.get("error_data")
            .and_then(|d| text_at(d, "details"))
            .map(str::to_string),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "WhatsApp reported the message failed".into()
    } else {
        parts.join(": ")
    }
}

fn status(s: &Value, at: &str) -> Result<Option<StatusUpdate>, IntakeError> {
    let provider_id = text_at(s, "id")
        .ok_or_else(|| malformed(format!("{at}.id is missing")))?
        .to_string();
    let status = match text_at(s, "status").unwrap_or("") {
        "sent" => DeliveryStatus::Sent,
        "delivered" => DeliveryStatus::Delivered,
        "read" => DeliveryStatus::Read,
        "failed" => DeliveryStatus::Failed,
        other => {
            // `deleted`, `warning` and whatever Meta adds: nothing to move.
            tracing::debug!(status = other, "ignoring a WhatsApp status");
            return Ok(None);
        }
    };
    Ok(Some(StatusUpdate {
        provider_id,
        status,
        error: (status == DeliveryStatus::Failed).then(|| status_error(s)),
    }))
}
