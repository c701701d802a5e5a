//! Outbound WhatsApp messages over the Cloud API (providers.md A2.3).
//!
//! One [`OutgoingMessage`] becomes one or more `POST /{phone_number_id}/messages`
//! calls, planned by [`plan`] (pure, so tests check every body):
//!
//! | the reply | the requests, in order |
//! | --- | --- |
//! | text | one `text` message |
//! | one attachment (image, video, document) and text up to 1024 characters | one media message with the text as `caption` |
//! | one audio attachment, or text over 1024 characters, or several attachments | a `text` message, then one media message per attachment |
//!
//! Attachments are uploaded first (`POST /{phone_number_id}/media`, multipart
//! `messaging_product`, `type`, `file`) and sent by `id`, so Meta never has to
//! reach our media links. `context.message_id` (a quoted reply) goes on the
//! first request only.

use crate::adapters::meta::GraphClient;
use crate::adapters::{DeliveryError, OutgoingAttachment, OutgoingMessage};
use crate::manifest::MAX_ATTACHMENT_BYTES;
use serde_json::{json, Value};

/// The longest text body Meta accepts (A2.4).
pub const MAX_TEXT_CHARS: usize = 4096;
/// The longest media caption Meta accepts; longer text is sent on its own.
pub const MAX_CAPTION_CHARS: usize = 1024;

/// The WhatsApp message type for an attachment's content type: `image`
/// (JPEG and PNG, the only images Meta takes as images), `audio`, `video`,
/// or `document` for everything else.
pub fn media_type(content_type: &str) -> &'static str {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "image/jpeg" | "image/jpg" | "image/png" => "image",
        e if e.starts_with("audio/") => "audio",
        e if e.starts_with("video/") => "video",
        _ => "document",
    }
}

fn envelope(to: &str, kind: &str, reply_to: Option<&str>) -> serde_json::Map<String, Value> {
    let mut body = serde_json::Map::new();
    body.insert("messaging_product".into(), json!("whatsapp"));
    body.insert("recipient_type".into(), json!("individual"));
    body.insert("to".into(), json!(to));
    body.insert("type".into(), json!(kind));
    if let Some(id) = reply_to {
        body.insert("context".into(), json!({ "message_id": id }));
    }
    body
}

/// A text message: `{"messaging_product":"whatsapp","recipient_type":"individual",
/// "to":..,"type":"text","text":{"preview_url":false,"body":..}}`, plus
/// `"context":{"message_id":..}` when it quotes a message.
pub fn text_body(to: &str, text: &str, reply_to: Option<&str>) -> Value {
    let mut body = envelope(to, "text", reply_to);
    body.insert("text".into(), json!({ "preview_url": false, "body": text }));
    Value::Object(body)
}

/// A media message by uploaded media `id`, with a caption (not for audio)
/// and, for documents, the file name the customer sees.
pub fn media_body(
    to: &str,
    kind: &str,
    media_id: &str,
    caption: Option<&str>,
    filename: Option<&str>,
    reply_to: Option<&str>,
) -> Value {
    let mut media = serde_json::Map::new();
    media.insert("id".into(), json!(media_id));
    if let Some(c) = caption.filter(|c| !c.is_empty() && kind != "audio") {
        media.insert("caption".into(), json!(c));
    }
    if let Some(f) = filename.filter(|f| !f.is_empty() && kind == "document") {
        media.insert("filename".into(), json!(f));
    }
    let mut body = envelope(to, kind, reply_to);
    body.insert(kind.into(), Value::Object(media));
    Value::Object(body)
}

/// The message bodies to post, in order, for `msg` whose attachments were
/// uploaded as `media_ids` (same order).
pub fn plan(msg: &OutgoingMessage, media_ids: &[String]) -> Vec<Value> {
    let to = msg.to.trim();
    let reply_to = msg.reply_to.as_deref().filter(|r| !r.is_empty());
    let caption_fits = msg.attachments.len() == 1
        && !msg.text.is_empty()
        && media_type(&msg.attachments[0].content_type) != "audio"
        && msg.text.chars().count() <= MAX_CAPTION_CHARS;
    let mut bodies = vec![];
    if !msg.text.is_empty() && !caption_fits {
        bodies.push(text_body(to, &msg.text, reply_to));
    }
    for (a, id) in msg.attachments.iter().zip(media_ids) {
        let context = if bodies.is_empty() { reply_to } else { None };
        let caption = caption_fits.then_some(msg.text.as_str());
        bodies.push(media_body(
            to,
            media_type(&a.content_type),
            id,
            caption,
            Some(&a.filename),
            context,
        ));
    }
    bodies
}

/// Checks what can be refused before any request.
pub fn check(msg: &OutgoingMessage) -> Result<(), DeliveryError> {
    if msg.to.trim().is_empty() {
        return Err(DeliveryError::permanent("the message has no recipient"));
    }
    if msg.text.is_empty() && msg.attachments.is_empty() {
        return Err(DeliveryError::permanent(
            "nothing to send: the message has no text and no attachments",
        ));
    }
    let chars = msg.text.chars().count();
    if chars > MAX_TEXT_CHARS {
        return Err(DeliveryError::permanent(format!(
            "the text is {chars} characters; WhatsApp takes at most {MAX_TEXT_CHARS}"
        )));
    }
    Ok(())
}

