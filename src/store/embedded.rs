//! The embedded store: one node, no server to install.
//!
//! Engine: [redb](https://docs.rs/redb), a pure-Rust, ACID, copy-on-write
//! B-tree store that fsyncs on every commit (`Durability::Immediate`) and
//! survives `kill -9`. It is well kept, has no C dependency and needs no
//! compaction thread, which suits a gateway that must start with one command.
//!
//! Layout: all state is mirrored in memory (reads never touch disk, except
//! attachments). Changes are validated and applied to the mirror under one
//! mutex, then handed to a single writer thread that **group-commits**: it
//! drains every pending change into one redb transaction and fsyncs once, so
//! a burst of webhooks costs one fsync, not one each. A caller's future
//! resolves only after its change is durable; only then is its webhook
//! acknowledged and are its events published.

use super::{Commit, OutboxJob, OutboxRecord, Store, StoreError, StoreResult};
use crate::domain::{parse_event_id, Contact, Event, Interaction};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use redb::{Database, ReadableTable, TableDefinition};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot};

const INTERACTIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("interactions");
const CONTACTS: TableDefinition<&str, &[u8]> = TableDefinition::new("contacts");
const CLAIMS: TableDefinition<&str, &str> = TableDefinition::new("claims");
const EVENTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("events");
const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("outbox");
const NOTES: TableDefinition<&str, &str> = TableDefinition::new("notes");
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
const KV: TableDefinition<&str, &str> = TableDefinition::new("kv");

const FIRST_CASE_NUMBER: u64 = 1001;

enum Op {
    Interaction(u64, Vec<u8>),
    Contact(String, Vec<u8>),
    Claim(String, String),
    Event((u64, u64), Vec<u8>),
    DropEvent((u64, u64)),
    Outbox(String, Vec<u8>),
    DropOutbox(String),
    Note(String, String),
    Blob(String, Vec<u8>),
    Kv(String, String),
}

struct WriteRequest {
    ops: Vec<Op>,
    events: Vec<Event>,
    done: oneshot::Sender<Result<(), String>>,
}

