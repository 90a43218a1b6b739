//! The connections a service runs, with their users: what heartbeats watch,
//! what `presence` lists, and where member events go.
//!
//! Member events: a channel that asked for them (`events` on `join`,
//! `?events=1` for its URL group) is told of every other channel that joins
//! or leaves that group, for any reason. The box reports joins and leaves to
//! [`Events`], its membership observer, after releasing its locks.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError, Weak};

use channelbox_core::{Channel, Frame, MembershipObserver};
use serde_json::{json, Value};
use uuid::Uuid;

use super::cluster::{describe, event_type, Change, Member};
use super::Inner;

/// The most members one `presence` answer lists.
pub(super) const MAX_PRESENCE: usize = 10_000;

/// One connection the service runs.
#[derive(Debug)]
struct Peer {
    channel: Channel,
    user: Option<String>,
}

/// The service's connections and who wants member events of which group.
#[derive(Debug, Default)]
pub(super) struct Peers {
    running: Mutex<HashMap<Uuid, Peer>>,
    listeners: Mutex<HashMap<String, HashSet<Uuid>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Peers {
    /// Registers a connection until [`Peers::remove`].
    pub(super) fn insert(&self, channel: &Channel, user: Option<String>) {
        let peer = Peer {
            channel: channel.clone(),
            user,
        };
        lock(&self.running).insert(channel.id(), peer);
    }

    /// Forgets a connection whose session ended.
    pub(super) fn remove(&self, id: Uuid) {
        lock(&self.running).remove(&id);
    }

    /// The channels of every connection running now.
    pub(super) fn channels(&self) -> Vec<Channel> {
        lock(&self.running).values().map(|p| p.channel.clone()).collect()
    }

    /// A channel as a [`Member`] (no user without tokens).
    fn member(running: &HashMap<Uuid, Peer>, id: Uuid) -> Member {
        Member {
            channel_id: id,
            user: running.get(&id).and_then(|p| p.user.clone()),
        }
    }

    /// `{"channel_id","user"}` of a channel (`user` absent without tokens).
    fn describe(running: &HashMap<Uuid, Peer>, id: Uuid) -> Value {
        describe(&Self::member(running, id))
    }

    /// The members of a group as `presence` lists them, at most
    /// [`MAX_PRESENCE`]; whether the list was cut.
    pub(super) fn presence(&self, members: &[Uuid]) -> (Vec<Value>, bool) {
        let running = lock(&self.running);
        let listed = members
            .iter()
            .take(MAX_PRESENCE)
            .map(|id| Self::describe(&running, *id));
        (listed.collect(), members.len() > MAX_PRESENCE)
    }

    /// Tells this server's listeners of `group` of a member of another server.
    pub(super) fn tell_remote(&self, group: &str, change: Change, member: &Member) {
        let mut event = describe(member);
        event["type"] = json!(event_type(change));
        event["group"] = json!(group);
        self.send_to_listeners(group, member.channel_id, Frame::text(event.to_string()));
    }

    /// `channel` wants member events of `group` from now on; whether it did
    /// not already.
    pub(super) fn listen(&self, group: &str, channel: Uuid) -> bool {
        lock(&self.listeners)
            .entry(group.to_owned())
            .or_default()
            .insert(channel)
    }

    /// How many channels listen to member events of `group` (for tests and
    /// the leak check).
    #[cfg(test)]
    pub(super) fn listeners_of(&self, group: &str) -> usize {
        lock(&self.listeners).get(group).map_or(0, HashSet::len)
    }

    /// `channel` no longer wants member events of `group`.
    pub(super) fn unlisten(&self, group: &str, channel: Uuid) {
        let mut listeners = lock(&self.listeners);
        if let Some(set) = listeners.get_mut(group) {
            set.remove(&channel);
            if set.is_empty() {
                listeners.remove(group);
            }
        }
    }

    /// Sends `change` about `channel` to the listeners of `group` but
    /// itself; returns the member it was about.
    fn tell(&self, group: &str, channel: Uuid, change: Change) -> Member {
        let member = Self::member(&lock(&self.running), channel);
        let mut event = describe(&member);
        event["type"] = json!(event_type(change));
        event["group"] = json!(group);
        self.send_to_listeners(group, channel, Frame::text(event.to_string()));
        member
    }

    fn send_to_listeners(&self, group: &str, about: Uuid, frame: Frame) {
        let to: Vec<Uuid> = match lock(&self.listeners).get(group) {
            Some(set) => set.iter().copied().filter(|id| *id != about).collect(),
            None => return,
        };
        let running = lock(&self.running);
        let targets: Vec<Channel> = to
            .iter()
            .filter_map(|id| running.get(id))
            .map(|p| p.channel.clone())
            .collect();
        drop(running);
        for target in targets {
            // A full queue closes the listener like any slow consumer; its
            // own leave is reported through the box in turn.
            let _ = target.try_send(frame.clone());
        }
    }
}

/// The box's membership observer: turns joins and leaves into member events.
pub(super) struct Events(pub(super) Weak<Inner>);

impl MembershipObserver for Events {
    fn joined(&self, group: &str, channel: Uuid) {
        if let Some(inner) = self.0.upgrade() {
            let member = inner.peers.tell(group, channel, Change::Joined);
            if let Some(directory) = inner.directory.get() {
                directory.changed(group, Change::Joined, member);
            }
        }
    }

    fn left(&self, group: &str, channel: Uuid) {
        let Some(inner) = self.0.upgrade() else { return };
        inner.peers.unlisten(group, channel);
        let member = inner.peers.tell(group, channel, Change::Left);
        if let Some(directory) = inner.directory.get() {
            directory.changed(group, Change::Left, member);
        }
    }
}
