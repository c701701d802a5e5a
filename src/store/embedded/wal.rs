//! The embedded store's write-ahead log.
//!
//! The log lives in `wal/` beside the redb file as fixed-size slot files
//! (`slot-N.log`), zero-filled once when created, so appending to one never
//! changes its size and `fdatasync` flushes only the data written. A slot
//! holds one *segment* at a time: a run of frames that all carry the
//! segment's sequence number.
//!
//! A frame is `seq: u64 LE | len: u32 LE | crc32(seq, payload): u32 LE |
//! payload`, where the payload is the ops of one group commit. Reading a
//! slot stops at the first frame that does not carry the segment's number
//! or whose checksum fails: the zeros after the last write, the frames of a
//! slot's earlier use, or a frame torn by a crash (never acknowledged, so
//! nothing is lost by stopping there).
//!
//! The checkpointer folds the ops into redb as they come: the latest value
//! of each key, in non-durable transactions of [`CHUNK_KEYS`] to
//! [`MAX_CHUNK_KEYS`] keys whose writeback it starts at once. A segment is
//! closed about once a second (or when its slot is full); the checkpointer
//! then writes what is left in a durable transaction that also records the
//! segment's number as `checkpointed`, and only then is the slot reused. A
//! crash rolls redb back to its last durable transaction. Recovery replays,
//! in order, every segment numbered after `checkpointed`; replaying is
//! idempotent because every op sets or removes a whole record.

use super::{CLAIM_LOG, CONTACTS, EVENTS, INTERACTIONS, KV, MESSAGE_LOG, META, NOTES, OUTBOX};
use parking_lot::Mutex;
use redb::Database;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Size of a slot file. A frame larger than what is left starts a new
/// segment; one larger than a whole slot extends the file.
pub const SLOT_BYTES: u64 = 8 << 20;
const HEADER: usize = 16;
/// Frames start on block boundaries (direct I/O writes whole blocks).
const ALIGN: usize = 4096;

/// One change to one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// An interaction's header (its JSON without messages).
    Interaction(u64, Vec<u8>),
    /// One message of an interaction: (case, index in the thread).
    Message(u64, u32, Vec<u8>),
    Contact(String, Vec<u8>),
    Claim(String, String),
    Event((u64, u64), Vec<u8>),
    /// Written by earlier versions, which expired the feed's events one by
    /// one through the log; the checkpointer now removes expired ones.
    DropEvent((u64, u64)),
    Outbox(String, Vec<u8>),
    DropOutbox(String),
    Note(String, String),
    Kv(String, String),
}

// ----- encoding ---------------------------------------------------------------

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

