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
use channelbox_core::{
    messages_to_trim, now_ms, Capabilities, Epoch, Head, HistoryLimits, HistoryPage, HistoryStats, HistoryStore,
    NewMessage, PendingAppend, ReadQuery, StoreError, StoredMessage,
};

use crate::config::SledConfig;
use crate::error::SledError;
use crate::layout::*;
use crate::open::{check_format, load_groups, open_db};
use crate::writer::{Op, Writer};

/// A group as the store tracks it in memory: its head, and the size and
/// timestamp of every retained message, so trimming needs no disk read.
#[derive(Debug, Default)]
pub(crate) struct GroupState {
    pub(crate) generation: u64,
    pub(crate) last: u64,
    /// Offset of `retained[0]`.
    pub(crate) first: u64,
    pub(crate) bytes: u64,
    pub(crate) retained: VecDeque<(u64, u64)>,
    /// The newest offset the group's head key on disk records; `None` when the
    /// group has no head key yet. Opening takes a group's newest offset from
    /// its head and its messages, whichever is higher, so the head is rewritten
    /// only when that would otherwise be lost: for a new group, and before a
    /// trim removes every message.
    pub(crate) stored_last: Option<u64>,
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
