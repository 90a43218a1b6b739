//! How a message becomes the frame a member receives.

use bytes::Bytes;

use crate::history::{NewMessage, StoredMessage};
use crate::payload::{plain_frame, Frame, PayloadKind, PayloadType};

/// A message on its way to members, live or replayed from history.
#[derive(Clone, Copy, Debug)]
pub struct MessageRef<'a> {
    /// The group it was published to.
    pub group: &'a str,
    /// The group's epoch.
    pub epoch: &'a str,
    /// Its offset, or `None` when it was not saved to history.
    pub offset: Option<u64>,
    /// The payload's kind.
    pub kind: PayloadKind,
    /// The payload bytes.
    pub payload: &'a Bytes,
    /// Application metadata stored with it.
    pub meta: &'a Bytes,
    /// When it was published, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

impl<'a> MessageRef<'a> {
    /// A message being published: `offset` is its assigned offset, or `None`
    /// when it is not saved.
    pub fn live(group: &'a str, epoch: &'a str, offset: Option<u64>, message: &'a NewMessage) -> Self {
        MessageRef {
            group,
            epoch,
            offset,
            kind: message.kind,
            payload: &message.payload,
            meta: &message.meta,
            timestamp_ms: message.timestamp_ms,
        }
    }

    /// A message read back from history.
    pub fn stored(group: &'a str, epoch: &'a str, message: &'a StoredMessage) -> Self {
        MessageRef {
            group,
            epoch,
            offset: Some(message.offset),
            kind: message.kind,
            payload: &message.payload,
            meta: &message.meta,
            timestamp_ms: message.timestamp_ms,
        }
    }
}

/// Turns a message into a frame for channels of one payload type. A broadcast
/// calls it at most once per payload type and shares the frame with every member
/// of that type; replays call it once per replayed message.
pub trait Envelope: Send + Sync + std::fmt::Debug + 'static {
    /// The frame channels of type `to` receive for `message`.
    fn render(&self, message: &MessageRef<'_>, to: PayloadType) -> Frame;
}

/// The Nexios behaviour: members receive the payload as it was sent, nothing
/// around it. JSON and text go out as text frames (text to a JSON channel as a
/// JSON string), bytes as binary frames.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainEnvelope;

impl Envelope for PlainEnvelope {
    fn render(&self, message: &MessageRef<'_>, to: PayloadType) -> Frame {
        plain_frame(message.kind, message.payload, to)
    }
}

/// A message with its frames rendered lazily, once per payload type.
pub(crate) struct Rendered<'a> {
    envelope: &'a dyn Envelope,
    message: MessageRef<'a>,
    frames: [Option<Frame>; 3],
}

impl<'a> Rendered<'a> {
    pub(crate) fn new(envelope: &'a dyn Envelope, message: MessageRef<'a>) -> Self {
        Rendered {
            envelope,
            message,
            frames: [None, None, None],
        }
    }

    pub(crate) fn frame(&mut self, to: PayloadType) -> Frame {
        let slot = &mut self.frames[to.index()];
        match slot {
            Some(frame) => frame.clone(),
            None => slot.insert(self.envelope.render(&self.message, to)).clone(),
        }
    }
}
