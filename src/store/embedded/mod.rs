//! The embedded store: one node, no server to install.
//!
//! Engine: [redb](https://docs.rs/redb), a pure-Rust, ACID, copy-on-write
//! B-tree store that survives `kill -9`. It is well kept, has no C dependency
//! and needs no compaction thread, which suits a gateway that must start with
//! one command.
//!
//! Layout: all state is mirrored in memory (reads never touch disk, except
//! attachments). Changes are validated and applied to the mirror under one
//! mutex, then handed to a single writer thread that **group-commits** to a
//! write-ahead log ([`wal`]): it drains every pending change into one frame,
//! appends it to a preallocated segment and `fdatasync`s once, so a burst of
//! webhooks costs one small write and one flush, not a B-tree commit each. A
//! caller's future resolves only after its frame is durable; only then is its
//! webhook acknowledged and are its events published.
//!
//! A checkpointer thread folds the log into redb in the background: it
//! writes the latest value of each key in small non-durable transactions as
//! the log grows, and when a segment is closed (every second or so) it
//! commits the rest durably, records the segment it covered, and hands the
//! segment back to be reused. A restart
//! replays the segments newer than the last checkpoint. An interaction is
//! stored as a header plus one record per message, and a commit writes only
//! the messages that changed, so a new message costs the same however long
//! the conversation is. Message records are keyed in the order they were
//! first written, so new ones append to the end of their table.

use super::{Commit, Listed, OutboxJob, OutboxRecord, Store, StoreError, StoreResult};
use crate::domain::{parse_event_id, Contact, Event, Interaction, Message, StoredMessages};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use wal::{Op, Wal};

mod durability;
mod mirror;
mod wal;

const INTERACTIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("interactions");
/// Messages before this version, keyed by (case, index in the thread). Its
/// rows move to [`MESSAGE_LOG`] when a store is opened.
const MESSAGES: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("messages");
/// Messages keyed in the order they were first written (see
/// [`wal::LogKeys`]); a value is `case: u64 LE | index: u32 LE | JSON`.
const MESSAGE_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("message_log");
const CONTACTS: TableDefinition<&str, &[u8]> = TableDefinition::new("contacts");
/// Claims before this version, keyed by claim. Its rows move to
/// [`CLAIM_LOG`] when a store is opened.
const CLAIMS: TableDefinition<&str, &str> = TableDefinition::new("claims");
/// Claims as (key, value), keyed in the order they were written (see
/// [`wal::LogKeys`]); the latest row of a key holds its value.
const CLAIM_LOG: TableDefinition<u64, (&str, &str)> = TableDefinition::new("claim_log");
const EVENTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("events");
const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("outbox");
const NOTES: TableDefinition<&str, &str> = TableDefinition::new("notes");
/// Files (attachments, raw emails), in `blobs.redb`; the same table in
/// `switchboard.redb` holds those an earlier version stored, read only.
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
const KV: TableDefinition<&str, &str> = TableDefinition::new("kv");
/// `checkpointed`: the last log segment whose every change is in redb.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const FIRST_CASE_NUMBER: u64 = 1001;
/// redb's page cache. Reads are served from the mirror, so the cache only
/// speeds up the checkpointer's B-tree updates; redb's default (1 GiB)
/// would grow the process by that much for nothing.
const REDB_CACHE_BYTES: usize = 64 << 20;
/// The blob file's page cache: a file is written once and read seldom.
const BLOB_CACHE_BYTES: usize = 4 << 20;
/// The feed's newest events the store keeps in memory (with any not yet in
/// redb); a reader further behind reads the older ones from redb. Kept
/// all in memory, a week of events took about as much memory as the
/// messages themselves (each carries its message as JSON).
#[cfg(not(test))]
const EVENTS_IN_MEMORY: usize = 65_536;
#[cfg(test)]
const EVENTS_IN_MEMORY: usize = 16;
/// A log segment is closed and folded into redb once it is this old.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

struct WriteRequest {
    ops: Vec<Op>,
    events: Vec<Event>,
    /// Its number ([`durability::Durability::next`]).
    seq: u64,
}

#[derive(Default)]
struct State {
    /// Shared, so that a reader copies an interaction (its message list
    /// grows with the conversation) after letting go of the lock.
    interactions: mirror::Sharded<u64, Arc<Interaction>>,
    /// Which interactions each queue's and agent's lists start from.
    lists: mirror::Lists,
    contacts: mirror::Sharded<String, Contact>,
    contact_keys: mirror::Sharded<String, String>,
    claims: mirror::Sharded<String, String>,
    /// The feed's newest events (see [`EVENTS_IN_MEMORY`]).
    events: mirror::Ring<Event>,
    last_event: (u64, u64),
    outbox: BTreeMap<String, OutboxJob>,
    notes: HashMap<String, String>,
    kv: HashMap<String, String>,
    leases: HashMap<String, (String, Instant)>,
    next_case: u64,
    /// One copy of each channel's `{"id","kind"}` for all its events: the
    /// week of events the feed holds would otherwise keep one per event.
    channels: HashMap<String, Arc<serde_json::value::RawValue>>,
}

impl State {
    /// Keeps `e` in the feed, its channel shared with the other events of
    /// that channel.
    fn keep_event(&mut self, mut e: Event) {
        match self.channels.get(e.channel.get()) {
            Some(shared) => e.channel = shared.clone(),
            None => {
                self.channels
                    .insert(e.channel.get().to_owned(), e.channel.clone());
            }
        }
        self.events.push_back(e);
    }
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    /// Files, in a database of their own: redb takes one write transaction
    /// at a time per database, and the checkpointer, which runs only on
    /// idle cores while it keeps up (`SCHED_IDLE`), holds the main one for
    /// each step; under a full load a file would wait for it.
    blobs: Arc<Database>,
    state: Mutex<State>,
    /// Set when a log write failed. The mirror may then hold changes that
    /// never reached the disk, so from then on the store refuses commits and
    /// dedupe lookups (and `/readyz` fails) rather than answer from them:
    /// a provider's retry gets 503 and comes back after a restart, which
    /// replays the log up to its last good frame.
    broken: Arc<AtomicBool>,
    #[cfg(test)]
    fail_writes: Arc<AtomicBool>,
    writer: mpsc::UnboundedSender<WriteRequest>,
    /// Where the requests wait for the writer.
    durability: Arc<durability::Durability>,
    events: broadcast::Sender<Event>,
    retention: chrono::Duration,
    /// Every event up to this ID is in redb ([`wal::Feed`]).
    folded: Arc<Mutex<(u64, u64)>>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn note_key(agent: &str, contact_id: &str) -> String {
    format!("{agent}\u{1f}{contact_id}")
}

impl EmbeddedStore {
    /// Opens (or creates) the store in directory `dir`, keeping events at
    /// least `retention` long. Changes still in the log are replayed first.
    pub fn open(dir: &Path, retention: Duration) -> anyhow::Result<Arc<EmbeddedStore>> {
        std::fs::create_dir_all(dir)?;
        let db_file = dir.join("switchboard.redb");
        let db = open_db(&db_file)?;
        {
            let w = db.begin_write()?;
            w.open_table(INTERACTIONS)?;
            w.open_table(MESSAGES)?;
            w.open_table(MESSAGE_LOG)?;
            w.open_table(CONTACTS)?;
            w.open_table(CLAIMS)?;
            w.open_table(CLAIM_LOG)?;
            w.open_table(EVENTS)?;
            w.open_table(OUTBOX)?;
            w.open_table(NOTES)?;
            w.open_table(BLOBS)?;
            w.open_table(KV)?;
            w.open_table(META)?;
            w.commit()?;
        }
        let blobs = redb::Builder::new()
            .set_cache_size(BLOB_CACHE_BYTES)
            .create(dir.join("blobs.redb"))?;
        {
            let w = blobs.begin_write()?;
            w.open_table(BLOBS)?;
            w.commit()?;
        }
        let checkpointed = checkpointed(&db)?;
        migrate_message_keys(&db)?;
        migrate_claims(&db)?;
        let recovered = wal::recover(&dir.join("wal"), checkpointed)?;
        let mut next_seq = checkpointed + 1;
        if let Some(last) = recovered.last_seq {
            // Only a replay needs the message keys before everything is read.
            let mut keys = wal::LogKeys::load(&db)?;
            let mut pending = wal::Pending::default();
            for ops in recovered.frames {
                pending.add(ops);
            }
            pending.flush(&db, &mut keys, Some(last))?;
            next_seq = last + 1;
        }
        // One pass over redb fills the mirror and the message keys.
        let Loaded {
            state,
            mut keys,
            inline_messages,
        } = load(&db)?;
        if inline_messages {
            // The mirror has them already; redb's copy moves them once.
            migrate_inline_messages(&db, &mut keys)?;
        }
        let db = Arc::new(db);
        let (tx, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(4096);
        let log = Wal::open(&dir.join("wal"), recovered.slots, next_seq)?;
        #[cfg(test)]
        let fail_writes = log.fail.clone();
        let (ck_tx, ck_rx) = std::sync::mpsc::channel();
        let ck_db = db.clone();
        let ck_free = log.free_slots();
        // Everything loaded is in redb.
        let folded = Arc::new(Mutex::new(state.last_event));
        let feed = wal::Feed {
            folded: folded.clone(),
            retention,
        };
        std::thread::Builder::new()
            .name("embedded-checkpoint".into())
            .spawn(move || wal::checkpointer(ck_db, keys, db_file, ck_rx, ck_free, feed))?;
        let writer_db = db.clone();
        let writer_events = events.clone();
        let broken = Arc::new(AtomicBool::new(false));
        let writer_broken = broken.clone();
        let durability = Arc::new(durability::Durability::default());
        let writer_durability = durability.clone();
        std::thread::Builder::new()
            .name("embedded-writer".into())
            .spawn(move || {
                writer_loop(
                    writer_db,
                    log,
                    rx,
                    ck_tx,
                    writer_events,
                    writer_broken,
                    writer_durability,
                )
            })?;
        Ok(Arc::new(EmbeddedStore {
            db,
            blobs: Arc::new(blobs),
            state: Mutex::new(state),
            broken,
            #[cfg(test)]
            fail_writes,
            writer: tx,
            durability,
            events,
            retention: chrono::Duration::from_std(retention)?,
            folded,
        }))
    }

    /// The interactions of `queues` and `agent`'s (with `waiting`, only
    /// those `in_queue`) as a list shows them: copied after the lock is let
    /// go, without their messages but the latest.
    fn listed(&self, queues: &[String], agent: Option<&str>, waiting: bool) -> Vec<Listed> {
        let shared: Vec<Arc<Interaction>> = {
            let st = self.state.lock();
            st.lists
                .cases(queues, agent, waiting)
                .into_iter()
                .filter_map(|case| st.interactions.get(&case).cloned())
                .collect()
        };
        shared
            .into_iter()
            .map(|i| Listed {
                interaction: i.without_messages(),
                last_message: i.messages.last().cloned(),
            })
            .collect()
    }

    fn usable(&self) -> StoreResult<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(unavailable(
                "a write to the log failed; restart the gateway to recover from the log",
            ));
        }
        if self.writer.is_closed() {
            return Err(unavailable("the writer has stopped"));
        }
        Ok(())
    }

