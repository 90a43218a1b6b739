//! The `HistoryStore` implementation on sled.
//!
//! Everything lives in sled's default tree, under three key prefixes:
//! - `0x00 name`: store metadata (format version, instance id, flush count);
//! - `0x01 group`: a group's generation and newest offset;
//! - `0x02 len:u16 group offset:u64`: one message, big-endian so that a
//!   group's messages sort by offset.
//!
//! An append assigns its offset and queues its operations under the store's
//! lock; the writer thread (`writer.rs`) applies them in that order. sled
//! recovers a prefix of its log after a crash, and each write orders its
//! operations so that every prefix is a consistent history: the message before
//! the head, the oldest removal first. A group's head is written only when
//! opening could not work it out from the messages (a new group, a flush, a
//! trim that empties the group): opening takes the newest offset from the head
//! and the messages, whichever is higher.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use async_trait::async_trait;
use bytes::Bytes;
use channelbox_core::{
    messages_to_trim, now_ms, Capabilities, Epoch, Head, HistoryLimits, HistoryPage, HistoryStats, HistoryStore,
    NewMessage, PayloadKind, PendingAppend, ReadQuery, StoreError, StoredMessage,
};

use crate::config::SledConfig;
use crate::error::SledError;
use crate::writer::{Op, Writer};

/// The on-disk format this build reads and writes.
pub(crate) const FORMAT: &str = "channelbox-sled/1";

const KEY_FORMAT: &[u8] = b"\x00format";
const KEY_INSTANCE: &[u8] = b"\x00instance";
const KEY_FLUSHES: &[u8] = b"\x00flushes";
const GROUP_PREFIX: u8 = 1;
const MESSAGE_PREFIX: u8 = 2;
/// kind (1) + timestamp (8) + meta length (4).
const HEADER: usize = 13;

fn group_key(group: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + group.len());
    k.push(GROUP_PREFIX);
    k.extend_from_slice(group.as_bytes());
    k
}

fn message_prefix(group: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + group.len() + 8);
    k.push(MESSAGE_PREFIX);
    k.extend_from_slice(&(group.len() as u16).to_be_bytes());
    k.extend_from_slice(group.as_bytes());
    k
}

fn message_key(group: &str, offset: u64) -> Vec<u8> {
    let mut k = message_prefix(group);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// A group's head as stored: generation and newest offset.
fn group_value(generation: u64, last: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&generation.to_be_bytes());
    v[8..].copy_from_slice(&last.to_be_bytes());
    v
}

fn encode_message(m: &NewMessage) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + m.meta.len() + m.payload.len());
    v.push(m.kind.tag());
    v.extend_from_slice(&m.timestamp_ms.to_be_bytes());
    v.extend_from_slice(&(m.meta.len() as u32).to_be_bytes());
    v.extend_from_slice(&m.meta);
    v.extend_from_slice(&m.payload);
    v
}

/// Decodes a stored message value: (kind, timestamp, meta, payload).
fn decode_message(v: &[u8]) -> Option<(PayloadKind, u64, Bytes, Bytes)> {
    if v.len() < HEADER {
        return None;
    }
    let kind = PayloadKind::from_tag(v[0])?;
    let ts = u64::from_be_bytes(v[1..9].try_into().ok()?);
    let meta_len = u32::from_be_bytes(v[9..13].try_into().ok()?) as usize;
    let meta = v.get(HEADER..HEADER + meta_len)?;
    let payload = &v[HEADER + meta_len..];
    Some((kind, ts, Bytes::copy_from_slice(meta), Bytes::copy_from_slice(payload)))
}

fn u64_at(v: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(at..at + 8)?.try_into().ok()?))
}

/// A group as the store tracks it in memory: its head, and the size and
/// timestamp of every retained message, so trimming needs no disk read.
#[derive(Debug, Default)]
struct GroupState {
    generation: u64,
    last: u64,
    /// Offset of `retained[0]`.
    first: u64,
    bytes: u64,
    retained: VecDeque<(u64, u64)>,
    /// The newest offset the group's head key on disk records; `None` when the
    /// group has no head key yet. Opening takes a group's newest offset from
    /// its head and its messages, whichever is higher, so the head is rewritten
    /// only when that would otherwise be lost: for a new group, and before a
    /// trim removes every message.
    stored_last: Option<u64>,
}

