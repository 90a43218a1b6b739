//! One connected client: its id, its bounded outgoing queue and the writer task
//! that drains that queue into a transport's [`FrameSink`].
//!
//! The queue is the only place where a broadcast meets a client. A broadcast calls
//! [`Channel::try_send`], which takes a short lock, pushes a shared frame and
//! returns: it never waits for the client. The writer task, spawned by
//! [`Channel::open`], waits for frames, takes everything queued (up to a batch) and
//! hands the whole batch to the sink, which writes it and flushes once. A slow
//! client therefore costs one full queue, never a stalled broadcast.
//!
//! With a [`ChannelConfig::write_delay`], a broadcast's frames may wait up to
//! that long for the ones that follow, so that a steady trickle goes out a few
//! frames per write instead of one: see `writer.rs` for when the writer holds
//! frames back and what ends the wait early.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use uuid::Uuid;

use crate::payload::{Frame, PayloadType};
use crate::transport::{CloseReason, FrameSink};
pub use config::{ChannelConfig, OverflowPolicy};
use signal::Signal;
use writer::run_writer;

mod config;
#[cfg(test)]
mod layout;
mod polite;
mod signal;
mod writer;

/// Why [`Channel::try_send`] did not queue a frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The queue was full; the overflow policy was applied.
    #[error("the channel's queue is full")]
    Overflow,
    /// The channel is closed or closing.
    #[error("the channel is closed")]
    Closed,
}

/// A frame that was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enqueued {
    /// Older frames dropped to make room (only with [`OverflowPolicy::DropOldest`]).
    pub dropped: usize,
}

/// Counters of one channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Frames accepted into the queue.
    pub queued: u64,
    /// Frames written to the sink.
    pub written: u64,
    /// Frames refused or dropped because the queue was full.
    pub overflowed: u64,
    /// Frames currently queued.
    pub pending_frames: usize,
    /// Bytes currently queued.
    pub pending_bytes: usize,
}

type CloseHook = Box<dyn FnOnce(&Channel) + Send>;

/// Whether a frame may wait for the frames that follow it
/// ([`ChannelConfig::write_delay`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Push {
    /// Written as soon as the writer can: a reply, a ping, a replay.
    Now,
    /// A broadcast's frame: it may wait up to the write delay.
    Coalesce,
}

/// What the writer needs to be told when a frame is pushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    /// The writer waits for a wake-up: the next push gives it.
    Idle,
    /// The writer will look at the queue again by itself (it is writing, or
    /// holding frames back until its write delay passes): only a frame
    /// pushed with [`Push::Now`], or a queue a quarter full, wakes it.
    Holding,
    /// The writer was woken, or must not hold frames back: no push needs to
    /// wake it.
    Woken,
}

/// Where the channel is in its life.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// A close was requested (`Queue::reason`); the writer sends it and ends.
    Closing,
    /// The writer ended.
    Closed,
}

/// Everything behind the channel's lock. A broadcast's push touches only the
/// fields up to `phase`, which share one cache line with the lock (see
/// [`Shared`]): at 10,000 members every push meets a cold channel, and each
/// line it needs is a cache miss. The byte counts are `u32` so that they fit
/// there (a queue bound above 4 GiB is clamped; it would not fit in memory).
#[repr(C)]
struct Queue {
    frames: VecDeque<Frame>,
    /// Bytes queued; never more than `max_bytes`.
    bytes: u32,
    // The queue's own bounds, kept next to what they bound.
    max_bytes: u32,
    max_frames: u32,
    overflow: OverflowPolicy,
    payload_type: PayloadType,
    phase: Phase,
    wake: Wake,
    // Rarely touched from here on.
    /// Frames the writer took.
    taken: u64,
    /// Frames accepted and then thrown away (overflow, an abnormal close).
    discarded: u64,
    /// Why the channel is closing or closed.
    reason: Option<CloseReason>,
    hooks: Vec<CloseHook>,
}

// `written`, then the lock's own word (8 bytes with std's futex mutex), then
// the queue: its hot fields must end inside the first line (a test checks
// where the lock puts the queue). `wake` is the last of them.
const _: () = assert!(std::mem::offset_of!(Queue, wake) > std::mem::offset_of!(Queue, phase));
const _: () = assert!(std::mem::offset_of!(Shared, queue) + 8 + std::mem::offset_of!(Queue, wake) < 64);

impl Queue {
    fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// Throws the queued frames away, counting them.
    fn discard(&mut self) {
        self.discarded += self.frames.len() as u64;
        self.frames = VecDeque::new();
        self.bytes = 0;
    }

    fn start_closing(&mut self, reason: CloseReason) {
        self.phase = Phase::Closing;
        self.reason = Some(reason);
    }

    fn reason(&self) -> CloseReason {
        self.reason.clone().unwrap_or(CloseReason::ABNORMAL)
    }
}

