//! The store, broker and directory of several shards: each request about a
//! group goes to the group's shard ([`crate::shards::shard_of`]); what spans
//! groups (stats, flush-all, the cluster's group counts) asks every shard.
//! The events of every shard's broker and directory are merged into one
//! bounded queue each: every group event passes, `BrokerEvent::Moved` (a
//! shard that went back in time) included; `Lost` and `Back` stand for all
//! shards' connections together (`Lost` at the first loss, `Back` once every
//! shard is back), as the broker contract has them. Each shard keeps its own floors,
//! reconnect check and restart hold, so the rollback-safe epochs hold per
//! shard. What is about a channel or a server rather than a
//! group (where a channel runs, `direct`, admin close-all) lives on the first
//! shard, which every server lists first.
//!
//! Health is any shard's: a shard that is down makes its own groups answer
//! `unavailable` (its store refuses them), not the others'.
//!
//! A Redis Cluster is routed the same way, with one engine per master and a
//! group placed by its hash slot ([`Placement::Slots`], see `cluster`): a
//! request a node refuses for its slot (`MOVED`, `ASK`, `TRYAGAIN`,
//! `CLUSTERDOWN`) did not run, so it is sent again once the slot map is
//! read anew, for at most [`REDIRECT_FOR`]. A subscription follows its
//! group's slot (see `follow_moved_slots`), and so do the group's directory
//! records (see `follow_moved_records`). A failover needs nothing here: the
//! engine of a failed master moves to the promoted replica by itself (see
//! `cluster`), keeping its index, so every group keeps its engine.

mod broker;
mod directory;
mod retry;
mod store;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use channelbox_core::{BrokerEvent, StoreError};
use tokio::sync::mpsc;

pub use self::broker::ShardedBroker;
pub use self::directory::ShardedDirectory;
pub use self::store::ShardedStore;
use crate::cluster::Slots;
use crate::link::{is_redirect, unavailable};
use crate::shards::shard_of;

/// How long a request refused for its Cluster slot is sent again (the slot
/// map read anew each time) before it fails as `unavailable`.
pub(crate) const REDIRECT_FOR: Duration = Duration::from_secs(5);
/// Waits between two tries of a refused request.
const REDIRECT_WAIT: Duration = Duration::from_millis(50);

/// Where a group lives among the engines.
#[derive(Clone, Debug)]
pub(crate) enum Placement {
    /// Independent shards: `jump(fnv1a64(name), n)`.
    Jump(usize),
    /// A Redis Cluster: the master that serves the group's slot now.
    Slots(Arc<Slots>),
}

impl Placement {
    /// The engine of `group`, or `unavailable` when no known master serves
    /// its slot.
    pub(crate) fn of(&self, group: &str) -> Result<usize, StoreError> {
        match self {
            Placement::Jump(n) => Ok(shard_of(group, *n)),
            Placement::Slots(slots) => slots.master_of(group),
        }
    }

    /// The engine of `group`, waiting (the slot map read anew) while its
    /// slot refuses requests as a redirect does — its master's engine is
    /// being made — until `deadline`.
    async fn settled(&self, group: &str, deadline: tokio::time::Instant) -> Result<usize, StoreError> {
        loop {
            match self.of(group) {
                Err(err) if is_redirect(&err) && self.follow(deadline).await => {}
                placed => return placed,
            }
        }
    }

    /// After a redirect: reads the slot map anew (at most once per wait)
    /// and waits a little; `false` once `deadline` passed (or on shards,
    /// which never redirect).
    async fn follow(&self, deadline: tokio::time::Instant) -> bool {
        match self {
            Placement::Jump(_) => false,
            Placement::Slots(slots) => {
                if tokio::time::Instant::now() >= deadline {
                    return false;
                }
                slots.refresh().await;
                tokio::time::sleep(REDIRECT_WAIT).await;
                true
            }
        }
    }
}

/// Merged events waiting for the box (or the service) before a shard's
/// forwarding task waits.
const MERGED_QUEUE: usize = 65_536;

/// The engines behind a router, in engine order: fixed for shards; on a
/// Redis Cluster a master added after start joins at the end (see
/// `cluster`), before any group is placed on it.
#[derive(Debug)]
pub(crate) struct Engines<T>(RwLock<Vec<Arc<T>>>);

