//! The JSON frames of the protocol: rendering server frames and the envelope
//! that turns a saved or live message into a `message` frame.

use bytes::Bytes;
use channelbox_core::{Envelope, Frame, MessageRef, PayloadType};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

/// Who sent a message; stored with it as metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    /// The sending channel; `None` for backend publishes over HTTP.
    pub from: Option<Uuid>,
    /// The token's `sub`, when the server requires tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl Sender {
    /// The metadata bytes stored with a message.
    pub fn to_meta(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Reads metadata back; unreadable metadata counts as an anonymous sender.
    pub fn from_meta(meta: &[u8]) -> Sender {
        serde_json::from_slice(meta).unwrap_or_default()
    }
}

/// Writes a `message` frame (or a history element, without `type`) for `m`.
pub fn render_message(m: &MessageRef<'_>, with_type: bool) -> String {
    let sender = Sender::from_meta(m.meta);
    let data = std::str::from_utf8(m.payload).unwrap_or("null");
    let mut out = String::with_capacity(160 + m.payload.len() + m.group.len());
    out.push('{');
    if with_type {
        out.push_str(r#""type":"message","#);
    }
    out.push_str(r#""group":"#);
    out.push_str(&json_string(m.group));
    out.push_str(r#","offset":"#);
    match m.offset {
        Some(o) => out.push_str(&o.to_string()),
        None => out.push_str("null"),
    }
    out.push_str(r#","epoch":"#);
    out.push_str(&json_string(m.epoch));
    out.push_str(r#","from":"#);
    match sender.from {
        Some(id) => {
            out.push('"');
            out.push_str(&id.hyphenated().to_string());
            out.push('"');
        }
        None => out.push_str("null"),
    }
    if let Some(user) = &sender.user {
        out.push_str(r#","user":"#);
        out.push_str(&json_string(user));
    }
    out.push_str(r#","ts":"#);
    out.push_str(&m.timestamp_ms.to_string());
    out.push_str(r#","data":"#);
    out.push_str(data);
    out.push('}');
    out
}

fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// Renders messages as PROTOCOL.md's `message` frames.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChatEnvelope;

impl Envelope for ChatEnvelope {
    fn render(&self, message: &MessageRef<'_>, _to: PayloadType) -> Frame {
        Frame::text(render_message(message, true))
    }
}

/// A reply frame with `ref` echoed when the request had one.
pub(crate) fn reply(mut body: Value, reference: Option<&Value>) -> Frame {
    if let (Some(r), Some(obj)) = (reference, body.as_object_mut()) {
        obj.insert("ref".into(), r.clone());
    }
    Frame::text(body.to_string())
}

/// Error codes of PROTOCOL.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not JSON, not an object, unknown type, missing or mistyped field, binary frame.
    BadRequest,
    /// A group name breaks the rules.
    InvalidGroup,
    /// Not allowed.
    Forbidden,
    /// `direct` to a channel that does not exist.
    NotFound,
    /// Above the maximum message size.
    TooLarge,
    /// Faster than the rate limit.
    RateLimited,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidGroup => "invalid_group",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
        }
    }
}

/// A protocol error: code and readable sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolError {
    /// The code.
    pub code: ErrorCode,
    /// A readable sentence.
    pub message: String,
}

impl ProtocolError {
    /// An error with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }

    /// The error frame, echoing `ref` when given.
    pub fn frame(&self, reference: Option<&Value>) -> Frame {
        reply(
            json!({"type": "error", "code": self.code.as_str(), "message": self.message}),
            reference,
        )
    }
}
