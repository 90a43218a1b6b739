//! # channelbox-ws
//!
//! The tokio-tungstenite transport. It turns a WebSocket connection (server or
//! client side) into a core [`Channel`] plus a stream of [`Incoming`] frames:
//! writes go through core's bounded queue and writer task (a batch of queued
//! frames per socket flush), pings are answered by tungstenite, messages above
//! the configured size are reported as [`Incoming::TooLarge`], and close codes
//! map to and from [`CloseReason`].
//!
//! [`serve_chat`] runs the full chat protocol of `channelbox-protocol` on a raw
//! TCP stream with plain tokio-tungstenite — no web framework — which is how the
//! `broadcast` example and the load generator use it.
//!
//! ```no_run
//! use std::sync::Arc;
//! use channelbox_protocol::{ChatService, ProtocolConfig};
//! use channelbox_store_memory::MemoryStore;
//!
//! # async fn demo() -> std::io::Result<()> {
//! let service = ChatService::new(Arc::new(MemoryStore::default()), ProtocolConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! loop {
//!     let (tcp, _) = listener.accept().await?;
//!     let service = service.clone();
//!     tokio::spawn(async move { channelbox_ws::serve_chat(&service, tcp).await });
//! }
//! # }
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use channelbox_core::{Channel, ChannelConfig, CloseReason, Frame, FrameKind, FrameSink, SinkError};
use channelbox_protocol::{ChatService, Incoming};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The WebSocket handshake failed or was refused.
    #[error("websocket handshake failed: {0}")]
    Handshake(String),
    /// The TCP connection failed.
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The WebSocket settings a channelbox server uses: a bounded message size,
/// and buffers sized for many connections rather than a few fast ones — a
/// 512-byte read buffer instead of tungstenite's 128 KiB, and a write buffer
/// that lets a batch of queued frames go out in few writes.
///
/// The read buffer is allocated for every connection up front, so it is a
/// large part of an idle connection's memory: at 10,000 idle connections
/// 2 KiB cost 7.8 KB per connection and 512 bytes 6.3 KB. What clients send
/// (publishes, joins) is mostly smaller than that; a larger message is read
/// in 512-byte pieces.
pub fn websocket_config(max_message_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
        .read_buffer_size(512)
        .write_buffer_size(16 * 1024)
}

/// Writes frames to a tungstenite sink: all of a batch, then one flush.
struct WsSink<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
}

fn to_message(frame: &Frame) -> Result<Message, SinkError> {
    Ok(match frame.kind() {
        FrameKind::Text => Message::Text(Utf8Bytes::try_from(frame.data().clone()).map_err(SinkError::new)?),
        FrameKind::Binary => Message::Binary(frame.data().clone()),
    })
}

#[async_trait]
impl<S> FrameSink for WsSink<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn send(&mut self, frames: &[Frame]) -> Result<(), SinkError> {
        for frame in frames {
            self.sink.feed(to_message(frame)?).await.map_err(SinkError::new)?;
        }
        self.sink.flush().await.map_err(SinkError::new)
    }

    async fn close(&mut self, reason: &CloseReason) -> Result<(), SinkError> {
        let frame = CloseFrame {
            code: CloseCode::from(reason.code),
            reason: Utf8Bytes::from(reason.reason.as_ref()),
        };
        self.sink
            .send(Message::Close(Some(frame)))
            .await
            .map_err(SinkError::new)?;
        self.sink.close().await.map_err(SinkError::new)
    }
}

/// The frames a client sends, as the protocol sees them. Ends after a close,
/// an oversized message, invalid UTF-8 or a transport failure.
pub struct IncomingFrames<S> {
    stream: SplitStream<WebSocketStream<S>>,
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
        Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => Incoming::Control,
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
        match self.stream.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(item)) => {
                let incoming = incoming_from(item);
                if !matches!(incoming, Incoming::Text(_) | Incoming::Binary(_) | Incoming::Control) {
                    self.done = true;
                }
                Poll::Ready(Some(incoming))
            }
        }
    }
}

/// Turns an established WebSocket into a channel (whose writer task is spawned
/// now) and the stream of what the peer sends.
pub fn attach<S>(ws: WebSocketStream<S>, config: ChannelConfig) -> (Channel, IncomingFrames<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    let channel = Channel::open(config, WsSink { sink });
    (channel, IncomingFrames { stream, done: false })
}

/// Accepts a WebSocket handshake on `stream`; `check` sees the request path and
/// query and may refuse it with an HTTP status and JSON body.
pub async fn accept<S, F>(stream: S, config: WebSocketConfig, check: F) -> Result<WebSocketStream<S>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&str, Option<&str>) -> Result<(), (u16, String)> + Unpin,
{
    // The shape of this callback is tungstenite's; its error is an HTTP response.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        match check(req.uri().path(), req.uri().query()) {
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

/// Serves the chat protocol on one raw connection: `GET /ws/{group}` upgrades,
/// anything else is refused with 404.
pub async fn serve_chat<S>(service: &ChatService, stream: S) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut admitted = None;
    let config = websocket_config(service.config().max_message_bytes);
    let ws = accept(stream, config, |path, query| {
        let Some(group) = path.strip_prefix("/ws/").filter(|g| !g.is_empty() && !g.contains('/')) else {
            return Err((404, r#"{"code":"not_found","message":"no such endpoint"}"#.to_owned()));
        };
        match service.admit(group, query) {
            Ok(a) => {
                admitted = Some(a);
                Ok(())
            }
            Err(answer) => Err((answer.status, answer.body)),
        }
    })
    .await?;
    let Some(admission) = admitted else {
        return Err(Error::Handshake("the upgrade was not admitted".into()));
    };
    let (channel, incoming) = attach(ws, service.channel_config());
    service.run(admission, channel, incoming).await;
    Ok(())
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
    Ok(attach(ws, config))
}