impl GroupState {
    fn first(&self) -> u64 {
        if self.retained.is_empty() {
            self.last + 1
        } else {
            self.first
        }
    }

    /// How many of the oldest retained messages the limits remove now.
    fn to_trim(&self, limits: &HistoryLimits, now: u64) -> u64 {
        let r = &self.retained;
        messages_to_trim(limits, now, r.len() as u64, self.bytes, |i| r[i as usize])
    }

    /// The operations that write the group's head if the disk would otherwise
    /// lose its generation or newest offset: before its first message, and
    /// before everything retained is removed.
    fn store_head(&mut self, group: &str, emptying: bool, ops: &mut Vec<Op>) {
        if self.stored_last.is_none() || (emptying && self.stored_last != Some(self.last)) {
            ops.push(Op::Insert(
                group_key(group),
                group_value(self.generation, self.last).to_vec(),
            ));
            self.stored_last = Some(self.last);
        }
    }

    /// Forgets the `n` oldest retained messages, adding their removal, oldest
    /// first (a crash part way leaves a group without holes).
    fn remove_oldest(&mut self, group: &str, n: u64, ops: &mut Vec<Op>) {
        if n == 0 {
            return;
        }
        self.store_head(group, n >= self.retained.len() as u64, ops);
        let start = self.first();
        ops.push(Op::RemoveOffsets(message_prefix(group), start..start + n));
        for _ in 0..n {
            if let Some((size, _)) = self.retained.pop_front() {
                self.bytes -= size;
            }
        }
        self.first = start + n;
    }

    /// Removes what the limits say must go now.
    fn trim(&mut self, group: &str, limits: &HistoryLimits, ops: &mut Vec<Op>) {
        let n = self.to_trim(limits, now_ms());
        self.remove_oldest(group, n, ops);
    }
}

#[derive(Debug)]
struct State {
    instance: String,
    flushes: u64,
    groups: HashMap<String, GroupState>,
    closed: bool,
}

/// A durable history store on sled; see the crate docs.
#[derive(Debug)]
pub struct SledStore {
    inner: Arc<Inner>,
    writer: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    db: sled::Db,
    limits: HistoryLimits,
    state: Mutex<State>,
    writer: Writer,
}

fn open_db(config: &SledConfig) -> Result<sled::Db, SledError> {
    let path = &config.path;
    if path.exists() && !path.is_dir() {
        return Err(SledError::Unusable(
            path.clone(),
            "it is a file, not a directory".into(),
        ));
    }
    std::fs::create_dir_all(path).map_err(|e| SledError::Unusable(path.clone(), e.to_string()))?;
    // sled releases its lock file from a background thread a moment after a
    // `Db` is dropped, so a store reopened at once in the same process may find
    // it still held: retry briefly before calling the directory locked.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match try_open(config) {
            Err(SledError::Locked(..)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn try_open(config: &SledConfig) -> Result<sled::Db, SledError> {
    let path = &config.path;
    sled::Config::new()
        .path(path)
        .cache_capacity(config.cache_bytes)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None)
        .open()
        .map_err(|err| match &err {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") => {
                SledError::Locked(path.clone(), err)
            }
            sled::Error::Io(io) => SledError::Unusable(path.clone(), io.to_string()),
            _ => SledError::sled(path, err),
        })
}

/// Checks the format marker, writing it into a new, empty store.
fn check_format(db: &sled::Db, path: &Path) -> Result<(String, u64), SledError> {
    let s = |e| SledError::sled(path, e);
    match db.get(KEY_FORMAT).map_err(s)? {
        Some(found) if &*found == FORMAT.as_bytes() => {}
        Some(found) => {
            return Err(SledError::Incompatible {
                path: path.to_owned(),
                found: String::from_utf8_lossy(&found).into_owned(),
                expected: FORMAT,
            })
        }
        None if db.is_empty() => {
            let instance = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
            db.insert(KEY_INSTANCE, instance.as_bytes()).map_err(s)?;
            db.insert(KEY_FLUSHES, &0u64.to_be_bytes()).map_err(s)?;
            db.insert(KEY_FORMAT, FORMAT.as_bytes()).map_err(s)?;
            db.flush().map_err(s)?;
        }
        None => return Err(SledError::Foreign(path.to_owned())),
    }
    let instance = db
        .get(KEY_INSTANCE)
        .map_err(s)?
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .ok_or(SledError::Foreign(path.to_owned()))?;
    let flushes = db
        .get(KEY_FLUSHES)
        .map_err(s)?
        .and_then(|v| u64_at(&v, 0))
        .ok_or(SledError::Foreign(path.to_owned()))?;
    Ok((instance, flushes))
}

