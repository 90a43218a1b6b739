//! Test support for stores and applications (feature `testkit`):
//! - [`conformance`]: the `HistoryStore` contract as an executable suite that
//!   every store runs from its own tests;
//! - [`broker_conformance`]: the `Broker` contract as an executable suite
//!   that every broker runs with its engine's forms;
//! - [`model`]: a plain reference model of the history contract, for property tests;
//! - [`test_channel`]: an in-process channel that records what it receives and
//!   can be made to stall like a client that stops reading.

pub mod broker_conformance;
pub mod conformance;
pub mod model;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{watch, Notify};

use crate::channel::{Channel, ChannelConfig};
use crate::payload::Frame;
use crate::transport::{CloseReason, FrameSink, SinkError};

#[derive(Default)]
struct Record {
    frames: Vec<Frame>,
    close: Option<CloseReason>,
}

/// What a test channel received, and the switch that stalls it.
#[derive(Clone)]
pub struct Recorder {
    record: Arc<Mutex<Record>>,
    stalled: watch::Sender<bool>,
    changed: Arc<Notify>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("frames", &self.frames().len())
            .finish()
    }
}

impl Recorder {
    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frames received so far.
    pub fn frames(&self) -> Vec<Frame> {
        self.record().frames.clone()
    }

    /// Frames received so far, as text (binary frames are skipped).
    pub fn texts(&self) -> Vec<String> {
        self.record()
            .frames
            .iter()
            .filter_map(|f| f.as_text().map(str::to_owned))
            .collect()
    }

    /// The close the channel sent, if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.record().close.clone()
    }

    /// From now on the sink never completes a write, like a client that stopped
    /// reading with full socket buffers.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Lets a stalled sink write again.
    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }

    /// Waits until at least `n` frames were received, or `timeout` passes;
    /// returns the frames received.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Frame> {
        let _ = tokio::time::timeout(timeout, async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.record().frames.len() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await;
        self.frames()
    }
}

struct RecordingSink {
    recorder: Recorder,
    stalled: watch::Receiver<bool>,
}

impl RecordingSink {
    async fn wait_unstalled(&mut self) -> Result<(), SinkError> {
        self.stalled.wait_for(|s| !*s).await.map(|_| ()).map_err(SinkError::new)
    }
}

#[async_trait]
impl FrameSink for RecordingSink {
    async fn send(&mut self, frames: &[Frame]) -> Result<(), SinkError> {
        self.wait_unstalled().await?;
        self.recorder.record().frames.extend_from_slice(frames);
        self.recorder.changed.notify_waiters();
        Ok(())
    }

    async fn close(&mut self, reason: &CloseReason) -> Result<(), SinkError> {
        self.recorder.record().close = Some(reason.clone());
        self.recorder.changed.notify_waiters();
        Ok(())
    }
}

/// An in-process channel whose frames are recorded instead of written to a socket.
///
/// # Panics
/// Panics outside a tokio runtime, like [`Channel::open`].
pub fn test_channel(config: ChannelConfig) -> (Channel, Recorder) {
    let (tx, rx) = watch::channel(false);
    let recorder = Recorder {
        record: Arc::default(),
        stalled: tx,
        changed: Arc::new(Notify::new()),
    };
    let sink = RecordingSink {
        recorder: recorder.clone(),
        stalled: rx,
    };
    (Channel::open(config, sink), recorder)
}
