//! Collections of the in-memory mirror that grow with every webhook, built
//! so that growing never stops the store for long.
//!
//! A `VecDeque` or a `HashMap` doubles its allocation when it fills up and
//! moves everything it holds into the new one. Under the store's lock, that
//! stopped every request thread: with about 250,000 events and claims kept
//! (ten seconds of the benchmark), the lock was held for 10–24 ms at a time,
//! and each doubling takes twice as long as the one before, so a gateway
//! that keeps a week of events would stall for seconds. Here the events
//! live in fixed-size chunks that never move, and the claims, the contacts
//! (which grow with every new sender) and the interactions (with every new
//! conversation) in many small maps, each of which grows on its own.

use crate::domain::interaction::Interaction;
use hashbrown::hash_table::{Entry, HashTable};
use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};

/// Events per chunk of an [`EventRing`].
const CHUNK: usize = 4096;

/// A FIFO of `T` (the feed's events, oldest first) in chunks of [`CHUNK`]:
/// pushing at the back and popping at the front never move what is kept.
/// Every chunk but the first and the last is full.
pub struct Ring<T> {
    chunks: VecDeque<VecDeque<T>>,
    len: usize,
}

impl<T> Default for Ring<T> {
    fn default() -> Ring<T> {
        Ring {
            chunks: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> Ring<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn push_back(&mut self, item: T) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK => last.push_back(item),
            _ => {
                let mut chunk = VecDeque::with_capacity(CHUNK);
                chunk.push_back(item);
                self.chunks.push_back(chunk);
            }
        }
        self.len += 1;
    }

    pub fn pop_front(&mut self) -> Option<T> {
        let first = self.chunks.front_mut()?;
        let item = first.pop_front();
        if first.is_empty() {
            self.chunks.pop_front();
        }
        if item.is_some() {
            self.len -= 1;
        }
        item
    }

    pub fn front(&self) -> Option<&T> {
        self.chunks.front().and_then(VecDeque::front)
    }

    pub fn back(&self) -> Option<&T> {
        self.chunks.back().and_then(VecDeque::back)
    }

    /// The position of chunk `k`'s first item.
    fn chunk_start(&self, k: usize) -> usize {
        match k {
            0 => 0,
            _ => self.chunks[0].len() + (k - 1) * CHUNK,
        }
    }

    /// The number of items for which `pred` holds, when it holds for a
    /// prefix of the ring (as [`slice::partition_point`]).
    pub fn partition_point(&self, mut pred: impl FnMut(&T) -> bool) -> usize {
        // The first chunk whose last item fails; the point is inside it.
        let k = self
            .chunks
            .partition_point(|c| c.back().is_some_and(&mut pred));
        match self.chunks.get(k) {
            Some(chunk) => self.chunk_start(k) + chunk.partition_point(pred),
            None => self.len,
        }
    }

    /// The items from position `start` on, in order.
    pub fn iter_from(&self, start: usize) -> impl Iterator<Item = &T> {
        let (k, offset) = if start >= self.len {
            (self.chunks.len(), 0)
        } else {
            let first = self.chunks[0].len();
            if start < first {
                (0, start)
            } else {
                (1 + (start - first) / CHUNK, (start - first) % CHUNK)
            }
        };
        self.chunks
            .iter()
            .skip(k)
            .enumerate()
            .flat_map(move |(n, c)| c.iter().skip(if n == 0 { offset } else { 0 }))
    }
}

/// Maps in a [`Sharded`] map: each holds about 1/256 of the keys, so that
/// one of them doubling moves that much.
const SHARDS: usize = 256;

/// A map spread over [`SHARDS`] maps by the key's hash. The hash is worked
/// out once per lookup and serves both the choice of shard and the lookup
/// in it (a `HashMap` per shard hashed every key twice).
pub struct Sharded<K, V> {
    pick: RandomState,
    shards: Box<[HashTable<(K, V)>]>,
}

impl<K, V> Default for Sharded<K, V> {
    fn default() -> Sharded<K, V> {
        Sharded {
            pick: RandomState::new(),
            shards: (0..SHARDS).map(|_| HashTable::new()).collect(),
        }
    }
}