pub fn encode(ops: &[Op], out: &mut Vec<u8>) {
    for op in ops {
        match op {
            Op::Interaction(k, v) => {
                out.push(1);
                put_u64(out, *k);
                put_bytes(out, v);
            }
            Op::Message(k, i, v) => {
                out.push(2);
                put_u64(out, *k);
                out.extend_from_slice(&i.to_le_bytes());
                put_bytes(out, v);
            }
            Op::Contact(k, v) => {
                out.push(3);
                put_bytes(out, k.as_bytes());
                put_bytes(out, v);
            }
            Op::Claim(k, v) => {
                out.push(4);
                put_bytes(out, k.as_bytes());
                put_bytes(out, v.as_bytes());
            }
            Op::Event((a, b), v) => {
                out.push(5);
                put_u64(out, *a);
                put_u64(out, *b);
                put_bytes(out, v);
            }
            Op::DropEvent((a, b)) => {
                out.push(6);
                put_u64(out, *a);
                put_u64(out, *b);
            }
            Op::Outbox(k, v) => {
                out.push(7);
                put_bytes(out, k.as_bytes());
                put_bytes(out, v);
            }
            Op::DropOutbox(k) => {
                out.push(8);
                put_bytes(out, k.as_bytes());
            }
            Op::Note(k, v) => {
                out.push(9);
                put_bytes(out, k.as_bytes());
                put_bytes(out, v.as_bytes());
            }
            Op::Kv(k, v) => {
                out.push(10);
                put_bytes(out, k.as_bytes());
                put_bytes(out, v.as_bytes());
            }
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        Some(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?).ok()
    }
}

pub fn decode(payload: &[u8]) -> Option<Vec<Op>> {
    let mut r = Reader(payload);
    let mut ops = vec![];
    while !r.0.is_empty() {
        let op = match r.u8()? {
            1 => Op::Interaction(r.u64()?, r.bytes()?),
            2 => Op::Message(r.u64()?, r.u32()?, r.bytes()?),
            3 => Op::Contact(r.string()?, r.bytes()?),
            4 => Op::Claim(r.string()?, r.string()?),
            5 => Op::Event((r.u64()?, r.u64()?), r.bytes()?),
            6 => Op::DropEvent((r.u64()?, r.u64()?)),
            7 => Op::Outbox(r.string()?, r.bytes()?),
            8 => Op::DropOutbox(r.string()?),
            9 => Op::Note(r.string()?, r.string()?),
            10 => Op::Kv(r.string()?, r.string()?),
            _ => return None,
        };
        ops.push(op);
    }
    Some(ops)
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

// ----- slots ------------------------------------------------------------------

/// Creates slot `n`: zero-filled to [`SLOT_BYTES`], flushed, its name made durable.
fn create_slot(dir: &Path, n: usize) -> std::io::Result<PathBuf> {
    let path = dir.join(format!("slot-{n}.log"));
    let tmp = dir.join(format!("slot-{n}.tmp"));
    let mut f = File::create(&tmp)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(SLOT_BYTES >> 20) {
        f.write_all(&zeros)?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    Ok(path)
}

/// The slots not holding the open segment, and how to make more.
#[derive(Clone)]
pub struct Slots {
    dir: PathBuf,
    free: Arc<Mutex<Vec<PathBuf>>>,
    count: Arc<Mutex<usize>>,
    /// Segments closed since the log was opened: the checkpointer compares
    /// it with the ones it has folded to see how far behind it is.
    closed: Arc<std::sync::atomic::AtomicU64>,
}

impl Slots {
    fn take(&self) -> std::io::Result<PathBuf> {
        if let Some(p) = self.free.lock().pop() {
            return Ok(p);
        }
        self.create()
    }

    fn create(&self) -> std::io::Result<PathBuf> {
        let n = {
            let mut c = self.count.lock();
            *c += 1;
            *c - 1
        };
        create_slot(&self.dir, n)
    }

    pub fn give_back(&self, slot: PathBuf) {
        self.free.lock().push(slot);
    }

    /// Keeps one slot ready so that closing a segment never waits for a new file.
    pub fn keep_spare(&self) {
        if self.free.lock().is_empty() {
            match self.create() {
                Ok(p) => self.give_back(p),
                Err(e) => tracing::warn!(error = %e, "could not prepare a log slot"),
            }
        }
    }
}

// ----- the log ----------------------------------------------------------------

/// A closed segment, for the checkpointer.
pub struct Closed {
    pub seq: u64,
    pub slot: PathBuf,
}

pub struct Wal {
    file: File,
    slot: PathBuf,
    seq: u64,
    /// Where the next frame goes; always a multiple of [`ALIGN`].
    pos: u64,
    opened: Instant,
    slots: Slots,
    /// The frame being built.
    buf: Vec<u8>,
    /// Room for the frame at an [`ALIGN`]ed address, as direct I/O needs.
    aligned: Vec<u8>,
    /// Tests set it to make the next appends fail as a full or broken disk would.
    #[cfg(test)]
    pub fail: Arc<std::sync::atomic::AtomicBool>,
}

/// Opens a slot for appending, with direct I/O where the filesystem allows
/// it. Frames then go to the disk as whole blocks without passing through the
/// page cache, whose large folios would otherwise turn every small append
/// into a write-back of tens of kilobytes (measured: ~100 KB of disk writes
/// for a 3 KB webhook). Elsewhere (tmpfs) it falls back to buffered writes;
/// `fdatasync` after each frame makes either durable.
fn open_slot(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok(f),
        Err(_) => OpenOptions::new().write(true).open(path),
    }
}

/// `n` rounded up to a multiple of [`ALIGN`].
fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

impl Wal {
    /// Starts segment `seq` in one of `slots` (the slot files found on disk,
    /// all free once recovery has folded them into redb).
    pub fn open(dir: &Path, slots: Vec<PathBuf>, seq: u64) -> std::io::Result<Wal> {
        std::fs::create_dir_all(dir)?;
        let count = slots
            .iter()
            .filter_map(|p| slot_number(p))
            .map(|n| n + 1)
            .max()
            .unwrap_or(0);
        let slots = Slots {
            dir: dir.to_path_buf(),
            free: Arc::new(Mutex::new(slots)),
            count: Arc::new(Mutex::new(count)),
            closed: Arc::default(),
        };
        let slot = slots.take()?;
        let file = open_slot(&slot)?;
        Ok(Wal {
            file,
            slot,
            seq,
            pos: 0,
            opened: Instant::now(),
            slots,
            buf: Vec::with_capacity(64 << 10),
            aligned: vec![],
            #[cfg(test)]
            fail: Arc::default(),
        })
    }

    pub fn free_slots(&self) -> Slots {
        self.slots.clone()
    }

    /// How long the open segment has been open.
    pub fn age(&self) -> std::time::Duration {
        self.opened.elapsed()
    }

    /// Appends one frame and makes it durable. When the frame does not fit
    /// in the open segment, that segment is closed first and returned: the
    /// caller reports it to the checkpointer before this frame's ops.
    pub fn append(&mut self, ops: &[Op]) -> std::io::Result<Option<Closed>> {
        #[cfg(test)]
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("injected: no space left on device"));
        }
        self.buf.clear();
        self.buf.resize(HEADER, 0);
        encode(ops, &mut self.buf);
        let padded = align_up(self.buf.len());
        let closed = if self.pos > 0 && self.pos + padded as u64 > SLOT_BYTES {
            self.rotate()?
        } else {
            None
        };
        let len = self.buf.len() - HEADER;
        let crc = checksum(self.seq, &self.buf[HEADER..]);
        self.buf[0..8].copy_from_slice(&self.seq.to_le_bytes());
        self.buf[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        self.buf[12..16].copy_from_slice(&crc.to_le_bytes());
        if self.aligned.len() < padded + ALIGN {
            self.aligned.resize(padded + ALIGN, 0);
        }
        let start = self.aligned.as_ptr().align_offset(ALIGN);
        let block = &mut self.aligned[start..start + padded];
        block[..self.buf.len()].copy_from_slice(&self.buf);
        block[self.buf.len()..].fill(0);
        self.file.write_all_at(block, self.pos)?;
        self.file.sync_data()?;
        self.pos += padded as u64;
        Ok(closed)
    }

    /// Closes the open segment (if it holds anything) and opens the next one.
    pub fn rotate(&mut self) -> std::io::Result<Option<Closed>> {
        if self.pos == 0 {
            self.opened = Instant::now();
            return Ok(None);
        }
        let slot = self.slots.take()?;
        let file = open_slot(&slot)?;
        let closed = Closed {
            seq: self.seq,
            slot: std::mem::replace(&mut self.slot, slot),
        };
        self.file = file;
        self.seq += 1;
        self.pos = 0;
        self.opened = Instant::now();
        self.slots
            .closed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Some(closed))
    }
}

