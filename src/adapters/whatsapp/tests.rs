//! The WhatsApp adapter without a network: every fixture of
//! `fixtures/whatsapp/` normalized to exact values, signatures, the
//! handshake, the simulated webhooks, and the normalizer fuzzed.

use super::*;
use crate::adapters::{InboundMessage, Reaction, StatusUpdate};
use crate::domain::DeliveryStatus;
use chrono::{DateTime, Utc};
use proptest::prelude::*;

const SECRET: &str = "test-app-secret";
const PNID: &str = "106540352242922";
const KERRY: &str = "16505551234";
const KERRY_BSUID: &str = "US.13491208655302741918";
/// 2026-01-01T00:00:00Z, the fixtures' first timestamp.
const T: i64 = 1767225600;

fn cfg() -> ChannelConfig {
    toml::from_str(&format!(
        r#"
        id = "wa-main"
        kind = "whatsapp"
        queue = "support"
        app_secret = "{SECRET}"
        verify_token = "meatyhamhock"
        access_token = "EAAtest"
        phone_number_id = "{PNID}"
        "#
    ))
    .unwrap()
}

fn channel() -> WhatsAppChannel {
    WhatsAppChannel::new(&cfg()).unwrap()
}

fn fixture(name: &str) -> &'static [u8] {
    let text = match name {
        "text" => include_str!("../../../fixtures/whatsapp/text.json"),
        "image" => include_str!("../../../fixtures/whatsapp/image.json"),
        "audio_voice" => include_str!("../../../fixtures/whatsapp/audio_voice.json"),
        "video" => include_str!("../../../fixtures/whatsapp/video.json"),
        "document" => include_str!("../../../fixtures/whatsapp/document.json"),
        "sticker" => include_str!("../../../fixtures/whatsapp/sticker.json"),
        "location" => include_str!("../../../fixtures/whatsapp/location.json"),
        "contacts" => include_str!("../../../fixtures/whatsapp/contacts.json"),
        "interactive_button_reply" => {
            include_str!("../../../fixtures/whatsapp/interactive_button_reply.json")
        }
        "interactive_list_reply" => {
            include_str!("../../../fixtures/whatsapp/interactive_list_reply.json")
        }
        "button" => include_str!("../../../fixtures/whatsapp/button.json"),
        "reaction" => include_str!("../../../fixtures/whatsapp/reaction.json"),
        "reaction_removed" => include_str!("../../../fixtures/whatsapp/reaction_removed.json"),
        "context_reply" => include_str!("../../../fixtures/whatsapp/context_reply.json"),
        "unsupported" => include_str!("../../../fixtures/whatsapp/unsupported.json"),
        "bsuid_only" => include_str!("../../../fixtures/whatsapp/bsuid_only.json"),
        "batch" => include_str!("../../../fixtures/whatsapp/batch.json"),
        "status_sent" => include_str!("../../../fixtures/whatsapp/status_sent.json"),
        "status_delivered" => include_str!("../../../fixtures/whatsapp/status_delivered.json"),
        "status_read" => include_str!("../../../fixtures/whatsapp/status_read.json"),
        "status_failed" => include_str!("../../../fixtures/whatsapp/status_failed.json"),
        _ => panic!("no fixture {name}"),
    };
    text.as_bytes()
}

const FIXTURES: [&str; 21] = [
    "text",
    "image",
    "audio_voice",
    "video",
    "document",
    "sticker",
    "location",
    "contacts",
    "interactive_button_reply",
    "interactive_list_reply",
    "button",
    "reaction",
    "reaction_removed",
    "context_reply",
    "unsupported",
    "bsuid_only",
    "batch",
    "status_sent",
    "status_delivered",
    "status_read",
    "status_failed",
];

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap()
}

fn raw<'a>(headers: &'a [(String, String)], body: &'a [u8]) -> RawRequest<'a> {
    RawRequest {
        path: "/webhooks/wa-main",
        query: "",
        headers: headers.into(),
        content_type: "application/json",
        body,
    }
}

/// Through the adapter's own `normalize`, as the gateway calls it.
fn normalize_bytes(body: &[u8]) -> Result<Vec<Inbound>, IntakeError> {
    let req = raw(&[], body);
    channel().normalize(&Verified::new(&req))
}

fn items(name: &str) -> Vec<Inbound> {
    normalize_bytes(fixture(name)).unwrap()
}

fn one(name: &str) -> Inbound {
    let mut all = items(name);
    assert_eq!(all.len(), 1, "{name}: {all:?}");
    all.remove(0)
}

fn message(name: &str) -> InboundMessage {
    match one(name) {
        Inbound::Message(m) => m,
        other => panic!("{name}: expected a message, got {other:?}"),
    }
}

/// A message from Kerry (phone only, as most fixtures have her).
fn kerry(id: &str, secs: i64, text: &str) -> InboundMessage {
    InboundMessage {
        provider_id: id.into(),
        from: KERRY.into(),
        contact_name: Some("Kerry Fisher".into()),
        text: text.into(),
        sent_at: at(secs),
        ..InboundMessage::default()
    }
}

