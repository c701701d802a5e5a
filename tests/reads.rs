//! What the gateway reads from the store to make a change: a reply adds a
//! message and needs none of the stored ones, so answering a long
//! conversation costs no more than answering a short one. The gateway under
//! test shares the real application's store through a wrapper that counts
//! the reads of whole interactions. Each scenario runs on both stores.

#[macro_use]
mod common;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use common::*;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchboard::domain::{Actor, Contact, DeliveryStatus, Event, Interaction, Refusal};
use switchboard::gateway::{Gateway, GatewayError};
use switchboard::store::{Commit, DynStore, Listed, OutboxJob, Store, StoreResult};
use tokio::sync::broadcast;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

on_both_stores!(
    a_reply_reads_no_stored_message,
    a_reply_to_a_message_reads_the_conversation_to_find_it,
    contact_details_read_no_message,
    event_checks_notes_and_opt_outs_read_no_message,
    a_delivery_status_reads_only_its_message,
    retrying_a_failed_download_reads_only_its_message,
    delivering_a_reply_reads_only_it_and_the_message_it_quotes,
);

/// The real store, counting whole-interaction reads.
struct Counting {
    inner: DynStore,
    whole: AtomicUsize,
}

#[async_trait]
impl Store for Counting {
    async fn commit(&self, commit: Commit) -> StoreResult<Vec<Event>> {
        self.inner.commit(commit).await
    }
    async fn next_case_number(&self) -> StoreResult<u64> {
        self.inner.next_case_number().await
    }
    async fn interaction(&self, case_number: u64) -> StoreResult<Option<Interaction>> {
        self.whole.fetch_add(1, Ordering::SeqCst);
        self.inner.interaction(case_number).await
    }
    async fn interaction_to_append(&self, case_number: u64) -> StoreResult<Option<Interaction>> {
        self.inner.interaction_to_append(case_number).await
    }
    async fn interaction_with_message(
        &self,
        case_number: u64,
        message_id: &str,
    ) -> StoreResult<Option<Interaction>> {
        self.inner
            .interaction_with_message(case_number, message_id)
            .await
    }
    async fn interactions_for(
        &self,
        queues: &[String],
        agent: Option<&str>,
    ) -> StoreResult<Vec<Listed>> {
        self.inner.interactions_for(queues, agent).await
    }
    async fn waiting_for(
        &self,
        queues: &[String],
        agent: Option<&str>,
    ) -> StoreResult<Vec<Listed>> {
        self.inner.waiting_for(queues, agent).await
    }
    async fn tags_for(&self, queues: &[String], agent: Option<&str>) -> StoreResult<Vec<String>> {
        self.inner.tags_for(queues, agent).await
    }
    async fn contact(&self, key: &str) -> StoreResult<Option<Contact>> {
        self.inner.contact(key).await
    }
    async fn contact_by_id(&self, id: &str) -> StoreResult<Option<Contact>> {
        self.inner.contact_by_id(id).await
    }
    async fn lookup(&self, key: &str) -> StoreResult<Option<String>> {
        self.inner.lookup(key).await
    }
    async fn lookup_and_contact(
        &self,
        claim: &str,
        contact_key: &str,
    ) -> StoreResult<(Option<String>, Option<Contact>)> {
        self.inner.lookup_and_contact(claim, contact_key).await
    }
    async fn note(&self, agent: &str, contact_id: &str) -> StoreResult<Option<String>> {
        self.inner.note(agent, contact_id).await
    }
    async fn put_note(&self, agent: &str, contact_id: &str, notes: &str) -> StoreResult<()> {
        self.inner.put_note(agent, contact_id, notes).await
    }
    async fn events_after(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Event>> {
        self.inner.events_after(after, limit).await
    }
    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.subscribe()
    }
    async fn outbox_lease(
        &self,
        now: DateTime<Utc>,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<OutboxJob>> {
        self.inner.outbox_lease(now, lease, limit).await
    }
    async fn outbox_reschedule(&self, job: &OutboxJob) -> StoreResult<()> {
        self.inner.outbox_reschedule(job).await
    }
    async fn outbox_depth(&self) -> StoreResult<u64> {
        self.inner.outbox_depth().await
    }
    async fn put_blob(&self, id: &str, bytes: &[u8]) -> StoreResult<()> {
        self.inner.put_blob(id, bytes).await
    }
    async fn blob(&self, id: &str) -> StoreResult<Option<Vec<u8>>> {
        self.inner.blob(id).await
    }
    async fn kv_get(&self, key: &str) -> StoreResult<Option<String>> {
        self.inner.kv_get(key).await
    }
    async fn kv_set(&self, key: &str, value: &str) -> StoreResult<()> {
        self.inner.kv_set(key, value).await
    }
    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        self.inner.try_lease(name, owner, ttl).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
}

/// A gateway on `app`'s settings, channels and store, the store counted.
fn counted(app: &TestApp) -> (Gateway, Arc<Counting>) {
    let store = Arc::new(Counting {
        inner: app.gateway.store.clone(),
        whole: AtomicUsize::new(0),
    });
    let gateway = Gateway {
        settings: app.gateway.settings.clone(),
        store: store.clone(),
        channels: app.gateway.channels.clone(),
        metrics: switchboard::metrics::Metrics::new(),
        outbox_wake: tokio::sync::Notify::new(),
        media_secret: app.gateway.media_secret.clone(),
    };
    (gateway, store)
}

/// Three customer messages, assigned to Anne: the conversation a reply goes to.
async fn conversation(app: &TestApp) -> u64 {
    for (n, text) in ["one", "two", "three"].iter().enumerate() {
        let (s, _) = app
            .sms_from("+14158675309", text, &format!("SMread{n}"))
            .await;
        assert_eq!(s, 200);
    }
    let case = app.only_case().await;
    let (s, _) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/assign"),
            json!({}),
        )
        .await;
    assert_eq!(s, 200);
    case
}

