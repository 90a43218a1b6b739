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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use channelbox_core::{
    Broker, BrokerEvent, BrokerFuture, Capabilities, Change, ClusterEvent, Directory, Epoch, Head, HistoryLimits,
    HistoryPage, HistoryStats, HistoryStore, Member, NewMessage, PendingAppend, ReadQuery, StoreError, StoreErrorKind,
    StreamPosition,
};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::shards::shard_of;
use crate::{RedisBroker, RedisDirectory, RedisStore};

/// Merged events waiting for the box (or the service) before a shard's
/// forwarding task waits.
const MERGED_QUEUE: usize = 65_536;

/// Forwards every receiver into one bounded queue.
fn merge<T: Send + 'static>(receivers: Vec<mpsc::Receiver<T>>) -> mpsc::Receiver<T> {
    merge_with(receivers, |_, _: &T| true)
}

/// Forwards every receiver into one bounded queue, each item only when
/// `pass(shard, item)` says so; `pass` is called under one lock, in the
/// order the items enter the queue.
fn merge_with<T: Send + 'static>(
    receivers: Vec<mpsc::Receiver<T>>,
    pass: impl FnMut(usize, &T) -> bool + Send + 'static,
) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel(MERGED_QUEUE);
    let pass = Arc::new(Mutex::new(pass));
    for (shard, mut r) in receivers.into_iter().enumerate() {
        let tx = tx.clone();
        let pass = pass.clone();
        tokio::spawn(async move {
            while let Some(item) = r.recv().await {
                let Ok(permit) = tx.reserve().await else { return };
                let mut pass = pass.lock().unwrap_or_else(|p| p.into_inner());
                if (*pass)(shard, &item) {
                    permit.send(item);
                }
            }
        });
    }
    rx
}