#[derive(Default)]
struct State {
    interactions: HashMap<u64, Interaction>,
    contacts: HashMap<String, Contact>,
    contact_keys: HashMap<String, String>,
    claims: HashMap<String, String>,
    events: VecDeque<Event>,
    last_event: (u64, u64),
    outbox: BTreeMap<String, OutboxJob>,
    notes: HashMap<String, String>,
    kv: HashMap<String, String>,
    leases: HashMap<String, (String, Instant)>,
    next_case: u64,
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    state: Mutex<State>,
    writer: mpsc::UnboundedSender<WriteRequest>,
    events: broadcast::Sender<Event>,
    retention: chrono::Duration,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn note_key(agent: &str, contact_id: &str) -> String {
    format!("{agent}\u{1f}{contact_id}")
}

impl EmbeddedStore {
    /// Opens (or creates) the store in directory `dir`, keeping events at
    /// least `retention` long.
    pub fn open(dir: &Path, retention: Duration) -> anyhow::Result<Arc<EmbeddedStore>> {
        std::fs::create_dir_all(dir)?;
        let db = Database::create(dir.join("switchboard.redb"))?;
        {
            let w = db.begin_write()?;
            w.open_table(INTERACTIONS)?;
            w.open_table(CONTACTS)?;
            w.open_table(CLAIMS)?;
            w.open_table(EVENTS)?;
            w.open_table(OUTBOX)?;
            w.open_table(NOTES)?;
            w.open_table(BLOBS)?;
            w.open_table(KV)?;
            w.commit()?;
        }
        let mut state = State {
            next_case: FIRST_CASE_NUMBER,
            ..State::default()
        };
        {
            let r = db.begin_read()?;
            for row in r.open_table(INTERACTIONS)?.iter()? {
                let (k, v) = row?;
                let i: Interaction = serde_json::from_slice(v.value())?;
                state.next_case = state.next_case.max(k.value() + 1);
                state.interactions.insert(k.value(), i);
            }
            for row in r.open_table(CONTACTS)?.iter()? {
                let (k, v) = row?;
                let c: Contact = serde_json::from_slice(v.value())?;
                state
                    .contact_keys
                    .insert(c.id.clone(), k.value().to_string());
                state.contacts.insert(k.value().to_string(), c);
            }
            for row in r.open_table(CLAIMS)?.iter()? {
                let (k, v) = row?;
                state
                    .claims
                    .insert(k.value().to_string(), v.value().to_string());
            }
            for row in r.open_table(EVENTS)?.iter()? {
                let (k, v) = row?;
                state.last_event = k.value();
                state.events.push_back(serde_json::from_slice(v.value())?);
            }
            for row in r.open_table(OUTBOX)?.iter()? {
                let (k, v) = row?;
                let OutboxRecord::V1(job) = serde_json::from_slice(v.value())?;
                state.outbox.insert(k.value().to_string(), job);
            }
            for row in r.open_table(NOTES)?.iter()? {
                let (k, v) = row?;
                state
                    .notes
                    .insert(k.value().to_string(), v.value().to_string());
            }
            for row in r.open_table(KV)?.iter()? {
                let (k, v) = row?;
                state
                    .kv
                    .insert(k.value().to_string(), v.value().to_string());
            }
        }
        let db = Arc::new(db);
        let (tx, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(4096);
        let writer_db = db.clone();
        let writer_events = events.clone();
        std::thread::Builder::new()
            .name("embedded-writer".into())
            .spawn(move || writer_loop(writer_db, rx, writer_events))?;
        Ok(Arc::new(EmbeddedStore {
            db,
            state: Mutex::new(state),
            writer: tx,
            events,
            retention: chrono::Duration::from_std(retention)?,
        }))
    }

    async fn write(&self, ops: Vec<Op>, events: Vec<Event>) -> StoreResult<()> {
        let (done, wait) = oneshot::channel();
        self.writer
            .send(WriteRequest { ops, events, done })
            .map_err(|_| unavailable("the writer has stopped"))?;
        wait.await
            .map_err(|_| unavailable("the writer has stopped"))?
            .map_err(unavailable)
    }
}

/// The group-commit loop: one transaction and one fsync for everything pending.
fn writer_loop(
    db: Arc<Database>,
    mut rx: mpsc::UnboundedReceiver<WriteRequest>,
    events: broadcast::Sender<Event>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let result = apply_batch(&db, &batch).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, "embedded store commit failed");
        }
        for req in batch {
            if result.is_ok() {
                for e in req.events {
                    let _ = events.send(e);
                }
            }
            let _ = req.done.send(result.clone());
        }
    }
}