fn texts(i: &serde_json::Value) -> Vec<&str> {
    i["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect()
}

async fn a_reply_reads_no_stored_message(b: Backend) {
    let app = TestApp::start(b).await;
    let case = conversation(&app).await;
    let (gateway, store) = counted(&app);
    let anne = Actor::Agent("anne".into());
    let (_, msg) = gateway
        .reply(&anne, case, "four", None, &[], None, None)
        .await
        .unwrap();
    assert_eq!(store.whole.load(Ordering::SeqCst), 0);
    // Stored after the conversation, queued for delivery, and resolved.
    let i = app.interaction(case).await;
    assert_eq!(texts(&i), ["one", "two", "three", "four"]);
    assert_eq!(i["messages"][3]["id"], msg.id.as_str());
    assert_eq!(i["messages"][3]["status"], "queued");
    assert_eq!(i["status"], "resolved");
    assert_eq!(app.gateway.store.outbox_depth().await.unwrap(), 1);
    // The rules still hold on the header alone: Bob holds nothing here.
    let bob = Actor::Agent("bob".into());
    let err = gateway
        .reply(&bob, case, "five", None, &[], None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, GatewayError::Refused(Refusal::NotAssigned)),
        "{err}"
    );
    assert_eq!(texts(&app.interaction(case).await).len(), 4);
}

async fn a_reply_to_a_message_reads_the_conversation_to_find_it(b: Backend) {
    let app = TestApp::start(b).await;
    let case = conversation(&app).await;
    let i = app.interaction(case).await;
    let second = i["messages"][1]["id"].as_str().unwrap().to_string();
    let (gateway, store) = counted(&app);
    let anne = Actor::Agent("anne".into());
    let (_, msg) = gateway
        .reply(&anne, case, "about two", None, &[], None, Some(&second))
        .await
        .unwrap();
    assert_eq!(store.whole.load(Ordering::SeqCst), 1);
    assert_eq!(msg.reply_to.as_deref(), Some(second.as_str()));
    let i = app.interaction(case).await;
    assert_eq!(texts(&i), ["one", "two", "three", "about two"]);
    // One that is not in the conversation is refused, and nothing is stored.
    let err = gateway
        .reply(
            &anne,
            case,
            "about nothing",
            None,
            &[],
            None,
            Some("m-none"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, GatewayError::Validation { field, .. } if field == "reply_to"),
        "{err}"
    );
    assert_eq!(texts(&app.interaction(case).await).len(), 4);
}