/// Reads every group's head and retained sizes.
fn load_groups(db: &sled::Db, path: &Path) -> Result<HashMap<String, GroupState>, SledError> {
    let s = |e| SledError::sled(path, e);
    let mut groups: HashMap<String, GroupState> = HashMap::new();
    for item in db.scan_prefix([GROUP_PREFIX]) {
        let (k, v) = item.map_err(s)?;
        let name = String::from_utf8_lossy(&k[1..]).into_owned();
        let corrupt = || SledError::Corrupt {
            path: path.to_owned(),
            group: name.clone(),
            what: "group head",
        };
        let generation = u64_at(&v, 0).ok_or_else(corrupt)?;
        let last = u64_at(&v, 8).ok_or_else(corrupt)?;
        groups.insert(
            name.clone(),
            GroupState {
                generation,
                last,
                first: last + 1,
                stored_last: Some(last),
                ..GroupState::default()
            },
        );
    }
    for item in db.scan_prefix([MESSAGE_PREFIX]) {
        let (k, v) = item.map_err(s)?;
        let len = k.get(1..3).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize);
        let parsed = len.and_then(|len| {
            let name = std::str::from_utf8(k.get(3..3 + len)?).ok()?;
            let offset = u64_at(&k, 3 + len)?;
            Some((name.to_owned(), offset))
        });
        let Some((name, offset)) = parsed else {
            return Err(SledError::Corrupt {
                path: path.to_owned(),
                group: String::from_utf8_lossy(&k).into_owned(),
                what: "message key",
            });
        };
        let Some((_, ts, _meta, payload)) = decode_message(&v) else {
            return Err(SledError::Corrupt {
                path: path.to_owned(),
                group: name,
                what: "message",
            });
        };
        let g = groups.entry(name).or_default();
        if g.retained.is_empty() {
            g.first = offset;
        }
        g.last = g.last.max(offset);
        g.bytes += payload.len() as u64;
        g.retained.push_back((payload.len() as u64, ts));
    }
    Ok(groups)
}

