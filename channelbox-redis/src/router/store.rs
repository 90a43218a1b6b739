//! [`ShardedStore`]: history on several shards (or the masters of a Redis
//! Cluster), each group's requests on its engine, a refused one sent again
//! where its slot is now.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use channelbox_core::{
    Capabilities, Epoch, Head, HistoryLimits, HistoryPage, HistoryStats, HistoryStore, NewMessage, PendingAppend,
    ReadQuery, StoreError, StoreErrorKind, StreamPosition,
};
use uuid::Uuid;

use super::retry::RetryOrder;
use super::{Engines, Placement, REDIRECT_FOR};
use crate::link::is_redirect;
use crate::RedisStore;

/// History on several shards (or the masters of a Redis Cluster).
#[derive(Debug)]
pub struct ShardedStore {
    shards: Arc<Engines<RedisStore>>,
    /// The first engine's (every engine has the same settings).
    limits: HistoryLimits,
    placement: Placement,
    order: Arc<RetryOrder>,
}

impl ShardedStore {
    pub(crate) fn new(shards: Vec<Arc<RedisStore>>, placement: Placement) -> Self {
        ShardedStore {
            limits: shards[0].limits().clone(),
            shards: Engines::new(shards),
            placement,
            order: Arc::default(),
        }
    }

    /// Adds the store of a Cluster master added after start (see `cluster`).
    pub(crate) fn add(&self, store: Arc<RedisStore>) -> usize {
        self.shards.push(store)
    }

    /// How many engines it has.
    pub(crate) fn engines(&self) -> usize {
        self.shards.read().len()
    }

    fn of(&self, group: &str) -> Result<Arc<RedisStore>, StoreError> {
        self.shards.get(self.placement.of(group)?)
    }

    /// Runs `request` on the group's engine; a Cluster redirect sends it
    /// again where the slot is now (it did not run).
    async fn routed<T, F, Fut>(&self, group: &str, request: F) -> Result<T, StoreError>
    where
        F: Fn(Arc<RedisStore>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let deadline = tokio::time::Instant::now() + REDIRECT_FOR;
        loop {
            let store = self.shards.get(self.placement.settled(group, deadline).await?)?;
            match request(store).await {
                Err(err) if is_redirect(&err) && self.placement.follow(deadline).await => {}
                result => return result,
            }
        }
    }

    /// Appends on the group's engine; a Cluster redirect appends again
    /// where the slot is now (the refused script did not run, so nothing
    /// is saved twice), in the order the appends were made (see
    /// [`RetryOrder`]).
    fn append_routed(
        &self,
        group: &str,
        message: NewMessage,
        except: Option<Uuid>,
    ) -> Result<PendingAppend, StoreError> {
        if matches!(self.placement, Placement::Jump(_)) {
            return self.of(group)?.append_except(group, message, except);
        }
        let mut ticket = self.order.take(group);
        let first = match ticket.held {
            true => None,
            false => match self.of(group) {
                Ok(store) => Some(store.append_except(group, message.clone(), except)?),
                // Its master's engine is being made: held, as if refused.
                Err(err) if is_redirect(&err) => {
                    ticket.hold();
                    None
                }
                Err(err) => return Err(err),
            },
        };
        let (shards, placement, group) = (self.shards.clone(), self.placement.clone(), group.to_owned());
        Ok(PendingAppend::remote(Box::pin(async move {
            let deadline = tokio::time::Instant::now() + REDIRECT_FOR;
            let mut waited = false;
            let mut pending = match first {
                Some(pending) => pending,
                None => {
                    ticket.turn(deadline).await;
                    waited = true;
                    shards.get(placement.settled(&group, deadline).await?)?.append_except(
                        &group,
                        message.clone(),
                        except,
                    )?
                }
            };
            loop {
                match pending.wait().await {
                    Err(err) if is_redirect(&err) => {
                        // Held first, so that no later append overtakes
                        // while the map is read anew.
                        ticket.hold();
                        if !placement.follow(deadline).await {
                            ticket.settle();
                            return Err(err);
                        }
                        if !waited {
                            ticket.turn(deadline).await;
                            waited = true;
                        }
                        pending = shards.get(placement.settled(&group, deadline).await?)?.append_except(
                            &group,
                            message.clone(),
                            except,
                        )?;
                    }
                    result => {
                        ticket.settle();
                        return result;
                    }
                }
            }
        })))
    }
}

#[async_trait]
impl HistoryStore for ShardedStore {
    fn capabilities(&self) -> Capabilities {
        self.shards.read()[0].capabilities()
    }

