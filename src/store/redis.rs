//! The Redis store: many gateway processes sharing one state.
//!
//! Every key starts with `{prefix}:`; the layout, in one place ([`Keys`]):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{p}:interaction:{case}` | hash | `v` (version), `head` (the interaction's JSON without its messages), `qkey` / `akey` / `wkey` / `wakey` (the index sets it is in), `tqkey` / `takey` / `tags` (the tag counts it is counted in, and its tags as counted: a JSON array) |
//! | `{p}:interaction:{case}:messages` | list | the interaction's messages in order, one JSON document each |
//! | `{p}:queue:{queue}` | set | case numbers of the interactions in that queue |
//! | `{p}:assigned:{agent}` | set | case numbers of the interactions assigned to that agent |
//! | `{p}:waiting:{queue}` | set | the same, of the interactions waiting (`in_queue`) in that queue: agents' default lists |
//! | `{p}:waiting-assigned:{agent}` | set | the same, of those waiting and assigned to that agent |
//! | `{p}:lists` | string | `1` once every interaction stored before the `waiting` sets is in them ([`WAITING_SETS_LUA`]) |
//! | `{p}:tags:{queue}` | hash | tag → how many interactions in that queue carry it (none at 0): the tags in use |
//! | `{p}:tags-assigned:{agent}` | hash | the same, of the interactions assigned to that agent |
//! | `{p}:tags-counted` | string | `1` once every interaction stored before the tag counts is counted ([`TAG_COUNTS_LUA`]) |
//! | `{p}:contact:{contact key}` | hash | `v` (version), `json` |
//! | `{p}:contact-id:{contact id}` | string | the contact key, for `contact_by_id` |
//! | `{p}:claim:{key}` | string | a claim's or index entry's value |
//! | `{p}:case` | string | the case number counter (first number 1001) |
//! | `{p}:routing` | stream | one entry per event, field `event` holding its JSON (CONTRACT.md) |
//! | `{p}:routing:last` | string | the last event ID handed out, `ms-seq` |
//! | `{p}:outbox` | sorted set | job IDs scored by due time (microseconds since the epoch) |
//! | `{p}:outbox:jobs` | hash | job ID → `OutboxRecord` JSON |
//! | `{p}:blob:{id}` | string | attachment bytes |
//! | `{p}:notes:{agent}` | hash | contact ID → that agent's private notes |
//! | `{p}:kv:{key}` | string | small shared values |
//! | `{p}:lease:{name}` | string | the lease owner, expiring with the lease |
//!
//! An interaction is stored as a header plus its messages, so that a new
//! message costs one `RPUSH` and a changed one an `LSET`, however long the
//! conversation: the commit sends only the messages that are not the same
//! allocation as the ones the store handed out
//! ([`crate::domain::StoredMessages`]). Receiving a message reads the header
//! and the list's length only ([`Store::interaction_to_append`]), so it
//! does not read the conversation either. An interaction written by an older
//! gateway (the whole document, messages included, in the field `json`) is
//! read as it is and rewritten in the new layout on its next change; an
//! older gateway cannot read the new layout, so every process sharing the
//! Redis is upgraded together.
//!
//! [`Store::commit`] is one Lua script ([`COMMIT_LUA`]): it checks every claim
//! and version first and returns before writing anything when one fails, so a
//! commit is all or nothing exactly as on the embedded store. Versions are
//! kept beside the JSON (`v`) so the script compares them without parsing
//! JSON. Event IDs are made inside the same script from the server's clock
//! (`TIME`), strictly increasing even within one millisecond, and are the
//! stream entry IDs, so the feed's `after`, SSE `id:` and a consumer group
//! reading `{p}:routing` all name an event the same way.
//!
//! Live events: a background task follows the stream with `XREAD BLOCK` on
//! its own connection (not from the pool, which it would hold forever) and
//! forwards every entry, whichever process wrote it, to [`Store::subscribe`]rs.
//! It reconnects after errors and stops when the store is dropped.
//!
//! All keys of a commit are named by the script from values it is given or
//! has stored, so this backend targets a single Redis (or a primary with
//! replicas), not Redis Cluster.

use super::{Commit, Listed, OutboxJob, OutboxRecord, Store, StoreError, StoreResult};
use crate::domain::{parse_event_id, Contact, Event, Interaction, Message, StoredMessages};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_redis::{Config, Pool, PoolConfig, Runtime, Timeouts};
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamRangeReply, StreamReadReply};
use redis::{AsyncCommands, Script};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

/// The case counter starts here, so the first case number is 1001.
const CASE_COUNTER_START: u64 = 1000;
/// How long one `XREAD` blocks before the follower loops (and notices shutdown).
const FOLLOW_BLOCK_MS: u64 = 5_000;
const FOLLOW_BATCH: usize = 512;
/// How long a pool waits for, creates or recycles a connection before the
/// store answers `Unavailable` (and the HTTP edge 503).
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// Lua shared by the scripts that count tags: `count_tags(tqkey, takey,
/// tags, by)` adds `by` to each tag of the JSON array `tags` in the count
/// hashes `tqkey` (the queue's) and `takey` (the agent's, `''` for none),
/// and drops a tag whose count reaches 0.
const COUNT_TAGS_LUA: &str = r#"
local function count_tags(tqkey, takey, tags, by)
  for _, tag in ipairs(cjson.decode(tags)) do
    for _, h in ipairs({tqkey, takey}) do
      if h and h ~= '' and redis.call('HINCRBY', h, tag, by) <= 0 then redis.call('HDEL', h, tag) end
    end
  end
end
"#;

/// The commit, checked then applied. `ARGV[1]` is the commit's plan as JSON
/// ([`CommitPlan`], built by [`RedisStore::commit`]); the documents it
/// stores follow as arguments of their own, so that Redis stores them
/// without decoding them: `ARGV[2]` the interaction's header (its JSON
/// without messages), `ARGV[3]` the contact's, then each event's, each
/// outbox job's and each written message's, in the plan's order.
/// Every string that Redis parses as a number (versions, scores, case
/// numbers) travels as a string, because Lua numbers lose digits when passed
/// back to `redis.call`.
///
/// Returns `{'ok', id...}` with the new event IDs, `{'duplicate', key,
/// value}` or `{'conflict'}`; in the last two cases nothing was written.
const COMMIT_LUA: &str = r#"
local c = cjson.decode(ARGV[1])
local interaction_json, contact_json = ARGV[2], ARGV[3]
-- ARGV[4 ..]: the events' JSON, then the outbox jobs', then the messages'.
local first_job = 4 + c.events
local first_message = first_job + #c.outbox_add