fn media(id: &str, content_type: &str, filename: Option<&str>) -> MediaRef {
    MediaRef {
        url: String::new(),
        content_type: Some(content_type.into()),
        filename: filename.map(str::to_string),
        media_id: Some(id.into()),
    }
}

fn status(id: &str, status: DeliveryStatus, error: Option<&str>) -> Inbound {
    Inbound::Status(StatusUpdate {
        provider_id: id.into(),
        status,
        error: error.map(str::to_string),
    })
}

// ----- every fixture -------------------------------------------------

#[test]
fn text_keeps_the_wa_id_as_sender_and_the_bsuid_as_alias() {
    assert_eq!(
        message("text"),
        InboundMessage {
            aliases: vec![KERRY_BSUID.into()],
            ..kerry(
                "wamid.HBgLU1dCdGV4dA==",
                T,
                "Hi! My order #4411 hasn't arrived yet."
            )
        }
    );
}

#[test]
fn image_is_media_by_id_with_its_caption() {
    assert_eq!(
        message("image"),
        InboundMessage {
            media: vec![media("1479537139650973", "image/jpeg", None)],
            ..kerry("wamid.HBgLU1dCaW1hZ2U=", T + 60, "The box arrived crushed")
        }
    );
}

#[test]
fn a_voice_note_is_audio_media_of_kind_voice() {
    assert_eq!(
        message("audio_voice"),
        InboundMessage {
            media: vec![media("1003383421387256", "audio/ogg; codecs=opus", None)],
            kind: Some("voice".into()),
            ..kerry("wamid.HBgLU1dCdm9pY2U=", T + 120, "")
        }
    );
}

#[test]
fn video_is_media_by_id_with_its_caption() {
    assert_eq!(
        message("video"),
        InboundMessage {
            media: vec![media("1248305629531447", "video/mp4", None)],
            ..kerry("wamid.HBgLU1dCdmlkZW8=", T + 180, "Unboxing")
        }
    );
}

#[test]
fn a_document_keeps_its_filename() {
    assert_eq!(
        message("document"),
        InboundMessage {
            media: vec![media(
                "1896217510986211",
                "application/pdf",
                Some("receipt-4411.pdf")
            )],
            ..kerry("wamid.HBgLU1dCZG9jdW1lbnQ=", T + 240, "My receipt")
        }
    );
}

#[test]
fn a_sticker_is_webp_media_of_kind_sticker() {
    assert_eq!(
        message("sticker"),
        InboundMessage {
            media: vec![media("1731922704230128", "image/webp", None)],
            kind: Some("sticker".into()),
            ..kerry("wamid.HBgLU1dCc3RpY2tlcg==", T + 300, "")
        }
    );
}

#[test]
fn a_location_is_readable_text() {
    assert_eq!(
        message("location"),
        InboundMessage {
            kind: Some("location".into()),
            ..kerry(
                "wamid.HBgLU1dCbG9jYXRpb24=",
                T + 360,
                "📍 Main Office, 1 Hacker Way, Menlo Park, CA 94025 (37.483307, -122.148981)"
            )
        }
    );
}

#[test]
fn shared_contacts_list_names_phones_and_emails() {
    assert_eq!(
        message("contacts"),
        InboundMessage {
            kind: Some("contacts".into()),
            ..kerry(
                "wamid.HBgLU1dCY29udGFjdHM=",
                T + 420,
                "👤 Jane Doe: +1 (650) 555-0199, +1 650-555-0100, jane@example.com\n\
                 👤 Omar: +44 7700 900456"
            )
        }
    );
}

#[test]
fn a_button_reply_is_its_title_quoting_our_message() {
    assert_eq!(
        message("interactive_button_reply"),
        InboundMessage {
            kind: Some("interactive".into()),
            reply_to: Some("wamid.HBgLU1dCb3VyYnV0dG9ucw==".into()),
            ..kerry("wamid.HBgLU1dCYnV0dG9uX3JlcGx5", T + 480, "Track my order")
        }
    );
}

#[test]
fn a_list_reply_is_its_title_quoting_our_message() {
    assert_eq!(
        message("interactive_list_reply"),
        InboundMessage {
            kind: Some("interactive".into()),
            reply_to: Some("wamid.HBgLU1dCb3VybGlzdA==".into()),
            ..kerry("wamid.HBgLU1dCbGlzdF9yZXBseQ==", T + 540, "Tuesday 10:00")
        }
    );
}

#[test]
fn a_template_button_is_its_text() {
    assert_eq!(
        message("button"),
        InboundMessage {
            kind: Some("button".into()),
            reply_to: Some("wamid.HBgLU1dCb3VydGVtcGxhdGU=".into()),
            ..kerry("wamid.HBgLU1dCYnV0dG9u", T + 600, "Yes, deliver tomorrow")
        }
    );
}

