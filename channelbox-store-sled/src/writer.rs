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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use channelbox_core::DurableFuture;
use tokio::sync::watch;

use crate::config::CommitMode;
use crate::error::SledError;
use crate::progress::Progress;

/// How often a failing store tries to reopen sled and resume.
const RETRY: Duration = Duration::from_secs(1);

/// What the writer thread needs of the store around it.
pub(crate) trait Disk: Sync {
    /// Runs `f` on the open database; `None` while it is being reopened.
    fn with_db<R>(&self, f: impl FnOnce(&sled::Db) -> R) -> Option<R>;

    /// Reopens sled after a failure: rolls back every write after `durable`
    /// (see `recover.rs`), reloads the store's memory from disk, and discards
    /// what is still queued. Returns the sequence number of the newest write
    /// discarded.
    fn reopen(&self, durable: u64) -> Result<u64, SledError>;

    /// The record of batch `batch`, which holds the writes after `durable`
    /// up to `upto`: the operation that writes it (see `marker.rs`).
    fn record(&self, batch: u64, durable: u64, upto: u64) -> Op;

    /// Makes durable that batch `batch` failed (see `marker.rs`).
    fn mark_failed(&self, batch: u64) -> std::io::Result<()>;
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
    #[cfg(feature = "failpoints")]
    faults: Faults,
}

/// Faults a test injects into the writer (feature `failpoints` only).
#[cfg(feature = "failpoints")]
#[derive(Debug, Default)]
struct Faults {
    /// The thread takes no work while set, so that writes gather in a batch.
    paused: bool,
    /// The next batch applies at most this many operations, then fails.
    fail_after: Option<usize>,
    /// A failing store does not recover while set, as if the disk stayed full.
    recovery_held: bool,
    /// The failure mark cannot be written while set.
    marks_fail: bool,
    /// Reopening fails after sled opened while set.
    reopens_fail: bool,
    /// The thread panics at its next batch.
    panic: bool,
}

impl Queue {
    /// Whether the thread must leave the queue alone for now.
    fn held(&self) -> bool {
        #[cfg(feature = "failpoints")]
        if self.faults.paused && !self.shutdown {
            return true;
        }
        self.ops.is_empty() && !self.shutdown
    }

    /// The failure injected into the batch taken now, if any.
    fn take_fault(&mut self) -> Option<usize> {
        #[cfg(feature = "failpoints")]
        return self.faults.fail_after.take();
        #[cfg(not(feature = "failpoints"))]
        None
    }
}

