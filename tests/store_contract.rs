//! The store contract: what the gateway relies on from its storage port.
//!
//! Every case is written once, as an async fn over `DynStore`, and run against
//! both backends by [`contract!`]: `embedded_store::<case>` on a fresh redb
//! directory, `redis_store::<case>` on Redis (`SWITCHBOARD_TEST_REDIS_URL`,
//! default `redis://127.0.0.1:6379/0`) under a key prefix of its own, whose
//! keys are deleted when the test ends, passed or failed. What only one backend
//! can show (reopening a directory; two processes on one Redis) is below the
//! shared cases.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use futures_util::future::join_all;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use switchboard::domain::{
    new_id, parse_event_id, Actor, ChannelKind, Contact, DeliveryStatus, Direction, EventDraft,
    Interaction, Message, NewInteraction, Status,
};
use switchboard::store::embedded::EmbeddedStore;
use switchboard::store::redis::RedisStore;
use switchboard::store::{Claim, Commit, DynStore, Listed, OutboxJob, StoreError};

const RETENTION: Duration = Duration::from_secs(168 * 3600);
const WAIT: Duration = Duration::from_secs(5);

fn redis_url() -> String {
    std::env::var("SWITCHBOARD_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_string())
}

// ----- backends -------------------------------------------------------------

struct EmbeddedBackend {
    store: DynStore,
    // Dropped after the store (fields drop in order), so the directory outlives it.
    _dir: tempfile::TempDir,
}

fn embedded_backend() -> EmbeddedBackend {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path(), RETENTION).expect("open embedded store");
    EmbeddedBackend { store, _dir: dir }
}

/// Deletes every key under its prefix when dropped, also when a test panics.
struct RedisKeys {
    prefix: String,
}

impl RedisKeys {
    fn new() -> RedisKeys {
        RedisKeys {
            prefix: format!("sbtest:{}", uuid::Uuid::new_v4().simple()),
        }
    }
}

impl Drop for RedisKeys {
    fn drop(&mut self) {
        use redis::Commands;
        let Ok(client) = redis::Client::open(redis_url()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = match conn.scan_match(format!("{}:*", self.prefix)) {
            Ok(iter) => iter.collect(),
            Err(_) => return,
        };
        for chunk in keys.chunks(500) {
            let _: redis::RedisResult<()> = conn.del(chunk);
        }
    }
}

struct RedisBackend {
    store: DynStore,
    // Dropped after the store, so nothing is written after the cleanup.
    _keys: RedisKeys,
}

async fn redis_backend() -> RedisBackend {
    let keys = RedisKeys::new();
    let store = RedisStore::connect(&redis_url(), &keys.prefix, RETENTION)
        .await
        .expect("connect to Redis (is it running?)");
    RedisBackend { store, _keys: keys }
}

/// Generates `embedded_store::$case` and `redis_store::$case` for each case.
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod embedded_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = super::embedded_backend();
                    super::$case(backend.store.clone()).await;
                }
            )*
        }
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = super::redis_backend().await;
                    super::$case(backend.store.clone()).await;
                }
            )*
        }
    };
}

contract!(
    commit_stores_interaction_and_contact_with_bumped_versions,
    stale_version_is_a_conflict_and_writes_nothing,
    an_unchanged_contact_is_checked_but_not_rewritten,
    concurrent_commits_of_one_version_let_exactly_one_win,
    claim_is_taken_once_and_keeps_its_first_value,
    a_claim_and_a_contact_are_read_together,
    an_interaction_read_to_append_takes_a_new_message,
    an_interaction_read_for_one_message_changes_only_that_one,
    commit_with_one_duplicate_claim_writes_nothing,
    index_entries_overwrite_and_answer_lookups,
    event_ids_strictly_increase_and_page_with_after,
    subscribers_receive_committed_events_in_order,
    interactions_for_follows_queue_and_assignee,
    waiting_for_holds_only_the_interactions_in_queue,
    tags_for_follows_tags_queues_and_agents,
    a_long_list_holds_every_interaction_once,
    interactions_for_leaves_out_every_message_but_the_latest,
    contact_by_id_finds_the_stored_contact,
    case_numbers_are_unique_and_start_at_1001,
    outbox_leases_a_due_job_once_until_its_lease_expires,
    outbox_reschedule_and_remove,
    concurrent_outbox_leases_never_share_a_job,
    blobs_round_trip_up_to_10_mib,
    notes_are_private_to_each_agent,
    kv_values_round_trip,
    a_lease_is_held_by_one_owner_until_it_expires,
    ping_answers,
);

// ----- realistic values -----------------------------------------------------

fn new_contact(digital_id: &str, now: DateTime<Utc>) -> Contact {
    Contact {
        id: new_id(),
        key: format!("whatsapp:{digital_id}"),
        version: 0,
        channel_kind: ChannelKind::Whatsapp,
        digital_id: digital_id.to_string(),
        name: Some("Kerry".into()),
        aliases: vec![],
        cases: vec![],
        latest: Default::default(),
        opted_out: false,
        created_at: now,
    }
}

fn inbound(text: &str, now: DateTime<Utc>) -> Message {
    Message {
        id: new_id(),
        direction: Direction::Inbound,
        text: text.to_string(),
        attachments: vec![],
        sent_at: now - ChronoDuration::seconds(2),
        status: DeliveryStatus::Received,
        error: None,
        provider_id: Some(format!("wamid.{}", new_id())),
        author: None,
        sms: None,
        reply_to: None,
        reactions: vec![],
        retracted: false,
        kind: None,
        html: None,
        raw: None,
    }
}

/// A contact writing for the first time: what `receive_message` commits.
struct FirstMessage {
    contact: Contact,
    interaction: Interaction,
    claim: Claim,
    events: Vec<EventDraft>,
}

async fn first_message(store: &DynStore, digital_id: &str, queue: &str) -> FirstMessage {
    let now = Utc::now();
    let mut contact = new_contact(digital_id, now);
    let case_number = store.next_case_number().await.unwrap();
    let mut interaction = Interaction::new(NewInteraction {
        case_number,
        channel_id: "wa-main".into(),
        channel_kind: ChannelKind::Whatsapp,
        digital_id: digital_id.to_string(),
        contact_id: contact.id.clone(),
        contact_name: contact.name.clone(),
        queue: queue.to_string(),
        now,
    });
    let msg = inbound("Hi, my order #4411 has not arrived", now);
    let claim = Claim {
        key: format!("msg:wa-main:{}", msg.provider_id.as_deref().unwrap()),
        value: format!("{case_number}:{}", msg.id),
    };
    let events = interaction.receive(msg, now, true);
    contact.cases.push(case_number);
    contact.latest.insert("wa-main".into(), case_number);
    FirstMessage {
        contact,
        interaction,
        claim,
        events,
    }
}

impl FirstMessage {
    fn commit(&self) -> Commit {
        Commit {
            contact: Some(self.contact.clone()),
            interaction: Some(self.interaction.clone()),
            claims: vec![self.claim.clone()],
            events: self.events.clone(),
            ..Commit::default()
        }
    }
}

/// Stores a first message and returns the stored interaction (version 1).
async fn stored_interaction(store: &DynStore, digital_id: &str, queue: &str) -> Interaction {
    let first = first_message(store, digital_id, queue).await;
    store.commit(first.commit()).await.unwrap();
    store
        .interaction(first.interaction.case_number)
        .await
        .unwrap()
        .unwrap()
}

fn draft(case_number: u64, kind: &str, n: usize) -> EventDraft {
    EventDraft::new(
        kind,
        Utc::now(),
        case_number,
        &serde_json::json!({"id": "wa-main", "kind": "whatsapp"}),
        &serde_json::json!({"n": n}),
    )
}

fn job(case_number: u64, due_at: DateTime<Utc>) -> OutboxJob {
    let id = new_id();
    OutboxJob {
        id: id.clone(),
        case_number,
        message_id: id,
        channel_id: "wa-main".into(),
        attempts: 0,
        due_at,
        created_at: Utc::now(),
    }
}

fn ids(jobs: &[OutboxJob]) -> BTreeSet<String> {
    jobs.iter().map(|j| j.id.clone()).collect()
}

fn cases(listed: &[Listed]) -> Vec<u64> {
    let mut c: Vec<u64> = listed.iter().map(|l| l.interaction.case_number).collect();
    c.sort();
    c
}

/// Everything a failed commit must not have left behind.
async fn assert_nothing_written(store: &DynStore, first: &FirstMessage, events_before: usize) {
    assert_eq!(
        store
            .interaction(first.interaction.case_number)
            .await
            .unwrap(),
        None,
        "no interaction"
    );
    assert_eq!(
        store.contact(&first.contact.key).await.unwrap(),
        None,
        "no contact"
    );
    assert_eq!(
        store.contact_by_id(&first.contact.id).await.unwrap(),
        None,
        "no contact by id"
    );
    assert_eq!(
        store.lookup(&first.claim.key).await.unwrap(),
        None,
        "no claim"
    );
    assert_eq!(
        store.events_after(None, 1000).await.unwrap().len(),
        events_before,
        "no events"
    );
    assert_eq!(store.outbox_depth().await.unwrap(), 0, "no outbox job");
    assert!(
        store
            .interactions_for(&["support".to_string()], Some("anne"))
            .await
            .unwrap()
            .is_empty(),
        "no index entry"
    );
}

// ----- the cases ------------------------------------------------------------