-- 1. Check everything. Nothing below this block runs unless all of it holds.
for _, cl in ipairs(c.claims) do
  local held = redis.call('GET', cl[2])
  if held then return {'duplicate', cl[1], held} end
end
if c.contact then
  local cur = redis.call('HGET', c.contact.key, 'v') or '0'
  if cur ~= c.contact.expect then return {'conflict'} end
end
if c.interaction then
  local it = c.interaction
  local cur = redis.call('HGET', it.key, 'v') or '0'
  if cur ~= it.expect then return {'conflict'} end
  -- Written one by one over the list as it was read: it must still hold
  -- that many, and each message goes over one of them or right after.
  local len = 0
  if not it.rewrite then
    len = tonumber(it.stored)
    if redis.call('LLEN', it.mkey) ~= len then return {'conflict'} end
  end
  for _, idx in ipairs(it.messages) do
    local i = tonumber(idx)
    if i > len then return redis.error_reply('message ' .. idx .. ' is past the end of the list') end
    if i == len then len = len + 1 end
  end
end

-- 2. Events first: XADD is the only write that could fail (an ID not above
-- the stream's last one), and it fails before anything else is written.
local ids = {}
if c.events > 0 then
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local last_ms, last_seq = 0, 0
  local function consider(id)
    if not id then return end
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    if not ms then return end
    ms, seq = tonumber(ms), tonumber(seq)
    if ms > last_ms or (ms == last_ms and seq > last_seq) then
      last_ms, last_seq = ms, seq
    end
  end
  local function advance()
    if now_ms > last_ms then
      last_ms, last_seq = now_ms, 0
    else
      last_seq = last_seq + 1
    end
    return string.format('%d-%d', last_ms, last_seq)
  end
  consider(redis.call('GET', c.stream_last))
  local id
  for n = 1, c.events do
    local body = ARGV[3 + n]
    id = advance()
    -- The event JSON arrives without its ID (only known now): splice it in.
    local added = redis.pcall('XADD', c.stream, id, 'event', '{"id":"' .. id .. '",' .. string.sub(body, 2))
    if type(added) == 'table' and added.err then
      -- The stream is ahead of our last ID (an entry added by someone else,
      -- or the key holding our last ID lost): go on after the stream's own.
      -- Only the first XADD can meet this; nothing is written yet.
      if n > 1 then return redis.error_reply(added.err) end
      local info = redis.call('XINFO', 'STREAM', c.stream)
      for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then consider(info[i + 1]) end
      end
      id = advance()
      redis.call('XADD', c.stream, id, 'event', '{"id":"' .. id .. '",' .. string.sub(body, 2))
    end
    ids[#ids + 1] = id
  end
  redis.call('SET', c.stream_last, id)
  local horizon = now_ms - tonumber(c.retention_ms)
  if horizon > 0 then
    redis.call('XTRIM', c.stream, 'MINID', '~', string.format('%d-0', horizon))
  end
end

-- 3. Everything else.
for _, cl in ipairs(c.claims) do redis.call('SET', cl[2], cl[3]) end
for _, ix in ipairs(c.index) do redis.call('SET', ix[1], ix[2]) end
if c.contact and c.contact.write then
  redis.call('HSET', c.contact.key, 'v', c.contact.next, 'json', contact_json)
  redis.call('SET', c.contact.id_key, c.contact.domain_key)
end
if c.interaction then
  local it = c.interaction
  -- The index sets it is in now and was in before ('' for none).
  local now_in = {it.qkey, it.akey, it.wkey, it.wakey}
  local was_in = redis.call('HMGET', it.key, 'qkey', 'akey', 'wkey', 'wakey', 'tqkey', 'takey', 'tags')
  for n = 1, 4 do
    local old = was_in[n]
    if old and old ~= '' and old ~= now_in[n] then redis.call('SREM', old, it.case) end
    if now_in[n] ~= '' then redis.call('SADD', now_in[n], it.case) end
  end
  -- Its tags, counted where it was and where it is now (a message changes neither).
  if was_in[5] ~= it.tqkey or was_in[6] ~= it.takey or was_in[7] ~= it.tags then
    if was_in[7] then count_tags(was_in[5], was_in[6], was_in[7], -1) end
    count_tags(it.tqkey, it.takey, it.tags, 1)
  end
  local len = 0
  if it.rewrite then
    redis.call('DEL', it.mkey)
  else
    len = tonumber(it.stored)
  end
  for n, idx in ipairs(it.messages) do
    local i = tonumber(idx)
    if i < len then
      redis.call('LSET', it.mkey, i, ARGV[first_message + n - 1])
    else
      redis.call('RPUSH', it.mkey, ARGV[first_message + n - 1])
      len = len + 1
    end
  end
  redis.call('HSET', it.key, 'v', it.next, 'head', interaction_json, 'qkey', it.qkey, 'akey', it.akey,
    'wkey', it.wkey, 'wakey', it.wakey, 'tqkey', it.tqkey, 'takey', it.takey, 'tags', it.tags)
  -- The whole document an older gateway wrote, if any, is superseded.
  redis.call('HDEL', it.key, 'json')
  -- Keep the case counter past every stored case (as the embedded store does).
  local counter = tonumber(redis.call('GET', c.case_counter) or c.case_start)
  if tonumber(it.case) > counter then redis.call('SET', c.case_counter, it.case) end
end
for n, job in ipairs(c.outbox_add) do
  redis.call('HSET', c.outbox_jobs, job[1], ARGV[first_job + n - 1])
  redis.call('ZADD', c.outbox_due, job[2], job[1])
end
for _, id in ipairs(c.outbox_remove) do
  redis.call('HDEL', c.outbox_jobs, id)
  redis.call('ZREM', c.outbox_due, id)
end

local out = {'ok'}
for _, id in ipairs(ids) do out[#out + 1] = id end
return out
"#;

/// Puts interactions stored before the `waiting` sets existed into them:
/// ARGV[1] the key prefix, ARGV[2]..ARGV[3] a range of case numbers. Each
/// one that has no `wkey` yet is placed by its stored header (or whole
/// document, from an older gateway) in the same script, so a commit never
/// runs between reading it and placing it. Returns how many were placed.
const WAITING_SETS_LUA: &str = r#"
local p = ARGV[1]
local placed = 0
for n = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  local case = string.format('%d', n)
  local key = p .. ':interaction:' .. case
  local h = redis.call('HMGET', key, 'head', 'json', 'wkey')
  if not h[3] and (h[1] or h[2]) then
    local i = cjson.decode(h[1] or h[2])
    local wkey, wakey = '', ''
    if i.in_queue == true then
      wkey = p .. ':waiting:' .. i.queue
      redis.call('SADD', wkey, case)
      if type(i.assigned_to) == 'string' then
        wakey = p .. ':waiting-assigned:' .. i.assigned_to
        redis.call('SADD', wakey, case)
      end
    end
    redis.call('HSET', key, 'wkey', wkey, 'wakey', wakey)
    placed = placed + 1
  end
end
return placed
"#;

/// Counts the tags of interactions stored before the tag counts existed
/// (after [`COUNT_TAGS_LUA`]): ARGV as [`WAITING_SETS_LUA`]'s. Each one not
/// counted yet (no `tags` field) is counted by its stored header (or whole
/// document) in the same script. Returns how many were counted.
const TAG_COUNTS_LUA: &str = r#"
local p = ARGV[1]
local counted = 0
for n = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  local case = string.format('%d', n)
  local key = p .. ':interaction:' .. case
  local h = redis.call('HMGET', key, 'head', 'json', 'tags')
  if not h[3] and (h[1] or h[2]) then
    local i = cjson.decode(h[1] or h[2])
    local seen, tags = {}, {}
    if type(i.tags) == 'table' then
      for _, t in ipairs(i.tags) do
        if not seen[t] then seen[t] = true; tags[#tags + 1] = t end
      end
    end
    table.sort(tags)
    local json = '[]'
    if #tags > 0 then json = cjson.encode(tags) end
    local tqkey, takey = p .. ':tags:' .. i.queue, ''
    if type(i.assigned_to) == 'string' then takey = p .. ':tags-assigned:' .. i.assigned_to end
    count_tags(tqkey, takey, json, 1)
    redis.call('HSET', key, 'tqkey', tqkey, 'takey', takey, 'tags', json)
    counted = counted + 1
  end
end
return counted
"#;

/// Interactions read per script by [`RedisStore::listed`]: about 2 ms of
/// Redis's time each.
const LIST_BATCH: usize = 200;

/// KEYS[1]: the counter; ARGV[1]: the value before the first number.
const NEXT_CASE_LUA: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('INCR', KEYS[1])
"#;

/// One interaction as a list shows it, for [`LIST_SOME_LUA`], as
/// [`read_listed`] takes it: `{'head', header}` or `{'head', header, latest
/// message}`, `{'json', document}` (written by an older gateway), or
/// nothing. `key` is its hash; its messages are at `key .. ':messages'`.
const LIST_ONE_LUA: &str = r#"
local function list_one(key)
  local h = redis.call('HMGET', key, 'head', 'json')
  if h[1] then
    local last = redis.call('LINDEX', key .. ':messages', -1)
    if last then return {'head', h[1], last} end
    return {'head', h[1]}
  elseif h[2] then
    return {'json', h[2]}
  end
  return {}
end
"#;

/// ARGV[1]: the interaction key prefix; ARGV[2..]: case numbers. One batch
/// of a list's interactions (see [`RedisStore::listed`]).
const LIST_SOME_LUA: &str = r#"
local out = {}
for n = 2, #ARGV do
  local one = list_one(ARGV[1] .. ARGV[n])
  if #one > 0 then out[#out + 1] = one end
end
return out
"#;

/// KEYS[1]: an interaction's hash, KEYS[2]: its message list; ARGV[1]: how
/// the JSON of the message wanted starts (`{"id":"..."`, its first field).
/// Answers `{'head', header, count[, index, message]}` (the message and its
/// index when the list holds it, looked for from the end: a delivery's news
/// is about a recent message), `{'json', document}` (written by an older
/// gateway), or nothing. Only the one message leaves Redis.
const WITH_MESSAGE_LUA: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'head', 'json')
if h[1] then
  local list = redis.call('LRANGE', KEYS[2], 0, -1)
  local want = ARGV[1]
  for i = #list, 1, -1 do
    if string.sub(list[i], 1, #want) == want then
      return {'head', h[1], tostring(#list), tostring(i - 1), list[i]}
    end
  end
  return {'head', h[1], tostring(#list)}
elseif h[2] then
  return {'json', h[2]}
end
return {}
"#;

/// KEYS[1]: `contact-id:{id}`; ARGV[1]: the contact key prefix.
const CONTACT_BY_ID_LUA: &str = r#"
local key = redis.call('GET', KEYS[1])
if not key then return false end
return redis.call('HGET', ARGV[1] .. key, 'json')
"#;

/// KEYS[1]: due set, KEYS[2]: jobs hash; ARGV: now score, until score, limit.
/// Atomic, so two workers never lease the same job at once.
const OUTBOX_LEASE_LUA: &str = r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local out = {}
for _, id in ipairs(ids) do
  local job = redis.call('HGET', KEYS[2], id)
  if job then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    out[#out + 1] = job
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"#;

/// KEYS[1]: due set, KEYS[2]: jobs hash; ARGV: id, score, record JSON.
/// Only a job still in the outbox is put back (it may have been delivered).
const OUTBOX_RESCHEDULE_LUA: &str = r#"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
"#;

/// KEYS[1]: the lease; ARGV: owner, ttl ms. Taken when free, renewed only by its owner.
const TRY_LEASE_LUA: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// The key layout (see the module table).
#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn interaction_prefix(&self) -> String {
        format!("{}:interaction:", self.prefix)
    }
    fn interaction(&self, case: u64) -> String {
        format!("{}:interaction:{case}", self.prefix)
    }
    fn messages(&self, case: u64) -> String {
        format!("{}:interaction:{case}:messages", self.prefix)
    }
    fn queue(&self, queue: &str) -> String {
        format!("{}:queue:{queue}", self.prefix)
    }
    fn assigned(&self, agent: &str) -> String {
        format!("{}:assigned:{agent}", self.prefix)
    }
    fn waiting(&self, queue: &str) -> String {
        format!("{}:waiting:{queue}", self.prefix)
    }
    fn waiting_assigned(&self, agent: &str) -> String {
        format!("{}:waiting-assigned:{agent}", self.prefix)
    }
    /// Set once every interaction is in the `waiting` sets it belongs to.
    fn lists_marker(&self) -> String {
        format!("{}:lists", self.prefix)
    }
    fn tags(&self, queue: &str) -> String {
        format!("{}:tags:{queue}", self.prefix)
    }
    fn tags_assigned(&self, agent: &str) -> String {
        format!("{}:tags-assigned:{agent}", self.prefix)
    }
    /// Set once every interaction's tags are counted.
    fn tags_marker(&self) -> String {
        format!("{}:tags-counted", self.prefix)
    }
    fn contact_prefix(&self) -> String {
        format!("{}:contact:", self.prefix)
    }
    fn contact(&self, key: &str) -> String {
        format!("{}:contact:{key}", self.prefix)
    }
    fn contact_id(&self, id: &str) -> String {
        format!("{}:contact-id:{id}", self.prefix)
    }
    fn claim(&self, key: &str) -> String {
        format!("{}:claim:{key}", self.prefix)
    }
    fn case_counter(&self) -> String {
        format!("{}:case", self.prefix)
    }
    fn routing(&self) -> String {
        format!("{}:routing", self.prefix)
    }
    fn routing_last(&self) -> String {
        format!("{}:routing:last", self.prefix)
    }
    fn outbox_due(&self) -> String {
        format!("{}:outbox", self.prefix)
    }
    fn outbox_jobs(&self) -> String {
        format!("{}:outbox:jobs", self.prefix)
    }
    fn blob(&self, id: &str) -> String {
        format!("{}:blob:{id}", self.prefix)
    }
    fn notes(&self, agent: &str) -> String {
        format!("{}:notes:{agent}", self.prefix)
    }
    fn kv(&self, key: &str) -> String {
        format!("{}:kv:{key}", self.prefix)
    }
    fn lease(&self, name: &str) -> String {
        format!("{}:lease:{name}", self.prefix)
    }
}

struct Scripts {
    commit: Script,
    next_case: Script,
    list_some: Script,
    waiting_sets: Script,
    tag_counts: Script,
    with_message: Script,
    contact_by_id: Script,
    outbox_lease: Script,
    outbox_reschedule: Script,
    try_lease: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            commit: Script::new(&format!("{COUNT_TAGS_LUA}{COMMIT_LUA}")),
            next_case: Script::new(NEXT_CASE_LUA),
            list_some: Script::new(&format!("{LIST_ONE_LUA}{LIST_SOME_LUA}")),
            waiting_sets: Script::new(WAITING_SETS_LUA),
            tag_counts: Script::new(&format!("{COUNT_TAGS_LUA}{TAG_COUNTS_LUA}")),
            with_message: Script::new(WITH_MESSAGE_LUA),
            contact_by_id: Script::new(CONTACT_BY_ID_LUA),
            outbox_lease: Script::new(OUTBOX_LEASE_LUA),
            outbox_reschedule: Script::new(OUTBOX_RESCHEDULE_LUA),
            try_lease: Script::new(TRY_LEASE_LUA),
        }
    }
}

pub struct RedisStore {
    pool: Pool,
    /// One multiplexed connection shared by every request (it pipelines
    /// concurrent commands on one socket). It is taken from the pool once and
    /// again only after it fails, so a command costs one round trip rather
    /// than the pool's `UNWATCH` + `PING` check on every checkout. Nothing
    /// here uses `WATCH` (every change is one Lua script), so sharing is safe.
    shared: parking_lot::Mutex<Option<MultiplexedConnection>>,
    keys: Keys,
    scripts: Scripts,
    retention_ms: u64,
    events: broadcast::Sender<Event>,
    /// Stops the stream follower when the store is dropped.
    _follower: DropGuard,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// What [`COMMIT_LUA`] checks and writes, without the documents it stores
/// (those follow as arguments of their own).
#[derive(serde::Serialize)]
struct CommitPlan<'a> {
    /// `[claim key, Redis key, value]`.
    claims: Vec<[String; 3]>,
    /// `[Redis key, value]`.
    index: Vec<[String; 2]>,
    /// How many event documents follow.
    events: usize,
    stream: String,
    stream_last: String,
    retention_ms: String,
    case_counter: String,
    case_start: String,
    outbox_due: String,
    outbox_jobs: String,
    /// `[job ID, due score]`, their documents after the events'.
    outbox_add: Vec<[String; 2]>,
    outbox_remove: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    contact: Option<ContactPlan<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interaction: Option<InteractionPlan>,
}

#[derive(serde::Serialize)]
struct ContactPlan<'a> {
    key: String,
    expect: String,
    next: String,
    id_key: String,
    domain_key: &'a str,
    write: bool,
}

#[derive(serde::Serialize)]
struct InteractionPlan {
    key: String,
    case: String,
    expect: String,
    next: String,
    qkey: String,
    akey: String,
    /// The `waiting` sets it is in: empty unless `in_queue`.
    wkey: String,
    wakey: String,
    /// The tag counts it is counted in (the queue's, the agent's or `''`),
    /// and its tags as counted: each once, sorted, a JSON array.
    tqkey: String,
    takey: String,
    tags: String,
    /// The message list.
    mkey: String,
    /// Whether the list is written anew (a new interaction, or one whose
    /// stored messages are not known) rather than message by message.
    rewrite: bool,
    /// How many messages the list held when the interaction was read.
    stored: String,
    /// The indexes of the messages written, ascending; their documents
    /// follow the outbox jobs'.
    messages: Vec<String>,
}

/// What was read of an interaction's message list.
enum ListRead {
    /// Every message's JSON, in order.
    All(Vec<String>),
    /// Only how many there are (a read to append to).
    Length(usize),
}

/// An interaction from what its hash and its message list hold: the header
/// (`head`) and the list, or the whole document an older gateway wrote
/// (`json`), which is taken as it is and rewritten by the next commit.
fn assemble(
    head: Option<String>,
    whole: Option<String>,
    list: ListRead,
) -> StoreResult<Option<Interaction>> {
    match (head, whole) {
        (Some(head), _) => {
            let mut i: Interaction = parse("interaction", &head)?;
            i.stored = match list {
                ListRead::All(messages) => {
                    i.messages = messages
                        .iter()
                        .map(|m| parse::<Message>("message", m).map(Arc::new))
                        .collect::<StoreResult<_>>()?;
                    StoredMessages::of(&i.messages)
                }
                ListRead::Length(n) => StoredMessages::left_out(n),
            };
            Ok(Some(i))
        }
        (None, Some(doc)) => parse("interaction", &doc).map(Some),
        (None, None) => Ok(None),
    }
}

/// A listed interaction from the parts [`LIST_ONE_LUA`] returns.
fn read_listed(parts: Vec<String>) -> StoreResult<Option<Listed>> {
    let mut parts = parts.into_iter();
    let whole = match (parts.next().as_deref(), parts.next()) {
        (None, _) => return Ok(None),
        (Some("json"), Some(doc)) => assemble(None, Some(doc), ListRead::All(vec![]))?,
        (Some("head"), Some(head)) => assemble(Some(head), None, ListRead::All(parts.collect()))?,
        (kind, _) => {
            return Err(unavailable(format!(
                "unexpected answer reading an interaction: {kind:?}"
            )))
        }
    };
    Ok(whole.map(|mut i| {
        let last_message = i.messages.pop();
        i.messages = vec![];
        i.stored = StoredMessages::default();
        Listed {
            interaction: i,
            last_message,
        }
    }))
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records always serialize")
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| unavailable(format!("unreadable {what} record: {e}")))
}

/// An outbox score: microseconds since the epoch (exact in a double until
/// the year 2255), so "due by now" compares as precisely as the embedded store.
fn score(t: DateTime<Utc>) -> String {
    t.timestamp_micros().to_string()
}

/// An event read back from the stream; its ID is the entry ID.
fn stream_event(id: &str, map: &std::collections::HashMap<String, redis::Value>) -> Option<Event> {
    let raw: String = redis::from_redis_value(map.get("event")?).ok()?;
    match serde_json::from_str::<Event>(&raw) {
        Ok(mut e) => {
            e.id = id.to_string();
            Some(e)
        }
        Err(e) => {
            tracing::warn!(id, error = %e, "skipping an unreadable routing event");
            None
        }
    }
}

impl RedisStore {
    /// Connects to `url` (checking that Redis answers), keeping every key
    /// under `{key_prefix}:` and events at least `retention` long.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        retention: Duration,
    ) -> anyhow::Result<Arc<RedisStore>> {
        let mut cfg = Config::from_url(url);
        cfg.pool = Some(PoolConfig {
            timeouts: Timeouts {
                wait: Some(POOL_TIMEOUT),
                create: Some(POOL_TIMEOUT),
                recycle: Some(POOL_TIMEOUT),
            },
            ..PoolConfig::default()
        });
        let pool = cfg.create_pool(Some(Runtime::Tokio1))?;
        let keys = Keys {
            prefix: key_prefix.to_string(),
        };
        // Fail fast on a wrong URL, and learn where the stream ends now so the
        // follower forwards every event committed after `connect` returns.
        let start = {
            let mut conn = pool.get().await?;
            let _: String = redis::cmd("PING").query_async(&mut conn).await?;
            let last: StreamRangeReply = conn.xrevrange_count(keys.routing(), "+", "-", 1).await?;
            last.ids
                .first()
                .map(|e| e.id.clone())
                .unwrap_or_else(|| "0-0".into())
        };
        let (events, _) = broadcast::channel(4096);
        let cancel = CancellationToken::new();
        let client = redis::Client::open(url)?;
        tokio::spawn(follow(
            client,
            keys.routing(),
            start,
            events.clone(),
            cancel.clone(),
        ));
        let store = RedisStore {
            pool,
            shared: parking_lot::Mutex::new(None),
            keys,
            scripts: Scripts::new(),
            retention_ms: u64::try_from(retention.as_millis()).unwrap_or(u64::MAX),
            events,
            _follower: cancel.drop_guard(),
        };
        store
            .fill(
                &store.scripts.waiting_sets,
                store.keys.lists_marker(),
                "interactions stored before the waiting sets were put in them",
            )
            .await?;
        store
            .fill(
                &store.scripts.tag_counts,
                store.keys.tags_marker(),
                "the tags of interactions stored before the tag counts were counted",
            )
            .await?;
        Ok(Arc::new(store))
    }

    /// Once per Redis (and key prefix): brings every interaction stored by
    /// a gateway without an index (the `waiting` sets, the tag counts)
    /// into it with `script` ([`WAITING_SETS_LUA`], [`TAG_COUNTS_LUA`]), a
    /// range of cases per script, before this process lists anything, then
    /// sets `marker`. Gateways that start together may both do it; each
    /// interaction is brought in once either way.
    async fn fill(&self, script: &Script, marker: String, what: &str) -> anyhow::Result<()> {
        const CASES_PER_SCRIPT: u64 = 500;
        let mut conn = self.pool.get().await?;
        let done: Option<String> = conn.get(&marker).await?;
        if done.is_some() {
            return Ok(());
        }
        let last: Option<u64> = conn.get(self.keys.case_counter()).await?;
        let mut from = CASE_COUNTER_START + 1;
        let mut placed = 0u64;
        while let Some(last) = last.filter(|l| from <= *l) {
            let to = (from + CASES_PER_SCRIPT - 1).min(last);
            let n: u64 = script
                .arg(&self.keys.prefix)
                .arg(from)
                .arg(to)
                .invoke_async(&mut conn)
                .await?;
            placed += n;
            from = to + 1;
        }
        let _: () = conn.set(&marker, "1").await?;
        if placed > 0 {
            tracing::info!(interactions = placed, "redis store: {what}");
        }
        Ok(())
    }

    /// The interactions in any of `queues` or assigned to `agent` (with
    /// `waiting`, from the sets of those `in_queue`), each once, as a list
    /// shows them: the case numbers first, then the interactions
    /// [`LIST_BATCH`] at a time, each batch one script. One script for all
    /// of them held Redis, and every other gateway process's webhooks, for
    /// as long as a queue's whole history took to read (96 ms for 10,000
    /// interactions). An interaction that changes meanwhile is listed as
    /// it is when its batch is read; the gateway applies the list's rules
    /// to what it gets.
    async fn listed(
        &self,
        queues: &[String],
        agent: Option<&str>,
        waiting: bool,
    ) -> StoreResult<Vec<Listed>> {
        let k = &self.keys;
        let mut sets: Vec<String> = queues
            .iter()
            .map(|q| if waiting { k.waiting(q) } else { k.queue(q) })
            .collect();
        sets.extend(agent.map(|a| {
            if waiting {
                k.waiting_assigned(a)
            } else {
                k.assigned(a)
            }
        }));
        if sets.is_empty() {
            return Ok(vec![]);
        }
        let mut conn = self.conn().await?;
        let cases: Vec<String> = redis::cmd("SUNION")
            .arg(&sets)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let prefix = self.keys.interaction_prefix();
        let mut out = Vec::with_capacity(cases.len());
        for batch in cases.chunks(LIST_BATCH) {
            let raw: Vec<Vec<String>> = self
                .scripts
                .list_some
                .arg(&prefix)
                .arg(batch)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            for parts in raw {
                out.extend(read_listed(parts)?);
            }
        }
        Ok(out)
    }

    /// A MULTI/EXEC pipeline that reads interaction `case`'s header (`head`,
    /// and `json` for one an older gateway wrote); the caller adds what it
    /// reads of the message list, so both come from one commit. Cheaper for
    /// Redis than a script that builds the answer in Lua.
    fn header_read(&self, case: u64) -> redis::Pipeline {
        let mut read = redis::pipe();
        read.atomic()
            .cmd("HMGET")
            .arg(self.keys.interaction(case))
            .arg("head")
            .arg("json");
        read
    }

    async fn conn(&self) -> StoreResult<Shared<'_>> {
        let cached = self.shared.lock().clone();
        let inner = match cached {
            Some(c) => c,
            None => {
                let fresh =
                    deadpool_redis::Connection::take(self.pool.get().await.map_err(unavailable)?);
                self.shared.lock().get_or_insert(fresh).clone()
            }
        };
        Ok(Shared {
            inner,
            slot: &self.shared,
        })
    }
}

/// The shared connection, as one request uses it: a command that fails for
/// want of a connection drops it, so the next request takes a fresh one
/// from the pool (and answers `Unavailable` while none can be made).
struct Shared<'a> {
    inner: MultiplexedConnection,
    slot: &'a parking_lot::Mutex<Option<MultiplexedConnection>>,
}