/// A reqwest error, without the URL (our media links are signed).
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else {
        e.to_string()
    }
}

/// Reads an attachment from its public link (our own `/media/...`), at most
/// [`MAX_ATTACHMENT_BYTES`].
async fn fetch(http: &reqwest::Client, a: &OutgoingAttachment) -> Result<Vec<u8>, DeliveryError> {
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
        .map_err(|e| fail(describe(&e.without_url()), true))?;
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
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| fail(describe(&e.without_url()), true))?
    {
        if (bytes.len() + chunk.len()) as u64 > MAX_ATTACHMENT_BYTES {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Uploads one attachment to `/{phone_number_id}/media` and answers its media id.
async fn upload(
    graph: &GraphClient,
    phone_number_id: &str,
    a: &OutgoingAttachment,
) -> Result<String, DeliveryError> {
    let bytes = fetch(&graph.http, a).await?;
    let part = reqwest::multipart::Part::bytes(bytes)
        .file_name(a.filename.clone())
        .mime_str(&a.content_type)
        .map_err(|_| {
            DeliveryError::permanent(format!(
                "attachment {} has an invalid content type: {}",
                a.filename, a.content_type
            ))
        })?;
    let form = reqwest::multipart::Form::new()
        .text("messaging_product", "whatsapp")
        .text("type", a.content_type.clone())
        .part("file", part);
    let answer = graph
        .post_multipart(&format!("{phone_number_id}/media"), form)
        .await?;
    answer
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            DeliveryError::permanent(format!(
                "Meta accepted the upload of {} but answered no media id",
                a.filename
            ))
        })
}

/// `messages[0].id` of a send answer: the wamid that status webhooks name.
pub fn answered_id(answer: &Value) -> Option<String> {
    answer
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.first())
        .and_then(|m| m.get("id"))
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .map(str::to_string)
}

