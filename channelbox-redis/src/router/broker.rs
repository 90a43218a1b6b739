//! [`ShardedBroker`]: pub/sub on several shards (or the masters of a Redis
//! Cluster), the shards' events merged into one queue, and a subscription
//! that follows its group's slot when it moves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use channelbox_core::{Broker, BrokerEvent, BrokerFuture, NewMessage, StoreError};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{connection_of_all, merge, Engines, Merger, Placement, REDIRECT_FOR};
use crate::link::is_redirect;
use crate::RedisBroker;

/// Pub/sub on several shards (or the masters of a Redis Cluster).
#[derive(Debug)]
pub struct ShardedBroker {
    shards: Arc<Engines<RedisBroker>>,
    placement: Placement,
    /// The engine each subscribed group is subscribed on: its unsubscribe
    /// goes there too. On a Cluster, a group whose slot moved is subscribed
    /// again on the new master (see `follow_moved_slots`).
    subscribed: Arc<Mutex<HashMap<String, usize>>>,
    events: Mutex<Option<mpsc::Receiver<BrokerEvent>>>,
    /// Forwards each engine's events into `events`.
    merged: Merger<BrokerEvent>,
    /// Forwards each engine's groups whose slot moved to `follow_moved_slots`.
    moved: Merger<String>,
    /// Sends [`WAITING`] to `follow_moved_slots`.
    waiting: mpsc::Sender<String>,
}

/// The merged events' shard number of the `Back` of `follow_moved_slots`.
const FOLLOWER: usize = usize::MAX;
/// The engine recorded for a group subscribed while its Cluster master's
/// engine was being made (or whose subscription could not follow its slot
/// in time), until it is placed.
const NOT_PLACED: usize = usize::MAX;
/// Not a group name (those are never empty): asks `follow_moved_slots` to
/// place every group recorded [`NOT_PLACED`].
const WAITING: &str = "";

impl ShardedBroker {
    pub(crate) fn new(shards: Vec<Arc<RedisBroker>>, placement: Placement) -> Self {
        let receivers: Vec<_> = shards.iter().filter_map(|b| b.take_events()).collect();
        let mut connections = connection_of_all(receivers.len());
        let pass = move |shard: usize, event: &BrokerEvent| shard == FOLLOWER || connections(shard, event);
        let (merged, events) = Merger::new(receivers, pass);
        // `Back` after a group whose Cluster slot moved is subscribed where
        // the slot is now: the box then checks every group's head, which
        // finds what was published while the group was not subscribed.
        let (back_tx, back_rx) = mpsc::channel(1);
        merged.add(FOLLOWER, back_rx);
        let (moved, moved_rx) = merge(shards.iter().filter_map(|b| b.take_moved()).collect());
        let (waiting, waiting_rx) = mpsc::channel(1);
        moved.add(FOLLOWER, waiting_rx);
        let broker = ShardedBroker {
            events: Mutex::new(Some(events)),
            shards: Engines::new(shards),
            placement,
            subscribed: Arc::new(Mutex::new(HashMap::new())),
            merged,
            moved,
            waiting,
        };
        if matches!(broker.placement, Placement::Slots(_)) {
            tokio::spawn(follow_moved_slots(
                moved_rx,
                broker.shards.clone(),
                broker.placement.clone(),
                broker.subscribed.clone(),
                back_tx,
            ));
        }
        broker
    }

    /// Places the groups that waited for a Cluster master's engine (see
    /// [`NOT_PLACED`]); nothing when none did.
    pub(crate) fn place_waiting(&self) {
        // Full: a request is pending already.
        let _ = self.waiting.try_send(WAITING.to_owned());
    }

    /// Adds the broker of a Cluster master added after start (see
    /// `cluster`): its events join the others.
    pub(crate) fn add(&self, broker: Arc<RedisBroker>) -> usize {
        let (events, moved) = (broker.take_events(), broker.take_moved());
        let shard = self.shards.push(broker);
        if let Some(events) = events {
            self.merged.add(shard, events);
        }
        if let Some(moved) = moved {
            self.moved.add(shard, moved);
        }
        shard
    }
}

fn failed(err: StoreError) -> BrokerFuture {
    Box::pin(async move { Err(err) })
}

/// Waits for a subscription `placed` on a group's engine `tried` (as
/// recorded in `subscribed`; [`NOT_PLACED`] while its master's engine is
/// being made); when that engine's node refuses it (the slot moved), places
/// it again where the slot is now — under the lock, so that an unsubscribe
/// made meanwhile comes after it on the same engine — and records where. A
/// subscription that fails is recorded [`NOT_PLACED`], to be placed again
/// (`place_waiting`, or the group's next subscribe) — unless the group was
/// unsubscribed or subscribed anew meanwhile, which this leaves alone.
async fn subscribe_placed(
    shards: &Engines<RedisBroker>,
    placement: &Placement,
    subscribed: &Mutex<HashMap<String, usize>>,
    group: &str,
    mut tried: usize,
    mut placed: BrokerFuture,
) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + REDIRECT_FOR;
    loop {
        match placed.await {
            Err(err) if is_redirect(&err) && placement.follow(deadline).await => {
                let shard = match placement.of(group) {
                    Ok(shard) => shard,
                    // Its new master's engine is being made: waits on.
                    Err(err) if is_redirect(&err) => {
                        placed = failed(err);
                        continue;
                    }
                    Err(err) => return Err(err),
                };
                let mut subscribed = subscribed.lock().unwrap_or_else(|p| p.into_inner());
                match subscribed.get_mut(group) {
                    Some(at) if *at == tried => {
                        *at = shard;
                        tried = shard;
                        placed = shards.get(shard)?.subscribe(group);
                    }
                    // Unsubscribed, or subscribed anew, meanwhile.
                    _ => return Ok(()),
                }
            }
            result => {
                if result.is_err() {
                    let mut subscribed = subscribed.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(at) = subscribed.get_mut(group).filter(|at| **at == tried) {
                        *at = NOT_PLACED;
                    }
                }
                return result;
            }
        }
    }
}

