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

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;

use async_trait::async_trait;
use channelbox_core::{
    Capabilities, Epoch, Head, HistoryLimits, HistoryPage, HistoryStats, HistoryStore, NewMessage, PendingAppend,
    ReadQuery, StoreError,
};

use crate::config::SledConfig;
use crate::error::SledError;
use crate::group::{GroupState, State, MESSAGE_OVERHEAD};
use crate::layout::*;
use crate::marker::{settle, stored_batch};
use crate::open::{check_format, load_evictions, load_groups, open_db, write_missing_heads};
use crate::undo::{Shown, Undo};
use crate::writer::{Disk, Op, Writer};

/// A durable history store on sled; see the crate docs.
#[derive(Debug)]
pub struct SledStore {
    inner: Arc<Inner>,
    writer: Option<JoinHandle<()>>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) path: PathBuf,
    /// How to open the database again after a failure.
    pub(crate) config: SledConfig,
    /// The database; `None` only while a failing store reopens it (every
    /// handle must be gone before sled's lock is free).
    pub(crate) db: RwLock<Option<sled::Db>>,
    pub(crate) limits: HistoryLimits,
    pub(crate) state: Mutex<State>,
    pub(crate) writer: Writer,
}

impl SledStore {
    /// Opens (or creates) the store in `config.path`, continuing the history it
    /// holds: same epochs, offsets continue, limits apply as before.
    pub fn open(config: SledConfig) -> Result<SledStore, StoreError> {
        let db = open_db(&config)?;
        check_format(&db, &config.path)?;
        // A store that was failing when it stopped rolls back first (it may
        // take a new instance id).
        settle(&db, &config.path)?;
        let (instance, flushes) = check_format(&db, &config.path)?;
        let next_batch = stored_batch(&db, &config.path)? + 1;
        let mut groups = load_groups(&db, &config.path)?;
        let evictions = load_evictions(&db, &config.path)?;
        let budget = State::budget_of(&groups, &config.limits, evictions);
        write_missing_heads(&db, &mut groups, budget.fresh_generation(), &config.path)?;
        let inner = Arc::new(Inner {
            path: config.path.clone(),
            config: config.clone(),
            db: RwLock::new(Some(db)),
            limits: config.limits.clone(),
            state: Mutex::new(State {
                instance,
                flushes,
                budget,
                groups,
                closed: false,
                undo: Undo::default(),
                flushed_all_seq: 0,
                evicted_seq: 0,
            }),
            writer: Writer::new(config.commit, next_batch),
        });
        let writer = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("channelbox-sled-writer".into())
                .spawn(move || {
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.writer.run(&*inner)));
                    if ran.is_err() {
                        inner.writer.ended(&*inner);
                    }
                })
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

/// Fault injection for tests (feature `failpoints`, never enabled by the
/// server): disk trouble on demand, so that its branches run in tests.
#[cfg(feature = "failpoints")]
impl SledStore {
    /// Holds the writer thread: writes queue up until
    /// [`SledStore::resume_writer`], and then form one batch.
    pub fn pause_writer(&self) {
        self.inner.writer.hold(true);
    }

    /// Lets the writer thread go on.
    pub fn resume_writer(&self) {
        self.inner.writer.hold(false);
    }

    /// While `held`, a failing store does not recover, as if its disk stayed
    /// full; once released it recovers within a second.
    pub fn hold_recovery(&self, held: bool) {
        self.inner.writer.hold_recovery(held);
    }

    /// While `failing`, the failure mark of a failed batch cannot be written
    /// (as if even an empty file could not be created): the failed writes
    /// stay unanswered and new ones are refused until it can.
    pub fn fail_marks(&self, failing: bool) {
        self.inner.writer.fail_marks(failing);
    }

    /// The writer thread panics at its next batch, as a bug in it (or in
    /// sled) would.
    pub fn panic_next_batch(&self) {
        self.inner.writer.panic_next_batch();
    }

    /// While `failing`, a failing store's attempts to reopen sled fail after
    /// sled opened, before the rollback.
    pub fn fail_reopens(&self, failing: bool) {
        self.inner.writer.fail_reopens(failing);
    }

    /// The writer's next batch applies at most `ops` of its sled operations
    /// and then fails as a full disk would: every write of it fails, and the
    /// store recovers as after real disk trouble.
    pub fn fail_next_batch(&self, ops: usize) {
        self.inner.writer.fail_next_batch(ops);
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
        // While failing, the database holds operations of the failed batch
        // that must never become durable as they are: the failure mark makes
        // the next opening roll them back, and a flush here would only give
        // it more to undo. (sled flushes what it can when the last handle
        // goes; the mark covers that too.)
        if self.inner.writer.failure().is_none() {
            self.inner.with_db(|db| db.flush());
        }
    }
}

