//! The socket half of the transport: a tokio-tungstenite stream becomes a core
//! [`Channel`] (writes through core's bounded queue, a batch per flush) plus a
//! stream of [`Incoming`] frames; the server handshake with a check of the
//! request, and the client side.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use channelbox_core::{Channel, ChannelConfig, CloseReason, Frame, FrameKind, FrameSink, Incoming, SinkError};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::Error;

/// Writes frames to a tungstenite sink: all of a batch, then one flush.
struct WsSink<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
}

fn to_message(frame: &Frame) -> Result<Message, SinkError> {
    Ok(match frame.kind() {
        FrameKind::Text => Message::Text(Utf8Bytes::try_from(frame.data().clone()).map_err(SinkError::new)?),
        FrameKind::Binary => Message::Binary(frame.data().clone()),
        FrameKind::Ping => Message::Ping(frame.data().clone()),
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
        match self.stream.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(item)) => {
                let incoming = incoming_from(item);
                if incoming.is_final() {
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
    Ok(attach(ws, config))
}
