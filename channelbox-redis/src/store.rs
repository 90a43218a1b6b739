//! [`RedisStore`]: the [`HistoryStore`] on Redis. Offsets and epochs are
//! assigned by Redis, atomically with the write, by the append script (see
//! `scripts`). Appends go through one queue and one task that sends them as
//! pipelines on the command connection, so a caller's appends run in the
//! order it made them while many are in flight together.
//!
//! Every script is given the group's floor (`floors`): a head below what
//! this server knows Redis handed out moves the group to a new epoch in the
//! same script, so offsets of an epoch are never handed out twice. History
//! figures for `/metrics` are a running count of this server's own appends
//! (minus what they trimmed), never a scan of Redis's keys.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use channelbox_core::{
    now_ms, Capabilities, Epoch, Head, HistoryLimits, HistoryPage, HistoryStats, HistoryStore, NewMessage,
    PendingAppend, ReadQuery, StoreError, StoreErrorKind, StoredMessage, StreamPosition,
};
use redis::Value;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::appends::{Appender, Job, Shared};
use crate::broker::SubscriptionHealth;
use crate::durability::ReplicaWait;
use crate::link::{unavailable, Link};
use crate::{keys, scripts};

/// Appends waiting for Redis before new ones are refused as `unavailable`.
pub(crate) const APPEND_QUEUE: usize = 65_536;
/// Most appends sent in one pipeline.
pub(crate) const APPEND_BATCH: usize = 512;
/// Most messages one read returns, whatever it asks: reads are never unbounded.
pub const MAX_READ: usize = 10_000;
/// What a message costs beyond its payload, as counted by
/// [`HistoryStore::message_cost`]: the stream entry, its three fields and the
/// encoded header, roughly as Redis 7 stores them.
pub const MESSAGE_OVERHEAD: u64 = 128;

/// History in Redis, shared by every server of a cluster.
#[derive(Clone, Debug)]
pub struct RedisStore {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    link: Arc<Link>,
    /// The connection appends go through: `link`, or with `WAIT` one of
    /// their own (see `durability`).
    append_link: Arc<Link>,
    limits: HistoryLimits,
    appends: mpsc::Sender<Job>,
    /// Whether the broker's subscription connection is up too (a cluster
    /// without it would miss messages).
    pubsub: Arc<SubscriptionHealth>,
    shared: Arc<Shared>,
}

impl RedisStore {
    pub(crate) fn new(
        link: Arc<Link>,
        limits: HistoryLimits,
        pubsub: Arc<SubscriptionHealth>,
        shared: Arc<Shared>,
        wait: Option<ReplicaWait>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(APPEND_QUEUE);
        // With `WAIT`, appends have a connection of their own (see
        // `durability`); the restart hold and the script reload then follow
        // that connection, the one the appends actually go through.
        let append_link = wait
            .as_ref()
            .and_then(ReplicaWait::link)
            .unwrap_or_else(|| link.clone());
        let appender = Appender {
            connection: 0,
            run_id: None,
            link: append_link.clone(),
            limits: limits.clone(),
            shared: shared.clone(),
            wait,
        };
        tokio::spawn(appender.run(rx));
        let came_up = link.came_up();
        let inner = Arc::new(StoreInner {
            link,
            append_link,
            limits,
            appends: tx,
            pubsub,
            shared,
        });
        tokio::spawn(check_after_reconnects(Arc::downgrade(&inner), came_up));
        RedisStore { inner }
    }

    fn append_job(&self, group: &str, message: NewMessage, except: Option<Uuid>) -> Result<PendingAppend, StoreError> {
        if group.is_empty() {
            return Err(StoreError::new(StoreErrorKind::InvalidInput, "group name is empty"));
        }
        // Refused at once while either connection is down: a cluster that
        // cannot hear its own messages must not take new ones.
        if !self.healthy() {
            return Err(unavailable("not connected"));
        }
        let (done, rx) = oneshot::channel();
        let job = Job {
            group: group.to_owned(),
            size: message.payload.len(),
            timestamp_ms: message.timestamp_ms,
            encoded: message.encode(),
            except,
            done,
        };
        self.inner.appends.try_send(job).map_err(|_| {
            StoreError::new(
                StoreErrorKind::Busy,
                "redis: more appends are waiting than the queue holds",
            )
        })?;
        Ok(PendingAppend::remote(Box::pin(async move {
            rx.await.map_err(|_| unavailable("the append task stopped"))?
        })))
    }

