//! [`RedisDirectory`]: the chat service's [`Directory`] on Redis.
//!
//! Records, each with a short TTL that this server refreshes in the
//! background, so that a dead server's records vanish by themselves:
//! - `cb:nodes`, a sorted set of live servers scored by when their record
//!   expires;
//! - `cb:node:<id>:groups`, a server's member counts by group;
//! - `cb:{<group>}:p:<id>`, a server's members of a group with their users;
//! - `cb:ch:<channel>`, the server that runs a channel (for `direct`).
//!
//! (`cb` is the directory's home prefix; on a Redis Cluster each master's
//! directory has its own, `cb:{cb-N}`, whose slot that master serves.)
//!
//! Changes are written at most once every [`FLUSH_EVERY`], only the groups
//! whose members changed, in bounded pipelines; TTLs are [`RECORD_TTL`].
//! Control messages, in [`crate::wire`]'s format: [`Wire::Direct`] on a
//! server's own channel (a `direct`), [`Wire::CloseAll`] on the channel of
//! all (admin close-all), and [`Wire::Member`] events on the group's channel.

mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use channelbox_core::{now_ms, Change, ClusterEvent, Directory, Member, StoreError};
use redis::Value;
use tokio::sync::mpsc;
use uuid::Uuid;

use self::writer::write_records;
use crate::keys;
use crate::link::Link;
use crate::wire::{MemberChange, Wire};

/// How long a record lives unless refreshed: a dead server's members
/// disappear within this.
pub const RECORD_TTL: Duration = Duration::from_secs(12);
/// How often changed records are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// What the subscription task hands the directory.
pub(crate) type Control = ClusterEvent;

#[derive(Debug, Default)]
struct Local {
    /// This server's members by group, with their users.
    groups: HashMap<String, HashMap<Uuid, Option<String>>>,
    /// Groups whose record must be rewritten.
    dirty: HashSet<String>,
    /// This server's channels.
    channels: HashSet<Uuid>,
    /// Channels closed whose record must go.
    gone: Vec<Uuid>,
    /// Member events to publish, in order.
    outbox: Vec<(String, Vec<u8>)>,
    /// The other servers' counts, as last read.
    others: BTreeMap<String, usize>,
}

/// The cluster's shared records and control messages in Redis.
#[derive(Clone, Debug)]
pub struct RedisDirectory {
    inner: Arc<DirectoryInner>,
}

#[derive(Debug)]
struct DirectoryInner {
    node: Uuid,
    /// The prefix of this directory's server and channel records (see
    /// `keys`); on a Redis Cluster it may move (see
    /// [`RedisDirectory::move_home`]).
    home: std::sync::RwLock<String>,
    /// The home moved: every record is written again at the next flush.
    moved_home: std::sync::atomic::AtomicBool,
    link: Arc<Link>,
    local: Mutex<Local>,
    events: Mutex<Option<mpsc::Receiver<ClusterEvent>>>,
    /// Wakes the writer when member events wait.
    wake: tokio::sync::Notify,
}

