//! The directory's background writer: this server's changed records
//! written at most once every [`FLUSH_EVERY`] in bounded pipelines, their
//! TTLs refreshed, and member events published in batches.

use std::sync::Weak;
use std::time::Duration;

use channelbox_core::{now_ms, StoreError};
use redis::Value;
use uuid::Uuid;

use super::{lock, DirectoryInner, Local, FLUSH_EVERY, RECORD_TTL};
use crate::keys;
use crate::link::Link;

/// Every this many flushes, every record's TTL is refreshed.
const REFRESH_EVERY: u32 = 4;
/// Fields or keys per command when writing many.
const CHUNK: usize = 1000;
/// Commands per pipeline: a round of many groups goes in several.
const PIPELINE_COMMANDS: usize = 512;
/// How often waiting member events are published (well within the
/// protocol's 5 seconds), so that a burst of changes costs one pipeline.
const EVENTS_EVERY: Duration = Duration::from_millis(100);

/// Writes changed records at most once every [`FLUSH_EVERY`], and publishes
/// member events at most every [`EVENTS_EVERY`] (batched in one pipeline).
///
/// The pace is set by the clock, never by how often members change: a
/// client toggling join and leave as fast as it can used to wake this task
/// on every change, and each wake rewrote every group's record (and every
/// fourth one refreshed them all), so that one client could saturate Redis
/// for the whole cluster.
pub(super) async fn write_records(weak: Weak<DirectoryInner>) {
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
        let moved = inner.moved_home.swap(false, std::sync::atomic::Ordering::AcqRel);
        if let Err(err) = write_changes(&inner, moved || flushes % REFRESH_EVERY == 0).await {
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
            pipe.cmd(inner.link.publish_command()).arg(channel).arg(&body[..]);
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
            // One refused command (a group whose Cluster slot moved away,
            // say) does not fail the records of every other group.
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            self.pipes.push(pipe);
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
    let home = inner.home();
    let home = home.as_str();
    let counts_key = keys::node_groups(home, node);
    let (dirty, gone, batches, refreshed) = {
        let local = lock(&inner.local);
        let mut b = Batches::default();
        b.next()
            .cmd("ZADD")
            .arg(keys::nodes(home))
            .arg(now_ms() + ttl)
            .arg(node.to_string());
        b.next()
            .cmd("ZREMRANGEBYSCORE")
            .arg(keys::nodes(home))
            .arg("-inf")
            .arg(now_ms());
        for group in &local.dirty {
            write_group(&mut b, &local, group, home, node, ttl);
        }
        if refresh {
            let counts: Vec<(&String, usize)> = local.groups.iter().map(|(g, m)| (g, m.len())).collect();
            for chunk in counts.chunks(CHUNK) {
                b.next().cmd("HSET").arg(&counts_key).arg(chunk);
            }
            for id in &local.channels {
                b.next().cmd("PEXPIRE").arg(keys::channel_home(home, *id)).arg(ttl);
            }
        }
        b.next().cmd("PEXPIRE").arg(&counts_key).arg(ttl);
        for id in &local.gone {
            b.next().cmd("DEL").arg(keys::channel_home(home, *id));
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
fn write_group(b: &mut Batches, local: &Local, group: &str, home: &str, node: Uuid, ttl: u64) {
    let key = keys::presence(group, node);
    b.next().cmd("DEL").arg(&key);
    let counts_key = keys::node_groups(home, node);
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
