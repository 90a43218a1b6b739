//! The socket half of the transport: a tokio-tungstenite stream becomes a core
//! [`Channel`] (writes through core's bounded queue, a batch per flush) plus a
//! stream of [`Incoming`] frames; the server handshake with a check of the
//! request, and the client side.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Waker};

use async_trait::async_trait;
use channelbox_core::{Channel, ChannelConfig, CloseReason, Frame, FrameKind, FrameSink, Incoming, SinkError};
use futures_util::{Sink, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::Error;

/// One WebSocket, shared by the channel's writer and the reader of what the
/// peer sends. tungstenite reads (and answers pings and closes); the frames of
/// a batch are encoded here, straight into one buffer, and go to the socket
/// in one write: no message object, no second handle on each frame's bytes,
/// no lock and no readiness check per frame.
struct Conn<S> {
    ws: WebSocketStream<S>,
    /// The batch being written; while it is not empty the reader waits, since
    /// tungstenite could write a pong into the middle of it.
    out: Vec<u8>,
    /// How much of `out` the socket took.
    written: usize,
    /// The reader, waiting for `out` to be written.
    reader: Option<Waker>,
    /// A batch was abandoned half written: the stream is no longer framed.
    broken: bool,
    /// The peer closed (or its stream ended): tungstenite answered the
    /// close, and no frame may follow it.
    ended: bool,
    /// Frames go through tungstenite instead (the client side, whose frames
    /// must be masked with a random key each); how many of the batch went.
    through_tungstenite: Option<usize>,
    /// The channel, whose liveness the socket records. A socket whose send
    /// buffer was full and takes bytes again was drained by the peer's
    /// acknowledgements: the peer is alive, as surely as when a pong
    /// arrives. (Only a full buffer counts: a dead peer's buffer never
    /// drains, and small writes such as pings go into a buffer with room.)
    /// A slow reader behind a long replay keeps a batch half written most
    /// of the time, and the reader waits meanwhile, so its pongs are read
    /// late.
    channel: Option<Channel>,
    /// The last write found the send buffer full.
    blocked: bool,
    /// The peer negotiated permessage-deflate: data frames worth it go out
    /// compressed, the one compressed copy of each frame shared by every
    /// such connection.
    deflate: bool,
}

type SharedConn<S> = Arc<Mutex<Conn<S>>>;

fn lock<S>(conn: &SharedConn<S>) -> MutexGuard<'_, Conn<S>> {
    conn.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A batch's buffer is kept for the next one only when the batch was at
/// least `BUSY_BATCH` and at most `KEEP_OUT_BUFFER` bytes: idle connections
/// must stay small.
const KEEP_OUT_BUFFER: usize = 8 * 1024;
const BUSY_BATCH: usize = 1024;

/// The length of a frame of `len` payload bytes, header included.
fn encoded_len(len: usize) -> usize {
    match len {
        n if n < 126 => 2 + n,
        n if n <= usize::from(u16::MAX) => 4 + n,
        n => 10 + n,
    }
}

/// Appends one unmasked server frame.
fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let opcode = match frame.kind() {
        FrameKind::Text => 0x81,
        FrameKind::Binary => 0x82,
        FrameKind::Ping => 0x89,
    };
    let data = frame.data();
    crate::deflate::header(out, opcode, data.len());
    out.extend_from_slice(data);
}