fn slot_number(p: &Path) -> Option<usize> {
    p.file_name()?
        .to_str()?
        .strip_prefix("slot-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// What recovery found in the log directory.
pub struct Recovered {
    /// The frames of every segment after the checkpoint, oldest first.
    pub frames: Vec<Vec<Op>>,
    /// The newest segment replayed, if any.
    pub last_seq: Option<u64>,
    /// Every slot file, all free once the frames are in redb.
    pub slots: Vec<PathBuf>,
}

/// Reads the segments numbered after `checkpointed` from the slots in `dir`.
pub fn recover(dir: &Path, checkpointed: u64) -> std::io::Result<Recovered> {
    std::fs::create_dir_all(dir)?;
    let mut slots = vec![];
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if slot_number(&path).is_some() {
            slots.push(path);
        } else if path.extension().is_some_and(|e| e == "tmp") {
            // A slot whose creation was cut short: never used.
            std::fs::remove_file(&path)?;
        }
    }
    slots.sort_by_key(|p| slot_number(p));
    let mut segments = vec![];
    for path in &slots {
        let data = std::fs::read(path)?;
        let Some(seq) = first_seq(&data) else {
            continue;
        };
        if seq > checkpointed {
            segments.push((seq, read_segment(&data, seq)));
        }
    }
    segments.sort_by_key(|(seq, _)| *seq);
    let last_seq = segments.last().map(|(seq, _)| *seq);
    Ok(Recovered {
        frames: segments.into_iter().flat_map(|(_, f)| f).collect(),
        last_seq,
        slots,
    })
}

/// The segment number of a slot's first valid frame.
fn first_seq(data: &[u8]) -> Option<u64> {
    let (seq, _, _) = frame_at(data, 0)?;
    Some(seq)
}

/// The frame at `pos`: (seq, ops, next position), if it is whole and intact.
fn frame_at(data: &[u8], pos: usize) -> Option<(u64, Vec<Op>, usize)> {
    let header = data.get(pos..pos + HEADER)?;
    let seq = u64::from_le_bytes(header[0..8].try_into().ok()?);
    let len = u32::from_le_bytes(header[8..12].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[12..16].try_into().ok()?);
    if seq == 0 {
        return None;
    }
    let payload = data.get(pos + HEADER..pos + HEADER + len)?;
    if checksum(seq, payload) != crc {
        return None;
    }
    Some((seq, decode(payload)?, align_up(pos + HEADER + len)))
}

fn read_segment(data: &[u8], seq: u64) -> Vec<Vec<Op>> {
    let mut frames = vec![];
    let mut pos = 0;
    while let Some((s, ops, next)) = frame_at(data, pos) {
        if s != seq {
            break;
        }
        frames.push(ops);
        pos = next;
    }
    frames
}

// ----- checkpoints ------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Interaction(u64),
    Message(u64, u32),
    Contact(String),
    Claim(String),
    Event((u64, u64)),
    Outbox(String),
    Note(String),
    Kv(String),
}