/// Sends `msg`; the receipt's id is the wamid of the last request.
pub async fn send(
    graph: &GraphClient,
    phone_number_id: &str,
    msg: &OutgoingMessage,
) -> Result<String, DeliveryError> {
    check(msg)?;
    // Every upload before any message, so a failed upload (retried) never
    // sends the customer part of a reply twice.
    let mut media_ids = Vec::with_capacity(msg.attachments.len());
    for a in &msg.attachments {
        media_ids.push(upload(graph, phone_number_id, a).await?);
    }
    let bodies = plan(msg, &media_ids);
    let total = bodies.len();
    let path = format!("{phone_number_id}/messages");
    let mut last = None;
    for (n, body) in bodies.iter().enumerate() {
        match graph.post_json(&path, body).await {
            Ok(answer) => last = answered_id(&answer).or(last),
            Err(mut e) if n > 0 => {
                // Part of the reply reached the customer: a retry would send
                // it again, so this is final and says what went out.
                e.message = format!("sent {n} of {total} parts, then: {}", e.message);
                e.retryable = false;
                e.retry_after = None;
                return Err(e);
            }
            Err(e) => return Err(e),
        }
    }
    last.ok_or_else(|| {
        DeliveryError::permanent(
            "Meta accepted the message but answered no message id; not retried, \
             so the customer does not get it twice",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment(name: &str, content_type: &str) -> OutgoingAttachment {
        OutgoingAttachment {
            id: format!("att-{name}"),
            filename: name.into(),
            content_type: content_type.into(),
            size: 3,
            public_url: format!("https://switchboard.example.com/media/{name}"),
        }
    }

    fn outgoing(text: &str, attachments: Vec<OutgoingAttachment>) -> OutgoingMessage {
        OutgoingMessage {
            id: "msg-1".into(),
            to: "16505551234".into(),
            text: text.into(),
            attachments,
            reply_to: None,
            tag: None,
            ..OutgoingMessage::default()
        }
    }

    #[test]
    fn a_text_body_is_metas_documented_shape() {
        assert_eq!(
            text_body("16505551234", "It ships today", None),
            json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": "16505551234",
                "type": "text",
                "text": {"preview_url": false, "body": "It ships today"}
            })
        );
    }

    #[test]
    fn a_reply_quotes_the_customers_message() {
        assert_eq!(
            text_body("US.13491208655302741918", "Yes", Some("wamid.ABC")),
            json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": "US.13491208655302741918",
                "type": "text",
                "text": {"preview_url": false, "body": "Yes"},
                "context": {"message_id": "wamid.ABC"}
            })
        );
    }

    #[test]
    fn media_bodies_carry_id_caption_and_document_filename() {
        assert_eq!(
            media_body(
                "1",
                "document",
                "m1",
                Some("Your invoice"),
                Some("a.pdf"),
                None
            ),
            json!({
                "messaging_product": "whatsapp", "recipient_type": "individual", "to": "1",
                "type": "document",
                "document": {"id": "m1", "caption": "Your invoice", "filename": "a.pdf"}
            })
        );
        assert_eq!(
            media_body(
                "1",
                "image",
                "m2",
                Some("Look"),
                Some("a.jpg"),
                Some("wamid.Q")
            ),
            json!({
                "messaging_product": "whatsapp", "recipient_type": "individual", "to": "1",
                "type": "image", "image": {"id": "m2", "caption": "Look"},
                "context": {"message_id": "wamid.Q"}
            })
        );
        assert_eq!(
            media_body(
                "1",
                "audio",
                "m3",
                Some("no captions on audio"),
                Some("a.ogg"),
                None
            ),
            json!({
                "messaging_product": "whatsapp", "recipient_type": "individual", "to": "1",
                "type": "audio", "audio": {"id": "m3"}
            })
        );
    }

    #[test]
    fn content_types_choose_the_message_type() {
        for (ct, kind) in [
            ("image/jpeg", "image"),
            ("image/PNG", "image"),
            ("image/webp", "document"),
            ("audio/ogg; codecs=opus", "audio"),
            ("audio/mpeg", "audio"),
            ("video/mp4", "video"),
            ("video/3gpp", "video"),
            ("application/pdf", "document"),
            ("text/plain", "document"),
            ("", "document"),
        ] {
            assert_eq!(media_type(ct), kind, "{ct}");
        }
    }

    #[test]
    fn one_attachment_takes_the_text_as_its_caption() {
        let mut msg = outgoing("Here it is", vec![attachment("a.jpg", "image/jpeg")]);
        msg.reply_to = Some("wamid.Q".into());
        assert_eq!(
            plan(&msg, &["m1".into()]),
            vec![media_body(
                "16505551234",
                "image",
                "m1",
                Some("Here it is"),
                None,
                Some("wamid.Q")
            )]
        );
    }

    #[test]
    fn several_attachments_send_the_text_first_then_each_file() {
        let mut msg = outgoing(
            "Two files",
            vec![
                attachment("a.pdf", "application/pdf"),
                attachment("b.mp4", "video/mp4"),
            ],
        );
        msg.reply_to = Some("wamid.Q".into());
        assert_eq!(
            plan(&msg, &["m1".into(), "m2".into()]),
            vec![
                text_body("16505551234", "Two files", Some("wamid.Q")),
                media_body("16505551234", "document", "m1", None, Some("a.pdf"), None),
                media_body("16505551234", "video", "m2", None, None, None),
            ]
        );
    }

    #[test]
    fn audio_and_long_text_are_not_captions() {
        let msg = outgoing("Listen", vec![attachment("v.ogg", "audio/ogg")]);
        assert_eq!(
            plan(&msg, &["m1".into()]),
            vec![
                text_body("16505551234", "Listen", None),
                media_body("16505551234", "audio", "m1", None, None, None),
            ]
        );
        let long = "x".repeat(MAX_CAPTION_CHARS + 1);
        let msg = outgoing(&long, vec![attachment("a.png", "image/png")]);
        let bodies = plan(&msg, &["m1".into()]);
        assert_eq!(bodies.len(), 2);
        assert_eq!(bodies[0]["text"]["body"], json!(long));
        assert_eq!(bodies[1]["image"], json!({"id": "m1"}));
    }

    #[test]
    fn attachments_alone_have_no_caption_and_text_alone_is_one_message() {
        let msg = outgoing("", vec![attachment("a.png", "image/png")]);
        assert_eq!(
            plan(&msg, &["m1".into()]),
            vec![media_body("16505551234", "image", "m1", None, None, None)]
        );
        let msg = outgoing("Hi", vec![]);
        assert_eq!(plan(&msg, &[]), vec![text_body("16505551234", "Hi", None)]);
    }

    #[test]
    fn empty_or_too_long_messages_are_refused_before_any_request() {
        assert!(check(&outgoing("", vec![])).is_err());
        let mut m = outgoing("hi", vec![]);
        m.to = " ".into();
        assert!(check(&m).is_err());
        assert!(check(&outgoing(&"é".repeat(MAX_TEXT_CHARS), vec![])).is_ok());
        let e = check(&outgoing(&"é".repeat(MAX_TEXT_CHARS + 1), vec![])).unwrap_err();
        assert!(!e.retryable);
        assert!(e.message.contains("4096"), "{}", e.message);
    }

    #[test]
    fn the_answered_id_is_the_first_message_id() {
        let answer = json!({
            "messaging_product": "whatsapp",
            "contacts": [{"input": "16505551234", "wa_id": "16505551234"}],
            "messages": [{"id": "wamid.OUT", "message_status": "accepted"}]
        });
        assert_eq!(answered_id(&answer).as_deref(), Some("wamid.OUT"));
        assert_eq!(answered_id(&json!({"messages": []})), None);
        assert_eq!(answered_id(&json!({})), None);
    }
}