/// The shard of a hash: bits a shard's table does not use (it takes the
/// low bits for the slot and the top seven for its tag), so that the keys
/// of one shard still spread over its slots and tags.
fn shard_of(hash: u64) -> usize {
    ((hash >> 32) as usize) % SHARDS
}

impl<K: Hash + Eq, V> Sharded<K, V> {
    /// A key's hash: the same for `K` and what it borrows as, since both
    /// hash alike (the contract of [`Borrow`]).
    fn hash<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        self.pick.hash_one(key)
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let h = self.hash(key);
        self.shards[shard_of(h)]
            .find(h, |(k, _)| k.borrow() == key)
            .map(|(_, v)| v)
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let h = self.hash(key);
        self.shards[shard_of(h)]
            .find_mut(h, |(k, _)| k.borrow() == key)
            .map(|(_, v)| v)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let h = self.hash(&key);
        let pick = &self.pick;
        match self.shards[shard_of(h)].entry(h, |(k, _)| *k == key, |(k, _)| pick.hash_one(k)) {
            Entry::Occupied(mut e) => Some(std::mem::replace(&mut e.get_mut().1, value)),
            Entry::Vacant(e) => {
                e.insert((key, value));
                None
            }
        }
    }

    /// Every value, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|t| t.iter().map(|(_, v)| v))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(HashTable::len).sum()
    }
}

/// The case numbers agents' lists start from, by queue and by assignee,
/// each also for the interactions waiting (`in_queue`) alone: an agent's
/// default list then reads the work waiting, not every interaction its
/// queues ever had. Sets of a B-tree, so that a queue's set growing by
/// one never moves the whole set under the store's lock.
///
/// Also the tags in use: per queue and per agent assigned, how many
/// interactions carry each tag, so that the tags an agent can filter by are
/// read without reading the queues' history.
#[derive(Default)]
pub struct Lists {
    queue: HashMap<String, BTreeSet<u64>>,
    agent: HashMap<String, BTreeSet<u64>>,
    waiting_queue: HashMap<String, BTreeSet<u64>>,
    waiting_agent: HashMap<String, BTreeSet<u64>>,
    tags_queue: HashMap<String, BTreeMap<String, usize>>,
    tags_agent: HashMap<String, BTreeMap<String, usize>>,
}

/// What of an interaction decides the lists it is in.
fn placement(i: &Interaction) -> (&str, Option<&str>, bool) {
    (&i.queue, i.assigned_to.as_deref(), i.in_queue)
}

fn add(sets: &mut HashMap<String, BTreeSet<u64>>, key: &str, case: u64) {
    match sets.get_mut(key) {
        Some(set) => {
            set.insert(case);
        }
        None => {
            sets.insert(key.to_owned(), BTreeSet::from([case]));
        }
    }
}

fn remove(sets: &mut HashMap<String, BTreeSet<u64>>, key: &str, case: u64) {
    if let Some(set) = sets.get_mut(key) {
        set.remove(&case);
        if set.is_empty() {
            sets.remove(key);
        }
    }
}

/// What of an interaction decides where its tags are counted.
fn tagging(i: &Interaction) -> (&str, Option<&str>, &[String]) {
    (&i.queue, i.assigned_to.as_deref(), &i.tags)
}

/// Counts `i`'s tags (each once) under its queue and its agent, up or
/// down (a tag no longer carried is dropped, and so is a queue's or
/// agent's map once it counts nothing).
fn count_tags(
    by_queue: &mut HashMap<String, BTreeMap<String, usize>>,
    by_agent: &mut HashMap<String, BTreeMap<String, usize>>,
    i: &Interaction,
    up: bool,
) {
    if i.tags.is_empty() {
        return;
    }
    let mut tags: Vec<&String> = i.tags.iter().collect();
    tags.sort_unstable();
    tags.dedup();
    count_under(by_queue, &i.queue, &tags, up);
    if let Some(a) = &i.assigned_to {
        count_under(by_agent, a, &tags, up);
    }
}