    fn limits(&self) -> &HistoryLimits {
        &self.limits
    }

    fn message_cost(&self, group: &str, payload_bytes: usize) -> u64 {
        self.shards.read()[0].message_cost(group, payload_bytes)
    }

    fn append(&self, group: &str, message: NewMessage) -> Result<PendingAppend, StoreError> {
        self.append_routed(group, message, None)
    }

    fn append_except(
        &self,
        group: &str,
        message: NewMessage,
        except: Option<Uuid>,
    ) -> Result<PendingAppend, StoreError> {
        self.append_routed(group, message, except)
    }

    async fn head(&self, group: &str) -> Result<Head, StoreError> {
        self.routed(group, |s| async move { s.head(group).await }).await
    }

    /// Each shard checks its own groups (one pipelined call per shard, all
    /// shards at once), so a shard that went back in time moves its groups
    /// to new epochs just as one Redis does; the answers come back in the
    /// order asked. On a Cluster, the groups whose node redirected are
    /// checked again where their slots are now.
    async fn check_heads(&self, groups: &[(String, StreamPosition)]) -> Vec<Result<Head, StoreError>> {
        let mut heads = self.check_heads_once(groups).await;
        let deadline = tokio::time::Instant::now() + REDIRECT_FOR;
        loop {
            let again: Vec<usize> = (0..heads.len())
                .filter(|i| matches!(&heads[*i], Err(e) if is_redirect(e)))
                .collect();
            if again.is_empty() || !self.placement.follow(deadline).await {
                return heads;
            }
            let asked: Vec<(String, StreamPosition)> = again.iter().map(|i| groups[*i].clone()).collect();
            for (i, head) in again.into_iter().zip(self.check_heads_once(&asked).await) {
                heads[i] = head;
            }
        }
    }

    async fn read(&self, group: &str, query: ReadQuery) -> Result<HistoryPage, StoreError> {
        self.routed(group, |s| async move { s.read(group, query).await }).await
    }

    async fn flush_group(&self, group: &str) -> Result<Epoch, StoreError> {
        self.routed(group, |s| async move { s.flush_group(group).await }).await
    }

    async fn flush_all(&self) -> Result<(), StoreError> {
        for s in self.shards.all() {
            s.flush_all().await?;
        }
        Ok(())
    }

    async fn stats(&self) -> Result<HistoryStats, StoreError> {
        let mut total = HistoryStats::default();
        for s in self.shards.all() {
            let one = s.stats().await?;
            total.messages += one.messages;
            total.bytes += one.bytes;
            total.cost += one.cost;
        }
        Ok(total)
    }

    fn healthy(&self) -> bool {
        self.shards.read().iter().any(|s| s.healthy())
    }

    /// The group's engine and the first (which keeps what is about a
    /// channel or a server: a new connection is recorded there) are
    /// healthy; a group whose Cluster master's engine is being made counts
    /// as healthy (its requests wait for it).
    fn healthy_for(&self, group: &str) -> bool {
        let shards = self.shards.read();
        let first = shards[0].healthy();
        match self.placement.of(group) {
            Ok(shard) => first && shards.get(shard).is_some_and(|s| s.healthy()),
            Err(err) => first && is_redirect(&err),
        }
    }
}

impl ShardedStore {
    /// One round of head checks, each group on the engine it is placed on now.
    async fn check_heads_once(&self, groups: &[(String, StreamPosition)]) -> Vec<Result<Head, StoreError>> {
        let shards = self.shards.all();
        let mut per_shard: Vec<Vec<(String, StreamPosition)>> = vec![Vec::new(); shards.len()];
        let mut places = Vec::with_capacity(groups.len());
        for (group, seen) in groups {
            match self.placement.of(group) {
                // Placed on an engine added since `shards` was read: asked
                // again, as after a redirect.
                Ok(shard) if shard >= shards.len() => places.push(Err(crate::link::redirected("ADDED", Some(group)))),
                Ok(shard) => {
                    places.push(Ok((shard, per_shard[shard].len())));
                    per_shard[shard].push((group.clone(), seen.clone()));
                }
                Err(err) => places.push(Err(err)),
            }
        }
        let checks = shards.iter().zip(&per_shard).map(|(store, asked)| async move {
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
            .map(|place| {
                let (shard, i) = place?;
                answers[shard]
                    .get_mut(i)
                    .and_then(Option::take)
                    .unwrap_or_else(|| Err(StoreError::new(StoreErrorKind::Corrupt, "head check: too few answers")))
            })
            .collect()
    }
}
