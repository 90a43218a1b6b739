//! The append task of [`crate::RedisStore`]: appends wait in one queue and
//! are sent by one task as pipelines of the append script, each with its
//! group's floor, so a caller's appends run in the order it made them while
//! many are in flight together. A flushed script cache (`NOSCRIPT`) makes it
//! load the scripts and send what did not run again, in order.
//!
//! After a reconnect to a Redis that restarted or failed over (its `run_id`
//! changed), appends wait until [`RESTART_HOLD`] after the connection came
//! up: Redis may have come back older than the servers saw it, and every
//! server that was connected reconnects and checks the groups it has floors
//! for within that time, so an offset Redis lost is not handed out again by
//! a server that never saw it (see `scripts`, `floors`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use channelbox_core::{now_ms, Epoch, HistoryLimits, StoreError, StreamPosition};
use redis::Value;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::durability::{self, ReplicaWait};
use crate::floors::Floors;

/// How long appends wait after reconnecting to a restarted Redis.
pub(crate) const RESTART_HOLD: Duration = Duration::from_millis(1000);
use crate::link::Link;
use crate::store::{corrupt, int, new_epoch, text, APPEND_BATCH};
use crate::{keys, scripts};

/// One append waiting for its turn.
pub(crate) struct Job {
    pub(crate) group: String,
    pub(crate) encoded: Vec<u8>,
    pub(crate) size: usize,
    pub(crate) timestamp_ms: u64,
    pub(crate) except: Option<Uuid>,
    pub(crate) done: oneshot::Sender<Result<StreamPosition, StoreError>>,
}

/// What the store and its append task share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// What this server knows Redis handed out, per group.
    pub(crate) floors: Arc<Floors>,
    /// Seconds a group's keys live without a saved message.
    pub(crate) meta_ttl: String,
    /// Messages and payload bytes this server's appends saved and have not
    /// trimmed themselves: this server's share of the cluster's history.
    pub(crate) messages: AtomicU64,
    pub(crate) bytes: AtomicU64,
}

impl Shared {
    pub(crate) fn new(floors: Arc<Floors>, meta_ttl: Duration) -> Self {
        Shared {
            floors,
            meta_ttl: meta_ttl.as_secs().max(1).to_string(),
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// The arguments every group script starts with (see `scripts`).
    pub(crate) fn common_args(
        &self,
        group: &str,
        oldest: &str,
        floor: Option<&StreamPosition>,
    ) -> [Vec<u8>; scripts::COMMON_ARGS] {
        let (floor_epoch, floor_offset) = match floor {
            Some(at) => (
                at.epoch.as_str().as_bytes().to_vec(),
                at.offset.to_string().into_bytes(),
            ),
            None => (Vec::new(), b"0".to_vec()),
        };
        [
            new_epoch().into_bytes(),
            oldest.as_bytes().to_vec(),
            floor_epoch,
            floor_offset,
            self.meta_ttl.as_bytes().to_vec(),
            keys::channel(group).into_bytes(),
        ]
    }

    /// Counts a saved message and what its append trimmed.
    fn count(&self, size: u64, trimmed: u64, trimmed_bytes: u64) {
        let _ = self.messages.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            Some((n + 1).saturating_sub(trimmed))
        });
        let _ = self.bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
            Some((b + size).saturating_sub(trimmed_bytes))
        });
    }
}

/// `{epoch, offset, trimmed messages, trimmed bytes}` from the append script.
fn parse_append(v: &Value) -> Option<(StreamPosition, u64, u64)> {
    let Value::Array(parts) = v else { return None };
    let at = StreamPosition::new(Epoch::from(text(parts.first()?)?), int(parts.get(1)?)?);
    Some((at, int(parts.get(2)?)?, int(parts.get(3)?)?))
}

/// The append task: takes queued appends in order and sends them as one
/// pipeline, one pipeline at a time.
pub(crate) struct Appender {
    /// The connection the last batch went on (`Link::connected_at`).
    pub(crate) connection: u64,
    /// The `run_id` of the Redis it went to.
    pub(crate) run_id: Option<String>,
    pub(crate) link: Arc<Link>,
    pub(crate) limits: HistoryLimits,
    pub(crate) shared: Arc<Shared>,
    /// `--redis-replicas`: each pipeline ends with a `WAIT` (see `durability`).
    pub(crate) wait: Option<ReplicaWait>,
}