    /// Queues `ops` for the log. Callers hold the state lock while they
    /// apply the ops to the mirror and queue them, so that the log takes
    /// changes in the order they were applied: a later change to a record
    /// never comes before an earlier one (which replay, and the
    /// checkpointer, would otherwise let win).
    /// One change outside a [`Store::commit`]: `apply` changes the mirror
    /// and returns the op that logs it (`None`: nothing to change), under the
    /// state lock, and the call returns once the op is durable. A store that
    /// can no longer write (see `broken`) refuses before anything is applied,
    /// as `commit` does: the mirror never shows a change the log lacks.
    async fn write_one(&self, apply: impl FnOnce(&mut State) -> Option<Op>) -> StoreResult<()> {
        let durable = {
            let mut st = self.state.lock();
            self.usable()?;
            match apply(&mut st) {
                Some(op) => self.queue(vec![op], vec![])?,
                None => return Ok(()),
            }
        };
        durable.wait().await
    }

    fn queue(&self, ops: Vec<Op>, events: Vec<Event>) -> StoreResult<Durable> {
        let seq = self.durability.next();
        self.writer
            .send(WriteRequest { ops, events, seq })
            .map_err(|_| unavailable("the writer has stopped"))?;
        Ok(Durable(self.durability.wait(seq)))
    }
}

/// A queued write, until the log has made it durable.
struct Durable(durability::Wait);

impl Durable {
    async fn wait(self) -> StoreResult<()> {
        self.0.await.map_err(unavailable)
    }
}

/// Opens (or creates) the redb file. A file from before redb 5 (file format
/// v2, written by redb 2) is upgraded in place once, with redb 2.6's own
/// upgrade, before redb 5 opens it: every table's key and value types are
/// stored the same way in both.
fn open_db(file: &Path) -> anyhow::Result<Database> {
    let open = || {
        redb::Builder::new()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(file)
    };
    match open() {
        Err(redb::DatabaseError::UpgradeRequired(version)) => {
            tracing::info!(version, file = %file.display(), "upgrading the store's redb file format");
            let mut old = redb2::Database::open(file)?;
            old.upgrade()?;
            drop(old);
            Ok(open()?)
        }
        other => Ok(other?),
    }
}

/// Interactions stored before messages had a table of their own carry them
/// inline; they move to the message table once, so that a commit writing
/// only the changed messages never loses the others.
fn migrate_inline_messages(db: &Database, keys: &mut wal::LogKeys) -> anyhow::Result<()> {
    let mut inline = vec![];
    {
        let r = db.begin_read()?;
        for row in r.open_table(INTERACTIONS)?.iter()? {
            let (_, v) = row?;
            let i: Interaction = serde_json::from_slice(v.value())?;
            if !i.messages.is_empty() {
                inline.push(i);
            }
        }
    }
    if inline.is_empty() {
        return Ok(());
    }
    let mut pending = wal::Pending::default();
    for mut i in inline {
        let case = i.case_number;
        let messages = std::mem::take(&mut i.messages);
        let mut ops = vec![Op::Interaction(case, json(&i))];
        for (index, m) in messages.iter().enumerate() {
            // A message row already there is newer than the inline copy.
            if !keys.contains(case, index as u32) {
                ops.push(Op::Message(case, index as u32, json(&**m)));
            }
        }
        pending.add(ops);
    }
    // Durable, recording the same checkpoint as before.
    pending.flush(db, keys, Some(checkpointed(db)?))
}

/// The last log segment whose every change is in redb (0: none yet).
fn checkpointed(db: &Database) -> anyhow::Result<u64> {
    Ok(db
        .begin_read()?
        .open_table(META)?
        .get("checkpointed")?
        .map(|v| v.value())
        .unwrap_or(0))
}

/// Messages stored by (case, index) move to the message log, in that order,
/// in one transaction: the first open after an upgrade does it once.
fn migrate_message_keys(db: &Database) -> anyhow::Result<()> {
    let w = db.begin_write()?;
    let moved = {
        let mut old = w.open_table(MESSAGES)?;
        let mut log = w.open_table(MESSAGE_LOG)?;
        let first = log.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
        let mut moved = 0u64;
        for row in old.iter()? {
            let (k, v) = row?;
            let (case, index) = k.value();
            let row = wal::message_value(case, index, v.value());
            log.insert(first + moved, row.as_slice())?;
            moved += 1;
        }
        old.retain(|_, _| false)?;
        moved
    };
    finish_move(w, moved, "messages", "the message log")
}

/// Claims stored by key move to the claims log, in one transaction: the
/// first open after an upgrade does it once.
fn migrate_claims(db: &Database) -> anyhow::Result<()> {
    let w = db.begin_write()?;
    let moved = {
        let mut old = w.open_table(CLAIMS)?;
        let mut log = w.open_table(CLAIM_LOG)?;
        let first = log.last()?.map(|(k, _)| k.value() + 1).unwrap_or(1);
        let mut moved = 0u64;
        for row in old.iter()? {
            let (k, v) = row?;
            log.insert(first + moved, (k.value(), v.value()))?;
            moved += 1;
        }
        old.retain(|_, _| false)?;
        moved
    };
    finish_move(w, moved, "claims", "the claims log")
}