#[test]
fn a_reaction_targets_the_message_it_reacts_to() {
    assert_eq!(
        one("reaction"),
        Inbound::Reaction(Reaction {
            provider_id: "wamid.HBgLU1dCcmVhY3Rpb24=".into(),
            from: KERRY.into(),
            target_provider_id: "wamid.HBgLU1dCb3VycmVwbHk=".into(),
            emoji: Some("👍".into()),
            sent_at: at(T + 660),
        })
    );
}

#[test]
fn an_empty_emoji_removes_the_reaction() {
    assert_eq!(
        one("reaction_removed"),
        Inbound::Reaction(Reaction {
            provider_id: "wamid.HBgLU1dCcmVhY3Rpb25fcmVtb3ZlZA==".into(),
            from: KERRY.into(),
            target_provider_id: "wamid.HBgLU1dCb3VycmVwbHk=".into(),
            emoji: None,
            sent_at: at(T + 720),
        })
    );
}

#[test]
fn a_context_reply_names_the_quoted_message() {
    assert_eq!(
        message("context_reply"),
        InboundMessage {
            reply_to: Some("wamid.HBgLU1dCb3VycXVlc3Rpb24=".into()),
            ..kerry(
                "wamid.HBgLU1dCY29udGV4dF9yZXBseQ==",
                T + 780,
                "Yes, that's the one"
            )
        }
    );
}

#[test]
fn an_unsupported_message_is_a_visible_placeholder_with_the_error_title() {
    assert_eq!(
        message("unsupported"),
        InboundMessage {
            kind: Some("unsupported".into()),
            ..kerry(
                "wamid.HBgLU1dCdW5zdXBwb3J0ZWQ=",
                T + 840,
                "[unsupported message: Message type unknown]"
            )
        }
    );
}

#[test]
fn a_user_without_a_phone_number_is_keyed_by_the_bsuid() {
    assert_eq!(
        message("bsuid_only"),
        InboundMessage {
            provider_id: "wamid.HBgLU1dCYnN1aWRfb25seQ==".into(),
            from: "GB.5129083746501827364".into(),
            contact_name: Some("Sam Carter".into()),
            text: "Hello from a username account".into(),
            sent_at: at(T + 900),
            ..InboundMessage::default()
        }
    );
}

#[test]
fn statuses_map_to_delivery_statuses() {
    let ours = "wamid.HBgLU1dCb3VycmVwbHk=";
    assert_eq!(one("status_sent"), status(ours, DeliveryStatus::Sent, None));
    assert_eq!(
        one("status_delivered"),
        status(ours, DeliveryStatus::Delivered, None)
    );
    assert_eq!(one("status_read"), status(ours, DeliveryStatus::Read, None));
}

#[test]
fn a_failed_status_carries_code_title_and_details() {
    assert_eq!(
        one("status_failed"),
        status(
            "wamid.HBgLU1dCb3VybGF0ZQ==",
            DeliveryStatus::Failed,
            Some(
                "131047: Re-engagement message: Message failed to send because more than 24 \
                 hours have passed since the customer last replied to this number."
            )
        )
    );
}

#[test]
fn every_element_of_a_batch_is_read_and_other_numbers_are_ignored() {
    let with_bsuid = |id: &str, secs, text: &str| {
        Inbound::Message(InboundMessage {
            aliases: vec![KERRY_BSUID.into()],
            ..kerry(id, secs, text)
        })
    };
    assert_eq!(
        items("batch"),
        vec![
            with_bsuid("wamid.HBgLU1dCYmF0Y2gx", T + 2000, "First question"),
            Inbound::Message(InboundMessage {
                provider_id: "wamid.HBgLU1dCYmF0Y2gy".into(),
                from: "447700900123".into(),
                contact_name: Some("Ravi Patel".into()),
                text: "Hello, I need help".into(),
                sent_at: at(T + 2001),
                ..InboundMessage::default()
            }),
            with_bsuid("wamid.HBgLU1dCYmF0Y2gz", T + 2002, "Second question"),
            status(
                "wamid.HBgLU1dCYmF0Y2hvdXQx",
                DeliveryStatus::Delivered,
                None
            ),
            status("wamid.HBgLU1dCYmF0Y2hvdXQy", DeliveryStatus::Sent, None),
            status("wamid.HBgLU1dCYmF0Y2hvdXQy", DeliveryStatus::Read, None),
        ]
    );
}

