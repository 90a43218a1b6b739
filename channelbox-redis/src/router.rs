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
//! records (see `follow_moved_records`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use channelbox_core::{
    Broker, BrokerEvent, BrokerFuture, Capabilities, Change, ClusterEvent, Directory, Epoch, Head, HistoryLimits,
    HistoryPage, HistoryStats, HistoryStore, Member, NewMessage, PendingAppend, ReadQuery, StoreError, StoreErrorKind,
    StreamPosition,
};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::cluster::Slots;
use crate::link::{is_redirect, unavailable};
use crate::shards::shard_of;
use crate::{RedisBroker, RedisDirectory, RedisStore};

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
            Placement::Slots(slots) => slots
                .master_of(group)
                .ok_or_else(|| unavailable(format!("no known master serves the slot of group {group:?}"))),
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

/// The order in which one group's appends were made, so that appends a
/// Cluster node refused are sent again in that order: one connection's
/// publishes keep their order across a slot move. Each append takes a
/// ticket; one refused waits until every earlier one of its group is
/// settled (saved, failed, dropped, or itself sent again and answered)
/// before it is sent again, for at most [`REDIRECT_FOR`]; an append made
/// while one of its group is held so is itself held (sent when its turn
/// comes, once awaited), so that it cannot overtake.
#[derive(Debug, Default)]
struct RetryOrder {
    groups: Mutex<HashMap<String, Tickets>>,
}

#[derive(Debug)]
struct Tickets {
    /// The next ticket to hand out.
    issued: u64,
    /// Every ticket below this one is settled.
    next: u64,
    /// Settled tickets above `next`.
    early: std::collections::BTreeSet<u64>,
    /// Unsettled tickets held back (refused once, or made while one was).
    held: u64,
    turn: Arc<tokio::sync::Notify>,
}

impl RetryOrder {
    fn take(self: &Arc<Self>, group: &str) -> Ticket {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let t = groups.entry(group.to_owned()).or_insert_with(|| Tickets {
            issued: 0,
            next: 0,
            early: Default::default(),
            held: 0,
            turn: Arc::new(tokio::sync::Notify::new()),
        });
        t.issued += 1;
        let held = t.held > 0;
        if held {
            t.held += 1;
        }
        Ticket {
            order: self.clone(),
            group: group.to_owned(),
            number: t.issued - 1,
            held,
            settled: false,
        }
    }
}

/// One append's place in its group's order; settled when dropped.
struct Ticket {
    order: Arc<RetryOrder>,
    group: String,
    number: u64,
    /// Counted in its group's `held`.
    held: bool,
    settled: bool,
}

impl Ticket {
    /// Marks the append held back: later appends of the group wait for it.
    fn hold(&mut self) {
        if std::mem::replace(&mut self.held, true) {
            return;
        }
        let mut groups = self.order.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = groups.get_mut(&self.group) {
            t.held += 1;
        }
    }