/// The contact panel shows the contact's interactions without their
/// messages, so it reads none: not the open one's, not the history's.
async fn contact_details_read_no_message(b: Backend) {
    let app = TestApp::start_with(b, "", |s| s.server.new_interaction_after_hours = 0).await;
    let first = conversation(&app).await;
    let (s, _) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{first}/end"),
            json!({"disposition": {"related_case": "CRM-7"}}),
        )
        .await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (s, _) = app.sms_from("+14158675309", "again", "SMread9").await;
    assert_eq!(s, 200);
    let (_, list) = app.get(ANNE, "/api/v1/interactions").await;
    let second = list["items"][0]["case_number"].as_u64().unwrap();
    assert_ne!(second, first);

    let (gateway, store) = counted(&app);
    let anne = Actor::Agent("anne".into());
    let details = gateway.contact_details(&anne, second).await.unwrap();
    assert_eq!(store.whole.load(Ordering::SeqCst), 0);
    assert_eq!(details["case_number"], second);
    assert_eq!(details["digital_id"], "+14158675309");
    let history = details["history"].as_array().unwrap();
    assert_eq!(history.len(), 1, "{details}");
    assert_eq!(history[0]["case_number"], first);
    assert_eq!(history[0]["related_case"], "CRM-7");
    assert!(history[0]["ended_at"].is_string(), "{details}");
    assert!(history[0].get("messages").is_none());
    // Still only what Anne may see.
    let carol = Actor::Agent("carol".into());
    assert!(gateway.contact_details(&carol, second).await.is_err());
}

/// An agent's event stream asks, for every event, whether its interaction
/// is in the agent's queues; saving notes and a provider's opt-out ask
/// similar questions. None of them needs a message, so none reads one.
async fn event_checks_notes_and_opt_outs_read_no_message(b: Backend) {
    let app = TestApp::start(b).await;
    let case = conversation(&app).await;
    let events = app.gateway.store.events_after(None, 100).await.unwrap();
    assert!(events.len() >= 4, "{events:?}");
    let i = app.interaction(case).await;
    let contact_id = i["contact"]["id"].as_str().unwrap().to_string();
    let (gateway, store) = counted(&app);

    let anne = Actor::Agent("anne".into());
    let carol = Actor::Agent("carol".into());
    for e in &events {
        let anne_queues = gateway.visible_queues(&anne);
        assert!(gateway.event_visible(&anne, &anne_queues, e).await, "{e:?}");
        let carol_queues = gateway.visible_queues(&carol);
        assert!(
            !gateway.event_visible(&carol, &carol_queues, e).await,
            "{e:?}"
        );
    }
    gateway
        .put_notes(&anne, &contact_id, "prefers SMS")
        .await
        .unwrap();
    let err = gateway
        .put_notes(&carol, &contact_id, "not hers")
        .await
        .unwrap_err();
    assert!(
        matches!(err, GatewayError::Refused(Refusal::NotPermitted(_))),
        "{err}"
    );
    gateway.mark_opted_out(case).await.unwrap();
    assert_eq!(store.whole.load(Ordering::SeqCst), 0);

    assert_eq!(
        app.gateway.store.note("anne", &contact_id).await.unwrap(),
        Some("prefers SMS".to_string())
    );
    assert_eq!(
        app.gateway.store.note("carol", &contact_id).await.unwrap(),
        None
    );
    let contact = app
        .gateway
        .store
        .contact_by_id(&contact_id)
        .await
        .unwrap()
        .unwrap();
    assert!(contact.opted_out);
}

