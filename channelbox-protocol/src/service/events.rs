//! Server-Sent Events (docs/protocol.md "Server-Sent Events"): the second
//! transport. A stream of events is a channel like a WebSocket one — a member
//! of its groups, reachable by `direct`, counted, closed by close-all and by
//! heartbeats — whose writer renders each server frame as one event and hands
//! it to the HTTP response's body through a slot of one batch:
//!
//! ```text
//! event: message
//! id: <epoch>:<offset>          (saved messages; welcome or recovered, below)
//! data: {"type":"message",…}
//!
//! ```
//!
//! The `welcome` event also carries the group's position at join as its id
//! — or, when the stream recovers (`since`, `Last-Event-ID`), the
//! `recovered` event does, after the replay — so that an `EventSource` that
//! reconnects before any saved message arrived resumes from there: a browser
//! sends `Last-Event-ID` only once it saw an id.
//!
//! The channel's own bounded queue is the only queue in front of that slot,
//! so a client that stops reading overflows it exactly as over WebSocket and
//! is closed as a slow consumer. Heartbeat pings become `: ping` comments; a
//! stream is alive while its body is taken (the client sends nothing back).
//! A close sends `event: close` with the code and reason, then the body ends.
//! `--expiry` does not apply: the client has no way to show activity.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use channelbox_core::{
    Channel, ChannelConfig, CloseReason, Frame, FrameKind, FrameSink, Incoming, Replay, SinkError, StreamPosition,
};
use futures_util::Stream;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::{Admission, ChatService};
use crate::fields::Since;
use crate::frames::{ErrorCode, ProtocolError};

/// The headers of every event stream's `200` answer besides its status: the
/// content type, no caching by proxies, no buffering by nginx, and the
/// connection closed after the stream (an `EventSource` reconnects anyway).
pub const EVENT_STREAM_HEADERS: [(&str, &str); 4] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
    ("connection", "close"),
];

impl ChatService {
    /// Opens the channel of an admitted event stream
    /// ([`ChatService::admit_events`], then the connect hook) and runs the
    /// protocol on it in a task of its own; the returned stream is the HTTP
    /// response's body. Dropping it (the client went away) ends the channel.
    /// Must be called within a tokio runtime.
    pub fn events(&self, admission: Admission) -> EventStream {
        let (chunks, taken) = mpsc::channel(1);
        let (open, gone) = oneshot::channel();
        let config = ChannelConfig {
            expiry: None,
            ..self.channel_config()
        };
        let ids = Ids {
            recovering: matches!(admission.0.replay, Replay::Since(_)),
            start: None,
        };
        let channel = Channel::open_with_id(admission.channel_id(), config, EventSink { chunks, ids });
        let service = self.clone();
        let running = channel.clone();
        tokio::spawn(async move {
            service.run(admission, running, Departure(Some(gone))).await;
        });
        EventStream {
            taken,
            channel,
            _open: open,
        }
    }
}

/// The `Last-Event-ID` of a reconnecting `EventSource`, `<epoch>:<offset>`,
/// as the recovery it asks for.
pub(super) fn resume_from(id: &str) -> Result<Replay, ProtocolError> {
    let malformed = || ProtocolError::new(ErrorCode::BadRequest, "Last-Event-ID must be <epoch>:<offset>");
    let (epoch, offset) = id.trim().rsplit_once(':').ok_or_else(malformed)?;
    let Since(offset) = Since::parse(offset).map_err(|_| malformed())?;
    Ok(Replay::Since(StreamPosition::new(epoch.to_owned().into(), offset)))
}

/// The body of an event stream's response: the channel's rendered batches,
/// one chunk each. Every chunk taken proves the client's socket takes data,
/// which is what heartbeats judge a stream by.
pub struct EventStream {
    taken: mpsc::Receiver<Bytes>,
    channel: Channel,
    /// Dropped with the body: tells the session that the client is gone.
    _open: oneshot::Sender<()>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("channel", &self.channel.id())
            .finish()
    }
}

impl EventStream {
    /// What resolves once the stream's channel has closed, for a server that
    /// drops the connection if its client does not take the rest in time.
    pub fn end(&self) -> EventsEnd {
        EventsEnd(self.channel.clone())
    }
}

