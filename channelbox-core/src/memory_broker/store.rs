//! [`BusStore`]: the history shared by the boxes of a [`MemoryBus`], which
//! carries each saved message and each reset to the subscribed boxes.
//!
//! [`MemoryBus`]: super::MemoryBus

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::FutureExt;
use uuid::Uuid;

use super::Bus;
use crate::broker::BrokerEvent;
use crate::error::StoreError;
use crate::history::{
    Capabilities, Head, HistoryPage, HistoryStats, HistoryStore, NewMessage, PendingAppend, ReadQuery,
};
use crate::limits::HistoryLimits;
use crate::position::{Epoch, StreamPosition};

/// A history store of a [`MemoryBus`](super::MemoryBus): every call goes to
/// the wrapped store, and what changes a group's stream is carried to every
/// box subscribed to it.
///
/// Saved messages reach the boxes in offset order when the wrapped store
/// assigns offsets as it appends (the built-in stores do): the offset is
/// taken and the message queued for every box under one lock. With a store
/// that assigns them later, each message is carried once it is saved, and
/// the boxes put them in order (holding back, or filling a gap from
/// history). A reset is carried under the same lock when the wrapped store
/// flushes without waiting (the in-memory store does), otherwise once done.
#[derive(Debug)]
pub struct BusStore {
    history: Arc<dyn HistoryStore>,
    bus: Arc<Bus>,
}

impl BusStore {
    pub(super) fn new(history: Arc<dyn HistoryStore>, bus: Arc<Bus>) -> Self {
        BusStore { history, bus }
    }

    fn saved(&self, group: &str, position: StreamPosition, message: NewMessage, except: Option<Uuid>) {
        let event = BrokerEvent::Saved {
            group: group.to_owned(),
            position,
            message,
            except,
        };
        self.bus.lock().deliver(&self.bus, group, None, &event);
    }

    fn reset(bus: &Arc<Bus>, state: &mut super::State, group: &str, epoch: Epoch) {
        let event = BrokerEvent::Reset {
            group: group.to_owned(),
            position: StreamPosition::new(epoch, 0),
        };
        state.deliver(bus, group, None, &event);
    }
}

#[async_trait]
impl HistoryStore for BusStore {
    fn capabilities(&self) -> Capabilities {
        self.history.capabilities()
    }

    fn limits(&self) -> &HistoryLimits {
        self.history.limits()
    }

    fn message_cost(&self, group: &str, payload_bytes: usize) -> u64 {
        self.history.message_cost(group, payload_bytes)
    }

    fn append(&self, group: &str, message: NewMessage) -> Result<PendingAppend, StoreError> {
        self.append_except(group, message, None)
    }

    fn append_except(
        &self,
        group: &str,
        message: NewMessage,
        except: Option<Uuid>,
    ) -> Result<PendingAppend, StoreError> {
        let mut state = self.bus.lock();
        let pending = self.history.append_except(group, message.clone(), except)?;
        if let Some(position) = pending.position() {
            let event = BrokerEvent::Saved {
                group: group.to_owned(),
                position: position.clone(),
                message,
                except,
            };
            state.deliver(&self.bus, group, None, &event);
            return Ok(pending);
        }
        drop(state);
        // Assigned by the store later: carried once saved.
        let this = BusStore {
            history: self.history.clone(),
            bus: self.bus.clone(),
        };
        let group = group.to_owned();
        Ok(PendingAppend::remote(Box::pin(async move {
            let position = pending.wait().await?;
            this.saved(&group, position.clone(), message, except);
            Ok(position)
        })))
    }

    async fn head(&self, group: &str) -> Result<Head, StoreError> {
        self.history.head(group).await
    }

    async fn check_heads(&self, groups: &[(String, StreamPosition)]) -> Vec<Result<Head, StoreError>> {
        self.history.check_heads(groups).await
    }

    async fn read(&self, group: &str, query: ReadQuery) -> Result<HistoryPage, StoreError> {
        self.history.read(group, query).await
    }

    async fn flush_group(&self, group: &str) -> Result<Epoch, StoreError> {
        let flush = self.history.flush_group(group);
        let mut flush = {
            // A store that flushes without waiting is flushed and announced
            // under the lock: no saved message of the new epoch goes first.
            let mut state = self.bus.lock();
            let mut flush = flush;
            if let Some(done) = (&mut flush).now_or_never() {
                let epoch = done?;
                BusStore::reset(&self.bus, &mut state, group, epoch.clone());
                return Ok(epoch);
            }
            flush
        };
        let epoch = (&mut flush).await?;
        BusStore::reset(&self.bus, &mut self.bus.lock(), group, epoch.clone());
        Ok(epoch)
    }

    async fn flush_all(&self) -> Result<(), StoreError> {
        self.history.flush_all().await?;
        // Every group a box listens to continues in its new epoch.
        let groups: Vec<String> = {
            let state = self.bus.lock();
            let mut all: Vec<String> = state.nodes.values().flat_map(|n| n.groups.iter().cloned()).collect();
            all.sort();
            all.dedup();
            all
        };
        for group in groups {
            let head = self.history.head(&group).await?;
            BusStore::reset(&self.bus, &mut self.bus.lock(), &group, head.epoch);
        }
        Ok(())
    }

    async fn stats(&self) -> Result<HistoryStats, StoreError> {
        self.history.stats().await
    }

    fn healthy(&self) -> bool {
        self.history.healthy()
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.history.sync().await
    }
}