impl Appender {
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < APPEND_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.hold_after_restart().await;
            let mut answers = per_job(self.send(&batch).await, batch.len());
            // A flushed script cache fails every append of the batch from
            // some point on, none of which ran: load the scripts and send
            // those again, in order, once.
            let retry_from = answers
                .iter()
                .position(|a| matches!(a, Ok(Value::ServerError(e)) if e.code() == "NOSCRIPT"));
            if let Some(from) = retry_from {
                let again = match self.link.reload_scripts().await {
                    Ok(()) => self.send(&batch[from..]).await,
                    Err(err) => Err(err),
                };
                answers.truncate(from);
                answers.extend(per_job(again, batch.len() - from));
            }
            self.answer(batch, answers);
        }
    }

    /// On a new connection, asks Redis for its `run_id`; when it changed (a
    /// restart or a failover), waits until [`RESTART_HOLD`] after the
    /// connection came up.
    async fn hold_after_restart(&mut self) {
        let connection = self.link.connected_at();
        if connection == self.connection {
            return;
        }
        self.connection = connection;
        let mut cmd = redis::cmd("INFO");
        cmd.arg("server");
        let Ok(info) = self.link.query::<String>(&cmd).await else {
            return;
        };
        let run_id = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned());
        let before = std::mem::replace(&mut self.run_id, run_id.clone());
        if before.is_some() && before != run_id {
            let until = connection + RESTART_HOLD.as_millis() as u64;
            let wait = until.saturating_sub(now_ms());
            tracing::info!(
                wait_ms = wait,
                "redis restarted or failed over: appends wait for the floors check"
            );
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }

    /// Sends appends as one pipeline, each with its group's floor.
    async fn send(&self, jobs: &[Job]) -> Result<Vec<Value>, StoreError> {
        let sha = self.link.sha(scripts::APPEND)?;
        let now = now_ms();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for job in jobs {
            // Each group's own limits (its namespace's), as the script's arguments.
            let limits = self.limits.limits_for(&job.group);
            let max_bytes = limits.max_bytes.to_string();
            // The script reads 0 as "no count limit"; a limit of 0 keeps the
            // newest message, as a limit of 1 does.
            let max_count = limits.max_messages.map_or(0, |m| m.max(1)).to_string();
            let oldest = limits.oldest_allowed(now).unwrap_or(0).to_string();
            let except = job.except.map(|id| id.to_string()).unwrap_or_default();
            let floor = self.shared.floors.get(&job.group, None);
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(sha)
                .arg(2)
                .arg(keys::head(&job.group))
                .arg(keys::stream(&job.group));
            for a in self.shared.common_args(&job.group, &oldest, floor.as_ref()) {
                cmd.arg(a);
            }
            cmd.arg(&job.encoded[..])
                .arg(job.size)
                .arg(job.timestamp_ms)
                .arg(&max_bytes)
                .arg(&max_count)
                .arg(except);
        }
        durability::send(&self.link, pipe, &self.wait).await
    }

    fn answer(&self, batch: Vec<Job>, answers: Vec<Result<Value, StoreError>>) {
        for (job, answer) in batch.into_iter().zip(answers) {
            let answer = match answer {
                Err(err) => Err(err),
                Ok(Value::ServerError(e)) => {
                    self.link.note_error_code(e.code());
                    Err(crate::link::refused("append", &e))
                }
                Ok(v) => parse_append(&v)
                    .ok_or_else(|| corrupt("append"))
                    .map(|(at, trimmed, trimmed_bytes)| {
                        self.shared.floors.note(&job.group, &at);
                        self.shared.count(job.size as u64, trimmed, trimmed_bytes);
                        at
                    }),
            };
            let _ = job.done.send(answer);
        }
    }
}

/// A pipeline's answer as one result per job (`n` of them).
fn per_job(result: Result<Vec<Value>, StoreError>, n: usize) -> Vec<Result<Value, StoreError>> {
    match result {
        Ok(values) => {
            let mut out: Vec<_> = values.into_iter().take(n).map(Ok).collect();
            while out.len() < n {
                out.push(Err(corrupt("append: too few answers")));
            }
            out
        }
        // Every job shares the pipeline's fate, and its kind: an unanswered
        // pipeline may have run.
        Err(err) => (0..n).map(|_| Err(err.clone())).collect(),
    }
}