/// A stored message must read back exactly, with versions bumped: every later
/// change (assign, reply) is checked against that version.
async fn commit_stores_interaction_and_contact_with_bumped_versions(store: DynStore) {
    let first = first_message(&store, "15551234567", "support").await;
    let events = store.commit(first.commit()).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["interaction.created", "message.received"]
    );

    let case = first.interaction.case_number;
    let i = store.interaction(case).await.unwrap().unwrap();
    assert_eq!(
        i,
        Interaction {
            version: 1,
            ..first.interaction.clone()
        }
    );
    let c = store.contact(&first.contact.key).await.unwrap().unwrap();
    assert_eq!(
        c,
        Contact {
            version: 1,
            ..first.contact.clone()
        }
    );
    assert_eq!(
        store.lookup(&first.claim.key).await.unwrap(),
        Some(first.claim.value.clone())
    );

    // The next change starts from what was read, and bumps again.
    let mut i = i;
    let assigned = i
        .assign(&Actor::Agent("anne".into()), "anne", Utc::now())
        .unwrap();
    let mut c = c;
    c.name = Some("Kerry Blue".into());
    store
        .commit(Commit {
            interaction: Some(i.clone()),
            contact: Some(c.clone()),
            events: assigned,
            ..Commit::default()
        })
        .await
        .unwrap();
    let again = store.interaction(case).await.unwrap().unwrap();
    assert_eq!(again.version, 2);
    assert_eq!(again.assigned_to.as_deref(), Some("anne"));
    assert_eq!(again, Interaction { version: 2, ..i });
    let c2 = store.contact(&first.contact.key).await.unwrap().unwrap();
    assert_eq!(c2, Contact { version: 2, ..c });
    assert_eq!(store.interaction(case + 1000).await.unwrap(), None);
    assert_eq!(store.contact("whatsapp:15550000000").await.unwrap(), None);
}

/// A change computed from an outdated read must be refused whole, or two
/// agents acting at once would silently overwrite each other.
async fn stale_version_is_a_conflict_and_writes_nothing(store: DynStore) {
    let stored = stored_interaction(&store, "15551234567", "support").await;
    let events_before = store.events_after(None, 1000).await.unwrap().len();

    // A stale interaction (version 0 while 1 is stored), with everything else in the commit.
    let mut stale = stored.clone();
    stale.version = 0;
    stale.queue = "sales".into();
    stale.assigned_to = Some("anne".into());
    let later = first_message(&store, "15557654321", "support").await;
    let refused = store
        .commit(Commit {
            interaction: Some(stale),
            contact: Some(later.contact.clone()),
            claims: vec![later.claim.clone()],
            index: vec![Claim {
                key: "out:wa-main:wamid.sent1".into(),
                value: "1:x".into(),
            }],
            events: later.events.clone(),
            outbox_add: vec![job(stored.case_number, Utc::now())],
            outbox_remove: vec![],
            contact_unchanged: false,
        })
        .await;
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
    assert_eq!(
        store.interaction(stored.case_number).await.unwrap(),
        Some(stored.clone())
    );
    assert_eq!(store.contact(&later.contact.key).await.unwrap(), None);
    assert_eq!(store.lookup(&later.claim.key).await.unwrap(), None);
    assert_eq!(store.lookup("out:wa-main:wamid.sent1").await.unwrap(), None);
    assert_eq!(
        store.events_after(None, 1000).await.unwrap().len(),
        events_before
    );
    assert_eq!(store.outbox_depth().await.unwrap(), 0);
    assert!(store
        .interactions_for(&["sales".to_string()], Some("anne"))
        .await
        .unwrap()
        .is_empty());

    // A contact that exists must not be created again (version 0).
    let mut fresh = later.contact.clone();
    fresh.key = format!("whatsapp:{}", stored.digital_id);
    let refused = store
        .commit(Commit {
            contact: Some(fresh),
            ..Commit::default()
        })
        .await;
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");

    // An interaction that does not exist cannot be updated (version 3).
    let ghost = first_message(&store, "15559999999", "support").await;
    let mut i = ghost.interaction.clone();
    i.version = 3;
    let refused = store
        .commit(Commit {
            interaction: Some(i),
            claims: vec![ghost.claim.clone()],
            ..Commit::default()
        })
        .await;
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
    assert_eq!(
        store
            .interaction(ghost.interaction.case_number)
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.lookup(&ghost.claim.key).await.unwrap(), None);
}

/// A message from a known sender leaves the contact as it is: its version is
/// still checked (a stale one refuses the whole commit) but it is not
/// rewritten, so it keeps its version.
async fn an_unchanged_contact_is_checked_but_not_rewritten(store: DynStore) {
    let first = first_message(&store, "15551234567", "support").await;
    store.commit(first.commit()).await.unwrap();
    let contact = store.contact(&first.contact.key).await.unwrap().unwrap();
    let i = store
        .interaction(first.interaction.case_number)
        .await
        .unwrap()
        .unwrap();

    let mut stale = contact.clone();
    stale.version = 0;
    let refused = store
        .commit(Commit {
            contact: Some(stale),
            contact_unchanged: true,
            interaction: Some(i.clone()),
            ..Commit::default()
        })
        .await;
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
    assert_eq!(
        store.interaction(i.case_number).await.unwrap(),
        Some(i.clone())
    );

    store
        .commit(Commit {
            contact: Some(contact.clone()),
            contact_unchanged: true,
            interaction: Some(i.clone()),
            ..Commit::default()
        })
        .await
        .unwrap();
    assert_eq!(
        store.contact(&first.contact.key).await.unwrap(),
        Some(contact.clone()),
        "same contact, same version"
    );
    assert_eq!(
        store.contact_by_id(&contact.id).await.unwrap(),
        Some(contact.clone())
    );
    let i2 = store.interaction(i.case_number).await.unwrap().unwrap();
    assert_eq!(i2.version, i.version + 1, "the interaction was written");
}

/// Two gateways changing one interaction at the same moment: one wins, the
/// other gets Conflict (and retries from a fresh read).
async fn concurrent_commits_of_one_version_let_exactly_one_win(store: DynStore) {
    let stored = stored_interaction(&store, "15551234567", "support").await;
    let attempts = (0..8).map(|n| {
        let store = store.clone();
        let mut i = stored.clone();
        i.tags = vec![format!("tag-{n}")];
        async move {
            store
                .commit(Commit {
                    interaction: Some(i),
                    events: vec![draft(stored.case_number, "interaction.updated", n)],
                    ..Commit::default()
                })
                .await
        }
    });
    let results = join_all(attempts).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    let conflicts = results
        .iter()
        .filter(|r| matches!(r, Err(StoreError::Conflict)))
        .count();
    assert_eq!((won, conflicts), (1, 7), "{results:?}");
    let now = store
        .interaction(stored.case_number)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now.version, 2);
    assert_eq!(store.events_after(None, 100).await.unwrap().len(), 3);
}

/// A provider's retry of a message must be recognised forever, and answer
/// with what the first delivery stored.
async fn claim_is_taken_once_and_keeps_its_first_value(store: DynStore) {
    let key = "msg:wa-main:wamid.HBgLMTU1NTEyMzQ1NjcVAgASGBQzQUI";
    store
        .commit(Commit {
            claims: vec![Claim {
                key: key.into(),
                value: "1001:first".into(),
            }],
            ..Commit::default()
        })
        .await
        .unwrap();
    let again = store
        .commit(Commit {
            claims: vec![Claim {
                key: key.into(),
                value: "1002:second".into(),
            }],
            ..Commit::default()
        })
        .await;
    match again {
        Err(StoreError::Duplicate { key: k, value }) => {
            assert_eq!(k, key);
            assert_eq!(value, "1001:first");
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert_eq!(
        store.lookup(key).await.unwrap().as_deref(),
        Some("1001:first")
    );
    assert_eq!(store.lookup("msg:wa-main:other").await.unwrap(), None);
}

/// What receiving a message reads first, in one go: the claim (is this a
/// retry?) and the sender's contact, each answered as on its own.
async fn a_claim_and_a_contact_are_read_together(store: DynStore) {
    let first = first_message(&store, "15551234567", "support").await;
    let (claim, contact) = (&first.claim.key, &first.contact.key);
    assert_eq!(
        store.lookup_and_contact(claim, contact).await.unwrap(),
        (None, None)
    );
    store.commit(first.commit()).await.unwrap();
    let (held, read) = store.lookup_and_contact(claim, contact).await.unwrap();
    assert_eq!(held, Some(first.claim.value.clone()));
    assert_eq!(read, store.contact(contact).await.unwrap());
    assert_eq!(read.map(|c| c.version), Some(1));
    let (held, read) = store
        .lookup_and_contact("msg:wa-main:other", contact)
        .await
        .unwrap();
    assert_eq!((held, read.is_some()), (None, true));
    let (held, read) = store
        .lookup_and_contact(claim, "whatsapp:15550000000")
        .await
        .unwrap();
    assert_eq!((held.is_some(), read), (true, None));
}

/// What receiving a message reads (the interaction, perhaps without its
/// stored messages) takes a new message, after the ones stored.
async fn an_interaction_read_to_append_takes_a_new_message(store: DynStore) {
    let v1 = stored_interaction(&store, "15551234567", "support").await;
    let case = v1.case_number;
    let mut to_append = store.interaction_to_append(case).await.unwrap().unwrap();
    assert_eq!(to_append.version, 1);
    assert_eq!(to_append.status, v1.status);
    let now = Utc::now();
    let events = to_append.receive(inbound("and it is still missing", now), now, false);
    store
        .commit(Commit {
            interaction: Some(to_append),
            events,
            ..Commit::default()
        })
        .await
        .unwrap();
    let read = store.interaction(case).await.unwrap().unwrap();
    assert_eq!(read.version, 2);
    let texts: Vec<_> = read.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "Hi, my order #4411 has not arrived",
            "and it is still missing"
        ]
    );
    assert_eq!(store.interaction_to_append(9999).await.unwrap(), None);
}