    /// Waits until every earlier append of the group is settled (at most
    /// until `deadline`).
    async fn turn(&self, deadline: tokio::time::Instant) {
        loop {
            let turn = {
                let groups = self.order.groups.lock().unwrap_or_else(|p| p.into_inner());
                match groups.get(&self.group) {
                    Some(t) if t.next < self.number => t.turn.clone(),
                    _ => return,
                }
            };
            let notified = turn.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let groups = self.order.groups.lock().unwrap_or_else(|p| p.into_inner());
                if groups.get(&self.group).is_none_or(|t| t.next >= self.number) {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    fn settle(&mut self) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let mut groups = self.order.groups.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = groups.get_mut(&self.group) else { return };
        if self.held {
            t.held = t.held.saturating_sub(1);
        }
        if self.number == t.next {
            t.next += 1;
            while t.early.remove(&t.next) {
                t.next += 1;
            }
            t.turn.notify_waiters();
        } else if self.number > t.next {
            t.early.insert(self.number);
        }
        if t.next == t.issued {
            groups.remove(&self.group);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.settle();
    }
}

/// History on several shards (or the masters of a Redis Cluster).
#[derive(Debug)]
pub struct ShardedStore {
    shards: Arc<Vec<Arc<RedisStore>>>,
    placement: Placement,
    order: Arc<RetryOrder>,
}

impl ShardedStore {
    pub(crate) fn new(shards: Vec<Arc<RedisStore>>, placement: Placement) -> Self {
        ShardedStore {
            shards: Arc::new(shards),
            placement,
            order: Arc::default(),
        }
    }

    fn of(&self, group: &str) -> Result<Arc<RedisStore>, StoreError> {
        Ok(self.shards[self.placement.of(group)?].clone())
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
            match request(self.of(group)?).await {
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
            false => Some(self.of(group)?.append_except(group, message.clone(), except)?),
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
                    shards[placement.of(&group)?].append_except(&group, message.clone(), except)?
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
                        pending = shards[placement.of(&group)?].append_except(&group, message.clone(), except)?;
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
        self.shards[0].capabilities()
    }

    fn limits(&self) -> &HistoryLimits {
        self.shards[0].limits()
    }

    fn message_cost(&self, group: &str, payload_bytes: usize) -> u64 {
        self.shards[0].message_cost(group, payload_bytes)
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
        for s in self.shards.iter() {
            s.flush_all().await?;
        }
        Ok(())
    }

    async fn stats(&self) -> Result<HistoryStats, StoreError> {
        let mut total = HistoryStats::default();
        for s in self.shards.iter() {
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

impl ShardedStore {
    /// One round of head checks, each group on the engine it is placed on now.
    async fn check_heads_once(&self, groups: &[(String, StreamPosition)]) -> Vec<Result<Head, StoreError>> {
        let mut per_shard: Vec<Vec<(String, StreamPosition)>> = vec![Vec::new(); self.shards.len()];
        let mut places = Vec::with_capacity(groups.len());
        for (group, seen) in groups {
            match self.placement.of(group) {
                Ok(shard) => {
                    places.push(Ok((shard, per_shard[shard].len())));
                    per_shard[shard].push((group.clone(), seen.clone()));
                }
                Err(err) => places.push(Err(err)),
            }
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

/// Pub/sub on several shards (or the masters of a Redis Cluster).
#[derive(Debug)]
pub struct ShardedBroker {
    shards: Vec<Arc<RedisBroker>>,
    placement: Placement,
    /// The engine each subscribed group is subscribed on: its unsubscribe
    /// goes there too. On a Cluster, a group whose slot moved is subscribed
    /// again on the new master (see `follow_moved_slots`).
    subscribed: Arc<Mutex<HashMap<String, usize>>>,
    events: Mutex<Option<mpsc::Receiver<BrokerEvent>>>,
}

impl ShardedBroker {
    pub(crate) fn new(shards: Vec<Arc<RedisBroker>>, placement: Placement) -> Self {
        let mut receivers: Vec<_> = shards.iter().filter_map(|b| b.take_events()).collect();
        let count = receivers.len();
        // `Back` after a group whose Cluster slot moved is subscribed where
        // the slot is now: the box then checks every group's head, which
        // finds what was published while the group was not subscribed.
        let (back_tx, back_rx) = mpsc::channel(1);
        receivers.push(back_rx);
        let mut connections = connection_of_all(count);
        let pass = move |shard: usize, event: &BrokerEvent| shard == count || connections(shard, event);
        let broker = ShardedBroker {
            events: Mutex::new(Some(merge_with(receivers, pass))),
            shards,
            placement,
            subscribed: Arc::new(Mutex::new(HashMap::new())),
        };
        let moved: Vec<_> = broker.shards.iter().filter_map(|b| b.take_moved()).collect();
        if matches!(broker.placement, Placement::Slots(_)) {
            tokio::spawn(follow_moved_slots(
                merge(moved),
                broker.shards.clone(),
                broker.placement.clone(),
                broker.subscribed.clone(),
                back_tx,
            ));
        }
        broker
    }
}

fn failed(err: StoreError) -> BrokerFuture {
    Box::pin(async move { Err(err) })
}

/// Waits for a subscription `placed` on a group's engine; when that
/// engine's node refuses it (the slot moved), places it again where the
/// slot is now — under the lock, so that an unsubscribe made meanwhile comes
/// after it on the same engine — and records where.
async fn subscribe_placed(
    shards: &[Arc<RedisBroker>],
    placement: &Placement,
    subscribed: &Mutex<HashMap<String, usize>>,
    group: &str,
    mut placed: BrokerFuture,
) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + REDIRECT_FOR;
    loop {
        match placed.await {
            Err(err) if is_redirect(&err) && placement.follow(deadline).await => {
                let shard = placement.of(group)?;
                let mut subscribed = subscribed.lock().unwrap_or_else(|p| p.into_inner());
                match subscribed.get_mut(group) {
                    Some(at) => {
                        *at = shard;
                        placed = shards[shard].subscribe(group);
                    }
                    // Unsubscribed meanwhile.
                    None => return Ok(()),
                }
            }
            result => return result,
        }
    }
}

/// Follows groups whose Cluster master dropped their subscription because
/// their slot moved: each still subscribed is subscribed where its slot is
/// now, then `Back` tells the box to check every group's head.
async fn follow_moved_slots(
    mut moved: mpsc::Receiver<String>,
    shards: Vec<Arc<RedisBroker>>,
    placement: Placement,
    subscribed: Arc<Mutex<HashMap<String, usize>>>,
    back: mpsc::Sender<BrokerEvent>,
) {
    while let Some(group) = moved.recv().await {
        let mut groups = vec![group];
        while let Ok(more) = moved.try_recv() {
            groups.push(more);
        }
        if let Placement::Slots(slots) = &placement {
            slots.refresh().await;
        }
        for group in groups {
            // Placed under the lock, so that an unsubscribe made meanwhile
            // comes after it on the same engine.
            let placed = {
                let mut subscribed = subscribed.lock().unwrap_or_else(|p| p.into_inner());
                match (subscribed.get_mut(&group), placement.of(&group)) {
                    (Some(at), Ok(now)) => {
                        *at = now;
                        Some(shards[now].subscribe(&group))
                    }
                    _ => None,
                }
            };
            let Some(placed) = placed else { continue };
            if let Err(err) = subscribe_placed(&shards, &placement, &subscribed, &group, placed).await {
                tracing::warn!(%err, group, "a group whose slot moved is not subscribed again yet");
            }
        }
        if back.send(BrokerEvent::Back).await.is_err() {
            return;
        }
    }
}

impl Broker for ShardedBroker {
    fn subscribe(&self, group: &str) -> BrokerFuture {
        let mut subscribed = self.subscribed.lock().unwrap_or_else(|p| p.into_inner());
        let shard = match subscribed.get(group) {
            Some(shard) => *shard,
            None => match self.placement.of(group) {
                Ok(shard) => shard,
                Err(err) => return failed(err),
            },
        };
        subscribed.insert(group.to_owned(), shard);
        drop(subscribed);
        if matches!(self.placement, Placement::Jump(_)) {
            return self.shards[shard].subscribe(group);
        }
        // The subscription command is placed now, in call order; only a
        // refusal (the slot moved) is followed afterwards.
        let first = self.shards[shard].subscribe(group);
        let (shards, placement, subscribed, group) = (
            self.shards.clone(),
            self.placement.clone(),
            self.subscribed.clone(),
            group.to_owned(),
        );
        Box::pin(async move { subscribe_placed(&shards, &placement, &subscribed, &group, first).await })
    }

    fn unsubscribe(&self, group: &str) -> BrokerFuture {
        let shard = self.subscribed.lock().unwrap_or_else(|p| p.into_inner()).remove(group);
        match shard.map_or_else(|| self.placement.of(group), Ok) {
            Ok(shard) => self.shards[shard].unsubscribe(group),
            Err(err) => failed(err),
        }
    }

    fn publish_unsaved(&self, group: &str, message: &NewMessage, except: Option<Uuid>) -> BrokerFuture {
        let first = match self.placement.of(group) {
            Ok(shard) => self.shards[shard].publish_unsaved(group, message, except),
            Err(err) => return failed(err),
        };
        if matches!(self.placement, Placement::Jump(_)) {
            return first;
        }
        // A refused SPUBLISH did not run: it is sent again where the slot is.
        let (shards, placement, group, message) = (
            self.shards.clone(),
            self.placement.clone(),
            group.to_owned(),
            message.clone(),
        );
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + REDIRECT_FOR;
            let mut result = first.await;
            while matches!(&result, Err(err) if is_redirect(err)) && placement.follow(deadline).await {
                result = shards[placement.of(&group)?]
                    .publish_unsaved(&group, &message, except)
                    .await;
            }
            result
        })
    }

    fn take_events(&self) -> Option<mpsc::Receiver<BrokerEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn connected(&self) -> bool {
        self.shards.iter().any(|b| b.connected())
    }
}

/// The chat service's directory on several shards (or the masters of a
/// Redis Cluster).
#[derive(Debug)]
pub struct ShardedDirectory {
    inner: Arc<DirectoryInner>,
    events: Mutex<Option<mpsc::Receiver<ClusterEvent>>>,
}

#[derive(Debug)]
struct DirectoryInner {
    shards: Vec<Arc<RedisDirectory>>,
    placement: Placement,
    /// Groups with members here: the engine whose directory keeps their
    /// records, and the members. On a Cluster, a group whose slot moved is
    /// handed over to the new master's directory (at its next change, and
    /// every [`crate::FLUSH_EVERY`]).
    kept: Mutex<HashMap<String, (usize, HashSet<Uuid>)>>,
}

impl DirectoryInner {
    /// The engine that keeps `group`'s records now, handing them over first
    /// when the group's Cluster slot moved.
    fn keeper(&self, kept: &mut HashMap<String, (usize, HashSet<Uuid>)>, group: &str) -> Result<usize, StoreError> {
        let now = self.placement.of(group);
        match (kept.get_mut(group), now) {
            (Some((at, _)), Ok(now)) if *at != now => {
                let members = self.shards[*at].hand_over(group);
                self.shards[now].take_over(group, members);
                *at = now;
                Ok(now)
            }
            (Some((at, _)), _) => Ok(*at),
            (None, now) => now,
        }
    }
}

/// Every [`crate::FLUSH_EVERY`], hands the records of groups whose Cluster
/// slot moved over to their new master's directory.
async fn follow_moved_records(inner: std::sync::Weak<DirectoryInner>) {
    loop {
        tokio::time::sleep(crate::FLUSH_EVERY).await;
        let Some(inner) = inner.upgrade() else { return };
        let mut kept = inner.kept.lock().unwrap_or_else(|p| p.into_inner());
        let groups: Vec<String> = kept.keys().cloned().collect();
        for group in groups {
            let _ = inner.keeper(&mut kept, &group);
        }
    }
}

impl ShardedDirectory {
    pub(crate) fn new(shards: Vec<Arc<RedisDirectory>>, placement: Placement) -> Self {
        let receivers = shards.iter().filter_map(|d| d.take_events()).collect();
        let slots = matches!(placement, Placement::Slots(_));
        let inner = Arc::new(DirectoryInner {
            shards,
            placement,
            kept: Mutex::new(HashMap::new()),
        });
        if slots {
            tokio::spawn(follow_moved_records(Arc::downgrade(&inner)));
        }
        ShardedDirectory {
            events: Mutex::new(Some(merge(receivers))),
            inner,
        }
    }

    fn of(&self, group: &str) -> Result<&RedisDirectory, StoreError> {
        Ok(&self.inner.shards[self.inner.placement.of(group)?])
    }
}

#[async_trait]
impl Directory for ShardedDirectory {
    fn changed(&self, group: &str, change: Change, member: Member) {
        let mut kept = self.inner.kept.lock().unwrap_or_else(|p| p.into_inner());
        let shard = match self.inner.keeper(&mut kept, group) {
            Ok(shard) => shard,
            Err(err) => {
                tracing::warn!(%err, group, "member change not recorded");
                return;
            }
        };
        let members = &mut kept
            .entry(group.to_owned())
            .or_insert_with(|| (shard, HashSet::new()))
            .1;
        match change {
            Change::Joined => {
                members.insert(member.channel_id);
            }
            Change::Left => {
                members.remove(&member.channel_id);
            }
        }
        if members.is_empty() {
            kept.remove(group);
        }
        // Under the lock: a hand-over cannot come between.
        self.inner.shards[shard].changed(group, change, member);
    }

    async fn connected(&self, channel: Uuid) -> Result<(), StoreError> {
        self.inner.shards[0].connected(channel).await
    }

    fn disconnected(&self, channel: Uuid) {
        self.inner.shards[0].disconnected(channel);
    }

    async fn groups(&self) -> Result<BTreeMap<String, usize>, StoreError> {
        let mut all = BTreeMap::new();
        for d in &self.inner.shards {
            for (group, n) in d.groups().await? {
                *all.entry(group).or_insert(0) += n;
            }
        }
        Ok(all)
    }

    async fn presence(&self, group: &str, max: usize) -> Result<(Vec<Member>, bool), StoreError> {
        self.of(group)?.presence(group, max).await
    }

    async fn direct(&self, to: Uuid, frame: String) -> Result<bool, StoreError> {
        self.inner.shards[0].direct(to, frame).await
    }

    async fn close_all(&self) -> Result<(), StoreError> {
        self.inner.shards[0].close_all().await
    }

    fn take_events(&self) -> Option<mpsc::Receiver<ClusterEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_appends_go_again_in_the_order_they_were_made() {
        let order = Arc::new(RetryOrder::default());
        let mut first = order.take("g");
        let mut second = order.take("g");
        let later = tokio::time::Instant::now() + Duration::from_secs(5);
        // The second is refused: it waits for the first.
        second.hold();
        let third = order.take("g");
        assert!(third.held, "an append made while one is held is held too");
        assert!(!first.held);
        let waiting = tokio::spawn(async move {
            second.turn(later).await;
            second
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the first is not settled yet");
        first.settle();
        let mut second = waiting.await.expect("turn");
        // The third waits for the second.
        let waiting = tokio::spawn(async move {
            third.turn(later).await;
            third
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        second.settle();
        drop(waiting.await.expect("turn"));
        assert!(
            order.groups.lock().expect("lock").is_empty(),
            "nothing kept once all settled"
        );
        // A dropped append settles too; settling out of order is kept.
        let a = order.take("h");
        let mut b = order.take("h");
        b.settle();
        drop(a);
        assert!(order.groups.lock().expect("lock").is_empty());
    }

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