/// A reply's statuses come back one by one (sent, delivered, read); each
/// reads the reply alone, not the conversation, and never moves it back.
async fn a_delivery_status_reads_only_its_message(b: Backend) {
    let app = TestApp::start(b).await;
    let case = conversation(&app).await;
    twilio_accepts(&app, "SMstatus1").await;
    let (s, v) = app
        .post(
            ANNE,
            &format!("/api/v1/interactions/{case}/replies"),
            json!({"text": "four"}),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    app.wait_for(case, "the reply sent", |i| {
        i["messages"][3]["status"] == "sent"
    })
    .await;
    let reply = app.interaction(case).await["messages"][3]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let (gateway, store) = counted(&app);
    for status in [DeliveryStatus::Delivered, DeliveryStatus::Sent] {
        gateway
            .apply_delivery(case, &reply, status, None, None, None)
            .await
            .unwrap();
    }
    assert_eq!(store.whole.load(Ordering::SeqCst), 0);
    let i = app.interaction(case).await;
    assert_eq!(texts(&i), ["one", "two", "three", "four"]);
    assert_eq!(i["messages"][3]["status"], "delivered", "not back to sent");
    assert_eq!(i["messages"][3]["provider_id"], "SMstatus1");
    assert_eq!(i["messages"][0]["status"], "received");
}

/// An agent retries a file the provider would not serve: the retry reads
/// and changes the one message that holds it.
async fn retrying_a_failed_download_reads_only_its_message(b: Backend) {
    let app = TestApp::start(b).await;
    let case = conversation(&app).await;
    let ch = app.sms_channel();
    let form = format!(
        "MessageSid=MMread1&AccountSid={ACCOUNT_SID}&From=%2B14158675309&To=%2B14155550100&Body=look&NumMedia=1\
         &MediaUrl0={}&MediaContentType0=image%2Fpng&SmsStatus=received",
        urlencode(&format!("{}/later", app.twilio.uri())),
    );
    let req = switchboard::adapters::sms::simulate_form(&ch, &app.url, form.as_bytes());
    assert_eq!(app.post_simulated(req).await.0, 200);
    let i = app.interaction(case).await;
    let att = &i["messages"][3]["attachments"][0];
    assert_eq!(att["state"], "failed", "{i}");
    let att_id = att["id"].as_str().unwrap().to_string();
    Mock::given(method("GET"))
        .and(path("/later"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "image/png")
                .set_body_bytes(b"png-bytes".to_vec()),
        )
        .mount(&app.twilio)
        .await;

    let (gateway, store) = counted(&app);
    let anne = Actor::Agent("anne".into());
    let got = gateway.retry_attachment(&anne, &att_id).await.unwrap();
    assert_eq!(got.state, "stored");
    assert_eq!(store.whole.load(Ordering::SeqCst), 0);
    let i = app.interaction(case).await;
    assert_eq!(texts(&i), ["one", "two", "three", "look"]);
    let att = &i["messages"][3]["attachments"][0];
    assert_eq!(
        (att["id"].as_str(), att["state"].as_str()),
        (Some(att_id.as_str()), Some("stored"))
    );
    assert_eq!(att["size"], 9);
    // Carol does not see the interaction: refused before any download.
    let carol = Actor::Agent("carol".into());
    assert!(gateway.retry_attachment(&carol, &att_id).await.is_err());
}

/// The outbox sends a reply with what the channel needs: the reply, and
/// the message it quotes (WhatsApp and Messenger name the quoted message's
/// provider ID), not the conversation (only email threads name it all).
async fn delivering_a_reply_reads_only_it_and_the_message_it_quotes(b: Backend) {
    let app = TestApp::start(b).await;
    let case = conversation(&app).await;
    let second = app.interaction(case).await["messages"][1]["id"]
        .as_str()
        .unwrap()
        .to_string();
    twilio_accepts(&app, "SMquote1").await;
    let (gateway, store) = counted(&app);
    let gateway = Arc::new(gateway);
    let anne = Actor::Agent("anne".into());
    // The gateway's own outbox worker polls the same store: should it take
    // the job first, this one has nothing to send, and it tries again.
    let mut sent = None;
    for attempt in 0..3 {
        let (_, msg) = gateway
            .reply(
                &anne,
                case,
                &format!("about two ({attempt})"),
                None,
                &[],
                None,
                Some(&second),
            )
            .await
            .unwrap();
        store.whole.store(0, Ordering::SeqCst);
        let report = switchboard::outbox::step(&gateway).await.unwrap();
        if report.sent == 1 {
            sent = Some(msg.id);
            break;
        }
        app.wait_for(case, "the other worker's send", |i| {
            i["messages"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["status"] != "queued")
        })
        .await;
    }
    let sent = sent.expect("this outbox sent one of three replies");
    assert_eq!(store.whole.load(Ordering::SeqCst), 0);
    let i = app.interaction(case).await;
    let m = i["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == sent.as_str())
        .unwrap();
    assert_eq!(m["status"], "sent", "{i}");
    assert_eq!(m["provider_id"], "SMquote1");
    let got = app.twilio.received_requests().await.unwrap();
    let form = form_of(got.last().unwrap());
    assert!(
        field(&form, "Body").unwrap().starts_with("about two"),
        "{form:?}"
    );
    assert_eq!(texts(&i)[..3], ["one", "two", "three"]);
}

/// Twilio accepts every message sent, as `sid`.
async fn twilio_accepts(app: &TestApp, sid: &str) {
    Mock::given(method("POST"))
        .and(path(format!(
            "/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
        )))
        .respond_with(ResponseTemplate::new(201).set_body_json(twilio_created(sid)))
        .mount(&app.twilio)
        .await;
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