impl DirectoryInner {
    /// The home prefix now.
    fn home(&self) -> String {
        self.home.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RedisDirectory {
    pub(crate) fn start(node: Uuid, home: String, link: Arc<Link>, events: mpsc::Receiver<ClusterEvent>) -> Self {
        let inner = Arc::new(DirectoryInner {
            node,
            home: std::sync::RwLock::new(home),
            moved_home: std::sync::atomic::AtomicBool::new(false),
            link,
            local: Mutex::new(Local::default()),
            events: Mutex::new(Some(events)),
            wake: tokio::sync::Notify::new(),
        });
        tokio::spawn(write_records(Arc::downgrade(&inner)));
        RedisDirectory { inner }
    }

    /// This server's id in the cluster.
    pub fn node(&self) -> Uuid {
        self.inner.node
    }

    /// Moves this server's records to another home prefix (a Cluster master
    /// whose home slot moved elsewhere, or whose servers chose homes apart
    /// while its slots were being resharded to it): written there at the
    /// next flush, every one; those left at the old home expire within
    /// [`RECORD_TTL`]. Not for the first engine's directory, whose channel
    /// records are not written again.
    pub(crate) fn move_home(&self, home: String) {
        if self.inner.home() == home {
            return;
        }
        let mut now = self.inner.home.write().unwrap_or_else(|p| p.into_inner());
        if *now != home {
            tracing::info!(from = %*now, to = %home, "cluster records move to another home");
            *now = home;
            self.inner.moved_home.store(true, std::sync::atomic::Ordering::Release);
            self.inner.wake.notify_one();
        }
    }

    /// The servers whose records are alive, this one excepted.
    async fn other_nodes(&self, home: &str) -> Result<Vec<Uuid>, StoreError> {
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(keys::nodes(home)).arg(now_ms()).arg("+inf");
        let nodes: Vec<String> = self.inner.link.query(&cmd).await?;
        Ok(nodes
            .iter()
            .filter_map(|n| Uuid::parse_str(n).ok())
            .filter(|n| *n != self.inner.node)
            .collect())
    }

    /// `HGETALL` of one key per node, in one pipeline.
    async fn hashes(&self, keys: impl Iterator<Item = String>) -> Result<Vec<Vec<(String, String)>>, StoreError> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HGETALL").arg(key);
        }
        let values = self.inner.link.pipeline(&pipe).await?;
        Ok(values
            .iter()
            .map(|v| {
                redis::from_redis_value_ref::<HashMap<String, String>>(v)
                    .unwrap_or_default()
                    .into_iter()
                    .collect()
            })
            .collect())
    }
}

impl RedisDirectory {
    /// Stops keeping `group`'s records (its members go to another engine's
    /// directory: its Cluster slot moved): its count here is removed at the
    /// next write; returns its members.
    pub(crate) fn hand_over(&self, group: &str) -> HashMap<Uuid, Option<String>> {
        let mut local = lock(&self.inner.local);
        let members = local.groups.remove(group).unwrap_or_default();
        local.dirty.insert(group.to_owned());
        members
    }

    /// Keeps `group`'s records from now on, with `members` (see
    /// [`RedisDirectory::hand_over`]).
    pub(crate) fn take_over(&self, group: &str, members: HashMap<Uuid, Option<String>>) {
        let mut local = lock(&self.inner.local);
        if !members.is_empty() {
            local.groups.entry(group.to_owned()).or_default().extend(members);
        }
        local.dirty.insert(group.to_owned());
    }
}

#[async_trait]
impl Directory for RedisDirectory {
    fn changed(&self, group: &str, change: Change, member: Member) {
        let mut local = lock(&self.inner.local);
        let members = local.groups.entry(group.to_owned()).or_default();
        match change {
            Change::Joined => {
                members.insert(member.channel_id, member.user.clone());
            }
            Change::Left => {
                members.remove(&member.channel_id);
                if members.is_empty() {
                    local.groups.remove(group);
                }
            }
        }
        local.dirty.insert(group.to_owned());
        let event = Wire::Member {
            node: self.inner.node,
            change: match change {
                Change::Joined => MemberChange::Joined,
                Change::Left => MemberChange::Left,
            },
            channel: member.channel_id,
            user: member.user.clone(),
        };
        // A member event has no epoch: it always encodes.
        if let Ok(body) = event.encode() {
            local.outbox.push((keys::channel(group), body));
        }
        drop(local);
        self.inner.wake.notify_one();
    }

