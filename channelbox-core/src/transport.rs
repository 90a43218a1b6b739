//! The transport contract, both halves. A transport (a WebSocket library, a web
//! framework's socket) hands the core what its peer sent as [`Incoming`] items,
//! and writes what the core queued through the [`FrameSink`] it provides; a
//! [`CloseReason`] travels with the close in either direction.
//!
//! *API boundary:* this module is everything a transport crate needs from the
//! core besides [`Channel::open`](crate::Channel::open); nothing here names a
//! protocol or a socket library.

use std::borrow::Cow;

use async_trait::async_trait;
use bytes::Bytes;

use crate::payload::Frame;

/// What a peer sent, as every transport reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A text frame (valid UTF-8).
    Text(String),
    /// A binary frame.
    Binary(Bytes),
    /// A ping (activity; transports answer it with a pong themselves).
    Ping,
    /// A pong: the peer is alive, but a pong is no activity for expiry.
    Pong,
    /// The peer sent a close frame.
    Close,
    /// A message above the maximum size.
    TooLarge,
    /// A text frame that is not UTF-8.
    InvalidUtf8,
    /// The transport failed.
    Failed,
}

impl Incoming {
    /// Whether the stream of a connection ends with this item: everything but
    /// data and control frames is the last thing a transport reports.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            Incoming::Text(_) | Incoming::Binary(_) | Incoming::Ping | Incoming::Pong
        )
    }
}

/// Why a channel closed, with the WebSocket close code it is sent with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseReason {
    /// The close code (RFC 6455 or 4000-4999 for application codes).
    pub code: u16,
    /// A short human-readable reason.
    pub reason: Cow<'static, str>,
}

impl CloseReason {
    /// 1000: a normal close.
    pub const NORMAL: CloseReason = CloseReason::new(1000, "");
    /// 1001: the server is going away (shutdown, `close_all_connections`).
    pub const GOING_AWAY: CloseReason = CloseReason::new(1001, "going away");
    /// 1006: the transport failed or the peer vanished; nothing is sent.
    pub const ABNORMAL: CloseReason = CloseReason::new(1006, "connection lost");
    /// 4000: the client did not read fast enough and its queue overflowed.
    pub const SLOW_CONSUMER: CloseReason = CloseReason::new(4000, "slow consumer");
    /// 4001: the client was idle longer than its expiry.
    pub const EXPIRED: CloseReason = CloseReason::new(4001, "expired");
    /// 4002: this server can no longer give the client a group's messages
    /// without a gap (missed messages gone from history, or a new epoch); the
    /// client recovers by reconnecting with `since`/`epoch`.
    pub const INSUFFICIENT_STATE: CloseReason = CloseReason::new(4002, "insufficient state");
    /// 4003: nothing arrived from the client, pongs included, for longer than
    /// heartbeats allow.
    pub const NO_PONG: CloseReason = CloseReason::new(4003, "no pong");

    /// A close reason with a static text.
    pub const fn new(code: u16, reason: &'static str) -> Self {
        CloseReason {
            code,
            reason: Cow::Borrowed(reason),
        }
    }
}

/// The error a sink reports when it cannot write; the channel then closes.
#[derive(Debug, thiserror::Error)]
#[error("frame sink failed: {0}")]
pub struct SinkError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

impl SinkError {
    /// Wraps any error.
    pub fn new(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        SinkError(err.into())
    }
}

/// Where a channel's writer task writes: the one thing a transport provides.
#[async_trait]
pub trait FrameSink: Send + 'static {
    /// Writes the frames in order, then flushes once.
    async fn send(&mut self, frames: &[Frame]) -> Result<(), SinkError>;

    /// Sends a close with this reason and flushes. Not called for
    /// [`CloseReason::ABNORMAL`].
    async fn close(&mut self, reason: &CloseReason) -> Result<(), SinkError>;
}
