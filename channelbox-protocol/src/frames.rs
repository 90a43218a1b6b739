//! The JSON frames of the protocol: rendering server frames and the envelope
//! that turns a saved or live message into a `message` frame.

use bytes::Bytes;
use channelbox_core::{Envelope, Frame, HistoryPage, MessageRef, PayloadType};
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

/// The first byte of binary metadata: which parts follow. Always below 4,
/// where no JSON begins (the metadata written before round three, still
/// read).
const META_FROM: u8 = 0x01;
const META_USER: u8 = 0x02;

impl Sender {
    /// The metadata bytes stored with a message, binary because every saved
    /// message carries them: nothing for an anonymous sender, else a byte
    /// saying which parts follow, the channel's 16-byte id, then the user as
    /// UTF-8 (17 bytes for a channel without a user, against 47 as JSON).
    pub fn to_meta(&self) -> Bytes {
        if self.from.is_none() && self.user.is_none() {
            return Bytes::new();
        }
        let user = self.user.as_deref().unwrap_or("");
        let mut out = Vec::with_capacity(1 + 16 + user.len());
        out.push(if self.from.is_some() { META_FROM } else { 0 } | if self.user.is_some() { META_USER } else { 0 });
        if let Some(id) = self.from {
            out.extend_from_slice(id.as_bytes());
        }
        out.extend_from_slice(user.as_bytes());
        Bytes::from(out)
    }

    /// Reads metadata back, binary or the JSON of earlier versions;
    /// unreadable metadata counts as an anonymous sender.
    pub fn from_meta(meta: &[u8]) -> Sender {
        match meta.split_first() {
            Some((&flags, rest)) if flags & !(META_FROM | META_USER) == 0 => Sender::from_binary(flags, rest),
            // JSON never begins with a byte below 4 (whitespace is 9 or more).
            _ => serde_json::from_slice(meta).unwrap_or_default(),
        }
    }

    fn from_binary(flags: u8, rest: &[u8]) -> Sender {
        let (from, rest) = match flags & META_FROM {
            0 => (None, rest),
            _ => match rest.split_first_chunk::<16>() {
                Some((id, rest)) => (Some(Uuid::from_bytes(*id)), rest),
                None => return Sender::default(),
            },
        };
        let user = match flags & META_USER {
            0 => None,
            _ => match std::str::from_utf8(rest) {
                Ok(user) => Some(user.to_owned()),
                Err(_) => return Sender::default(),
            },
        };
        Sender { from, user }
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

/// A history page as JSON text, `{"group","epoch","messages":[…]}` (each
/// message as a `message` frame without `type`). As a WebSocket reply,
/// `reply_to` gives the frame's `type` (first) and the request's `ref` (last).
pub fn render_history(group: &str, page: &HistoryPage, reply_to: Option<(&str, Option<&Value>)>) -> String {
    render_history_within(group, page, reply_to, usize::MAX)
}

/// [`render_history`] within about `max_bytes`: the oldest messages of the
/// page that fit (at least one, even alone above the bound), then
/// `"more":true` when some were left out, so that the client asks again
/// with `since` set to the last offset it got.
pub fn render_history_within(
    group: &str,
    page: &HistoryPage,
    reply_to: Option<(&str, Option<&Value>)>,
    max_bytes: usize,
) -> String {
    let reference = match reply_to {
        Some((_, Some(r))) => r.to_string(),
        _ => String::new(),
    };
    // What follows the messages: `]`, `,"more":true`, `,"ref":…` and `}`.
    let tail = 24 + reference.len();
    let mut out = String::with_capacity((96 + page.messages.len() * 128).min(max_bytes.saturating_add(tail)));
    out.push('{');
    if let Some((kind, _)) = reply_to {
        out.push_str(r#""type":"#);
        out.push_str(&json_string(kind));
        out.push(',');
    }
    out.push_str(r#""group":"#);
    out.push_str(&json_string(group));
    out.push_str(r#","epoch":"#);
    out.push_str(&json_string(page.head.epoch.as_str()));
    out.push_str(r#","messages":["#);
    let mut more = false;
    for (i, m) in page.messages.iter().enumerate() {
        let msg = render_message(&MessageRef::stored(group, page.head.epoch.as_str(), m), false);
        if i > 0 && out.len() + 1 + msg.len() + tail > max_bytes {
            more = true;
            break;
        }
        if i > 0 {
            out.push(',');
        }
        out.push_str(&msg);
    }
    out.push(']');
    if more {
        out.push_str(r#","more":true"#);
    }
    if !reference.is_empty() {
        out.push_str(r#","ref":"#);
        out.push_str(&reference);
    }
    out.push('}');
    out
}

/// Renders messages as docs/protocol.md's `message` frames.
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

/// Error codes of docs/protocol.md.
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
    /// The history store cannot take the request now; it had no effect.
    Unavailable,
}

impl ErrorCode {
    /// The code of its wire name (a backend hook's refusal names one).
    pub fn parse(code: &str) -> Option<ErrorCode> {
        [
            ErrorCode::BadRequest,
            ErrorCode::InvalidGroup,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::TooLarge,
            ErrorCode::RateLimited,
            ErrorCode::Unavailable,
        ]
        .into_iter()
        .find(|c| c.as_str() == code)
    }

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidGroup => "invalid_group",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(from: bool, user: Option<&str>) -> Sender {
        Sender {
            from: from.then(Uuid::new_v4),
            user: user.map(str::to_owned),
        }
    }

    #[test]
    fn metadata_reads_back_as_written() {
        for s in [
            sender(false, None),
            sender(true, None),
            sender(false, Some("ada")),
            sender(true, Some("ada")),
            sender(true, Some("")),
            sender(false, Some("")),
        ] {
            assert_eq!(Sender::from_meta(&s.to_meta()), s);
        }
        assert_eq!(sender(true, None).to_meta().len(), 17);
        assert!(sender(false, None).to_meta().is_empty());
    }

    #[test]
    fn json_metadata_of_earlier_versions_is_still_read() {
        for s in [sender(true, None), sender(true, Some("ada")), sender(false, None)] {
            let json = serde_json::to_vec(&s).expect("json");
            assert_eq!(Sender::from_meta(&json), s);
            let spaced = [b" \n".as_slice(), &json].concat();
            assert_eq!(Sender::from_meta(&spaced), s);
        }
    }

    #[test]
    fn unreadable_metadata_is_an_anonymous_sender() {
        let id = Uuid::new_v4();
        let mut bad_user = vec![META_FROM | META_USER];
        bad_user.extend_from_slice(id.as_bytes());
        bad_user.push(0xff);
        for meta in [&[META_FROM, 1, 2][..], &[0x80], b"{not json", &bad_user, &[0x7a, 1]] {
            assert_eq!(Sender::from_meta(meta), Sender::default(), "{meta:?}");
        }
    }
}