/// A channel's state. The lock and the queue's hot fields come first and the
/// struct is aligned to a cache line, so a broadcast's push costs one line
/// here (and one in the queue's buffer). `written` shares that line: a
/// broadcast reads it, without the lock, to bring the line in ahead of the
/// push ([`Channel::warm`]).
#[repr(C, align(64))]
struct Shared {
    written: AtomicU64,
    queue: Mutex<Queue>,
    id: Uuid,
    config: ChannelConfig,
    created: Instant,
    /// Milliseconds after `created` of the last activity.
    last_activity: AtomicU64,
    /// Milliseconds after `created` of the last frame of any kind from the
    /// peer, pongs included: what heartbeats judge liveness by.
    last_heard: AtomicU64,
    /// Wakes the writer: frames arrived, a close was requested.
    wake: Signal,
    /// Wakes everyone waiting in [`Channel::closed`].
    closed: Notify,
    /// Wakes everyone waiting in [`Channel::half_empty`]: the writer took a batch.
    drained: Notify,
    /// How many wait in [`Channel::half_empty`]; the writer skips the wake-up
    /// (a lock inside `Notify`) when none do, which is nearly always.
    pacing: AtomicU64,
    overflowed: AtomicU64,
}

/// One connected client, transport-agnostic. Cheap to clone; all clones are the
/// same channel. Its writer task keeps it alive: dropping every handle does not
/// close it, [`Channel::close`] does (or the transport failing).
#[derive(Clone)]
pub struct Channel {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.shared.id)
            .field("payload_type", &self.shared.config.payload_type)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl PartialEq for Channel {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Eq for Channel {}

impl Channel {
    /// Creates a channel with a new random id and spawns its writer task on the
    /// current tokio runtime.
    ///
    /// # Panics
    /// Panics when called outside a tokio runtime, like `tokio::spawn`.
    pub fn open(config: ChannelConfig, sink: impl FrameSink) -> Channel {
        Self::open_with_id(Uuid::new_v4(), config, sink)
    }

    /// Like [`Channel::open`], with a given id.
    pub fn open_with_id(id: Uuid, config: ChannelConfig, sink: impl FrameSink) -> Channel {
        let channel = Channel {
            shared: Arc::new(Shared {
                written: AtomicU64::new(0),
                queue: Mutex::new(Queue {
                    frames: VecDeque::new(),
                    bytes: 0,
                    max_bytes: u32::try_from(config.max_queue_bytes).unwrap_or(u32::MAX),
                    // A queue of four billion frames would not fit in memory anyway.
                    max_frames: u32::try_from(config.max_queue_frames).unwrap_or(u32::MAX),
                    overflow: config.overflow,
                    payload_type: config.payload_type,
                    phase: Phase::Open,
                    wake: Wake::Idle,
                    taken: 0,
                    discarded: 0,
                    reason: None,
                    hooks: Vec::new(),
                }),
                id,
                config,
                created: Instant::now(),
                last_activity: AtomicU64::new(0),
                last_heard: AtomicU64::new(0),
                wake: Signal::default(),
                closed: Notify::new(),
                drained: Notify::new(),
                pacing: AtomicU64::new(0),
                overflowed: AtomicU64::new(0),
            }),
        };
        tokio::spawn(run_writer(channel.clone(), sink));
        channel
    }

    /// The channel's id.
    pub fn id(&self) -> Uuid {
        self.shared.id
    }

    /// The channel's payload type.
    pub fn payload_type(&self) -> PayloadType {
        self.shared.config.payload_type
    }

    /// The channel's configuration.
    pub fn config(&self) -> &ChannelConfig {
        &self.shared.config
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A poisoned queue only means a panic elsewhere while it was held; the
        // queue itself is always left consistent, so keep going.
        self.shared.queue.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Brings the line a push locks into the cache without taking the lock.
    /// A broadcast warms a run of members before pushing to them, so their
    /// cache misses overlap instead of each stalling its own push.
    pub(crate) fn warm(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Hands an encoded frame to the channel without waiting. On a full queue the
    /// overflow policy is applied and counted.
    /// The frame is written as soon as the writer can, without the write
    /// delay, and takes any frames held back for it along.
    pub fn try_send(&self, frame: Frame) -> Result<Enqueued, SendError> {
        self.try_send_with(|_| frame, Push::Now)
    }

    /// Like [`Channel::try_send`], with the frame made for the channel's payload
    /// type under its lock (`frame` must be quick, like cloning a cached frame).
    /// A broadcast uses this so that its push reads nothing but the queue's line,
    /// with [`Push::Coalesce`].
    pub(crate) fn try_send_with(
        &self,
        frame: impl FnOnce(PayloadType) -> Frame,
        push: Push,
    ) -> Result<Enqueued, SendError> {
        let mut q = self.lock();
        if !q.is_open() {
            return Err(SendError::Closed);
        }
        let frame = frame(q.payload_type);
        let len = frame.len();
        let fits = |q: &Queue| q.frames.len() < q.max_frames as usize && q.bytes as usize + len <= q.max_bytes as usize;
        let mut dropped = 0;
        if !fits(&q) {
            self.shared.overflowed.fetch_add(1, Ordering::Relaxed);
            match q.overflow {
                OverflowPolicy::Disconnect => {
                    // Queued frames are useless to a client that will reconnect
                    // and recover from history: free them now.
                    q.discard();
                    q.start_closing(CloseReason::SLOW_CONSUMER);
                    drop(q);
                    self.shared.wake.notify();
                    return Err(SendError::Overflow);
                }
                OverflowPolicy::DropOldest => {
                    if len > q.max_bytes as usize || q.max_frames == 0 {
                        return Err(SendError::Overflow);
                    }
                    while !fits(&q) {
                        match q.frames.pop_front() {
                            Some(old) => {
                                q.bytes -= old.len() as u32;
                                q.discarded += 1;
                                dropped += 1;
                            }
                            None => break,
                        }
                    }
                }
            }
        }
        self.push_and_wake(q, frame, push);
        Ok(Enqueued { dropped })
    }

    /// Asks the channel to close with this reason. Frames already queued are sent
    /// first, unless the reason is [`CloseReason::ABNORMAL`] (the transport is gone).
    /// Closing twice keeps the first reason.
    pub fn close(&self, reason: CloseReason) {
        let mut q = self.lock();
        if !q.is_open() {
            return;
        }
        if reason == CloseReason::ABNORMAL {
            q.discard();
        }
        q.start_closing(reason);
        drop(q);
        self.shared.wake.notify();
    }

    /// Whether the channel is closing or closed.
    pub fn is_closed(&self) -> bool {
        !self.lock().is_open()
    }

    /// The reason the channel closed, once its writer has ended.
    pub fn close_reason(&self) -> Option<CloseReason> {
        let q = self.lock();
        (q.phase == Phase::Closed).then(|| q.reason())
    }

    /// Whether less than half of the queue's frames and bytes are in use.
    pub fn is_half_empty(&self) -> bool {
        let q = self.lock();
        q.frames.len() < q.max_frames as usize / 2 && q.bytes < q.max_bytes / 2
    }

    /// Waits until less than half of the queue is in use, or the channel is
    /// closing. A producer with many frames for one channel (a replay) paces
    /// itself with this instead of overflowing the queue of a client that
    /// reads as fast as it can.
    pub async fn half_empty(&self) {
        // Registered before the queue is checked under its lock, so a writer
        // that drains after the check sees the registration and wakes us.
        self.shared.pacing.fetch_add(1, Ordering::SeqCst);
        let _registered = PacingGuard(&self.shared.pacing);
        loop {
            let notified = self.shared.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_half_empty() || self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// Waits until the writer task has ended (the channel is closed for good).
    pub async fn closed(&self) {
        loop {
            let notified = self.shared.closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().phase == Phase::Closed {
                return;
            }
            notified.await;
        }
    }

    /// Records activity from the client: it postpones expiry.
    pub fn touch(&self) {
        let now = self.shared.created.elapsed().as_millis() as u64;
        self.shared.last_activity.store(now, Ordering::Relaxed);
    }

    /// Records that something arrived from the peer — any frame, pongs
    /// included — for [`Channel::silence`]. Unlike [`Channel::touch`] it does
    /// not postpone expiry.
    pub fn heard(&self) {
        let now = self.shared.created.elapsed().as_millis() as u64;
        self.shared.last_heard.store(now, Ordering::Relaxed);
    }

    /// How long nothing has arrived from the peer (since [`Channel::heard`]
    /// was last called, or since the channel opened).
    pub fn silence(&self) -> Duration {
        let last = Duration::from_millis(self.shared.last_heard.load(Ordering::Relaxed));
        self.shared.created.elapsed().saturating_sub(last)
    }

    /// Runs `hook` once when the channel has closed (at once if it already has).
    pub fn on_close(&self, hook: impl FnOnce(&Channel) + Send + 'static) {
        let mut q = self.lock();
        if q.phase == Phase::Closed {
            drop(q);
            hook(self);
            return;
        }
        q.hooks.push(Box::new(hook));
    }

    /// The channel's counters.
    pub fn stats(&self) -> ChannelStats {
        let q = self.lock();
        ChannelStats {
            queued: q.taken + q.frames.len() as u64 + q.discarded,
            written: self.shared.written.load(Ordering::Relaxed),
            overflowed: self.shared.overflowed.load(Ordering::Relaxed),
            pending_frames: q.frames.len(),
            pending_bytes: q.bytes as usize,
        }
    }

    /// When the channel expires if nothing happens before, if it has an expiry.
    fn expiry_deadline(&self) -> Option<Instant> {
        let expiry = self.shared.config.expiry?;
        let last = Duration::from_millis(self.shared.last_activity.load(Ordering::Relaxed));
        Some(self.shared.created + last + expiry)
    }

    fn finish(&self, reason: CloseReason) {
        let hooks = {
            let mut q = self.lock();
            q.discard();
            q.phase = Phase::Closed;
            q.reason = Some(reason);
            std::mem::take(&mut q.hooks)
        };
        self.shared.closed.notify_waiters();
        self.shared.drained.notify_waiters();
        for hook in hooks {
            hook(self);
        }
    }
}

/// Unregisters a [`Channel::half_empty`] waiter, also when its future is dropped.
struct PacingGuard<'a>(&'a AtomicU64);

impl Drop for PacingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