impl Stream for EventStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let chunk = ready!(self.taken.poll_recv(cx));
        if chunk.is_some() {
            self.channel.heard();
        }
        Poll::Ready(chunk.map(Ok))
    }
}

/// The end of an event stream's channel; an adapter or accept loop puts it
/// in the response's extensions so that the server can drop a connection
/// whose client stopped reading after its channel closed.
#[derive(Clone, Debug)]
pub struct EventsEnd(Channel);

impl EventsEnd {
    /// Resolves once the channel closed (or began closing).
    pub async fn closed(&self) {
        self.0.closed().await
    }
}

/// The client's side of an event stream, as the session reads it: nothing,
/// until the body is dropped.
struct Departure(Option<oneshot::Receiver<()>>);

impl Stream for Departure {
    type Item = Incoming;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Incoming>> {
        let Some(gone) = self.0.as_mut() else {
            return Poll::Ready(None);
        };
        // The sender is never used: only its drop resolves the receiver.
        let _ = ready!(Pin::new(gone).poll(cx));
        self.0 = None;
        Poll::Ready(None)
    }
}

/// The channel's writer side: renders a batch, then waits for the body to
/// take the previous one (the slot holds one).
struct EventSink {
    chunks: mpsc::Sender<Bytes>,
    ids: Ids,
}

/// Which events carry the position of the stream's group as their id
/// besides saved messages: `welcome` with the group's position at join, or,
/// when a recovery follows it, the `recovered` after the replay with that
/// same position (everything up to it was replayed or reported lost; an id
/// on `welcome` then would skip the replay if the stream dropped before it).
#[derive(Debug, Default)]
struct Ids {
    /// The stream asked for a recovery: `recovered` follows the replay.
    recovering: bool,
    /// `<epoch>:<offset>` of `welcome`, for the `recovered` that follows.
    start: Option<String>,
}

impl Ids {
    /// The id of an event of `kind` whose frame has this head, if any.
    fn of(&mut self, kind: &str, head: &Head<'_>) -> Option<String> {
        let position = match (head.epoch.as_deref(), head.offset) {
            (Some(epoch), Some(offset)) if one_line(epoch) => Some(format!("{epoch}:{offset}")),
            _ => None,
        };
        match kind {
            "message" => position,
            "welcome" if self.recovering => {
                self.start = position;
                None
            }
            "welcome" => position,
            // Only the stream's group recovers (a stream cannot join), once.
            "recovered" => self.start.take(),
            _ => None,
        }
    }
}

#[async_trait]
impl FrameSink for EventSink {
    async fn send(&mut self, frames: &[Frame]) -> Result<(), SinkError> {
        let mut out = Vec::with_capacity(frames.iter().map(|f| f.len() + 64).sum());
        frames.iter().for_each(|f| render(f, &mut self.ids, &mut out));
        self.chunks.send(Bytes::from(out)).await.map_err(|_| gone())
    }

    async fn close(&mut self, reason: &CloseReason) -> Result<(), SinkError> {
        let mut out = Vec::with_capacity(96);
        render_close(reason, &mut out);
        // Waits for room within the writer's close deadline: a client that
        // does not read by then does not get it.
        self.chunks.send(Bytes::from(out)).await.map_err(|_| gone())
    }
}

fn gone() -> SinkError {
    SinkError::new("the event stream's client went away")
}

/// The fields of a server frame an event's head needs; the rest is skipped.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    epoch: Option<Cow<'a, str>>,
    offset: Option<u64>,
}

/// Whether a value can stand on an event's field line as it is.
fn one_line(s: &str) -> bool {
    !s.is_empty() && !s.contains(['\n', '\r'])
}

