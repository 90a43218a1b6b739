//! The chat protocol of `channelbox-protocol` on a raw connection, with plain
//! tokio-tungstenite (feature `chat`, on by default).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use channelbox_protocol::{Admission, ChatService, GroupEndpoint, GroupPath, HttpAnswer, WriteCounter};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::inflate::Inflating;
use crate::socket::attach_as;
use crate::{accept, attach_with_id, websocket_config, Error};

/// Serves the chat protocol on one raw connection: `GET /ws/{group}` upgrades,
/// anything else is refused with 404.
pub async fn serve_chat<S>(service: &ChatService, stream: S) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut admitted = None;
    let stream = Counted {
        io: stream,
        writes: service.socket_writes(),
    };
    let ws = accept(stream, service_websocket_config(service), |handshake| {
        let path = handshake.path();
        let websocket = GroupPath::parse(path).filter(|p| p.endpoint == GroupEndpoint::WebSocket);
        let Some(group) = websocket.map(|p| p.raw_group) else {
            let missing = HttpAnswer::not_found();
            return Err((missing.status, missing.body));
        };
        // The handshake answers before anything could be awaited: with a
        // connect hook, upgrades go through `serve` (hyper) or an adapter.
        if service.has_connect_hook() {
            return Err((
                503,
                r#"{"code":"unavailable","message":"this transport cannot ask the connect hook"}"#.to_owned(),
            ));
        }
        match service.admit_from(group, handshake.query(), handshake.origin()) {
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
    let (channel, incoming) = attach_with_id(ws, service.channel_config(), admission.channel_id());
    service.run(admission, channel, incoming).await;
    Ok(())
}

/// Runs the chat protocol on a connection whose upgrade was already done by an
/// HTTP server (hyper's upgrade, for example) and admitted by
/// [`ChatService::admit`]: the socket speaks WebSocket from its first byte.
pub async fn serve_upgraded<S>(service: &ChatService, admission: Admission, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_upgraded_with(service, admission, io, None).await;
}

/// [`serve_upgraded`] on a connection whose upgrade answer accepted
/// permessage-deflate ([`crate::deflate::negotiate`], its
/// [`Agreed::response`](crate::deflate::Agreed::response) sent) when
/// `deflate` is given: compressed client messages are inflated (bounded by
/// `max_message_bytes` as they inflate) and data frames go out compressed.
pub async fn serve_upgraded_with<S>(
    service: &ChatService,
    admission: Admission,
    io: S,
    deflate: Option<crate::deflate::Agreed>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = Counted {
        io,
        writes: service.socket_writes(),
    };
    let max = service.config().max_message_bytes;
    let io = Inflating::new(io, deflate.map(|_| max));
    // Boxed: its state (the socket, then the WebSocket) is only needed
    // here, and would otherwise be laid out in the future every connection
    // keeps while it waits.
    let ws = Box::pin(WebSocketStream::from_raw_socket(
        io,
        Role::Server,
        Some(service_websocket_config(service)),
    ))
    .await;
    let (channel, incoming) = attach_as(
        ws,
        service.channel_config(),
        Role::Server,
        admission.channel_id(),
        deflate.is_some(),
    );
    service.run(admission, channel, incoming).await;
}

/// The WebSocket settings for the service's limits ([`websocket_config`]):
/// what every upgrade of the chat server uses, whichever adapter accepts it,
/// so that message size and write buffer are bounded alike everywhere.
pub fn service_websocket_config(service: &ChatService) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    let config = service.config();
    websocket_config(config.max_message_bytes, config.queue_bytes)
}

/// A connection's socket that counts its writes (`channelbox_socket_writes_total`):
/// each write that took bytes is one `send` to the kernel, so the counter over
/// the frames delivered tells how well writes are batched.
struct Counted<S> {
    io: S,
    writes: WriteCounter,
}

impl<S> Counted<S> {
    fn counted(&self, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(1..)) = written {
            self.writes.count();
        }
        written
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.counted(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.counted(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
