//! Bad input, operations routes, lists, live events and event sinks.

mod common;

use common::*;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A webhook for a channel that does not exist is 404 unknown_channel.
#[tokio::test]
async fn unknown_channel_is_404() {
    let app = TestApp::start(Backend::Embedded).await;
    let r = app
        .http
        .post(format!("{}/webhooks/nope", app.url))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "unknown_channel");
    assert_eq!(v["status"], 404);
    assert!(v["title"].is_string() && v["detail"].is_string() && v["type"].is_string());
}

/// A configured channel has a webhook route of its own (matched without a
/// regex); the route with a parameter takes every other path under
/// `/webhooks/`, and both answer a method they do not take alike.
#[tokio::test]
async fn a_channels_own_route_and_the_route_with_a_parameter_answer_alike() {
    let app = TestApp::start(Backend::Embedded).await;
    let id = app.sms_channel().id.clone();
    assert_eq!(id, "sms-main");
    // A method the webhook routes do not take: 405 on both.
    for p in ["/webhooks/sms-main", "/webhooks/nope"] {
        let r = app
            .http
            .put(format!("{}{p}", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 405, "{p}");
    }
    let req = switchboard::adapters::sms::simulate_inbound(
        &app.sms_channel(),
        &app.url,
        "+14158675309",
        "hello",
        "SMown",
    );
    // Through its own route, the same webhook is taken.
    let (s, _) = app.post_simulated(req).await;
    assert_eq!(s, 200);
}

/// A body over `server.max_webhook_bytes` is refused before it is read in full.
#[tokio::test]
async fn an_oversize_webhook_is_413_and_stores_nothing() {
    let app =
        TestApp::start_with(Backend::Embedded, "", |s| s.server.max_webhook_bytes = 1024).await;
    let req = switchboard::adapters::sms::simulate_inbound(
        &app.sms_channel(),
        &app.url,
        "+14158675309",
        &"x".repeat(2000),
        "SMbig",
    );
    let (s, body) = app.post_simulated(req).await;
    assert_eq!(s, 413);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["code"],
        "payload_too_large"
    );
    assert!(app.events().await.is_empty());
}

/// A body under the limit that arrives in many pieces is read whole: the
/// server hands a large body over in chunks, and only a one-chunk body is
/// kept without a copy.
#[tokio::test]
async fn a_large_webhook_in_many_chunks_is_read_whole() {
    let app = TestApp::start(Backend::Embedded).await;
    // Each piece differs, so a chunk lost, repeated or reordered shows.
    let text: String = (0..40_000)
        .map(|n| format!("{:05} ", n % 100_000))
        .collect();
    assert!(text.len() > 200_000);
    let req = switchboard::adapters::sms::simulate_inbound(
        &app.sms_channel(),
        &app.url,
        "+14158675309",
        &text,
        "SMlarge",
    );
    let (s, body) = app.post_simulated(req).await;
    assert_eq!(s, 200, "{body}");
    let i = app.interaction(app.only_case().await).await;
    assert_eq!(i["messages"][0]["text"].as_str(), Some(text.as_str()));
}