/// The frame's compressed encoding when compressing it pays (made once,
/// by whichever connection writes the frame first).
fn compressed(frame: &Frame) -> Option<&bytes::Bytes> {
    frame.compressed(crate::deflate::compress_frame)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Writes a batch: first whatever tungstenite has pending (a pong), then
    /// the frames, encoded on the first poll.
    fn poll_send(&mut self, cx: &mut Context<'_>, frames: &[Frame]) -> Poll<Result<(), SinkError>> {
        if let Some(sent) = self.through_tungstenite {
            return self.poll_send_masked(cx, frames, sent);
        }
        if self.out.is_empty() {
            ready!(Pin::new(&mut self.ws).poll_flush(cx)).map_err(SinkError::new)?;
            if self.ended {
                return Poll::Ready(Err(SinkError::new(WsError::AlreadyClosed)));
            }
            // One allocation for the whole batch, not one per doubling.
            if self.deflate {
                let len = |f: &Frame| compressed(f).map_or_else(|| encoded_len(f.len()), |c| c.len());
                self.out.reserve_exact(frames.iter().map(len).sum());
                for frame in frames {
                    match compressed(frame) {
                        Some(bytes) => self.out.extend_from_slice(bytes),
                        None => encode(frame, &mut self.out),
                    }
                }
            } else {
                self.out
                    .reserve_exact(frames.iter().map(|f| encoded_len(f.len())).sum());
                frames.iter().for_each(|f| encode(f, &mut self.out));
            }
            self.written = 0;
        }
        while self.written < self.out.len() {
            let n = match Pin::new(self.ws.get_mut()).poll_write(cx, &self.out[self.written..]) {
                Poll::Pending => {
                    self.blocked = true;
                    return Poll::Pending;
                }
                Poll::Ready(result) => result.map_err(SinkError::new)?,
            };
            if n == 0 {
                return Poll::Ready(Err(SinkError::new(std::io::Error::from(std::io::ErrorKind::WriteZero))));
            }
            self.written += n;
            if std::mem::take(&mut self.blocked) {
                if let Some(channel) = &self.channel {
                    channel.heard();
                }
            }
        }
        ready!(Pin::new(self.ws.get_mut()).poll_flush(cx)).map_err(SinkError::new)?;
        // Kept for the next batch only while batches are large (a burst);
        // after a small one (a trickle, the burst's tail, a `welcome`) it is
        // given back, so that connections at rest hold none.
        if (BUSY_BATCH..=KEEP_OUT_BUFFER).contains(&self.out.len()) {
            self.out.clear();
        } else {
            self.out = Vec::new();
        }
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// The client side's batch: each frame through tungstenite, then a flush.
    fn poll_send_masked(
        &mut self,
        cx: &mut Context<'_>,
        frames: &[Frame],
        mut sent: usize,
    ) -> Poll<Result<(), SinkError>> {
        let mut ws = Pin::new(&mut self.ws);
        while let Some(frame) = frames.get(sent) {
            if ws.as_mut().poll_ready(cx).map_err(SinkError::new)?.is_pending() {
                self.through_tungstenite = Some(sent);
                return Poll::Pending;
            }
            ws.as_mut().start_send(to_message(frame)?).map_err(SinkError::new)?;
            sent += 1;
        }
        self.through_tungstenite = Some(sent);
        ready!(ws.poll_flush(cx)).map_err(SinkError::new)?;
        self.through_tungstenite = Some(0);
        Poll::Ready(Ok(()))
    }
}

fn to_message(frame: &Frame) -> Result<Message, SinkError> {
    Ok(match frame.kind() {
        FrameKind::Text => Message::Text(Utf8Bytes::try_from(frame.data().clone()).map_err(SinkError::new)?),
        FrameKind::Binary => Message::Binary(frame.data().clone()),
        FrameKind::Ping => Message::Ping(frame.data().clone()),
    })
}

/// The channel's sink: batches through [`Conn`], the close through tungstenite.
struct WsSink<S> {
    conn: SharedConn<S>,
}

impl<S> Drop for WsSink<S> {
    fn drop(&mut self) {
        let mut conn = lock(&self.conn);
        // Dropped with a batch half written (the close deadline passed): what
        // follows on the stream would not be framed.
        if !conn.out.is_empty() {
            conn.broken = true;
        }
        if let Some(reader) = conn.reader.take() {
            reader.wake();
        }
    }
}

#[async_trait]
impl<S> FrameSink for WsSink<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn send(&mut self, frames: &[Frame]) -> Result<(), SinkError> {
        std::future::poll_fn(|cx| lock(&self.conn).poll_send(cx, frames)).await
    }

    async fn close(&mut self, reason: &CloseReason) -> Result<(), SinkError> {
        let frame = CloseFrame {
            code: CloseCode::from(reason.code),
            reason: Utf8Bytes::from(reason.reason.as_ref()),
        };
        let mut message = Some(Message::Close(Some(frame)));
        std::future::poll_fn(|cx| {
            let mut conn = lock(&self.conn);
            let mut ws = Pin::new(&mut conn.ws);
            if message.is_some() {
                ready!(ws.as_mut().poll_ready(cx))?;
                if let Some(m) = message.take() {
                    ws.as_mut().start_send(m)?;
                }
            }
            ws.poll_close(cx)
        })
        .await
        .map_err(SinkError::new)
    }
}