#[test]
fn every_fixture_is_for_this_channel_except_the_other_numbers_part() {
    // A channel with another number sees nothing in any fixture.
    let mut c = cfg();
    c.settings
        .insert("phone_number_id".into(), "109876543210987".into());
    let other = WhatsAppChannel::new(&c).unwrap();
    for name in FIXTURES {
        let req = raw(&[], fixture(name));
        let got = other.normalize(&Verified::new(&req)).unwrap();
        let expected: Vec<&str> = if name == "batch" {
            vec![
                "wamid.HBgLU1dCb3RoZXJsaW5l",
                "wamid.HBgLU1dCb3RoZXJzdGF0dXM=",
            ]
        } else {
            vec![]
        };
        let ids: Vec<&str> = got
            .iter()
            .map(|i| match i {
                Inbound::Message(m) => m.provider_id.as_str(),
                Inbound::Status(s) => s.provider_id.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, expected, "{name}");
    }
}

// ----- inline payloads: the rules the fixtures do not show ------------

/// A webhook for our number with `value` merged into the change's value.
fn webhook(value: serde_json::Value) -> Vec<u8> {
    let mut v = json!({"messaging_product": "whatsapp", "metadata": {"display_phone_number": "15550783881", "phone_number_id": PNID}});
    for (k, x) in value.as_object().unwrap() {
        v[k] = x.clone();
    }
    serde_json::to_vec(&json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"field": "messages", "value": v}]}]
    }))
    .unwrap()
}

fn inline_message(m: serde_json::Value) -> Vec<Inbound> {
    normalize_bytes(&webhook(json!({ "messages": [m] }))).unwrap()
}

#[test]
fn group_messages_are_ignored() {
    let got = inline_message(json!({
        "from": KERRY, "id": "wamid.G", "timestamp": "1767225600", "type": "text",
        "group_id": "120363025246125244", "text": {"body": "hi all"}
    }));
    assert_eq!(got, vec![]);
}

#[test]
fn other_objects_and_fields_are_ignored_not_errors() {
    let other_object = br#"{"object":"page","entry":[{"id":"1","messaging":[]}]}"#;
    assert_eq!(normalize_bytes(other_object), Ok(vec![]));
    let other_field = serde_json::to_vec(&json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [
            {"field": "account_update", "value": {"event": "VERIFIED_ACCOUNT"}},
            {"field": "smb_message_echoes", "value": {"messaging_product": "whatsapp",
                "metadata": {"phone_number_id": PNID}, "message_echoes": []}}
        ]}]
    }))
    .unwrap();
    assert_eq!(normalize_bytes(&other_field), Ok(vec![]));
    // A change without metadata cannot be ours.
    let no_metadata = serde_json::to_vec(&json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"field": "messages", "value": {"messages": [
            {"from": KERRY, "id": "wamid.X", "type": "text", "text": {"body": "x"}}
        ]}}]}]
    }))
    .unwrap();
    assert_eq!(normalize_bytes(&no_metadata), Ok(vec![]));
}

#[test]
fn malformed_bodies_are_refused() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "the body is not JSON"),
        (b"[1,2]".to_vec(), "the body is not a JSON object"),
        (br#"{"entry":[]}"#.to_vec(), "object is missing"),
        (
            br#"{"object":"whatsapp_business_account"}"#.to_vec(),
            "entry is missing or not an array",
        ),
        (
            br#"{"object":"whatsapp_business_account","entry":[7]}"#.to_vec(),
            "entry[0] is not an object",
        ),
        (
            br#"{"object":"whatsapp_business_account","entry":[{"changes":{}}]}"#.to_vec(),
            "entry[0].changes is not an array",
        ),
        (
            webhook(json!({"messages": {"id": "x"}})),
            "entry[0].changes[0].value.messages is not an array",
        ),
        (
            webhook(json!({"messages": [{"from": KERRY, "type": "text"}]})),
            "entry[0].changes[0].value.messages[0].id is missing",
        ),
        (
            webhook(json!({"messages": [{"id": "wamid.X", "type": "text"}]})),
            "entry[0].changes[0].value.messages[0] has neither from nor from_user_id",
        ),
        (
            webhook(
                json!({"messages": [{"from": KERRY, "id": "wamid.X", "type": "reaction", "reaction": {"emoji": "x"}}]}),
            ),
            "entry[0].changes[0].value.messages[0].reaction.message_id is missing",
        ),
        (
            webhook(json!({"statuses": [{"status": "read"}]})),
            "entry[0].changes[0].value.statuses[0].id is missing",
        ),
    ];
    for (body, expected) in cases {
        match normalize_bytes(&body) {
            Err(IntakeError::Malformed(m)) => {
                assert!(m.starts_with(expected), "{m} / {expected}")
            }
            other => panic!("{}: {other:?}", String::from_utf8_lossy(&body)),
        }
    }
}

#[test]
fn a_body_that_is_not_json_by_its_type_is_refused() {
    let req = RawRequest {
        content_type: "application/x-www-form-urlencoded",
        ..raw(&[], fixture("text"))
    };
    assert!(matches!(
        channel().normalize(&Verified::new(&req)),
        Err(IntakeError::UnsupportedMediaType(_))
    ));
}