/// Appends one frame as one event (a ping as a comment), with its id if
/// `ids` gives it one.
fn render(frame: &Frame, ids: &mut Ids, out: &mut Vec<u8>) {
    if frame.kind() == FrameKind::Ping {
        out.extend_from_slice(b": ping\n\n");
        return;
    }
    let data = frame.data();
    if let Ok(head) = serde_json::from_slice::<Head<'_>>(data) {
        if let Some(kind) = head.kind.as_deref().filter(|k| one_line(k)) {
            out.extend_from_slice(b"event: ");
            out.extend_from_slice(kind.as_bytes());
            out.push(b'\n');
            if let Some(id) = ids.of(kind, &head) {
                out.extend_from_slice(format!("id: {id}\n").as_bytes());
            }
        }
    }
    // Server frames are JSON on one line; anything else keeps its lines,
    // each a `data:` line of its own, which a client joins again.
    for line in data.split(|&b| b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        out.push(b'\n');
    }
    out.push(b'\n');
}

/// Appends the `close` event of a close reason.
fn render_close(reason: &CloseReason, out: &mut Vec<u8>) {
    let body = serde_json::json!({"code": reason.code, "reason": reason.reason});
    out.extend_from_slice(format!("event: close\ndata: {body}\n\n").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(frame: &Frame) -> String {
        rendered_with(frame, &mut Ids::default())
    }

    fn rendered_with(frame: &Frame, ids: &mut Ids) -> String {
        let mut out = Vec::new();
        render(frame, ids, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn saved_messages_carry_their_position_as_the_event_id() {
        let saved =
            r#"{"type":"message","group":"g","offset":7,"epoch":"ab-1.0","from":null,"ts":1,"data":{"a":"x\ny"}}"#;
        assert_eq!(
            rendered(&Frame::text(saved)),
            format!("event: message\nid: ab-1.0:7\ndata: {saved}\n\n")
        );
        let unsaved = r#"{"type":"message","group":"g","offset":null,"epoch":"ab-1.0","data":1}"#;
        assert_eq!(
            rendered(&Frame::text(unsaved)),
            format!("event: message\ndata: {unsaved}\n\n")
        );
        let joined = r#"{"type":"joined","epoch":"e","offset":3}"#;
        assert_eq!(
            rendered(&Frame::text(joined)),
            format!("event: joined\ndata: {joined}\n\n")
        );
        assert_eq!(rendered(&Frame::ping()), ": ping\n\n");
        assert_eq!(rendered(&Frame::text("a\nb")), "data: a\ndata: b\n\n");
    }

    #[test]
    fn welcome_carries_the_join_position_unless_a_recovery_follows() {
        let welcome = r#"{"type":"welcome","channel_id":"c","group":"g","epoch":"e-1.0","offset":3}"#;
        let recovered = r#"{"type":"recovered","group":"g","from":1,"to":3,"complete":true}"#;
        let mut live = Ids::default();
        assert_eq!(
            rendered_with(&Frame::text(welcome), &mut live),
            format!("event: welcome\nid: e-1.0:3\ndata: {welcome}\n\n")
        );
        let mut recovering = Ids {
            recovering: true,
            start: None,
        };
        assert_eq!(
            rendered_with(&Frame::text(welcome), &mut recovering),
            format!("event: welcome\ndata: {welcome}\n\n")
        );
        assert_eq!(
            rendered_with(&Frame::text(recovered), &mut recovering),
            format!("event: recovered\nid: e-1.0:3\ndata: {recovered}\n\n")
        );
        assert_eq!(
            rendered_with(&Frame::text(recovered), &mut recovering),
            format!("event: recovered\ndata: {recovered}\n\n"),
            "only the recovery that follows welcome"
        );
    }

    #[test]
    fn a_close_is_an_event_with_its_code_and_reason() {
        let mut out = Vec::new();
        render_close(&CloseReason::SLOW_CONSUMER, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "event: close\ndata: {\"code\":4000,\"reason\":\"slow consumer\"}\n\n"
        );
    }

    #[test]
    fn last_event_id_is_an_epoch_and_an_offset() {
        let Replay::Since(at) = resume_from("ab:c-1.0:42").unwrap() else {
            panic!("a recovery")
        };
        assert_eq!((at.epoch.as_ref(), at.offset), ("ab:c-1.0", 42));
        for bad in ["", "42", "e:", "e:x", "e:-1"] {
            assert!(resume_from(bad).is_err(), "{bad:?}");
        }
    }
}