/// The shards' connections as one: `Lost` when the first shard is lost
/// while all were up, `Back` once every shard is back (each has restored
/// its subscriptions), so that the box's `Back` means what the broker
/// contract says; the other events pass.
fn connection_of_all(shards: usize) -> impl FnMut(usize, &BrokerEvent) -> bool + Send + 'static {
    // A shard's broker reports its first connection as `Back`.
    let mut up = vec![false; shards];
    move |shard, event| match event {
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

/// History on several shards.
#[derive(Debug)]
pub struct ShardedStore {
    shards: Vec<Arc<RedisStore>>,
}

impl ShardedStore {
    pub(crate) fn new(shards: Vec<Arc<RedisStore>>) -> Self {
        ShardedStore { shards }
    }

    fn of(&self, group: &str) -> &RedisStore {
        &self.shards[shard_of(group, self.shards.len())]
    }
}

#[async_trait]
impl HistoryStore for ShardedStore {
    fn capabilities(&self) -> Capabilities {
        self.shards[0].capabilities()
    }

    fn limits(&self) -> &HistoryLimits {
        self.shards[0].limits()
    }

    fn message_cost(&self, group: &str, payload_bytes: usize) -> u64 {
        self.of(group).message_cost(group, payload_bytes)
    }

    fn append(&self, group: &str, message: NewMessage) -> Result<PendingAppend, StoreError> {
        self.of(group).append(group, message)
    }

    fn append_except(
        &self,
        group: &str,
        message: NewMessage,
        except: Option<Uuid>,
    ) -> Result<PendingAppend, StoreError> {
        self.of(group).append_except(group, message, except)
    }

    async fn head(&self, group: &str) -> Result<Head, StoreError> {
        self.of(group).head(group).await
    }

    /// Each shard checks its own groups (one pipelined call per shard, all
    /// shards at once), so a shard that went back in time moves its groups
    /// to new epochs just as one Redis does; the answers come back in the
    /// order asked.
    async fn check_heads(&self, groups: &[(String, StreamPosition)]) -> Vec<Result<Head, StoreError>> {
        let mut per_shard: Vec<Vec<(String, StreamPosition)>> = vec![Vec::new(); self.shards.len()];
        let mut places = Vec::with_capacity(groups.len());
        for (group, seen) in groups {
            let shard = shard_of(group, self.shards.len());
            places.push((shard, per_shard[shard].len()));
            per_shard[shard].push((group.clone(), seen.clone()));
        }
        let checks = self.shards.iter().zip(&per_shard).map(|(store, asked)| async move {
            if asked.is_empty() {
                Vec::new()
            } else {
                store.check_heads(asked).await
            }
        });
        let mut answers: Vec<Vec<Option<Result<Head, StoreError>>>> = futures_util::future::join_all(checks)
            .await
            .into_iter()
            .map(|heads| heads.into_iter().map(Some).collect())
            .collect();
        places
            .into_iter()
            .map(|(shard, i)| {
                answers[shard]
                    .get_mut(i)
                    .and_then(Option::take)
                    .unwrap_or_else(|| Err(StoreError::new(StoreErrorKind::Corrupt, "head check: too few answers")))
            })
            .collect()
    }

    async fn read(&self, group: &str, query: ReadQuery) -> Result<HistoryPage, StoreError> {
        self.of(group).read(group, query).await
    }

    async fn flush_group(&self, group: &str) -> Result<Epoch, StoreError> {
        self.of(group).flush_group(group).await
    }

    async fn flush_all(&self) -> Result<(), StoreError> {
        for s in &self.shards {
            s.flush_all().await?;
        }
        Ok(())
    }

    async fn stats(&self) -> Result<HistoryStats, StoreError> {
        let mut total = HistoryStats::default();
        for s in &self.shards {
            let one = s.stats().await?;
            total.messages += one.messages;
            total.bytes += one.bytes;
            total.cost += one.cost;
        }
        Ok(total)
    }

    fn healthy(&self) -> bool {
        self.shards.iter().any(|s| s.healthy())
    }
}

/// Pub/sub on several shards.
#[derive(Debug)]
pub struct ShardedBroker {
    shards: Vec<Arc<RedisBroker>>,
    events: Mutex<Option<mpsc::Receiver<BrokerEvent>>>,
}

impl ShardedBroker {
    pub(crate) fn new(shards: Vec<Arc<RedisBroker>>) -> Self {
        let receivers: Vec<_> = shards.iter().filter_map(|b| b.take_events()).collect();
        let count = receivers.len();
        ShardedBroker {
            events: Mutex::new(Some(merge_with(receivers, connection_of_all(count)))),
            shards,
        }
    }

    fn of(&self, group: &str) -> &RedisBroker {
        &self.shards[shard_of(group, self.shards.len())]
    }
}

impl Broker for ShardedBroker {
    fn subscribe(&self, group: &str) -> BrokerFuture {
        self.of(group).subscribe(group)
    }

    fn unsubscribe(&self, group: &str) -> BrokerFuture {
        self.of(group).unsubscribe(group)
    }

    fn publish_unsaved(&self, group: &str, message: &NewMessage, except: Option<Uuid>) -> BrokerFuture {
        self.of(group).publish_unsaved(group, message, except)
    }

    fn take_events(&self) -> Option<mpsc::Receiver<BrokerEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn connected(&self) -> bool {
        self.shards.iter().any(|b| b.connected())
    }
}

/// The chat service's directory on several shards.
#[derive(Debug)]
pub struct ShardedDirectory {
    shards: Vec<Arc<RedisDirectory>>,
    events: Mutex<Option<mpsc::Receiver<ClusterEvent>>>,
}

impl ShardedDirectory {
    pub(crate) fn new(shards: Vec<Arc<RedisDirectory>>) -> Self {
        let receivers = shards.iter().filter_map(|d| d.take_events()).collect();
        ShardedDirectory {
            events: Mutex::new(Some(merge(receivers))),
            shards,
        }
    }

    fn of(&self, group: &str) -> &RedisDirectory {
        &self.shards[shard_of(group, self.shards.len())]
    }
}

#[async_trait]
impl Directory for ShardedDirectory {
    fn changed(&self, group: &str, change: Change, member: Member) {
        self.of(group).changed(group, change, member);
    }

    async fn connected(&self, channel: Uuid) -> Result<(), StoreError> {
        self.shards[0].connected(channel).await
    }

    fn disconnected(&self, channel: Uuid) {
        self.shards[0].disconnected(channel);
    }

    async fn groups(&self) -> Result<BTreeMap<String, usize>, StoreError> {
        let mut all = BTreeMap::new();
        for d in &self.shards {
            for (group, n) in d.groups().await? {
                *all.entry(group).or_insert(0) += n;
            }
        }
        Ok(all)
    }

    async fn presence(&self, group: &str, max: usize) -> Result<(Vec<Member>, bool), StoreError> {
        self.of(group).presence(group, max).await
    }

    async fn direct(&self, to: Uuid, frame: String) -> Result<bool, StoreError> {
        self.shards[0].direct(to, frame).await
    }

    async fn close_all(&self) -> Result<(), StoreError> {
        self.shards[0].close_all().await
    }

    fn take_events(&self) -> Option<mpsc::Receiver<ClusterEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[cfg(test)]
mod tests {
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
    }
}
