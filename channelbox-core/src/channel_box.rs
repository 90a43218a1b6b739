//! [`ChannelBox`]: channels, groups, fan-out, history and recovery.
//!
//! Locks, and why no broadcast waits on them for long:
//! - `state` (one mutex) holds the channel registry and the map of groups. It is
//!   taken for membership changes only, never while delivering.
//! - Each group's `members` mutex guards its member map and a cached snapshot
//!   (`Arc<[Channel]>`). A broadcast clones the snapshot and lets go at once.
//! - Each group's `order` mutex keeps deliveries in offset order. It is held
//!   while frames are pushed into members' queues, which never waits
//!   ([`Channel::try_send`]), and never across an `.await`.
//!
//! Lock order: `order` → `state` → `members`. Nothing takes `order` while
//! holding another of them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::channel::{Channel, CloseReason, OverflowPolicy, SendError};
use crate::envelope::{Envelope, MessageRef, PlainEnvelope, Rendered};
use crate::error::{BoxError, StoreError};
use crate::history::{Head, HistoryPage, HistoryStore, NewMessage, PendingAppend, ReadQuery, StoredMessage};
use crate::payload::{plain_frame, Frame, Payload};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent before anything that
    // could panic, so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What `add_channel_to_group` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddStatus {
    /// The group did not exist; it was created with this channel as its first member.
    GroupCreated,
    /// The channel joined an existing group.
    Added,
    /// The channel was already a member; nothing changed.
    AlreadyMember,
}

/// What `remove_channel_from_group` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveStatus {
    /// The channel left the group; other members remain.
    Removed,
    /// The channel left and was the last member, so the group is gone.
    GroupDeleted,
    /// The channel was not a member of that group.
    NotMember,
}

/// Who got a frame.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Members whose queue accepted the frame.
    pub delivered: usize,
    /// Members whose queue was full (they are closed as slow consumers, or had
    /// older frames dropped, depending on their overflow policy).
    pub overflowed: Vec<Uuid>,
    /// Members that were already closed.
    pub closed: Vec<Uuid>,
}

impl DeliveryReport {
    fn record(&mut self, channel: &Channel, result: Result<crate::channel::Enqueued, SendError>) {
        // The id is read only when needed: it lives outside the cache line a
        // broadcast's push touches.
        match result {
            Ok(e) if e.dropped == 0 => self.delivered += 1,
            Ok(_) => {
                self.delivered += 1;
                self.overflowed.push(channel.id());
            }
            Err(SendError::Overflow) => self.overflowed.push(channel.id()),
            Err(SendError::Closed) => self.closed.push(channel.id()),
        }
    }
}

/// The result of a publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishReport {
    /// The message's offset, when it was saved to history.
    pub offset: Option<u64>,
    /// The group's epoch, when it was saved to history.
    pub epoch: Option<String>,
    /// Who got it.
    pub delivery: DeliveryReport,
}

/// What to replay to a channel that subscribes to a group.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Replay {
    /// Nothing: only live messages.
    #[default]
    None,
    /// The newest `n` saved messages.
    Last(usize),
    /// Recovery: everything after `offset` in `epoch`, if history still has it.
    Since {
        /// The epoch the client saw.
        epoch: String,
        /// The last offset the client saw.
        offset: u64,
    },
}

/// The outcome of a recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The offset the client asked to recover after.
    pub from: u64,
    /// The last replayed offset (`from` when nothing was replayed).
    pub to: u64,
    /// Whether the client now has every message of the group with no gap.
    pub complete: bool,
    /// How many messages were replayed.
    pub replayed: usize,
}

/// Where a subscription starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeStart {
    /// The group's epoch.
    pub epoch: String,
    /// The newest offset that will not be delivered live (0 if none): the channel
    /// receives live every saved message above it.
    pub offset: u64,
}

/// Frames a transport wants around a subscription's replay; see
/// [`ChannelBox::subscribe`].
pub trait SubscribeFraming: Sync {
    /// The first frame, queued before any replayed or live message.
    fn before(&self, start: &SubscribeStart) -> Option<Frame> {
        let _ = start;
        None
    }

    /// Queued after a recovery's replay, before any live message.
    fn after_recovery(&self, recovery: &Recovery) -> Option<Frame> {
        let _ = recovery;
        None
    }
}

/// No frames around a subscription.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoFraming;

impl SubscribeFraming for NoFraming {}

/// What [`ChannelBox::subscribe`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribed {
    /// The membership change.
    pub status: AddStatus,
    /// Where live delivery starts.
    pub start: SubscribeStart,
    /// How many saved messages were replayed.
    pub replayed: usize,
    /// The recovery outcome, for [`Replay::Since`].
    pub recovery: Option<Recovery>,
}