/// Bodies that are not a Twilio form are refused with a clear error and store nothing.
#[tokio::test]
async fn malformed_and_non_utf8_bodies_are_refused() {
    let app = TestApp::start(Backend::Embedded).await;
    // Correctly signed, but not a Twilio form: 400 malformed_payload, exactly.
    for body in [
        b"\xff\xfe\x00garbage".to_vec(),
        b"MessageSid=SM1&Body=%ff%fe".to_vec(),
        b"Body=no+sid".to_vec(),
    ] {
        let req = switchboard::adapters::sms::simulate_form(&app.sms_channel(), &app.url, &body);
        let (status, text) = app.post_simulated(req).await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (status, v["code"].as_str()),
            (400, Some("malformed_payload")),
            "{text}"
        );
        assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    // Unsigned garbage is refused at the signature, before it is read.
    let r = app
        .http
        .post(format!("{}/webhooks/sms-main", app.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", "AAAA")
        .body(b"\xff\xfe".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        "invalid_signature"
    );
    let r = app
        .http
        .post(format!("{}/webhooks/sms-main", app.url))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        401,
        "an unsigned JSON body fails the signature first"
    );
    assert!(app.events().await.is_empty());
    // The process is still up.
    assert_eq!(
        app.http
            .get(format!("{}/healthz", app.url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
}

/// A signed SMS from a number libphonenumber's metadata does not know (the
/// unallocated 555 area code) is kept under its E.164 form, not refused and
/// lost; a sender that is no phone number at all is 400 and stores nothing.
#[tokio::test]
async fn a_sender_unknown_to_the_metadata_is_kept_and_a_non_number_refused() {
    let app = TestApp::start(Backend::Embedded).await;
    let (status, text) = app.sms_from("hello", "hi", "SMnotanumber").await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("malformed_payload")),
        "{text}"
    );
    assert!(
        v["detail"].as_str().is_some_and(|d| d.contains("hello")),
        "{text}"
    );
    assert!(app.events().await.is_empty(), "nothing stored");

    let (status, _) = app.sms_from("+1 555 123 4567", "hi", "SMnewrange").await;
    assert_eq!(status, 200);
    let i = app.interaction(app.only_case().await).await;
    assert_eq!(i["digital_id"], "+15551234567");
    assert_eq!(i["messages"][0]["text"], "hi");
}

/// Agent JSON bodies that do not parse are 400 malformed_payload.
#[tokio::test]
async fn malformed_agent_json_is_400() {
    let app = TestApp::start(Backend::Embedded).await;
    app.sms_from("+14158675309", "hi", "SMj").await;
    let case = app.only_case().await;
    let r = app
        .http
        .post(format!("{}/api/v1/interactions/{case}/transfer", app.url))
        .bearer_auth(ANNE)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        "malformed_payload"
    );
    let (s, v) = app
        .send(
            "PATCH",
            ANNE,
            &format!("/api/v1/interactions/{case}"),
            json!({"priority": "high"}),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str(), v["field"].as_str()),
        (422, Some("validation_failed"), Some("priority"))
    );
}