/// Waits until the progress mark `mark` reaches `seq`; fails if a write failed
/// first, or the writer is gone.
async fn reach(
    mut rx: watch::Receiver<Progress>,
    seq: u64,
    reader: bool,
    path: &std::path::Path,
) -> Result<(), SledError> {
    let p = rx
        .wait_for(|p| p.durable >= seq || p.error.is_some() || reader && p.unmarked.is_some())
        .await
        .map_err(|_| SledError::Closed(path.to_owned()))?;
    // Judged on the borrowed progress: no copy of its ranges per wait.
    if p.lost(seq) {
        return Err(SledError::Flush(path.to_owned(), "the write failed".into()));
    }
    let why = p.error.as_ref().or(p.unmarked.as_ref().map(|(_, why)| why));
    match why {
        Some(why) if p.durable < seq => Err(SledError::Flush(path.to_owned(), why.to_string())),
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
    /// The number of the next batch (see `marker.rs`); numbers keep rising
    /// across restarts.
    batches: AtomicU64,
    /// The batch being applied and not yet durable (0: none).
    in_flight: AtomicU64,
}

impl Writer {
    /// A writer whose first batch has number `first_batch`.
    pub(crate) fn new(mode: CommitMode, first_batch: u64) -> Self {
        Writer {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            progress: watch::channel(Progress::default()).0,
            mode,
            batches: AtomicU64::new(first_batch),
            in_flight: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue is consistent between statements; a panic elsewhere does not
        // leave it half-updated.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why the store refuses writes, if it does.
    pub(crate) fn failure(&self) -> Option<Arc<str>> {
        let p = self.progress.borrow();
        p.error
            .clone()
            .or_else(|| p.unmarked.as_ref().map(|(_, why)| why.clone()))
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
        Box::pin(async move { Ok(reach(rx, seq, false, &path).await?) })
    }

    /// Waits until write `seq` is on disk; fails if it failed, the store is
    /// failing, or the writer is gone.
    pub(crate) async fn durable_wait(&self, seq: u64, path: &std::path::Path) -> Result<(), SledError> {
        reach(self.progress.subscribe(), seq, true, path).await
    }

    /// Every write up to this sequence number is on disk.
    pub(crate) fn durable_mark(&self) -> u64 {
        self.progress.borrow().durable
    }

    /// Test only: holds the thread (`true`) so that writes gather into one
    /// batch, or lets it go.
    #[cfg(feature = "failpoints")]
    pub(crate) fn hold(&self, paused: bool) {
        self.lock().faults.paused = paused;
        self.wake.notify_all();
    }

    /// Test only: a failing store stays failing while `held`.
    #[cfg(feature = "failpoints")]
    pub(crate) fn hold_recovery(&self, held: bool) {
        self.lock().faults.recovery_held = held;
    }

    /// Test only: failure marks cannot be written while `failing`.
    #[cfg(feature = "failpoints")]
    pub(crate) fn fail_marks(&self, failing: bool) {
        self.lock().faults.marks_fail = failing;
    }

    /// Test only: the thread panics at its next batch.
    #[cfg(feature = "failpoints")]
    pub(crate) fn panic_next_batch(&self) {
        self.lock().faults.panic = true;
    }

    /// Test only: reopening fails after sled opened while `failing`.
    #[cfg(feature = "failpoints")]
    pub(crate) fn fail_reopens(&self, failing: bool) {
        self.lock().faults.reopens_fail = failing;
    }

    /// Whether a reopening must fail now (a test's injected fault).
    pub(crate) fn reopen_fault(&self) -> bool {
        #[cfg(feature = "failpoints")]
        return self.lock().faults.reopens_fail;
        #[cfg(not(feature = "failpoints"))]
        false
    }

    /// Test only: the next batch applies at most `ops` operations and fails.
    #[cfg(feature = "failpoints")]
    pub(crate) fn fail_next_batch(&self, ops: usize) {
        self.lock().faults.fail_after = Some(ops);
    }

    /// Asks the thread to finish what is queued and end.
    pub(crate) fn shut_down(&self) {
        self.lock().shutdown = true;
        self.wake.notify_all();
    }

    /// Takes everything queued (the newest write's number with it); waits
    /// for work, or at most [`RETRY`] while failing. `None` once shut down
    /// with nothing queued.
    fn take(&self, batch: &mut Vec<(u64, Op)>, failing: bool) -> Option<(u64, Option<usize>)> {
        let mut q = self.lock();
        while q.held() {
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
        let fault = q.take_fault();
        Some((q.written, fault))
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
        loop {
            let failing = self.failure().is_some();
            let Some((last, fault)) = self.take(&mut batch, failing) else {
                // Shut down: a failure not yet marked gets a last attempt,
                // since its writers are about to be told the store closed.
                self.remark(disk);
                return;
            };
            if failing {
                batch.clear();
            } else {
                disk.with_db(|db| self.apply(disk, db, &mut batch, last, fault));
            }
            batch.shrink_to(KEEP_CAPACITY);
            if self.failure().is_some() {
                self.recover(disk);
            }
        }
    }

    /// Applies a batch in order, each unit (the batch, or with
    /// [`CommitMode::PerAppend`] each write) after its record, and flushes
    /// after each unit. `fault`: fail, as a full disk would, once this many
    /// operations are applied (the records not counted), and at the end.
    fn apply(&self, disk: &impl Disk, db: &sled::Db, batch: &mut Vec<(u64, Op)>, last: u64, fault: Option<usize>) {
        // Readers see only what is durable: nothing here is readable before
        // the flush of its unit succeeds.
        let mut left = fault;
        let mut ops = batch.drain(..).peekable();
        while let Some(&(first, _)) = ops.peek() {
            let upto = if self.mode == CommitMode::PerAppend {
                first
            } else {
                last
            };
            let unit = self.batches.fetch_add(1, Ordering::Relaxed);
            self.in_flight.store(unit, Ordering::Relaxed);
            self.injected_panic();
            let record = disk.record(unit, self.durable_mark(), upto);
            let applied = std::iter::once((0, record))
                .chain(std::iter::from_fn(|| ops.next_if(|(seq, _)| *seq <= upto)))
                .enumerate()
                .try_for_each(|(i, (_, op))| {
                    if left == Some(0) {
                        return Err("injected failure".to_owned());
                    }
                    if i > 0 {
                        left = left.map(|n| n - 1);
                    }
                    apply(db, op).map_err(|e| e.to_string())
                });
            let upto = if ops.peek().is_none() { last } else { upto };
            match applied {
                Err(why) => return self.fail(disk, unit, &why),
                Ok(()) if fault.is_some() && upto == last => return self.fail(disk, unit, "injected failure"),
                Ok(()) => {}
            }
            // The checker's mutation: acknowledge without the flush.
            let flushed = match channelbox_core::mutation::active("ack_before_durable") {
                true => Ok(0),
                false => db.flush(),
            };
            if let Err(why) = flushed {
                return self.fail(disk, unit, &why.to_string());
            }
            self.in_flight.store(0, Ordering::Relaxed);
            self.progress.send_modify(|p| p.durable = upto);
        }
    }

    /// Tries to reopen sled and resume. A failure not yet marked on disk is
    /// marked first: until then nobody is told.
    fn recover(&self, disk: &impl Disk) {
        self.remark(disk);
        #[cfg(feature = "failpoints")]
        if self.lock().faults.recovery_held {
            return;
        }
        let durable = self.durable_mark();
        match disk.reopen(durable) {
            Ok(last) => {
                self.progress.send_modify(|p| {
                    p.lose(p.durable + 1, last);
                    p.error = None;
                    p.unmarked = None;
                    p.durable = last;
                });
                tracing::warn!("history writes resumed");
            }
            Err(err) => tracing::debug!(error = %err, "history store still failing"),
        }
    }

    /// The thread panicked: the batch it was applying (or, with none, a
    /// number no record has, which only gives every group a new epoch at the
    /// next opening) counts as failed, and the store stays failing, so that
    /// no reader or writer waits forever. If even the mark cannot be written
    /// now, writers are told all the same: no thread is left to retry.
    pub(crate) fn ended(&self, disk: &impl Disk) {
        let unit = match self.in_flight.load(Ordering::Relaxed) {
            0 => self.batches.load(Ordering::Relaxed),
            unit => unit,
        };
        self.fail(disk, unit, "the history writer thread ended");
        self.progress.send_modify(|p| {
            if let Some((_, why)) = p.unmarked.take() {
                p.error = Some(why);
            }
        });
    }

    /// Test only: panics here if a test asked for it.
    fn injected_panic(&self) {
        #[cfg(feature = "failpoints")]
        if std::mem::take(&mut self.lock().faults.panic) {
            panic!("injected panic of the writer thread");
        }
    }

    /// Tries again to mark a failure whose mark could not be written.
    fn remark(&self, disk: &impl Disk) {
        let unmarked = self.progress.borrow().unmarked.clone();
        if let Some((unit, why)) = unmarked {
            self.fail(disk, unit, &why);
        }
    }

    /// Batch `unit` failed: marks it on disk (`marker.rs`), then tells its
    /// writers; if the mark cannot be written, only refuses new writes.
    fn fail(&self, disk: &impl Disk, unit: u64, why: &str) {
        tracing::error!(
            error = why,
            "history write failed; writes are refused until the store recovers"
        );
        let why: Arc<str> = Arc::from(why);
        match self.mark_failed(disk, unit) {
            Ok(()) => self.progress.send_modify(|p| {
                p.error = Some(why);
                p.unmarked = None;
            }),
            Err(err) => {
                tracing::error!(error = %err, "history store cannot mark its failure on disk; failed writes wait");
                self.progress.send_modify(|p| p.unmarked = Some((unit, why)));
            }
        }
    }

    fn mark_failed(&self, disk: &impl Disk, unit: u64) -> std::io::Result<()> {
        #[cfg(feature = "failpoints")]
        if self.lock().faults.marks_fail {
            return Err(std::io::Error::other("injected failure of the mark"));
        }
        disk.mark_failed(unit)
    }
}
