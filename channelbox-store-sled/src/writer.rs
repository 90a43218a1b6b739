//! The store's one writer thread.
//!
//! Appends do not touch sled: under the store's lock they assign the offset,
//! update the in-memory bookkeeping and queue their sled operations here. One
//! thread applies the queue in order, then flushes sled once for everything it
//! applied (group commit), and publishes how far it got.
//!
//! Why one thread: sled's inserts are cheap on one thread and expensive when two
//! threads insert at once. Measured on this machine's kind (2 cores, 64-byte
//! messages, no flushing at all): one writer task appended 163 k/s, 256 writer
//! tasks on two runtime threads 86 k/s, with the time in futex wake-ups and
//! sled's copy-on-write node clones. sled's atomic `Batch` is slower still (98 k
//! one-insert batches/s against 350 k plain inserts/s on one thread, and its
//! flushes took seconds after many batches), so operations are applied one by
//! one, each write's operations ordered so that any prefix of them, which is
//! what sled recovers after a crash, leaves a consistent history (see the
//! callers in `store.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use channelbox_core::DurableFuture;
use tokio::sync::watch;

use crate::config::CommitMode;
use crate::error::SledError;
use crate::layout::message_key_parts;

/// How often a failing store tries to reopen sled and resume.
const RETRY: Duration = Duration::from_secs(1);

/// Messages written but not acknowledged when the store failed: per group
/// (by its message key prefix), the lowest such offset. Recovery removes
/// them, so that what was answered `unavailable` had no effect.
pub(crate) type Lost = HashMap<Vec<u8>, u64>;

/// What the writer thread needs of the store around it.
pub(crate) trait Disk: Sync {
    /// Runs `f` on the open database; `None` while it is being reopened.
    fn with_db<R>(&self, f: impl FnOnce(&sled::Db) -> R) -> Option<R>;

    /// Reopens sled after a failure: rolls back the `lost` messages, reloads
    /// the store's memory from disk, and discards what is still queued.
    /// Returns the sequence number of the newest write discarded.
    fn reopen(&self, lost: &Lost) -> Result<u64, SledError>;
}

/// At most this many operations wait for the writer before appends are refused
/// with `Busy` (flushes of whole groups may exceed it: they are rare and
/// bounded by the history limits).
pub(crate) const MAX_QUEUED: usize = 1 << 16;

/// One sled operation.
#[derive(Debug)]
pub(crate) enum Op {
    Insert(Vec<u8>, Vec<u8>),
    Remove(Vec<u8>),
    /// Removes the keys `prefix ++ offset` (big-endian) for these offsets, in
    /// order: one queue entry for a whole trim or flush of a group.
    RemoveOffsets(Vec<u8>, std::ops::Range<u64>),
}

/// Applies one operation to sled.
fn apply(db: &sled::Db, op: Op) -> sled::Result<()> {
    match op {
        Op::Insert(k, v) => db.insert(k, v).map(|_| ()),
        Op::Remove(k) => db.remove(k).map(|_| ()),
        Op::RemoveOffsets(mut key, offsets) => {
            let at = key.len();
            for offset in offsets {
                key.truncate(at);
                key.extend_from_slice(&offset.to_be_bytes());
                db.remove(&key[..])?;
            }
            Ok(())
        }
    }
}

/// Queue buffers above this many entries are given back after use, so that
/// one large flush does not keep its memory.
const KEEP_CAPACITY: usize = 4096;

/// Where the writer stands.
#[derive(Clone, Debug, Default)]
pub(crate) struct Progress {
    /// Every write up to this sequence number is in sled, so readable.
    pub(crate) applied: u64,
    /// Every write up to this sequence number is on disk.
    pub(crate) durable: u64,
    /// Set while writes fail. Writes not durable by then fail with it, and
    /// the store refuses new ones until it has reopened sled and rolled the
    /// unacknowledged ones back.
    pub(crate) error: Option<Arc<str>>,
    /// Ranges of sequence numbers (inclusive) whose writes failed: they
    /// never become durable, even once the marks have passed them.
    pub(crate) lost: Vec<(u64, u64)>,
}

