//! Options of the chat protocol service: the limits and switches of docs/protocol.md.

use std::time::Duration;

use crate::auth::TokenVerifier;

/// How a [`ChatService`](crate::ChatService) behaves. Every limit is configurable;
/// the defaults are docs/protocol.md's.
#[derive(Clone, Debug)]
pub struct ProtocolConfig {
    /// Largest accepted client message, after reassembly (`--max-message-bytes`).
    pub max_message_bytes: usize,
    /// Data frames per second a connection may send, burst the same; 0 is off.
    pub rate_limit: u32,
    /// Frames a connection may have queued (`--queue`).
    pub queue_frames: usize,
    /// Bytes a connection may have queued (`--queue-bytes`).
    pub queue_bytes: usize,
    /// Close connections idle this long (`--expiry`).
    pub expiry: Option<Duration>,
    /// Groups one connection may be in at once.
    pub max_groups_per_connection: usize,
    /// Open connections (WebSockets and event streams) the server accepts.
    pub max_connections: usize,
    /// Requires signed tokens when set (`--token-secret`).
    pub tokens: Option<TokenVerifier>,
    /// Enables the admin API when set (`--admin-token`).
    pub admin_token: Option<String>,
    /// Origins allowed to open WebSockets, matched exactly; empty allows any
    /// (`--allowed-origin`). An upgrade without `Origin` is always allowed.
    pub allowed_origins: Vec<String>,
    /// How often every connection is pinged; `None` turns heartbeats off
    /// (`--ping-interval`).
    pub ping_interval: Option<Duration>,
    /// How long after a missed ping a silent connection is closed with 4003
    /// (`--pong-timeout`).
    pub pong_timeout: Duration,
    /// Negotiates permessage-deflate with the WebSocket clients that offer
    /// it (`--compression`, on by default).
    pub compression: bool,
    /// The longest a broadcast's frame waits for the frames that follow it,
    /// so that a connection's frames go out a few per write
    /// (`--write-delay-ms`; core's `ChannelConfig::write_delay`). Replies
    /// and pings never wait.
    pub write_delay: Duration,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig {
            max_message_bytes: 65_536,
            rate_limit: 0,
            queue_frames: 1024,
            queue_bytes: 1 << 20,
            expiry: None,
            max_groups_per_connection: 256,
            max_connections: 100_000,
            tokens: None,
            admin_token: None,
            allowed_origins: Vec::new(),
            ping_interval: Some(Duration::from_secs(25)),
            pong_timeout: Duration::from_secs(10),
            compression: true,
            write_delay: DEFAULT_WRITE_DELAY,
        }
    }
}

/// `--write-delay-ms` by default. Measured with `cargo xtask bench --light`
/// (200 messages/s to 1,000 subscribers): see the CHANGELOG for the figures.
pub const DEFAULT_WRITE_DELAY: Duration = Duration::from_millis(DEFAULT_WRITE_DELAY_MS);

/// [`DEFAULT_WRITE_DELAY`] in milliseconds.
pub const DEFAULT_WRITE_DELAY_MS: u64 = 18;

/// The largest `--write-delay-ms`: latency stays bounded by it.
pub const MAX_WRITE_DELAY_MS: u64 = 100;

/// The most messages one `history` request or `?history=` replay returns.
pub const MAX_HISTORY_LIMIT: usize = 1000;
/// Messages a `history` request returns without `limit`.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;
/// Longest group name, in bytes.
pub const MAX_GROUP_BYTES: usize = 128;
/// Deepest JSON nesting a client frame may have.
pub const MAX_JSON_DEPTH: usize = 128;
/// The most bytes (about) one HTTP history answer holds; past it the answer
/// pages with `"more":true`, as the WebSocket reply does.
pub(crate) const HTTP_HISTORY_BYTES: usize = 4 << 20;
