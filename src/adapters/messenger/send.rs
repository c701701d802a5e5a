//! The Send API (providers.md A3.3, A4.4):
//! `POST {api_base}/{page_id | ig_account_id}/messages` with the channel's
//! token as a bearer, one request per attachment (by URL, before the text),
//! then one for the text.
//!
//! ```json
//! {"recipient": {"id": "<PSID or IGSID>"},
//!  "messaging_type": "RESPONSE",
//!  "message": {"text": "...", "metadata": "<our message id>"},
//!  "reply_to": {"mid": "<the quoted message>"}}
//! ```
//!
//! - Inside the 24-hour window the gateway passes no tag: `RESPONSE`. From 24
//!   hours to 7 days it passes `tag = HUMAN_AGENT` (when the channel enables
//!   it): `"messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT"`. After that
//!   the gateway refuses the reply itself, and Meta's own refusal
//!   (10/2018278, 10/2534022) is `window_closed`.
//! - `metadata` is echoed back in the `message_echoes` webhook, which is how
//!   an echo is matched to our message; it is documented for Messenger only,
//!   so Instagram sends go without it (their echoes are matched by `mid`).
//! - `reply_to` is a top-level field of the Page Messages edge (Graph API
//!   reference); it quotes the customer's message on the first request.
//! - Attachments go by URL (`is_reusable: false`): Meta fetches our
//!   expiring public link; `image`, `audio`, `video` or `file` by content type.
//! - Text limits are checked before anything is sent: Messenger 2,000
//!   characters, Instagram 1,000 UTF-8 bytes (the manifests' `[text]`).
//! - Errors are classified by [`meta::classify`](super::super::meta::classify).
//!   When a later request fails after an earlier one was accepted, the
//!   failure is final: a retry would send the accepted parts a second time.

use crate::adapters::meta::GraphClient;
use crate::adapters::{DeliveryError, OutgoingAttachment, OutgoingMessage, SendReceipt};
use crate::domain::ChannelKind;
use serde_json::{json, Value};

/// The Send API `attachment.type` for a content type.
pub fn attachment_type(content_type: &str) -> &'static str {
    let top = content_type
        .split('/')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match top.as_str() {
        "image" => "image",
        "audio" => "audio",
        "video" => "video",
        _ => "file",
    }
}

fn product(kind: ChannelKind) -> &'static str {
    match kind {
        ChannelKind::Instagram => "Instagram",
        _ => "Messenger",
    }
}

/// Why a text is too long for the kind (its manifest's `[text]`), if it is.
pub fn text_problem(kind: ChannelKind, text: &str) -> Option<String> {
    let limits = &crate::manifest::get(kind).text;
    if let Some(max) = limits.max_chars {
        let n = text.chars().count();
        if n > max {
            return Some(format!(
                "the text is {n} characters; {} allows at most {max}",
                product(kind)
            ));
        }
    }
    if let Some(max) = limits.max_bytes {
        let n = text.len();
        if n > max {
            return Some(format!(
                "the text is {n} bytes in UTF-8; {} allows at most {max} bytes \
                 (an emoji counts 4 or more)",
                product(kind)
            ));
        }
    }
    None
}

/// The JSON bodies of a message, in the order they are sent (each
/// attachment, then the text), or why it cannot be sent at all.
pub fn requests(kind: ChannelKind, msg: &OutgoingMessage) -> Result<Vec<Value>, DeliveryError> {
    if msg.to.trim().is_empty() {
        return Err(DeliveryError::permanent("the message has no recipient"));
    }
    if msg.text.is_empty() && msg.attachments.is_empty() {
        return Err(DeliveryError::permanent(
            "nothing to send: the message has no text and no attachments",
        ));
    }
    if let Some(problem) = text_problem(kind, &msg.text) {
        return Err(DeliveryError::permanent(problem));
    }
    let mut contents = Vec::with_capacity(msg.attachments.len() + 1);
    for a in &msg.attachments {
        contents.push(attachment(a)?);
    }
    if !msg.text.is_empty() {
        contents.push(json!({"text": msg.text}));
    }
    Ok(contents
        .into_iter()
        .enumerate()
        .map(|(n, content)| envelope(kind, msg, content, n == 0))
        .collect())
}

fn attachment(a: &OutgoingAttachment) -> Result<Value, DeliveryError> {
    if a.public_url.trim().is_empty() {
        return Err(DeliveryError::permanent(format!(
            "attachment {} has no public link for Meta to fetch",
            a.filename
        )));
    }
    Ok(json!({"attachment": {
        "type": attachment_type(&a.content_type),
        "payload": {"url": a.public_url, "is_reusable": false},
    }}))
}