/// Counters over the life of a [`ChannelBox`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoxStats {
    /// Open channels registered.
    pub channels: usize,
    /// Groups with at least one member.
    pub groups: usize,
    /// Messages published with `group_send` / `publish`.
    pub published: u64,
    /// Message frames handed to members' queues by broadcasts (not replays).
    pub delivered: u64,
    /// Frames refused or dropped by full queues.
    pub overflows: u64,
    /// Channels closed as slow consumers.
    pub slow_consumer_closes: u64,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    delivered: AtomicU64,
    overflows: AtomicU64,
    slow_consumer_closes: AtomicU64,
}

impl Counters {
    fn count(&self, channel: &Channel, report: &DeliveryReport) {
        self.delivered.fetch_add(report.delivered as u64, Ordering::Relaxed);
        let overflowed = report.overflowed.len() as u64;
        if overflowed > 0 {
            self.overflows.fetch_add(overflowed, Ordering::Relaxed);
            if channel.config().overflow == OverflowPolicy::Disconnect {
                self.slow_consumer_closes.fetch_add(overflowed, Ordering::Relaxed);
            }
        }
    }
}

/// A registered channel and the groups it is in.
struct Registered {
    channel: Channel,
    groups: Vec<Arc<str>>,
}

#[derive(Default)]
struct State {
    channels: HashMap<Uuid, Registered>,
    groups: HashMap<Arc<str>, Arc<Group>>,
}

struct Members {
    map: HashMap<Uuid, Channel>,
    /// Members whose live frames are held back while their replay is read.
    gated: HashMap<Uuid, Vec<Frame>>,
    /// The live members, rebuilt lazily after a change.
    snapshot: Option<Arc<[Channel]>>,
}

/// Delivers saved messages in offset order: a message that became durable
/// before an earlier one waits here for it.
struct Sequencer {
    epoch: String,
    /// The next offset to deliver; everything below it was delivered.
    next: u64,
    pending: BTreeMap<u64, Option<Ready>>,
}

/// A saved message ready for delivery, and where its publisher waits for the report.
struct Ready {
    message: NewMessage,
    offset: u64,
    report: oneshot::Sender<DeliveryReport>,
}

struct Group {
    name: Arc<str>,
    members: Mutex<Members>,
    order: Mutex<Option<Sequencer>>,
    /// Publishes started and not yet finished. A group stays in the map while it
    /// has members or publishes in flight, so that every publish and every
    /// subscriber of a name meet in the same sequencer.
    in_flight: AtomicU64,
}

impl Group {
    fn new(name: Arc<str>) -> Self {
        Group {
            name,
            members: Mutex::new(Members {
                map: HashMap::new(),
                gated: HashMap::new(),
                snapshot: None,
            }),
            order: Mutex::new(None),
            in_flight: AtomicU64::new(0),
        }
    }

    fn is_unused(&self, members: &Members) -> bool {
        members.map.is_empty() && self.in_flight.load(Ordering::Acquire) == 0
    }

    fn snapshot(&self) -> Arc<[Channel]> {
        let mut m = lock(&self.members);
        if let Some(s) = &m.snapshot {
            return s.clone();
        }
        let live: Arc<[Channel]> = m
            .map
            .iter()
            .filter(|(id, _)| !m.gated.contains_key(id))
            .map(|(_, c)| c.clone())
            .collect();
        m.snapshot = Some(live.clone());
        live
    }
}

struct Inner {
    store: Arc<dyn HistoryStore>,
    envelope: Arc<dyn Envelope>,
    state: Mutex<State>,
    counters: Counters,
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

/// A publish whose offset is assigned and whose delivery is still to come; see
/// [`ChannelBox::start_publish`]. Dropping it unfinished skips its delivery but
/// never stalls later messages of the group.
#[must_use = "a publish is delivered only when `finish` is awaited"]
pub struct PendingPublish {
    inner: Option<PendingInner>,
}

struct PendingInner {
    channels: ChannelBox,
    group: Arc<Group>,
    offset: Option<u64>,
    epoch: Option<String>,
    message: NewMessage,
    durable: Option<crate::history::DurableFuture>,
}

impl std::fmt::Debug for PendingPublish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("PendingPublish");
        if let Some(p) = &self.inner {
            d.field("group", &p.group.name).field("offset", &p.offset);
        }
        d.finish_non_exhaustive()
    }
}

impl PendingPublish {
    /// The offset assigned to the message, if it is saved.
    pub fn offset(&self) -> Option<u64> {
        self.inner.as_ref().and_then(|p| p.offset)
    }

