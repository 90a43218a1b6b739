//! # channelbox-ws
//!
//! The tokio-tungstenite transport. It turns a WebSocket connection (server or
//! client side) into a core [`Channel`](channelbox_core::Channel) plus a stream
//! of [`Incoming`](channelbox_core::Incoming) frames:
//! writes go through core's bounded queue and writer task (a batch of queued
//! frames per socket flush), pings are answered by tungstenite, messages above
//! the configured size are reported as [`Incoming::TooLarge`], and close codes
//! map to and from [`CloseReason`](channelbox_core::CloseReason).
//!
//! ## Features
//! - `chat` (default): [`serve_chat`] runs the full chat protocol of
//!   `channelbox-protocol` on a raw TCP stream with plain tokio-tungstenite —
//!   no web framework — and [`serve_upgraded`] on a socket an HTTP server
//!   already upgraded. Without it (`default-features = false`) the crate is
//!   the socket adapter alone ([`attach`], [`accept`], [`connect`]) and
//!   depends on `channelbox-core` only, not on the chat protocol, its tokens
//!   or its metrics.
//! - `client` (default): [`client::ChatClient`], a chat client that reconnects
//!   with backoff and recovers its groups by itself.
//! - `server`: [`server::serve`], the chat server's accept loop on hyper
//!   (request-head deadline, bounded pending connections, WebSocket upgrades)
//!   around any framework's routes; the warp and axum adapters use it.
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

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[cfg(feature = "chat")]
mod chat;
#[cfg(feature = "client")]
pub mod client;
pub mod deflate;
#[cfg(feature = "chat")]
mod inflate;
#[cfg(feature = "server")]
pub mod server;
mod socket;

#[cfg(feature = "chat")]
pub use chat::{serve_chat, serve_upgraded, serve_upgraded_with, service_websocket_config};
pub use socket::{accept, attach, attach_with_id, connect, incoming_from, Handshake, IncomingFrames};

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
///
/// The write buffer is bounded too: tungstenite's default lets it grow
/// without limit, and a client that sends pings and never reads would pile
/// up pongs in it. Here it holds at most what the channel's queue may hold
/// (`max_queue_bytes`) plus one write buffer; past that a write of frames
/// fails and the connection closes, and pongs wait (tungstenite keeps only the
/// newest) instead of piling up.
pub fn websocket_config(max_message_bytes: usize, max_queue_bytes: usize) -> WebSocketConfig {
    const WRITE_BUFFER: usize = 16 * 1024;
    WebSocketConfig::default()
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
        .read_buffer_size(512)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + max_queue_bytes.max(max_message_bytes) + 1024)
}
