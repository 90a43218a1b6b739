//! The `HistoryStore` implementation.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use channelbox_core::{
    messages_to_trim, now_ms, BudgetedGroups, Capabilities, Epoch, GroupLimits, Head, HistoryLimits, HistoryPage,
    HistoryStats, HistoryStore, NewMessage, PayloadKind, PendingAppend, ReadQuery, StoreError, StoredMessage,
    TotalBudget,
};

use crate::config::MemoryConfig;
use crate::error::MemoryError;

/// What a retained message costs this store besides its payload and
/// metadata: its 32-byte slot in the group's queue (more while the queue has
/// grown and not yet filled) and, when they do not fit in the slot, the
/// rounding of the one allocation of its metadata and payload. Counted, with
/// the payload and metadata, against [`HistoryLimits::max_total_bytes`];
/// `cargo bench -p channelbox-store-sled --bench stores` measures it.
pub const MESSAGE_OVERHEAD: u64 = 64;

/// Metadata and payload of at most this many bytes together are kept in the
/// message's slot, without an allocation: a chat message of a few
/// characters from a channel (whose metadata, its id, is 17 bytes).
const INLINE: usize = 20;

/// One retained message, packed in a 32-byte slot: its offset is its place
/// in the group's queue (offsets are consecutive).
#[derive(Debug)]
struct Packed {
    data: Data,
    timestamp_ms: u64,
}

/// The metadata, then the payload: in the slot, or in one allocation.
#[derive(Debug)]
enum Data {
    Inline {
        len: u8,
        meta_len: u8,
        kind: PayloadKind,
        bytes: [u8; INLINE],
    },
    Heap {
        bytes: Box<[u8]>,
        meta_len: u32,
        kind: PayloadKind,
    },
}

// The slot size the overhead is counted from.
const _: () = assert!(std::mem::size_of::<Packed>() == 32);

impl Packed {
    fn new(m: NewMessage) -> Packed {
        let len = m.meta.len() + m.payload.len();
        let data = if len <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..m.meta.len()].copy_from_slice(&m.meta);
            bytes[m.meta.len()..len].copy_from_slice(&m.payload);
            Data::Inline {
                len: len as u8,
                meta_len: m.meta.len() as u8,
                kind: m.kind,
                bytes,
            }
        } else {
            let mut bytes = Vec::with_capacity(len);
            bytes.extend_from_slice(&m.meta);
            bytes.extend_from_slice(&m.payload);
            Data::Heap {
                bytes: bytes.into_boxed_slice(),
                meta_len: m.meta.len() as u32,
                kind: m.kind,
            }
        };
        Packed {
            data,
            timestamp_ms: m.timestamp_ms,
        }
    }

    /// The payload's kind, its metadata and its payload.
    fn parts(&self) -> (PayloadKind, &[u8], &[u8]) {
        let (kind, bytes, meta_len) = match &self.data {
            Data::Inline {
                len,
                meta_len,
                kind,
                bytes,
            } => (*kind, &bytes[..usize::from(*len)], usize::from(*meta_len)),
            Data::Heap { bytes, meta_len, kind } => (*kind, &bytes[..], *meta_len as usize),
        };
        let (meta, payload) = bytes.split_at(meta_len);
        (kind, meta, payload)
    }

    fn payload_len(&self) -> u64 {
        self.parts().2.len() as u64
    }

    /// What it costs against the total budget.
    fn cost(&self) -> u64 {
        let (_, meta, payload) = self.parts();
        (meta.len() + payload.len()) as u64 + MESSAGE_OVERHEAD
    }

    fn unpack(&self, offset: u64) -> StoredMessage {
        let (kind, meta, payload) = self.parts();
        StoredMessage {
            offset,
            kind,
            payload: Bytes::copy_from_slice(payload),
            meta: Bytes::copy_from_slice(meta),
            timestamp_ms: self.timestamp_ms,
        }
    }
}