/// Where new rows of redb's two append-only tables go: each message's key
/// in the message log is the order in which it was first written, so that
/// new messages, whatever conversation they belong to, go to the end of the
/// table. Keyed by (case, index in the thread), nearly every new message
/// landed in a different page, which redb copied and wrote back: half the
/// checkpointer's work at full load. The claims log is keyed the same way:
/// a claim's key (`msg:{channel}:{MessageSid}`) is as random as a
/// provider's message ID, and a table keyed by it took each new claim to a
/// different page.
pub struct LogKeys {
    messages: HashMap<(u64, u32), u64>,
    next_message: u64,
    next_claim: u64,
}

impl Default for LogKeys {
    fn default() -> LogKeys {
        LogKeys {
            messages: HashMap::new(),
            next_message: 1,
            next_claim: 1,
        }
    }
}

impl LogKeys {
    /// The keys of the rows redb holds.
    pub fn load(db: &Database) -> anyhow::Result<LogKeys> {
        use redb::{ReadableDatabase, ReadableTable};
        let mut keys = LogKeys::default();
        let r = db.begin_read()?;
        for row in r.open_table(MESSAGE_LOG)?.iter()? {
            let (k, v) = row?;
            let (case, index, _) = split_message_value(v.value())?;
            keys.found(k.value(), case, index);
        }
        if let Some((k, _)) = r.open_table(CLAIM_LOG)?.last()? {
            keys.found_claim(k.value());
        }
        Ok(keys)
    }

    /// Notes a row of the message log, read in key order.
    pub fn found(&mut self, key: u64, case: u64, index: u32) {
        self.messages.insert((case, index), key);
        self.next_message = key + 1;
    }

    /// Notes a row of the claims log, read in key order.
    pub fn found_claim(&mut self, key: u64) {
        self.next_claim = key + 1;
    }

    pub fn contains(&self, case: u64, index: u32) -> bool {
        self.messages.contains_key(&(case, index))
    }

    /// The message's key, a new one for a message not stored yet.
    fn message(&mut self, case: u64, index: u32) -> u64 {
        let next = &mut self.next_message;
        *self.messages.entry((case, index)).or_insert_with(|| {
            let key = *next;
            *next += 1;
            key
        })
    }

    /// The key of a claim written now: after every claim written before.
    /// Loading reads the log in key order, so the latest value of a claim
    /// wins.
    pub fn claim(&mut self) -> u64 {
        let key = self.next_claim;
        self.next_claim += 1;
        key
    }
}

/// A message log row: `case: u64 LE | index: u32 LE | JSON`.
pub fn message_value(case: u64, index: u32, json: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + json.len());
    v.extend_from_slice(&case.to_le_bytes());
    v.extend_from_slice(&index.to_le_bytes());
    v.extend_from_slice(json);
    v
}

pub fn split_message_value(v: &[u8]) -> anyhow::Result<(u64, u32, &[u8])> {
    anyhow::ensure!(v.len() >= 12, "a message log row is too short");
    let case = u64::from_le_bytes(v[..8].try_into()?);
    let index = u32::from_le_bytes(v[8..12].try_into()?);
    Ok((case, index, &v[12..]))
}

/// The latest value of every key changed since the last checkpoint
/// (`None`: removed).
#[derive(Default)]
pub struct Pending {
    changes: BTreeMap<Key, Option<Vec<u8>>>,
    /// The newest event among them.
    last_event: Option<(u64, u64)>,
    /// Events older than this go at the next flush (the feed's retention).
    expire_before: Option<(u64, u64)>,
}

impl Pending {
    /// The newest event pending.
    pub fn last_event(&self) -> Option<(u64, u64)> {
        self.last_event
    }

    /// Has the next flush remove every event before `id`.
    pub fn expire_events_before(&mut self, id: (u64, u64)) {
        self.expire_before = Some(id);
    }

    pub fn add(&mut self, ops: Vec<Op>) {
        for op in ops {
            if let Op::Event(id, _) = &op {
                self.last_event = self.last_event.max(Some(*id));
            }
            let (k, v) = match op {
                Op::Interaction(k, v) => (Key::Interaction(k), Some(v)),
                Op::Message(k, i, v) => (Key::Message(k, i), Some(v)),
                Op::Contact(k, v) => (Key::Contact(k), Some(v)),
                Op::Claim(k, v) => (Key::Claim(k), Some(v.into_bytes())),
                Op::Event(k, v) => (Key::Event(k), Some(v)),
                Op::DropEvent(k) => (Key::Event(k), None),
                Op::Outbox(k, v) => (Key::Outbox(k), Some(v)),
                Op::DropOutbox(k) => (Key::Outbox(k), None),
                Op::Note(k, v) => (Key::Note(k), Some(v.into_bytes())),
                Op::Kv(k, v) => (Key::Kv(k), Some(v.into_bytes())),
            };
            self.changes.insert(k, v);
        }
    }