impl Shared<'_> {
    fn check<T>(&self, r: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &r {
            if e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
                || e.is_unrecoverable_error()
            {
                *self.slot.lock() = None;
            }
        }
        r
    }
}

impl redis::aio::ConnectionLike for Shared<'_> {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let r = self.inner.req_packed_command(cmd).await;
            self.check(r)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let r = self.inner.req_packed_commands(cmd, offset, count).await;
            self.check(r)
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// Follows `{p}:routing` from `cursor` and forwards each entry to `tx`, on a
/// connection of its own because `XREAD BLOCK` holds it. On any error it
/// waits (up to 5 s, doubling) and reconnects, resuming after the last entry
/// it forwarded, so subscribers miss nothing the stream still holds.
async fn follow(
    client: redis::Client,
    stream: String,
    mut cursor: String,
    tx: broadcast::Sender<Event>,
    cancel: CancellationToken,
) {
    // Named so operators (and tests) can tell it apart in `CLIENT LIST`.
    let name: String = format!("{stream}:follower")
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect();
    let mut backoff = Duration::from_millis(100);
    loop {
        let conn = tokio::select! {
            _ = cancel.cancelled() => return,
            c = client.get_multiplexed_async_connection() => c,
        };
        match conn {
            Ok(mut conn) => {
                // A name Redis refuses only costs the name.
                let _: redis::RedisResult<()> = redis::cmd("CLIENT")
                    .arg("SETNAME")
                    .arg(&name)
                    .query_async(&mut conn)
                    .await;
                loop {
                    let mut cmd = redis::cmd("XREAD");
                    cmd.arg("COUNT")
                        .arg(FOLLOW_BATCH)
                        .arg("BLOCK")
                        .arg(FOLLOW_BLOCK_MS)
                        .arg("STREAMS")
                        .arg(&stream)
                        .arg(&cursor);
                    let read = cmd.query_async::<Option<StreamReadReply>>(&mut conn);
                    let reply = tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = read => r,
                    };
                    match reply {
                        Ok(reply) => {
                            backoff = Duration::from_millis(100);
                            for key in reply.map(|r| r.keys).unwrap_or_default() {
                                for entry in key.ids {
                                    if let Some(e) = stream_event(&entry.id, &entry.map) {
                                        // No receiver is not an error: nobody listens yet.
                                        let _ = tx.send(e);
                                    }
                                    cursor = entry.id;
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "routing stream follower lost its connection");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "routing stream follower cannot connect"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn commit(&self, commit: Commit) -> StoreResult<Vec<Event>> {
        let k = &self.keys;
        let claims: Vec<_> = commit
            .claims
            .iter()
            .map(|c| [c.key.as_str(), &k.claim(&c.key), c.value.as_str()].map(str::to_owned))
            .collect();
        let index: Vec<_> = commit
            .index
            .iter()
            .map(|c| [k.claim(&c.key), c.value.clone()])
            .collect();
        let mut plan = CommitPlan {
            claims,
            index,
            events: commit.events.len(),
            stream: k.routing(),
            stream_last: k.routing_last(),
            retention_ms: self.retention_ms.to_string(),
            case_counter: k.case_counter(),
            case_start: CASE_COUNTER_START.to_string(),
            outbox_due: k.outbox_due(),
            outbox_jobs: k.outbox_jobs(),
            outbox_add: commit
                .outbox_add
                .iter()
                .map(|j| [j.id.clone(), score(j.due_at)])
                .collect(),
            outbox_remove: &commit.outbox_remove,
            contact: None,
            interaction: None,
        };
        let mut contact_json = String::new();
        if let Some(c) = &commit.contact {
            let next = c.version + 1;
            if !commit.contact_unchanged {
                contact_json = json(&Contact {
                    version: next,
                    ..c.clone()
                });
            }
            plan.contact = Some(ContactPlan {
                key: k.contact(&c.key),
                expect: c.version.to_string(),
                next: next.to_string(),
                id_key: k.contact_id(&c.id),
                domain_key: &c.key,
                write: !commit.contact_unchanged,
            });
        }
        let mut interaction_json = String::new();
        let mut message_docs = vec![];
        if let Some(mut i) = commit.interaction {
            let next = i.version + 1;
            let messages = std::mem::take(&mut i.messages);
            let expect = std::mem::replace(&mut i.version, next);
            interaction_json = json(&i);
            let mut written = vec![];
            let (rewrite, stored_len) = match i.stored.partial() {
                // Read for appending: `messages` are the ones after the
                // stored ones, all new.
                Some((left_out, None)) => {
                    for (n, m) in messages.iter().enumerate() {
                        written.push((left_out + n).to_string());
                        message_docs.push(json(&**m));
                    }
                    (false, left_out)
                }
                // Read to change one message: it is the first, written where
                // it is stored (one `LSET`); any after it are new.
                Some((count, Some(index))) => {
                    let mut given = messages.iter();
                    if let Some(m) = given.next() {
                        written.push(index.to_string());
                        message_docs.push(json(&**m));
                    }
                    for (n, m) in given.enumerate() {
                        written.push((count + n).to_string());
                        message_docs.push(json(&**m));
                    }
                    (false, count)
                }
                // Only what differs from the list as it was read; all of it
                // when that is not known, or when messages went missing since.
                None => {
                    let stored = i.stored.get().filter(|s| s.len() <= messages.len());
                    for (n, m) in messages.iter().enumerate() {
                        let same = stored
                            .and_then(|s| s.get(n))
                            .is_some_and(|o| Arc::ptr_eq(o, m) || o == m);
                        if !same {
                            written.push(n.to_string());
                            message_docs.push(json(&**m));
                        }
                    }
                    (stored.is_none(), stored.map_or(0, <[_]>::len))
                }
            };
            plan.interaction = Some(InteractionPlan {
                key: k.interaction(i.case_number),
                case: i.case_number.to_string(),
                expect: expect.to_string(),
                next: next.to_string(),
                qkey: k.queue(&i.queue),
                akey: i
                    .assigned_to
                    .as_deref()
                    .map(|a| k.assigned(a))
                    .unwrap_or_default(),
                wkey: if i.in_queue {
                    k.waiting(&i.queue)
                } else {
                    String::new()
                },
                wakey: match (&i.assigned_to, i.in_queue) {
                    (Some(a), true) => k.waiting_assigned(a),
                    _ => String::new(),
                },
                tqkey: k.tags(&i.queue),
                takey: i
                    .assigned_to
                    .as_deref()
                    .map(|a| k.tags_assigned(a))
                    .unwrap_or_default(),
                tags: {
                    let mut tags: Vec<&String> = i.tags.iter().collect();
                    tags.sort_unstable();
                    tags.dedup();
                    json(&tags)
                },
                mkey: k.messages(i.case_number),
                rewrite,
                stored: stored_len.to_string(),
                messages: written,
            });
        }
        let mut invocation = self.scripts.commit.prepare_invoke();
        invocation
            .arg(json(&plan))
            .arg(interaction_json)
            .arg(contact_json);
        for e in &commit.events {
            invocation.arg(json(e));
        }
        for j in &commit.outbox_add {
            invocation.arg(json(&OutboxRecord::V1(j.clone())));
        }
        for m in &message_docs {
            invocation.arg(m);
        }
        let mut conn = self.conn().await?;
        let reply: Vec<String> = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        match reply.first().map(String::as_str) {
            Some("ok") if reply.len() == commit.events.len() + 1 => Ok(reply
                .into_iter()
                .skip(1)
                .zip(commit.events)
                .map(|(id, draft)| Event::from_draft(id, draft))
                .collect()),
            Some("conflict") => Err(StoreError::Conflict),
            Some("duplicate") if reply.len() == 3 => Err(StoreError::Duplicate {
                key: reply[1].clone(),
                value: reply[2].clone(),
            }),
            _ => Err(unavailable(format!(
                "unexpected answer from the commit script: {reply:?}"
            ))),
        }
    }

    async fn next_case_number(&self) -> StoreResult<u64> {
        let mut conn = self.conn().await?;
        self.scripts
            .next_case
            .key(self.keys.case_counter())
            .arg(CASE_COUNTER_START)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn interaction(&self, case_number: u64) -> StoreResult<Option<Interaction>> {
        let mut conn = self.conn().await?;
        let mut read = self.header_read(case_number);
        read.cmd("LRANGE")
            .arg(self.keys.messages(case_number))
            .arg(0)
            .arg(-1);
        let ((head, whole), messages): ((Option<String>, Option<String>), Vec<String>) =
            read.query_async(&mut conn).await.map_err(unavailable)?;
        assemble(head, whole, ListRead::All(messages))
    }

    async fn interaction_to_append(&self, case_number: u64) -> StoreResult<Option<Interaction>> {
        let mut conn = self.conn().await?;
        // The header and how many messages there are, not the messages.
        let mut read = self.header_read(case_number);
        read.cmd("LLEN").arg(self.keys.messages(case_number));
        let ((head, whole), count): ((Option<String>, Option<String>), usize) =
            read.query_async(&mut conn).await.map_err(unavailable)?;
        assemble(head, whole, ListRead::Length(count))
    }

    async fn interaction_with_message(
        &self,
        case_number: u64,
        message_id: &str,
    ) -> StoreResult<Option<Interaction>> {
        let mut conn = self.conn().await?;
        // Serialized as the message's own JSON begins: `id` is its first field.
        let want = format!("{{\"id\":{}", json(&message_id));
        let parts: Vec<String> = self
            .scripts
            .with_message
            .key(self.keys.interaction(case_number))
            .key(self.keys.messages(case_number))
            .arg(want)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut parts = parts.into_iter();
        match (parts.next().as_deref(), parts.next()) {
            (None, _) => Ok(None),
            (Some("json"), Some(doc)) => assemble(None, Some(doc), ListRead::All(vec![])),
            (Some("head"), Some(head)) => {
                let number = |p: Option<String>| {
                    p.and_then(|n| n.parse::<usize>().ok())
                        .ok_or_else(|| unavailable("unexpected answer reading a message"))
                };
                let count = number(parts.next())?;
                let mut i: Interaction = parse("interaction", &head)?;
                i.stored = match parts.next() {
                    Some(index) => {
                        let index = number(Some(index))?;
                        let m = parts
                            .next()
                            .ok_or_else(|| unavailable("unexpected answer reading a message"))?;
                        i.messages = vec![Arc::new(parse::<Message>("message", &m)?)];
                        StoredMessages::one_of(index, count)
                    }
                    None => StoredMessages::left_out(count),
                };
                Ok(Some(i))
            }
            (kind, _) => Err(unavailable(format!(
                "unexpected answer reading an interaction: {kind:?}"
            ))),
        }
    }

    async fn interactions_for(
        &self,
        queues: &[String],
        agent: Option<&str>,
    ) -> StoreResult<Vec<Listed>> {
        self.listed(queues, agent, false).await
    }

    async fn waiting_for(
        &self,
        queues: &[String],
        agent: Option<&str>,
    ) -> StoreResult<Vec<Listed>> {
        self.listed(queues, agent, true).await
    }

    async fn tags_for(&self, queues: &[String], agent: Option<&str>) -> StoreResult<Vec<String>> {
        let mut hashes: Vec<String> = queues.iter().map(|q| self.keys.tags(q)).collect();
        hashes.extend(agent.map(|a| self.keys.tags_assigned(a)));
        if hashes.is_empty() {
            return Ok(vec![]);
        }
        let mut pipe = redis::pipe();
        for h in &hashes {
            pipe.hkeys(h);
        }
        let mut conn = self.conn().await?;
        let found: Vec<Vec<String>> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let mut tags: Vec<String> = found.into_iter().flatten().collect();
        tags.sort_unstable();
        tags.dedup();
        Ok(tags)
    }

    async fn contact(&self, key: &str) -> StoreResult<Option<Contact>> {
        let mut conn = self.conn().await?;
        let raw: Option<String> = conn
            .hget(self.keys.contact(key), "json")
            .await
            .map_err(unavailable)?;
        raw.map(|s| parse("contact", &s)).transpose()
    }

    async fn lookup_and_contact(
        &self,
        claim: &str,
        contact_key: &str,
    ) -> StoreResult<(Option<String>, Option<Contact>)> {
        let mut conn = self.conn().await?;
        let (held, contact): (Option<String>, Option<String>) = redis::pipe()
            .get(self.keys.claim(claim))
            .hget(self.keys.contact(contact_key), "json")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok((held, contact.map(|s| parse("contact", &s)).transpose()?))
    }

    async fn contact_by_id(&self, id: &str) -> StoreResult<Option<Contact>> {
        let mut conn = self.conn().await?;
        let raw: Option<String> = self
            .scripts
            .contact_by_id
            .key(self.keys.contact_id(id))
            .arg(self.keys.contact_prefix())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        raw.map(|s| parse("contact", &s)).transpose()
    }

    async fn lookup(&self, key: &str) -> StoreResult<Option<String>> {
        let mut conn = self.conn().await?;
        conn.get(self.keys.claim(key)).await.map_err(unavailable)
    }

    async fn note(&self, agent: &str, contact_id: &str) -> StoreResult<Option<String>> {
        let mut conn = self.conn().await?;
        conn.hget(self.keys.notes(agent), contact_id)
            .await
            .map_err(unavailable)
    }

    async fn put_note(&self, agent: &str, contact_id: &str, notes: &str) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        conn.hset(self.keys.notes(agent), contact_id, notes)
            .await
            .map_err(unavailable)
    }

    async fn events_after(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Event>> {
        if limit == 0 {
            return Ok(vec![]);
        }
        // As on the embedded store, an `after` that is no event ID starts at the oldest.
        let start = match after.and_then(parse_event_id) {
            Some((ms, seq)) => format!("({ms}-{seq}"),
            None => "-".to_string(),
        };
        let mut conn = self.conn().await?;
        let reply: StreamRangeReply = conn
            .xrange_count(self.keys.routing(), start, "+", limit)
            .await
            .map_err(unavailable)?;
        Ok(reply
            .ids
            .iter()
            .filter_map(|e| stream_event(&e.id, &e.map))
            .collect())
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
        if limit == 0 {
            return Ok(vec![]);
        }
        let until = now + chrono::Duration::from_std(lease).unwrap_or_default();
        let mut conn = self.conn().await?;
        let raw: Vec<String> = self
            .scripts
            .outbox_lease
            .key(self.keys.outbox_due())
            .key(self.keys.outbox_jobs())
            .arg(score(now))
            .arg(score(until))
            .arg(limit)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        raw.iter()
            .map(|s| parse::<OutboxRecord>("outbox", s).map(|OutboxRecord::V1(job)| job))
            .collect()
    }

    async fn outbox_reschedule(&self, job: &OutboxJob) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let _: i64 = self
            .scripts
            .outbox_reschedule
            .key(self.keys.outbox_due())
            .key(self.keys.outbox_jobs())
            .arg(&job.id)
            .arg(score(job.due_at))
            .arg(json(&OutboxRecord::V1(job.clone())))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn outbox_depth(&self) -> StoreResult<u64> {
        let mut conn = self.conn().await?;
        conn.zcard(self.keys.outbox_due())
            .await
            .map_err(unavailable)
    }

    async fn put_blob(&self, id: &str, bytes: &[u8]) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        conn.set(self.keys.blob(id), bytes)
            .await
            .map_err(unavailable)
    }

    async fn blob(&self, id: &str) -> StoreResult<Option<Vec<u8>>> {
        let mut conn = self.conn().await?;
        conn.get(self.keys.blob(id)).await.map_err(unavailable)
    }

    async fn kv_get(&self, key: &str) -> StoreResult<Option<String>> {
        let mut conn = self.conn().await?;
        conn.get(self.keys.kv(key)).await.map_err(unavailable)
    }

    async fn kv_set(&self, key: &str, value: &str) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        conn.set(self.keys.kv(key), value)
            .await
            .map_err(unavailable)
    }

    async fn try_lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut conn = self.conn().await?;
        let taken: i64 = self
            .scripts
            .try_lease
            .key(self.keys.lease(name))
            .arg(owner)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(taken == 1)
    }

    async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
