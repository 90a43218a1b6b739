//! [`ShardedDirectory`]: the chat service's directory on several shards (or
//! the masters of a Redis Cluster), a group's records handed over to the
//! new master when its slot moves.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use channelbox_core::{Change, ClusterEvent, Directory, Member, StoreError};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{merge, Engines, Merger, Placement};
use crate::link::is_redirect;
use crate::RedisDirectory;

/// Members whose last change is held for groups whose Cluster master's
/// engine is being made, at most; past it a new member's change is not
/// recorded (and logged).
const WAITING_CHANGES: usize = 65_536;

/// The groups with members here and where their records are.
#[derive(Debug, Default)]
struct Kept {
    /// Per group, the engine whose directory keeps its records, and the
    /// members.
    groups: HashMap<String, (usize, HashSet<Uuid>)>,
    /// For groups whose Cluster master's engine is being made, each
    /// member's last change: recorded once the group is placed (see
    /// `follow_moved_records`). The last one is all that counts, so a
    /// member who joined and left meanwhile is not left behind.
    waiting: HashMap<String, HashMap<Uuid, (Change, Member)>>,
    /// How many members `waiting` holds a change of.
    waiting_changes: usize,
}

impl Kept {
    /// Holds a change of a group that waits for its master's engine.
    fn hold(&mut self, group: &str, change: Change, member: Member) {
        let held = self.waiting.entry(group.to_owned()).or_default();
        if let Some(last) = held.get_mut(&member.channel_id) {
            *last = (change, member);
            return;
        }
        if self.waiting_changes >= WAITING_CHANGES {
            tracing::warn!(group, "member change not recorded: too many wait for a cluster master");
            return;
        }
        self.waiting_changes += 1;
        held.insert(member.channel_id, (change, member));
    }
}

/// The chat service's directory on several shards (or the masters of a
/// Redis Cluster).
#[derive(Debug)]
pub struct ShardedDirectory {
    inner: Arc<DirectoryInner>,
    events: Mutex<Option<mpsc::Receiver<ClusterEvent>>>,
    /// Forwards each engine's events into `events`.
    merged: Merger<ClusterEvent>,
}

#[derive(Debug)]
struct DirectoryInner {
    shards: Arc<Engines<RedisDirectory>>,
    placement: Placement,
    /// Groups with members here. On a Cluster, a group whose slot moved is
    /// handed over to the new master's directory (at its next change, and
    /// every [`crate::FLUSH_EVERY`]).
    kept: Mutex<Kept>,
}

impl DirectoryInner {
    /// The engine that keeps `group`'s records now, handing them over first
    /// when the group's Cluster slot moved.
    fn keeper(&self, kept: &mut HashMap<String, (usize, HashSet<Uuid>)>, group: &str) -> Result<usize, StoreError> {
        let now = self.placement.of(group);
        match (kept.get_mut(group), now) {
            (Some((at, _)), Ok(now)) if *at != now => {
                let (from, to) = (self.shards.get(*at)?, self.shards.get(now)?);
                to.take_over(group, from.hand_over(group));
                *at = now;
                Ok(now)
            }
            (Some((at, _)), _) => Ok(*at),
            (None, now) => now,
        }
    }

    /// Records one member change with the engine that keeps the group now;
    /// a group whose Cluster master's engine is being made has it held.
    fn record(&self, kept: &mut Kept, group: &str, change: Change, member: Member) {
        if kept.waiting.contains_key(group) {
            kept.hold(group, change, member);
            return;
        }
        let shard = match self.keeper(&mut kept.groups, group) {
            Ok(shard) => shard,
            Err(err) if is_redirect(&err) => {
                kept.hold(group, change, member);
                return;
            }
            Err(err) => {
                tracing::warn!(%err, group, "member change not recorded");
                return;
            }
        };
        let members = &mut kept
            .groups
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
            kept.groups.remove(group);
        }
        // Under the lock: a hand-over cannot come between.
        match self.shards.get(shard) {
            Ok(directory) => directory.changed(group, change, member),
            Err(err) => tracing::warn!(%err, group, "member change not recorded"),
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
        let groups: Vec<String> = kept.groups.keys().cloned().collect();
        for group in groups {
            let _ = inner.keeper(&mut kept.groups, &group);
        }
        let placed: Vec<String> = kept
            .waiting
            .keys()
            .filter(|g| !matches!(inner.placement.of(g), Err(err) if is_redirect(&err)))
            .cloned()
            .collect();
        for group in placed {
            let changes = kept.waiting.remove(&group).unwrap_or_default();
            kept.waiting_changes -= changes.len();
            for (change, member) in changes.into_values() {
                inner.record(&mut kept, &group, change, member);
            }
        }
    }
}

