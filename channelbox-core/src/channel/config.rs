//! How a channel is set up: [`ChannelConfig`] and the [`OverflowPolicy`] of
//! its queue.

use std::time::Duration;

use crate::payload::PayloadType;

/// What a full queue does with one more frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OverflowPolicy {
    /// Close the channel with
    /// [`CloseReason::SLOW_CONSUMER`](crate::CloseReason::SLOW_CONSUMER). The
    /// client reconnects and recovers from history without a gap. The default.
    #[default]
    Disconnect,
    /// Drop the oldest queued frames until the new one fits. The client sees the
    /// jump in offsets and knows it has a gap.
    DropOldest,
}

/// How a channel is set up.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// How the channel wants its payloads.
    pub payload_type: PayloadType,
    /// Frames the queue may hold.
    pub max_queue_frames: usize,
    /// Bytes the queue may hold.
    pub max_queue_bytes: usize,
    /// What happens when the queue is full.
    pub overflow: OverflowPolicy,
    /// Close the channel (code 4001) after this long without activity.
    pub expiry: Option<Duration>,
    /// Most frames handed to the sink in one batch (one flush).
    pub max_batch: usize,
    /// How long a close handshake may take before the sink is dropped anyway.
    pub close_timeout: Duration,
    /// The longest a broadcast's frame may wait in the queue for the frames
    /// that follow it, so that they go to the sink in one batch (one write,
    /// one TCP segment) instead of one each. Zero (the default) writes at
    /// once. The writer holds frames back only while frames come more often
    /// than this; anything sent with
    /// [`Channel::try_send`](super::Channel::try_send) (a reply, a ping) and
    /// a queue a quarter full end the wait at once. See `writer.rs`.
    pub write_delay: Duration,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            payload_type: PayloadType::Json,
            max_queue_frames: 1024,
            max_queue_bytes: 1 << 20,
            overflow: OverflowPolicy::Disconnect,
            expiry: None,
            max_batch: 256,
            close_timeout: Duration::from_secs(5),
            write_delay: Duration::ZERO,
        }
    }
}
