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

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use channelbox_core::DurableFuture;
use tokio::sync::watch;

use crate::config::CommitMode;
use crate::error::SledError;

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
    /// Set once a write or flush failed. Writes not durable by then fail with
    /// it, and the store refuses new ones: its memory and its disk may differ.
    pub(crate) error: Option<Arc<str>>,
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

    /// The thread: apply, flush, publish, until shut down with nothing queued.
    pub(crate) fn run(&self, db: &sled::Db) {
        let mut batch = Vec::new();
        loop {
            let last = {
                let mut q = self.lock();
                while q.ops.is_empty() && !q.shutdown {
                    q.idle = true;
                    q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                q.idle = false;
                if q.ops.is_empty() {
                    return;
                }
                std::mem::swap(&mut q.ops, &mut batch);
                q.written
            };
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
            batch.shrink_to(KEEP_CAPACITY);
            self.progress.send_modify(|p| p.applied = last);
            self.flush(db, last);
        }
    }

    /// Flushes sled; on success every write up to `seq` is durable.
    fn flush(&self, db: &sled::Db, seq: u64) {
        if self.progress.borrow().error.is_some() {
            return;
        }
        match db.flush() {
            Ok(_) => self.progress.send_modify(|p| {
                p.applied = p.applied.max(seq);
                p.durable = seq;
            }),
            Err(err) => self.fail(&err.to_string()),
        }
    }

    fn fail(&self, why: &str) {
        tracing::error!(error = why, "history write failed; the store refuses further writes");
        self.progress.send_modify(|p| p.error = Some(Arc::from(why)));
    }
}
