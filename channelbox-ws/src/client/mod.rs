//! A chat client that recovers by itself (feature `client`): it connects to a
//! chat server, joins its groups, and when the connection drops — a restart,
//! a slow-consumer close (4000), an insufficient-state close (4002), a
//! heartbeat close (4003), a network fault, a connection found dead —
//! reconnects with jittered exponential backoff and recovers every group it
//! is in with `since`/`epoch`: from the last offset it delivered, or, in a
//! group where it received nothing yet, from the position the server named in
//! `welcome` or `joined`. The application sees every saved message of its
//! groups once, in offset order, across reconnects, and an
//! [`Event::Recovered`] for every recovery (`complete: false` when something
//! was lost).
//!
//! The backoff starts over only once a connection stayed up for
//! [`ClientConfig::stable_after`], so a server that closes each connection at
//! once (4002, 4003, a refused rejoin) is not hammered. A connection that does
//! not reach `welcome` within [`ClientConfig::connect_timeout`], or from which
//! nothing arrives within [`ClientConfig::pong_timeout`] of a ping frame the
//! client sent after [`ClientConfig::ping_interval`] of silence, is given up
//! (a half-open TCP connection never closes by itself).
//!
//! Requests carry a `ref` unique for the client's life. [`ChatClient::request`]
//! and its helpers wait for the reply; [`ChatClient::start_publish`] returns
//! the ref at once and the outcome comes as an event ([`Event::Published`],
//! [`Event::PublishRefused`], [`Event::PublishUnanswered`]), which is what a
//! checker of the server's promises needs: the events are a complete log of
//! what the client saw.
//!
//! ```no_run
//! use channelbox_ws::client::{ChatClient, ClientConfig, Event};
//!
//! # async fn demo() -> Result<(), channelbox_ws::client::ClientError> {
//! let mut client = ChatClient::connect(ClientConfig::new("ws://127.0.0.1:8080", "chat")).await?;
//! client.publish("chat", serde_json::json!({"text": "hi"})).await?;
//! while let Some(event) = client.next_event().await {
//!     if let Event::Message { group, offset, data, .. } = event {
//!         println!("{group} #{offset:?}: {data}");
//!     }
//! }
//! # Ok(()) }
//! ```

mod connection;
mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

/// How a [`ChatClient`] connects and reconnects.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The server, `ws://host:port` (no path).
    pub server: String,
    /// The group of the connection's URL.
    pub group: String,
    /// A token for servers that require one.
    pub token: Option<String>,
    /// The first wait before reconnecting; it doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// The longest wait before reconnecting.
    pub max_backoff: Duration,
    /// How long a connection must have been up (since `welcome`) for the
    /// backoff to start over when it ends.
    pub stable_after: Duration,
    /// How long connecting may take — TCP, the WebSocket handshake and the
    /// server's `welcome` together — before the attempt is given up.
    pub connect_timeout: Duration,
    /// After this long without any frame from the server the client sends a
    /// ping frame; zero turns the liveness check off.
    pub ping_interval: Duration,
    /// How long after its ping the client waits for any frame before it gives
    /// the connection up as dead. Also bounds how long one frame may take to
    /// send.
    pub pong_timeout: Duration,
}