#[derive(Debug, Default)]
struct Group {
    /// Unique to this entry of this group (see `TotalBudget`): evictions
    /// when it was created, and its flushes since.
    generation: u64,
    last: u64,
    /// Payload bytes retained.
    bytes: u64,
    messages: VecDeque<Packed>,
}

impl Group {
    /// The offset of the oldest retained message (`last + 1` when none).
    fn first(&self) -> u64 {
        self.last + 1 - self.messages.len() as u64
    }

    /// Applies the group's limits; returns what the removed messages cost.
    fn trim(&mut self, limits: &GroupLimits, now: u64) -> u64 {
        let msgs = &self.messages;
        let n = messages_to_trim(limits, now, msgs.len() as u64, self.bytes, |i| {
            let m = &msgs[i as usize];
            (m.payload_len(), m.timestamp_ms)
        });
        let mut cost = 0;
        for m in self.messages.drain(..n as usize) {
            self.bytes -= m.payload_len();
            cost += m.cost();
        }
        cost
    }

    /// Removes the oldest message; returns what it cost.
    fn pop_oldest(&mut self) -> u64 {
        let Some(m) = self.messages.pop_front() else { return 0 };
        self.bytes -= m.payload_len();
        m.cost()
    }

    fn head(&self, epoch: Epoch) -> Head {
        Head {
            epoch,
            first: self.first(),
            last: self.last,
        }
    }

    /// Messages from position `skip`, at most `take`, as stored messages.
    fn unpack(&self, skip: usize, take: usize) -> Vec<StoredMessage> {
        let first = self.first();
        self.messages
            .iter()
            .enumerate()
            .skip(skip)
            .take(take)
            .map(|(i, m)| m.unpack(first + i as u64))
            .collect()
    }
}

#[derive(Debug, Default)]
struct State {
    groups: HashMap<String, Group>,
    /// `flush_all` calls so far.
    flushes: u64,
    /// The whole store's budget, and the generation counter.
    budget: TotalBudget,
}

/// The groups as the total budget trims them.
struct Groups<'a>(&'a mut HashMap<String, Group>);

impl BudgetedGroups for Groups<'_> {
    fn retained(&self, group: &str) -> Option<usize> {
        self.0.get(group).map(|g| g.messages.len())
    }

    fn remove_oldest(&mut self, group: &str) -> u64 {
        self.0.get_mut(group).map_or(0, Group::pop_oldest)
    }

    fn evict(&mut self, group: &str, _evictions: u64) {
        // The group comes back (if ever) in a generation it never had.
        self.0.remove(group);
    }
}

impl State {
    /// Applies the total budget after writing `current`.
    fn enforce_total(&mut self, current: &str) {
        self.budget.enforce(current, &mut Groups(&mut self.groups));
    }
}

