//! The writer task of a channel: it drains the queue into the transport's
//! [`FrameSink`] a batch per flush, applies the close deadline, and runs the close
//! hooks when the channel ends.
//!
//! **Holding frames back** ([`ChannelConfig::write_delay`](super::ChannelConfig)).
//! Every write is a `send` and, with `TCP_NODELAY`, a TCP segment: at light
//! load (200 messages/s to 1,000 members) nearly every frame was a write of
//! its own, and the kernel's transmit and loopback receive path were most of
//! the server's CPU. So after a write the writer may wait until the write
//! delay has passed since that write began before it writes again, and what
//! a broadcast pushes meanwhile goes out in that one later write. It holds
//! only while frames come more often than the delay — some are queued
//! already when the write ends, or the write began less than the delay after
//! the one before — so a lone message after a quiet spell is written at
//! once, and a quiet connection is not woken again. Holding ends early, and
//! everything queued is written, when a frame that must not wait is pushed
//! (a reply, a ping: [`Channel::try_send`]), when the queue reaches a
//! quarter of its frames or bytes, or when the channel closes. Under heavy
//! load a write takes longer than the delay or the queue holds a quarter,
//! so nothing waits. A frame therefore waits at most the delay, and no more
//! often than a connection writes.
//!
//! One timer per connection per write, not one for the whole server: a
//! connection's writer must run for each write anyway, the timer costs a
//! small fraction of the `send` it saves, and timers fire only for
//! connections that hold frames. A shared tick would have every holding
//! writer register with it just the same.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::{Channel, Phase, Wake};
use crate::payload::Frame;
use crate::transport::{CloseReason, FrameSink};

/// What the writer does next.
enum Step {
    Write,
    Close(CloseReason),
    Wait,
}

/// The writer task: drains the queue into the sink in batches until the channel
/// closes, then sends the close (bounded in time) and runs the close hooks.
pub(super) async fn run_writer(channel: Channel, mut sink: impl FrameSink) {
    let shared = &channel.shared;
    let max_batch = shared.config.max_batch.max(1);
    let delay = shared.config.write_delay;
    let mut batch: VecDeque<Frame> = VecDeque::new();
    // When the last write began, and whether the frames of the next one
    // were held back (both only kept with a write delay). Tokio's clock, so
    // that tests with paused time see the holds they make.
    let mut last_write: Option<tokio::time::Instant> = None;
    let mut held = false;
    // Once a close is requested, what is left to write and the close itself
    // get `close_timeout` in all; then the connection is dropped.
    let mut deadline: Option<Instant> = None;
    let reason = loop {
        let step = match next_step(&channel, &mut batch, max_batch) {
            Ok(step) => step,
            Err(reason) => break reason,
        };
        match step {
            Step::Write => {
                let began = (!delay.is_zero()).then(tokio::time::Instant::now);
                let done = write_batch(&channel, &mut sink, batch.make_contiguous(), &mut deadline).await;
                let n = batch.len() as u64;
                batch.clear();
                if batch.capacity() > 64 {
                    // Give back what a burst left behind: idle connections
                    // must stay small.
                    batch = VecDeque::new();
                }
                if shared.pacing.load(Ordering::SeqCst) > 0 {
                    shared.drained.notify_waiters();
                }
                match done {
                    Some(Ok(())) => {
                        shared.written.fetch_add(n, Ordering::Relaxed);
                        if let Some(began) = began {
                            // Frames come more often than the delay: this
                            // batch was held back, or it began less than the
                            // delay after the last one.
                            let steady = held || last_write.is_some_and(|last| began < last + delay);
                            last_write = Some(began);
                            held = hold(&channel, began + delay, steady).await;
                        }
                    }
                    Some(Err(err)) => {
                        tracing::debug!(channel = %shared.id, error = %err, "sink failed");
                        break CloseReason::ABNORMAL;
                    }
                    None => {
                        // The client never took the frames: drop the connection.
                        let q = channel.lock();
                        break match q.phase {
                            Phase::Closing => q.reason(),
                            _ => CloseReason::ABNORMAL,
                        };
                    }
                }
            }
            Step::Close(reason) => {
                if reason != CloseReason::ABNORMAL {
                    let limit = deadline.unwrap_or_else(|| Instant::now() + shared.config.close_timeout);
                    let _ = tokio::time::timeout_at(limit.into(), sink.close(&reason)).await;
                }
                break reason;
            }
            Step::Wait => {
                held = false;
                wait_for_frames(&channel).await;
            }
        }
    };
    drop(sink);
    channel.finish(reason);
}