    /// Writes everything pending into redb in one transaction; pending is
    /// empty afterwards. With `through`, the transaction is durable and
    /// records that segment as checkpointed; without, it is not durable (a
    /// step before the segment's end: a crash rolls it back, and the log
    /// still holds it).
    pub fn flush(
        &mut self,
        db: &Database,
        keys: &mut LogKeys,
        through: Option<u64>,
    ) -> anyhow::Result<()> {
        let mut w = db.begin_write()?;
        if through.is_none() {
            w.set_durability(redb::Durability::None)?;
        }
        {
            let mut interactions = w.open_table(INTERACTIONS)?;
            let mut messages = w.open_table(MESSAGE_LOG)?;
            let mut contacts = w.open_table(CONTACTS)?;
            let mut claims = w.open_table(CLAIM_LOG)?;
            let mut events = w.open_table(EVENTS)?;
            let mut outbox = w.open_table(OUTBOX)?;
            let mut notes = w.open_table(NOTES)?;
            let mut kv = w.open_table(KV)?;
            let mut meta = w.open_table(META)?;
            let text = |v: &[u8]| std::str::from_utf8(v).map(str::to_owned);
            if let Some(before) = self.expire_before {
                events.retain_in(..before, |_, _| false)?;
            }
            for (k, v) in &self.changes {
                match (k, v) {
                    (Key::Interaction(k), Some(v)) => {
                        interactions.insert(*k, v.as_slice())?;
                    }
                    (Key::Message(k, i), Some(v)) => {
                        let row = message_value(*k, *i, v);
                        messages.insert(keys.message(*k, *i), row.as_slice())?;
                    }
                    (Key::Contact(k), Some(v)) => {
                        contacts.insert(k.as_str(), v.as_slice())?;
                    }
                    (Key::Claim(k), Some(v)) => {
                        claims.insert(keys.claim(), (k.as_str(), std::str::from_utf8(v)?))?;
                    }
                    (Key::Event(k), Some(v)) => {
                        events.insert(*k, v.as_slice())?;
                    }
                    (Key::Event(k), None) => {
                        events.remove(*k)?;
                    }
                    (Key::Outbox(k), Some(v)) => {
                        outbox.insert(k.as_str(), v.as_slice())?;
                    }
                    (Key::Outbox(k), None) => {
                        outbox.remove(k.as_str())?;
                    }
                    (Key::Note(k), Some(v)) => {
                        notes.insert(k.as_str(), text(v)?.as_str())?;
                    }
                    (Key::Kv(k), Some(v)) => {
                        kv.insert(k.as_str(), text(v)?.as_str())?;
                    }
                    (_, None) => {}
                }
            }
            if let Some(through) = through {
                meta.insert("checkpointed", through)?;
            }
        }
        w.commit()?;
        self.changes.clear();
        self.last_event = None;
        self.expire_before = None;
        Ok(())
    }
}

pub enum ToCheckpointer {
    /// The ops of one durable frame, in log order.
    Ops(Vec<Op>),
    /// Every frame of this segment has been sent.
    SegmentEnd(Closed),
    /// The store is closing: what is left is folded at the gateway's own
    /// priority, so that a shutdown (or a reopen) never waits for a core
    /// to fall idle.
    Closing,
}

/// Pending keys written per intermediate (non-durable) redb transaction.
/// Between segment ends, the checkpointer writes what has piled up in
/// transactions of about this size and starts their writeback at once, so
/// redb's pages reach the disk in small steps. Written all at once at the end
/// of a segment, they came as megabytes in one burst, and every log flush
/// during that burst waited for them (the disk flushes its whole cache).
const CHUNK_KEYS: usize = 128;
/// Under a heavy load keys pile up faster: a step then waits until this
/// long after the previous one (or [`MAX_CHUNK_KEYS`]), since each
/// transaction has a fixed cost. At 1,000 webhooks/s a step already takes
/// longer than this to fill, so the steps stay small there.
const STEP_EVERY: std::time::Duration = std::time::Duration::from_millis(25);
const MAX_CHUNK_KEYS: usize = 8 * CHUNK_KEYS;

/// The feed's events between the checkpointer and the store: the store
/// keeps in memory only the newest events and those not yet in redb.
#[derive(Clone)]
pub struct Feed {
    /// Every event up to this ID is in redb (a read transaction sees it).
    pub folded: Arc<Mutex<(u64, u64)>>,
    /// Events older than this leave redb at a segment's end.
    pub retention: std::time::Duration,
}