/// The frames a client sends, as the protocol sees them. Ends after a close,
/// an oversized message, invalid UTF-8 or a transport failure.
pub struct IncomingFrames<S> {
    conn: SharedConn<S>,
    /// The channel whose liveness every frame read records, pongs included,
    /// here where they are read: heartbeats judge by it.
    channel: Channel,
    done: bool,
}

impl<S> std::fmt::Debug for IncomingFrames<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingFrames").field("done", &self.done).finish()
    }
}

/// Maps one tungstenite read result to what the protocol needs to know.
pub fn incoming_from(item: Result<Message, WsError>) -> Incoming {
    match item {
        Ok(Message::Text(t)) => Incoming::Text(t.as_str().to_owned()),
        Ok(Message::Binary(b)) => Incoming::Binary(b),
        Ok(Message::Ping(_) | Message::Frame(_)) => Incoming::Ping,
        Ok(Message::Pong(_)) => Incoming::Pong,
        Ok(Message::Close(_)) => Incoming::Close,
        Err(WsError::Capacity(_)) => Incoming::TooLarge,
        Err(WsError::Utf8(_)) => Incoming::InvalidUtf8,
        Err(_) => Incoming::Failed,
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for IncomingFrames<S> {
    type Item = Incoming;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Incoming>> {
        if self.done {
            return Poll::Ready(None);
        }
        let next = {
            let mut conn = lock(&self.conn);
            if conn.broken {
                Poll::Ready(Some(Err(WsError::AlreadyClosed)))
            } else if !conn.out.is_empty() {
                conn.reader = Some(cx.waker().clone());
                Poll::Pending
            } else {
                let next = conn.ws.poll_next_unpin(cx);
                if matches!(next, Poll::Ready(None | Some(Ok(Message::Close(_))))) {
                    conn.ended = true;
                }
                next
            }
        };
        match next {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(item)) => {
                if item.is_ok() {
                    self.channel.heard();
                }
                let incoming = incoming_from(item);
                if incoming.is_final() {
                    self.done = true;
                }
                Poll::Ready(Some(incoming))
            }
        }
    }
}

/// Turns an accepted WebSocket (the server side) into a channel (whose
/// writer task is spawned now) and the stream of what the peer sends.
pub fn attach<S>(ws: WebSocketStream<S>, config: ChannelConfig) -> (Channel, IncomingFrames<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    attach_as(ws, config, Role::Server, uuid::Uuid::new_v4(), false)
}

/// [`attach`] with the channel id given: the id an admission was told
/// (`Admission::channel_id`), so that the connect hook and the channel agree.
pub fn attach_with_id<S>(ws: WebSocketStream<S>, config: ChannelConfig, id: uuid::Uuid) -> (Channel, IncomingFrames<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    attach_as(ws, config, Role::Server, id, false)
}

/// [`attach`] for either side: a client's frames are masked, so they go
/// through tungstenite one by one instead of being encoded here. With
/// `deflate` (a server whose peer negotiated permessage-deflate, its reads
/// going through [`crate::inflate`]) data frames go out compressed.
pub(crate) fn attach_as<S>(
    ws: WebSocketStream<S>,
    config: ChannelConfig,
    role: Role,
    id: uuid::Uuid,
    deflate: bool,
) -> (Channel, IncomingFrames<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Mutex::new(Conn {
        ws,
        out: Vec::new(),
        written: 0,
        reader: None,
        broken: false,
        ended: false,
        through_tungstenite: (role == Role::Client).then_some(0),
        channel: None,
        blocked: false,
        deflate: deflate && role == Role::Server,
    }));
    let channel = Channel::open_with_id(id, config, WsSink { conn: conn.clone() });
    lock(&conn).channel = Some(channel.clone());
    let incoming = IncomingFrames {
        conn,
        channel: channel.clone(),
        done: false,
    };
    (channel, incoming)
}