/// Takes the next batch out of the queue (into `batch`), or says what else to
/// do; `Err` when the channel is closed already.
fn next_step(channel: &Channel, batch: &mut VecDeque<Frame>, max_batch: usize) -> Result<Step, CloseReason> {
    let mut q = channel.lock();
    Ok(match q.phase {
        Phase::Closed => return Err(q.reason()),
        Phase::Closing if q.frames.is_empty() => Step::Close(q.reason()),
        Phase::Open if q.frames.is_empty() => {
            // From here on the first frame pushed wakes the writer.
            q.wake = Wake::Idle;
            Step::Wait
        }
        Phase::Open | Phase::Closing => {
            debug_assert!(batch.is_empty(), "the last batch was written and cleared");
            // The writer comes back to the queue after this write by
            // itself: pushes meanwhile need not wake it.
            q.wake = Wake::Holding;
            let n = q.frames.len().min(max_batch);
            if n == q.frames.len() {
                // All of it: the queue's buffer becomes the batch and the
                // last batch's (empty) buffer the queue's; no frame moves.
                std::mem::swap(&mut q.frames, batch);
                q.bytes = 0;
            } else {
                batch.extend(q.frames.drain(..n));
                // The batch's frames were counted into `bytes` one by one.
                let bytes: usize = batch.iter().map(Frame::len).sum();
                q.bytes -= bytes as u32;
            }
            q.taken += n as u64;
            if q.frames.is_empty() && q.frames.capacity() > 64 {
                // Give back the memory a burst left behind: idle
                // connections must stay small.
                q.frames = VecDeque::new();
            }
            Step::Write
        }
    })
}

/// After a write that began at `until` minus the write delay: waits until
/// `until` so that the frames pushed meanwhile go out in one write, if
/// frames come more often than the delay (`steady`, or some are queued
/// already). Ends early when a push asked for the writer (a frame that must
/// not wait, a queue a quarter full) or the channel closes. Whether it held.
async fn hold(channel: &Channel, until: tokio::time::Instant, steady: bool) -> bool {
    let holding = |start: bool| {
        let q = channel.lock();
        q.phase == Phase::Open && q.wake == Wake::Holding && (!start || steady || !q.frames.is_empty())
    };
    if until <= tokio::time::Instant::now() || !holding(true) {
        return false;
    }
    let sleep = tokio::time::sleep_until(until);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return true,
            // A wake-up left over from before the hold (given during the
            // write) ends nothing: only the queue's state does.
            _ = channel.shared.wake.notified() => {
                if !holding(false) {
                    return true;
                }
            }
        }
    }
}

/// Writes one batch. A client that stops reading makes `send` wait forever
/// once the socket buffers fill, so the write races a close request, which
/// starts the close deadline; `None` when that deadline passed first.
async fn write_batch(
    channel: &Channel,
    sink: &mut impl FrameSink,
    batch: &[Frame],
    deadline: &mut Option<Instant>,
) -> Option<Result<(), crate::transport::SinkError>> {
    let shared = &channel.shared;
    let write = sink.send(batch);
    tokio::pin!(write);
    // Most batches fit in the socket at once: no race to set up for them.
    let once = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    if let Poll::Ready(res) = once {
        return Some(res);
    }
    loop {
        // Without a deadline this branch is disabled; the far-off instant only
        // gives it a value.
        let expire = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
        tokio::select! {
            res = &mut write => return Some(res),
            _ = shared.wake.notified() => {
                if deadline.is_none() && channel.lock().phase == Phase::Closing {
                    *deadline = Some(Instant::now() + shared.config.close_timeout);
                }
            }
            _ = tokio::time::sleep_until(expire.into()), if deadline.is_some() => return None,
        }
    }
}

/// Waits until something is queued or the channel's expiry passes (then
/// closes it with 4001).
async fn wait_for_frames(channel: &Channel) {
    let shared = &channel.shared;
    match channel.expiry_deadline() {
        None => shared.wake.notified().await,
        Some(expiry) => {
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep_until(expiry.into()) => {
                    // Activity may have moved the deadline while we slept.
                    if channel.expiry_deadline().is_some_and(|d| d <= Instant::now()) {
                        channel.close(CloseReason::EXPIRED);
                    }
                }
            }
        }
    }
}