    async fn connected(&self, channel: Uuid) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(keys::channel_home(&self.inner.home(), channel))
            .arg(self.inner.node.to_string())
            .arg("PX")
            .arg(RECORD_TTL.as_millis() as u64);
        self.inner.link.query::<Value>(&cmd).await?;
        lock(&self.inner.local).channels.insert(channel);
        Ok(())
    }

    fn disconnected(&self, channel: Uuid) {
        let mut local = lock(&self.inner.local);
        if local.channels.remove(&channel) {
            local.gone.push(channel);
        }
    }

    async fn groups(&self) -> Result<BTreeMap<String, usize>, StoreError> {
        let read = async {
            // Read once: a home moved between two reads would pair one
            // home's servers with the other's counts.
            let home = self.inner.home();
            let nodes = self.other_nodes(&home).await?;
            let hashes = self.hashes(nodes.iter().map(|n| keys::node_groups(&home, *n))).await?;
            let mut others = BTreeMap::new();
            for (group, count) in hashes.into_iter().flatten() {
                *others.entry(group).or_insert(0) += count.parse::<usize>().unwrap_or(0);
            }
            Ok::<_, StoreError>(others)
        };
        let result = read.await;
        let mut local = lock(&self.inner.local);
        if let Ok(others) = result {
            local.others = others;
        }
        // The other servers' last known counts while Redis is away.
        let mut counts = local.others.clone();
        for (group, members) in &local.groups {
            *counts.entry(group.clone()).or_insert(0) += members.len();
        }
        counts.retain(|_, n| *n > 0);
        Ok(counts)
    }

    async fn presence(&self, group: &str, max: usize) -> Result<(Vec<Member>, bool), StoreError> {
        let nodes = self.other_nodes(&self.inner.home()).await?;
        let hashes = self.hashes(nodes.iter().map(|n| keys::presence(group, *n))).await?;
        let mut members: Vec<Member> = lock(&self.inner.local)
            .groups
            .get(group)
            .map(|m| {
                m.iter()
                    .map(|(id, user)| Member {
                        channel_id: *id,
                        user: user.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (id, user) in hashes.into_iter().flatten() {
            if let Ok(channel_id) = Uuid::parse_str(&id) {
                members.push(Member {
                    channel_id,
                    user: user.strip_prefix('+').map(str::to_owned),
                });
            }
        }
        let truncated = members.len() > max;
        members.truncate(max);
        Ok((members, truncated))
    }

    async fn direct(&self, to: Uuid, frame: String) -> Result<bool, StoreError> {
        let home: Option<String> = self
            .inner
            .link
            .query(redis::cmd("GET").arg(keys::channel_home(&self.inner.home(), to)))
            .await?;
        let Some(node) = home.and_then(|h| Uuid::parse_str(&h).ok()) else {
            return Ok(false);
        };
        if node == self.inner.node {
            // Its record outlived it here.
            return Ok(false);
        }
        let body = encoded(&Wire::Direct { to, frame })?;
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(keys::node_channel(node)).arg(body);
        // No subscriber: that server is gone.
        Ok(self.inner.link.query::<i64>(&cmd).await? > 0)
    }

    async fn close_all(&self) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(keys::ALL_CHANNEL)
            .arg(encoded(&Wire::CloseAll { node: self.inner.node })?);
        self.inner.link.query::<i64>(&cmd).await.map(|_| ())
    }

    fn take_events(&self) -> Option<mpsc::Receiver<ClusterEvent>> {
        lock(&self.inner.events).take()
    }
}

/// A payload's bytes, or an invalid-input error.
fn encoded(wire: &Wire) -> Result<Vec<u8>, StoreError> {
    wire.encode()
        .map_err(|e| StoreError::new(channelbox_core::StoreErrorKind::InvalidInput, e.to_string()))
}

/// The directory's event a payload stands for, received on a group's
/// channel (`group`) or on a control channel (`None`); `None` for what is
/// not the directory's, for this server's own member events and close-all,
/// and for a kind on a channel it does not belong on.
pub(crate) fn control_of(node: Uuid, group: Option<&str>, wire: &Wire) -> Option<Control> {
    match (group, wire) {
        (
            Some(group),
            Wire::Member {
                node: from,
                change,
                channel,
                user,
            },
        ) if *from != node => Some(ClusterEvent::Member {
            group: group.to_owned(),
            change: match change {
                MemberChange::Joined => Change::Joined,
                MemberChange::Left => Change::Left,
            },
            member: Member {
                channel_id: *channel,
                user: user.clone(),
            },
        }),
        (None, Wire::Direct { to, frame }) => Some(ClusterEvent::Direct {
            to: *to,
            frame: frame.clone(),
        }),
        (None, Wire::CloseAll { node: from }) if *from != node => Some(ClusterEvent::CloseAll),
        _ => None,
    }
}