/// What [`accept`]'s check sees of an upgrade request.
#[derive(Debug)]
pub struct Handshake<'a> {
    request: &'a Request,
}

impl Handshake<'_> {
    /// The request path.
    pub fn path(&self) -> &str {
        self.request.uri().path()
    }

    /// The query string, without `?`.
    pub fn query(&self) -> Option<&str> {
        self.request.uri().query()
    }

    /// The `Origin` header, which browsers send.
    pub fn origin(&self) -> Option<&str> {
        self.request.headers().get("origin").and_then(|v| v.to_str().ok())
    }
}

/// Accepts a WebSocket handshake on `stream`; `check` sees the request and may
/// refuse it with an HTTP status and JSON body.
pub async fn accept<S, F>(stream: S, config: WebSocketConfig, check: F) -> Result<WebSocketStream<S>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&Handshake<'_>) -> Result<(), (u16, String)> + Unpin,
{
    // The shape of this callback is tungstenite's; its error is an HTTP response.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        match check(&Handshake { request: req }) {
            Ok(()) => Ok(resp),
            Err((status, body)) => {
                let mut refusal = ErrorResponse::new(Some(body));
                *refusal.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::from_u16(status)
                    .unwrap_or(tokio_tungstenite::tungstenite::http::StatusCode::BAD_REQUEST);
                refusal.headers_mut().insert(
                    "content-type",
                    tokio_tungstenite::tungstenite::http::HeaderValue::from_static("application/json"),
                );
                Err(refusal)
            }
        }
    };
    tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
        .await
        .map_err(|e| Error::Handshake(e.to_string()))
}

/// Connects to a WebSocket server as a client; returns a channel to send
/// through and the frames the server sends.
pub async fn connect(
    url: &str,
    config: ChannelConfig,
) -> Result<
    (
        Channel,
        IncomingFrames<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    ),
    Error,
> {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| Error::Handshake(e.to_string()))?;
    Ok(attach_as(ws, config, Role::Client, uuid::Uuid::new_v4(), false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;

    /// Our server frames are byte for byte what tungstenite writes, at every
    /// length class, and `encoded_len` (the batch's one allocation) is exact.
    #[test]
    fn encoded_frames_match_tungstenite_and_their_announced_length() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let data = "x".repeat(len);
            for (frame, opcode) in [
                (Frame::text(data.clone()), OpCode::Data(Data::Text)),
                (Frame::binary(data.clone().into_bytes()), OpCode::Data(Data::Binary)),
            ] {
                let mut ours = Vec::new();
                encode(&frame, &mut ours);
                let mut theirs = Vec::new();
                WsFrame::message(data.clone().into_bytes(), opcode, true)
                    .format(&mut theirs)
                    .expect("formats into a Vec");
                assert_eq!(ours, theirs, "length {len}");
                assert_eq!(encoded_len(frame.len()), ours.len(), "length {len}");
            }
        }
    }
}