/// Follows groups whose Cluster master dropped their subscription because
/// their slot moved: each still subscribed is subscribed where its slot is
/// now, then `Back` tells the box to check every group's head.
async fn follow_moved_slots(
    mut moved: mpsc::Receiver<String>,
    shards: Arc<Engines<RedisBroker>>,
    placement: Placement,
    subscribed: Arc<Mutex<HashMap<String, usize>>>,
    back: mpsc::Sender<BrokerEvent>,
) {
    while let Some(group) = moved.recv().await {
        let mut groups = vec![group];
        while let Ok(more) = moved.try_recv() {
            groups.push(more);
        }
        if groups.iter().any(|g| g == WAITING) {
            groups.retain(|g| g != WAITING);
            // Only those that can be placed now: the others would hold up
            // this task for a redirect's wait each, every poll.
            let subscribed = subscribed.lock().unwrap_or_else(|p| p.into_inner());
            let waiting = subscribed
                .iter()
                .filter(|(g, at)| **at == NOT_PLACED && placement.of(g).is_ok());
            groups.extend(waiting.map(|(g, _)| g.clone()));
        }
        if groups.is_empty() {
            continue;
        }
        if let Placement::Slots(slots) = &placement {
            slots.refresh().await;
        }
        let mut resubscribed = false;
        for group in groups {
            // Placed under the lock, so that an unsubscribe made meanwhile
            // comes after it on the same engine.
            let placed = {
                let mut subscribed = subscribed.lock().unwrap_or_else(|p| p.into_inner());
                match (subscribed.get_mut(&group), placement.of(&group)) {
                    (Some(at), Ok(now)) => {
                        *at = now;
                        Some((now, shards.get(now).map_or_else(failed, |b| b.subscribe(&group))))
                    }
                    // Its new master's engine is being made: placed once it is.
                    (Some(at), Err(err)) if is_redirect(&err) => {
                        *at = NOT_PLACED;
                        Some((NOT_PLACED, failed(err)))
                    }
                    _ => None,
                }
            };
            let Some((tried, placed)) = placed else { continue };
            match subscribe_placed(&shards, &placement, &subscribed, &group, tried, placed).await {
                Ok(()) => resubscribed = true,
                Err(err) => tracing::warn!(%err, group, "a group whose slot moved is not subscribed again yet"),
            }
        }
        // Nothing subscribed again: nothing new to look up (a group that is
        // subscribed later sends its `Back` then).
        if !resubscribed {
            continue;
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
            Some(shard) if *shard != NOT_PLACED => Ok(*shard),
            _ => self.placement.of(group),
        };
        let (tried, first) = match shard.and_then(|s| Ok((s, self.shards.get(s)?))) {
            Ok((shard, broker)) => {
                subscribed.insert(group.to_owned(), shard);
                (shard, broker.subscribe(group))
            }
            // Its master's engine is being made: placed once it is.
            Err(err) if is_redirect(&err) => {
                subscribed.insert(group.to_owned(), NOT_PLACED);
                (NOT_PLACED, failed(err))
            }
            Err(err) => return failed(err),
        };
        drop(subscribed);
        if matches!(self.placement, Placement::Jump(_)) {
            return first;
        }
        // The subscription command is placed now, in call order; only a
        // refusal (the slot moved) is followed afterwards.
        let (shards, placement, subscribed, group) = (
            self.shards.clone(),
            self.placement.clone(),
            self.subscribed.clone(),
            group.to_owned(),
        );
        Box::pin(async move { subscribe_placed(&shards, &placement, &subscribed, &group, tried, first).await })
    }

    fn unsubscribe(&self, group: &str) -> BrokerFuture {
        let shard = self.subscribed.lock().unwrap_or_else(|p| p.into_inner()).remove(group);
        if shard == Some(NOT_PLACED) {
            return Box::pin(async { Ok(()) });
        }
        match shard
            .map_or_else(|| self.placement.of(group), Ok)
            .and_then(|s| self.shards.get(s))
        {
            Ok(broker) => broker.unsubscribe(group),
            Err(err) => failed(err),
        }
    }

    fn publish_unsaved(&self, group: &str, message: &NewMessage, except: Option<Uuid>) -> BrokerFuture {
        let first = match self.placement.of(group).and_then(|s| self.shards.get(s)) {
            Ok(broker) => broker.publish_unsaved(group, message, except),
            // A Cluster's redirect is followed below.
            Err(err) => failed(err),
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
                result = shards
                    .get(placement.settled(&group, deadline).await?)?
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
        self.shards.read().iter().any(|b| b.connected())
    }
}