#[test]
fn a_bsuid_in_from_and_a_phone_only_in_contacts_are_understood() {
    // courier's `hello_bsuid_in_from`: the BSUID arrives in `from`.
    let got = inline_message(json!({
        "from": "US.1234", "id": "wamid.B", "timestamp": "1767225600", "type": "text",
        "text": {"body": "hi"}
    }));
    assert!(
        matches!(&got[..], [Inbound::Message(m)] if m.from == "US.1234" && m.aliases.is_empty())
    );
    // The phone may come only in contacts[].wa_id, matched by user_id.
    let got = normalize_bytes(&webhook(json!({
        "contacts": [{"profile": {"name": "Lee"}, "wa_id": "15551230000", "user_id": "US.77"}],
        "messages": [{"from_user_id": "US.77", "id": "wamid.C", "timestamp": "1767225600",
                      "type": "text", "text": {"body": "hi"}}]
    })))
    .unwrap();
    assert!(
        matches!(&got[..], [Inbound::Message(m)]
            if m.from == "15551230000" && m.aliases == vec!["US.77".to_string()]
            && m.contact_name.as_deref() == Some("Lee")),
        "{got:?}"
    );
}

#[test]
fn contacts_of_other_senders_give_no_name() {
    let got = normalize_bytes(&webhook(json!({
        "contacts": [{"profile": {"name": "Someone Else"}, "wa_id": "15550000009"}],
        "messages": [{"from": KERRY, "id": "wamid.D", "timestamp": "1767225600",
                      "type": "text", "text": {"body": "hi"}}]
    })))
    .unwrap();
    assert!(
        matches!(&got[..], [Inbound::Message(m)] if m.contact_name.is_none() && m.from == KERRY)
    );
}

#[test]
fn other_message_types_become_readable_text() {
    let text_and_kind = |m: serde_json::Value| match inline_message(m).as_slice() {
        [Inbound::Message(m)] => (m.text.clone(), m.kind.clone(), m.media.clone()),
        other => panic!("{other:?}"),
    };
    let base = |t: &str, body: serde_json::Value| {
        let mut m = json!({"from": KERRY, "id": "wamid.E", "timestamp": "1767225600", "type": t});
        if !body.is_null() {
            m[t] = body;
        }
        m
    };
    assert_eq!(
        text_and_kind(base(
            "voice",
            json!({"id": "77", "mime_type": "audio/ogg; codecs=opus"})
        )),
        (
            String::new(),
            Some("voice".into()),
            vec![media("77", "audio/ogg; codecs=opus", None)]
        )
    );
    assert_eq!(
        text_and_kind(base(
            "interactive",
            json!({"type": "nfm_reply", "nfm_reply": {"name": "flow", "body": "Sent", "response_json": "{\"a\":1}"}})
        )),
        ("Sent".into(), Some("interactive".into()), vec![])
    );
    assert_eq!(
        text_and_kind(base(
            "interactive",
            json!({"type": "call_permission_reply", "call_permission_reply": {"response": "accept"}})
        )),
        (
            "[interactive reply: call_permission_reply]".into(),
            Some("interactive".into()),
            vec![]
        )
    );
    assert_eq!(
        text_and_kind(base(
            "system",
            json!({"body": "Kerry changed their phone number", "type": "user_changed_number"})
        )),
        (
            "Kerry changed their phone number".into(),
            Some("system".into()),
            vec![]
        )
    );
    assert_eq!(
        text_and_kind(base(
            "order",
            json!({"catalog_id": "1", "product_items": []})
        )),
        (
            "[unsupported message: order]".into(),
            Some("unsupported".into()),
            vec![]
        )
    );
    assert_eq!(
        text_and_kind(base("unknown", serde_json::Value::Null)),
        (
            "[unsupported message]".into(),
            Some("unsupported".into()),
            vec![]
        )
    );
    assert_eq!(
        text_and_kind(base(
            "location",
            json!({"latitude": "51.5", "longitude": "-0.12"})
        )),
        ("📍 (51.5, -0.12)".into(), Some("location".into()), vec![])
    );
}

#[test]
fn a_reaction_without_an_emoji_is_a_removal() {
    let got = inline_message(json!({
        "from": KERRY, "id": "wamid.R", "timestamp": "1767225600", "type": "reaction",
        "reaction": {"message_id": "wamid.T"}
    }));
    assert!(
        matches!(&got[..], [Inbound::Reaction(r)] if r.emoji.is_none() && r.target_provider_id == "wamid.T")
    );
}

#[test]
fn a_missing_timestamp_is_the_receive_time_and_numbers_are_read() {
    let before = Utc::now();
    let got = inline_message(
        json!({"from": KERRY, "id": "wamid.N", "type": "text", "text": {"body": "x"}}),
    );
    assert!(matches!(&got[..], [Inbound::Message(m)] if m.sent_at >= before));
    let got = inline_message(
        json!({"from": KERRY, "id": "wamid.N", "timestamp": 1767225600, "type": "text", "text": {"body": "x"}}),
    );
    assert!(matches!(&got[..], [Inbound::Message(m)] if m.sent_at == at(T)));
}