impl ShardedDirectory {
    pub(crate) fn new(shards: Vec<Arc<RedisDirectory>>, placement: Placement) -> Self {
        let (merged, events) = merge(shards.iter().filter_map(|d| d.take_events()).collect());
        let slots = matches!(placement, Placement::Slots(_));
        let inner = Arc::new(DirectoryInner {
            shards: Engines::new(shards),
            placement,
            kept: Mutex::new(Kept::default()),
        });
        if slots {
            tokio::spawn(follow_moved_records(Arc::downgrade(&inner)));
        }
        ShardedDirectory {
            events: Mutex::new(Some(events)),
            inner,
            merged,
        }
    }

    /// Adds the directory of a Cluster master added after start (see
    /// `cluster`): its events join the others.
    pub(crate) fn add(&self, directory: Arc<RedisDirectory>) -> usize {
        let events = directory.take_events();
        let shard = self.inner.shards.push(directory);
        if let Some(events) = events {
            self.merged.add(shard, events);
        }
        shard
    }

    /// Moves engine `index`'s records to `home` (see
    /// [`RedisDirectory::move_home`]); never the first engine's.
    pub(crate) fn move_home(&self, index: usize, home: String) {
        if index > 0 {
            if let Ok(directory) = self.inner.shards.get(index) {
                directory.move_home(home);
            }
        }
    }

    fn of(&self, group: &str) -> Result<Arc<RedisDirectory>, StoreError> {
        self.inner.shards.get(self.inner.placement.of(group)?)
    }

    /// The first engine's: it keeps what is about a channel or a server.
    fn first(&self) -> Arc<RedisDirectory> {
        self.inner.shards.read()[0].clone()
    }
}

#[async_trait]
impl Directory for ShardedDirectory {
    fn changed(&self, group: &str, change: Change, member: Member) {
        let mut kept = self.inner.kept.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.record(&mut kept, group, change, member);
    }

    async fn connected(&self, channel: Uuid) -> Result<(), StoreError> {
        self.first().connected(channel).await
    }

    fn disconnected(&self, channel: Uuid) {
        self.first().disconnected(channel);
    }

    async fn groups(&self) -> Result<BTreeMap<String, usize>, StoreError> {
        let mut all = BTreeMap::new();
        for d in self.inner.shards.all() {
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
        self.first().direct(to, frame).await
    }

    async fn close_all(&self) -> Result<(), StoreError> {
        self.first().close_all().await
    }

    fn take_events(&self) -> Option<mpsc::Receiver<ClusterEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(n: u128) -> Member {
        Member {
            channel_id: Uuid::from_u128(n),
            user: None,
        }
    }

    #[test]
    fn a_held_group_keeps_each_members_last_change_within_its_bound() {
        let mut kept = Kept::default();
        kept.hold("g", Change::Joined, member(1));
        kept.hold("g", Change::Left, member(1));
        kept.hold("g", Change::Joined, member(2));
        let held = &kept.waiting["g"];
        assert_eq!(kept.waiting_changes, 2);
        assert_eq!(
            held[&Uuid::from_u128(1)].0,
            Change::Left,
            "who joined and left is not left behind"
        );
        assert_eq!(held[&Uuid::from_u128(2)].0, Change::Joined);
        for n in 3..(WAITING_CHANGES as u128 + 10) {
            kept.hold("h", Change::Joined, member(n));
        }
        assert_eq!(kept.waiting_changes, WAITING_CHANGES, "bounded");
        // A member held already still gets its last change past the bound.
        kept.hold("g", Change::Left, member(2));
        assert_eq!(kept.waiting["g"][&Uuid::from_u128(2)].0, Change::Left);
    }
}