impl ClientConfig {
    /// A client of `server` whose connection joins `group`.
    pub fn new(server: impl Into<String>, group: impl Into<String>) -> Self {
        ClientConfig {
            server: server.into(),
            group: group.into(),
            token: None,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            stable_after: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered with an error frame.
    #[error("{code}: {message}")]
    Rejected {
        /// The protocol's error code (`forbidden`, `unavailable`, …).
        code: String,
        /// The server's sentence.
        message: String,
    },
    /// The connection dropped before the reply came; the request may or may
    /// not have taken effect.
    #[error("the connection dropped before the reply")]
    Disconnected,
    /// The client was dropped.
    #[error("the client is closed")]
    Closed,
}

/// What the application receives: everything the client saw, in order.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// Connected (again): the server's `welcome`.
    Connected {
        /// The connection's channel id.
        channel_id: String,
        /// The URL group's epoch.
        epoch: String,
        /// The URL group's newest saved offset (0 if none).
        offset: u64,
    },
    /// A connection ended, or an attempt to connect failed.
    Disconnected {
        /// The close code the server sent (4000, 4002, 4003, 1001, …); `None`
        /// when none came (a network fault, or the client gave up).
        code: Option<u16>,
        /// The close frame's reason, or why the client gave up (`connect
        /// timeout`, `no pong`, `rejoin failed`, the I/O error).
        reason: String,
    },
    /// A group was joined, by a request or by a rejoin after a reconnect:
    /// where its live delivery starts.
    Joined {
        /// The group.
        group: String,
        /// Its epoch.
        epoch: String,
        /// Its newest saved offset when joined.
        offset: u64,
        /// The join's ref.
        reference: u64,
    },
    /// A group's recovery after a reconnect; `complete: false` means messages
    /// were lost (history trimmed, or a new epoch).
    Recovered {
        /// The group.
        group: String,
        /// The `since` the recovery started from.
        from: u64,
        /// The last offset replayed (`from` when nothing was).
        to: u64,
        /// Whether nothing was lost.
        complete: bool,
    },
    /// A message of a group (saved ones arrive once each, in offset order).
    Message {
        /// The group.
        group: String,
        /// Its epoch.
        epoch: Option<String>,
        /// Its offset; `None` for unsaved messages.
        offset: Option<u64>,
        /// The sender's channel id (`None` from the backend).
        from: Option<String>,
        /// The payload.
        data: Value,
    },
    /// A saved message received again (same group, epoch and an offset
    /// already delivered) and therefore not delivered as [`Event::Message`].
    Duplicate {
        /// The group.
        group: String,
        /// Its epoch.
        epoch: String,
        /// Its offset.
        offset: u64,
    },
    /// A publish was acknowledged.
    Published {
        /// The publish's ref.
        reference: u64,
        /// The group.
        group: String,
        /// Its offset (`None` when not saved).
        offset: Option<u64>,
        /// Its epoch (`None` when not saved).
        epoch: Option<String>,
    },
    /// A publish was refused (`unavailable`: nothing was saved or delivered,
    /// unless the server says the outcome is unknown).
    PublishRefused {
        /// The publish's ref.
        reference: u64,
        /// The group.
        group: String,
        /// The protocol's error code.
        code: String,
        /// The server's sentence.
        message: String,
    },
    /// The connection dropped before a publish was answered: it may or may
    /// not have been saved.
    PublishUnanswered {
        /// The publish's ref.
        reference: u64,
        /// The group.
        group: String,
    },
    /// A group could not be rejoined after a reconnect. With `unavailable`
    /// the client reconnects (with backoff) and tries again (`retrying`); with
    /// any other code the group is dropped: join it again to get it back.
    RejoinFailed {
        /// The group.
        group: String,
        /// The protocol's error code.
        code: String,
        /// The server's sentence.
        message: String,
        /// Whether the client tries again.
        retrying: bool,
    },
    /// An error frame without a ref (`rate_limited`, `too_large`).
    ServerError {
        /// The protocol's error code.
        code: String,
        /// The server's sentence.
        message: String,
    },
    /// A message sent to this channel alone.
    Direct {
        /// The sender's channel id.
        from: String,
        /// The payload.
        data: Value,
    },
    /// A member event (`member_joined` / `member_left`), as the server sent it.
    Member(Value),
}

/// A request for the connection task: the frame (its `ref` set) and who
/// waits for the reply, if anyone.
#[derive(Debug)]
struct Request {
    frame: Value,
    reference: u64,
    reply: Option<oneshot::Sender<Result<Value, ClientError>>>,
}

/// A client of the chat protocol that reconnects and recovers by itself; see
/// the module docs.
#[derive(Debug)]
pub struct ChatClient {
    requests: mpsc::Sender<Request>,
    events: mpsc::Receiver<Event>,
    refs: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ChatClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ChatClient {
    /// Starts the client; resolves once the first connection is open (its
    /// [`Event::Connected`] is not repeated on the event stream, and the
    /// failed attempts before it are not reported).
    pub async fn connect(config: ClientConfig) -> Result<ChatClient, ClientError> {
        let (requests, rx) = mpsc::channel(256);
        let (tx, mut events) = mpsc::channel(4096);
        let refs = Arc::new(AtomicU64::new(1));
        let task = tokio::spawn(connection::run(config, rx, tx, refs.clone()));
        loop {
            match events.recv().await {
                Some(Event::Connected { .. }) => {
                    return Ok(ChatClient {
                        requests,
                        events,
                        refs,
                        task,
                    })
                }
                Some(_) => continue,
                None => return Err(ClientError::Closed),
            }
        }
    }

    /// The next event; `None` once the client has stopped.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Queues a request frame (its `ref` is set here); returns the ref.
    async fn submit(
        &self,
        mut frame: Value,
        reply: Option<oneshot::Sender<Result<Value, ClientError>>>,
    ) -> Result<u64, ClientError> {
        let reference = self.refs.fetch_add(1, Ordering::Relaxed);
        frame["ref"] = json!(reference);
        let request = Request {
            frame,
            reference,
            reply,
        };
        self.requests.send(request).await.map_err(|_| ClientError::Closed)?;
        Ok(reference)
    }

    /// Sends a request frame and waits for its reply (which carries the
    /// `ref` the client gave it).
    pub async fn request(&self, frame: Value) -> Result<Value, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.submit(frame, Some(reply)).await?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Publishes to a group (saved to history); the `published` reply.
    pub async fn publish(&self, group: &str, data: Value) -> Result<Value, ClientError> {
        self.request(json!({"type": "publish", "group": group, "data": data}))
            .await
    }

    /// Publishes to a group without waiting: returns the publish's ref at
    /// once; its outcome comes as [`Event::Published`],
    /// [`Event::PublishRefused`] or [`Event::PublishUnanswered`].
    pub async fn start_publish(&self, group: &str, data: Value) -> Result<u64, ClientError> {
        self.submit(json!({"type": "publish", "group": group, "data": data}), None)
            .await
    }

    /// Joins a group; after a reconnect it is rejoined and recovered too, from
    /// the `joined` position if nothing arrived in it yet.
    pub async fn join(&self, group: &str) -> Result<Value, ClientError> {
        self.request(json!({"type": "join", "group": group})).await
    }

    /// Leaves a group, at once: nothing more of it is delivered, not even
    /// what the server sent before it read the `leave`, and it is not
    /// rejoined after a reconnect — nor when a `join` of it was still
    /// unanswered. The URL group may be left too: every new connection joins
    /// it by its URL, and the client leaves it again before anything else.
    pub async fn leave(&self, group: &str) -> Result<Value, ClientError> {
        self.request(json!({"type": "leave", "group": group})).await
    }
}