fn apply_batch(db: &Database, batch: &[WriteRequest]) -> anyhow::Result<()> {
    let w = db.begin_write()?;
    {
        let mut interactions = w.open_table(INTERACTIONS)?;
        let mut contacts = w.open_table(CONTACTS)?;
        let mut claims = w.open_table(CLAIMS)?;
        let mut events = w.open_table(EVENTS)?;
        let mut outbox = w.open_table(OUTBOX)?;
        let mut notes = w.open_table(NOTES)?;
        let mut blobs = w.open_table(BLOBS)?;
        let mut kv = w.open_table(KV)?;
        for req in batch {
            for op in &req.ops {
                match op {
                    Op::Interaction(k, v) => {
                        interactions.insert(*k, v.as_slice())?;
                    }
                    Op::Contact(k, v) => {
                        contacts.insert(k.as_str(), v.as_slice())?;
                    }
                    Op::Claim(k, v) => {
                        claims.insert(k.as_str(), v.as_str())?;
                    }
                    Op::Event(k, v) => {
                        events.insert(*k, v.as_slice())?;
                    }
                    Op::DropEvent(k) => {
                        events.remove(*k)?;
                    }
                    Op::Outbox(k, v) => {
                        outbox.insert(k.as_str(), v.as_slice())?;
                    }
                    Op::DropOutbox(k) => {
                        outbox.remove(k.as_str())?;
                    }
                    Op::Note(k, v) => {
                        notes.insert(k.as_str(), v.as_str())?;
                    }
                    Op::Blob(k, v) => {
                        blobs.insert(k.as_str(), v.as_slice())?;
                    }
                    Op::Kv(k, v) => {
                        kv.insert(k.as_str(), v.as_str())?;
                    }
                }
            }
        }
    }
    w.commit()?;
    Ok(())
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records always serialize")
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn commit(&self, mut commit: Commit) -> StoreResult<Vec<Event>> {
        let mut ops = vec![];
        let mut stored_events = vec![];
        {
            let mut st = self.state.lock();
            // Validate everything first: nothing is applied unless all of it holds.
            for claim in &commit.claims {
                if let Some(value) = st.claims.get(&claim.key) {
                    return Err(StoreError::Duplicate {
                        key: claim.key.clone(),
                        value: value.clone(),
                    });
                }
            }
            if let Some(c) = &commit.contact {
                let current = st.contacts.get(&c.key).map(|c| c.version).unwrap_or(0);
                if current != c.version {
                    return Err(StoreError::Conflict);
                }
            }
            if let Some(i) = &commit.interaction {
                let current = st
                    .interactions
                    .get(&i.case_number)
                    .map(|i| i.version)
                    .unwrap_or(0);
                if current != i.version {
                    return Err(StoreError::Conflict);
                }
            }
            // Apply.
            for claim in commit.claims.drain(..).chain(commit.index.drain(..)) {
                ops.push(Op::Claim(claim.key.clone(), claim.value.clone()));
                st.claims.insert(claim.key, claim.value);
            }
            if let Some(mut c) = commit.contact.take() {
                c.version += 1;
                ops.push(Op::Contact(c.key.clone(), json(&c)));
                st.contact_keys.insert(c.id.clone(), c.key.clone());
                st.contacts.insert(c.key.clone(), c);
            }
            if let Some(mut i) = commit.interaction.take() {
                i.version += 1;
                st.next_case = st.next_case.max(i.case_number + 1);
                ops.push(Op::Interaction(i.case_number, json(&i)));
                st.interactions.insert(i.case_number, i);
            }
            for job in commit.outbox_add.drain(..) {
                ops.push(Op::Outbox(
                    job.id.clone(),
                    json(&OutboxRecord::V1(job.clone())),
                ));
                st.outbox.insert(job.id.clone(), job);
            }
            for id in commit.outbox_remove.drain(..) {
                ops.push(Op::DropOutbox(id.clone()));
                st.outbox.remove(&id);
            }
            let now_ms = Utc::now().timestamp_millis() as u64;
            for draft in commit.events.drain(..) {
                let (ms, seq) = st.last_event;
                let id = if now_ms > ms {
                    (now_ms, 0)
                } else {
                    (ms, seq + 1)
                };
                st.last_event = id;
                let event = Event::from_draft(format!("{}-{}", id.0, id.1), draft);
                ops.push(Op::Event(id, json(&event)));
                st.events.push_back(event.clone());
                stored_events.push(event);
            }
            // Retention: drop events older than the window, a few at a time.
            let horizon = Utc::now() - self.retention;
            while st.events.front().is_some_and(|e| e.at < horizon) && ops.len() < 4096 {
                let e = st.events.pop_front().expect("checked");
                if let Some(id) = parse_event_id(&e.id) {
                    ops.push(Op::DropEvent(id));
                }
            }
        }
        self.write(ops, stored_events.clone()).await?;
        Ok(stored_events)
    }

    async fn next_case_number(&self) -> StoreResult<u64> {
        let mut st = self.state.lock();
        let n = st.next_case;
        st.next_case += 1;
        Ok(n)
    }

    async fn interaction(&self, case_number: u64) -> StoreResult<Option<Interaction>> {
        Ok(self.state.lock().interactions.get(&case_number).cloned())
    }

    async fn interactions_for(
        &self,
        queues: &[String],
        agent: Option<&str>,
    ) -> StoreResult<Vec<Interaction>> {
        let st = self.state.lock();
        Ok(st
            .interactions
            .values()
            .filter(|i| {
                queues.contains(&i.queue) || (agent.is_some() && i.assigned_to.as_deref() == agent)
            })
            .cloned()
            .collect())
    }

    async fn contact(&self, key: &str) -> StoreResult<Option<Contact>> {
        Ok(self.state.lock().contacts.get(key).cloned())
    }

    async fn contact_by_id(&self, id: &str) -> StoreResult<Option<Contact>> {
        let st = self.state.lock();
        Ok(st
            .contact_keys
            .get(id)
            .and_then(|k| st.contacts.get(k))
            .cloned())
    }

    async fn lookup(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(self.state.lock().claims.get(key).cloned())
    }

    async fn note(&self, agent: &str, contact_id: &str) -> StoreResult<Option<String>> {
        Ok(self
            .state
            .lock()
            .notes
            .get(&note_key(agent, contact_id))
            .cloned())
    }

    async fn put_note(&self, agent: &str, contact_id: &str, notes: &str) -> StoreResult<()> {
        let key = note_key(agent, contact_id);
        self.state
            .lock()
            .notes
            .insert(key.clone(), notes.to_string());
        self.write(vec![Op::Note(key, notes.to_string())], vec![])
            .await
    }

    async fn events_after(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Event>> {
        let after = after.and_then(parse_event_id);
        let st = self.state.lock();
        let start = match after {
            None => 0,
            Some(a) => st
                .events
                .partition_point(|e| parse_event_id(&e.id).is_some_and(|id| id <= a)),
        };
        Ok(st.events.iter().skip(start).take(limit).cloned().collect())
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    async fn outbox_lease(
        &self,
        now: DateTime<Utc>,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<OutboxJob>> {
        let mut st = self.state.lock();
        let until = now + chrono::Duration::from_std(lease).unwrap_or_default();
        let mut due = vec![];
        for job in st.outbox.values_mut() {
            if due.len() >= limit {
                break;
            }
            if job.due_at <= now {
                let leased = job.clone();
                job.due_at = until;
                due.push(leased);
            }
        }
        Ok(due)
    }

    async fn outbox_reschedule(&self, job: &OutboxJob) -> StoreResult<()> {
        let op = {
            let mut st = self.state.lock();
            if !st.outbox.contains_key(&job.id) {
                return Ok(());
            }
            st.outbox.insert(job.id.clone(), job.clone());
            Op::Outbox(job.id.clone(), json(&OutboxRecord::V1(job.clone())))
        };
        self.write(vec![op], vec![]).await
    }

    async fn outbox_depth(&self) -> StoreResult<u64> {
        Ok(self.state.lock().outbox.len() as u64)
    }

    async fn put_blob(&self, id: &str, bytes: &[u8]) -> StoreResult<()> {
        self.write(vec![Op::Blob(id.to_string(), bytes.to_vec())], vec![])
            .await
    }

    async fn blob(&self, id: &str) -> StoreResult<Option<Vec<u8>>> {
        let db = self.db.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Vec<u8>>> {
            let r = db.begin_read()?;
            let t = r.open_table(BLOBS)?;
            Ok(t.get(id.as_str())?.map(|v| v.value().to_vec()))
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }

    async fn kv_get(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(self.state.lock().kv.get(key).cloned())
    }

    async fn kv_set(&self, key: &str, value: &str) -> StoreResult<()> {
        self.state
            .lock()
            .kv
            .insert(key.to_string(), value.to_string());
        self.write(vec![Op::Kv(key.to_string(), value.to_string())], vec![])
            .await
    }

    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        let mut st = self.state.lock();
        let now = Instant::now();
        match st.leases.get(name) {
            Some((holder, until)) if holder != owner && *until > now => Ok(false),
            _ => {
                st.leases
                    .insert(name.to_string(), (owner.to_string(), now + ttl));
                Ok(true)
            }
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        if self.writer.is_closed() {
            return Err(unavailable("the writer has stopped"));
        }
        Ok(())
    }
}