/// Operators can probe health, readiness, metrics and the API description.
#[tokio::test]
async fn operations_routes_answer() {
    let app = TestApp::start(Backend::Embedded).await;
    let r = app
        .http
        .get(format!("{}/healthz", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r: Value = app
        .http
        .get(format!("{}/readyz", app.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["channels"]["sms-main"], "ok");
    app.sms_from("+14158675309", "hi", "SMmetrics").await;
    let m = app.metrics().await;
    assert!(
        m.contains(r#"switchboard_webhooks_received_total{kind="sms"} 1"#),
        "{m}"
    );
    assert!(m.contains("switchboard_outbox_depth 0"), "{m}");
    // The process's memory, which the embedded store's history grows.
    let rss: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .unwrap_or_else(|| panic!("no process_resident_memory_bytes in {m}"))
        .parse()
        .unwrap();
    assert!(rss > 1e6, "{rss}");
    let doc: Value = app
        .http
        .get(format!("{}/openapi.json", app.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/api/v1/interactions/{case_number}/replies"]["post"].is_object());
}

/// Every documented route is really served (the OpenAPI document cannot drift from the router).
#[tokio::test]
async fn every_documented_route_is_served() {
    let app = TestApp::start(Backend::Embedded).await;
    for r in switchboard::http::ROUTES {
        let p = r
            .path
            .replace("{channel_id}", "sms-main")
            .replace("{case_number}", "1")
            .replace("{contact_id}", "x")
            .replace("{token}", "x")
            .replace("{id}", "x");
        if p == "/api/v1/events" {
            continue; // a stream; covered by its own test
        }
        let resp = app
            .http
            .request(
                r.method.to_uppercase().parse().unwrap(),
                format!("{}{p}", app.url),
            )
            .bearer_auth(ROUTER)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        // Unrouted requests get the default service's problem, whose detail starts "no route".
        let unrouted = status == 404
            && body["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("no route"));
        assert!(!unrouted, "{} {} is not routed", r.method, r.path);
    }
}

/// The SMS preview matches Twilio's segment calculator.
#[tokio::test]
async fn sms_preview_counts_segments() {
    let app = TestApp::start(Backend::Embedded).await;
    let (s, v) = app
        .post(
            ANNE,
            "/api/v1/sms/preview",
            json!({"text": "😜".to_string() + &"2345678901".repeat(7)[..69]}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["encoding"], "UCS-2");
    assert_eq!(v["segments"], 2);
}

/// Paging a list while it changes: a cursor names where the last page
/// ended, so an interaction that moves to the top meanwhile (a new
/// message) neither pushes an unseen one off the next page nor shows a
/// seen one again. A cursor that is not one, or belongs to another sort,
/// is refused.
#[tokio::test]
async fn a_list_pages_by_cursor_while_interactions_move() {
    let app = TestApp::start(Backend::Embedded).await;
    let senders = [
        "+14158675311",
        "+14158675312",
        "+14158675313",
        "+14158675314",
    ];
    for (n, from) in senders.iter().enumerate() {
        app.sms_from(from, "hi", &format!("SMpage{n}")).await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let cases = |v: &Value| -> Vec<u64> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["case_number"].as_u64().unwrap())
            .collect()
    };
    let (_, all) = app.get(ANNE, "/api/v1/interactions").await;
    let all = cases(&all);
    assert_eq!(all.len(), 4);
    let (s, first) = app.get(ANNE, "/api/v1/interactions?limit=2").await;
    assert_eq!(s, 200);
    assert_eq!(cases(&first), all[..2]);
    // The newest one on the first page writes again: it stays on top; then
    // the oldest writes and moves to the top, ahead of the page already read.
    app.sms_from(senders[3], "again", "SMpage-again-3").await;
    app.sms_from(senders[0], "again", "SMpage-again-0").await;
    let cursor = first["next_cursor"].as_str().unwrap().to_string();
    let (s, second) = app
        .get(
            ANNE,
            &format!("/api/v1/interactions?limit=2&cursor={cursor}"),
        )
        .await;
    assert_eq!(s, 200);
    // Only the one not yet shown is left after the first page: an offset
    // would have shown the second page's first item twice (all[1]) instead.
    assert_eq!(cases(&second), vec![all[2]]);
    assert_eq!(second["next_cursor"], Value::Null);

    for bad in ["x", "r.1.2", "r.a.b.c", "r.1.2.3.4"] {
        let (s, v) = app
            .get(ANNE, &format!("/api/v1/interactions?cursor={bad}"))
            .await;
        assert_eq!(s, 422, "{bad}: {v}");
        assert_eq!(v["code"], "validation_failed", "{bad}");
        assert_eq!(v["field"], "cursor", "{bad}: {v}");
    }
    // A received-order cursor given to a priority sort.
    let (s, v) = app
        .get(
            ANNE,
            &format!("/api/v1/interactions?sort=priority&cursor={cursor}"),
        )
        .await;
    assert_eq!(s, 422, "{v}");
}

/// Sorting and filtering of the agent's list (PRODUCT rule 9).
#[tokio::test]
async fn lists_sort_and_filter() {
    let app = TestApp::start(Backend::Embedded).await;
    for (n, from) in ["+14158675301", "+14158675302", "+14158675303"]
        .iter()
        .enumerate()
    {
        app.sms_from(from, "hi", &format!("SMl{n}")).await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let (_, v) = app.get(ANNE, "/api/v1/interactions").await;
    let cases: Vec<u64> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["case_number"].as_u64().unwrap())
        .collect();
    assert_eq!(cases.len(), 3);
    assert!(
        cases[0] > cases[1] && cases[1] > cases[2],
        "newest first: {cases:?}"
    );
    let oldest = cases[2];
    let middle = cases[1];
    let (s, _) = app
        .send(
            "PATCH",
            ANNE,
            &format!("/api/v1/interactions/{oldest}"),
            json!({"priority": 5, "tags": ["billing", "vip"]}),
        )
        .await;
    assert_eq!(s, 200);
    app.send(
        "PATCH",
        ANNE,
        &format!("/api/v1/interactions/{middle}"),
        json!({"tags": ["refund"]}),
    )
    .await;
    let (_, v) = app.get(ANNE, "/api/v1/interactions?sort=priority").await;
    assert_eq!(v["items"][0]["case_number"], oldest);
    let (_, v) = app
        .get(ANNE, "/api/v1/interactions?tag=billing&tag=refund")
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    let (_, v) = app.get(ANNE, "/api/v1/tags").await;
    assert_eq!(v["items"], json!(["billing", "refund", "vip"]));
    let (_, v) = app.get(ANNE, "/api/v1/interactions?limit=2").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    let cursor = v["next_cursor"].as_str().unwrap().to_string();
    let (_, v) = app
        .get(
            ANNE,
            &format!("/api/v1/interactions?limit=2&cursor={cursor}"),
        )
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(v["next_cursor"], Value::Null);
    app.post(
        BOB,
        &format!("/api/v1/interactions/{oldest}/assign"),
        json!({}),
    )
    .await;
    let (_, v) = app.get(ANNE, "/api/v1/interactions").await;
    assert_eq!(
        v["items"].as_array().unwrap().len(),
        2,
        "another agent's interaction leaves anne's queue view"
    );
    let (_, v) = app.get(BOB, "/api/v1/interactions?view=mine").await;
    assert_eq!(v["items"][0]["case_number"], oldest);
    let (s, v) = app.get(ANNE, "/api/v1/interactions?sort=size").await;
    assert_eq!((s, v["field"].as_str()), (422, Some("sort")));
}

/// Agents get live updates over Server-Sent Events, with `id:` and `event:` lines.
#[tokio::test]
async fn server_sent_events_stream_changes() {
    use futures_util::StreamExt;
    let app = TestApp::start(Backend::Embedded).await;
    let resp = app
        .http
        .get(format!("{}/api/v1/events", app.url))
        .bearer_auth(BOB)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with(": connected"));
    app.sms_from("+14158675309", "live!", "SMsse").await;
    let mut text = String::new();
    while !text.contains("event: message.received") {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("event: interaction.created"));
    assert!(text.contains("id: "));
    assert!(text.contains("\"text\":\"live!\""));
}

/// Signing in with a token sets an HttpOnly SameSite=Strict cookie the API accepts.
#[tokio::test]
async fn the_session_cookie_authenticates() {
    let app = TestApp::start(Backend::Embedded).await;
    let r = app
        .http
        .post(format!("{}/agent/session", app.url))
        .json(&json!({"token": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = app
        .http
        .post(format!("{}/agent/session", app.url))
        .json(&json!({"token": ANNE}))
        .send()
        .await
        .unwrap();
    let cookie = r
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let me: Value = app
        .http
        .get(format!("{}/api/v1/me", app.url))
        .header("cookie", pair)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["id"], "anne");
    assert_eq!(me["name"], "Anne Shirley");
}

/// Event sinks get every event signed with Standard Webhooks, and are retried with the same webhook-id.
#[tokio::test]
async fn event_sinks_receive_signed_events_and_are_retried() {
    let sink = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&sink)
        .await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&sink)
        .await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let extra = format!(
        "[[event_sinks]]\nurl = \"{}/hook\"\nsecret = \"{secret}\"\n",
        sink.uri()
    );
    let app = TestApp::start_with(Backend::Embedded, &extra, |_| {}).await;
    app.sms_from("+14158675309", "hi", "SMsink").await;
    let mut received = vec![];
    for _ in 0..100 {
        received = sink.received_requests().await.unwrap();
        if received.len() >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        received.len() >= 3,
        "one failure, then both events: {}",
        received.len()
    );
    let id = |r: &wiremock::Request| {
        r.headers
            .get("webhook-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        id(&received[0]),
        id(&received[1]),
        "a retry keeps its webhook-id"
    );
    let key = switchboard::routing::sink_key(secret).unwrap();
    for r in &received {
        let ts: i64 = r
            .headers
            .get("webhook-timestamp")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let expected = switchboard::routing::sign(&key, &id(r), ts, &r.body);
        assert_eq!(
            r.headers
                .get("webhook-signature")
                .unwrap()
                .to_str()
                .unwrap(),
            expected
        );
        let e: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(e["id"].as_str().unwrap(), id(r));
    }
    let types: Vec<String> = received[1..]
        .iter()
        .map(|r| {
            serde_json::from_slice::<Value>(&r.body).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        types[..2],
        [
            "interaction.created".to_string(),
            "message.received".to_string()
        ]
    );
}

/// The assigned agent's typing indicator reaches the live feeds; others may not send it.
#[tokio::test]
async fn agent_typing_is_an_event_for_the_assigned_agent_only() {
    let app = TestApp::start(Backend::Embedded).await;
    app.sms_from("+14158675309", "hi", "SMty").await;
    let case = app.only_case().await;
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/typing"),
            json!({"state": "on"}),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("not_assigned")));
    app.post(
        ANNE,
        &format!("/api/v1/interactions/{case}/assign"),
        json!({}),
    )
    .await;
    let (s, _) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/typing"),
            json!({"state": "on"}),
        )
        .await;
    assert_eq!(s, 204);
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/typing"),
            json!({"state": "maybe"}),
        )
        .await;
    assert_eq!((s, v["field"].as_str()), (422, Some("state")));
    let typing: Vec<Value> = app
        .events()
        .await
        .into_iter()
        .filter(|e| e["type"] == "interaction.typing")
        .collect();
    assert_eq!(typing.len(), 1);
    assert_eq!(typing[0]["data"]["who"], "agent");
    assert_eq!(typing[0]["data"]["state"], "on");
}