/// A delivery's result or a status callback reads the one message it is
/// about: the commit changes that message where it is stored, appends any
/// message added, and leaves the others as they are. A conversation that
/// changed since the read is a conflict.
async fn an_interaction_read_for_one_message_changes_only_that_one(store: DynStore) {
    let mut i = stored_interaction(&store, "15551234567", "support").await;
    let case = i.case_number;
    for text in ["second", "third"] {
        let now = Utc::now();
        i.receive(inbound(text, now), now, false);
        commit_interaction(&store, i).await.unwrap();
        i = store.interaction(case).await.unwrap().unwrap();
    }
    let texts =
        |i: &Interaction| -> Vec<String> { i.messages.iter().map(|m| m.text.clone()).collect() };
    let second = i.messages[1].clone();

    let mut one = store
        .interaction_with_message(case, &second.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(one.messages, std::slice::from_ref(&second));
    assert_eq!(one.version, i.version);
    assert_eq!(one.queue, i.queue);
    Arc::make_mut(&mut one.messages[0]).status = DeliveryStatus::Read;
    let now = Utc::now();
    one.receive(inbound("fourth, with it", now), now, false);
    commit_interaction(&store, one).await.unwrap();
    let read = store.interaction(case).await.unwrap().unwrap();
    assert_eq!(read.version, i.version + 1);
    assert_eq!(
        texts(&read),
        [
            "Hi, my order #4411 has not arrived",
            "second",
            "third",
            "fourth, with it"
        ]
    );
    assert_eq!(read.messages[1].status, DeliveryStatus::Read);
    assert_eq!(read.messages[0], i.messages[0]);
    assert_eq!(read.messages[2], i.messages[2]);

    // A message it does not hold: the interaction, without messages; a
    // change to it keeps every stored message.
    let mut none = store
        .interaction_with_message(case, "m-none")
        .await
        .unwrap()
        .unwrap();
    assert!(none.messages.is_empty());
    none.priority = 5;
    commit_interaction(&store, none).await.unwrap();
    let read = store.interaction(case).await.unwrap().unwrap();
    assert_eq!(read.priority, 5);
    assert_eq!(read.messages.len(), 4);

    // Read for one message; another change lands in between.
    let mut late = store
        .interaction_with_message(case, &second.id)
        .await
        .unwrap()
        .unwrap();
    let mut other = store.interaction_to_append(case).await.unwrap().unwrap();
    let now = Utc::now();
    other.receive(inbound("fifth", now), now, false);
    commit_interaction(&store, other).await.unwrap();
    Arc::make_mut(&mut late.messages[0]).status = DeliveryStatus::Failed;
    let refused = commit_interaction(&store, late).await;
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
    let read = store.interaction(case).await.unwrap().unwrap();
    assert_eq!(read.messages.len(), 5);
    assert_eq!(read.messages[1].status, DeliveryStatus::Read);

    assert_eq!(
        store
            .interaction_with_message(9999, &second.id)
            .await
            .unwrap(),
        None
    );
}

/// A webhook retried while the first delivery is being stored must not
/// create a second interaction, event or outbox job.
async fn commit_with_one_duplicate_claim_writes_nothing(store: DynStore) {
    store
        .commit(Commit {
            claims: vec![Claim {
                key: "idem:anne:7f3c".into(),
                value: "1001:m1".into(),
            }],
            ..Commit::default()
        })
        .await
        .unwrap();
    let events_before = store.events_after(None, 1000).await.unwrap().len();
    let first = first_message(&store, "15551234567", "support").await;
    let mut commit = first.commit();
    commit.interaction.as_mut().unwrap().assigned_to = Some("anne".into());
    commit.claims.push(Claim {
        key: "idem:anne:7f3c".into(),
        value: "1002:m2".into(),
    });
    commit.index.push(Claim {
        key: "out:wa-main:wamid.new".into(),
        value: "1002:m2".into(),
    });
    commit
        .outbox_add
        .push(job(first.interaction.case_number, Utc::now()));
    let refused = store.commit(commit).await;
    match refused {
        Err(StoreError::Duplicate { key, value }) => {
            assert_eq!(key, "idem:anne:7f3c");
            assert_eq!(value, "1001:m1");
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert_nothing_written(&store, &first, events_before).await;
    assert_eq!(store.lookup("out:wa-main:wamid.new").await.unwrap(), None);
    assert_eq!(
        store.lookup("idem:anne:7f3c").await.unwrap().as_deref(),
        Some("1001:m1")
    );
}

/// Index entries (a provider message ID learnt after sending) are written
/// whatever was there, and found by `lookup` as claims are.
async fn index_entries_overwrite_and_answer_lookups(store: DynStore) {
    for value in ["1001:a", "1001:b"] {
        store
            .commit(Commit {
                index: vec![Claim {
                    key: "out:wa-main:wamid.sent".into(),
                    value: value.into(),
                }],
                ..Commit::default()
            })
            .await
            .unwrap();
    }
    assert_eq!(
        store
            .lookup("out:wa-main:wamid.sent")
            .await
            .unwrap()
            .as_deref(),
        Some("1001:b")
    );
    // A key set by the index is taken for claims too.
    let refused = store
        .commit(Commit {
            claims: vec![Claim {
                key: "out:wa-main:wamid.sent".into(),
                value: "1002:c".into(),
            }],
            ..Commit::default()
        })
        .await;
    assert!(
        matches!(&refused, Err(StoreError::Duplicate { value, .. }) if value == "1001:b"),
        "{refused:?}"
    );
}

/// Routing engines page the feed with `after`: IDs must strictly increase,
/// even for events stored in the same millisecond, and no page may skip or
/// repeat one.
async fn event_ids_strictly_increase_and_page_with_after(store: DynStore) {
    assert!(store.events_after(None, 10).await.unwrap().is_empty());
    let mut stored = vec![];
    for c in 0..5 {
        let drafts = (0..2).map(|n| draft(1001 + c, "message.received", n));
        stored.extend(
            store
                .commit(Commit {
                    events: drafts.collect(),
                    ..Commit::default()
                })
                .await
                .unwrap(),
        );
    }
    // Many in one commit: certainly within one millisecond.
    stored.extend(
        store
            .commit(Commit {
                events: (0..40).map(|n| draft(1006, "message.status", n)).collect(),
                ..Commit::default()
            })
            .await
            .unwrap(),
    );
    assert_eq!(stored.len(), 50);
    let parsed: Vec<(u64, u64)> = stored
        .iter()
        .map(|e| parse_event_id(&e.id).expect("an ms-seq id"))
        .collect();
    assert!(
        parsed.windows(2).all(|w| w[0] < w[1]),
        "not increasing: {parsed:?}"
    );

    assert_eq!(store.events_after(None, 100).await.unwrap(), stored);
    assert_eq!(store.events_after(None, 3).await.unwrap(), stored[..3]);
    assert_eq!(
        store.events_after(Some(&stored[2].id), 4).await.unwrap(),
        stored[3..7]
    );
    assert!(store
        .events_after(Some(&stored[49].id), 10)
        .await
        .unwrap()
        .is_empty());
    assert!(store.events_after(None, 0).await.unwrap().is_empty());
    // Not an event ID: from the oldest, as without `after`.
    assert_eq!(
        store.events_after(Some("not-an-id"), 2).await.unwrap(),
        stored[..2]
    );

    // Paging through everything, 7 at a time.
    let mut seen = vec![];
    let mut after: Option<String> = None;
    loop {
        let page = store.events_after(after.as_deref(), 7).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        seen.extend(page);
    }
    assert_eq!(seen, stored);
}

/// SSE and the long-polling feed wake on `subscribe()`: every committed event
/// must arrive, in order, with the ID it was stored under.
async fn subscribers_receive_committed_events_in_order(store: DynStore) {
    let mut rx = store.subscribe();
    let first = first_message(&store, "15551234567", "support").await;
    let stored = store.commit(first.commit()).await.unwrap();
    let more = store
        .commit(Commit {
            events: vec![draft(first.interaction.case_number, "message.status", 1)],
            ..Commit::default()
        })
        .await
        .unwrap();
    for expected in stored.iter().chain(&more) {
        let got = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("an event within 5 s")
            .expect("the channel is open");
        assert_eq!(&got, expected);
    }
}

/// What `interactions_for` must give for `i`: it without its messages, and
/// its latest message.
fn as_listed(i: &Interaction) -> Listed {
    Listed {
        interaction: i.without_messages(),
        last_message: i.messages.last().cloned(),
    }
}

/// A list shows each interaction with its latest message only: the others
/// are neither read nor copied, however long the conversation.
async fn interactions_for_leaves_out_every_message_but_the_latest(store: DynStore) {
    let first = stored_interaction(&store, "15551110009", "support").await;
    let case = first.case_number;
    let mut i = first;
    for text in ["second", "third, the latest"] {
        let now = Utc::now();
        i.receive(inbound(text, now), now, false);
        commit_interaction(&store, i).await.unwrap();
        i = store.interaction(case).await.unwrap().unwrap();
    }
    assert_eq!(i.messages.len(), 3);
    let listed = store
        .interactions_for(&["support".to_string()], None)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    let l = &listed[0];
    assert!(
        l.interaction.messages.is_empty(),
        "{:?}",
        l.interaction.messages
    );
    assert_eq!(l.interaction.version, i.version);
    assert_eq!(
        l.last_message.as_deref().map(|m| m.text.as_str()),
        Some("third, the latest")
    );
    assert_eq!(listed, [as_listed(&i)]);
}

/// Agents' lists come from `interactions_for`: an interaction must show in
/// its current queue and for its current assignee only, also after it moves.
async fn interactions_for_follows_queue_and_assignee(store: DynStore) {
    let support = vec!["support".to_string()];
    let sales = vec!["sales".to_string()];
    let i1 = stored_interaction(&store, "15551110001", "support").await;
    let i2 = stored_interaction(&store, "15551110002", "sales").await;
    let mut i3 = first_message(&store, "15551110003", "support")
        .await
        .interaction;
    i3.assigned_to = Some("bob".into());
    store
        .commit(Commit {
            interaction: Some(i3.clone()),
            ..Commit::default()
        })
        .await
        .unwrap();
    let (c1, c2, c3) = (i1.case_number, i2.case_number, i3.case_number);

    let listed = store.interactions_for(&support, None).await.unwrap();
    assert_eq!(cases(&listed), [c1, c3]);
    assert!(listed.contains(&as_listed(&i1)), "as stored");
    assert_eq!(
        cases(&store.interactions_for(&sales, Some("bob")).await.unwrap()),
        [c2, c3]
    );
    assert_eq!(
        cases(
            &store
                .interactions_for(&[support[0].clone(), sales[0].clone()], Some("bob"))
                .await
                .unwrap()
        ),
        [c1, c2, c3],
        "each once"
    );
    assert!(store
        .interactions_for(&[], Some("anne"))
        .await
        .unwrap()
        .is_empty());
    assert!(store.interactions_for(&[], None).await.unwrap().is_empty());
    assert!(store
        .interactions_for(&["billing".to_string()], None)
        .await
        .unwrap()
        .is_empty());

    // Transfer i1 to sales; assign i2 to anne, then reassign it to bob.
    let mut moved = i1.clone();
    moved.queue = "sales".into();
    store
        .commit(Commit {
            interaction: Some(moved),
            ..Commit::default()
        })
        .await
        .unwrap();
    let mut i2 = store.interaction(c2).await.unwrap().unwrap();
    i2.assigned_to = Some("anne".into());
    store
        .commit(Commit {
            interaction: Some(i2.clone()),
            ..Commit::default()
        })
        .await
        .unwrap();
    assert_eq!(
        cases(&store.interactions_for(&[], Some("anne")).await.unwrap()),
        [c2]
    );
    i2.version += 1;
    i2.assigned_to = Some("bob".into());
    store
        .commit(Commit {
            interaction: Some(i2),
            ..Commit::default()
        })
        .await
        .unwrap();

    assert_eq!(
        cases(&store.interactions_for(&support, None).await.unwrap()),
        [c3]
    );
    assert_eq!(
        cases(&store.interactions_for(&sales, None).await.unwrap()),
        [c1, c2]
    );
    assert!(store
        .interactions_for(&[], Some("anne"))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        cases(&store.interactions_for(&[], Some("bob")).await.unwrap()),
        [c2, c3]
    );

    // End i3: unassigned, it leaves bob's list but stays in its queue.
    let mut i3 = store.interaction(c3).await.unwrap().unwrap();
    i3.assigned_to = None;
    store
        .commit(Commit {
            interaction: Some(i3),
            ..Commit::default()
        })
        .await
        .unwrap();
    assert_eq!(
        cases(&store.interactions_for(&[], Some("bob")).await.unwrap()),
        [c2]
    );
    assert_eq!(
        cases(&store.interactions_for(&support, None).await.unwrap()),
        [c3]
    );
}

/// An agent's default list comes from `waiting_for`: only interactions
/// `in_queue`, in the given queues or waiting assigned to the agent; one
/// leaves it when it leaves the queue (resolved, ended) and comes back
/// with it, in its new queue after a transfer.
async fn waiting_for_holds_only_the_interactions_in_queue(store: DynStore) {
    let support = vec!["support".to_string()];
    let sales = vec!["sales".to_string()];
    let i1 = stored_interaction(&store, "15551120001", "support").await;
    let mut i2 = stored_interaction(&store, "15551120002", "support").await;
    let i3 = stored_interaction(&store, "15551120003", "sales").await;
    let (c1, c2, c3) = (i1.case_number, i2.case_number, i3.case_number);
    assert!(i1.in_queue && i2.in_queue && i3.in_queue);
    let waiting = |queues: Vec<String>, agent: Option<&'static str>| {
        let store = store.clone();
        async move { cases(&store.waiting_for(&queues, agent).await.unwrap()) }
    };
    assert_eq!(waiting(support.clone(), None).await, [c1, c2]);
    let listed = store.waiting_for(&sales, None).await.unwrap();
    assert_eq!(listed, [as_listed(&i3)], "as interactions_for lists it");

    // i2 is assigned to bob and then leaves the queue (resolved).
    i2.assigned_to = Some("bob".into());
    commit_interaction(&store, i2.clone()).await.unwrap();
    assert_eq!(waiting(vec![], Some("bob")).await, [c2]);
    assert_eq!(waiting(sales.clone(), Some("bob")).await, [c2, c3]);
    let mut i2 = store.interaction(c2).await.unwrap().unwrap();
    i2.in_queue = false;
    i2.status = Status::Resolved;
    commit_interaction(&store, i2).await.unwrap();
    assert_eq!(waiting(support.clone(), Some("bob")).await, [c1]);
    assert_eq!(
        cases(&store.interactions_for(&support, Some("bob")).await.unwrap()),
        [c1, c2],
        "still in its queue's and its agent's whole lists"
    );

    // i1 is transferred to sales; i2 comes back to the queue.
    let mut i1 = store.interaction(c1).await.unwrap().unwrap();
    i1.queue = "sales".into();
    commit_interaction(&store, i1).await.unwrap();
    let mut i2 = store.interaction(c2).await.unwrap().unwrap();
    i2.in_queue = true;
    i2.status = Status::Open;
    commit_interaction(&store, i2).await.unwrap();
    assert_eq!(waiting(support.clone(), None).await, [c2]);
    assert_eq!(waiting(sales.clone(), None).await, [c1, c3]);
    assert_eq!(waiting(vec![], Some("bob")).await, [c2]);
    assert!(waiting(vec![], None).await.is_empty());
    assert!(waiting(vec!["billing".into()], Some("anne"))
        .await
        .is_empty());
}

/// The tags agents filter by come from `tags_for`, which counts them as
/// interactions change: a tag is listed while an interaction of the
/// queues (or assigned to the agent) carries it, and not after the last
/// one drops it or moves away.
async fn tags_for_follows_tags_queues_and_agents(store: DynStore) {
    let support = vec!["support".to_string()];
    let sales = vec!["sales".to_string()];
    let tags = |queues: Vec<String>, agent: Option<&'static str>| {
        let store = store.clone();
        async move { store.tags_for(&queues, agent).await.unwrap() }
    };
    let mut i1 = stored_interaction(&store, "15551150001", "support").await;
    let mut i2 = stored_interaction(&store, "15551150002", "support").await;
    assert!(tags(support.clone(), None).await.is_empty());
    i1.tags = vec!["vip".into(), "billing".into(), "vip".into()];
    let c1 = i1.case_number;
    commit_interaction(&store, i1).await.unwrap();
    i2.tags = vec!["billing".into()];
    i2.assigned_to = Some("bob".into());
    let c2 = i2.case_number;
    commit_interaction(&store, i2).await.unwrap();
    assert_eq!(tags(support.clone(), None).await, ["billing", "vip"]);
    assert_eq!(tags(vec![], Some("bob")).await, ["billing"]);
    assert!(tags(sales.clone(), Some("anne")).await.is_empty());

    // A message changes no tag; one interaction dropping a tag leaves it
    // listed while the other carries it.
    let mut to_append = store.interaction_to_append(c1).await.unwrap().unwrap();
    let now = Utc::now();
    let events = to_append.receive(inbound("and now?", now), now, false);
    store
        .commit(Commit {
            interaction: Some(to_append),
            events,
            ..Commit::default()
        })
        .await
        .unwrap();
    assert_eq!(tags(support.clone(), None).await, ["billing", "vip"]);
    let mut i1 = store.interaction(c1).await.unwrap().unwrap();
    i1.tags = vec!["vip".into()];
    commit_interaction(&store, i1).await.unwrap();
    assert_eq!(tags(support.clone(), None).await, ["billing", "vip"]);

    // i2 moves to sales (and to no agent): its tag goes with it.
    let mut i2 = store.interaction(c2).await.unwrap().unwrap();
    i2.queue = "sales".into();
    i2.assigned_to = None;
    commit_interaction(&store, i2).await.unwrap();
    assert_eq!(tags(support.clone(), None).await, ["vip"]);
    assert_eq!(tags(sales.clone(), None).await, ["billing"]);
    assert!(tags(vec![], Some("bob")).await.is_empty());
    assert_eq!(tags(support, Some("bob")).await, ["vip"]);
    assert_eq!(
        tags(vec!["support".into(), "sales".into()], None).await,
        ["billing", "vip"]
    );
}

/// A queue with more interactions than one read takes (the Redis store
/// reads a list 200 at a time, so that Redis is never held for a whole
/// queue's history): each is listed once, as stored.
async fn a_long_list_holds_every_interaction_once(store: DynStore) {
    let mut stored = vec![];
    for n in 0..450 {
        stored.push(stored_interaction(&store, &format!("1555114{n:04}"), "support").await);
    }
    let listed = store
        .interactions_for(&["support".into()], None)
        .await
        .unwrap();
    let mut expected: Vec<u64> = stored.iter().map(|i| i.case_number).collect();
    expected.sort();
    assert_eq!(cases(&listed), expected);
    let some = &stored[321];
    assert!(listed.contains(&as_listed(some)), "as stored");
    assert_eq!(
        cases(&store.waiting_for(&["support".into()], None).await.unwrap()),
        expected
    );
}

/// The contact panel loads the contact by its ID (not its key).
async fn contact_by_id_finds_the_stored_contact(store: DynStore) {
    let first = first_message(&store, "15551234567", "support").await;
    store.commit(first.commit()).await.unwrap();
    let by_key = store.contact(&first.contact.key).await.unwrap().unwrap();
    let by_id = store
        .contact_by_id(&first.contact.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_id, by_key);
    assert_eq!(by_id.version, 1);
    assert_eq!(store.contact_by_id(&new_id()).await.unwrap(), None);

    // It follows updates.
    let mut c = by_id;
    c.opted_out = true;
    store
        .commit(Commit {
            contact: Some(c),
            ..Commit::default()
        })
        .await
        .unwrap();
    let c = store
        .contact_by_id(&first.contact.id)
        .await
        .unwrap()
        .unwrap();
    assert!(c.opted_out);
    assert_eq!(c.version, 2);
}

/// Case numbers are what agents quote on the phone: never reused, never
/// skipping backwards, starting at 1001.
async fn case_numbers_are_unique_and_start_at_1001(store: DynStore) {
    assert_eq!(store.next_case_number().await.unwrap(), 1001);
    assert_eq!(store.next_case_number().await.unwrap(), 1002);
    let many = join_all((0..50).map(|_| {
        let store = store.clone();
        async move { store.next_case_number().await.unwrap() }
    }))
    .await;
    let unique: BTreeSet<u64> = many.iter().copied().collect();
    assert_eq!(unique.len(), 50);
    assert!(unique.iter().all(|n| *n > 1002));
    let next = store.next_case_number().await.unwrap();
    assert!(next > *unique.last().unwrap());

    // A stored interaction with a higher number moves the counter past it.
    let mut first = first_message(&store, "15551234567", "support").await;
    first.interaction.case_number = 5000;
    store.commit(first.commit()).await.unwrap();
    assert!(store.next_case_number().await.unwrap() > 5000);
}

/// One reply must be sent once: a leased job is not handed to another worker
/// until its lease runs out (the worker that took it crashed).
async fn outbox_leases_a_due_job_once_until_its_lease_expires(store: DynStore) {
    let now = Utc::now();
    let lease = Duration::from_secs(30);
    let due1 = job(1001, now - ChronoDuration::seconds(1));
    let due2 = job(1002, now);
    let later = job(1003, now + ChronoDuration::hours(1));
    store
        .commit(Commit {
            outbox_add: vec![due1.clone(), due2.clone(), later.clone()],
            ..Commit::default()
        })
        .await
        .unwrap();
    assert_eq!(store.outbox_depth().await.unwrap(), 3);

    let leased = store.outbox_lease(now, lease, 10).await.unwrap();
    assert_eq!(
        ids(&leased),
        ids(&[due1.clone(), due2.clone()]),
        "the due ones"
    );
    assert!(
        leased.contains(&due1) && leased.contains(&due2),
        "as stored"
    );
    assert!(store.outbox_lease(now, lease, 10).await.unwrap().is_empty());
    assert!(store
        .outbox_lease(now + ChronoDuration::seconds(29), lease, 10)
        .await
        .unwrap()
        .is_empty());
    // The lease ran out: due again.
    let t = now + ChronoDuration::seconds(31);
    assert_eq!(
        ids(&store.outbox_lease(t, lease, 10).await.unwrap()),
        ids(&[due1, due2])
    );
    // `limit` bounds a batch.
    let t = now + ChronoDuration::hours(2);
    assert_eq!(store.outbox_lease(t, lease, 2).await.unwrap().len(), 2);
    assert_eq!(store.outbox_lease(t, lease, 2).await.unwrap().len(), 1);
    assert!(store.outbox_lease(t, lease, 2).await.unwrap().is_empty());
    assert_eq!(
        store.outbox_depth().await.unwrap(),
        3,
        "leasing removes nothing"
    );
}

/// A failed send is retried later (reschedule); a delivered one leaves the
/// outbox (remove) and is never put back by a late reschedule.
async fn outbox_reschedule_and_remove(store: DynStore) {
    let now = Utc::now();
    let lease = Duration::from_secs(30);
    let a = job(1001, now);
    let b = job(1002, now);
    store
        .commit(Commit {
            outbox_add: vec![a.clone(), b.clone()],
            ..Commit::default()
        })
        .await
        .unwrap();
    assert_eq!(store.outbox_lease(now, lease, 10).await.unwrap().len(), 2);

    let retry = OutboxJob {
        attempts: 1,
        due_at: now + ChronoDuration::minutes(10),
        ..a.clone()
    };
    store.outbox_reschedule(&retry).await.unwrap();
    // Not before its new due time (even though the lease ran out).
    assert!(store
        .outbox_lease(now + ChronoDuration::minutes(5), lease, 10)
        .await
        .unwrap()
        .iter()
        .all(|j| j.id != a.id));
    let due = store
        .outbox_lease(now + ChronoDuration::minutes(11), lease, 10)
        .await
        .unwrap();
    assert!(due.contains(&retry), "{due:?}");

    // Delivered: removed in the commit that records it.
    store
        .commit(Commit {
            outbox_remove: vec![b.id.clone()],
            ..Commit::default()
        })
        .await
        .unwrap();
    assert_eq!(store.outbox_depth().await.unwrap(), 1);
    store
        .outbox_reschedule(&OutboxJob {
            attempts: 2,
            ..b.clone()
        })
        .await
        .unwrap();
    assert_eq!(store.outbox_depth().await.unwrap(), 1, "not put back");
    let t = now + ChronoDuration::hours(1);
    assert!(store
        .outbox_lease(t, lease, 10)
        .await
        .unwrap()
        .iter()
        .all(|j| j.id != b.id));

    store
        .commit(Commit {
            outbox_remove: vec![a.id.clone(), "no-such-job".into()],
            ..Commit::default()
        })
        .await
        .unwrap();
    assert_eq!(store.outbox_depth().await.unwrap(), 0);
    assert!(store
        .outbox_lease(now + ChronoDuration::hours(2), lease, 10)
        .await
        .unwrap()
        .is_empty());
}

/// Two delivery workers (or two gateways) polling at once must split the
/// due jobs, never both send one.
async fn concurrent_outbox_leases_never_share_a_job(store: DynStore) {
    let now = Utc::now();
    let jobs: Vec<OutboxJob> = (0..40).map(|n| job(1001 + n, now)).collect();
    store
        .commit(Commit {
            outbox_add: jobs.clone(),
            ..Commit::default()
        })
        .await
        .unwrap();
    let batches = join_all((0..4).map(|_| {
        let store = store.clone();
        async move {
            store
                .outbox_lease(now, Duration::from_secs(60), 15)
                .await
                .unwrap()
        }
    }))
    .await;
    let mut seen = BTreeSet::new();
    for batch in &batches {
        for j in batch {
            assert!(seen.insert(j.id.clone()), "leased twice: {}", j.id);
        }
    }
    assert_eq!(seen, ids(&jobs));
}

/// Attachments up to the 10 MiB limit are stored and served byte for byte.
async fn blobs_round_trip_up_to_10_mib(store: DynStore) {
    assert_eq!(store.blob("att-missing").await.unwrap(), None);
    store.put_blob("att-small", b"%PDF-1.7\n").await.unwrap();
    assert_eq!(
        store.blob("att-small").await.unwrap().as_deref(),
        Some(&b"%PDF-1.7\n"[..])
    );
    let big: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|n| (n.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    store.put_blob("att-big", &big).await.unwrap();
    assert!(store.blob("att-big").await.unwrap() == Some(big));
    store.put_blob("att-small", b"").await.unwrap();
    assert_eq!(store.blob("att-small").await.unwrap(), Some(vec![]));
}

/// Notes are private: another agent must never read them.
async fn notes_are_private_to_each_agent(store: DynStore) {
    let contact = new_id();
    assert_eq!(store.note("anne", &contact).await.unwrap(), None);
    store
        .put_note("anne", &contact, "Prefers email; VIP since 2019")
        .await
        .unwrap();
    assert_eq!(
        store.note("anne", &contact).await.unwrap().as_deref(),
        Some("Prefers email; VIP since 2019")
    );
    assert_eq!(store.note("bob", &contact).await.unwrap(), None);
    assert_eq!(store.note("anne", &new_id()).await.unwrap(), None);
    store
        .put_note("bob", &contact, "Called twice")
        .await
        .unwrap();
    store.put_note("anne", &contact, "Updated").await.unwrap();
    assert_eq!(
        store.note("anne", &contact).await.unwrap().as_deref(),
        Some("Updated")
    );
    assert_eq!(
        store.note("bob", &contact).await.unwrap().as_deref(),
        Some("Called twice")
    );
}

/// Small shared values (sink cursors, channel health, rotated tokens).
async fn kv_values_round_trip(store: DynStore) {
    assert_eq!(store.kv_get("sink-cursor:router").await.unwrap(), None);
    store
        .kv_set("sink-cursor:router", "1732528800000-0")
        .await
        .unwrap();
    store
        .kv_set("channel-health:x-main", "needs_reauth")
        .await
        .unwrap();
    store
        .kv_set("sink-cursor:router", "1732528800000-7")
        .await
        .unwrap();
    assert_eq!(
        store.kv_get("sink-cursor:router").await.unwrap().as_deref(),
        Some("1732528800000-7")
    );
    assert_eq!(
        store
            .kv_get("channel-health:x-main")
            .await
            .unwrap()
            .as_deref(),
        Some("needs_reauth")
    );
}

/// Singleton work (IMAP polling, token refresh) runs in one process at a
/// time: a lease belongs to one owner, who alone may renew it, until it expires.
async fn a_lease_is_held_by_one_owner_until_it_expires(store: DynStore) {
    let ttl = Duration::from_millis(800);
    assert!(store.try_lease("imap:mail", "node-a", ttl).await.unwrap());
    assert!(!store.try_lease("imap:mail", "node-b", ttl).await.unwrap());
    assert!(
        store
            .try_lease("token:x-main", "node-b", ttl)
            .await
            .unwrap(),
        "another name is free"
    );
    // Renewal keeps it past the first expiry.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(store.try_lease("imap:mail", "node-a", ttl).await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!store.try_lease("imap:mail", "node-b", ttl).await.unwrap());
    // Expired: anyone may take it, and the old owner is then refused.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(store.try_lease("imap:mail", "node-b", ttl).await.unwrap());
    assert!(!store.try_lease("imap:mail", "node-a", ttl).await.unwrap());
}

/// `/readyz` answers 200 only when the store does.
async fn ping_answers(store: DynStore) {
    store.ping().await.unwrap();
}

// ----- embedded only --------------------------------------------------------

async fn open_when_released(dir: &Path) -> Arc<EmbeddedStore> {
    // The writer thread releases the database shortly after the store is dropped.
    let mut tries = 0;
    loop {
        match EmbeddedStore::open(dir, RETENTION) {
            Ok(s) => return s,
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

/// A restart must lose nothing that was acknowledged: the embedded store is
/// the only copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = EmbeddedStore::open(dir.path(), RETENTION).unwrap();
    let first = first_message(&store, "15551234567", "support").await;
    let mut commit = first.commit();
    commit.interaction.as_mut().unwrap().assigned_to = Some("anne".into());
    commit.index.push(Claim {
        key: "out:wa-main:wamid.sent".into(),
        value: "1001:m".into(),
    });
    let pending = job(first.interaction.case_number, Utc::now());
    commit.outbox_add.push(pending.clone());
    let events = store.commit(commit).await.unwrap();
    store
        .put_note("anne", &first.contact.id, "VIP")
        .await
        .unwrap();
    store.put_blob("att-1", b"bytes").await.unwrap();
    store
        .kv_set("sink-cursor:router", &events[0].id)
        .await
        .unwrap();
    let interaction = store
        .interaction(first.interaction.case_number)
        .await
        .unwrap();
    drop(store);

    let store: DynStore = open_when_released(dir.path()).await;
    assert_eq!(
        store
            .interaction(first.interaction.case_number)
            .await
            .unwrap(),
        interaction
    );
    let contact = store.contact(&first.contact.key).await.unwrap().unwrap();
    assert_eq!(contact.version, 1);
    assert_eq!(
        store.contact_by_id(&first.contact.id).await.unwrap(),
        Some(contact)
    );
    assert_eq!(
        store.lookup(&first.claim.key).await.unwrap(),
        Some(first.claim.value.clone())
    );
    assert_eq!(
        store
            .lookup("out:wa-main:wamid.sent")
            .await
            .unwrap()
            .as_deref(),
        Some("1001:m")
    );
    assert_eq!(store.events_after(None, 100).await.unwrap(), events);
    assert_eq!(
        cases(&store.interactions_for(&[], Some("anne")).await.unwrap()),
        [first.interaction.case_number]
    );
    assert_eq!(store.outbox_depth().await.unwrap(), 1);
    assert_eq!(
        store
            .outbox_lease(Utc::now(), Duration::from_secs(30), 10)
            .await
            .unwrap(),
        vec![pending]
    );
    assert_eq!(
        store
            .note("anne", &first.contact.id)
            .await
            .unwrap()
            .as_deref(),
        Some("VIP")
    );
    assert_eq!(
        store.blob("att-1").await.unwrap().as_deref(),
        Some(&b"bytes"[..])
    );
    assert_eq!(
        store.kv_get("sink-cursor:router").await.unwrap(),
        Some(events[0].id.clone())
    );
    assert!(store.next_case_number().await.unwrap() > first.interaction.case_number);
    // New events still sort after the old ones.
    let more = store
        .commit(Commit {
            events: vec![draft(1001, "message.status", 0)],
            ..Commit::default()
        })
        .await
        .unwrap();
    assert!(parse_event_id(&more[0].id) > parse_event_id(&events.last().unwrap().id));
}

/// A conversation that grows across several log checkpoints, with an older
/// message changed after the checkpoint that stored it, comes back whole:
/// the store writes only the messages that changed, so this is what proves
/// none is lost, neither from redb nor from the log replayed on restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_messages_survive_checkpoints_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = EmbeddedStore::open(dir.path(), RETENTION).unwrap();
    let mut i = stored_interaction(&store, "15551234567", "support").await;
    let case = i.case_number;
    for n in 0..4 {
        let now = Utc::now();
        i.receive(inbound(&format!("message {n}"), now), now, false);
        store
            .commit(Commit {
                interaction: Some(i.clone()),
                ..Commit::default()
            })
            .await
            .unwrap();
        i = store.interaction(case).await.unwrap().unwrap();
        // Longer than a log segment stays open: the next commit lands in a
        // new segment and this one is folded into redb.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // The first message changes after it was checkpointed.
    std::sync::Arc::make_mut(&mut i.messages[0]).text = "edited".into();
    store
        .commit(Commit {
            interaction: Some(i.clone()),
            ..Commit::default()
        })
        .await
        .unwrap();
    let before = store.interaction(case).await.unwrap().unwrap();
    assert_eq!(before.messages.len(), 5);
    assert_eq!(before.messages[0].text, "edited");
    drop(store);
    let store: DynStore = open_when_released(dir.path()).await;
    assert_eq!(store.interaction(case).await.unwrap(), Some(before));
}

/// A directory written when interactions kept their messages inline opens
/// with every message, and later commits keep them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_opens_interactions_stored_with_inline_messages() {
    let dir = tempfile::tempdir().unwrap();
    let now = Utc::now();
    let mut old = Interaction::new(NewInteraction {
        case_number: 1001,
        channel_id: "wa-main".into(),
        channel_kind: ChannelKind::Whatsapp,
        digital_id: "15551234567".into(),
        contact_id: new_id(),
        contact_name: None,
        queue: "support".into(),
        now,
    });
    old.receive(inbound("first", now), now, true);
    old.receive(inbound("second", now), now, false);
    old.version = 3;
    {
        const INTERACTIONS: redb::TableDefinition<u64, &[u8]> =
            redb::TableDefinition::new("interactions");
        let db = redb::Database::create(dir.path().join("switchboard.redb")).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(INTERACTIONS)
            .unwrap()
            .insert(1001, serde_json::to_vec(&old).unwrap().as_slice())
            .unwrap();
        w.commit().unwrap();
    }
    let store: DynStore = EmbeddedStore::open(dir.path(), RETENTION).unwrap();
    assert_eq!(store.interaction(1001).await.unwrap().as_ref(), Some(&old));
    let mut next = old.clone();
    next.receive(inbound("third", now), now, false);
    store
        .commit(Commit {
            interaction: Some(next),
            ..Commit::default()
        })
        .await
        .unwrap();
    let expected = store.interaction(1001).await.unwrap().unwrap();
    assert_eq!(expected.messages.len(), 3);
    drop(store);
    let store: DynStore = open_when_released(dir.path()).await;
    assert_eq!(store.interaction(1001).await.unwrap(), Some(expected));
}

// ----- Redis only -----------------------------------------------------------

/// Two stores on one Redis under the same fresh keys, as two gateway
/// processes would be.
async fn two_redis_stores() -> (RedisKeys, DynStore, DynStore) {
    let keys = RedisKeys::new();
    let a: DynStore = RedisStore::connect(&redis_url(), &keys.prefix, RETENTION)
        .await
        .unwrap();
    let b: DynStore = RedisStore::connect(&redis_url(), &keys.prefix, RETENTION)
        .await
        .unwrap();
    (keys, a, b)
}

/// Two gateway processes on one Redis share state, and each sees the other's
/// events live (SSE and long-polls on every node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_stores_on_one_prefix_share_state_and_live_events() {
    let (_keys, a, b) = two_redis_stores().await;
    let mut rx_b = b.subscribe();

    let first = first_message(&a, "15551234567", "support").await;
    let stored = a.commit(first.commit()).await.unwrap();
    for expected in &stored {
        let got = tokio::time::timeout(WAIT, rx_b.recv())
            .await
            .expect("b hears a's event within 5 s")
            .unwrap();
        assert_eq!(&got, expected);
    }
    let case = first.interaction.case_number;
    assert_eq!(
        b.interaction(case).await.unwrap(),
        a.interaction(case).await.unwrap()
    );
    assert_eq!(b.events_after(None, 10).await.unwrap(), stored);
    // A change through b is checked against a's write.
    let refused = b
        .commit(Commit {
            interaction: Some(first.interaction.clone()),
            ..Commit::default()
        })
        .await;
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
    let n_a = a.next_case_number().await.unwrap();
    let n_b = b.next_case_number().await.unwrap();
    assert!(n_a != n_b && n_a > case && n_b > case);
    drop((a, b));
}

/// A process that has read or written an interaction reads it again as
/// another process changed it since, and as gone once it is deleted: nothing
/// a process held earlier is answered in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_process_reads_what_another_changed_since() {
    let (keys, a, b) = two_redis_stores().await;
    let first = first_message(&a, "15551234567", "support").await;
    a.commit(first.commit()).await.unwrap();
    let case = first.interaction.case_number;
    // Both hold version 1 now: a wrote it, b read it.
    let v1 = b.interaction(case).await.unwrap().expect("stored");
    assert_eq!(a.interaction(case).await.unwrap().as_ref(), Some(&v1));

    let mut changed = v1.clone();
    let now = Utc::now();
    changed.receive(inbound("and it is still missing", now), now, false);
    b.commit(Commit {
        interaction: Some(changed),
        ..Commit::default()
    })
    .await
    .unwrap();
    let seen_by_a = a.interaction(case).await.unwrap().expect("stored");
    assert_eq!(seen_by_a.version, v1.version + 1);
    assert_eq!(
        seen_by_a
            .messages
            .iter()
            .map(|m| m.text.as_str())
            .collect::<Vec<_>>(),
        [
            "Hi, my order #4411 has not arrived",
            "and it is still missing"
        ]
    );
    assert_eq!(Some(seen_by_a), b.interaction(case).await.unwrap());

    // Gone from Redis: gone for both, whatever they held.
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{}:interaction:{case}", keys.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(a.interaction(case).await.unwrap(), None);
    assert_eq!(b.interaction(case).await.unwrap(), None);
    drop((a, b));
}

/// A Redis store under fresh keys, and a connection of the test's own to
/// look at what it wrote.
async fn redis_store_with_conn() -> (RedisKeys, DynStore, redis::aio::MultiplexedConnection) {
    let keys = RedisKeys::new();
    let store: DynStore = RedisStore::connect(&redis_url(), &keys.prefix, RETENTION)
        .await
        .unwrap();
    let client = redis::Client::open(redis_url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    (keys, store, conn)
}

/// Routing engines read `{prefix}:routing` directly (CONTRACT.md): one entry
/// per event, field `event` holding the event JSON whose `id` is the entry ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_routing_stream_holds_each_event_under_its_id() {
    let (keys, store, mut conn) = redis_store_with_conn().await;
    let first = first_message(&store, "15551234567", "support").await;
    let stored = store.commit(first.commit()).await.unwrap();

    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{}:routing", keys.prefix))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(entries.ids.len(), stored.len());
    for (entry, event) in entries.ids.iter().zip(&stored) {
        assert_eq!(entry.id, event.id);
        assert_eq!(entry.map.len(), 1, "only the field `event`");
        let raw: String = redis::from_redis_value(&entry.map["event"]).unwrap();
        let json: serde_json::Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(json["id"], serde_json::json!(entry.id));
        assert_eq!(json, serde_json::to_value(event).unwrap());
    }
}

/// An entry someone else added to `{prefix}:routing` (or a lost record of
/// our last ID) never blocks a commit: its events go after the stream's
/// last entry, and the commit is stored whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_events_follow_an_entry_added_to_the_stream_by_someone_else() {
    let (keys, store, mut conn) = redis_store_with_conn().await;
    let ahead_ms = chrono::Utc::now().timestamp_millis() + 60_000;
    let ahead = format!("{ahead_ms}-5");
    let _: String = redis::cmd("XADD")
        .arg(format!("{}:routing", keys.prefix))
        .arg(&ahead)
        .arg("note")
        .arg("added by an operator")
        .query_async(&mut conn)
        .await
        .unwrap();

    let first = first_message(&store, "15551234567", "support").await;
    let case = first.interaction.case_number;
    let stored = store.commit(first.commit()).await.unwrap();
    assert!(!stored.is_empty());
    let ids: Vec<(u64, u64)> = stored
        .iter()
        .map(|e| parse_event_id(&e.id).unwrap())
        .collect();
    assert_eq!(ids[0], (ahead_ms as u64, 6), "{ids:?}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(store.interaction(case).await.unwrap().is_some());
    let after = store.events_after(Some(&ahead), 100).await.unwrap();
    assert_eq!(after, stored);
}

/// A Redis that does not answer is reported at start-up, not on the first webhook.
#[tokio::test]
async fn redis_connect_fails_when_redis_is_unreachable() {
    let r = RedisStore::connect("redis://127.0.0.1:1/0", "sbtest:unreachable", RETENTION).await;
    assert!(r.is_err());
}

/// The ID of the follower connection of the store under `prefix`, if any.
async fn follower_client_id(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> Option<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(conn)
        .await
        .unwrap();
    let name = format!("name={prefix}:routing:follower");
    list.lines()
        .find(|l| l.split(' ').any(|f| f == name))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_string)
}