impl SledStore {
    /// Opens (or creates) the store in `config.path`, continuing the history it
    /// holds: same epochs, offsets continue, limits apply as before.
    pub fn open(config: SledConfig) -> Result<SledStore, StoreError> {
        let db = open_db(&config)?;
        let (instance, flushes) = check_format(&db, &config.path)?;
        let groups = load_groups(&db, &config.path)?;
        let inner = Arc::new(Inner {
            path: config.path.clone(),
            db,
            limits: config.limits,
            state: Mutex::new(State {
                instance,
                flushes,
                groups,
                closed: false,
            }),
            writer: Writer::new(config.commit),
        });
        let writer = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("channelbox-sled-writer".into())
                .spawn(move || inner.writer.run(&inner.db))
                .map_err(|e| SledError::Unusable(config.path.clone(), format!("cannot start the writer thread: {e}")))?
        };
        Ok(SledStore {
            inner,
            writer: Some(writer),
        })
    }

    /// The directory of this store.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        lock(&self.inner.state).closed = true;
        self.inner.writer.shut_down();
        if let Some(handle) = self.writer.take() {
            // The thread applies and flushes what is queued, then ends; joining
            // it releases its handle on the database, so the directory can be
            // opened again at once.
            let _ = handle.join();
        }
        let _ = self.inner.db.flush();
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Updates leave the state consistent before anything that can fail.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn epoch(state: &State, generation: u64) -> Epoch {
        Epoch::from_parts(&state.instance, state.flushes, generation)
    }

    fn check(&self, group: &str) -> Result<(), SledError> {
        if group.is_empty() || group.len() > u16::MAX as usize {
            return Err(SledError::EmptyGroup);
        }
        Ok(())
    }

    fn state(&self) -> Result<MutexGuard<'_, State>, SledError> {
        let state = lock(&self.state);
        if state.closed {
            return Err(SledError::Closed(self.path.clone()));
        }
        Ok(state)
    }

    /// Removes what the limits say must go (age, at read time); not awaited for
    /// durability: a trim that is lost in a crash only means an old message
    /// lives a little longer.
    fn trim_now(&self, state: &mut State, group: &str) {
        if let Some(g) = state.groups.get_mut(group) {
            let mut ops = Vec::new();
            g.trim(group, &self.limits, &mut ops);
            if !ops.is_empty() {
                self.writer.push(ops);
            }
        }
    }

    fn head_of(state: &State, group: &str) -> Head {
        match state.groups.get(group) {
            Some(g) => Head {
                epoch: Self::epoch(state, g.generation),
                first: g.first(),
                last: g.last,
            },
            None => Head {
                epoch: Self::epoch(state, 0),
                first: 1,
                last: 0,
            },
        }
    }

    /// Fails if an earlier write failed: memory and disk may differ since.
    fn healthy(&self) -> Result<(), SledError> {
        match self.writer.failure() {
            Some(why) => Err(SledError::Flush(self.path.clone(), why.to_string())),
            None => Ok(()),
        }
    }

    /// The messages `from..=to` of `group` as sled holds them, once every write
    /// queued so far is applied.
    async fn read_range(&self, group: &str, from: u64, to: u64, limit: usize) -> Result<Vec<StoredMessage>, SledError> {
        self.writer.applied(self.writer.written(), &self.path).await?;
        let mut messages = Vec::new();
        if limit == 0 || from > to {
            return Ok(messages);
        }
        let range = message_key(group, from)..=message_key(group, to);
        for item in self.db.range(range).take(limit) {
            let (k, v) = item.map_err(|e| SledError::sled(&self.path, e))?;
            let corrupt = || SledError::Corrupt {
                path: self.path.clone(),
                group: group.to_owned(),
                what: "message",
            };
            let offset = u64_at(&k, k.len() - 8).ok_or_else(corrupt)?;
            let (kind, timestamp_ms, meta, payload) = decode_message(&v).ok_or_else(corrupt)?;
            messages.push(StoredMessage {
                offset,
                kind,
                payload,
                meta,
                timestamp_ms,
            });
        }
        Ok(messages)
    }
}