fn count_under(
    maps: &mut HashMap<String, BTreeMap<String, usize>>,
    owner: &str,
    tags: &[&String],
    up: bool,
) {
    if up {
        if !maps.contains_key(owner) {
            maps.insert(owner.to_owned(), BTreeMap::new());
        }
        let counts = maps.get_mut(owner).expect("just made");
        for tag in tags {
            *counts.entry((*tag).clone()).or_default() += 1;
        }
    } else if let Some(counts) = maps.get_mut(owner) {
        for tag in tags {
            if let Some(n) = counts.get_mut(*tag) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(*tag);
                }
            }
        }
        if counts.is_empty() {
            maps.remove(owner);
        }
    }
}

impl Lists {
    /// Moves interaction `new` out of the lists `old` (its stored version,
    /// if any) was in and into its own, and its tags with it. Most changes
    /// (a message) move nothing.
    pub fn place(&mut self, old: Option<&Interaction>, new: &Interaction) {
        if old.map(tagging) != Some(tagging(new)) {
            if let Some(old) = old {
                count_tags(&mut self.tags_queue, &mut self.tags_agent, old, false);
            }
            count_tags(&mut self.tags_queue, &mut self.tags_agent, new, true);
        }
        let case = new.case_number;
        let to = placement(new);
        if let Some(old) = old {
            let (queue, agent, waiting) = placement(old);
            if (queue, agent, waiting) == to {
                return;
            }
            remove(&mut self.queue, queue, case);
            if let Some(a) = agent {
                remove(&mut self.agent, a, case);
            }
            if waiting {
                remove(&mut self.waiting_queue, queue, case);
                if let Some(a) = agent {
                    remove(&mut self.waiting_agent, a, case);
                }
            }
        }
        let (queue, agent, waiting) = to;
        add(&mut self.queue, queue, case);
        if let Some(a) = agent {
            add(&mut self.agent, a, case);
        }
        if waiting {
            add(&mut self.waiting_queue, queue, case);
            if let Some(a) = agent {
                add(&mut self.waiting_agent, a, case);
            }
        }
    }

    /// The tags carried by an interaction in any of `queues` or assigned
    /// to `agent`, each once, sorted.
    pub fn tags(&self, queues: &[String], agent: Option<&str>) -> Vec<String> {
        let mut counts: Vec<&BTreeMap<String, usize>> = queues
            .iter()
            .filter_map(|q| self.tags_queue.get(q))
            .collect();
        counts.extend(agent.and_then(|a| self.tags_agent.get(a)));
        let mut tags: Vec<String> = counts.iter().flat_map(|c| c.keys().cloned()).collect();
        tags.sort_unstable();
        tags.dedup();
        tags
    }