/// A Redis restart or failover must not leave a gateway deaf: the follower
/// reconnects and delivers what was committed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_live_events_survive_a_lost_connection() {
    let (keys, store, mut conn) = redis_store_with_conn().await;
    let mut rx = store.subscribe();
    let mut id = None;
    for _ in 0..100 {
        id = follower_client_id(&mut conn, &keys.prefix).await;
        if id.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let id = id.expect("the follower's connection is named");
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&id)
        .query_async(&mut conn)
        .await
        .unwrap();
    let stored = store
        .commit(Commit {
            events: vec![draft(1001, "message.status", 0)],
            ..Commit::default()
        })
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the event arrives after the follower reconnects")
        .unwrap();
    assert_eq!(got, stored[0]);
}

/// A dropped store must not leave a connection blocked on Redis behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_follower_stops_when_the_store_is_dropped() {
    let (keys, store, mut conn) = redis_store_with_conn().await;
    let mut seen = false;
    for _ in 0..100 {
        seen = follower_client_id(&mut conn, &keys.prefix).await.is_some();
        if seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen, "the follower is running");
    drop(store);
    for _ in 0..100 {
        if follower_client_id(&mut conn, &keys.prefix).await.is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the follower is still connected 2 s after the store was dropped");
}

/// Commits a change to an interaction alone.
async fn commit_interaction(
    store: &DynStore,
    i: Interaction,
) -> switchboard::store::StoreResult<Vec<switchboard::domain::Event>> {
    store
        .commit(Commit {
            interaction: Some(i),
            ..Commit::default()
        })
        .await
}