impl<T> Engines<T> {
    fn new(engines: Vec<Arc<T>>) -> Arc<Self> {
        Arc::new(Engines(RwLock::new(engines)))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<T>>> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Engine `index`: one the placement named, so always there.
    fn get(&self, index: usize) -> Result<Arc<T>, StoreError> {
        self.read()
            .get(index)
            .cloned()
            .ok_or_else(|| unavailable(format!("no engine {index} (yet)")))
    }

    /// Every engine, as now.
    fn all(&self) -> Vec<Arc<T>> {
        self.read().clone()
    }

    /// Adds one at the end; returns its index.
    fn push(&self, engine: Arc<T>) -> usize {
        let mut engines = self.0.write().unwrap_or_else(|p| p.into_inner());
        engines.push(engine);
        engines.len() - 1
    }
}

/// A filter of merged items: `(shard, item)`, whether it passes.
type Pass<T> = Box<dyn FnMut(usize, &T) -> bool + Send>;

/// Forwards the events of every shard into one bounded queue; a shard
/// added later is forwarded too ([`Merger::add`]).
struct Merger<T> {
    tx: mpsc::Sender<T>,
    pass: Arc<Mutex<Pass<T>>>,
}

impl<T> std::fmt::Debug for Merger<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merger").finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Merger<T> {
    /// Forwards every receiver (shard `i` the `i`-th) into one bounded
    /// queue, each item only when `pass(shard, item)` says so; `pass` is
    /// called under one lock, in the order the items enter the queue.
    fn new(
        receivers: Vec<mpsc::Receiver<T>>,
        pass: impl FnMut(usize, &T) -> bool + Send + 'static,
    ) -> (Merger<T>, mpsc::Receiver<T>) {
        let (tx, rx) = mpsc::channel(MERGED_QUEUE);
        let merger = Merger {
            tx,
            pass: Arc::new(Mutex::new(Box::new(pass))),
        };
        for (shard, r) in receivers.into_iter().enumerate() {
            merger.add(shard, r);
        }
        (merger, rx)
    }

    /// Forwards `receiver`'s items as shard `shard`'s.
    fn add(&self, shard: usize, mut receiver: mpsc::Receiver<T>) {
        let tx = self.tx.clone();
        let pass = self.pass.clone();
        tokio::spawn(async move {
            while let Some(item) = receiver.recv().await {
                let Ok(permit) = tx.reserve().await else { return };
                let mut pass = pass.lock().unwrap_or_else(|p| p.into_inner());
                if (*pass)(shard, &item) {
                    permit.send(item);
                }
            }
        });
    }
}

/// Forwards every receiver into one bounded queue.
fn merge<T: Send + 'static>(receivers: Vec<mpsc::Receiver<T>>) -> (Merger<T>, mpsc::Receiver<T>) {
    Merger::new(receivers, |_, _: &T| true)
}

/// The shards' connections as one: `Lost` when the first shard is lost
/// while all were up, `Back` once every shard is back (each has restored
/// its subscriptions), so that the box's `Back` means what the broker
/// contract says; the other events pass. A shard past the first `shards`
/// (a Cluster master added later) counts as up until its first `Lost`: it
/// had no subscriptions to lose.
fn connection_of_all(shards: usize) -> impl FnMut(usize, &BrokerEvent) -> bool + Send + 'static {
    // A shard's broker reports its first connection as `Back`.
    let mut up = vec![false; shards];
    move |shard, event| {
        if shard >= up.len() {
            up.resize(shard + 1, true);
        }
        match event {
            BrokerEvent::Lost => {
                let all_were_up = up.iter().all(|u| *u);
                up[shard] = false;
                all_were_up
            }
            BrokerEvent::Back => {
                up[shard] = true;
                up.iter().all(|u| *u)
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use channelbox_core::{Epoch, StreamPosition};

    use super::*;

    #[test]
    fn lost_at_the_first_loss_back_once_every_shard_is_back() {
        let mut pass = connection_of_all(2);
        let saved = BrokerEvent::Reset {
            group: "g".to_owned(),
            position: StreamPosition::new(Epoch::from("e"), 0),
        };
        // First connections: Back once both are up.
        assert!(!pass(0, &BrokerEvent::Back));
        assert!(pass(1, &BrokerEvent::Back));
        // Both lost, back in another order: one Lost, one Back.
        assert!(pass(1, &BrokerEvent::Lost));
        assert!(!pass(0, &BrokerEvent::Lost));
        assert!(pass(0, &saved), "group events always pass");
        assert!(!pass(1, &BrokerEvent::Back));
        assert!(pass(0, &BrokerEvent::Back));
        // One lost and back alone.
        assert!(pass(0, &BrokerEvent::Lost));
        assert!(pass(0, &BrokerEvent::Back));
        // A Cluster master added later counts as up until its first loss.
        assert!(pass(2, &BrokerEvent::Back));
        assert!(pass(2, &BrokerEvent::Lost));
        assert!(!pass(0, &BrokerEvent::Lost));
        assert!(!pass(2, &BrokerEvent::Back));
        assert!(pass(0, &BrokerEvent::Back));
    }
}