    /// The group's epoch, if the message is saved.
    pub fn epoch(&self) -> Option<&str> {
        self.inner.as_ref().and_then(|p| p.epoch.as_deref())
    }

    /// Waits until the message is durable, then delivers it to the group's
    /// members in offset order.
    pub async fn finish(mut self) -> Result<PublishReport, BoxError> {
        let Some(mut p) = self.inner.take() else {
            return Err(BoxError::Store(StoreError::new(
                crate::error::StoreErrorKind::Closed,
                "publish already finished",
            )));
        };
        let (Some(offset), Some(epoch)) = (p.offset, p.epoch.clone()) else {
            let delivery = p.channels.deliver_unsaved(&p.group, &p.message);
            p.channels.release_group(&p.group);
            return Ok(PublishReport {
                offset: None,
                epoch: None,
                delivery,
            });
        };
        let durable = p.durable.take();
        let result = match durable {
            Some(fut) => fut.await,
            None => Ok(()),
        };
        if let Err(err) = result {
            p.channels.complete(&p.group, &epoch, offset, None);
            p.channels.release_group(&p.group);
            return Err(err.into());
        }
        let (tx, rx) = oneshot::channel();
        let ready = Ready {
            message: p.message,
            offset,
            report: tx,
        };
        p.channels.complete(&p.group, &epoch, offset, Some(ready));
        p.channels.release_group(&p.group);
        // The report was sent by whoever delivered the message: this task, or
        // the one that completed the offset just before it.
        let delivery = rx.await.unwrap_or_default();
        Ok(PublishReport {
            offset: Some(offset),
            epoch: Some(epoch),
            delivery,
        })
    }
}

