//! The `HistoryStore` implementation.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use channelbox_core::{
    messages_to_trim, now_ms, Capabilities, Epoch, Head, HistoryLimits, HistoryPage, HistoryStats, HistoryStore,
    NewMessage, PendingAppend, ReadQuery, StoreError, StoredMessage,
};

use crate::config::MemoryConfig;
use crate::error::MemoryError;

#[derive(Debug, Default)]
struct Group {
    /// Flushes of this group since the last `flush_all`.
    generation: u64,
    last: u64,
    bytes: u64,
    messages: VecDeque<StoredMessage>,
}

impl Group {
    fn trim(&mut self, limits: &HistoryLimits, now: u64) {
        let msgs = &self.messages;
        let n = messages_to_trim(limits, now, msgs.len() as u64, self.bytes, |i| {
            let m = &msgs[i as usize];
            (m.payload.len() as u64, m.timestamp_ms)
        });
        for m in self.messages.drain(..n as usize) {
            self.bytes -= m.payload.len() as u64;
        }
    }

    fn head(&self, epoch: Epoch) -> Head {
        Head {
            epoch,
            first: self.messages.front().map_or(self.last + 1, |m| m.offset),
            last: self.last,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    groups: HashMap<String, Group>,
    /// `flush_all` calls so far.
    flushes: u64,
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
            limits: config.limits,
            state: Mutex::new(State::default()),
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
                g.trim(&self.limits, now);
                g.head(self.epoch(flushes, g.generation))
            }
            None => Group::default().head(self.epoch(flushes, 0)),
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

    fn append(&self, group: &str, message: NewMessage) -> Result<PendingAppend, StoreError> {
        Self::check(group)?;
        let mut state = self.state();
        let flushes = state.flushes;
        let g = state.groups.entry(group.to_owned()).or_default();
        g.last += 1;
        let offset = g.last;
        g.bytes += message.payload.len() as u64;
        g.messages.push_back(StoredMessage::from_new(offset, message));
        g.trim(&self.limits, now_ms());
        Ok(PendingAppend::ready(offset, self.epoch(flushes, g.generation)))
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
            ReadQuery::Last(n) => {
                let skip = g.messages.len().saturating_sub(n);
                g.messages.iter().skip(skip).cloned().collect()
            }
            ReadQuery::Since { offset, limit } => {
                // Offsets are consecutive, so the position of `offset + 1` is
                // known without a search.
                let skip = offset.saturating_sub(head.first - 1).min(g.messages.len() as u64) as usize;
                g.messages.iter().skip(skip).take(limit).cloned().collect()
            }
        };
        Ok(HistoryPage { head, messages })
    }

    async fn flush_group(&self, group: &str) -> Result<Epoch, StoreError> {
        Self::check(group)?;
        let mut state = self.state();
        let flushes = state.flushes;
        let g = state.groups.entry(group.to_owned()).or_default();
        *g = Group {
            generation: g.generation + 1,
            ..Group::default()
        };
        Ok(self.epoch(flushes, g.generation))
    }

    async fn flush_all(&self) -> Result<(), StoreError> {
        let mut state = self.state();
        state.flushes += 1;
        state.groups.clear();
        Ok(())
    }

    async fn stats(&self) -> Result<HistoryStats, StoreError> {
        let mut state = self.state();
        let now = now_ms();
        let mut stats = HistoryStats::default();
        for g in state.groups.values_mut() {
            g.trim(&self.limits, now);
            stats.messages += g.messages.len() as u64;
            stats.bytes += g.bytes;
        }
        Ok(stats)
    }
}