#[async_trait]
impl HistoryStore for SledStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::DURABLE
    }

    fn limits(&self) -> &HistoryLimits {
        &self.inner.limits
    }

    fn append(&self, group: &str, message: NewMessage) -> Result<PendingAppend, StoreError> {
        let inner = &self.inner;
        inner.check(group)?;
        let mut state = inner.state()?;
        inner.healthy()?;
        if !inner.writer.has_room() {
            return Err(SledError::Busy(inner.path.clone()).into());
        }
        let state = &mut *state;
        let g = state.groups.entry(group.to_owned()).or_default();
        let offset = g.last + 1;
        let size = message.payload.len() as u64;
        // The message first, then (for a new group only) its head, then the
        // trim: opening takes a group's newest offset from its messages too,
        // so any prefix of these leaves offsets 1..n without holes.
        let mut ops = vec![Op::Insert(message_key(group, offset), encode_message(&message))];
        g.last = offset;
        if g.retained.is_empty() {
            g.first = offset;
        }
        g.retained.push_back((size, message.timestamp_ms));
        g.bytes += size;
        g.store_head(group, false, &mut ops);
        g.trim(group, &inner.limits, &mut ops);
        let generation = g.generation;
        let epoch = Inner::epoch(state, generation);
        let seq = inner.writer.push(ops);
        Ok(PendingAppend {
            offset,
            epoch,
            durable: inner.writer.durable(seq, &inner.path),
        })
    }

    async fn head(&self, group: &str) -> Result<Head, StoreError> {
        let inner = &self.inner;
        inner.check(group)?;
        let mut state = inner.state()?;
        inner.trim_now(&mut state, group);
        Ok(Inner::head_of(&state, group))
    }

    async fn read(&self, group: &str, query: ReadQuery) -> Result<HistoryPage, StoreError> {
        let inner = &self.inner;
        inner.check(group)?;
        loop {
            let (mut head, before) = {
                let mut state = inner.state()?;
                inner.trim_now(&mut state, group);
                (Inner::head_of(&state, group), state.flushes)
            };
            let (from, limit) = match query {
                ReadQuery::Last(n) => (head.last.saturating_sub(n as u64).saturating_add(1).max(head.first), n),
                ReadQuery::Since { offset, limit } => (offset.saturating_add(1).max(head.first), limit),
            };
            let messages = inner.read_range(group, from, head.last, limit).await?;
            let state = inner.state()?;
            if state.flushes != before || Inner::head_of(&state, group).epoch != head.epoch {
                // The group was flushed while we read: its offsets start over,
                // so what we read may mix generations. Read again.
                continue;
            }
            // sled's range is no snapshot: appends may have trimmed the oldest
            // of the range meanwhile, oldest first, so a message missing from
            // the middle means everything before it is gone too. The page then
            // starts after the last hole, and says so.
            let mut messages = messages;
            if let Some(cut) = (1..messages.len())
                .rev()
                .find(|&i| messages[i].offset != messages[i - 1].offset + 1)
            {
                messages.drain(..cut);
            }
            match messages.first() {
                Some(m) if m.offset > from => head.first = m.offset,
                Some(_) => {}
                None if limit > 0 && from <= head.last => head.first = head.last + 1,
                None => {}
            }
            return Ok(HistoryPage { head, messages });
        }
    }

    async fn flush_group(&self, group: &str) -> Result<Epoch, StoreError> {
        let inner = &self.inner;
        inner.check(group)?;
        let (epoch, seq) = {
            let mut state = inner.state()?;
            inner.healthy()?;
            let g = state.groups.entry(group.to_owned()).or_default();
            // Oldest message first, the new generation last: any prefix of
            // this, which is what a crash can leave, is the old generation
            // with fewer of its oldest messages.
            let mut ops = Vec::new();
            let all = g.retained.len() as u64;
            let start = g.first();
            ops.push(Op::RemoveOffsets(message_prefix(group), start..start + all));
            *g = GroupState {
                generation: g.generation + 1,
                stored_last: Some(0),
                ..GroupState::default()
            };
            ops.push(Op::Insert(group_key(group), group_value(g.generation, 0).to_vec()));
            let generation = g.generation;
            (Inner::epoch(&state, generation), inner.writer.push(ops))
        };
        inner.writer.durable(seq, &inner.path).await?;
        Ok(epoch)
    }

    async fn flush_all(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let seq = {
            let mut state = inner.state()?;
            inner.healthy()?;
            // The flush count first: from then on every epoch is new, so
            // whatever a crash leaves of the removals never passes for the
            // history a client saw before.
            state.flushes += 1;
            let mut ops = vec![Op::Insert(KEY_FLUSHES.to_vec(), state.flushes.to_be_bytes().to_vec())];
            for (name, g) in state.groups.drain() {
                let start = g.first();
                ops.push(Op::RemoveOffsets(
                    message_prefix(&name),
                    start..start + g.retained.len() as u64,
                ));
                ops.push(Op::Remove(group_key(&name)));
            }
            inner.writer.push(ops)
        };
        inner.writer.durable(seq, &inner.path).await
    }

    async fn stats(&self) -> Result<HistoryStats, StoreError> {
        let inner = &self.inner;
        let mut state = inner.state()?;
        let names: Vec<String> = state.groups.keys().cloned().collect();
        for name in &names {
            inner.trim_now(&mut state, name);
        }
        let mut stats = HistoryStats::default();
        for g in state.groups.values() {
            stats.messages += g.retained.len() as u64;
            stats.bytes += g.bytes;
        }
        Ok(stats)
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner.healthy()?;
        inner.writer.durable(inner.writer.written(), &inner.path).await
    }
}
