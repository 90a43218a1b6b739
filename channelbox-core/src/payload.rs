//! Payloads, payload types and the encoded frames handed to channels.

use bytes::Bytes;
use std::sync::{Arc, OnceLock};

/// How a channel wants to receive what is sent to it, as in Nexios
/// (`payload_type="json" | "text" | "bytes"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum PayloadType {
    /// JSON documents in text frames.
    #[default]
    Json,
    /// Plain text frames.
    Text,
    /// Binary frames.
    Bytes,
}

impl PayloadType {
    /// A small index, used to cache one encoding per payload type.
    pub(crate) fn index(self) -> usize {
        match self {
            PayloadType::Json => 0,
            PayloadType::Text => 1,
            PayloadType::Bytes => 2,
        }
    }
}

/// What kind of payload a message carries; stored with the message in history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PayloadKind {
    /// Serialized JSON (UTF-8).
    Json,
    /// UTF-8 text.
    Text,
    /// Arbitrary bytes.
    Binary,
}

impl PayloadKind {
    /// A stable one-byte tag, for stores that serialize messages.
    pub fn tag(self) -> u8 {
        match self {
            PayloadKind::Json => 0,
            PayloadKind::Text => 1,
            PayloadKind::Binary => 2,
        }
    }

    /// The inverse of [`PayloadKind::tag`].
    pub fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            0 => Some(PayloadKind::Json),
            1 => Some(PayloadKind::Text),
            2 => Some(PayloadKind::Binary),
            _ => None,
        }
    }
}

/// A message body as an application hands it to `group_send` or `send_to`.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// A JSON value; serialized once per send.
    Json(serde_json::Value),
    /// Text.
    Text(String),
    /// Bytes.
    Binary(Bytes),
}

impl Payload {
    /// Serializes the payload once into its canonical bytes and kind.
    pub fn encode(&self) -> (PayloadKind, Bytes) {
        match self {
            // Serializing a `Value` cannot fail: its map keys are strings.
            Payload::Json(v) => (PayloadKind::Json, Bytes::from(v.to_string())),
            Payload::Text(s) => (PayloadKind::Text, Bytes::copy_from_slice(s.as_bytes())),
            Payload::Binary(b) => (PayloadKind::Binary, b.clone()),
        }
    }
}

impl From<serde_json::Value> for Payload {
    fn from(v: serde_json::Value) -> Self {
        Payload::Json(v)
    }
}

impl From<String> for Payload {
    fn from(s: String) -> Self {
        Payload::Text(s)
    }
}

impl From<&str> for Payload {
    fn from(s: &str) -> Self {
        Payload::Text(s.to_owned())
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        Payload::Binary(b)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(b: Vec<u8>) -> Self {
        Payload::Binary(Bytes::from(b))
    }
}

/// The opcode a frame goes out with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// A text frame; its data is valid UTF-8.
    Text,
    /// A binary frame.
    Binary,
    /// A WebSocket ping (a heartbeat); its data is the ping's payload.
    Ping,
}

/// An already-encoded outgoing frame. Cloning shares the bytes, which is how one
/// broadcast reaches thousands of members with one encoding.
///
/// A frame is one pointer wide: a broadcast writes one into the queue of every
/// member, and at thousands of members those writes are cache misses, so eight
/// frames to a cache line cost a fifth of the misses of a fat `Bytes` handle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame(Arc<FrameBody>);

#[derive(Debug)]
struct FrameBody {
    kind: FrameKind,
    data: Bytes,
    /// The frame compressed for the connections that negotiated it
    /// (permessage-deflate): made by the first of them to write the frame,
    /// shared by the rest, so a broadcast is compressed once, not once per
    /// member. `None` inside when compressing does not pay.
    compressed: OnceLock<Option<Bytes>>,
}

/// Frames are equal when their kind and bytes are: the compressed copy is
/// a cache of the same content.
impl PartialEq for FrameBody {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.data == other.data
    }
}

impl Eq for FrameBody {}

impl Frame {
    fn new(kind: FrameKind, data: Bytes) -> Self {
        Frame(Arc::new(FrameBody {
            kind,
            data,
            compressed: OnceLock::new(),
        }))
    }

    /// The frame's compressed encoding, made by `compress` on the first call
    /// and shared by every clone of the frame afterwards (concurrent first
    /// calls wait for one of them); `None` when `compress` found that
    /// compressing does not pay. A transport decides what the bytes are
    /// (channelbox-ws: the whole permessage-deflate frame, header included).
    pub fn compressed(&self, compress: impl FnOnce(&Frame) -> Option<Bytes>) -> Option<&Bytes> {
        self.0.compressed.get_or_init(|| compress(self)).as_ref()
    }

    /// A text frame.
    pub fn text(text: impl Into<String>) -> Self {
        Frame::new(FrameKind::Text, Bytes::from(text.into()))
    }

    /// A text frame from bytes; fails when they are not UTF-8, so a transport
    /// never has to check again.
    pub fn text_from_utf8(data: Bytes) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(&data)?;
        Ok(Frame::new(FrameKind::Text, data))
    }

    /// A binary frame.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Frame::new(FrameKind::Binary, data.into())
    }

    /// A ping with an empty payload: a heartbeat the peer answers with a pong.
    pub fn ping() -> Self {
        Frame::new(FrameKind::Ping, Bytes::new())
    }

    /// The frame's opcode.
    pub fn kind(&self) -> FrameKind {
        self.0.kind
    }

    /// The frame's bytes.
    pub fn data(&self) -> &Bytes {
        &self.0.data
    }

    /// The frame's text, when it is a text frame.
    pub fn as_text(&self) -> Option<&str> {
        match self.0.kind {
            // Text frames are only built from checked UTF-8.
            FrameKind::Text => std::str::from_utf8(&self.0.data).ok(),
            FrameKind::Binary | FrameKind::Ping => None,
        }
    }

    /// Bytes this frame counts against a queue's byte bound.
    pub fn len(&self) -> usize {
        self.0.data.len()
    }

    /// Whether the frame carries no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.data.is_empty()
    }
}

/// Renders the bytes of a payload for a channel of the given type. Binary payloads
/// are sent as binary frames to every type of channel, so no byte is ever lost;
/// text sent to a JSON channel becomes a JSON string, as Nexios's `send_json` would.
pub(crate) fn plain_frame(kind: PayloadKind, payload: &Bytes, to: PayloadType) -> Frame {
    match (kind, to) {
        (PayloadKind::Binary, _) | (_, PayloadType::Bytes) => Frame::binary(payload.clone()),
        (PayloadKind::Text, PayloadType::Json) => {
            let text = String::from_utf8_lossy(payload);
            Frame::text(serde_json::Value::String(text.into_owned()).to_string())
        }
        (PayloadKind::Json | PayloadKind::Text, _) => match Frame::text_from_utf8(payload.clone()) {
            Ok(frame) => frame,
            Err(_) => Frame::binary(payload.clone()),
        },
    }
}