impl Feed {
    fn folded_through(&self, last: Option<(u64, u64)>) {
        if let Some(last) = last {
            let mut folded = self.folded.lock();
            *folded = (*folded).max(last);
        }
    }

    /// The ID before which events have expired.
    fn horizon(&self) -> (u64, u64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let ms = now.saturating_sub(self.retention).as_millis();
        (u64::try_from(ms).unwrap_or(u64::MAX), 0)
    }
}

/// Folds closed segments into redb and hands their slots back. Runs until
/// the writer lets go of its end of the channel.
pub fn checkpointer(
    db: Arc<Database>,
    mut keys: LogKeys,
    db_file: PathBuf,
    rx: std::sync::mpsc::Receiver<ToCheckpointer>,
    slots: Slots,
    feed: Feed,
) {
    let mut priority = Priority::new();
    // Nothing is behind yet: low from the start, not from the first bundle.
    priority.set_low(true);
    let mut folded = 0u64;
    let mut pending = Pending::default();
    let mut waiting: Vec<PathBuf> = vec![];
    // Only to start writeback of redb's file (see `CHUNK_KEYS`).
    let writeback = File::open(&db_file).ok();
    let mut last_step = Instant::now();
    slots.keep_spare();
    let mut closing = false;
    while let Ok(msg) = rx.recv() {
        let behind = slots
            .closed
            .load(std::sync::atomic::Ordering::SeqCst)
            .saturating_sub(folded);
        closing |= matches!(msg, ToCheckpointer::Closing);
        priority.set_low(behind < 2 && !closing);
        match msg {
            ToCheckpointer::Closing => {}
            ToCheckpointer::Ops(ops) => {
                pending.add(ops);
                let changed = pending.changes.len();
                if changed >= MAX_CHUNK_KEYS
                    || (changed >= CHUNK_KEYS && last_step.elapsed() >= STEP_EVERY)
                {
                    last_step = Instant::now();
                    let last = pending.last_event();
                    match pending.flush(&db, &mut keys, None) {
                        Ok(()) => {
                            feed.folded_through(last);
                            start_writeback(writeback.as_ref());
                        }
                        Err(e) => tracing::error!(error = %e, "checkpoint step failed"),
                    }
                }
            }
            ToCheckpointer::SegmentEnd(closed) => {
                folded += 1;
                waiting.push(closed.slot);
                let last = pending.last_event();
                pending.expire_events_before(feed.horizon());
                match pending.flush(&db, &mut keys, Some(closed.seq)) {
                    Ok(()) => {
                        feed.folded_through(last);
                        for slot in waiting.drain(..) {
                            slots.give_back(slot);
                        }
                        slots.keep_spare();
                    }
                    // The segments stay in the log and are folded in with the next one.
                    Err(e) => tracing::error!(error = %e, "checkpoint failed"),
                }
            }
        }
    }
}

/// The checkpointer's scheduling priority. While it keeps up it runs as
/// `SCHED_IDLE`, only on a core nothing else wants, or, where that policy
/// cannot be left again, [`CHECKPOINT_NICE`] steps behind the threads
/// answering webhooks: a checkpoint step is never urgent, and on two cores
/// it otherwise holds one for several milliseconds while acknowledgements
/// queue behind it. Once it falls two segments behind (under a sustained
/// full load), it runs at the gateway's own priority until it has caught
/// up, so the backlog cannot grow without end.
///
/// Going back up needs the right to raise a thread's priority (root, or
/// `RLIMIT_NICE`); without it the checkpointer stays at the gateway's
/// priority all along.
struct Priority {
    base: i32,
    low: bool,
    /// Whether this thread may return to `base` after lowering itself.
    usable: bool,
    /// Whether it may also return from `SCHED_IDLE` to `SCHED_OTHER`.
    idle: bool,
}

/// How much lower (in nice steps) the checkpointer runs than the rest of
/// the gateway while it keeps up, where it cannot use `SCHED_IDLE`.
const CHECKPOINT_NICE: i32 = 10;