    /// `EVALSHA` of a group script with the common arguments, the group's
    /// floor (raised to `seen`) among them, then `args`.
    fn script_cmd(
        &self,
        index: usize,
        group: &str,
        seen: Option<&StreamPosition>,
        args: &[&[u8]],
    ) -> Result<redis::Cmd, StoreError> {
        let floor = self.inner.shared.floors.get(group, seen);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.inner.link.sha(index)?)
            .arg(2)
            .arg(keys::head(group))
            .arg(keys::stream(group));
        for a in self
            .inner
            .shared
            .common_args(group, &self.oldest_allowed(group), floor.as_ref())
        {
            cmd.arg(a);
        }
        for a in args {
            cmd.arg(*a);
        }
        Ok(cmd)
    }

    async fn script(&self, index: usize, group: &str, args: &[&[u8]]) -> Result<Value, StoreError> {
        let cmd = self.script_cmd(index, group, None, args)?;
        self.inner.link.query::<Value>(&cmd).await
    }

    /// A head from a script's answer, noted as this group's floor.
    fn noted_head(&self, group: &str, value: &Value) -> Result<Head, StoreError> {
        let head = parse_head(value).ok_or_else(|| corrupt("head"))?;
        self.inner.shared.floors.note(group, &head.position());
        Ok(head)
    }

    /// The oldest timestamp a message of `group` may have now (by its
    /// namespace's age limit), as a script argument.
    fn oldest_allowed(&self, group: &str) -> String {
        let limits = self.inner.limits.limits_for(group);
        limits.oldest_allowed(now_ms()).unwrap_or(0).to_string()
    }

    fn check(group: &str) -> Result<(), StoreError> {
        if group.is_empty() {
            return Err(StoreError::new(StoreErrorKind::InvalidInput, "group name is empty"));
        }
        Ok(())
    }

    /// Every group with a head in Redis, found with `SCAN` (bounded pages).
    async fn groups(&self) -> Result<Vec<String>, StoreError> {
        let mut cursor = 0u64;
        let mut groups = Vec::new();
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(keys::HEAD_PATTERN)
                .arg("COUNT")
                .arg(1000);
            let (next, names): (u64, Vec<String>) = self.inner.link.query(&cmd).await?;
            groups.extend(names.iter().filter_map(|n| keys::group_of_head(n)).map(str::to_owned));
            if next == 0 {
                return Ok(groups);
            }
            cursor = next;
        }
    }
}

/// After every reconnect, checks the head of every group this server has a
/// floor for, pipelined: Redis may be back older than it was (a restart from
/// a snapshot, a failover), and the sooner a server that saw the lost offsets
/// moves such a group to a new epoch, the sooner other servers' appends go to
/// the new epoch too. Groups with local members are checked by the box as
/// well; this covers the rest (HTTP publishes, groups whose members left).
async fn check_after_reconnects(store: std::sync::Weak<StoreInner>, came_up: Arc<tokio::sync::Notify>) {
    loop {
        came_up.notified().await;
        let Some(inner) = store.upgrade() else { return };
        let store = RedisStore { inner };
        let floors = store.inner.shared.floors.all();
        let failed = store.check_heads(&floors).await.iter().filter(|h| h.is_err()).count();
        if failed > 0 {
            tracing::debug!(failed, "heads not checked after a reconnect");
        }
    }
}

/// A fresh epoch: offered to every script, used when the group has none.
/// It starts with when it was made — 12 hex digits of milliseconds since
/// the Unix epoch, then `-` and 20 random hex digits — so that a script can
/// tell an epoch that Redis brought back from an older snapshot from one
/// that replaced it (see `scripts`).
pub(crate) fn new_epoch() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let random = Uuid::new_v4().simple().to_string();
    format!("{:012x}-{}", ms & 0xffff_ffff_ffff, &random[..20])
}