/// History in memory; see the crate docs.
#[derive(Debug)]
pub struct MemoryStore {
    /// Random per store: a new process (or store) is a new epoch.
    instance: String,
    limits: HistoryLimits,
    state: Mutex<State>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(MemoryConfig::default())
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new(config: MemoryConfig) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        MemoryStore {
            instance: id[..12].to_owned(),
            state: Mutex::new(State {
                budget: TotalBudget::new(config.limits.max_total_bytes),
                ..State::default()
            }),
            limits: config.limits,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent before anything can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn epoch(&self, flushes: u64, generation: u64) -> Epoch {
        Epoch::from_parts(&self.instance, flushes, generation)
    }

    fn check(group: &str) -> Result<(), MemoryError> {
        if group.is_empty() {
            return Err(MemoryError::EmptyGroup);
        }
        Ok(())
    }

    /// Trims a group and returns its head; `None` when the store never saw it.
    fn head_locked(&self, state: &mut State, group: &str, now: u64) -> Head {
        let flushes = state.flushes;
        match state.groups.get_mut(group) {
            Some(g) => {
                let released = g.trim(&self.limits.limits_for(group), now);
                let head = g.head(self.epoch(flushes, g.generation));
                state.budget.release(released);
                head
            }
            None => Group::default().head(self.epoch(flushes, state.budget.fresh_generation())),
        }
    }
}

#[async_trait]
impl HistoryStore for MemoryStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::IN_MEMORY
    }

    fn limits(&self) -> &HistoryLimits {
        &self.limits
    }

    fn message_cost(&self, _group: &str, payload_bytes: usize) -> u64 {
        payload_bytes as u64 + MESSAGE_OVERHEAD
    }

    fn append(&self, group: &str, message: NewMessage) -> Result<PendingAppend, StoreError> {
        Self::check(group)?;
        let mut state = self.state();
        let state = &mut *state;
        let generation = state.budget.fresh_generation();
        let g = state.groups.entry(group.to_owned()).or_insert_with(|| Group {
            generation,
            ..Group::default()
        });
        g.last += 1;
        let offset = g.last;
        g.bytes += message.payload.len() as u64;
        let packed = Packed::new(message);
        let cost = packed.cost();
        g.messages.push_back(packed);
        let released = g.trim(&self.limits.limits_for(group), now_ms());
        let epoch = self.epoch(state.flushes, g.generation);
        state.budget.charge(group, cost);
        state.budget.release(released);
        state.enforce_total(group);
        Ok(PendingAppend::ready(offset, epoch))
    }

    async fn head(&self, group: &str) -> Result<Head, StoreError> {
        Self::check(group)?;
        let mut state = self.state();
        Ok(self.head_locked(&mut state, group, now_ms()))
    }

    async fn read(&self, group: &str, query: ReadQuery) -> Result<HistoryPage, StoreError> {
        Self::check(group)?;
        let mut state = self.state();
        let head = self.head_locked(&mut state, group, now_ms());
        let Some(g) = state.groups.get(group) else {
            return Ok(HistoryPage {
                head,
                messages: Vec::new(),
            });
        };
        let messages = match query {
            ReadQuery::Last(n) => g.unpack(g.messages.len().saturating_sub(n), n),
            ReadQuery::Since { offset, limit } => {
                // Offsets are consecutive, so the position of `offset + 1` is
                // known without a search.
                let skip = offset.saturating_sub(head.first - 1).min(g.messages.len() as u64) as usize;
                g.unpack(skip, limit)
            }
        };
        Ok(HistoryPage { head, messages })
    }

    async fn flush_group(&self, group: &str) -> Result<Epoch, StoreError> {
        Self::check(group)?;
        let mut state = self.state();
        let state = &mut *state;
        let generation = match state.groups.get(group) {
            Some(g) => g.generation + 1,
            None => state.budget.fresh_generation() + 1,
        };
        let old = state.groups.insert(
            group.to_owned(),
            Group {
                generation,
                ..Group::default()
            },
        );
        if let Some(old) = old {
            state.budget.release(old.messages.iter().map(Packed::cost).sum());
        }
        // The empty entry keeps the new epoch; it counts like any group.
        state.budget.charge(group, 0);
        state.enforce_total(group);
        Ok(self.epoch(state.flushes, generation))
    }

    async fn flush_all(&self) -> Result<(), StoreError> {
        let mut state = self.state();
        state.flushes += 1;
        state.groups.clear();
        state.budget.clear();
        Ok(())
    }

    async fn stats(&self) -> Result<HistoryStats, StoreError> {
        let mut state = self.state();
        let state = &mut *state;
        let now = now_ms();
        let mut stats = HistoryStats::default();
        for (name, g) in state.groups.iter_mut() {
            let released = g.trim(&self.limits.limits_for(name), now);
            state.budget.release(released);
            stats.messages += g.messages.len() as u64;
            stats.bytes += g.bytes;
        }
        stats.cost = state.budget.used();
        Ok(stats)
    }
}