    /// The cases in any of `queues` or assigned to `agent`, each once,
    /// ascending; with `waiting`, only those `in_queue`.
    pub fn cases(&self, queues: &[String], agent: Option<&str>, waiting: bool) -> Vec<u64> {
        let (by_queue, by_agent) = if waiting {
            (&self.waiting_queue, &self.waiting_agent)
        } else {
            (&self.queue, &self.agent)
        };
        let mut sets: Vec<&BTreeSet<u64>> = queues.iter().filter_map(|q| by_queue.get(q)).collect();
        sets.extend(agent.and_then(|a| by_agent.get(a)));
        match sets.as_slice() {
            [] => vec![],
            [one] => one.iter().copied().collect(),
            _ => {
                let mut all: Vec<u64> = sets.iter().flat_map(|s| s.iter().copied()).collect();
                all.sort_unstable();
                all.dedup();
                all
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tags are counted under the queue and the agent while carried; once
    /// none is, neither keeps a map, and untagged interactions make none.
    #[test]
    fn tag_counts_follow_the_tags_and_leave_no_empty_maps() {
        let plain = crate::store::embedded::tests::case_1001();
        let mut lists = Lists::default();
        lists.place(None, &plain);
        assert!(lists.tags_queue.is_empty() && lists.tags_agent.is_empty());
        let mut tagged = plain.clone();
        tagged.tags = vec!["vip".into(), "billing".into(), "vip".into()];
        tagged.assigned_to = Some("anne".into());
        lists.place(Some(&plain), &tagged);
        let support = vec!["support".to_string()];
        assert_eq!(lists.tags(&support, None), ["billing", "vip"]);
        assert_eq!(lists.tags(&[], Some("anne")), ["billing", "vip"]);
        let mut fewer = tagged.clone();
        fewer.tags = vec!["vip".into()];
        lists.place(Some(&tagged), &fewer);
        assert_eq!(lists.tags(&support, Some("anne")), ["vip"]);
        let mut none = fewer.clone();
        none.tags.clear();
        lists.place(Some(&fewer), &none);
        assert!(lists.tags(&support, Some("anne")).is_empty());
        assert!(lists.tags_queue.is_empty() && lists.tags_agent.is_empty());
    }

    /// Against a plain `VecDeque` through pushes and pops that cross chunk
    /// boundaries, the ring holds the same items in the same order, and
    /// answers `partition_point` and `iter_from` the same at every position.
    #[test]
    fn a_ring_behaves_as_a_deque() {
        let mut ring = Ring::default();
        let mut deque = VecDeque::new();
        let mut next = 0u64;
        // Grow past several chunks, shrink from the front into the middle of
        // one, grow again, and empty it.
        for (push, pop) in [
            (3 * CHUNK + 17, 0),
            (0, CHUNK + 5),
            (2 * CHUNK, 1),
            (0, 4 * CHUNK + 11),
        ] {
            for _ in 0..push {
                ring.push_back(next);
                deque.push_back(next);
                next += 1;
            }
            for _ in 0..pop {
                assert_eq!(ring.pop_front(), deque.pop_front());
            }
            assert_eq!(ring.len(), deque.len());
            assert_eq!(ring.front(), deque.front());
            assert_eq!(ring.back(), deque.back());
            let probes = [
                0,
                1,
                CHUNK - 1,
                CHUNK,
                CHUNK + 1,
                deque.len() / 2,
                deque.len(),
            ];
            for p in probes.into_iter().filter(|p| *p <= deque.len()) {
                let cut = deque.get(p).copied().unwrap_or(u64::MAX);
                assert_eq!(
                    ring.partition_point(|x| *x < cut),
                    deque.partition_point(|x| *x < cut),
                    "partition at {p}"
                );
                let got: Vec<u64> = ring.iter_from(p).take(CHUNK + 3).copied().collect();
                let want: Vec<u64> = deque.iter().skip(p).take(CHUNK + 3).copied().collect();
                assert_eq!(got, want, "from {p}");
            }
            assert_eq!(ring.iter_from(0).count(), deque.len());
        }
        assert_eq!(ring.len(), 0);
        assert_eq!(ring.pop_front(), None);
        assert_eq!(ring.partition_point(|_| true), 0);
        assert_eq!(ring.iter_from(0).count(), 0);
    }

    #[test]
    fn a_sharded_map_keeps_every_key() {
        let mut map = Sharded::default();
        for n in 0..10_000 {
            assert_eq!(map.insert(format!("msg:sms:SM{n}"), n), None);
        }
        assert_eq!(map.insert("msg:sms:SM7".into(), 70), Some(7));
        assert_eq!(map.len(), 10_000);
        assert_eq!(map.get("msg:sms:SM7"), Some(&70));
        assert_eq!(map.get("msg:sms:SM9999"), Some(&9999));
        assert_eq!(map.get("msg:sms:SM10000"), None);
        *map.get_mut("msg:sms:SM8").unwrap() = 80;
        assert_eq!(map.get("msg:sms:SM8"), Some(&80));
        assert_eq!(map.get_mut("msg:sms:SM10000"), None);
        let mut all: Vec<i32> = map.values().copied().collect();
        all.sort();
        assert_eq!(all.len(), 10_000);
        assert_eq!(&all[..3], [0, 1, 2]);
        assert_eq!(all[9_999], 9_999);
        // Spread out: no shard holds more than twice its share.
        let most = map.shards.iter().map(HashTable::len).max().unwrap();
        assert!(most < 2 * 10_000 / SHARDS, "{most}");
    }

    /// Case numbers follow one another; they spread out all the same.
    #[test]
    fn a_sharded_map_spreads_numbers_that_follow_one_another() {
        let mut map = Sharded::default();
        for case in 1001..11_001u64 {
            map.insert(case, case);
        }
        assert_eq!(map.len(), 10_000);
        assert_eq!(map.get(&1001), Some(&1001));
        assert_eq!(map.get(&11_001), None);
        let most = map.shards.iter().map(HashTable::len).max().unwrap();
        assert!(most < 2 * 10_000 / SHARDS, "{most}");
    }
}