#[test]
fn unknown_statuses_are_ignored_and_failures_without_errors_say_so() {
    let got = normalize_bytes(&webhook(json!({"statuses": [
        {"id": "wamid.S", "status": "deleted", "timestamp": "1767225600"},
        {"id": "wamid.S", "status": "failed", "timestamp": "1767225600"},
        {"id": "wamid.S", "status": "failed", "errors": [{"code": 131026, "message": "Message undeliverable"}]},
    ]})))
    .unwrap();
    assert_eq!(
        got,
        vec![
            status(
                "wamid.S",
                DeliveryStatus::Failed,
                Some("WhatsApp reported the message failed")
            ),
            status(
                "wamid.S",
                DeliveryStatus::Failed,
                Some("131026: Message undeliverable")
            ),
        ]
    );
}

#[test]
fn a_numeric_phone_number_id_still_matches() {
    let body = String::from_utf8(fixture("context_reply").to_vec())
        .unwrap()
        .replace(&format!("\"{PNID}\""), PNID);
    assert_eq!(normalize_bytes(body.as_bytes()).unwrap().len(), 1);
}

// ----- verify, handshake, ack, settings --------------------------------

fn signed(secret: &str, body: &[u8]) -> Vec<(String, String)> {
    vec![("X-Hub-Signature-256".to_string(), meta::sign(secret, body))]
}

#[test]
fn verify_accepts_the_app_secrets_signature_over_the_raw_body() {
    let body = fixture("reaction");
    let headers = signed(SECRET, body);
    let v = channel().verify(&raw(&headers, body)).unwrap();
    assert_eq!(v.body(), body);
    // The fixture holds the emoji escaped, as Meta sends it; the signature
    // is over those bytes.
    assert!(String::from_utf8_lossy(body).contains("\\ud83d\\udc4d"));
}

#[test]
fn verify_refuses_wrong_missing_and_tampered_signatures() {
    let body = fixture("text");
    let ch = channel();
    for headers in [vec![], signed("another-secret", body)] {
        assert!(matches!(
            ch.verify(&raw(&headers, body)),
            Err(IntakeError::InvalidSignature(_))
        ));
    }
    let headers = signed(SECRET, body);
    let tampered = String::from_utf8(body.to_vec())
        .unwrap()
        .replace("4411", "4412");
    assert!(matches!(
        ch.verify(&raw(&headers, tampered.as_bytes())),
        Err(IntakeError::InvalidSignature(_))
    ));
}

#[test]
fn verify_accepts_the_previous_secret_during_rotation() {
    let mut c = cfg();
    c.settings.insert("app_secret".into(), "new-secret".into());
    c.settings
        .insert("app_secret_previous".into(), SECRET.into());
    let ch = WhatsAppChannel::new(&c).unwrap();
    let body = fixture("text");
    assert!(ch.verify(&raw(&signed(SECRET, body), body)).is_ok());
    assert!(ch.verify(&raw(&signed("new-secret", body), body)).is_ok());
    assert!(channel()
        .verify(&raw(&signed("new-secret", body), body))
        .is_err());
}

#[test]
fn the_handshake_echoes_the_challenge_for_the_verify_token_only() {
    let ch = channel();
    let ok = ch
        .handshake("hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=meatyhamhock")
        .unwrap()
        .unwrap();
    assert_eq!(
        (ok.status, ok.content_type, ok.body),
        (200, "text/plain", b"1158201444".to_vec())
    );
    assert!(matches!(
        ch.handshake("hub.mode=subscribe&hub.challenge=1&hub.verify_token=wrong"),
        Some(Err(IntakeError::VerifyTokenMismatch(_)))
    ));
}

#[test]
fn ack_is_a_plain_200() {
    let ack = channel().ack();
    assert_eq!((ack.status, ack.content_type), (200, "text/plain"));
}

#[test]
fn new_names_each_missing_setting() {
    for key in [
        "app_secret",
        "verify_token",
        "access_token",
        "phone_number_id",
    ] {
        let mut c = cfg();
        c.settings.remove(key);
        assert_eq!(
            WhatsAppChannel::new(&c).unwrap_err(),
            format!("channel wa-main: {key}: missing (required for whatsapp channels)")
        );
    }
    let mut c = cfg();
    c.settings
        .insert("phone_number_id".into(), "1/../me".into());
    assert!(WhatsAppChannel::new(&c)
        .unwrap_err()
        .contains("phone_number_id"));
}

#[test]
fn api_base_defaults_to_the_manifests_versioned_graph_url() {
    assert_eq!(api_base(&cfg()), "https://graph.facebook.com/v25.0");
    let mut c = cfg();
    c.api_base = Some("http://127.0.0.1:9/v99.0/".into());
    assert_eq!(api_base(&c), "http://127.0.0.1:9/v99.0");
    assert_eq!(
        WhatsAppChannel::new(&c).unwrap().graph.api_base,
        "http://127.0.0.1:9/v99.0"
    );
}

