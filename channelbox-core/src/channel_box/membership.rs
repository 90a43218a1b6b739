//! Groups and their members. A group object lives in the box's map while it has
//! members or publishes in flight, so that every publish and every subscriber
//! of one name meet in the same sequencer. Its member map is copied into a
//! snapshot (`Arc<[Channel]>`) on first use after a change: a broadcast reads
//! the snapshot and holds no lock while delivering.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::publish::Ready;
use super::registry::State;
use super::sequencer::Sequencer;
use super::{lock, AddStatus, ChannelBox, RemoveStatus};
use crate::channel::Channel;
use crate::error::BoxError;
use crate::payload::Frame;

/// Told when a channel joins or leaves a group, for any reason: a leave, a
/// close, expiry, a slow consumer's removal, `flush_groups`. Called after the
/// box's locks are released, so it may use the box; it must not wait.
pub trait MembershipObserver: Send + Sync + 'static {
    /// `channel` joined `group` (it was not a member before).
    fn joined(&self, group: &str, channel: Uuid);

    /// `channel` left `group` (it was a member).
    fn left(&self, group: &str, channel: Uuid);
}

pub(super) struct Members {
    pub(super) map: HashMap<Uuid, Channel>,
    /// Members whose live frames are held back while their replay is read.
    pub(super) gated: HashMap<Uuid, Vec<Frame>>,
    /// The live members, rebuilt lazily after a change.
    pub(super) snapshot: Option<Arc<[Channel]>>,
}

pub(super) struct Group {
    pub(super) name: Arc<str>,
    pub(super) members: Mutex<Members>,
    /// The group's sequencer; `None` until the first append or subscription.
    pub(super) order: Mutex<Option<Sequencer<Ready>>>,
    /// Publishes started and not yet finished.
    in_flight: AtomicU64,
    /// A task is filling a gap of this group from history (with a broker).
    pub(super) filling: std::sync::atomic::AtomicBool,
    /// When a message last arrived through `ingest` (ms since the Unix epoch).
    pub(super) last_ingest: AtomicU64,
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
            filling: std::sync::atomic::AtomicBool::new(false),
            last_ingest: AtomicU64::new(0),
        }
    }

    fn is_unused(&self, members: &Members) -> bool {
        members.map.is_empty() && self.in_flight.load(Ordering::Acquire) == 0
    }

    /// The members that receive live messages now (not those behind a gate).
    pub(super) fn snapshot(&self) -> Arc<[Channel]> {
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

impl ChannelBox {
    /// Sets the observer told of every join and leave from now on; `false`
    /// when one was set already (it stays).
    pub fn observe(&self, observer: std::sync::Arc<dyn MembershipObserver>) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// Tells the observer, if any, of leaves that happened (outside the locks).
    pub(super) fn notify_left(&self, left: &[(Arc<str>, Uuid)]) {
        self.drop_pages_of_gone(left.iter().map(|(group, _)| &**group));
        if let Some(o) = self.inner.observer.get() {
            for (group, id) in left {
                o.left(group, *id);
            }
        }
    }

    /// Adds a channel to a group, creating the group if needed.
    pub async fn add_channel_to_group(&self, channel: &Channel, group: &str) -> Result<AddStatus, BoxError> {
        self.join(channel, group, false).map(|(status, _)| status)
    }

    /// Adds a channel to a group. With `gated`, its live frames are held back
    /// until the subscription opens the gate.
    pub(super) fn join(
        &self,
        channel: &Channel,
        group: &str,
        gated: bool,
    ) -> Result<(AddStatus, Arc<Group>), BoxError> {
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
            // Most channels are in one group: room for one, not a `Vec`'s
            // first four.
            reg.groups.reserve_exact(1);
            reg.groups.push(g.name.clone());
        }
        let status = if created {
            AddStatus::GroupCreated
        } else {
            AddStatus::Added
        };
        drop(state);
        if let Some(o) = self.inner.observer.get() {
            o.joined(group, channel.id());
        }
        Ok((status, g))
    }

    /// Whether `g` is still the group object of its name (it is not when its
    /// last member left and a new one took its place).
    pub(super) fn is_current(&self, g: &Arc<Group>) -> bool {
        lock(&self.inner.state)
            .groups
            .get(&g.name)
            .is_some_and(|cur| Arc::ptr_eq(cur, g))
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
            drop(state);
            self.notify_left(&[(Arc::from(group), id)]);
        }
        Ok(status)
    }

    pub(super) fn leave_locked(state: &mut State, group: &str, id: Uuid) -> RemoveStatus {
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

    /// Whether a channel is a member of a group.
    pub fn is_member(&self, id: Uuid, group: &str) -> bool {
        let state = lock(&self.inner.state);
        state
            .groups
            .get(group)
            .is_some_and(|g| lock(&g.members).map.contains_key(&id))
    }

    /// The group a publish goes through, kept in the map until the publish ends.
    pub(super) fn acquire_group(&self, group: &str) -> Arc<Group> {
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
    pub(super) fn release_group(&self, g: &Arc<Group>) {
        let mut state = lock(&self.inner.state);
        g.in_flight.fetch_sub(1, Ordering::AcqRel);
        let unused = g.is_unused(&lock(&g.members));
        if unused && state.groups.get(&g.name).is_some_and(|cur| Arc::ptr_eq(cur, g)) {
            state.groups.remove(&g.name);
            drop(state);
            self.drop_pages_of_gone([&*g.name]);
        }
    }

    /// Drops the shared replay pages of those of `groups` that no longer
    /// exist here. Pages serve members coming back together (a reconnect
    /// storm); once a group's last member has left they are only memory, and
    /// an idle server would otherwise hold up to the cache's bound for good.
    fn drop_pages_of_gone<'a>(&self, groups: impl IntoIterator<Item = &'a str>) {
        // `flush_groups` names a group once per member.
        let mut names: Vec<&str> = groups.into_iter().collect();
        names.sort_unstable();
        names.dedup();
        // Under `state` (then `replays`, the order `read_page` keeps too), so
        // that a group made again meanwhile keeps its new pages.
        let state = lock(&self.inner.state);
        let mut gone = names.into_iter().filter(|g| !state.groups.contains_key(*g)).peekable();
        if gone.peek().is_some() {
            let mut replays = lock(&self.inner.replays);
            for group in gone {
                replays.purge(group, None);
            }
        }
    }

    /// The group object of a name, if it exists now.
    pub(super) fn group(&self, group: &str) -> Option<Arc<Group>> {
        lock(&self.inner.state).groups.get(group).cloned()
    }
}