#[derive(Debug, Default)]
struct Queue {
    /// Operations with the sequence number of the write they belong to.
    ops: Vec<(u64, Op)>,
    /// Sequence number of the newest write.
    written: u64,
    /// The thread is waiting for work: the next write must wake it (a futex
    /// call, skipped while the thread is busy).
    idle: bool,
    shutdown: bool,
}

/// Waits until the progress mark `mark` reaches `seq`; fails if a write failed
/// first, or the writer is gone.
async fn reach(
    mut rx: watch::Receiver<Progress>,
    seq: u64,
    mark: fn(&Progress) -> u64,
    path: &std::path::Path,
) -> Result<(), SledError> {
    let p = rx
        .wait_for(|p| mark(p) >= seq || p.error.is_some())
        .await
        .map_err(|_| SledError::Closed(path.to_owned()))?
        .clone();
    if p.lost.iter().any(|&(from, to)| (from..=to).contains(&seq)) {
        return Err(SledError::Flush(path.to_owned(), "the write failed".into()));
    }
    match p.error {
        Some(why) if mark(&p) < seq => Err(SledError::Flush(path.to_owned(), why.to_string())),
        _ => Ok(()),
    }
}

/// The queue, its thread's wake-up, and its published progress.
#[derive(Debug)]
pub(crate) struct Writer {
    queue: Mutex<Queue>,
    wake: Condvar,
    progress: watch::Sender<Progress>,
    mode: CommitMode,
}

