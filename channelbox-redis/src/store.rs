//! [`RedisStore`]: the [`HistoryStore`] on Redis. Offsets and epochs are
//! assigned by Redis, atomically with the write, by the append script (see
//! `scripts`). Appends go through one queue and one task that sends them as
//! pipelines on the command connection, so a caller's appends run in the
//! order it made them while many are in flight together.

use std::sync::Arc;

use async_trait::async_trait;
use channelbox_core::{
    now_ms, Capabilities, Epoch, Head, HistoryLimits, HistoryPage, HistoryStats, HistoryStore, NewMessage,
    PendingAppend, ReadQuery, StoreError, StoreErrorKind, StoredMessage, StreamPosition,
};
use redis::Value;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::broker::SubscriptionHealth;
use crate::durability::{self, ReplicaWait};
use crate::link::{unavailable, Link};
use crate::{keys, scripts};

/// Appends waiting for Redis before new ones are refused as `unavailable`.
const APPEND_QUEUE: usize = 65_536;
/// Most appends sent in one pipeline.
const APPEND_BATCH: usize = 512;
/// Most messages one read returns, whatever it asks: reads are never unbounded.
pub const MAX_READ: usize = 10_000;
/// What a message costs beyond its payload, as counted by
/// [`HistoryStore::message_cost`]: the stream entry, its three fields and the
/// encoded header, roughly as Redis 7 stores them.
pub const MESSAGE_OVERHEAD: u64 = 128;

/// One append waiting for its turn.
struct Job {
    group: String,
    encoded: Vec<u8>,
    size: usize,
    timestamp_ms: u64,
    except: Option<Uuid>,
    done: oneshot::Sender<Result<StreamPosition, StoreError>>,
}

/// History in Redis, shared by every server of a cluster.
#[derive(Clone, Debug)]
pub struct RedisStore {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    link: Arc<Link>,
    limits: HistoryLimits,
    appends: mpsc::Sender<Job>,
    /// Whether the broker's subscription connection is up too (a cluster
    /// without it would miss messages).
    pubsub: Arc<SubscriptionHealth>,
}

impl RedisStore {
    pub(crate) fn new(
        link: Arc<Link>,
        limits: HistoryLimits,
        pubsub: Arc<SubscriptionHealth>,
        wait: Option<ReplicaWait>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(APPEND_QUEUE);
        tokio::spawn(run_appends(link.clone(), limits.clone(), rx, wait));
        RedisStore {
            inner: Arc::new(StoreInner {
                link,
                limits,
                appends: tx,
                pubsub,
            }),
        }
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

    async fn script(&self, index: usize, group: &str, args: &[&[u8]]) -> Result<Value, StoreError> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.inner.link.sha(index)?)
            .arg(2)
            .arg(keys::head(group))
            .arg(keys::stream(group))
            .arg(new_epoch().as_str());
        for a in args {
            cmd.arg(*a);
        }
        self.inner.link.query::<Value>(&cmd).await
    }

    /// The oldest timestamp a message may have now, as a script argument.
    fn oldest_allowed(&self) -> String {
        self.inner.limits.oldest_allowed(now_ms()).unwrap_or(0).to_string()
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

/// A fresh epoch: offered to every script, used when the group has none.
fn new_epoch() -> String {
    Uuid::new_v4().simple().to_string()
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
        let oldest = self.oldest_allowed();
        let value = self.script(scripts::HEAD_SCRIPT, group, &[oldest.as_bytes()]).await?;
        parse_head(&value).ok_or_else(|| corrupt("head"))
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
        let (n, limit, oldest) = (n.to_string(), limit.to_string(), self.oldest_allowed());
        let args: [&[u8]; 4] = [oldest.as_bytes(), mode.as_bytes(), n.as_bytes(), limit.as_bytes()];
        let value = self.script(scripts::READ, group, &args).await?;
        let Value::Array(parts) = &value else {
            return Err(corrupt("read"));
        };
        let head = parse_head(&value).ok_or_else(|| corrupt("read head"))?;
        let entries = match parts.get(3) {
            Some(Value::Array(e)) => e,
            _ => return Err(corrupt("read entries")),
        };
        let mut messages = entries
            .iter()
            .map(parse_entry)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| corrupt("entry"))?;
        if mode == "last" {
            messages.reverse();
        }
        Ok(HistoryPage { head, messages })
    }

    async fn flush_group(&self, group: &str) -> Result<Epoch, StoreError> {
        Self::check(group)?;
        let channel = keys::channel(group);
        let value = self.script(scripts::FLUSH, group, &[channel.as_bytes()]).await?;
        match value {
            Value::BulkString(b) => Ok(Epoch::from(String::from_utf8_lossy(&b).into_owned())),
            _ => Err(corrupt("flush")),
        }
    }

    async fn flush_all(&self) -> Result<(), StoreError> {
        for group in self.groups().await? {
            self.flush_group(&group).await?;
        }
        Ok(())
    }

    async fn stats(&self) -> Result<HistoryStats, StoreError> {
        let mut stats = HistoryStats::default();
        for chunk in self.groups().await?.chunks(500) {
            let mut pipe = redis::pipe();
            for g in chunk {
                pipe.cmd("HMGET").arg(keys::head(g)).arg("n").arg("b");
            }
            let rows: Vec<(Option<u64>, Option<u64>)> = {
                let values = self.inner.link.pipeline(&pipe).await?;
                values
                    .iter()
                    .map(|v| redis::from_redis_value_ref(v).unwrap_or((None, None)))
                    .collect()
            };
            for (n, b) in rows {
                let (n, b) = (n.unwrap_or(0), b.unwrap_or(0));
                stats.messages += n;
                stats.bytes += b;
                stats.cost += b + n * MESSAGE_OVERHEAD;
            }
        }
        Ok(stats)
    }

    fn healthy(&self) -> bool {
        self.inner.link.is_up() && self.inner.pubsub.healthy()
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, format!("redis: unexpected answer to {what}"))
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
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

