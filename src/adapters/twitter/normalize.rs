//! Account Activity API webhook bodies into [`Inbound`] items: a pure
//! function of the parsed body, tested below on every file of
//! `fixtures/twitter/` (providers.md A6.3).
//!
//! X posts one JSON object per delivery, naming the subscribed account in
//! `for_user_id`. Only bodies for the channel's own `user_id` are read (one X
//! app may subscribe several accounts to the same webhook URL); each of their
//! events becomes at most one item:
//!
//! | event | becomes |
//! | --- | --- |
//! | `direct_message_events[]` `message_create` from someone else | [`Inbound::Message`] from `sender_id`, `provider_id` = the event `id`, name from `users` |
//! | `message_create` whose `sender_id` is our `user_id` | [`Inbound::Echo`] to `target.recipient_id` (ours, or sent from another app) |
//! | `message_data.attachment.media` | a [`MediaRef`] to `media_url_https` (ton.twitter.com); its `t.co` link leaves the text |
//! | `message_data.quick_reply_response` | kind `quick_reply`; the text is what the customer saw and tapped |
//! | `direct_message_indicate_typing_events[]` from the customer | [`Inbound::Typing`] `on` |
//! | `direct_message_mark_read_events[]` from the customer | [`Inbound::Watermark`] `Read` up to `created_timestamp`, naming `last_read_event_id` |
//! | `user_event.revoke` by our account | [`Inbound::Revoked`] |
//! | our own typing and reads, tweets, likes, follows, other DM event types, another `for_user_id` | nothing |
//!
//! `t.co` links in the text are replaced by the `expanded_url` of
//! `entities.urls[]`, so agents see where a link goes. Times are
//! `created_timestamp`, epoch milliseconds as a string (a number is accepted
//! too); without one, the receive time. A body that is not a JSON object, or
//! an event without the fields that identify it (`id`, `sender_id`, the
//! echo's `recipient_id`), is [`IntakeError::Malformed`].

use crate::adapters::{Inbound, InboundMessage, IntakeError, MediaRef, Watermark};
use crate::domain::DeliveryStatus;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

type Object = Map<String, Value>;

fn malformed(message: impl Into<String>) -> IntakeError {
    IntakeError::Malformed(message.into())
}

/// Every item of a webhook body for the X account `user_id`. `now` stands
/// in where X gives no time.
pub fn normalize(
    user_id: &str,
    body: &Value,
    now: DateTime<Utc>,
) -> Result<Vec<Inbound>, IntakeError> {
    let body = body
        .as_object()
        .ok_or_else(|| malformed("the body is not a JSON object"))?;
    let for_user = match body.get("for_user_id") {
        None | Some(Value::Null) => None,
        Some(v) => Some(id_of(Some(v)).ok_or_else(|| malformed("for_user_id is not an ID"))?),
    };
    if for_user.as_deref().is_some_and(|u| u != user_id) {
        tracing::debug!(for_user = ?for_user, "ignoring an X webhook for another account");
        return Ok(vec![]);
    }
    let mut out = vec![];
    if let Some(event) = body.get("user_event") {
        if revoked(event, for_user.is_some(), user_id)? {
            out.push(Inbound::Revoked);
        }
    }
    if for_user.is_none() {
        // Only a revocation names its account elsewhere (`source.user_id`);
        // anything else without `for_user_id` cannot be ours for sure.
        return Ok(out);
    }
    let users = body.get("users").and_then(Value::as_object);
    for (n, event) in list(body, "direct_message_events")?.iter().enumerate() {
        let at = format!("direct_message_events[{n}]");
        if let Some(item) = message_event(user_id, users, event, &at, now)? {
            out.push(item);
        }
    }
    for (n, event) in list(body, "direct_message_indicate_typing_events")?
        .iter()
        .enumerate()
    {
        let at = format!("direct_message_indicate_typing_events[{n}]");
        let ev = object_at(event, &at)?;
        let sender = required_id(ev, "sender_id", &at)?;
        // Our own typing (in X's app) is not the customer's.
        if sender != user_id {
            out.push(Inbound::Typing {
                from: sender,
                on: true,
            });
        }
    }
    for (n, event) in list(body, "direct_message_mark_read_events")?
        .iter()
        .enumerate()
    {
        let at = format!("direct_message_mark_read_events[{n}]");
        let ev = object_at(event, &at)?;
        let sender = required_id(ev, "sender_id", &at)?;
        if sender == user_id {
            // We read the customer's messages (in X's app): nothing to deliver.
            continue;
        }
        out.push(Inbound::Watermark(Watermark {
            from: sender,
            status: DeliveryStatus::Read,
            up_to: ev.get("created_timestamp").and_then(millis).unwrap_or(now),
            provider_ids: id_of(ev.get("last_read_event_id")).into_iter().collect(),
        }));
    }
    Ok(out)
}