fn envelope(kind: ChannelKind, msg: &OutgoingMessage, mut content: Value, first: bool) -> Value {
    if kind == ChannelKind::Facebook && !msg.id.is_empty() {
        content["metadata"] = Value::String(msg.id.clone());
    }
    let mut body = json!({
        "recipient": {"id": msg.to},
        "messaging_type": "RESPONSE",
        "message": content,
    });
    if let Some(tag) = msg.tag.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        body["messaging_type"] = json!("MESSAGE_TAG");
        body["tag"] = json!(tag);
    }
    if let Some(mid) = msg.reply_to.as_deref().filter(|m| !m.is_empty() && first) {
        body["reply_to"] = json!({"mid": mid});
    }
    body
}

/// Sends every request of `msg` to the channel's `/{account_id}/messages`;
/// the receipt names the `message_id` of the last one.
pub async fn send(
    graph: &GraphClient,
    kind: ChannelKind,
    account_id: &str,
    msg: &OutgoingMessage,
) -> Result<SendReceipt, DeliveryError> {
    let bodies = requests(kind, msg)?;
    let path = format!("{account_id}/messages");
    let total = bodies.len();
    let mut last: Option<String> = None;
    let mut earlier = vec![];
    for (n, body) in bodies.iter().enumerate() {
        let answer = match graph.post_json(&path, body).await {
            Ok(answer) => answer,
            Err(e) if n == 0 => return Err(e),
            Err(e) => return Err(after_partial(e, n, total)),
        };
        match answer
            .get("message_id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
        {
            Some(id) => {
                earlier.extend(last.replace(id.to_string()));
            }
            // Meta has taken it: a retry would message the customer twice.
            None => {
                return Err(DeliveryError::permanent(format!(
                    "the Graph API accepted part {} of {total} but answered without a \
                     message_id; not retried, so the customer does not get it twice",
                    n + 1
                )))
            }
        }
    }
    last.map(|provider_id| SendReceipt {
        provider_id,
        other_provider_ids: earlier,
    })
    .ok_or_else(|| DeliveryError::permanent("nothing to send"))
}

/// A failure after `sent` of `total` requests were accepted: final, keeping
/// Meta's classification (re-authorisation, window) for the channel and agent.
fn after_partial(e: DeliveryError, sent: usize, total: usize) -> DeliveryError {
    DeliveryError {
        message: format!(
            "{sent} of {total} parts were sent before this failure, so it is not retried \
             (a retry would send them again): {}",
            e.message
        ),
        retryable: false,
        retry_after: None,
        ..e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(text: &str) -> OutgoingMessage {
        OutgoingMessage {
            id: "5f0c6a1e9b2d4c7e8a3f1b6d9e2c4a7b".into(),
            to: "7412589630147852".into(),
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

    fn permanent(r: Result<Vec<Value>, DeliveryError>) -> String {
        let e = r.unwrap_err();
        assert!(!e.retryable && !e.window_closed && !e.needs_reauth, "{e:?}");
        e.message
    }

    /// If this breaks, Messenger refuses our replies or echoes cannot be matched to them.
    #[test]
    fn messenger_text_is_a_response_with_our_id_as_metadata() {
        assert_eq!(
            requests(ChannelKind::Facebook, &msg("It ships today")).unwrap(),
            vec![json!({
                "recipient": {"id": "7412589630147852"},
                "messaging_type": "RESPONSE",
                "message": {"text": "It ships today", "metadata": "5f0c6a1e9b2d4c7e8a3f1b6d9e2c4a7b"},
            })]
        );
    }

    /// If this breaks, Instagram gets a field it does not document.
    #[test]
    fn instagram_text_has_no_metadata() {
        assert_eq!(
            requests(ChannelKind::Instagram, &msg("We do!")).unwrap(),
            vec![json!({
                "recipient": {"id": "7412589630147852"},
                "messaging_type": "RESPONSE",
                "message": {"text": "We do!"},
            })]
        );
    }

    /// If this breaks, replies between 24 hours and 7 days are refused by Meta.
    #[test]
    fn a_tag_makes_it_a_tagged_message() {
        let mut m = msg("Sorry for the wait");
        m.tag = Some("HUMAN_AGENT".into());
        for kind in [ChannelKind::Facebook, ChannelKind::Instagram] {
            let body = &requests(kind, &m).unwrap()[0];
            assert_eq!(body["messaging_type"], "MESSAGE_TAG", "{kind}");
            assert_eq!(body["tag"], "HUMAN_AGENT", "{kind}");
        }
        m.tag = Some("  ".into());
        let body = &requests(ChannelKind::Facebook, &m).unwrap()[0];
        assert_eq!(body["messaging_type"], "RESPONSE");
        assert!(body.get("tag").is_none());
    }

    /// If this breaks, attachments are sent after the text, as the wrong type, or lost.
    #[test]
    fn each_attachment_by_url_then_the_text_quoting_on_the_first() {
        let mut m = msg("Here you go");
        m.reply_to = Some("m_customer".into());
        m.attachments = vec![
            file("label.png", "image/png"),
            file("note.m4a", "audio/x-m4a"),
            file("clip.mp4", "video/mp4"),
            file("invoice.pdf", "application/pdf"),
        ];
        let bodies = requests(ChannelKind::Facebook, &m).unwrap();
        assert_eq!(bodies.len(), 5);
        let types: Vec<&str> = bodies[..4]
            .iter()
            .map(|b| b["message"]["attachment"]["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["image", "audio", "video", "file"]);
        assert_eq!(
            bodies[0],
            json!({
                "recipient": {"id": "7412589630147852"},
                "messaging_type": "RESPONSE",
                "message": {
                    "attachment": {"type": "image", "payload": {
                        "url": "https://switchboard.example.com/media/label.png?sig=abc",
                        "is_reusable": false,
                    }},
                    "metadata": "5f0c6a1e9b2d4c7e8a3f1b6d9e2c4a7b",
                },
                "reply_to": {"mid": "m_customer"},
            })
        );
        assert_eq!(
            bodies[4],
            json!({
                "recipient": {"id": "7412589630147852"},
                "messaging_type": "RESPONSE",
                "message": {"text": "Here you go", "metadata": "5f0c6a1e9b2d4c7e8a3f1b6d9e2c4a7b"},
            })
        );
        for b in &bodies[1..] {
            assert!(b.get("reply_to").is_none(), "only the first quotes: {b}");
        }
    }

    #[test]
    fn an_attachment_alone_is_one_request() {
        let mut m = msg("");
        m.attachments = vec![file("photo.jpg", "image/jpeg")];
        let bodies = requests(ChannelKind::Instagram, &m).unwrap();
        assert_eq!(bodies.len(), 1);
        assert_eq!(bodies[0]["message"]["attachment"]["type"], "image");
        assert!(bodies[0]["message"].get("metadata").is_none());
    }

    /// If this breaks, an over-long reply is sent and refused by Meta, or a
    /// valid one is refused by us.
    #[test]
    fn text_limits_are_checked_before_sending() {
        assert!(requests(ChannelKind::Facebook, &msg(&"é".repeat(2000))).is_ok());
        assert_eq!(
            permanent(requests(ChannelKind::Facebook, &msg(&"é".repeat(2001)))),
            "the text is 2001 characters; Messenger allows at most 2000"
        );
        assert!(requests(ChannelKind::Instagram, &msg(&"a".repeat(1000))).is_ok());
        assert_eq!(
            permanent(requests(ChannelKind::Instagram, &msg(&"a".repeat(1001)))),
            "the text is 1001 bytes in UTF-8; Instagram allows at most 1000 bytes (an emoji counts 4 or more)"
        );
        // 250 emoji are 1000 bytes; 251 are too many, though only 251 characters.
        assert!(requests(ChannelKind::Instagram, &msg(&"😀".repeat(250))).is_ok());
        assert!(requests(ChannelKind::Instagram, &msg(&"😀".repeat(251))).is_err());
        assert_eq!(
            text_problem(ChannelKind::Facebook, &"😀".repeat(2000)),
            None
        );
    }

    #[test]
    fn nothing_to_send_or_nowhere_to_send_it_is_final() {
        assert_eq!(
            permanent(requests(ChannelKind::Facebook, &msg(""))),
            "nothing to send: the message has no text and no attachments"
        );
        let mut m = msg("hi");
        m.to = " ".into();
        assert_eq!(
            permanent(requests(ChannelKind::Facebook, &m)),
            "the message has no recipient"
        );
        let mut m = msg("hi");
        let mut a = file("x.pdf", "application/pdf");
        a.public_url = String::new();
        m.attachments = vec![a];
        assert_eq!(
            permanent(requests(ChannelKind::Facebook, &m)),
            "attachment x.pdf has no public link for Meta to fetch"
        );
    }

    #[test]
    fn attachment_types_by_content_type() {
        for (ct, t) in [
            ("image/jpeg", "image"),
            ("IMAGE/PNG", "image"),
            ("audio/aac", "audio"),
            ("video/quicktime", "video"),
            ("application/pdf", "file"),
            ("text/plain; charset=utf-8", "file"),
            ("", "file"),
        ] {
            assert_eq!(attachment_type(ct), t, "{ct}");
        }
    }

    #[test]
    fn a_failure_after_a_part_was_sent_is_final_but_keeps_its_class() {
        let mut e =
            DeliveryError::retryable("(#613) Calls to this api have exceeded the rate limit.");
        e.code = Some("613".into());
        e.retry_after = Some(std::time::Duration::from_secs(5));
        let p = after_partial(e, 1, 2);
        assert!(!p.retryable && p.retry_after.is_none());
        assert_eq!(p.code.as_deref(), Some("613"));
        assert_eq!(
            p.message,
            "1 of 2 parts were sent before this failure, so it is not retried (a retry would send them again): (#613) Calls to this api have exceeded the rate limit."
        );
        let mut auth = DeliveryError::permanent("Error validating access token");
        auth.needs_reauth = true;
        assert!(after_partial(auth, 2, 3).needs_reauth);
    }
}