/// The texts of the messages Redis holds for `case`, in order.
async fn redis_texts(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    case: u64,
) -> Vec<String> {
    let (_, list) = redis_layout(conn, prefix, case).await;
    list.iter()
        .map(|m| m["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The fields of an interaction's hash, and its message list, as Redis holds them.
async fn redis_layout(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    case: u64,
) -> (Vec<String>, Vec<serde_json::Value>) {
    let mut fields: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{prefix}:interaction:{case}"))
        .query_async(conn)
        .await
        .unwrap();
    fields.sort();
    let list: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("{prefix}:interaction:{case}:messages"))
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap();
    let list = list
        .iter()
        .map(|m| serde_json::from_str(m).unwrap())
        .collect();
    (fields, list)
}

/// On Redis an interaction is a header plus a list of messages: a new
/// message is appended and a changed one set in place, and the messages the
/// commit did not change are not sent again (an entry changed behind the
/// store's back stays as it was changed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_writes_only_the_new_and_the_changed_messages() {
    let (keys, store, mut conn) = redis_store_with_conn().await;
    let v1 = stored_interaction(&store, "15551234567", "support").await;
    let case = v1.case_number;
    let (fields, list) = redis_layout(&mut conn, &keys.prefix, case).await;
    assert_eq!(
        fields,
        ["akey", "head", "qkey", "tags", "takey", "tqkey", "v", "wakey", "wkey"]
    );
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["text"], "Hi, my order #4411 has not arrived");

    // Marks the first entry behind the store's back: only a rewrite of it
    // would undo the mark.
    let mut marked = list[0].clone();
    marked["text"] = "marked".into();
    let _: () = redis::cmd("LSET")
        .arg(format!("{}:interaction:{case}:messages", keys.prefix))
        .arg(0)
        .arg(marked.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut v2 = v1.clone();
    let now = Utc::now();
    v2.receive(inbound("and it is still missing", now), now, false);
    commit_interaction(&store, v2).await.unwrap();
    let texts = redis_texts(&mut conn, &keys.prefix, case).await;
    assert_eq!(texts, ["marked", "and it is still missing"]);

    // A change to the first message is set over it, in place.
    let mut v3 = store.interaction(case).await.unwrap().unwrap();
    assert_eq!(v3.version, 2);
    Arc::make_mut(&mut v3.messages[0]).text = "changed".into();
    commit_interaction(&store, v3).await.unwrap();
    let texts = redis_texts(&mut conn, &keys.prefix, case).await;
    assert_eq!(texts, ["changed", "and it is still missing"]);
    let read = store.interaction(case).await.unwrap().unwrap();
    assert_eq!(read.version, 3);
    assert_eq!(read.messages.len(), 2);
    assert_eq!(read.messages[0].text, "changed");
    assert_eq!(
        store
            .interactions_for(&["support".into()], None)
            .await
            .unwrap(),
        vec![as_listed(&read)]
    );
}

/// A message list that no longer holds what the commit's copy was read
/// from is a conflict: nothing is written, and a fresh read commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_message_list_changed_since_it_was_read_is_a_conflict() {
    let (keys, store, mut conn) = redis_store_with_conn().await;
    let v1 = stored_interaction(&store, "15551234567", "support").await;
    let case = v1.case_number;
    let _: () = redis::cmd("RPUSH")
        .arg(format!("{}:interaction:{case}:messages", keys.prefix))
        .arg(serde_json::to_string(&inbound("pushed by hand", Utc::now())).unwrap())
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut v2 = v1.clone();
    let now = Utc::now();
    v2.receive(inbound("and it is still missing", now), now, false);
    let refused = commit_interaction(&store, v2).await;
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
    let read = store.interaction(case).await.unwrap().unwrap();
    assert_eq!(read.version, 1);
    assert_eq!(read.messages.len(), 2);

    let mut v2 = read;
    v2.receive(inbound("and it is still missing", now), now, false);
    commit_interaction(&store, v2).await.unwrap();
    let texts = redis_texts(&mut conn, &keys.prefix, case).await;
    assert_eq!(
        texts,
        [
            "Hi, my order #4411 has not arrived",
            "pushed by hand",
            "and it is still missing"
        ]
    );
}