/// Whether a `user_event` is the revocation of our account's authorization.
fn revoked(event: &Value, for_us: bool, user_id: &str) -> Result<bool, IntakeError> {
    let event = object_at(event, "user_event")?;
    let Some(revoke) = event.get("revoke") else {
        return Ok(false);
    };
    let revoke = object_at(revoke, "user_event.revoke")?;
    let source = revoke
        .get("source")
        .and_then(Value::as_object)
        .and_then(|s| id_of(s.get("user_id")));
    Ok(match source {
        Some(source) => source == user_id,
        None => for_us,
    })
}

fn message_event(
    user_id: &str,
    users: Option<&Object>,
    event: &Value,
    at: &str,
    now: DateTime<Utc>,
) -> Result<Option<Inbound>, IntakeError> {
    let ev = object_at(event, at)?;
    match ev.get("type").and_then(Value::as_str) {
        Some("message_create") => {}
        other => {
            tracing::debug!(kind = ?other, "ignoring a direct message event of another type");
            return Ok(None);
        }
    }
    let id = required_id(ev, "id", at)?;
    let create_at = format!("{at}.message_create");
    let create = object_at(
        ev.get("message_create")
            .ok_or_else(|| malformed(format!("{create_at} is missing")))?,
        &create_at,
    )?;
    let sender = required_id(create, "sender_id", &create_at)?;
    let data_at = format!("{create_at}.message_data");
    let data = match create.get("message_data") {
        None | Some(Value::Null) => Object::new(),
        Some(v) => object_at(v, &data_at)?.clone(),
    };
    let mut text = match data.get("text") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(malformed(format!("{data_at}.text is not a string"))),
    };
    text = expand_links(&text, &data);
    let mut media = vec![];
    if let Some(m) = data
        .get("attachment")
        .and_then(|a| a.get("media"))
        .and_then(Value::as_object)
    {
        // X appends the media's t.co link to the text; the file itself is the attachment.
        if let Some(link) = m
            .get("url")
            .and_then(Value::as_str)
            .filter(|l| !l.is_empty())
        {
            text = text.replace(link, "").trim().to_string();
        }
        if let Some(url) = m
            .get("media_url_https")
            .and_then(Value::as_str)
            .filter(|u| is_https_url(u))
        {
            media.push(MediaRef {
                url: url.to_string(),
                ..MediaRef::default()
            });
        }
    }
    let mut kind = None;
    if let Some(q) = data.get("quick_reply_response").and_then(Value::as_object) {
        // The text is the option's label, as the customer saw it; the
        // option's `metadata` is ours and not shown (InboundMessage has no
        // field for it yet).
        tracing::debug!(metadata = ?q.get("metadata"), "quick reply answer");
        kind = Some("quick_reply".to_string());
    }
    if text.is_empty() && media.is_empty() && kind.is_none() {
        kind = Some("unsupported".to_string());
    }
    let sent_at = ev.get("created_timestamp").and_then(millis).unwrap_or(now);
    if sender == user_id {
        // Sent by our account: through our own API call, X's app, or another tool.
        let target_at = format!("{create_at}.target");
        let target = object_at(
            create
                .get("target")
                .ok_or_else(|| malformed(format!("{target_at} is missing")))?,
            &target_at,
        )?;
        let to = required_id(target, "recipient_id", &target_at)?;
        return Ok(Some(Inbound::Echo(InboundMessage {
            provider_id: id,
            from: to,
            kind,
            text,
            sent_at,
            media,
            ..InboundMessage::default()
        })));
    }
    let contact_name = users
        .and_then(|u| u.get(&sender))
        .and_then(|u| u.get("name"))
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    Ok(Some(Inbound::Message(InboundMessage {
        provider_id: id,
        from: sender,
        kind,
        contact_name,
        text,
        sent_at,
        media,
        ..InboundMessage::default()
    })))
}

/// The text with each `t.co` link of `entities.urls[]` replaced by where it goes.
fn expand_links(text: &str, data: &Object) -> String {
    let Some(urls) = data
        .get("entities")
        .and_then(|e| e.get("urls"))
        .and_then(Value::as_array)
    else {
        return text.to_string();
    };
    let mut out = text.to_string();
    for u in urls {
        let short = u.get("url").and_then(Value::as_str).unwrap_or("");
        let long = u.get("expanded_url").and_then(Value::as_str).unwrap_or("");
        if !short.is_empty() && is_web_url(long) {
            out = out.replace(short, long);
        }
    }
    out
}

