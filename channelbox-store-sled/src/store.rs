//! The `HistoryStore` implementation on sled.
//!
//! Everything lives in sled's default tree, under three key prefixes:
//! - `0x00 name`: store metadata (format version, instance id, flush count);
//! - `0x01 group`: a group's generation and newest offset;
//! - `0x02 len:u16 group offset:u64`: one message, big-endian so that a
//!   group's messages sort by offset.
//!
//! An append writes its message and its group's head in one atomic sled batch,
//! under the store's lock, so the batches reach the log in offset order. sled
//! recovers a prefix of its log after a crash, so the recovered offsets of a
//! group are always 1..n without holes.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use async_trait::async_trait;
use bytes::Bytes;
use channelbox_core::{
    messages_to_trim, now_ms, Capabilities, Head, HistoryLimits, HistoryPage, HistoryStats, HistoryStore, NewMessage,
    PayloadKind, PendingAppend, ReadQuery, StoreError, StoredMessage,
};
use tokio::sync::watch;

use crate::config::{CommitMode, SledConfig};
use crate::error::SledError;

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

    /// Forgets the `n` oldest retained messages; returns their offsets.
    fn drop_oldest(&mut self, n: u64) -> std::ops::Range<u64> {
        let start = self.first();
        for _ in 0..n {
            if let Some((size, _)) = self.retained.pop_front() {
                self.bytes -= size;
            }
        }
        self.first = start + n;
        start..start + n
    }
}

#[derive(Debug)]
struct State {
    instance: String,
    flushes: u64,
    groups: HashMap<String, GroupState>,
    closed: bool,
}

/// Where durability stands, published by the committer.
#[derive(Clone, Debug, Default)]
struct Durable {
    /// Every write up to this sequence number is on disk.
    done: u64,
    /// Writes up to this sequence number were in a flush that failed.
    failed: u64,
    error: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct CommitState {
    /// Sequence number of the newest write.
    written: u64,
    shutdown: bool,
}

/// Group commit: one thread flushes sled whenever writes are pending; writes that
/// arrive during a flush share the next one.
#[derive(Debug)]
struct Committer {
    state: Mutex<CommitState>,
    wake: Condvar,
    durable: watch::Sender<Durable>,
}

impl Committer {
    fn lock(&self) -> MutexGuard<'_, CommitState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self, db: &sled::Db) {
        loop {
            let target = {
                let mut s = self.lock();
                while s.written == self.durable.borrow().done.max(self.durable.borrow().failed) && !s.shutdown {
                    s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                if s.written == self.durable.borrow().done.max(self.durable.borrow().failed) {
                    return;
                }
                s.written
            };
            let result = db.flush();
            self.durable.send_modify(|d| match result {
                Ok(_) => d.done = target,
                Err(err) => {
                    tracing::error!(error = %err, "history flush failed");
                    d.failed = target;
                    d.error = Some(Arc::from(err.to_string()));
                }
            });
        }
    }
}

/// A durable history store on sled; see the crate docs.
#[derive(Debug)]
pub struct SledStore {
    inner: Arc<Inner>,
    flusher: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    db: sled::Db,
    limits: HistoryLimits,
    commit: CommitMode,
    state: Mutex<State>,
    committer: Committer,
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
        let (durable, _) = watch::channel(Durable::default());
        let inner = Arc::new(Inner {
            path: config.path.clone(),
            db,
            limits: config.limits,
            commit: config.commit,
            state: Mutex::new(State {
                instance,
                flushes,
                groups,
                closed: false,
            }),
            committer: Committer {
                state: Mutex::new(CommitState::default()),
                wake: Condvar::new(),
                durable,
            },
        });
        let flusher = match config.commit {
            CommitMode::Group => {
                let inner = inner.clone();
                let handle = std::thread::Builder::new()
                    .name("channelbox-sled-commit".into())
                    .spawn(move || inner.committer.run(&inner.db))
                    .map_err(|e| {
                        SledError::Unusable(config.path.clone(), format!("cannot start the commit thread: {e}"))
                    })?;
                Some(handle)
            }
            CommitMode::PerAppend => None,
        };
        Ok(SledStore { inner, flusher })
    }

