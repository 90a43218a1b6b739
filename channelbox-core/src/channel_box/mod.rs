//! [`ChannelBox`]: channels organized into named groups, with per-group history.
//!
//! The files of this module, each owning one part:
//! - `registry`: the channels the box knows by id, and leaving every group when
//!   a channel closes;
//! - `membership`: groups and their members, the member snapshot a broadcast
//!   reads, and how long a group object lives;
//! - `sequencer`: per-group delivery in offset order;
//! - `publish`: offset assignment, the wait for durability, and handing a saved
//!   or unsaved message to delivery;
//! - `delivery`: fan-out into members' queues and the accounting of every
//!   delivery result;
//! - `subscribe`: joining with a replay, the gate that holds live messages
//!   while history is read, and replay pacing;
//! - `cluster`: with a broker, messages from the engine into the sequencer,
//!   gaps filled from history or closed with 4002, the head check;
//! - `replays`: replay pages (history read, frames rendered) shared by
//!   subscribers recovering the same range;
//! - `recovery`: what to replay and whether a recovery is complete;
//! - `flush`: reading and flushing history through the box;
//! - `reports`: the statuses, reports and counters the box hands out.
//!
//! Locks, and why no broadcast waits on them for long:
//! - `state` (one mutex) holds the channel registry and the map of groups. It is
//!   taken for membership changes only, never while delivering.
//! - Each group's `members` mutex guards its member map and a cached snapshot
//!   (`Arc<[Channel]>`). A broadcast clones the snapshot and lets go at once.
//! - Each group's `order` mutex holds its sequencer and keeps deliveries in
//!   offset order. It is held while frames are pushed into members' queues,
//!   which never waits ([`Channel::try_send`]), and never across an `.await`.
//!
//! Lock order: `order` → `state` → `members`. Nothing takes `order` while
//! holding another of them.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::broker::Broker;
use crate::envelope::{Envelope, PlainEnvelope};
use crate::history::HistoryStore;

mod cluster;
mod delivery;
mod flush;
mod membership;
mod publish;
mod recovery;
mod registry;
mod replays;
mod reports;
mod sequencer;
mod subscribe;

pub use cluster::{GAP_WAIT, HEAD_CHECK};
pub use membership::MembershipObserver;
pub use publish::{PendingPublish, PublishOptions};
pub use recovery::Recovery;
pub use reports::{AddStatus, BoxStats, DeliveryReport, PublishReport, RemoveStatus};
pub use subscribe::{NoFraming, Replay, SubscribeFraming, Subscribed, REPLAY_STALL};

use registry::State;
use reports::Counters;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent before anything that
    // could panic, so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Inner {
    store: Arc<dyn HistoryStore>,
    envelope: Arc<dyn Envelope>,
    state: Mutex<State>,
    counters: Counters,
    /// Told of every join and leave, once set.
    observer: std::sync::OnceLock<Arc<dyn MembershipObserver>>,
    /// The cluster's broker, once attached.
    broker: std::sync::OnceLock<Arc<dyn Broker>>,
    /// The groups this server subscribed to through the broker.
    subscribed: cluster::Subscriptions,
    /// Replay pages shared by subscribers recovering the same range.
    replays: Mutex<replays::ReplayCache>,
}

/// Channels organized into named groups, with per-group history.
///
/// A `ChannelBox` is an instance, not a global: clone it freely (clones share
/// everything) and build as many as you need, each with its own store.
///
/// ```
/// # use channelbox_core::{ChannelBox, HistoryStore};
/// # fn demo(store: std::sync::Arc<dyn HistoryStore>) {
/// let channels = ChannelBox::new(store);
/// # }
/// ```
#[derive(Clone)]
pub struct ChannelBox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ChannelBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelBox")
            .field("store", &self.inner.store)
            .field("envelope", &self.inner.envelope)
            .field("stats", &self.stats())
            .finish()
    }
}

impl ChannelBox {
    /// A box over this history store, with the [`PlainEnvelope`].
    pub fn new(store: Arc<dyn HistoryStore>) -> Self {
        Self::with_envelope(store, Arc::new(PlainEnvelope))
    }

    /// A box whose broadcasts and replays are rendered by `envelope`.
    pub fn with_envelope(store: Arc<dyn HistoryStore>, envelope: Arc<dyn Envelope>) -> Self {
        ChannelBox {
            inner: Arc::new(Inner {
                store,
                envelope,
                state: Mutex::new(State::default()),
                counters: Counters::default(),
                observer: std::sync::OnceLock::new(),
                broker: std::sync::OnceLock::new(),
                subscribed: Default::default(),
                replays: Default::default(),
            }),
        }
    }

    /// The history store.
    pub fn store(&self) -> &Arc<dyn HistoryStore> {
        &self.inner.store
    }

    /// Counters and sizes.
    pub fn stats(&self) -> BoxStats {
        let (channels, groups) = {
            let state = lock(&self.inner.state);
            (state.channels.len(), state.groups.len())
        };
        self.inner.counters.snapshot(channels, groups)
    }
}