pub(crate) fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Updates leave the state consistent before anything that can fail.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn message_cost(&self, group: &str, payload_bytes: usize) -> u64 {
        payload_bytes as u64 + MESSAGE_OVERHEAD + group.len() as u64
    }

    pub(crate) fn epoch(state: &State, generation: u64) -> Epoch {
        Epoch::from_parts(&state.instance, state.flushes, generation)
    }

    fn check(&self, group: &str) -> Result<(), SledError> {
        if group.is_empty() {
            return Err(SledError::EmptyGroup);
        }
        if group.len() > u16::MAX as usize {
            return Err(SledError::GroupNameTooLong(group.len()));
        }
        Ok(())
    }

    pub(crate) fn state(&self) -> Result<MutexGuard<'_, State>, SledError> {
        let state = lock(&self.state);
        if state.closed {
            return Err(SledError::Closed(self.path.clone()));
        }
        Ok(state)
    }

    /// Removes what the limits say must go (age, at read time); not awaited for
    /// durability: a trim that is lost in a crash only means an old message
    /// lives a little longer.
    pub(crate) fn trim_now(&self, state: &mut State, group: &str) {
        if let Some(g) = state.groups.get_mut(group) {
            let mut ops = Vec::new();
            let released = g.trim(group, &self.limits, &mut ops);
            state.budget.release(released);
            if !ops.is_empty() {
                self.writer.push(ops);
            }
        }
    }

    pub(crate) fn head_of(state: &State, group: &str) -> Head {
        match state.groups.get(group) {
            Some(g) => Head {
                epoch: Self::epoch(state, g.generation),
                first: g.first(),
                last: g.last,
            },
            None => Head {
                epoch: Self::epoch(state, state.budget.fresh_generation()),
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
}

#[async_trait]
impl HistoryStore for SledStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::DURABLE
    }

    fn limits(&self) -> &HistoryLimits {
        &self.inner.limits
    }

    fn message_cost(&self, group: &str, payload_bytes: usize) -> u64 {
        self.inner.message_cost(group, payload_bytes)
    }

    fn healthy(&self) -> bool {
        self.inner.writer.failure().is_none()
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
        state.undo.forget_durable(inner.writer.durable_mark());
        let before = Shown::of(state.groups.get(group));
        let generation = state.budget.fresh_generation();
        let g = state.groups.entry(group.to_owned()).or_insert_with(|| GroupState {
            generation,
            ..GroupState::default()
        });
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
        let released = g.trim(group, &inner.limits, &mut ops);
        let generation = g.generation;
        let epoch = Inner::epoch(state, generation);
        state
            .budget
            .charge(group, inner.message_cost(group, message.payload.len()));
        state.budget.release(released);
        let evicted = state.enforce_total(group, &mut ops);
        let seq = inner.writer.push(ops);
        state.wrote(seq, group, before, evicted);
        Ok(PendingAppend::assigned(
            offset,
            epoch,
            inner.writer.durable(seq, &inner.path),
        ))
    }

    async fn head(&self, group: &str) -> Result<Head, StoreError> {
        let inner = &self.inner;
        inner.check(group)?;
        Ok(inner.visible_head(group).await?.0)
    }

    async fn read(&self, group: &str, query: ReadQuery) -> Result<HistoryPage, StoreError> {
        let inner = &self.inner;
        inner.check(group)?;
        loop {
            let (mut head, before) = inner.visible_head(group).await?;
            let (from, limit) = match query {
                ReadQuery::Last(n) => (head.last.saturating_sub(n as u64).saturating_add(1).max(head.first), n),
                ReadQuery::Since { offset, limit } => (offset.saturating_add(1).max(head.first), limit),
            };
            let messages = inner.read_range(group, from, head.last, limit)?;
            let mut state = inner.state()?;
            if state.flushes != before || inner.epoch_now(&mut state, group).as_ref() != Some(&head.epoch) {
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
            let state = &mut *state;
            // Oldest message first, the new generation last: any prefix of
            // this, which is what a crash can leave, is the old generation
            // with fewer of its oldest messages.
            let mut ops = Vec::new();
            state.undo.forget_durable(inner.writer.durable_mark());
            let before = Shown::of(state.groups.get(group));
            let fresh = state.budget.fresh_generation();
            let g = state.groups.entry(group.to_owned()).or_insert_with(|| GroupState {
                generation: fresh,
                ..GroupState::default()
            });
            let generation = g.generation + 1;
            let all = g.retained.len() as u64;
            let start = g.first();
            ops.push(Op::RemoveOffsets(message_prefix(group), start..start + all));
            state.budget.release(g.cost(group));
            *g = GroupState {
                generation,
                stored_last: Some(0),
                ..GroupState::default()
            };
            ops.push(Op::Insert(group_key(group), group_value(generation, 0).to_vec()));
            // The empty entry keeps the new epoch; it counts like any group.
            state.budget.charge(group, 0);
            let evicted = state.enforce_total(group, &mut ops);
            let seq = inner.writer.push(ops);
            state.wrote(seq, group, before, evicted);
            (Inner::epoch(state, generation), seq)
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
            state.budget.clear();
            let mut drained = Vec::new();
            for (name, g) in state.groups.drain() {
                let start = g.first();
                ops.push(Op::RemoveOffsets(
                    message_prefix(&name),
                    start..start + g.retained.len() as u64,
                ));
                ops.push(Op::Remove(group_key(&name)));
                drained.push((name, Shown::of(Some(&g))));
            }
            let seq = inner.writer.push(ops);
            state.undo.forget_durable(inner.writer.durable_mark());
            let (flushes, evictions) = (state.flushes - 1, state.budget.evictions());
            state.undo.record_store(seq, flushes, evictions);
            state.flushed_all_seq = seq;
            for (name, was) in drained {
                state.undo.record(seq, &name, was);
            }
            seq
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
        stats.cost = state.budget.used();
        Ok(stats)
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner.healthy()?;
        // Waits as a reader does: a failure not yet marked on disk fails it
        // at once (it names no offset), so a shutdown never hangs on a disk
        // that takes not even the mark.
        let written = inner.writer.written();
        Ok(inner.writer.durable_wait(written, &inner.path).await?)
    }
}