// ----- small readers ---------------------------------------------------

fn list<'a>(body: &'a Object, key: &str) -> Result<&'a [Value], IntakeError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(malformed(format!("{key} is not an array"))),
    }
}

fn object_at<'a>(v: &'a Value, at: &str) -> Result<&'a Object, IntakeError> {
    v.as_object()
        .ok_or_else(|| malformed(format!("{at} is not an object")))
}

/// An X ID: a string, or a number in older payloads.
fn id_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn required_id(o: &Object, key: &str, at: &str) -> Result<String, IntakeError> {
    id_of(o.get(key)).ok_or_else(|| malformed(format!("{at}.{key} is missing")))
}

/// Epoch milliseconds, as a string (as X sends them) or a number.
fn millis(v: &Value) -> Option<DateTime<Utc>> {
    let ms = match v {
        Value::String(s) => s.trim().parse::<i64>().ok()?,
        Value::Number(n) => n.as_i64()?,
        _ => return None,
    };
    if ms <= 0 {
        return None;
    }
    DateTime::from_timestamp_millis(ms)
}

fn is_web_url(u: &str) -> bool {
    url::Url::parse(u).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
}

fn is_https_url(u: &str) -> bool {
    url::Url::parse(u).is_ok_and(|u| u.scheme() == "https" && u.has_host())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUR: &str = "1349812765430517760";
    const KERRY: &str = "2874619305";
    const JONAS: &str = "1720394857261035520";
    /// 2026-11-25T10:00:00Z in milliseconds, the fixtures' first moment.
    const T: i64 = 1_795_600_800_000;
    const MINUTE: i64 = 60_000;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    fn now() -> DateTime<Utc> {
        at(1_800_000_000_000)
    }

    fn event_id(n: u32) -> String {
        format!("18611493750812344{n:02}")
    }

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/fixtures/twitter/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn run(body: &str) -> Result<Vec<Inbound>, IntakeError> {
        let v: Value = serde_json::from_str(body).expect("test bodies are JSON");
        normalize(OUR, &v, now())
    }

    fn of(name: &str) -> Vec<Inbound> {
        run(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn message(n: u32, from: &str, name: Option<&str>, text: &str, ms: i64) -> InboundMessage {
        InboundMessage {
            provider_id: event_id(n),
            from: from.into(),
            contact_name: name.map(str::to_string),
            text: text.into(),
            sent_at: at(ms),
            ..InboundMessage::default()
        }
    }

    /// If this breaks, customers' DMs are lost, unnamed or show X's t.co links.
    #[test]
    fn a_text_dm_becomes_a_message_with_the_senders_name() {
        assert_eq!(
            of("text"),
            vec![Inbound::Message(message(
                1,
                KERRY,
                Some("Kerry Lindqvist"),
                "Hi! Order 4471 hasn\u{2019}t arrived \u{1f4e6} The tracking page says https://track.example.com/4471",
                T
            ))]
        );
    }

    /// If this breaks, photos customers send never reach the agent.
    #[test]
    fn a_media_attachment_becomes_a_media_ref_without_its_tco_link() {
        let mut m = message(
            2,
            KERRY,
            Some("Kerry Lindqvist"),
            "This is how the box arrived",
            T + MINUTE,
        );
        m.media = vec![MediaRef {
            url: "https://ton.twitter.com/1.1/ton/data/dm/1861149375081234402/1861149370012345678/Qm3xT9bZ.jpg".into(),
            ..MediaRef::default()
        }];
        assert_eq!(of("media"), vec![Inbound::Message(m)]);
    }

    /// If this breaks, a tapped quick reply arrives as its hidden metadata or unlabelled.
    #[test]
    fn a_quick_reply_keeps_the_visible_text_and_its_kind() {
        let mut m = message(
            3,
            KERRY,
            Some("Kerry Lindqvist"),
            "Track my order",
            T + 2 * MINUTE,
        );
        m.kind = Some("quick_reply".into());
        assert_eq!(of("quick_reply"), vec![Inbound::Message(m)]);
    }

    /// If this breaks, our own replies come back as customer messages.
    #[test]
    fn our_own_dm_is_an_echo_to_the_customer() {
        assert_eq!(
            of("echo"),
            vec![Inbound::Echo(message(
                4,
                KERRY,
                None,
                "Sorry about that! A replacement ships today.",
                T + 3 * MINUTE
            ))]
        );
    }

    /// If this breaks, all but the first event of a delivery are dropped.
    #[test]
    fn every_event_of_a_batch_in_order() {
        assert_eq!(
            of("batch"),
            vec![
                Inbound::Message(message(
                    5,
                    JONAS,
                    Some("Jonas Berg"),
                    "Hello, do you ship to Norway?",
                    T + 4 * MINUTE
                )),
                Inbound::Echo(message(
                    6,
                    JONAS,
                    None,
                    "We do, in 3\u{2013}5 days.",
                    T + 4 * MINUTE + 20_000
                )),
                Inbound::Message(message(
                    7,
                    KERRY,
                    Some("Kerry Lindqvist"),
                    "Thanks!",
                    T + 4 * MINUTE + 40_000
                )),
            ]
        );
    }

    /// If this breaks, agents do not see the customer typing, or see themselves.
    #[test]
    fn the_customers_typing_only() {
        assert_eq!(
            of("typing"),
            vec![Inbound::Typing {
                from: KERRY.into(),
                on: true
            }]
        );
    }

    /// If this breaks, replies never show as read on X.
    #[test]
    fn a_read_event_is_a_read_watermark_naming_the_last_read_dm() {
        assert_eq!(
            of("read"),
            vec![Inbound::Watermark(Watermark {
                from: KERRY.into(),
                status: DeliveryStatus::Read,
                up_to: at(T + 6 * MINUTE),
                provider_ids: vec![event_id(4)],
            })]
        );
    }

    /// If this breaks, a channel whose authorization was revoked looks healthy.
    #[test]
    fn a_revocation_by_our_account_is_revoked() {
        assert_eq!(of("revoke"), vec![Inbound::Revoked]);
        let theirs = fixture("revoke").replace(OUR, "1590011223344556677");
        assert_eq!(run(&theirs), Ok(vec![]));
        // With `for_user_id` and no source, it is ours.
        assert_eq!(
            run(&format!(
                r#"{{"for_user_id":"{OUR}","user_event":{{"revoke":{{"date_time":"2026-11-25T10:07:00+00:00"}}}}}}"#
            )),
            Ok(vec![Inbound::Revoked])
        );
    }

    /// If this breaks, DMs of another account of the same X app land on this channel.
    #[test]
    fn another_accounts_events_are_ignored() {
        assert_eq!(of("other_account"), vec![]);
    }

    /// If this breaks, X keeps retrying (or we store) events we never handle.
    #[test]
    fn events_we_do_not_handle_are_nothing() {
        for body in [
            format!(r#"{{"for_user_id":"{OUR}","tweet_create_events":[{{"id_str":"1"}}]}}"#),
            format!(r#"{{"for_user_id":"{OUR}","favorite_events":[]}}"#),
            format!(
                r#"{{"for_user_id":"{OUR}","direct_message_events":[{{"type":"participants_join","id":"9"}}]}}"#
            ),
            format!(r#"{{"for_user_id":"{OUR}","user_event":{{"other":{{}}}}}}"#),
            r#"{"direct_message_events":[{"type":"message_create","id":"1"}]}"#.to_string(),
            "{}".to_string(),
        ] {
            assert_eq!(run(&body), Ok(vec![]), "{body}");
        }
    }

    #[test]
    fn malformed_bodies_say_what_is_wrong() {
        let dm =
            |event: &str| format!(r#"{{"for_user_id":"{OUR}","direct_message_events":[{event}]}}"#);
        let cases = [
            ("[]".to_string(), "the body is not a JSON object"),
            (
                r#"{"for_user_id":{"id":1}}"#.to_string(),
                "for_user_id is not an ID",
            ),
            (
                format!(r#"{{"for_user_id":"{OUR}","direct_message_events":{{}}}}"#),
                "direct_message_events is not an array",
            ),
            (dm("7"), "direct_message_events[0] is not an object"),
            (
                dm(r#"{"type":"message_create","message_create":{}}"#),
                "direct_message_events[0].id is missing",
            ),
            (
                dm(r#"{"type":"message_create","id":"1"}"#),
                "direct_message_events[0].message_create is missing",
            ),
            (
                dm(
                    r#"{"type":"message_create","id":"1","message_create":{"message_data":{"text":"x"}}}"#,
                ),
                "direct_message_events[0].message_create.sender_id is missing",
            ),
            (
                dm(
                    r#"{"type":"message_create","id":"1","message_create":{"sender_id":"5","message_data":{"text":5}}}"#,
                ),
                "direct_message_events[0].message_create.message_data.text is not a string",
            ),
            (
                dm(&format!(
                    r#"{{"type":"message_create","id":"1","message_create":{{"sender_id":"{OUR}","message_data":{{"text":"x"}}}}}}"#
                )),
                "direct_message_events[0].message_create.target is missing",
            ),
            (
                dm(&format!(
                    r#"{{"type":"message_create","id":"1","message_create":{{"sender_id":"{OUR}","target":{{}},"message_data":{{"text":"x"}}}}}}"#
                )),
                "direct_message_events[0].message_create.target.recipient_id is missing",
            ),
            (
                format!(
                    r#"{{"for_user_id":"{OUR}","direct_message_indicate_typing_events":[{{"target":{{}}}}]}}"#
                ),
                "direct_message_indicate_typing_events[0].sender_id is missing",
            ),
            (
                format!(r#"{{"for_user_id":"{OUR}","direct_message_mark_read_events":[1]}}"#),
                "direct_message_mark_read_events[0] is not an object",
            ),
            (
                format!(r#"{{"for_user_id":"{OUR}","user_event":{{"revoke":[]}}}}"#),
                "user_event.revoke is not an object",
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(
                run(&body),
                Err(IntakeError::Malformed(expected.into())),
                "{body}"
            );
        }
    }

    /// If this breaks, a malformed event of another account refuses nothing of ours, or the reverse.
    #[test]
    fn another_accounts_body_is_not_even_read() {
        let body = r#"{"for_user_id":"42","direct_message_events":[7,{"nonsense":true}]}"#;
        assert_eq!(run(body), Ok(vec![]));
    }

    #[test]
    fn ids_and_times_are_read_leniently() {
        let body = format!(
            r#"{{"for_user_id":{OUR},"direct_message_events":[
                {{"type":"message_create","id":1861149375081234499,"created_timestamp":1795600800000,
                  "message_create":{{"sender_id":2874619305,"target":{{"recipient_id":"{OUR}"}},"message_data":{{"text":"a"}}}}}},
                {{"type":"message_create","id":"1861149375081234498","created_timestamp":"soon",
                  "message_create":{{"sender_id":"2874619305","message_data":{{"text":"b"}}}}}}
            ],"direct_message_mark_read_events":[{{"sender_id":"2874619305"}}]}}"#
        );
        assert_eq!(
            run(&body),
            Ok(vec![
                Inbound::Message(message(99, KERRY, None, "a", T)),
                Inbound::Message(InboundMessage {
                    sent_at: now(),
                    ..message(98, KERRY, None, "b", 0)
                }),
                Inbound::Watermark(Watermark {
                    from: KERRY.into(),
                    status: DeliveryStatus::Read,
                    up_to: now(),
                    provider_ids: vec![],
                }),
            ])
        );
    }

    /// If this breaks, a DM with nothing we can show vanishes without a trace,
    /// or a link X gives us is fetched over plain HTTP or from a file.
    #[test]
    fn empty_dms_are_placeholders_and_only_https_media_is_fetched() {
        let body = format!(
            r#"{{"for_user_id":"{OUR}","direct_message_events":[
                {{"type":"message_create","id":"1","created_timestamp":"1795600800000",
                  "message_create":{{"sender_id":"5","message_data":{{"text":"","attachment":{{"type":"media","media":{{"media_url_https":"file:///etc/passwd"}}}}}}}}}},
                {{"type":"message_create","id":"2","created_timestamp":"1795600800000",
                  "message_create":{{"sender_id":"5","message_data":{{"text":"see https://t.co/x","attachment":{{"type":"media","media":{{"url":"https://t.co/x","media_url_https":"http://ton.twitter.com/a.jpg"}}}}}}}}}}
            ]}}"#
        );
        let mut first = message(0, "5", None, "", T);
        first.provider_id = "1".into();
        first.kind = Some("unsupported".into());
        let mut second = message(0, "5", None, "see", T);
        second.provider_id = "2".into();
        assert_eq!(
            run(&body),
            Ok(vec![Inbound::Message(first), Inbound::Message(second)])
        );
    }

    #[test]
    fn links_expand_only_to_web_urls() {
        let data: Object = serde_json::from_str(
            r#"{"entities":{"urls":[
                {"url":"https://t.co/a","expanded_url":"https://example.com/a"},
                {"url":"https://t.co/b","expanded_url":"javascript:alert(1)"},
                {"url":"","expanded_url":"https://example.com/c"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            expand_links("x https://t.co/a https://t.co/b", &data),
            "x https://example.com/a https://t.co/b"
        );
    }
}