#[cfg(target_os = "linux")]
/// Sets this thread's scheduling policy (priority 0, as both take).
fn set_policy(policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain system call on the calling thread (pid 0), with a
    // parameter that lives across it.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

impl Priority {
    fn new() -> Priority {
        #[cfg(target_os = "linux")]
        // SAFETY: plain system calls on this thread's own ID. The probe
        // steps one down and back; if it cannot come back, it stays one
        // step down, which is harmless.
        let (base, usable) = unsafe {
            let tid = libc::gettid() as libc::id_t;
            let base = libc::getpriority(libc::PRIO_PROCESS, tid);
            let usable = base < 19
                && libc::setpriority(libc::PRIO_PROCESS, tid, base + 1) == 0
                && libc::setpriority(libc::PRIO_PROCESS, tid, base) == 0;
            (base, usable)
        };
        // The same probe for the policy. If it cannot come back, the thread
        // must stay low for good: it then keeps to nice values.
        #[cfg(target_os = "linux")]
        let idle = usable && {
            let went = set_policy(libc::SCHED_IDLE);
            let back = set_policy(libc::SCHED_OTHER);
            went && back
        };
        #[cfg(not(target_os = "linux"))]
        let (base, usable, idle) = (0, false, false);
        Priority {
            base,
            low: false,
            usable,
            idle,
        }
    }

    fn set_low(&mut self, low: bool) {
        if low == self.low || !self.usable {
            return;
        }
        self.low = low;
        #[cfg(target_os = "linux")]
        {
            let nice = if low {
                (self.base + CHECKPOINT_NICE).min(19)
            } else {
                if self.idle {
                    set_policy(libc::SCHED_OTHER);
                }
                self.base
            };
            // SAFETY: a plain system call on this thread's own ID.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice);
            }
            if low && self.idle {
                set_policy(libc::SCHED_IDLE);
            }
        }
    }
}