/// `{epoch, offset}` from the append script.
fn parse_position(v: &Value) -> Option<StreamPosition> {
    let Value::Array(parts) = v else { return None };
    Some(StreamPosition::new(
        Epoch::from(text(parts.first()?)?),
        int(parts.get(1)?)?,
    ))
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

/// The append task: takes queued appends in order and sends them as one
/// pipeline, one pipeline at a time.
async fn run_appends(link: Arc<Link>, limits: HistoryLimits, mut rx: mpsc::Receiver<Job>, wait: Option<ReplicaWait>) {
    let max_bytes = limits.max_bytes.to_string();
    let max_count = limits.max_messages.unwrap_or(0).to_string();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < APPEND_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let result = match link.sha(scripts::APPEND) {
            Ok(sha) => {
                let oldest = limits.oldest_allowed(now_ms()).unwrap_or(0).to_string();
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for job in &batch {
                    let except = job.except.map(|id| id.to_string()).unwrap_or_default();
                    pipe.cmd("EVALSHA")
                        .arg(sha)
                        .arg(2)
                        .arg(keys::head(&job.group))
                        .arg(keys::stream(&job.group))
                        .arg(new_epoch())
                        .arg(&oldest)
                        .arg(&job.encoded[..])
                        .arg(job.size)
                        .arg(job.timestamp_ms)
                        .arg(&max_bytes)
                        .arg(&max_count)
                        .arg(keys::channel(&job.group))
                        .arg(except);
                }
                durability::send(&link, pipe, &wait).await
            }
            Err(err) => Err(err),
        };
        answer(batch, result);
    }
}

fn answer(batch: Vec<Job>, result: Result<Vec<Value>, StoreError>) {
    match result {
        Ok(values) => {
            for (job, value) in batch
                .into_iter()
                .zip(values.iter().map(Some).chain(std::iter::repeat(None)))
            {
                let answer = match value {
                    Some(Value::ServerError(e)) => Err(unavailable(format!("append failed: {}", e.code()))),
                    Some(v) => parse_position(v).ok_or_else(|| corrupt("append")),
                    None => Err(corrupt("append: too few answers")),
                };
                let _ = job.done.send(answer);
            }
        }
        Err(err) => {
            let text = err.to_string();
            for job in batch {
                let _ = job.done.send(Err(unavailable(&text)));
            }
        }
    }
}