#[test]
fn media_credentials_are_the_bearer_token() {
    assert!(matches!(media_credentials(&cfg()), Credentials::Bearer(t) if t == "EAAtest"));
    let mut c = cfg();
    c.settings.remove("access_token");
    assert!(matches!(media_credentials(&c), Credentials::None));
}

#[test]
fn media_ids_that_could_steer_the_request_are_refused() {
    assert!(valid_media_id("1479537139650973"));
    for bad in [
        "",
        "../me",
        "1?phone_number_id=2",
        "1/2",
        "a b",
        &"1".repeat(129),
    ] {
        assert!(!valid_media_id(bad), "{bad}");
    }
}

// ----- simulate ---------------------------------------------------------

fn through_the_adapter(sim: &SimulatedRequest) -> Vec<Inbound> {
    let req = RawRequest {
        path: &sim.path,
        query: "",
        headers: (&sim.headers).into(),
        content_type: &sim.content_type,
        body: &sim.body,
    };
    let ch = channel();
    ch.normalize(&ch.verify(&req).unwrap()).unwrap()
}

#[test]
fn simulated_inbound_is_metas_shape_signed_for_this_channel() {
    let before = Utc::now().timestamp();
    let sim = simulate_inbound(&cfg(), "+16505551234", "Kerry", "Grüße 👋", "wamid.SIM1");
    assert_eq!(sim.path, "/webhooks/wa-main");
    assert_eq!(sim.content_type, "application/json");
    let body = String::from_utf8(sim.body.clone()).unwrap();
    assert!(body.is_ascii(), "Meta escapes non-ASCII: {body}");
    assert!(body.contains("Gr\\u00fc\\u00dfe \\ud83d\\udc4b"), "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "whatsapp_business_account");
    let value = &v["entry"][0]["changes"][0]["value"];
    assert_eq!(v["entry"][0]["changes"][0]["field"], "messages");
    assert_eq!(value["metadata"]["phone_number_id"], PNID);
    assert_eq!(value["contacts"][0]["wa_id"], "16505551234");
    assert_eq!(value["messages"][0]["from"], "16505551234");
    let items = through_the_adapter(&sim);
    let [Inbound::Message(m)] = &items[..] else {
        panic!("{items:?}")
    };
    assert!(m.sent_at.timestamp() >= before);
    assert_eq!(
        m,
        &InboundMessage {
            provider_id: "wamid.SIM1".into(),
            from: "16505551234".into(),
            contact_name: Some("Kerry".into()),
            text: "Grüße 👋".into(),
            sent_at: m.sent_at,
            ..InboundMessage::default()
        }
    );
}

#[test]
fn a_simulated_username_user_has_no_phone_number() {
    let sim = simulate_inbound(&cfg(), KERRY_BSUID, "", "hi", "wamid.SIM2");
    let v: serde_json::Value = serde_json::from_slice(&sim.body).unwrap();
    let value = &v["entry"][0]["changes"][0]["value"];
    assert!(value["messages"][0].get("from").is_none());
    assert_eq!(value["messages"][0]["from_user_id"], KERRY_BSUID);
    assert_eq!(value["contacts"][0]["user_id"], KERRY_BSUID);
    let items = through_the_adapter(&sim);
    assert!(
        matches!(&items[..], [Inbound::Message(m)] if m.from == KERRY_BSUID && m.contact_name.is_none())
    );
}

#[test]
fn simulated_statuses_are_verified_and_normalized() {
    for (name, expected, error) in [
        ("sent", DeliveryStatus::Sent, None),
        ("delivered", DeliveryStatus::Delivered, None),
        ("read", DeliveryStatus::Read, None),
        (
            "failed",
            DeliveryStatus::Failed,
            Some("131026: Message undeliverable: Message Undeliverable."),
        ),
    ] {
        let sim = simulate_status(&cfg(), "wamid.OUT", name, "16505551234");
        assert_eq!(
            through_the_adapter(&sim),
            vec![status("wamid.OUT", expected, error)],
            "{name}"
        );
    }
}

#[test]
fn a_simulated_fixture_is_sent_byte_for_byte() {
    let sim = simulate_payload(&cfg(), fixture("batch"));
    assert_eq!(sim.body, fixture("batch").trim_ascii_end());
    assert_eq!(through_the_adapter(&sim).len(), 6);
}

// ----- fuzz -------------------------------------------------------------

/// Keys and values of WhatsApp webhooks, so generated JSON reaches deep
/// into the normalizer instead of stopping at the envelope.
const KEYS: &[&str] = &[
    "object",
    "entry",
    "changes",
    "field",
    "value",
    "metadata",
    "phone_number_id",
    "messages",
    "statuses",
    "contacts",
    "errors",
    "from",
    "from_user_id",
    "id",
    "type",
    "text",
    "body",
    "timestamp",
    "context",
    "reaction",
    "emoji",
    "message_id",
    "image",
    "audio",
    "voice",
    "video",
    "document",
    "sticker",
    "location",
    "latitude",
    "longitude",
    "name",
    "address",
    "interactive",
    "button_reply",
    "list_reply",
    "nfm_reply",
    "title",
    "button",
    "code",
    "error_data",
    "details",
    "status",
    "wa_id",
    "user_id",
    "profile",
    "group_id",
    "caption",
    "mime_type",
    "filename",
    "phones",
    "phone",
    "emails",
    "email",
    "formatted_name",
    "first_name",
    "system",
    "response_json",
    "message",
];
const WORDS: &[&str] = &[
    "whatsapp_business_account",
    "messages",
    PNID,
    "text",
    "image",
    "audio",
    "voice",
    "sticker",
    "document",
    "location",
    "contacts",
    "interactive",
    "button_reply",
    "list_reply",
    "nfm_reply",
    "button",
    "reaction",
    "system",
    "unsupported",
    "sent",
    "delivered",
    "read",
    "failed",
    "",
    " ",
    "16505551234",
    "US.1",
    "+1",
    "1767225600",
    "-1",
    "99999999999999999999",
    "é",
    "👍",
    "\u{0}",
];

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(WORDS).prop_map(|w| json!(w)),
        ".{0,12}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                serde_json::Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// How many nodes `v` has (itself included).
fn nodes(v: &serde_json::Value) -> usize {
    1 + match v {
        serde_json::Value::Array(a) => a.iter().map(nodes).sum(),
        serde_json::Value::Object(o) => o.values().map(nodes).sum(),
        _ => 0,
    }
}

/// One change to a webhook's JSON.
#[derive(Debug, Clone)]
enum Edit {
    Set(serde_json::Value),
    Remove,
    /// Adds a key to an object (or sets the node when it is not one).
    Insert(&'static str, serde_json::Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => json_value().prop_map(Edit::Set),
        1 => Just(Edit::Remove),
        3 => (prop::sample::select(KEYS), json_value()).prop_map(|(k, v)| Edit::Insert(k, v)),
    ]
}

/// Applies `edit` at the `target`-th node of `v` (pre-order); a removal
/// takes the node out of its object or array. Answers whether it did.
fn apply(v: &mut serde_json::Value, target: &mut usize, edit: &Edit) -> bool {
    if *target == 0 {
        match (edit, &mut *v) {
            (Edit::Insert(k, x), serde_json::Value::Object(fields)) => {
                fields.insert(k.to_string(), x.clone());
            }
            (Edit::Set(x) | Edit::Insert(_, x), _) => *v = x.clone(),
            (Edit::Remove, _) => *v = serde_json::Value::Null,
        }
        return true;
    }
    *target -= 1;
    let remove = matches!(edit, Edit::Remove);
    match v {
        serde_json::Value::Array(items) => {
            for i in 0..items.len() {
                if *target == 0 && remove {
                    items.remove(i);
                    return true;
                }
                if apply(&mut items[i], target, edit) {
                    return true;
                }
            }
        }
        serde_json::Value::Object(fields) => {
            let keys: Vec<String> = fields.keys().cloned().collect();
            for k in keys {
                if *target == 0 && remove {
                    fields.remove(&k);
                    return true;
                }
                if apply(fields.get_mut(&k).unwrap(), target, edit) {
                    return true;
                }
            }
        }
        _ => {}
    }
    false
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// If this fails, a webhook body can crash the gateway's intake.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let _ = normalize_bytes(&bytes);
    }

    #[test]
    fn arbitrary_json_ish_strings_never_panic(s in r#"[\[\]{}:,"0-9a-z_ .\\-]{0,300}"#) {
        let _ = normalize_bytes(s.as_bytes());
    }

    #[test]
    fn arbitrary_json_inside_a_real_envelope_never_panics(
        messages in prop::collection::vec(json_value(), 0..4),
        statuses in prop::collection::vec(json_value(), 0..3),
        contacts in json_value(),
    ) {
        let body = webhook(json!({"messages": messages, "statuses": statuses, "contacts": contacts}));
        let _ = normalize_bytes(&body);
    }

    /// Real webhooks with values swapped for arbitrary JSON or taken out:
    /// near-valid bodies reach every branch of the normalizer.
    #[test]
    fn fixtures_with_arbitrary_json_swapped_in_never_panic(
        which in 0..FIXTURES.len(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), edit()), 1..6),
    ) {
        let mut v: serde_json::Value = serde_json::from_slice(fixture(FIXTURES[which])).unwrap();
        for (at, e) in &edits {
            let mut target = at.index(nodes(&v));
            apply(&mut v, &mut target, e);
        }
        let _ = normalize_bytes(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn mutated_fixtures_never_panic(
        which in 0..FIXTURES.len(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut body = fixture(FIXTURES[which]).to_vec();
        for (at, byte) in edits {
            let i = at.index(body.len());
            body[i] = byte;
        }
        let _ = normalize_bytes(&body);
    }
}