    /// The directory of this store.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        lock(&self.inner.state).closed = true;
        self.inner.committer.lock().shutdown = true;
        self.inner.committer.wake.notify_all();
        if let Some(handle) = self.flusher.take() {
            // The thread finishes the flush it may be in, then ends; joining it
            // releases its handle on the database, so the directory can be
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
    fn epoch(state: &State, generation: u64) -> String {
        format!("{}-{}.{generation}", state.instance, state.flushes)
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
    fn trim_now(&self, state: &mut State, group: &str) -> Result<(), SledError> {
        let Some(g) = state.groups.get_mut(group) else {
            return Ok(());
        };
        let n = g.to_trim(&self.limits, now_ms());
        if n == 0 {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        let first = g.first();
        for offset in first..first + n {
            batch.remove(message_key(group, offset));
        }
        self.db.apply_batch(batch).map_err(|e| SledError::sled(&self.path, e))?;
        g.drop_oldest(n);
        Ok(())
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

    /// Registers a write and returns a future that resolves once it is durable.
    fn durable_after_write(self: &Arc<Self>) -> channelbox_core::DurableFuture {
        match self.commit {
            CommitMode::Group => {
                let seq = {
                    let mut c = self.committer.lock();
                    c.written += 1;
                    c.written
                };
                self.committer.wake.notify_one();
                let mut rx = self.committer.durable.subscribe();
                let path = self.path.clone();
                Box::pin(async move {
                    let d = rx
                        .wait_for(|d| d.done >= seq || d.failed >= seq)
                        .await
                        .map_err(|_| SledError::Closed(path.clone()))?
                        .clone();
                    if d.done >= seq {
                        Ok(())
                    } else {
                        let why = d.error.as_deref().unwrap_or("unknown").to_owned();
                        Err(SledError::Flush(path, why).into())
                    }
                })
            }
            CommitMode::PerAppend => {
                let inner = self.clone();
                Box::pin(async move {
                    let db = inner.db.clone();
                    let res = tokio::task::spawn_blocking(move || db.flush())
                        .await
                        .map_err(|e| SledError::Flush(inner.path.clone(), e.to_string()))?;
                    res.map(|_| ())
                        .map_err(|e| SledError::Flush(inner.path.clone(), e.to_string()).into())
                })
            }
        }
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
        let epoch_state = &mut *state;
        let g = epoch_state.groups.entry(group.to_owned()).or_default();
        let offset = g.last + 1;
        let size = message.payload.len() as u64;

        // Work out the trim as if the message were in, then write everything in
        // one atomic batch; the in-memory state changes only once it succeeded.
        g.retained.push_back((size, message.timestamp_ms));
        g.bytes += size;
        let was_first = g.first;
        if g.retained.len() == 1 {
            g.first = offset;
        }
        let n = g.to_trim(&inner.limits, now_ms());
        let mut batch = sled::Batch::default();
        batch.insert(message_key(group, offset), encode_message(&message));
        batch.insert(group_key(group), &group_value(g.generation, offset)[..]);
        let first = g.first();
        for o in first..first + n {
            batch.remove(message_key(group, o));
        }
        if let Err(err) = inner.db.apply_batch(batch) {
            g.retained.pop_back();
            g.bytes -= size;
            g.first = was_first;
            return Err(SledError::sled(&inner.path, err).into());
        }
        g.last = offset;
        g.drop_oldest(n);
        let generation = g.generation;
        let epoch = Inner::epoch(epoch_state, generation);
        let durable = inner.durable_after_write();
        drop(state);
        Ok(PendingAppend { offset, epoch, durable })
    }

    async fn head(&self, group: &str) -> Result<Head, StoreError> {
        let inner = &self.inner;
        inner.check(group)?;
        let mut state = inner.state()?;
        inner.trim_now(&mut state, group)?;
        Ok(Inner::head_of(&state, group))
    }

    async fn read(&self, group: &str, query: ReadQuery) -> Result<HistoryPage, StoreError> {
        let inner = &self.inner;
        inner.check(group)?;
        let mut state = inner.state()?;
        inner.trim_now(&mut state, group)?;
        let head = Inner::head_of(&state, group);
        let (from, limit) = match query {
            ReadQuery::Last(n) => (head.last.saturating_sub(n as u64).saturating_add(1).max(head.first), n),
            ReadQuery::Since { offset, limit } => (offset.saturating_add(1).max(head.first), limit),
        };
        let mut messages = Vec::new();
        if limit > 0 && from <= head.last {
            let range = message_key(group, from)..=message_key(group, head.last);
            for item in inner.db.range(range).take(limit) {
                let (k, v) = item.map_err(|e| SledError::sled(&inner.path, e))?;
                let corrupt = || SledError::Corrupt {
                    path: inner.path.clone(),
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
        }
        Ok(HistoryPage { head, messages })
    }

    async fn flush_group(&self, group: &str) -> Result<String, StoreError> {
        let inner = &self.inner;
        inner.check(group)?;
        let (epoch, durable) = {
            let mut state = inner.state()?;
            let g = state.groups.entry(group.to_owned()).or_default();
            let fresh = GroupState {
                generation: g.generation + 1,
                ..GroupState::default()
            };
            let mut batch = sled::Batch::default();
            for key in inner.db.scan_prefix(message_prefix(group)).keys() {
                batch.remove(key.map_err(|e| SledError::sled(&inner.path, e))?);
            }
            batch.insert(group_key(group), &group_value(fresh.generation, 0)[..]);
            inner
                .db
                .apply_batch(batch)
                .map_err(|e| SledError::sled(&inner.path, e))?;
            *g = fresh;
            let generation = g.generation;
            (Inner::epoch(&state, generation), inner.durable_after_write())
        };
        durable.await?;
        Ok(epoch)
    }

    async fn flush_all(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let durable = {
            let mut state = inner.state()?;
            let mut batch = sled::Batch::default();
            for prefix in [GROUP_PREFIX, MESSAGE_PREFIX] {
                for key in inner.db.scan_prefix([prefix]).keys() {
                    batch.remove(key.map_err(|e| SledError::sled(&inner.path, e))?);
                }
            }
            let flushes = state.flushes + 1;
            batch.insert(KEY_FLUSHES, &flushes.to_be_bytes());
            inner
                .db
                .apply_batch(batch)
                .map_err(|e| SledError::sled(&inner.path, e))?;
            state.flushes = flushes;
            state.groups.clear();
            inner.durable_after_write()
        };
        durable.await
    }

    async fn stats(&self) -> Result<HistoryStats, StoreError> {
        let inner = &self.inner;
        let mut state = inner.state()?;
        let names: Vec<String> = state.groups.keys().cloned().collect();
        for name in &names {
            inner.trim_now(&mut state, name)?;
        }
        let mut stats = HistoryStats::default();
        for g in state.groups.values() {
            stats.messages += g.retained.len() as u64;
            stats.bytes += g.bytes;
        }
        Ok(stats)
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        let path = inner.path.clone();
        tokio::task::spawn_blocking(move || inner.db.flush())
            .await
            .map_err(|e| SledError::Flush(path.clone(), e.to_string()))?
            .map(|_| ())
            .map_err(|e| SledError::Flush(path, e.to_string()).into())
    }
}