impl Writer {
    pub(crate) fn new(mode: CommitMode) -> Self {
        Writer {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            progress: watch::channel(Progress::default()).0,
            mode,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue is consistent between statements; a panic elsewhere does not
        // leave it half-updated.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why the store refuses writes, if it does.
    pub(crate) fn failure(&self) -> Option<Arc<str>> {
        self.progress.borrow().error.clone()
    }

    /// Whether an append may queue now.
    pub(crate) fn has_room(&self) -> bool {
        self.lock().ops.len() < MAX_QUEUED
    }

    /// Queues one write's operations, in order; returns its sequence number.
    pub(crate) fn push(&self, ops: impl IntoIterator<Item = Op>) -> u64 {
        let (seq, idle) = {
            let mut q = self.lock();
            q.written += 1;
            let seq = q.written;
            q.ops.extend(ops.into_iter().map(|op| (seq, op)));
            (seq, std::mem::take(&mut q.idle))
        };
        if idle {
            self.wake.notify_one();
        }
        seq
    }

    /// The sequence number of the newest write.
    pub(crate) fn written(&self) -> u64 {
        self.lock().written
    }

    /// Resolves once write `seq` is on disk, or fails with the error that
    /// stopped it.
    pub(crate) fn durable(&self, seq: u64, path: &std::path::Path) -> DurableFuture {
        let rx = self.progress.subscribe();
        let path = path.to_owned();
        Box::pin(async move { Ok(reach(rx, seq, |p| p.durable, &path).await?) })
    }

    /// Waits until write `seq` is in sled, so that a read sees it.
    pub(crate) async fn applied(&self, seq: u64, path: &std::path::Path) -> Result<(), SledError> {
        reach(self.progress.subscribe(), seq, |p| p.applied, path).await
    }

    /// Asks the thread to finish what is queued and end.
    pub(crate) fn shut_down(&self) {
        self.lock().shutdown = true;
        self.wake.notify_all();
    }

    /// Takes everything queued (the newest write's number with it); waits
    /// for work, or at most [`RETRY`] while failing. `None` once shut down
    /// with nothing queued.
    fn take(&self, batch: &mut Vec<(u64, Op)>, failing: bool) -> Option<u64> {
        let mut q = self.lock();
        while q.ops.is_empty() && !q.shutdown {
            q.idle = true;
            if failing {
                q = self.wake.wait_timeout(q, RETRY).unwrap_or_else(|p| p.into_inner()).0;
                break;
            }
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        q.idle = false;
        if q.ops.is_empty() && q.shutdown {
            return None;
        }
        std::mem::swap(&mut q.ops, batch);
        Some(q.written)
    }

    /// Drops every queued operation (after a failure, under the store's
    /// lock); returns the newest write's number.
    pub(crate) fn discard_queued(&self) -> u64 {
        let mut q = self.lock();
        q.ops.clear();
        q.written
    }

    /// The thread: apply, flush, publish, until shut down with nothing queued.
    /// After a failure it applies nothing, and tries to reopen sled every
    /// [`RETRY`] until that succeeds.
    pub(crate) fn run(&self, disk: &impl Disk) {
        let mut batch = Vec::new();
        // Message inserts not yet flushed: what a failure loses.
        let mut unflushed = Lost::new();
        loop {
            let failing = self.progress.borrow().error.is_some();
            let Some(last) = self.take(&mut batch, failing) else {
                return;
            };
            for (_, op) in &batch {
                if let Op::Insert(key, _) = op {
                    if let Some((prefix, offset)) = message_key_parts(key) {
                        let lowest = unflushed.entry(prefix.to_vec()).or_insert(offset);
                        *lowest = (*lowest).min(offset);
                    }
                }
            }
            if failing {
                batch.clear();
            } else {
                disk.with_db(|db| self.apply(db, &mut batch, last));
            }
            batch.shrink_to(KEEP_CAPACITY);
            // Flushed, or failed and then recovered: nothing is unflushed.
            let failed = self.progress.borrow().error.is_some();
            if !failed || self.recover(disk, &unflushed) {
                unflushed.clear();
            }
        }
    }

    /// Applies a batch in order and flushes (once, or per write).
    fn apply(&self, db: &sled::Db, batch: &mut Vec<(u64, Op)>, last: u64) {
        let mut current = batch.first().map_or(last, |(seq, _)| *seq);
        for (seq, op) in batch.drain(..) {
            if self.mode == CommitMode::PerAppend && seq != current {
                self.flush(db, current);
                current = seq;
            }
            if self.progress.borrow().error.is_some() {
                continue;
            }
            if let Err(err) = apply(db, op) {
                self.fail(&err.to_string());
            }
        }
        self.progress.send_modify(|p| p.applied = p.applied.max(last));
        self.flush(db, last);
    }

    /// Tries to reopen sled and resume; whether it did.
    fn recover(&self, disk: &impl Disk, lost: &Lost) -> bool {
        match disk.reopen(lost) {
            Ok(last) => {
                self.progress.send_modify(|p| {
                    if p.durable < last {
                        p.lost.push((p.durable + 1, last));
                    }
                    p.error = None;
                    p.applied = last;
                    p.durable = last;
                });
                tracing::warn!("history writes resumed");
                true
            }
            Err(err) => {
                tracing::debug!(error = %err, "history store still failing");
                false
            }
        }
    }

    /// Flushes sled; on success every write up to `seq` is durable.
    fn flush(&self, db: &sled::Db, seq: u64) {
        if self.progress.borrow().error.is_some() {
            return;
        }
        let flushed = if channelbox_core::mutation::active("ack_before_durable") {
            Ok(0)
        } else {
            db.flush()
        };
        match flushed {
            Ok(_) => self.progress.send_modify(|p| {
                p.applied = p.applied.max(seq);
                p.durable = seq;
            }),
            Err(err) => self.fail(&err.to_string()),
        }
    }

    fn fail(&self, why: &str) {
        tracing::error!(
            error = why,
            "history write failed; writes are refused until the store recovers"
        );
        self.progress.send_modify(|p| p.error = Some(Arc::from(why)));
    }
}