#[async_trait]
impl HistoryStore for RedisStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::SHARED
    }

    fn limits(&self) -> &HistoryLimits {
        &self.inner.limits
    }

    fn message_cost(&self, _group: &str, payload_bytes: usize) -> u64 {
        payload_bytes as u64 + MESSAGE_OVERHEAD
    }

    fn append(&self, group: &str, message: NewMessage) -> Result<PendingAppend, StoreError> {
        self.append_job(group, message, None)
    }

    fn append_except(
        &self,
        group: &str,
        message: NewMessage,
        except: Option<Uuid>,
    ) -> Result<PendingAppend, StoreError> {
        self.append_job(group, message, except)
    }

    async fn head(&self, group: &str) -> Result<Head, StoreError> {
        Self::check(group)?;
        let value = self.script(scripts::HEAD_SCRIPT, group, &[]).await?;
        self.noted_head(group, &value)
    }

    async fn check_heads(&self, groups: &[(String, StreamPosition)]) -> Vec<Result<Head, StoreError>> {
        let mut heads = Vec::with_capacity(groups.len());
        for chunk in groups.chunks(APPEND_BATCH) {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            let mut built = Vec::with_capacity(chunk.len());
            for (group, seen) in chunk {
                let cmd =
                    Self::check(group).and_then(|()| self.script_cmd(scripts::HEAD_SCRIPT, group, Some(seen), &[]));
                if let Ok(cmd) = &cmd {
                    pipe.add_command(cmd.clone());
                }
                built.push(cmd.map(|_| ()));
            }
            let mut values = match self.inner.link.pipeline(&pipe).await {
                Ok(values) => values.into_iter(),
                Err(err) => {
                    heads.extend(chunk.iter().map(|_| Err(err.clone())));
                    continue;
                }
            };
            for ((group, _), built) in chunk.iter().zip(built) {
                heads.push(built.and_then(|()| match values.next() {
                    Some(Value::ServerError(e)) => {
                        self.inner.link.note_error_code(e.code());
                        Err(crate::link::refused("head check", &e))
                    }
                    Some(v) => self.noted_head(group, &v),
                    None => Err(corrupt("head check: too few answers")),
                }));
            }
        }
        heads
    }

    async fn read(&self, group: &str, query: ReadQuery) -> Result<HistoryPage, StoreError> {
        Self::check(group)?;
        let (mode, n, limit) = match query {
            ReadQuery::Last(n) => ("last", n.min(MAX_READ) as u64, 0),
            ReadQuery::Since { offset, limit } => ("since", offset, limit.min(MAX_READ)),
        };
        if matches!(query, ReadQuery::Last(0)) || matches!(query, ReadQuery::Since { limit: 0, .. }) {
            let head = self.head(group).await?;
            return Ok(HistoryPage { head, messages: vec![] });
        }
        let (n, limit) = (n.to_string(), limit.to_string());
        let args: [&[u8]; 3] = [mode.as_bytes(), n.as_bytes(), limit.as_bytes()];
        let value = self.script(scripts::READ, group, &args).await?;
        let Value::Array(parts) = &value else {
            return Err(corrupt("read"));
        };
        let head = self.noted_head(group, &value)?;
        let entries = match parts.get(3) {
            Some(Value::Array(e)) => e,
            _ => return Err(corrupt("read entries")),
        };
        // A corrupt entry is left out: the offsets around it then show a
        // gap, which recovery reports as incomplete and a gap fill as 4002,
        // instead of one bad entry making the whole history unreadable.
        let mut messages: Vec<StoredMessage> = entries
            .iter()
            .filter_map(|e| {
                let parsed = parse_entry(e);
                if parsed.is_none() {
                    tracing::warn!(group, "a corrupt history entry in redis is skipped");
                }
                parsed
            })
            .collect();
        if mode == "last" {
            messages.reverse();
        }
        Ok(HistoryPage { head, messages })
    }

    async fn flush_group(&self, group: &str) -> Result<Epoch, StoreError> {
        Self::check(group)?;
        let value = self.script(scripts::FLUSH, group, &[]).await?;
        match value {
            Value::BulkString(b) => {
                let epoch = Epoch::from(String::from_utf8_lossy(&b).into_owned());
                self.inner
                    .shared
                    .floors
                    .note(group, &StreamPosition::new(epoch.clone(), 0));
                Ok(epoch)
            }
            _ => Err(corrupt("flush")),
        }
    }

    async fn flush_all(&self) -> Result<(), StoreError> {
        // An admin request, not a scrape: finding every group takes a scan.
        for group in self.groups().await? {
            self.flush_group(&group).await?;
        }
        self.inner.shared.messages.store(0, Ordering::Relaxed);
        self.inner.shared.bytes.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// This server's share: what its own appends saved and did not trim
    /// themselves (summed over the servers, the cluster's history, less what
    /// expired by age or TTL). Kept as a running count, so a scrape never
    /// scans Redis.
    async fn stats(&self) -> Result<HistoryStats, StoreError> {
        let messages = self.inner.shared.messages.load(Ordering::Relaxed);
        let bytes = self.inner.shared.bytes.load(Ordering::Relaxed);
        Ok(HistoryStats {
            messages,
            bytes,
            cost: bytes + messages * MESSAGE_OVERHEAD,
        })
    }

    fn healthy(&self) -> bool {
        self.inner.link.healthy() && self.inner.append_link.healthy() && self.inner.pubsub.healthy()
    }
}

pub(crate) fn corrupt(what: &str) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, format!("redis: unexpected answer to {what}"))
}

pub(crate) fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

pub(crate) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// `{epoch, first, last, …}`.
fn parse_head(v: &Value) -> Option<Head> {
    let Value::Array(parts) = v else { return None };
    Some(Head {
        epoch: Epoch::from(text(parts.first()?)?),
        first: int(parts.get(1)?)?,
        last: int(parts.get(2)?)?,
    })
}

/// A stream entry `[id, [field, value, …]]`.
fn parse_entry(v: &Value) -> Option<StoredMessage> {
    let Value::Array(entry) = v else { return None };
    let id = text(entry.first()?)?;
    let offset = id.split('-').next()?.parse().ok()?;
    let Value::Array(fields) = entry.get(1)? else {
        return None;
    };
    let body = fields
        .chunks(2)
        .find(|kv| matches!(&kv[0], Value::BulkString(k) if k == b"b"))
        .and_then(|kv| match kv.get(1) {
            Some(Value::BulkString(b)) => Some(b),
            _ => None,
        })?;
    let m = NewMessage::decode(body)?;
    Some(StoredMessage::from_new(offset, m))
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_epoch_says_when_it_was_made() {
        let e = super::new_epoch();
        let (born, random) = e.split_once('-').expect("a dash");
        assert_eq!((born.len(), random.len()), (12, 20), "{e}");
        let ms = u64::from_str_radix(born, 16).expect("hex");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64;
        // Made now: not before 2026, not after this test looked at the clock.
        assert!((1_767_225_600_000..=now).contains(&ms), "{e}");
        assert!(super::new_epoch() != e);
    }
}
