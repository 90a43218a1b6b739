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
//! Changes are written at most once every [`FLUSH_EVERY`], only the groups
//! whose members changed, in bounded pipelines; TTLs are [`RECORD_TTL`].
//! Control messages, in [`crate::wire`]'s format: [`Wire::Direct`] on a
//! server's own channel (a `direct`), [`Wire::CloseAll`] on the channel of
//! all (admin close-all), and [`Wire::Member`] events on the group's channel.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use channelbox_core::{now_ms, Change, ClusterEvent, Directory, Member, StoreError};
use redis::Value;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::keys;
use crate::link::Link;
use crate::wire::{MemberChange, Wire};

/// How long a record lives unless refreshed: a dead server's members
/// disappear within this.
pub const RECORD_TTL: Duration = Duration::from_secs(12);
/// How often changed records are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Every this many flushes, every record's TTL is refreshed.
const REFRESH_EVERY: u32 = 4;
/// Fields or keys per command when writing many.
const CHUNK: usize = 1000;
/// Commands per pipeline: a round of many groups goes in several.
const PIPELINE_COMMANDS: usize = 512;
/// How often waiting member events are published (well within the
/// protocol's 5 seconds), so that a burst of changes costs one pipeline.
const EVENTS_EVERY: Duration = Duration::from_millis(100);

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
    link: Arc<Link>,
    local: Mutex<Local>,
    events: Mutex<Option<mpsc::Receiver<ClusterEvent>>>,
    /// Wakes the writer when member events wait.
    wake: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RedisDirectory {
    pub(crate) fn start(node: Uuid, link: Arc<Link>, events: mpsc::Receiver<ClusterEvent>) -> Self {
        let inner = Arc::new(DirectoryInner {
            node,
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

    /// The servers whose records are alive, this one excepted.
    async fn other_nodes(&self) -> Result<Vec<Uuid>, StoreError> {
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(keys::NODES).arg(now_ms()).arg("+inf");
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
        cmd.arg(keys::channel_home(channel))
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
            let nodes = self.other_nodes().await?;
            let hashes = self.hashes(nodes.iter().map(|n| keys::node_groups(*n))).await?;
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
        let nodes = self.other_nodes().await?;
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
            .query(redis::cmd("GET").arg(keys::channel_home(to)))
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

/// Writes changed records at most once every [`FLUSH_EVERY`], and publishes
/// member events at most every [`EVENTS_EVERY`] (batched in one pipeline).
///
/// The pace is set by the clock, never by how often members change: a
/// client toggling join and leave as fast as it can used to wake this task
/// on every change, and each wake rewrote every group's record (and every
/// fourth one refreshed them all), so that one client could saturate Redis
/// for the whole cluster.
async fn write_records(weak: Weak<DirectoryInner>) {
    let mut flushes: u32 = 0;
    let mut next_flush = tokio::time::Instant::now() + FLUSH_EVERY;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let _ = tokio::time::timeout_at(next_flush, inner.wake.notified()).await;
        publish_events(&inner).await;
        if tokio::time::Instant::now() < next_flush {
            // Woken by member events: let more of them gather first.
            drop(inner);
            tokio::time::sleep(EVENTS_EVERY).await;
            continue;
        }
        flushes = flushes.wrapping_add(1);
        if let Err(err) = write_changes(&inner, flushes % REFRESH_EVERY == 0).await {
            tracing::debug!(%err, "cluster records not written now");
        }
        next_flush = tokio::time::Instant::now() + FLUSH_EVERY;
    }
}

/// Publishes the member events waiting, in bounded pipelines.
async fn publish_events(inner: &DirectoryInner) {
    let outbox = std::mem::take(&mut lock(&inner.local).outbox);
    for batch in outbox.chunks(PIPELINE_COMMANDS) {
        let mut pipe = redis::pipe();
        for (channel, body) in batch {
            pipe.cmd("PUBLISH").arg(channel).arg(&body[..]);
        }
        // Lost while Redis is away, like every pub/sub message then.
        let _ = inner.link.pipeline(&pipe).await;
    }
}

/// Commands split into pipelines of at most [`PIPELINE_COMMANDS`], so that
/// no single round trip outlasts the link's command timeout, however many
/// groups a server has.
#[derive(Default)]
struct Batches {
    pipes: Vec<redis::Pipeline>,
    in_last: usize,
}

impl Batches {
    /// The pipeline the next command goes into.
    fn next(&mut self) -> &mut redis::Pipeline {
        if self.pipes.is_empty() || self.in_last >= PIPELINE_COMMANDS {
            self.pipes.push(redis::pipe());
            self.in_last = 0;
        }
        self.in_last += 1;
        let at = self.pipes.len() - 1;
        &mut self.pipes[at]
    }

    /// Runs every pipeline in order; their results, concatenated.
    async fn run(self, link: &Link) -> Result<Vec<Value>, StoreError> {
        let mut results = Vec::new();
        for pipe in &self.pipes {
            results.extend(link.pipeline(pipe).await?);
        }
        Ok(results)
    }
}

/// A member's field in a presence record: `+user`, or `-` without one.
fn user_field(user: Option<&str>) -> String {
    user.map_or("-".to_owned(), |u| format!("+{u}"))
}

/// Writes this server's changed records: the groups whose members changed
/// (their presence record and their count), the channels gone; with
/// `refresh`, every record's TTL too, and every count again. A presence
/// record found missing on refresh (Redis lost it) is rewritten next round.
async fn write_changes(inner: &DirectoryInner, refresh: bool) -> Result<(), StoreError> {
    let ttl = RECORD_TTL.as_millis() as u64;
    let node = inner.node;
    let counts_key = keys::node_groups(node);
    let (dirty, gone, batches, refreshed) = {
        let local = lock(&inner.local);
        let mut b = Batches::default();
        b.next()
            .cmd("ZADD")
            .arg(keys::NODES)
            .arg(now_ms() + ttl)
            .arg(node.to_string());
        b.next()
            .cmd("ZREMRANGEBYSCORE")
            .arg(keys::NODES)
            .arg("-inf")
            .arg(now_ms());
        for group in &local.dirty {
            write_group(&mut b, &local, group, node, ttl);
        }
        if refresh {
            let counts: Vec<(&String, usize)> = local.groups.iter().map(|(g, m)| (g, m.len())).collect();
            for chunk in counts.chunks(CHUNK) {
                b.next().cmd("HSET").arg(&counts_key).arg(chunk);
            }
            for id in &local.channels {
                b.next().cmd("PEXPIRE").arg(keys::channel_home(*id)).arg(ttl);
            }
        }
        b.next().cmd("PEXPIRE").arg(&counts_key).arg(ttl);
        for id in &local.gone {
            b.next().cmd("DEL").arg(keys::channel_home(*id));
        }
        // Last, so that their answers are the last results.
        let refreshed: Vec<String> = if refresh {
            let clean = local.groups.keys().filter(|g| !local.dirty.contains(*g));
            clean.cloned().collect()
        } else {
            Vec::new()
        };
        for group in &refreshed {
            b.next().cmd("PEXPIRE").arg(keys::presence(group, node)).arg(ttl);
        }
        (local.dirty.clone(), local.gone.len(), b, refreshed)
    };
    let results = batches.run(&inner.link).await?;
    let mut local = lock(&inner.local);
    local.dirty.retain(|g| !dirty.contains(g));
    let done = gone.min(local.gone.len());
    local.gone.drain(..done);
    // A record that no longer exists (PEXPIRE answered 0) is written again.
    let answers = &results[results.len().saturating_sub(refreshed.len())..];
    for (group, answer) in refreshed.iter().zip(answers) {
        if matches!(answer, Value::Int(0)) && local.groups.contains_key(group) {
            local.dirty.insert(group.clone());
        }
    }
    Ok(())
}

/// Queues the writes of one changed group: its presence record rewritten
/// and its count set (or removed, when it has no member here any more).
fn write_group(b: &mut Batches, local: &Local, group: &str, node: Uuid, ttl: u64) {
    let key = keys::presence(group, node);
    b.next().cmd("DEL").arg(&key);
    let counts_key = keys::node_groups(node);
    let Some(members) = local.groups.get(group) else {
        b.next().cmd("HDEL").arg(&counts_key).arg(group);
        return;
    };
    let fields: Vec<(String, String)> = members
        .iter()
        .map(|(id, user)| (id.to_string(), user_field(user.as_deref())))
        .collect();
    for chunk in fields.chunks(CHUNK) {
        b.next().cmd("HSET").arg(&key).arg(chunk);
    }
    b.next().cmd("PEXPIRE").arg(&key).arg(ttl);
    b.next().cmd("HSET").arg(&counts_key).arg(group).arg(members.len());
}