/// Ends a move of rows to a log: commits it if it moved any (and says so),
/// leaves the file untouched if not.
fn finish_move(w: redb::WriteTransaction, moved: u64, what: &str, to: &str) -> anyhow::Result<()> {
    if moved == 0 {
        w.abort()?;
        return Ok(());
    }
    w.commit()?;
    tracing::info!(rows = moved, "moved the stored {what} to {to}");
    Ok(())
}

/// What one pass over redb gives.
struct Loaded {
    state: State,
    keys: wal::LogKeys,
    /// Some interaction still carries its messages inline (stored before
    /// messages had a table of their own).
    inline_messages: bool,
}

/// Reads the checkpointed state from redb into the in-memory mirror.
fn load(db: &Database) -> anyhow::Result<Loaded> {
    let mut state = State {
        next_case: FIRST_CASE_NUMBER,
        ..State::default()
    };
    let mut inline_messages = false;
    let r = db.begin_read()?;
    for row in r.open_table(INTERACTIONS)?.iter()? {
        let (k, v) = row?;
        let i: Interaction = serde_json::from_slice(v.value())?;
        inline_messages |= !i.messages.is_empty();
        state.next_case = state.next_case.max(k.value() + 1);
        state.interactions.insert(k.value(), Arc::new(i));
    }
    // Messages in (case, index) order. Records written before messages had
    // their own table carry them inline; a row replaces or extends those.
    let mut keys = wal::LogKeys::default();
    let mut messages = vec![];
    for row in r.open_table(MESSAGE_LOG)?.iter()? {
        let (k, v) = row?;
        let (case, index, json) = wal::split_message_value(v.value())?;
        keys.found(k.value(), case, index);
        let m: Arc<Message> = serde_json::from_slice(json)?;
        messages.push((case, index, m));
    }
    messages.sort_unstable_by_key(|(case, index, _)| (*case, *index));
    for (case, index, m) in messages {
        if let Some(i) = state.interactions.get_mut(&case) {
            let i = Arc::make_mut(i);
            let index = index as usize;
            if index < i.messages.len() {
                i.messages[index] = m;
            } else if index == i.messages.len() {
                i.messages.push(m);
            } else {
                anyhow::bail!("case {case}: message {index} stored without the ones before it");
            }
        }
    }
    for row in r.open_table(CONTACTS)?.iter()? {
        let (k, v) = row?;
        let c: Contact = serde_json::from_slice(v.value())?;
        state
            .contact_keys
            .insert(c.id.clone(), k.value().to_string());
        state.contacts.insert(k.value().to_string(), c);
    }
    for row in r.open_table(CLAIM_LOG)?.iter()? {
        let (k, v) = row?;
        keys.found_claim(k.value());
        let (claim, value) = v.value();
        state.claims.insert(claim.to_string(), value.to_string());
    }
    // Only the newest events: a reader further behind reads redb.
    let mut newest = vec![];
    for row in r.open_table(EVENTS)?.iter()?.rev().take(EVENTS_IN_MEMORY) {
        let (k, v) = row?;
        state.last_event = state.last_event.max(k.value());
        newest.push(serde_json::from_slice(v.value())?);
    }
    for e in newest.into_iter().rev() {
        state.keep_event(e);
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
    let State {
        lists,
        interactions,
        ..
    } = &mut state;
    for i in interactions.values() {
        lists.place(None, i);
    }
    Ok(Loaded {
        state,
        keys,
        inline_messages,
    })
}

/// After a group that held more than one write, the next group starts no
/// sooner than this after it. Under a heavy load the log would otherwise be
/// flushed as fast as the disk allows, a few webhooks at a time, and each
/// flush costs CPU (on a VM, exits to the host) and wakes every request
/// thread: on 2 cores at full load this gap about halved the writer's CPU per
/// webhook. At 1,000 webhooks/s a group mostly holds one write, and a group
/// after a group of one is written at once.
const GROUP_GAP: Duration = Duration::from_micros(500);

/// The group-commit loop: one log frame and one `fdatasync` for everything
/// pending. Closed segments go to the checkpointer.
fn writer_loop(
    db: Arc<Database>,
    mut log: Wal,
    mut rx: mpsc::UnboundedReceiver<WriteRequest>,
    checkpointer: std::sync::mpsc::Sender<wal::ToCheckpointer>,
    events: broadcast::Sender<Event>,
    broken: Arc<AtomicBool>,
    durability: Arc<durability::Durability>,
) {
    // However this loop ends (a panic included), no request is left waiting
    // for it.
    struct Stopped(Arc<durability::Durability>);
    impl Drop for Stopped {
        fn drop(&mut self) {
            self.0.failed(1, "the writer has stopped".into());
        }
    }
    let _stopped = Stopped(durability.clone());
    let mut handoff = Handoff {
        to: checkpointer,
        ops: vec![],
        since: Instant::now(),
    };
    // When the previous group began, and whether it held several writes.
    let mut last_start = Instant::now();
    let mut concurrent = false;
    while let Some(first) = rx.blocking_recv() {
        if concurrent {
            // Writes are arriving together: let more join this group (see
            // `GROUP_GAP`).
            let due = last_start + GROUP_GAP;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        last_start = Instant::now();
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        concurrent = batch.len() > 1;
        let ops: Vec<Op> = batch
            .iter_mut()
            .flat_map(|r| std::mem::take(&mut r.ops))
            .collect();
        let result = match log.append(&ops) {
            Ok(closed) => {
                if let Some(closed) = closed {
                    handoff.segment_end(closed);
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "embedded store: a log write failed; refusing writes until restart");
                // Before anyone hears of the failure: nothing may be answered
                // from the mirror's unwritten changes after this.
                broken.store(true, Ordering::SeqCst);
                Err(e.to_string())
            }
        };
        let (first, last) = (batch[0].seq, batch[batch.len() - 1].seq);
        match result {
            Ok(()) => {
                for req in batch {
                    for e in req.events {
                        let _ = events.send(e);
                    }
                }
                durability.done(last);
            }
            Err(why) => {
                // Fail-stop: a later frame must never be durable without
                // this one, so every write from this group on fails.
                durability.failed(first, why);
                break;
            }
        }
        handoff.add(ops);
        if log.age() >= CHECKPOINT_EVERY {
            rotate(&mut log, &mut handoff);
        }
    }
    // The store was dropped: fold what is left into redb before letting go of it.
    let _ = handoff.to.send(wal::ToCheckpointer::Closing);
    rotate(&mut log, &mut handoff);
    drop(handoff);
    drop(db);
}

/// Durable ops on their way to the checkpointer, handed over in bundles:
/// at 1,000 webhooks/s a group commit usually holds one webhook, and waking
/// the checkpointer for each cost as much CPU as the commit itself.
struct Handoff {
    to: std::sync::mpsc::Sender<wal::ToCheckpointer>,
    ops: Vec<Op>,
    /// When the oldest op waiting here was added.
    since: Instant,
}

/// A bundle goes to the checkpointer once it holds this many ops ...
const HANDOFF_OPS: usize = 256;
/// ... or its oldest op has waited this long, or its segment ends.
const HANDOFF_EVERY: Duration = Duration::from_millis(50);

impl Handoff {
    fn add(&mut self, ops: Vec<Op>) {
        if self.ops.is_empty() {
            self.since = Instant::now();
        }
        self.ops.extend(ops);
        if self.ops.len() >= HANDOFF_OPS || self.since.elapsed() >= HANDOFF_EVERY {
            self.send_ops();
        }
    }

    fn send_ops(&mut self) {
        if !self.ops.is_empty() {
            let _ = self
                .to
                .send(wal::ToCheckpointer::Ops(std::mem::take(&mut self.ops)));
        }
    }

    /// The segment's ops first, then its end.
    fn segment_end(&mut self, closed: wal::Closed) {
        self.send_ops();
        let _ = self.to.send(wal::ToCheckpointer::SegmentEnd(closed));
    }
}

fn rotate(log: &mut Wal, handoff: &mut Handoff) {
    match log.rotate() {
        Ok(Some(closed)) => handoff.segment_end(closed),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "could not start a new log segment"),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records always serialize")
}

/// An interaction as the commit will store it, serialized before the state
/// lock is taken: its header (the JSON without messages) and each message
/// no other copy shares (a new or changed one).
struct Prepared {
    interaction: Interaction,
    /// The version the stored interaction must have.
    expected: u64,
    /// For an interaction handed out with messages left out
    /// ([`StoredMessages::partial`]): how many messages the stored one has,
    /// and which of them `interaction.messages[0]` is, if one was handed
    /// out; the other `interaction.messages` go after the stored ones.
    partial: Option<(usize, Option<usize>)>,
    header: Vec<u8>,
    /// The JSON of each message no other copy shares, by index, in order
    /// (usually the one just added: nothing is collected per message the
    /// conversation already had).
    fresh: Vec<(usize, Vec<u8>)>,
}

impl Prepared {
    fn new(mut i: Interaction) -> Prepared {
        let expected = i.version;
        let partial = i.stored.partial();
        i.version += 1;
        let messages = std::mem::take(&mut i.messages);
        let header = json(&i);
        i.messages = messages;
        let fresh = i
            .messages
            .iter()
            .enumerate()
            .filter(|(_, m)| Arc::strong_count(m) == 1)
            .map(|(index, m)| (index, json(&**m)))
            .collect();
        Prepared {
            interaction: i,
            expected,
            partial,
            header,
            fresh,
        }
    }

    /// For an interaction handed out with messages left out: the ops that
    /// store its header, the one stored message it was handed out with (if
    /// that changed) and its messages after the `stored` ones, and the
    /// stored interaction updated in place (copied first only if a reader
    /// holds it).
    fn append(self, ops: &mut Vec<Op>, stored: &mut Arc<Interaction>) {
        let case = self.interaction.case_number;
        let one = self.partial.and_then(|(_, one)| one);
        ops.push(Op::Interaction(case, self.header));
        let mut fresh = self.fresh.into_iter().peekable();
        let mut committed = self.interaction;
        let target = Arc::make_mut(stored);
        let mut messages = std::mem::take(&mut target.messages);
        let mut given = committed.messages.drain(..).enumerate();
        if let Some(index) = one {
            if let Some((n, m)) = given.next() {
                let fresh_row = fresh.next_if(|(i, _)| *i == n).map(|(_, row)| row);
                if !Arc::ptr_eq(&messages[index], &m) {
                    let row = fresh_row.unwrap_or_else(|| json(&*m));
                    ops.push(Op::Message(case, index as u32, row));
                    messages[index] = m;
                }
            }
        }
        for (n, m) in given {
            let row = match fresh.next_if(|(i, _)| *i == n) {
                Some((_, row)) => row,
                None => json(&*m),
            };
            ops.push(Op::Message(case, messages.len() as u32, row));
            messages.push(m);
        }
        committed.messages = messages;
        committed.stored = StoredMessages::default();
        *target = committed;
    }

    /// The ops that store it over `old`: the header, and each message that
    /// differs from the stored one.
    fn ops(self, ops: &mut Vec<Op>, old: Option<&Interaction>) -> Interaction {
        let case = self.interaction.case_number;
        ops.push(Op::Interaction(case, self.header));
        let old = old.map(|o| o.messages.as_slice()).unwrap_or_default();
        let mut fresh = self.fresh.into_iter().peekable();
        for (index, m) in self.interaction.messages.iter().enumerate() {
            let row = fresh.next_if(|(n, _)| *n == index).map(|(_, row)| row);
            // A message that was not touched is the same allocation as the stored one.
            let same = old.get(index).is_some_and(|o| Arc::ptr_eq(o, m) || o == m);
            if !same {
                let row = row.unwrap_or_else(|| json(&**m));
                ops.push(Op::Message(case, index as u32, row));
            }
        }
        self.interaction
    }
}

/// A stored event's JSON from its draft's JSON: the ID put first, as
/// serializing the [`Event`] would give, without serializing it again.
fn event_json(id: &str, draft: &[u8]) -> Vec<u8> {
    debug_assert!(draft.starts_with(b"{\"") && draft.len() > 2);
    let mut out = Vec::with_capacity(draft.len() + id.len() + 8);
    out.extend_from_slice(b"{\"id\":");
    serde_json::to_writer(&mut out, id).expect("a string serializes");
    out.push(b',');
    out.extend_from_slice(&draft[1..]);
    out
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn commit(&self, mut commit: Commit) -> StoreResult<Vec<Event>> {
        // Serialize first: the other request threads wait on the lock below
        // only for the checks and the bookkeeping.
        let contact = commit.contact.take().map(|mut c| {
            let expected = c.version;
            let row = (!commit.contact_unchanged).then(|| {
                c.version += 1;
                json(&c)
            });
            (expected, c, row)
        });
        let interaction = commit.interaction.take().map(Prepared::new);
        let drafts: Vec<_> = commit
            .events
            .drain(..)
            .map(|d| {
                let row = json(&d);
                (d, row)
            })
            .collect();
        let mut ops = vec![];
        for job in commit.outbox_add.iter() {
            ops.push(Op::Outbox(
                job.id.clone(),
                json(&OutboxRecord::V1(job.clone())),
            ));
        }
        let mut stored_events = vec![];
        // What the commit replaces, dropped once the lock is let go: a long
        // conversation's message list takes a while to let go of.
        let mut replaced = (None, None);
        let durable = {
            let mut st = self.state.lock();
            self.usable()?;
            // Validate everything first: nothing is applied unless all of it holds.
            for claim in &commit.claims {
                if let Some(value) = st.claims.get(&claim.key) {
                    return Err(StoreError::Duplicate {
                        key: claim.key.clone(),
                        value: value.clone(),
                    });
                }
            }
            if let Some((expected, c, _)) = &contact {
                let current = st.contacts.get(&c.key).map(|c| c.version).unwrap_or(0);
                if current != *expected {
                    return Err(StoreError::Conflict);
                }
            }
            if let Some(p) = &interaction {
                let stored = st.interactions.get(&p.interaction.case_number);
                let current = stored.map(|i| i.version).unwrap_or(0);
                if current != p.expected {
                    return Err(StoreError::Conflict);
                }
                // Messages go after the ones it was handed out with, which a
                // stored interaction of the same version holds.
                if let Some((count, _)) = p.partial {
                    if Some(count) != stored.map(|i| i.messages.len()) {
                        return Err(StoreError::Conflict);
                    }
                }
            }
            // Apply.
            for claim in commit.claims.drain(..).chain(commit.index.drain(..)) {
                // An index entry that already says this (a contact's
                // alias, written with every message) needs no new row.
                if st.claims.get(&claim.key) == Some(&claim.value) {
                    continue;
                }
                ops.push(Op::Claim(claim.key.clone(), claim.value.clone()));
                st.claims.insert(claim.key, claim.value);
            }
            if let Some((_, c, Some(row))) = contact {
                ops.push(Op::Contact(c.key.clone(), row));
                st.contact_keys.insert(c.id.clone(), c.key.clone());
                replaced.0 = st.contacts.insert(c.key.clone(), c);
            }
            if let Some(p) = interaction {
                let case = p.interaction.case_number;
                let State {
                    lists,
                    interactions,
                    ..
                } = &mut *st;
                lists.place(interactions.get(&case).map(|i| &**i), &p.interaction);
                st.next_case = st.next_case.max(case + 1);
                match (p.partial, st.interactions.get_mut(&case)) {
                    (Some(_), Some(stored)) => p.append(&mut ops, stored),
                    _ => {
                        let i = p.ops(&mut ops, st.interactions.get(&case).map(|i| &**i));
                        replaced.1 = st.interactions.insert(case, Arc::new(i));
                    }
                }
            }
            for job in commit.outbox_add.drain(..) {
                st.outbox.insert(job.id.clone(), job);
            }
            for id in commit.outbox_remove.drain(..) {
                ops.push(Op::DropOutbox(id.clone()));
                st.outbox.remove(&id);
            }
            let now_ms = Utc::now().timestamp_millis() as u64;
            for (draft, row) in drafts {
                let (ms, seq) = st.last_event;
                let id = if now_ms > ms {
                    (now_ms, 0)
                } else {
                    (ms, seq + 1)
                };
                st.last_event = id;
                let event = Event::from_draft(format!("{}-{}", id.0, id.1), draft);
                ops.push(Op::Event(id, event_json(&event.id, &row)));
                st.keep_event(event);
                stored_events.push(st.events.back().expect("just kept").clone());
            }
            // Memory keeps the newest events and those not yet in redb
            // (the checkpointer removes expired ones from redb), a few at
            // a time.
            let horizon = Utc::now() - self.retention;
            let folded = (st.events.len() > EVENTS_IN_MEMORY).then(|| *self.folded.lock());
            for _ in 0..64 {
                let Some(front) = st.events.front() else {
                    break;
                };
                let expired = front.at < horizon;
                let spare = st.events.len() > EVENTS_IN_MEMORY
                    && parse_event_id(&front.id).is_some_and(|id| Some(id) <= folded);
                if !(expired || spare) {
                    break;
                }
                st.events.pop_front();
            }
            // Events go to subscribers after the write; with none listening
            // (no agent connected, no sink), there is nothing to copy.
            let publish = if self.events.receiver_count() > 0 {
                stored_events.clone()
            } else {
                vec![]
            };
            self.queue(ops, publish)?
        };
        drop(replaced);
        durable.wait().await?;
        Ok(stored_events)
    }

    async fn next_case_number(&self) -> StoreResult<u64> {
        let mut st = self.state.lock();
        let n = st.next_case;
        st.next_case += 1;
        Ok(n)
    }

    async fn interaction(&self, case_number: u64) -> StoreResult<Option<Interaction>> {
        let shared = self.state.lock().interactions.get(&case_number).cloned();
        Ok(shared.map(Arc::unwrap_or_clone))
    }

    /// The interaction without its messages, to append to: a long
    /// conversation's message list is neither copied out nor compared.
    async fn interaction_to_append(&self, case_number: u64) -> StoreResult<Option<Interaction>> {
        let shared = self.state.lock().interactions.get(&case_number).cloned();
        Ok(shared.map(|i| {
            let mut header = i.without_messages();
            header.stored = StoredMessages::left_out(i.messages.len());
            header
        }))
    }

    async fn interaction_with_message(
        &self,
        case_number: u64,
        message_id: &str,
    ) -> StoreResult<Option<Interaction>> {
        let shared = self.state.lock().interactions.get(&case_number).cloned();
        Ok(shared.map(|i| {
            let mut header = i.without_messages();
            let count = i.messages.len();
            // A delivery's news is about a recent message: look from the end.
            header.stored = match i.messages.iter().rposition(|m| m.id == message_id) {
                Some(index) => {
                    header.messages = vec![i.messages[index].clone()];
                    StoredMessages::one_of(index, count)
                }
                None => StoredMessages::left_out(count),
            };
            header
        }))
    }

    async fn interactions_for(
        &self,
        queues: &[String],
        agent: Option<&str>,
    ) -> StoreResult<Vec<Listed>> {
        Ok(self.listed(queues, agent, false))
    }

    async fn waiting_for(
        &self,
        queues: &[String],
        agent: Option<&str>,
    ) -> StoreResult<Vec<Listed>> {
        Ok(self.listed(queues, agent, true))
    }

    async fn tags_for(&self, queues: &[String], agent: Option<&str>) -> StoreResult<Vec<String>> {
        Ok(self.state.lock().lists.tags(queues, agent))
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
        self.usable()?;
        Ok(self.state.lock().claims.get(key).cloned())
    }

    async fn lookup_and_contact(
        &self,
        claim: &str,
        contact_key: &str,
    ) -> StoreResult<(Option<String>, Option<Contact>)> {
        self.usable()?;
        let st = self.state.lock();
        Ok((
            st.claims.get(claim).cloned(),
            st.contacts.get(contact_key).cloned(),
        ))
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
        self.write_one(|st| {
            st.notes.insert(key.clone(), notes.to_string());
            Some(Op::Note(key, notes.to_string()))
        })
        .await
    }

    async fn events_after(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Event>> {
        let after = after.and_then(parse_event_id);
        let (first_kept, kept) = {
            let st = self.state.lock();
            let start = match after {
                None => 0,
                Some(a) => st
                    .events
                    .partition_point(|e| parse_event_id(&e.id).is_some_and(|id| id <= a)),
            };
            let first_kept = st.events.front().and_then(|e| parse_event_id(&e.id));
            let kept: Vec<Event> = st.events.iter_from(start).take(limit).cloned().collect();
            (first_kept, kept)
        };
        // Whether events before the ones in memory may follow `after`:
        // those are in redb (memory lets go only of events folded there).
        let older = match (after, first_kept) {
            (Some(a), Some(first)) => a < first,
            (None, Some(_)) | (_, None) => true,
        };
        if !older || limit == 0 {
            return Ok(kept);
        }
        let db = self.db.clone();
        let horizon = (Utc::now() - self.retention).timestamp_millis().max(0) as u64;
        let mut out = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Event>> {
            use std::ops::Bound::{Excluded, Unbounded};
            let r = db.begin_read()?;
            let table = r.open_table(EVENTS)?;
            let from: std::ops::Bound<(u64, u64)> = after.map_or(Unbounded, Excluded);
            let to = first_kept.map_or(Unbounded, Excluded);
            let mut out = vec![];
            for row in table.range((from, to))? {
                let (k, v) = row?;
                // Expired, and not yet removed.
                if k.value().0 < horizon {
                    continue;
                }
                out.push(serde_json::from_slice(v.value())?);
                if out.len() == limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
        let room = limit - out.len();
        out.extend(kept.into_iter().take(room));
        Ok(out)
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
        let row = json(&OutboxRecord::V1(job.clone()));
        self.write_one(|st| {
            // A job finished meanwhile stays finished.
            let held = st.outbox.get_mut(&job.id)?;
            *held = job.clone();
            Some(Op::Outbox(job.id.clone(), row))
        })
        .await
    }

    async fn outbox_depth(&self) -> StoreResult<u64> {
        Ok(self.state.lock().outbox.len() as u64)
    }

    /// Attachments go straight into redb in a durable transaction of their
    /// own (they are large and read from disk, never from the log), before
    /// the commit that refers to them.
    async fn put_blob(&self, id: &str, bytes: &[u8]) -> StoreResult<()> {
        let db = self.blobs.clone();
        let id = id.to_string();
        let bytes = bytes.to_vec();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let w = db.begin_write()?;
            w.open_table(BLOBS)?.insert(id.as_str(), bytes.as_slice())?;
            w.commit()?;
            Ok(())
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }

    async fn blob(&self, id: &str) -> StoreResult<Option<Vec<u8>>> {
        let dbs = [self.blobs.clone(), self.db.clone()];
        let id = id.to_string();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Vec<u8>>> {
            // The blob file, then what an earlier version kept in the main one.
            for db in dbs {
                let r = db.begin_read()?;
                let t = r.open_table(BLOBS)?;
                let found = t.get(id.as_str())?.map(|v| v.value().to_vec());
                if found.is_some() {
                    return Ok(found);
                }
            }
            Ok(None)
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }

    async fn kv_get(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(self.state.lock().kv.get(key).cloned())
    }

    async fn kv_set(&self, key: &str, value: &str) -> StoreResult<()> {
        self.write_one(|st| {
            st.kv.insert(key.to_string(), value.to_string());
            Some(Op::Kv(key.to_string(), value.to_string()))
        })
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
        self.usable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Claim;
    use redb::ReadableTableMetadata;

    fn claim(key: &str) -> Commit {
        Commit {
            claims: vec![Claim {
                key: key.into(),
                value: "1001:m".into(),
            }],
            ..Commit::default()
        }
    }

    /// The checkpointer yields to the threads answering webhooks.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_checkpointer_runs_at_a_lower_priority() {
        // Lowered: SCHED_IDLE, and nice 10 steps down (kept for when it
        // returns to SCHED_OTHER).
        // Only where a thread may raise its priority again (root: CI and the
        // benchmark) does the checkpointer lower it (see `wal::Priority`).
        // SAFETY: a plain system call.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        store.commit(claim("msg:sms:SMnice")).await.unwrap();
        let own = wal::nice_in("/proc/thread-self/stat");
        // Other tests' stores have checkpointers of their own (some just
        // starting): this store's is among them, lowered.
        let lowered = (own + 10).min(19);
        let mut seen = vec![];
        for _ in 0..100 {
            seen = wal::threads_named("embedded-checkp");
            if seen.contains(&(lowered, libc::SCHED_IDLE)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            seen.contains(&(lowered, libc::SCHED_IDLE)),
            "checkpointers' (nice, policy) {seen:?}; this thread's nice is {own}"
        );
        drop(store);
    }

    /// A data directory from a Switchboard on redb 2 (file format v2) opens
    /// with its records, upgraded in place, and stays writable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_written_by_redb_2_is_upgraded_and_keeps_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("switchboard.redb");
        {
            let db = redb2::Database::create(&file).unwrap();
            let w = db.begin_write().unwrap();
            {
                let claims: redb2::TableDefinition<&str, &str> =
                    redb2::TableDefinition::new("claims");
                let mut t = w.open_table(claims).unwrap();
                t.insert("msg:sms:SMold", "1001:m").unwrap();
                let interactions: redb2::TableDefinition<u64, &[u8]> =
                    redb2::TableDefinition::new("interactions");
                let mut t = w.open_table(interactions).unwrap();
                t.insert(1001, json(&case_1001()).as_slice()).unwrap();
                let messages: redb2::TableDefinition<(u64, u32), &[u8]> =
                    redb2::TableDefinition::new("messages");
                let mut t = w.open_table(messages).unwrap();
                let m = serde_json::json!({"id": "m", "direction": "inbound",
                    "text": "from before the upgrade", "sent_at": Utc::now(),
                    "status": "received", "provider_id": "SMold"});
                t.insert((1001, 0), json(&m).as_slice()).unwrap();
            }
            w.commit().unwrap();
        }
        assert!(
            matches!(
                redb::Database::open(&file),
                Err(redb::DatabaseError::UpgradeRequired(_))
            ),
            "the fixture must be in the old format"
        );
        let store = EmbeddedStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert_eq!(
            store.lookup("msg:sms:SMold").await.unwrap().as_deref(),
            Some("1001:m")
        );
        let i = store.interaction(1001).await.unwrap().expect("case 1001");
        assert_eq!(i.messages.len(), 1);
        assert_eq!(i.messages[0].text, "from before the upgrade");
        store.commit(claim("msg:sms:SMnew")).await.unwrap();
        assert_eq!(store.next_case_number().await.unwrap(), 1002);
    }

    /// The redb file of a dropped store, once its threads let go of it.
    async fn open_closed(dir: &Path) -> Database {
        let file = dir.join("switchboard.redb");
        for _ in 0..100 {
            if let Ok(db) = Database::open(&file) {
                return db;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the store did not let go of its file");
    }

    async fn reopen(dir: &Path) -> Arc<EmbeddedStore> {
        // The writer thread lets go of the file shortly after a drop.
        for _ in 0..100 {
            if let Ok(s) = EmbeddedStore::open(dir, Duration::from_secs(3600)) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the store did not reopen");
    }

    /// A new SMS interaction, case 1001, without messages.
    pub(super) fn case_1001() -> Interaction {
        Interaction::new(crate::domain::NewInteraction {
            case_number: 1001,
            channel_id: "sms-main".into(),
            channel_kind: crate::domain::ChannelKind::Sms,
            digital_id: "+15551230000".into(),
            contact_id: "c1".into(),
            contact_name: None,
            queue: "support".into(),
            now: Utc::now(),
        })
    }

    /// A commit of `i` alone.
    fn commit(i: Interaction) -> Commit {
        Commit {
            interaction: Some(i),
            ..Commit::default()
        }
    }

    fn message(text: &str) -> Arc<Message> {
        Arc::new(
            serde_json::from_value(serde_json::json!({"id": crate::domain::new_id(),
                "direction": "inbound", "text": text, "sent_at": Utc::now(),
                "status": "received"}))
            .unwrap(),
        )
    }

    /// (rows in the old (case, index) table, rows in the message log)
    fn message_rows(db: &Database) -> (u64, u64) {
        let r = db.begin_read().unwrap();
        (
            r.open_table(MESSAGES).unwrap().len().unwrap(),
            r.open_table(MESSAGE_LOG).unwrap().len().unwrap(),
        )
    }

    fn texts(i: &Interaction) -> Vec<&str> {
        i.messages.iter().map(|m| m.text.as_str()).collect()
    }

    /// If this fails, the log and redb keep events in another form than
    /// the one the feed serves, and an event read back after a restart
    /// differs from the one agents saw.
    #[test]
    fn an_event_row_is_the_event_serialized() {
        let i = case_1001();
        let draft = crate::domain::EventDraft::new(
            "message.received",
            Utc::now(),
            i.case_number,
            &i.channel_ref(),
            &serde_json::json!({"message": {"text": "a \"quoted\" text, ünïcode"}}),
        );
        let row = event_json("1733500000000-7", &json(&draft));
        let event = Event::from_draft("1733500000000-7".into(), draft);
        assert_eq!(
            String::from_utf8(row).unwrap(),
            String::from_utf8(json(&event)).unwrap()
        );
    }

    /// If this fails, two commits to one interaction from two threads can
    /// reach the log in the other order than they were applied: the log,
    /// redb and a restart then hold an older header (or message) than the
    /// one every reader saw, and the later change is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_to_one_interaction_reach_the_log_in_the_order_applied() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        store
            .commit(Commit {
                interaction: Some(case_1001()),
                ..Commit::default()
            })
            .await
            .unwrap();
        let writers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|who| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut done = 0;
                    while done < 150 {
                        let mut i = store.interaction(1001).await.unwrap().unwrap();
                        i.messages.push(message(&format!("{who}{done}")));
                        i.priority = i.messages.len() as i64;
                        let commit = Commit {
                            interaction: Some(i),
                            ..Commit::default()
                        };
                        match store.commit(commit).await {
                            Ok(_) => done += 1,
                            Err(StoreError::Conflict) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let seen = store.interaction(1001).await.unwrap().unwrap();
        assert_eq!(seen.messages.len(), 300);
        // Every version of the header, in log order (the writer has
        // acknowledged them all, so they are all on disk).
        let logged: Vec<u64> = wal::recover(&dir.path().join("wal"), 0)
            .unwrap()
            .frames
            .iter()
            .flatten()
            .filter_map(|op| match op {
                Op::Interaction(1001, j) => {
                    Some(serde_json::from_slice::<Interaction>(j).unwrap().version)
                }
                _ => None,
            })
            .collect();
        assert!(logged.len() > 100, "{} versions in the log", logged.len());
        assert!(
            logged.windows(2).all(|w| w[0] < w[1]),
            "header versions out of order in the log: {logged:?}"
        );
        drop(store);
        let store = reopen(dir.path()).await;
        let stored = store.interaction(1001).await.unwrap().unwrap();
        assert_eq!(
            (stored.version, stored.priority, texts(&stored)),
            (seen.version, seen.priority, texts(&seen))
        );
    }

    /// Messages stored by (case, index), as the previous version did, move
    /// to the message log when the store opens; a later change to one is
    /// written over it, not added again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_stored_by_case_and_index_move_to_the_message_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let mut i = case_1001();
        i.messages = vec![message("first"), message("second")];
        store.commit(commit(i)).await.unwrap();
        drop(store);

        // Put the rows back where the previous version kept them.
        let db = open_closed(dir.path()).await;
        let w = db.begin_write().unwrap();
        {
            let mut log = w.open_table(MESSAGE_LOG).unwrap();
            let mut old = w.open_table(MESSAGES).unwrap();
            for row in log.iter().unwrap() {
                let (_, v) = row.unwrap();
                let (case, index, json) = wal::split_message_value(v.value()).unwrap();
                old.insert((case, index), json).unwrap();
            }
            log.retain(|_, _| false).unwrap();
        }
        w.commit().unwrap();
        assert_eq!(message_rows(&db), (2, 0), "the fixture");
        drop(db);

        let store = reopen(dir.path()).await;
        assert_eq!(message_rows(&store.db), (0, 2));
        let mut i = store.interaction(1001).await.unwrap().unwrap();
        assert_eq!(texts(&i), ["first", "second"]);
        Arc::make_mut(&mut i.messages[0]).text = "first, edited".into();
        i.messages.push(message("third"));
        store.commit(commit(i)).await.unwrap();
        drop(store);

        let store = reopen(dir.path()).await;
        let i = store.interaction(1001).await.unwrap().unwrap();
        assert_eq!(texts(&i), ["first, edited", "second", "third"]);
        assert_eq!(message_rows(&store.db), (0, 3));
    }

    /// The claims log as (key, claim, value), in key order.
    fn claim_rows(db: &Database) -> Vec<(u64, String, String)> {
        let r = db.begin_read().unwrap();
        let rows = r.open_table(CLAIM_LOG).unwrap();
        rows.iter()
            .unwrap()
            .map(|row| {
                let (k, v) = row.unwrap();
                let (claim, value) = v.value();
                (k.value(), claim.to_string(), value.to_string())
            })
            .collect()
    }

    fn index(key: &str, value: &str) -> Commit {
        Commit {
            index: vec![Claim {
                key: key.into(),
                value: value.into(),
            }],
            ..Commit::default()
        }
    }

    /// Claims go to the end of the claims log, each later one after the
    /// earlier ones whatever their keys; an index entry written again with
    /// the same value adds no row, and a changed one keeps its latest value
    /// across a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claims_are_logged_in_the_order_made_and_keep_their_latest_value() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        store.commit(claim("msg:sms:SMc")).await.unwrap();
        store.commit(claim("msg:sms:SMa")).await.unwrap();
        store.commit(index("alias:x", "c1")).await.unwrap();
        drop(store);
        let store = reopen(dir.path()).await;
        let rows = claim_rows(&store.db);
        // Written together, they take the next keys in one go.
        assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3]);
        let mut claims: Vec<_> = rows.iter().map(|r| (r.1.as_str(), r.2.as_str())).collect();
        claims.sort();
        assert_eq!(
            claims,
            [
                ("alias:x", "c1"),
                ("msg:sms:SMa", "1001:m"),
                ("msg:sms:SMc", "1001:m")
            ]
        );

        store.commit(index("alias:x", "c1")).await.unwrap();
        drop(store);
        let store = reopen(dir.path()).await;
        assert_eq!(claim_rows(&store.db).len(), 3, "the same value again");

        store.commit(index("alias:x", "c2")).await.unwrap();
        store.commit(claim("msg:sms:SMb")).await.unwrap();
        drop(store);
        let store = reopen(dir.path()).await;
        let rows = claim_rows(&store.db);
        assert_eq!(rows.len(), 5);
        let mut later: Vec<_> = rows[3..]
            .iter()
            .map(|r| (r.0, r.1.as_str(), r.2.as_str()))
            .collect();
        later.sort();
        assert_eq!(later, [(4, "alias:x", "c2"), (5, "msg:sms:SMb", "1001:m")]);
        assert_eq!(
            store.lookup("alias:x").await.unwrap().as_deref(),
            Some("c2")
        );
        assert!(matches!(
            store.commit(claim("msg:sms:SMa")).await,
            Err(StoreError::Duplicate { .. })
        ));
    }

    /// Claims stored by key, as the previous version did, move to the
    /// claims log when the store opens, and still stop a duplicate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claims_stored_by_key_move_to_the_claims_log() {
        let dir = tempfile::tempdir().unwrap();
        drop(EmbeddedStore::open(dir.path(), Duration::from_secs(3600)).unwrap());
        let db = open_closed(dir.path()).await;
        let w = db.begin_write().unwrap();
        {
            let mut old = w.open_table(CLAIMS).unwrap();
            old.insert("msg:sms:SMold", "1001:m").unwrap();
            old.insert("alias:y", "c9").unwrap();
        }
        w.commit().unwrap();
        drop(db);

        let store = reopen(dir.path()).await;
        let r = store.db.begin_read().unwrap();
        assert_eq!(r.open_table(CLAIMS).unwrap().len().unwrap(), 0);
        drop(r);
        assert_eq!(claim_rows(&store.db).len(), 2);
        assert_eq!(
            store.lookup("alias:y").await.unwrap().as_deref(),
            Some("c9")
        );
        assert!(matches!(
            store.commit(claim("msg:sms:SMold")).await,
            Err(StoreError::Duplicate { .. })
        ));
        store.commit(claim("msg:sms:SMnew")).await.unwrap();
        drop(store);
        let store = reopen(dir.path()).await;
        assert_eq!(claim_rows(&store.db).len(), 3);
        assert_eq!(
            store.lookup("msg:sms:SMnew").await.unwrap().as_deref(),
            Some("1001:m")
        );
    }

    /// After a failed log write the mirror may hold a claim that never
    /// reached the disk: a provider's retry must get "unavailable", never
    /// "already stored", and a restart must show only what was written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_log_write_stops_the_store_and_a_restart_shows_only_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        store.commit(claim("msg:sms:SMgood")).await.unwrap();
        store.fail_writes.store(true, Ordering::SeqCst);
        let failed = store.commit(claim("msg:sms:SMlost")).await;
        assert!(
            matches!(failed, Err(StoreError::Unavailable(_))),
            "{failed:?}"
        );
        // The retry: no dedupe answer from the unwritten claim.
        let lookup = store.lookup("msg:sms:SMlost").await;
        assert!(
            matches!(lookup, Err(StoreError::Unavailable(_))),
            "{lookup:?}"
        );
        let both = store.lookup_and_contact("msg:sms:SMlost", "sms:x").await;
        assert!(matches!(both, Err(StoreError::Unavailable(_))), "{both:?}");
        let again = store.commit(claim("msg:sms:SMlost")).await;
        assert!(
            matches!(again, Err(StoreError::Unavailable(_))),
            "{again:?}"
        );
        assert!(store.ping().await.is_err(), "readyz must fail");
        // Nor do the writes outside a commit reach the mirror.
        let note = store.put_note("anne", "c1", "lost note").await;
        assert!(matches!(note, Err(StoreError::Unavailable(_))), "{note:?}");
        assert_eq!(store.note("anne", "c1").await.unwrap(), None);
        let kv = store.kv_set("k", "lost").await;
        assert!(matches!(kv, Err(StoreError::Unavailable(_))), "{kv:?}");
        assert_eq!(store.kv_get("k").await.unwrap(), None);
        drop(store);

        let store = reopen(dir.path()).await;
        store.ping().await.unwrap();
        assert_eq!(
            store.lookup("msg:sms:SMgood").await.unwrap().as_deref(),
            Some("1001:m")
        );
        assert_eq!(store.lookup("msg:sms:SMlost").await.unwrap(), None);
        store.commit(claim("msg:sms:SMlost")).await.unwrap();
    }

    /// An interaction handed out to append to takes its new messages after
    /// the stored ones, in the log as in the mirror, and only over the
    /// messages it was handed out with.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_appended_go_after_the_stored_ones_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let mut i = case_1001();
        i.messages = vec![message("one"), message("two")];
        store.commit(commit(i)).await.unwrap();
        let mut to_append = store.interaction_to_append(1001).await.unwrap().unwrap();
        assert!(to_append.messages.is_empty());
        assert_eq!(to_append.stored.partial(), Some((2, None)));
        assert_eq!(to_append.version, 1);
        // One handed out with fewer messages than are stored cannot append.
        let mut stale = to_append.clone();
        stale.stored = StoredMessages::left_out(1);
        stale.messages.push(message("lost"));
        let refused = store.commit(commit(stale)).await;
        assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");

        to_append.messages.push(message("three"));
        store.commit(commit(to_append)).await.unwrap();
        let read = store.interaction(1001).await.unwrap().unwrap();
        assert_eq!(read.version, 2);
        assert_eq!(texts(&read), ["one", "two", "three"]);
        drop(store);
        let store = reopen(dir.path()).await;
        assert_eq!(
            texts(&store.interaction(1001).await.unwrap().unwrap()),
            ["one", "two", "three"]
        );
    }

    /// The lists' indexes (and the tag counts) live in the mirror only: a
    /// restart builds them again from what it reads, so a list after it
    /// shows what one before it did.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lists_are_the_same_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let mut waiting = case_1001();
        waiting.assigned_to = Some("bob".into());
        waiting.tags = vec!["vip".into()];
        let mut left = case_1001();
        left.case_number = 1002;
        left.in_queue = false;
        left.tags = vec!["billing".into()];
        store.commit(commit(waiting)).await.unwrap();
        store.commit(commit(left)).await.unwrap();
        async fn check(store: &EmbeddedStore) {
            let cases = |l: Vec<Listed>| {
                l.iter()
                    .map(|l| l.interaction.case_number)
                    .collect::<Vec<_>>()
            };
            let support = ["support".to_string()];
            assert_eq!(
                cases(store.waiting_for(&support, None).await.unwrap()),
                [1001]
            );
            assert_eq!(
                cases(store.waiting_for(&[], Some("bob")).await.unwrap()),
                [1001]
            );
            assert_eq!(
                cases(store.interactions_for(&support, None).await.unwrap()),
                [1001, 1002]
            );
            assert_eq!(
                store.tags_for(&support, None).await.unwrap(),
                ["billing", "vip"]
            );
            assert_eq!(store.tags_for(&[], Some("bob")).await.unwrap(), ["vip"]);
        }
        check(&store).await;
        drop(store);
        check(&*reopen(dir.path()).await).await;
    }

    /// A message changed through a read of it alone is stored where it
    /// was, in the mirror and in the log, and reads back so after a
    /// restart; a read of it that another reader still holds is not
    /// changed underneath them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_changed_alone_stays_in_its_place_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let mut i = case_1001();
        i.messages = vec![message("one"), message("two"), message("three")];
        store.commit(commit(i)).await.unwrap();
        let before = store.interaction(1001).await.unwrap().unwrap();
        let two = before.messages[1].id.clone();
        let mut one = store
            .interaction_with_message(1001, &two)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(texts(&one), ["two"]);
        Arc::make_mut(&mut one.messages[0]).text = "two, edited".into();
        store.commit(commit(one)).await.unwrap();
        assert_eq!(texts(&before), ["one", "two", "three"], "a reader's copy");
        let read = store.interaction(1001).await.unwrap().unwrap();
        assert_eq!(texts(&read), ["one", "two, edited", "three"]);
        assert!(Arc::ptr_eq(&read.messages[0], &before.messages[0]));
        drop(store);
        let store = reopen(dir.path()).await;
        assert_eq!(
            texts(&store.interaction(1001).await.unwrap().unwrap()),
            ["one", "two, edited", "three"]
        );
    }

    /// A file is stored while the main database's write transaction is
    /// held (as the checkpointer holds it for each step, and on idle cores
    /// only), and a file an earlier version kept in the main database is
    /// still served after an upgrade.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_do_not_wait_for_the_checkpointer_and_old_ones_are_still_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let held = store.db.begin_write().unwrap();
        let put = tokio::time::timeout(
            Duration::from_secs(10),
            store.put_blob("att-new", b"new bytes"),
        )
        .await;
        assert!(matches!(put, Ok(Ok(()))), "{put:?}");
        {
            let mut old = held.open_table(BLOBS).unwrap();
            old.insert("att-old", b"old bytes".as_slice()).unwrap();
        }
        held.commit().unwrap();
        assert_eq!(store.blob("att-new").await.unwrap().unwrap(), b"new bytes");
        assert_eq!(store.blob("att-old").await.unwrap().unwrap(), b"old bytes");
        assert_eq!(store.blob("att-none").await.unwrap(), None);
        drop(store);
        let store = reopen(dir.path()).await;
        assert_eq!(store.blob("att-new").await.unwrap().unwrap(), b"new bytes");
        assert_eq!(store.blob("att-old").await.unwrap().unwrap(), b"old bytes");
    }

    /// The feed keeps one copy of a channel's `{"id","kind"}` for all its
    /// events, after a commit and after a restart, and serves the same JSON.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_of_one_channel_share_its_json() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let i = case_1001();
        let other = Interaction {
            case_number: 1002,
            channel_id: "sms-other".into(),
            ..case_1001()
        };
        for (n, case) in [&i, &i, &other, &i].into_iter().enumerate() {
            let commit = Commit {
                events: vec![case.event("note", Utc::now(), &serde_json::json!({"n": n}))],
                ..Commit::default()
            };
            store.commit(commit).await.unwrap();
        }
        let check = |events: &[Event]| {
            assert_eq!(events.len(), 4);
            let channels: Vec<&str> = events.iter().map(|e| e.channel.get()).collect();
            assert_eq!(
                channels,
                [
                    r#"{"id":"sms-main","kind":"sms"}"#,
                    r#"{"id":"sms-main","kind":"sms"}"#,
                    r#"{"id":"sms-other","kind":"sms"}"#,
                    r#"{"id":"sms-main","kind":"sms"}"#,
                ]
            );
            assert!(Arc::ptr_eq(&events[0].channel, &events[1].channel));
            assert!(Arc::ptr_eq(&events[0].channel, &events[3].channel));
            assert!(!Arc::ptr_eq(&events[0].channel, &events[2].channel));
            let data: Vec<&str> = events.iter().map(|e| e.data.get()).collect();
            assert_eq!(
                data,
                [r#"{"n":0}"#, r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#]
            );
        };
        check(&store.events_after(None, 10).await.unwrap());
        drop(store);
        let store = reopen(dir.path()).await;
        check(&store.events_after(None, 10).await.unwrap());
    }

    fn note_event(n: usize) -> Commit {
        Commit {
            events: vec![case_1001().event("note", Utc::now(), &serde_json::json!({"n": n}))],
            ..Commit::default()
        }
    }

    fn event_rows(db: &Database) -> u64 {
        db.begin_read()
            .unwrap()
            .open_table(EVENTS)
            .unwrap()
            .len()
            .unwrap()
    }

    /// Waits until the checkpointer has put every event so far into redb.
    /// A segment ends with the first write a second after it began, so an
    /// empty write goes in now and then (on a slow machine the segment
    /// holding the last event may have begun late).
    async fn wait_folded(store: &EmbeddedStore) {
        let last = store.state.lock().last_event;
        for n in 1..=400 {
            if *store.folded.lock() >= last {
                return;
            }
            if n % 40 == 0 {
                store.commit(Commit::default()).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the checkpointer did not fold the events");
    }

    /// Memory keeps the feed's newest events; a reader further behind gets
    /// the older ones from redb, in order, joined to the ones in memory
    /// without a gap or a repeat, before and after a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_feed_reads_older_events_from_redb_and_memory_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let mut ids = vec![];
        for n in 0..61 {
            let stored = store.commit(note_event(n)).await.unwrap();
            ids.push(stored[0].id.clone());
        }
        wait_folded(&store).await;
        // Memory lets go of folded events a few at a time, as commits come.
        for n in 61..70 {
            let stored = store.commit(note_event(n)).await.unwrap();
            ids.push(stored[0].id.clone());
        }
        let in_memory = store.state.lock().events.len();
        assert!(
            in_memory <= EVENTS_IN_MEMORY + 10,
            "{in_memory} events in memory"
        );
        check_feed(&store, &ids).await;
        drop(store);
        let store = reopen(dir.path()).await;
        check_feed(&store, &ids).await;
    }

    async fn check_feed(store: &EmbeddedStore, ids: &[String]) {
        let check = |got: Vec<Event>, want: &[String]| {
            let got: Vec<&str> = got.iter().map(|e| e.id.as_str()).collect();
            assert_eq!(got, want);
        };
        check(store.events_after(None, 1000).await.unwrap(), ids);
        check(store.events_after(None, 3).await.unwrap(), &ids[..3]);
        check(
            store.events_after(Some(&ids[9]), 5).await.unwrap(),
            &ids[10..15],
        );
        // Across the border between redb and memory.
        check(
            store.events_after(Some(&ids[40]), 1000).await.unwrap(),
            &ids[41..],
        );
        check(
            store.events_after(Some(&ids[65]), 1000).await.unwrap(),
            &ids[66..],
        );
        check(store.events_after(Some(&ids[69]), 10).await.unwrap(), &[]);
        let data = store.events_after(Some(&ids[4]), 1).await.unwrap();
        assert_eq!(data[0].data.get(), r#"{"n":5}"#);
        let in_memory = store.state.lock().events.len();
        assert!(in_memory <= EVENTS_IN_MEMORY + 10, "{in_memory} in memory");
    }

    /// Events older than the retention leave memory and redb: a segment's
    /// end removes them from redb, and the feed no longer shows them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expired_events_leave_redb_at_a_segments_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), Duration::from_secs(2)).unwrap();
        for n in 0..5 {
            store.commit(note_event(n)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // This write ends the segment: everything goes to redb, nothing
        // has expired yet.
        let mut kept = store.commit(note_event(5)).await.unwrap();
        wait_folded(&store).await;
        assert_eq!(event_rows(&store.db), 6);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // The first five are now older than two seconds.
        kept.extend(store.commit(note_event(6)).await.unwrap());
        wait_folded(&store).await;
        assert_eq!(event_rows(&store.db), 2);
        assert_eq!(store.events_after(None, 100).await.unwrap(), kept);
        drop(store);
        let store = reopen(dir.path()).await;
        assert_eq!(store.events_after(None, 100).await.unwrap(), kept);
    }
}