/// Waits until the pages of the previous step have been written, then asks
/// the kernel to start writing this step's dirty pages, without waiting for
/// them. So at most one step's pages are on their way to the disk at any
/// time, however far behind the checkpointer is: catching up after a burst
/// never floods the disk that the log flushes to.
fn start_writeback(file: Option<&File>) {
    #[cfg(target_os = "linux")]
    if let Some(f) = file {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; the call only waits for and
        // schedules writeback.
        unsafe {
            libc::sync_file_range(
                f.as_raw_fd(),
                0,
                0,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// A thread's nice value, from its `/proc/.../stat` file (the 19th field;
/// the command name before it ends with ')' and may hold spaces).
#[cfg(all(test, target_os = "linux"))]
pub(super) fn nice_in(stat_file: impl AsRef<Path>) -> i64 {
    let stat = std::fs::read_to_string(stat_file).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(16).unwrap().parse().unwrap()
}

/// The nice value and scheduling policy of each thread of this process
/// named `name` (its `comm`, cut to 15 bytes).
#[cfg(all(test, target_os = "linux"))]
pub(super) fn threads_named(name: &str) -> Vec<(i64, libc::c_int)> {
    let mut found = vec![];
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let tid: libc::pid_t = task.file_name().unwrap().to_str().unwrap().parse().unwrap();
            // SAFETY: a plain system call on a thread of this process.
            let policy = unsafe { libc::sched_getscheduler(tid) };
            found.push((nice_in(task.join("stat")), policy));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checkpointer drops its priority while it keeps up and takes the
    /// gateway's own back when it falls behind.
    #[cfg(target_os = "linux")]
    #[test]
    fn priority_goes_down_and_back_up() {
        let nice = || nice_in("/proc/thread-self/stat");
        std::thread::spawn(move || {
            let base = nice();
            let mut p = Priority::new();
            if !p.usable {
                // Not allowed to raise a priority here: it never goes down.
                p.set_low(true);
                assert!(nice() <= base + 1);
                return;
            }
            // SAFETY: plain system calls on the calling thread.
            let policy = || unsafe { libc::sched_getscheduler(0) };
            assert_eq!(nice(), base);
            assert_eq!(policy(), libc::SCHED_OTHER, "the probe came back");
            // SAFETY: a plain system call.
            if unsafe { libc::geteuid() } == 0 {
                assert!(p.idle, "root may leave SCHED_IDLE again");
            }
            p.set_low(true);
            assert_eq!(nice(), (base + 10).min(19));
            if p.idle {
                assert_eq!(policy(), libc::SCHED_IDLE);
            }
            p.set_low(false);
            assert_eq!(nice(), base, "back to the gateway's priority");
            assert_eq!(policy(), libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }

    /// Told that the store is closing, the checkpointer leaves its low
    /// priority for good: the rest is folded as fast as the gateway runs.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_closing_store_folds_the_rest_at_the_gateways_priority() {
        // SAFETY: a plain system call.
        if unsafe { libc::geteuid() } != 0 {
            return; // only root may come back up (see `Priority`)
        }
        let dir = tempfile::tempdir().unwrap();
        let db_file = dir.path().join("ck.redb");
        let db = Arc::new(Database::create(&db_file).unwrap());
        {
            let w = db.begin_write().unwrap();
            w.open_table(super::super::MESSAGE_LOG).unwrap();
            w.open_table(super::super::CLAIM_LOG).unwrap();
            w.commit().unwrap();
        }
        let keys = LogKeys::load(&db).unwrap();
        let slots = Wal::open(&dir.path().join("wal"), vec![], 1)
            .unwrap()
            .free_slots();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ck-closing-test".into())
            .spawn(move || {
                let feed = Feed {
                    folded: Arc::default(),
                    retention: std::time::Duration::from_secs(3600),
                };
                checkpointer(db, keys, db_file, rx, slots, feed)
            })
            .unwrap();
        let policy_of_thread = || {
            threads_named("ck-closing-test")
                .first()
                .map(|&(_, policy)| policy)
        };
        let wait_for = |want: libc::c_int| {
            for _ in 0..500 {
                if policy_of_thread() == Some(want) {
                    return true;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            false
        };
        tx.send(ToCheckpointer::Ops(sample())).unwrap();
        assert!(wait_for(libc::SCHED_IDLE), "low while it keeps up");
        tx.send(ToCheckpointer::Closing).unwrap();
        tx.send(ToCheckpointer::Ops(sample())).unwrap();
        assert!(wait_for(libc::SCHED_OTHER), "back up once closing");
        drop(tx);
        thread.join().unwrap();
    }

    fn sample() -> Vec<Op> {
        vec![
            Op::Interaction(1001, b"{\"a\":1}".to_vec()),
            Op::Message(1001, 3, b"{}".to_vec()),
            Op::Contact("sms:+1555".into(), b"{}".to_vec()),
            Op::Claim("msg:sms:SM1".into(), "1001:m".into()),
            Op::Event((17, 2), b"{}".to_vec()),
            Op::DropEvent((16, 0)),
            Op::Outbox("j1".into(), b"{}".to_vec()),
            Op::DropOutbox("j0".into()),
            Op::Note("anne\u{1f}c".into(), "VIP".into()),
            Op::Kv("cursor".into(), "17-2".into()),
        ]
    }

    #[test]
    fn ops_round_trip() {
        let mut buf = vec![];
        encode(&sample(), &mut buf);
        assert_eq!(decode(&buf), Some(sample()));
        assert_eq!(
            decode(&buf[..buf.len() - 1]),
            None,
            "a cut frame is refused"
        );
    }

    #[test]
    fn reading_stops_at_a_torn_frame_and_at_an_older_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Wal::open(dir.path(), vec![], 7).unwrap();
        log.append(&sample()).unwrap();
        log.append(&sample()[..2]).unwrap();
        let torn_at = log.pos;
        log.append(&sample()[2..4]).unwrap();
        let slot = log.slot.clone();
        // Tear the third frame: flip one byte of its payload.
        let f = OpenOptions::new().write(true).open(&slot).unwrap();
        f.write_all_at(&[0xff], torn_at + HEADER as u64 + 2)
            .unwrap();
        let found = recover(dir.path(), 6).unwrap();
        assert_eq!(found.last_seq, Some(7));
        assert_eq!(found.frames, vec![sample(), sample()[..2].to_vec()]);
        // Checkpointed through 7: nothing to replay.
        assert!(recover(dir.path(), 7).unwrap().frames.is_empty());
    }

    #[test]
    fn a_reused_slot_shows_only_its_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Wal::open(dir.path(), vec![], 1).unwrap();
        log.append(&sample()).unwrap();
        log.append(&sample()).unwrap();
        let first = log.rotate().unwrap().expect("segment 1 closed");
        assert_eq!(first.seq, 1);
        // Segment 1 is checkpointed: its slot comes back and is taken next.
        log.slots.give_back(first.slot.clone());
        log.append(&sample()[3..4]).unwrap();
        let second = log.rotate().unwrap().expect("segment 2 closed");
        assert_eq!(second.seq, 2);
        assert_eq!(log.slot, first.slot);
        log.append(&sample()[..1]).unwrap();
        let found = recover(dir.path(), 1).unwrap();
        assert_eq!(found.last_seq, Some(3));
        assert_eq!(
            found.frames,
            vec![sample()[3..4].to_vec(), sample()[..1].to_vec()],
            "segment 2, then segment 3 without the old frames of segment 1 behind it"
        );
    }

    #[test]
    fn a_full_segment_is_closed_before_the_frame_that_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Wal::open(dir.path(), vec![], 1).unwrap();
        let big = vec![Op::Interaction(1, vec![7; (SLOT_BYTES / 2) as usize])];
        assert!(log.append(&big).unwrap().is_none());
        let closed = log.append(&big).unwrap().expect("segment 1 closed");
        assert_eq!(closed.seq, 1);
        let found = recover(dir.path(), 0).unwrap();
        assert_eq!(found.last_seq, Some(2));
        assert_eq!(found.frames, vec![big.clone(), big]);
    }
}
