//! Sends that refuse instead of closing: what one peer sends another (a
//! `direct`) and what a reply may take of its requester's queue; and the
//! push every send ends with.

use std::sync::MutexGuard;

use super::{Channel, Enqueued, Push, Queue, SendError, Wake};
use crate::payload::Frame;

impl Channel {
    /// Queues `frame` only while the queue stays polite: less than half of
    /// its frames and bytes in use, and room for the frame in what remains.
    /// Otherwise nothing is queued and nothing closes — the caller refuses
    /// the frame instead. What one peer sends another (a `direct`) goes
    /// through here, so that no peer can make another a slow consumer.
    pub fn try_send_polite(&self, frame: Frame) -> Result<Enqueued, SendError> {
        let q = self.lock();
        if !q.is_open() {
            return Err(SendError::Closed);
        }
        let len = frame.len();
        let half_full = q.frames.len() >= q.max_frames as usize / 2 || q.bytes >= q.max_bytes / 2;
        let fits = q.frames.len() < q.max_frames as usize && q.bytes as usize + len <= q.max_bytes as usize;
        if half_full || !fits {
            return Err(SendError::Overflow);
        }
        self.push_and_wake(q, frame, Push::Now);
        Ok(Enqueued { dropped: 0 })
    }

    /// Bytes the queue may still take before it is half full: what a reply
    /// may use without making its requester a slow consumer.
    pub fn half_room_bytes(&self) -> usize {
        let q = self.lock();
        (q.max_bytes / 2).saturating_sub(q.bytes) as usize
    }

    /// Queues `frame`, which the caller has checked fits, then releases the
    /// lock and wakes the writer if it needs to be told. An idle writer is
    /// woken by the first frame. A writer that is writing or holding frames
    /// back comes back to the queue by itself; it is woken only to end a
    /// hold early: for a frame that must not wait ([`Push::Now`]), or once
    /// the queue is a quarter full (by frames or bytes), so that holding
    /// frames back never brings a queue near its bound.
    pub(super) fn push_and_wake(&self, mut q: MutexGuard<'_, Queue>, frame: Frame, push: Push) {
        // It fits: the frame's length is at most `max_bytes`, a `u32`.
        q.bytes += frame.len() as u32;
        q.frames.push_back(frame);
        let wake = match q.wake {
            Wake::Idle => true,
            Wake::Holding => {
                push == Push::Now || q.frames.len() >= (q.max_frames as usize / 4).max(1) || q.bytes >= q.max_bytes / 4
            }
            Wake::Woken => false,
        };
        if wake {
            q.wake = Wake::Woken;
        }
        drop(q);
        if wake {
            self.shared.wake.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelConfig;
    use crate::testkit::test_channel;

    #[tokio::test]
    async fn a_polite_send_refuses_past_half_and_never_closes() {
        let config = ChannelConfig {
            max_queue_frames: 8,
            max_queue_bytes: 1000,
            ..ChannelConfig::default()
        };
        let (ch, recorder) = test_channel(config);
        recorder.stall();
        // The writer takes the first frame and stalls in the sink with it.
        assert!(ch.try_send_polite(Frame::text("x".repeat(10))).is_ok());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // Below half, a frame that fits in what remains is taken, even a
        // large one; from half on nothing is, and nothing closes.
        assert!(ch.try_send_polite(Frame::text("y".repeat(400))).is_ok());
        assert_eq!(ch.half_room_bytes(), 100);
        assert_eq!(
            ch.try_send_polite(Frame::text("z".repeat(700))),
            Err(SendError::Overflow)
        );
        assert!(ch.try_send_polite(Frame::text("w".repeat(200))).is_ok());
        assert_eq!(ch.half_room_bytes(), 0);
        assert_eq!(ch.try_send_polite(Frame::text("v")), Err(SendError::Overflow));
        assert!(!ch.is_closed());
    }
}