/// Writes `i` as a gateway from before the header-plus-list layout did:
/// the whole document in field `json`, in its queue's and agent's sets, and
/// nothing else. The key (and its message list) must be deleted first.
async fn store_whole_as_an_older_gateway(
    conn: &mut redis::aio::MultiplexedConnection,
    p: &str,
    i: &Interaction,
) {
    let mut cmd = redis::cmd("HSET");
    cmd.arg(format!("{p}:interaction:{}", i.case_number))
        .arg("v")
        .arg(i.version)
        .arg("json")
        .arg(serde_json::to_string(i).unwrap())
        .arg("qkey")
        .arg(format!("{p}:queue:{}", i.queue));
    if let Some(a) = &i.assigned_to {
        cmd.arg("akey").arg(format!("{p}:assigned:{a}"));
    }
    let _: () = cmd.query_async(conn).await.unwrap();
}

/// Interactions stored before the `waiting` sets existed (no `wkey` in
/// their hash, no sets, no `{p}:lists`) are put in them when a gateway
/// connects, by their stored state: one waiting, one an older gateway
/// stored whole and assigned, and one that left the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_interactions_stored_before_the_waiting_sets_are_put_in_them() {
    let (keys, store, mut conn) = redis_store_with_conn().await;
    let waiting = stored_interaction(&store, "15551130001", "support").await;
    let mut assigned = stored_interaction(&store, "15551130002", "support").await;
    assigned.assigned_to = Some("bob".into());
    commit_interaction(&store, assigned.clone()).await.unwrap();
    let mut left = stored_interaction(&store, "15551130003", "support").await;
    left.in_queue = false;
    left.status = Status::Resolved;
    commit_interaction(&store, left.clone()).await.unwrap();
    let assigned = store
        .interaction(assigned.case_number)
        .await
        .unwrap()
        .unwrap();
    drop(store);
    // Back to the earlier layout: the interaction `assigned` as an older
    // gateway stored it (whole, field `json`).
    let p = &keys.prefix;
    for case in [waiting.case_number, left.case_number] {
        let _: () = redis::cmd("HDEL")
            .arg(format!("{p}:interaction:{case}"))
            .arg("wkey")
            .arg("wakey")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("DEL")
        .arg(format!("{p}:interaction:{}", assigned.case_number))
        .arg(format!("{p}:interaction:{}:messages", assigned.case_number))
        .arg(format!("{p}:waiting:support"))
        .arg(format!("{p}:waiting-assigned:bob"))
        .arg(format!("{p}:lists"))
        .query_async(&mut conn)
        .await
        .unwrap();
    store_whole_as_an_older_gateway(&mut conn, p, &assigned).await;

    let store: DynStore = RedisStore::connect(&redis_url(), p, RETENTION)
        .await
        .unwrap();
    assert_eq!(
        cases(&store.waiting_for(&["support".into()], None).await.unwrap()),
        [waiting.case_number, assigned.case_number]
    );
    assert_eq!(
        cases(&store.waiting_for(&[], Some("bob")).await.unwrap()),
        [assigned.case_number]
    );
    let marker: Option<String> = redis::cmd("GET")
        .arg(format!("{p}:lists"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(marker.as_deref(), Some("1"));
    // From then on commits keep them: the one that left comes back.
    let mut back = store.interaction(left.case_number).await.unwrap().unwrap();
    back.in_queue = true;
    commit_interaction(&store, back).await.unwrap();
    assert_eq!(
        cases(&store.waiting_for(&["support".into()], None).await.unwrap()),
        [waiting.case_number, assigned.case_number, left.case_number]
    );
}

/// Interactions stored before the tag counts existed (no `tags` field in
/// their hash, no count hashes, no `{p}:tags-counted`) are counted when a
/// gateway connects, once: one in the queue, one an older gateway stored
/// whole and assigned. Later commits then move the counts as they would
/// have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_the_tags_of_interactions_stored_before_the_tag_counts_are_counted() {
    let (keys, store, mut conn) = redis_store_with_conn().await;
    let mut queued = stored_interaction(&store, "15551160001", "support").await;
    queued.tags = vec!["billing".into(), "a/b".into()];
    commit_interaction(&store, queued.clone()).await.unwrap();
    let mut assigned = stored_interaction(&store, "15551160002", "support").await;
    assigned.tags = vec!["billing".into(), "vip".into()];
    assigned.assigned_to = Some("bob".into());
    commit_interaction(&store, assigned.clone()).await.unwrap();
    let assigned = store
        .interaction(assigned.case_number)
        .await
        .unwrap()
        .unwrap();
    drop(store);
    // Back to the earlier layout.
    let p = &keys.prefix;
    let _: () = redis::cmd("HDEL")
        .arg(format!("{p}:interaction:{}", queued.case_number))
        .arg("tqkey")
        .arg("takey")
        .arg("tags")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{p}:interaction:{}", assigned.case_number))
        .arg(format!("{p}:interaction:{}:messages", assigned.case_number))
        .arg(format!("{p}:tags:support"))
        .arg(format!("{p}:tags-assigned:bob"))
        .arg(format!("{p}:tags-counted"))
        .query_async(&mut conn)
        .await
        .unwrap();
    store_whole_as_an_older_gateway(&mut conn, p, &assigned).await;

    let store: DynStore = RedisStore::connect(&redis_url(), p, RETENTION)
        .await
        .unwrap();
    let support = vec!["support".to_string()];
    assert_eq!(
        store.tags_for(&support, None).await.unwrap(),
        ["a/b", "billing", "vip"]
    );
    assert_eq!(
        store.tags_for(&[], Some("bob")).await.unwrap(),
        ["billing", "vip"]
    );
    let marker: Option<String> = redis::cmd("GET")
        .arg(format!("{p}:tags-counted"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(marker.as_deref(), Some("1"));
    // A second gateway connecting counts nothing twice: "billing" goes
    // once both have dropped it, and not before.
    let store: DynStore = RedisStore::connect(&redis_url(), p, RETENTION)
        .await
        .unwrap();
    let mut q = store
        .interaction(queued.case_number)
        .await
        .unwrap()
        .unwrap();
    q.tags = vec!["a/b".into()];
    commit_interaction(&store, q).await.unwrap();
    assert_eq!(
        store.tags_for(&support, None).await.unwrap(),
        ["a/b", "billing", "vip"]
    );
    let mut a = store
        .interaction(assigned.case_number)
        .await
        .unwrap()
        .unwrap();
    a.tags = vec![];
    commit_interaction(&store, a).await.unwrap();
    assert_eq!(store.tags_for(&support, None).await.unwrap(), ["a/b"]);
    assert!(store.tags_for(&[], Some("bob")).await.unwrap().is_empty());
}

/// An interaction an older gateway stored whole (messages inside the
/// document, field `json`) is read as it is, listed, and moved to the
/// header-plus-list layout by its next change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_interaction_stored_whole_by_an_older_gateway_is_read_and_moved() {
    let (keys, store, mut conn) = redis_store_with_conn().await;
    let first = first_message(&store, "15551234567", "support").await;
    let case = first.interaction.case_number;
    let mut old = first.interaction.clone();
    old.version = 1;
    let now = Utc::now();
    old.receive(inbound("second, stored whole", now), now, false);
    let queue_key = format!("{}:queue:support", keys.prefix);
    let _: () = redis::cmd("HSET")
        .arg(format!("{}:interaction:{case}", keys.prefix))
        .arg("v")
        .arg("1")
        .arg("json")
        .arg(serde_json::to_string(&old).unwrap())
        .arg("qkey")
        .arg(&queue_key)
        .arg("akey")
        .arg("")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SADD")
        .arg(&queue_key)
        .arg(case)
        .query_async(&mut conn)
        .await
        .unwrap();

    let read = store.interaction(case).await.unwrap().unwrap();
    assert_eq!(read, old);
    assert_eq!(
        store
            .interactions_for(&["support".into()], None)
            .await
            .unwrap(),
        vec![as_listed(&old)]
    );

    let mut next = read;
    next.receive(inbound("third, after the upgrade", now), now, false);
    commit_interaction(&store, next).await.unwrap();
    let (fields, list) = redis_layout(&mut conn, &keys.prefix, case).await;
    assert_eq!(
        fields,
        ["akey", "head", "qkey", "tags", "takey", "tqkey", "v", "wakey", "wkey"]
    );
    let texts: Vec<_> = list.iter().map(|m| m["text"].clone()).collect();
    assert_eq!(
        texts,
        [
            "Hi, my order #4411 has not arrived",
            "second, stored whole",
            "third, after the upgrade"
        ]
    );
    let read = store.interaction(case).await.unwrap().unwrap();
    assert_eq!(read.version, 2);
    assert_eq!(read.messages.len(), 3);
}

/// On Redis, an interaction read to append leaves its stored messages in
/// Redis: the new message is pushed after them, and a list that grew
/// meanwhile is a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_interaction_read_to_append_leaves_its_messages_out() {
    let (keys, store, mut conn) = redis_store_with_conn().await;
    let v1 = stored_interaction(&store, "15551234567", "support").await;
    let case = v1.case_number;
    let mut to_append = store.interaction_to_append(case).await.unwrap().unwrap();
    assert!(to_append.messages.is_empty());
    assert_eq!(to_append.stored.partial(), Some((1, None)));
    let now = Utc::now();
    to_append.receive(inbound("and it is still missing", now), now, false);
    commit_interaction(&store, to_append).await.unwrap();
    assert_eq!(
        redis_texts(&mut conn, &keys.prefix, case).await,
        [
            "Hi, my order #4411 has not arrived",
            "and it is still missing"
        ]
    );

    // Read again to append; someone else's message lands in between.
    let mut late = store.interaction_to_append(case).await.unwrap().unwrap();
    late.receive(inbound("third", now), now, false);
    let _: () = redis::cmd("RPUSH")
        .arg(format!("{}:interaction:{case}:messages", keys.prefix))
        .arg(serde_json::to_string(&inbound("pushed by hand", now)).unwrap())
        .query_async(&mut conn)
        .await
        .unwrap();
    let refused = commit_interaction(&store, late).await;
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
    assert_eq!(redis_texts(&mut conn, &keys.prefix, case).await.len(), 3);
}
