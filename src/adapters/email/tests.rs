//! The email normalizer against the fixtures of `fixtures/email/`.

use super::parse::{self, Automatic, MAX_ATTACHMENT_BYTES};
use super::*;
use crate::adapters::RawRequest;
use proptest::prelude::*;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/fixtures/email/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn parsed(name: &str) -> parse::ParsedEmail {
    parse::parse(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

const SECRET: &str = "whsec_c2VjcmV0LWtleS1vZi10aGUtdGVzdHM=";

fn channel() -> EmailChannel {
    let cfg: ChannelConfig = toml::from_str(&format!(
        "id = \"mail\"\nkind = \"email\"\nqueue = \"support\"\naddress = \"Support@Shop.example\"\ninbound_secret = \"{SECRET}\"\n"
    ))
    .unwrap();
    EmailChannel::new(&cfg).unwrap()
}

#[test]
fn sanitized_html_drops_the_documents_head_and_title() {
    let html = "<html><head><title>pwned</title><style>b{}</style></head>\
                <body><b>Hello</b><script>alert(1)</script></body></html>";
    let clean = parse::sanitize_html(html);
    assert_eq!(clean, "<b>Hello</b>");
}

#[test]
fn utf8_subject_name_and_body() {
    let p = parsed("utf8_plain.eml");
    assert_eq!(p.from_address, "renee@example.com");
    assert_eq!(p.from_name.as_deref(), Some("Renée Dupré"));
    assert_eq!(p.subject, "Commande – où est mon colis ? 📦");
    assert_eq!(p.text, "Bonjour, où est ma commande ? 📦\nMerci");
    assert_eq!(p.message_id, "utf8-1@mail.example.com");
    assert!(p.has_message_id);
    assert_eq!(p.date.unwrap().to_rfc3339(), "2026-11-24T09:00:00+00:00");
    assert_eq!(p.automatic, Automatic::No);
}

#[test]
fn latin1_quoted_printable() {
    let p = parsed("latin1.eml");
    assert_eq!(p.subject, "Señor pedido");
    assert_eq!(p.text, "El niño quiere café.");
}

#[test]
fn windows_1252_smart_quotes_and_euro() {
    let p = parsed("windows1252.eml");
    assert_eq!(p.text, "\u{201c}Smart quotes\u{201d} cost € 5 – ok");
}

#[test]
fn shift_jis_body_and_encoded_words() {
    let p = parsed("shift_jis.eml");
    assert_eq!(p.from_name.as_deref(), Some("山田太郎"));
    assert_eq!(p.subject, "注文");
    assert_eq!(p.text, "注文はどこですか");
}

#[test]
fn iso_2022_jp_body_and_encoded_words() {
    let p = parsed("iso2022jp.eml");
    assert_eq!(p.from_name.as_deref(), Some("鈴木"));
    assert_eq!(p.subject, "お問い合わせ");
    assert_eq!(p.text, "注文はどこですか");
}

#[test]
fn html_is_sanitized_inline_image_and_rfc2231_filename() {
    let p = parsed("html_inline_attachments.eml");
    let html = p.html.as_deref().unwrap();
    assert!(
        !html.contains("script") && !html.contains("alert"),
        "{html}"
    );
    assert!(!html.contains("onclick"), "{html}");
    assert!(!html.contains("javascript:"), "{html}");
    assert!(html.contains("cid:img1@example.com"), "{html}");
    assert!(html.contains("<b>broken</b>"), "{html}");
    // No text/plain part: the text is the HTML's.
    assert_eq!(p.text, "The box is broken & wet.\nx\nAnn");
    assert_eq!(p.attachments.len(), 2);
    let img = &p.attachments[0];
    assert_eq!(img.content_type, "image/png");
    assert_eq!(img.content_id.as_deref(), Some("img1@example.com"));
    assert!(img.inline);
    assert_eq!(&img.data[..4], b"\x89PNG");
    let pdf = &p.attachments[1];
    assert_eq!(pdf.filename.as_deref(), Some("Rechnung für März.pdf"));
    assert!(!pdf.inline);
    assert_eq!(pdf.data, b"%PDF-1.4\n%fake\n");
}

#[test]
fn html_only_becomes_text_with_lines() {
    let p = parsed("html_only.eml");
    assert_eq!(p.text, "Line one\nLine <two> & more\nPara");
}

#[test]
fn oversize_attachment_is_recorded_as_omitted() {
    use base64::Engine;
    let big = base64::engine::general_purpose::STANDARD.encode(vec![7u8; MAX_ATTACHMENT_BYTES + 1]);
    let raw = format!(
        "From: big@example.com\r\nSubject: huge\r\nMessage-ID: <big@example.com>\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n--B\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"huge.bin\"\r\n\r\n{big}\r\n--B\r\nContent-Type: text/csv\r\nContent-Disposition: attachment; filename=small.csv\r\n\r\na,b\r\n--B--\r\n"
    );
    let p = parse::parse(raw.as_bytes()).unwrap();
    assert_eq!(p.omitted.len(), 1);
    assert_eq!(p.omitted[0].filename.as_deref(), Some("huge.bin"));
    assert_eq!(p.omitted[0].size, MAX_ATTACHMENT_BYTES + 1);
    assert_eq!(p.attachments.len(), 1);
    assert_eq!(p.attachments[0].filename.as_deref(), Some("small.csv"));
    let items = channel().to_inbound(&p);
    let Inbound::Message(m) = &items[0] else {
        panic!("{items:?}")
    };
    assert!(
        m.text
            .contains("[attachment omitted: huge.bin (application/octet-stream, 10485761 bytes"),
        "{}",
        m.text
    );
}

#[test]
fn reply_threads_by_in_reply_to_then_references_then_token() {
    let ch = channel();
    let p = parsed("reply_in_reply_to.eml");
    assert_eq!(p.in_reply_to, vec!["abc123@shop.example"]);
    assert_eq!(
        p.references,
        vec!["utf8-1@mail.example.com", "abc123@shop.example"]
    );
    let Inbound::Message(m) = &ch.to_inbound(&p)[0] else {
        panic!()
    };
    assert_eq!(
        m.thread_refs,
        vec!["abc123@shop.example", "utf8-1@mail.example.com"]
    );
    assert!(!m.new_thread);
    assert_eq!(m.subject.as_deref(), Some("Re: Commande"));
    assert_eq!(m.provider_id, "reply-1@mail.example.com");
    assert_eq!(m.reply_to.as_deref(), Some("abc123@shop.example"));
}

#[test]
fn outlook_reply_threads_by_references_only() {
    let p = parsed("outlook_references_only.eml");
    assert!(p.in_reply_to.is_empty());
    let Inbound::Message(m) = &channel().to_inbound(&p)[0] else {
        panic!()
    };
    assert_eq!(
        m.thread_refs,
        vec!["abc123@shop.example", "utf8-1@mail.example.com"]
    );
    assert!(!m.new_thread);
}

#[test]
fn reply_token_alone_threads() {
    let raw = b"From: x@example.com\r\nTo: Support <support+r-tok42@shop.example>\r\nSubject: new subject\r\nMessage-ID: <t@example.com>\r\n\r\nhi\r\n";
    let ch = channel();
    let Inbound::Message(m) = &ch.to_inbound(&parse::parse(raw).unwrap())[0] else {
        panic!()
    };
    assert_eq!(m.thread_refs, vec!["tok42@shop.example"]);
    assert_eq!(ch.reply_to_for("tok42"), "support+r-tok42@shop.example");
    assert_eq!(ch.message_id_for("tok42"), "tok42@shop.example");
    assert_eq!(ch.token_in("support+r-tok42@other.example"), None);
    assert_eq!(ch.token_in("someone+r-tok42@shop.example"), None);
}

#[test]
fn new_thread_without_headers() {
    let Inbound::Message(m) = &channel().to_inbound(&parsed("utf8_plain.eml"))[0] else {
        panic!()
    };
    assert!(m.new_thread);
    assert!(m.thread_refs.is_empty());
    assert!(!m.automatic);
}

#[test]
fn missing_message_id_dedupes_by_content_hash() {
    let raw = fixture("no_message_id.eml");
    let p = parse::parse(&raw).unwrap();
    assert!(!p.has_message_id);
    assert_eq!(p.message_id, parse::content_hash(&raw));
    assert!(p.message_id.starts_with("sha256:"));
    assert_eq!(parse::parse(&raw).unwrap().message_id, p.message_id);
}

#[test]
fn auto_reply_is_flagged() {
    let p = parsed("auto_reply.eml");
    assert_eq!(p.automatic, Automatic::AutoReply);
    let Inbound::Message(m) = &channel().to_inbound(&p)[0] else {
        panic!()
    };
    assert!(m.automatic);
    assert_eq!(m.kind.as_deref(), Some("auto_reply"));
}

#[test]
fn bounce_marks_the_original_failed() {
    let p = parsed("bounce.eml");
    assert_eq!(
        p.automatic,
        Automatic::Bounce {
            original: Some("abc123@shop.example".into()),
            permanent: true
        }
    );
    let items = channel().to_inbound(&p);
    assert_eq!(items.len(), 1);
    let Inbound::Status(s) = &items[0] else {
        panic!("{items:?}")
    };
    assert_eq!(s.provider_id, "abc123@shop.example");
    assert_eq!(s.status, DeliveryStatus::Failed);
    assert!(s
        .error
        .as_deref()
        .unwrap()
        .contains("could not be delivered"));
}

#[test]
fn no_sender_is_refused() {
    assert_eq!(
        parse::parse(&fixture("no_sender.eml")),
        Err(parse::ParseError::NoSender)
    );
}

#[test]
fn reply_subject_does_not_stack() {
    assert_eq!(parse::reply_subject("Commande"), "Re: Commande");
    assert_eq!(parse::reply_subject("RE: Commande"), "RE: Commande");
    assert_eq!(parse::reply_subject(""), "Re:");
}

fn request<'a>(headers: &'a [(String, String)], body: &'a [u8]) -> RawRequest<'a> {
    RawRequest {
        path: "/webhooks/mail",
        query: "",
        headers: headers.into(),
        content_type: "message/rfc822",
        body,
    }
}

#[test]
fn standard_webhooks_signature_and_window() {
    let ch = channel();
    let raw = fixture("utf8_plain.eml");
    let now = Utc::now().timestamp();
    let sim = simulate_raw("mail", SECRET, &raw, now).unwrap();
    let req = request(&sim.headers, &sim.body);
    let v = ch.verify(&req).expect("a fresh signature verifies");
    let items = ch.normalize(&v).unwrap();
    assert!(matches!(&items[0], Inbound::Message(m) if m.from == "renee@example.com"));

    // Tampered body.
    let mut other = raw.clone();
    other.push(b'x');
    assert!(matches!(
        ch.verify(&request(&sim.headers, &other)),
        Err(IntakeError::InvalidSignature(_))
    ));
    // Six minutes old, correctly signed.
    let old = simulate_raw("mail", SECRET, &raw, now - 360).unwrap();
    let err = ch.verify(&request(&old.headers, &old.body)).unwrap_err();
    assert!(err.to_string().contains("5 minutes"), "{err}");
    // Four minutes old passes; several signatures, one right.
    let recent = simulate_raw("mail", SECRET, &raw, now - 240).unwrap();
    let mut headers = recent.headers.clone();
    for h in headers.iter_mut() {
        if h.0 == "webhook-signature" {
            h.1 = format!("v1,AAAA {}", h.1);
        }
    }
    assert!(ch.verify(&request(&headers, &recent.body)).is_ok());
    // Another secret.
    let forged = simulate_raw("mail", "whsec_b3RoZXI=", &raw, now).unwrap();
    assert!(ch.verify(&request(&forged.headers, &forged.body)).is_err());
    // No headers at all.
    assert!(ch.verify(&request(&[], &raw)).is_err());
}

#[test]
fn without_inbound_secret_http_mail_is_refused() {
    let cfg: ChannelConfig = toml::from_str(
        "id = \"mail\"\nkind = \"email\"\nqueue = \"support\"\naddress = \"support@shop.example\"\n",
    )
    .unwrap();
    let ch = EmailChannel::new(&cfg).unwrap();
    let raw = fixture("utf8_plain.eml");
    let sim = simulate_raw("mail", SECRET, &raw, Utc::now().timestamp()).unwrap();
    assert!(ch.verify(&request(&sim.headers, &sim.body)).is_err());
}

#[test]
fn normalize_refuses_other_content_types_and_garbage() {
    let ch = channel();
    let headers: Vec<(String, String)> = vec![];
    let mut req = request(&headers, b"{}");
    req.content_type = "application/json";
    assert!(matches!(
        ch.normalize(&Verified::new(&req)),
        Err(IntakeError::UnsupportedMediaType(_))
    ));
    let req = request(&headers, b"not a mail");
    assert!(matches!(
        ch.normalize(&Verified::new(&req)),
        Err(IntakeError::Malformed(_))
    ));
}

#[test]
fn config_errors_name_the_key() {
    let cfg: ChannelConfig =
        toml::from_str("id = \"mail\"\nkind = \"email\"\nqueue = \"support\"\n").unwrap();
    assert_eq!(
        EmailChannel::new(&cfg).err().unwrap(),
        "channel mail: address: missing (required for email channels)"
    );
}

fn header_text() -> impl Strategy<Value = String> {
    prop::string::string_regex("[ -~\u{a0}-\u{2fff}]{0,40}").unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any bytes: the normalizer never panics, and whatever it accepts
    /// becomes items whose HTML carries no script.
    #[test]
    fn never_panics_on_any_bytes(raw in prop::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(p) = parse::parse(&raw) {
            prop_assert!(!p.message_id.is_empty());
            prop_assert!(p.from_address.contains('@'));
            if let Some(h) = &p.html {
                prop_assert!(!h.to_ascii_lowercase().contains("<script"));
            }
            let _ = channel().to_inbound(&p);
        }
    }

    /// A well-formed message round-trips: sender, subject (RFC 2047 encoded),
    /// body in any charset the message declares, Message-ID and threading.
    #[test]
    fn well_formed_messages_round_trip(
        name in "[A-Za-z][A-Za-z ]{0,20}",
        local in "[a-z][a-z0-9.]{0,10}",
        subject in header_text(),
        body in prop::string::string_regex("[ -~àéü€\u{3041}-\u{3093}\n]{0,200}").unwrap(),
        id in "[a-z0-9]{1,12}",
        parent in prop::option::of("[a-z0-9]{1,12}"),
        html_payload in "[ -~]{0,60}",
    ) {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
        let mut raw = format!(
            "From: {name} <{local}@Example.com>\r\nTo: support@shop.example\r\nSubject: =?UTF-8?B?{}?=\r\nMessage-ID: <{id}@example.com>\r\n",
            b64(&subject)
        );
        if let Some(p) = &parent {
            raw.push_str(&format!("In-Reply-To: <{p}@shop.example>\r\nReferences: <root@example.com> <{p}@shop.example>\r\n"));
        }
        raw.push_str(&format!(
            "MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"=_b\"\r\n\r\n--=_b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n--=_b\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n--=_b--\r\n",
            b64(&body),
            b64(&format!("<p>{html_payload}</p><script>x()</script>")),
        ));
        let p = parse::parse(raw.as_bytes()).unwrap();
        prop_assert_eq!(&p.from_address, &format!("{local}@example.com"));
        prop_assert_eq!(p.from_name.as_deref(), Some(name.trim()).filter(|n| !n.is_empty()));
        prop_assert_eq!(&p.subject, &subject.split_whitespace().collect::<Vec<_>>().join(" "));
        let want = body.replace("\r\n", "\n");
        prop_assert_eq!(p.text.as_str(), want.trim_end());
        prop_assert_eq!(&p.message_id, &format!("{id}@example.com"));
        prop_assert!(!p.html.as_deref().unwrap().contains("<script"));
        let items = channel().to_inbound(&p);
        let Inbound::Message(m) = &items[0] else { panic!() };
        match parent {
            Some(par) => {
                let first = format!("{par}@shop.example");
                prop_assert_eq!(m.thread_refs.first(), Some(&first));
                prop_assert!(!m.new_thread);
            }
            None => prop_assert!(m.new_thread),
        }
    }
}