impl Drop for PendingPublish {
    fn drop(&mut self) {
        if let Some(p) = self.inner.take() {
            if let (Some(offset), Some(epoch)) = (p.offset, &p.epoch) {
                p.channels.complete(&p.group, epoch, offset, None);
            }
            p.channels.release_group(&p.group);
        }
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
            }),
        }
    }

    /// The history store.
    pub fn store(&self) -> &Arc<dyn HistoryStore> {
        &self.inner.store
    }

    /// Registers a channel so that `send_to` finds it, and so that it leaves every
    /// group by itself when it closes. Joining a group registers too.
    pub fn register(&self, channel: &Channel) -> Result<(), BoxError> {
        let mut state = lock(&self.inner.state);
        self.register_locked(&mut state, channel)
    }

    fn register_locked(&self, state: &mut State, channel: &Channel) -> Result<(), BoxError> {
        if state.channels.contains_key(&channel.id()) {
            return Ok(());
        }
        if channel.is_closed() {
            return Err(BoxError::ChannelClosed(channel.id()));
        }
        state.channels.insert(
            channel.id(),
            Registered {
                channel: channel.clone(),
                groups: Vec::new(),
            },
        );
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        // The hook runs on the writer task when the channel has closed. It holds
        // only a weak reference, so a dropped box is not kept alive by channels.
        channel.on_close(move |ch| {
            if let Some(inner) = weak.upgrade() {
                ChannelBox { inner }.forget(ch.id());
            }
        });
        Ok(())
    }

    /// Removes a channel from every group and from the registry (it stays open).
    /// Returns whether it was registered.
    pub fn forget(&self, id: Uuid) -> bool {
        let mut state = lock(&self.inner.state);
        let Some(reg) = state.channels.remove(&id) else {
            return false;
        };
        for name in reg.groups {
            Self::leave_locked(&mut state, &name, id);
        }
        true
    }

    /// Adds a channel to a group, creating the group if needed.
    pub async fn add_channel_to_group(&self, channel: &Channel, group: &str) -> Result<AddStatus, BoxError> {
        self.join(channel, group, false).map(|(status, _)| status)
    }

    /// Adds a channel to a group. With `gated`, its live frames are held back
    /// until [`ChannelBox::open_gate`].
    fn join(&self, channel: &Channel, group: &str, gated: bool) -> Result<(AddStatus, Arc<Group>), BoxError> {
        if group.is_empty() {
            return Err(BoxError::InvalidGroup(group.to_owned()));
        }
        let mut state = lock(&self.inner.state);
        self.register_locked(&mut state, channel)?;
        let (created, g) = match state.groups.get(group) {
            Some(g) => (lock(&g.members).map.is_empty(), g.clone()),
            None => {
                let name: Arc<str> = Arc::from(group);
                let g = Arc::new(Group::new(name.clone()));
                state.groups.insert(name, g.clone());
                (true, g)
            }
        };
        let mut members = lock(&g.members);
        if members.map.contains_key(&channel.id()) {
            // A member already receives live messages: holding them back now
            // could only lose some.
            return Ok((AddStatus::AlreadyMember, g.clone()));
        }
        if gated {
            members.gated.insert(channel.id(), Vec::new());
        }
        members.map.insert(channel.id(), channel.clone());
        members.snapshot = None;
        drop(members);
        if let Some(reg) = state.channels.get_mut(&channel.id()) {
            reg.groups.push(g.name.clone());
        }
        let status = if created {
            AddStatus::GroupCreated
        } else {
            AddStatus::Added
        };
        Ok((status, g))
    }

    /// Removes a channel from a group; the group disappears with its last member.
    pub async fn remove_channel_from_group(&self, channel: &Channel, group: &str) -> Result<RemoveStatus, BoxError> {
        self.remove_id_from_group(channel.id(), group)
    }

    /// Like `remove_channel_from_group`, by channel id.
    pub fn remove_id_from_group(&self, id: Uuid, group: &str) -> Result<RemoveStatus, BoxError> {
        let mut state = lock(&self.inner.state);
        if state.groups.get(group).is_none_or(|g| lock(&g.members).map.is_empty()) {
            return Err(BoxError::NoSuchGroup(group.to_owned()));
        }
        let status = Self::leave_locked(&mut state, group, id);
        if status != RemoveStatus::NotMember {
            if let Some(reg) = state.channels.get_mut(&id) {
                reg.groups.retain(|g| &**g != group);
            }
        }
        Ok(status)
    }

    fn leave_locked(state: &mut State, group: &str, id: Uuid) -> RemoveStatus {
        let Some(g) = state.groups.get(group) else {
            return RemoveStatus::NotMember;
        };
        let mut members = lock(&g.members);
        if members.map.remove(&id).is_none() {
            return RemoveStatus::NotMember;
        }
        members.gated.remove(&id);
        members.snapshot = None;
        let empty = members.map.is_empty();
        let unused = g.is_unused(&members);
        drop(members);
        if unused {
            state.groups.remove(group);
        }
        if empty {
            RemoveStatus::GroupDeleted
        } else {
            RemoveStatus::Removed
        }
    }

    /// Every group with its number of members.
    pub async fn show_groups(&self) -> BTreeMap<String, usize> {
        self.groups()
    }

    /// Like `show_groups`, without `.await`.
    pub fn groups(&self) -> BTreeMap<String, usize> {
        let state = lock(&self.inner.state);
        state
            .groups
            .iter()
            .map(|(name, g)| (name.to_string(), lock(&g.members).map.len()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The ids of a group's members.
    pub fn members(&self, group: &str) -> Result<Vec<Uuid>, BoxError> {
        let state = lock(&self.inner.state);
        let ids: Vec<Uuid> = state
            .groups
            .get(group)
            .map(|g| lock(&g.members).map.keys().copied().collect())
            .unwrap_or_default();
        if ids.is_empty() {
            return Err(BoxError::NoSuchGroup(group.to_owned()));
        }
        Ok(ids)
    }

    /// The groups a channel is in.
    pub fn groups_of(&self, id: Uuid) -> Result<Vec<String>, BoxError> {
        let state = lock(&self.inner.state);
        let reg = state.channels.get(&id).ok_or(BoxError::NoSuchChannel(id))?;
        Ok(reg.groups.iter().map(|g| g.to_string()).collect())
    }

    /// The registered channel with this id.
    pub fn channel(&self, id: Uuid) -> Option<Channel> {
        lock(&self.inner.state).channels.get(&id).map(|r| r.channel.clone())
    }

    /// Whether a channel is a member of a group.
    pub fn is_member(&self, id: Uuid, group: &str) -> bool {
        let state = lock(&self.inner.state);
        state
            .groups
            .get(group)
            .is_some_and(|g| lock(&g.members).map.contains_key(&id))
    }

    /// Broadcasts a payload to every member of a group, saving it to history
    /// first when `save_history` is set (Nexios's `group_send`).
    pub async fn group_send(
        &self,
        group: &str,
        payload: impl Into<Payload>,
        save_history: bool,
    ) -> Result<PublishReport, BoxError> {
        let (kind, bytes) = payload.into().encode();
        self.publish(group, NewMessage::new(kind, bytes), save_history).await
    }

    /// Broadcasts a message (with metadata and timestamp) to a group.
    pub async fn publish(
        &self,
        group: &str,
        message: NewMessage,
        save_history: bool,
    ) -> Result<PublishReport, BoxError> {
        self.start_publish(group, message, save_history)?.finish().await
    }

    /// Assigns the message its offset now (when saved), in call order, and
    /// returns the rest of the publish: awaiting durability and delivering. A
    /// connection that calls this for each of its publishes in turn gets offsets
    /// in its order while many of its publishes wait for the disk together.
    pub fn start_publish(
        &self,
        group: &str,
        message: NewMessage,
        save_history: bool,
    ) -> Result<PendingPublish, BoxError> {
        if group.is_empty() {
            return Err(BoxError::InvalidGroup(group.to_owned()));
        }
        let g = self.acquire_group(group);
        let appended = if save_history {
            // Appending under the order lock ties offset assignment to the
            // sequencer: the first append through this group object starts it.
            let mut order = lock(&g.order);
            match self.inner.store.append(group, message.clone()) {
                Ok(pending) => {
                    let fresh = order.as_ref().is_none_or(|s| s.epoch != pending.epoch);
                    if fresh {
                        *order = Some(Sequencer {
                            epoch: pending.epoch.clone(),
                            next: pending.offset,
                            pending: BTreeMap::new(),
                        });
                    }
                    Ok(pending)
                }
                Err(err) => Err(err),
            }
        } else {
            Ok(PendingAppend::ready(0, String::new()))
        };
        let pending = match appended {
            Ok(p) => p,
            Err(err) => {
                self.release_group(&g);
                return Err(err.into());
            }
        };
        self.inner.counters.published.fetch_add(1, Ordering::Relaxed);
        let (offset, epoch, durable) = if save_history {
            (Some(pending.offset), Some(pending.epoch), Some(pending.durable))
        } else {
            (None, None, None)
        };
        Ok(PendingPublish {
            inner: Some(PendingInner {
                channels: self.clone(),
                group: g,
                offset,
                epoch,
                message,
                durable,
            }),
        })
    }

    /// The group a publish goes through, kept in the map until the publish ends.
    fn acquire_group(&self, group: &str) -> Arc<Group> {
        let mut state = lock(&self.inner.state);
        let g = state
            .groups
            .entry(Arc::from(group))
            .or_insert_with_key(|name| Arc::new(Group::new(name.clone())))
            .clone();
        g.in_flight.fetch_add(1, Ordering::AcqRel);
        g
    }

    /// Ends a publish's hold on its group; an unused group leaves the map.
    fn release_group(&self, g: &Arc<Group>) {
        let mut state = lock(&self.inner.state);
        g.in_flight.fetch_sub(1, Ordering::AcqRel);
        let unused = g.is_unused(&lock(&g.members));
        if unused && state.groups.get(&g.name).is_some_and(|cur| Arc::ptr_eq(cur, g)) {
            state.groups.remove(&g.name);
        }
    }

    /// Marks `offset` of `group` complete and delivers every message that is now
    /// in order. `ready` is `None` when the append failed or was abandoned.
    fn complete(&self, g: &Arc<Group>, epoch: &str, offset: u64, ready: Option<Ready>) {
        let mut order = lock(&g.order);
        let seq = match order.as_mut() {
            Some(seq) if seq.epoch == epoch => seq,
            _ => {
                // A message of an epoch that was flushed meanwhile: deliver it
                // without holding up the new epoch.
                if let Some(r) = ready {
                    self.deliver_ready(g, epoch, r);
                }
                return;
            }
        };
        if offset < seq.next {
            // Already covered: a subscriber that arrived since read it from history.
            if let Some(r) = ready {
                let _ = r.report.send(DeliveryReport::default());
            }
            return;
        }
        seq.pending.insert(offset, ready);
        while let Some(entry) = seq.pending.first_entry() {
            if *entry.key() != seq.next {
                break;
            }
            let item = entry.remove();
            seq.next += 1;
            if let Some(r) = item {
                let epoch = seq.epoch.clone();
                self.deliver_ready(g, &epoch, r);
            }
        }
    }

    fn deliver_ready(&self, g: &Group, epoch: &str, r: Ready) {
        let msg = MessageRef {
            group: &g.name,
            epoch,
            offset: Some(r.offset),
            kind: r.message.kind,
            payload: &r.message.payload,
            meta: &r.message.meta,
            timestamp_ms: r.message.timestamp_ms,
        };
        let report = self.deliver(g, msg);
        let _ = r.report.send(report);
    }

    fn deliver_unsaved(&self, g: &Arc<Group>, message: &NewMessage) -> DeliveryReport {
        // Taken so that a subscriber's gate opens either before or after this
        // message, never halfway through it.
        let order = lock(&g.order);
        let epoch = order.as_ref().map(|s| s.epoch.clone()).unwrap_or_default();
        let msg = MessageRef {
            group: &g.name,
            epoch: &epoch,
            offset: None,
            kind: message.kind,
            payload: &message.payload,
            meta: &message.meta,
            timestamp_ms: message.timestamp_ms,
        };
        let report = self.deliver(g, msg);
        drop(order);
        report
    }

    /// Pushes one message into every live member's queue, and into the held-back
    /// buffers of members whose replay is still being read. Called with the
    /// group's `order` lock held; never waits.
    fn deliver(&self, g: &Group, msg: MessageRef<'_>) -> DeliveryReport {
        let members = g.snapshot();
        let mut rendered = Rendered::new(&*self.inner.envelope, msg);
        let mut report = DeliveryReport::default();
        // Slow consumers leave every group at once, not when their socket
        // finally gives up: nothing more is rendered or pushed for them.
        let mut slow = Vec::new();
        for ch in members.iter() {
            let before = report.overflowed.len();
            report.record(ch, ch.try_send_with(|to| rendered.frame(to)));
            if report.overflowed.len() > before {
                self.inner.counters.count(
                    ch,
                    &DeliveryReport {
                        overflowed: vec![ch.id()],
                        ..Default::default()
                    },
                );
                if ch.is_closed() {
                    slow.push(ch.id());
                }
            }
        }
        let mut m = lock(&g.members);
        if !m.gated.is_empty() {
            let Members { map, gated, .. } = &mut *m;
            for (id, held) in gated.iter_mut() {
                let Some(ch) = map.get(id) else { continue };
                // Half the queue: the gate opens into a queue at most half full
                // (see `subscribe`), so what is held always fits.
                if held.len() >= ch.config().max_queue_frames / 2 {
                    ch.close(CloseReason::SLOW_CONSUMER);
                    report.overflowed.push(*id);
                    self.inner.counters.count(
                        ch,
                        &DeliveryReport {
                            overflowed: vec![*id],
                            ..Default::default()
                        },
                    );
                    slow.push(*id);
                    continue;
                }
                held.push(rendered.frame(ch.payload_type()));
                report.delivered += 1;
            }
        }
        drop(m);
        // Lock order: `order` (held by the caller) → `state` → `members`.
        for id in slow {
            self.forget(id);
        }
        self.inner
            .counters
            .delivered
            .fetch_add(report.delivered as u64, Ordering::Relaxed);
        report
    }

    /// Sends a payload to one channel by id (Nexios's `send_to`).
    pub async fn send_to(&self, id: Uuid, payload: impl Into<Payload>) -> Result<DeliveryReport, BoxError> {
        let channel = self.channel(id).ok_or(BoxError::NoSuchChannel(id))?;
        let (kind, bytes) = payload.into().encode();
        let frame = plain_frame(kind, &bytes, channel.payload_type());
        Ok(self.send_frame(&channel, frame))
    }

    /// Sends an encoded frame to a channel with the box's accounting: an
    /// overflow is counted and a slow consumer leaves its groups at once.
    pub fn send_frame_to_channel(&self, channel: &Channel, frame: Frame) -> DeliveryReport {
        self.send_frame(channel, frame)
    }

    /// Sends an encoded frame to one channel by id.
    pub fn send_frame_to(&self, id: Uuid, frame: Frame) -> Result<DeliveryReport, BoxError> {
        let channel = self.channel(id).ok_or(BoxError::NoSuchChannel(id))?;
        Ok(self.send_frame(&channel, frame))
    }

    fn send_frame(&self, channel: &Channel, frame: Frame) -> DeliveryReport {
        let mut report = DeliveryReport::default();
        report.record(channel, channel.try_send(frame));
        if !report.overflowed.is_empty() {
            self.inner.counters.count(
                channel,
                &DeliveryReport {
                    overflowed: report.overflowed.clone(),
                    ..Default::default()
                },
            );
            if channel.is_closed() {
                self.forget(channel.id());
            }
        }
        report
    }

    /// Reads a group's history.
    pub async fn show_history(&self, group: &str, query: ReadQuery) -> Result<HistoryPage, BoxError> {
        Ok(self.inner.store.read(group, query).await?)
    }

    /// Flushes history: one group's, or every group's when `group` is `None`.
    /// Each flushed group gets a new epoch and its offsets restart at 1.
    pub async fn flush_history(&self, group: Option<&str>) -> Result<(), BoxError> {
        match group {
            Some(name) => {
                let epoch = self.inner.store.flush_group(name).await?;
                self.reset_order(name, Some(epoch));
            }
            None => {
                self.inner.store.flush_all().await?;
                let names: Vec<Arc<str>> = lock(&self.inner.state).groups.keys().cloned().collect();
                for name in names {
                    self.reset_order(&name, None);
                }
            }
        }
        Ok(())
    }

    fn reset_order(&self, group: &str, epoch: Option<String>) {
        let g = lock(&self.inner.state).groups.get(group).cloned();
        if let Some(g) = g {
            let mut order = lock(&g.order);
            // Undelivered messages of the old epoch are gone with it. A publish
            // may already have started the new epoch; then it stands.
            let started = match (&*order, &epoch) {
                (Some(seq), Some(e)) => seq.epoch == *e,
                _ => false,
            };
            if !started {
                *order = epoch.map(|epoch| Sequencer {
                    epoch,
                    next: 1,
                    pending: BTreeMap::new(),
                });
            }
        }
    }

    /// Removes every channel from every group (the channels stay open).
    pub async fn flush_groups(&self) {
        let mut state = lock(&self.inner.state);
        state.groups.clear();
        for reg in state.channels.values_mut() {
            reg.groups.clear();
        }
    }

    /// Closes every registered channel with code 1001; returns how many.
    pub async fn close_all_connections(&self) -> usize {
        self.close_all(CloseReason::GOING_AWAY)
    }

    /// Closes every registered channel with this reason; returns how many.
    pub fn close_all(&self, reason: CloseReason) -> usize {
        let channels: Vec<Channel> = lock(&self.inner.state)
            .channels
            .values()
            .map(|r| r.channel.clone())
            .collect();
        for ch in &channels {
            ch.close(reason.clone());
        }
        channels.len()
    }

    /// Counters and sizes.
    pub fn stats(&self) -> BoxStats {
        let (channels, groups) = {
            let state = lock(&self.inner.state);
            (state.channels.len(), state.groups.len())
        };
        let c = &self.inner.counters;
        BoxStats {
            channels,
            groups,
            published: c.published.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
            overflows: c.overflows.load(Ordering::Relaxed),
            slow_consumer_closes: c.slow_consumer_closes.load(Ordering::Relaxed),
        }
    }

    /// What a client that saw `epoch` up to `since` missed, and whether that is
    /// complete (false when the epoch differs or messages after `since` were
    /// trimmed). Reads at most `limit` messages.
    pub async fn recover(
        &self,
        group: &str,
        epoch: &str,
        since: u64,
        limit: usize,
    ) -> Result<(Vec<StoredMessage>, bool), BoxError> {
        let page = self
            .inner
            .store
            .read(group, ReadQuery::Since { offset: since, limit })
            .await?;
        if !page.head.can_recover(epoch, since) {
            return Ok((Vec::new(), false));
        }
        let complete = page
            .messages
            .first()
            .map_or(since == page.head.last, |m| m.offset == since + 1)
            && page.messages.last().is_none_or(|m| m.offset == page.head.last);
        Ok((page.messages, complete))
    }

    /// Joins a channel to a group and replays history into it so that replay and
    /// live delivery meet with no gap and no duplicate, even while others publish.
    ///
    /// The frames are queued in this order: `framing.before`, the replayed
    /// messages, `framing.after_recovery` (for [`Replay::Since`]), then live
    /// messages. While history is read, live messages for this channel are held
    /// in a buffer bounded by its queue size. A channel that is already a member
    /// keeps receiving live messages meanwhile, so a replay into it may repeat
    /// some of them.
    pub async fn subscribe(
        &self,
        channel: &Channel,
        group: &str,
        replay: Replay,
        framing: &dyn SubscribeFraming,
    ) -> Result<Subscribed, BoxError> {
        // The order lock is needed with an initialized sequencer; initializing
        // needs the store, which is async, so read the head first.
        let head = self.inner.store.head(group).await?;
        let (status, g, start) = loop {
            let (status, g) = self.join(channel, group, true)?;
            let mut order = lock(&g.order);
            // The group may have lost its last member between `join` and here;
            // then our membership went with it: join again.
            let current = lock(&self.inner.state)
                .groups
                .get(group)
                .is_some_and(|cur| Arc::ptr_eq(cur, &g));
            if !current {
                continue;
            }
            let seq = order.get_or_insert_with(|| Sequencer {
                epoch: head.epoch.clone(),
                next: head.last + 1,
                pending: BTreeMap::new(),
            });
            let start = SubscribeStart {
                epoch: seq.epoch.clone(),
                offset: seq.next - 1,
            };
            // Whatever was held back before now has an offset up to
            // `start.offset`: it is history from here on, not live.
            if let Some(held) = lock(&g.members).gated.get_mut(&channel.id()) {
                held.clear();
            }
            if let Some(frame) = framing.before(&start) {
                let _ = channel.try_send(frame);
            }
            drop(order);
            break (status, g, start);
        };

        // Read what to replay without holding any lock.
        let read = self.read_replay(group, &replay, &start).await;
        let (messages, recovery) = match read {
            Ok(r) => r,
            Err(err) => {
                self.open_gate(&g, channel, None, framing);
                return Err(err);
            }
        };
        let replayed = messages.len();
        self.replay_paced(&g, channel, &start, &messages).await;
        // Live messages held meanwhile (at most half a queue) go in next.
        channel.half_empty().await;
        self.open_gate(&g, channel, recovery.as_ref(), framing);
        Ok(Subscribed {
            status,
            start,
            replayed,
            recovery,
        })
    }

    async fn read_replay(
        &self,
        group: &str,
        replay: &Replay,
        start: &SubscribeStart,
    ) -> Result<(Vec<StoredMessage>, Option<Recovery>), BoxError> {
        let d = start.offset;
        match replay {
            Replay::None => Ok((Vec::new(), None)),
            Replay::Last(0) => Ok((Vec::new(), None)),
            Replay::Last(n) => {
                let from = d.saturating_sub(*n as u64);
                let page = self
                    .inner
                    .store
                    .read(
                        group,
                        ReadQuery::Since {
                            offset: from,
                            limit: *n,
                        },
                    )
                    .await?;
                let mut msgs = page.messages;
                if page.head.epoch != start.epoch {
                    msgs.clear();
                }
                msgs.retain(|m| m.offset <= d);
                Ok((msgs, None))
            }
            Replay::Since { epoch, offset } => {
                let since = *offset;
                let incomplete = Recovery {
                    from: since,
                    to: since,
                    complete: false,
                    replayed: 0,
                };
                if *epoch != start.epoch || since > d {
                    return Ok((Vec::new(), Some(incomplete)));
                }
                let want = usize::try_from(d - since).unwrap_or(usize::MAX);
                let page = self
                    .inner
                    .store
                    .read(
                        group,
                        ReadQuery::Since {
                            offset: since,
                            limit: want,
                        },
                    )
                    .await?;
                let mut msgs = page.messages;
                msgs.retain(|m| m.offset <= d);
                let gapless = page.head.epoch == start.epoch
                    && msgs.len() as u64 == d - since
                    && msgs.first().is_none_or(|m| m.offset == since + 1);
                if !gapless {
                    return Ok((Vec::new(), Some(incomplete)));
                }
                let to = msgs.last().map_or(since, |m| m.offset);
                let replayed = msgs.len();
                Ok((
                    msgs,
                    Some(Recovery {
                        from: since,
                        to,
                        complete: true,
                        replayed,
                    }),
                ))
            }
        }
    }

    /// Queues the replay, then what was held back, and makes the member live.
    /// Queues a replay for a gated channel, never more than half its queue at
    /// a time: a replay longer than the queue reaches a client that keeps
    /// reading, instead of closing it as a slow consumer. Live messages are held
    /// at the gate meanwhile; a client too slow for both is closed when the
    /// held ones reach half a queue.
    async fn replay_paced(&self, g: &Group, channel: &Channel, start: &SubscribeStart, replay: &[StoredMessage]) {
        for m in replay {
            if !channel.is_half_empty() {
                channel.half_empty().await;
            }
            if channel.is_closed() {
                return;
            }
            let msg = MessageRef {
                group: &g.name,
                epoch: &start.epoch,
                offset: Some(m.offset),
                kind: m.kind,
                payload: &m.payload,
                meta: &m.meta,
                timestamp_ms: m.timestamp_ms,
            };
            let frame = self.inner.envelope.render(&msg, channel.payload_type());
            if channel.try_send(frame).is_err() {
                self.count_overflow(channel);
                return;
            }
        }
    }

    /// Counts a frame a full queue refused; a slow consumer leaves its groups.
    fn count_overflow(&self, channel: &Channel) {
        let report = DeliveryReport {
            overflowed: vec![channel.id()],
            ..Default::default()
        };
        self.inner.counters.count(channel, &report);
        if channel.is_closed() {
            self.forget(channel.id());
        }
    }

    /// Ends the gate: the `recovered` frame, then the live messages held while
    /// history was read and replayed.
    fn open_gate(&self, g: &Group, channel: &Channel, recovery: Option<&Recovery>, framing: &dyn SubscribeFraming) {
        let order = lock(&g.order);
        let mut refused = false;
        if let Some(frame) = recovery.and_then(|r| framing.after_recovery(r)) {
            refused |= matches!(channel.try_send(frame), Err(SendError::Overflow));
        }
        let mut m = lock(&g.members);
        if let Some(held) = m.gated.remove(&channel.id()) {
            for frame in held {
                refused |= matches!(channel.try_send(frame), Err(SendError::Overflow));
            }
        }
        m.snapshot = None;
        drop(m);
        drop(order);
        if refused {
            self.count_overflow(channel);
        }
    }

    /// The head of a group's history.
    pub async fn head(&self, group: &str) -> Result<Head, BoxError> {
        Ok(self.inner.store.head(group).await?)
    }
}
