//! The writer task of a channel: it drains the queue into the transport's
//! [`FrameSink`] a batch per flush, applies the close deadline, and runs the close
//! hooks when the channel ends.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::{Channel, Phase};
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
    let mut batch: VecDeque<Frame> = VecDeque::new();
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
            Step::Wait => wait_for_frames(&channel).await,
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
        Phase::Open if q.frames.is_empty() => Step::Wait,
        Phase::Open | Phase::Closing => {
            debug_assert!(batch.is_empty(), "the last batch was written and cleared");
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
