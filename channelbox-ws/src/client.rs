//! A chat client that recovers by itself (feature `client`): it connects to a
//! chat server, joins its groups, and when the connection drops — a restart,
//! a slow-consumer close (4000), a heartbeat close (4003), a network fault —
//! reconnects with jittered exponential backoff and recovers every group it
//! is in with `since`/`epoch` from the last offset it delivered. The
//! application sees every saved message of its groups once, in offset order,
//! across reconnects, and is told when a recovery was incomplete.
//!
//! Requests are futures settled by their `ref`: the reply, or a
//! [`ClientError::Rejected`] carrying the protocol's error code.
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

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

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

/// What the application receives.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// Connected (again); `channel_id` is this connection's id.
    Connected {
        /// The connection's channel id.
        channel_id: String,
    },
    /// The connection dropped, with the close code if one came.
    Disconnected {
        /// The WebSocket close code.
        code: Option<u16>,
    },
    /// A group's recovery after a reconnect; `complete: false` means messages
    /// were lost (history trimmed, or a new epoch).
    Recovered {
        /// The group.
        group: String,
        /// Whether nothing was lost.
        complete: bool,
    },
    /// A message of a group (saved ones arrive once each, in offset order).
    Message {
        /// The group.
        group: String,
        /// Its offset; `None` for unsaved messages.
        offset: Option<u64>,
        /// The sender's channel id (`None` from the backend).
        from: Option<String>,
        /// The payload.
        data: Value,
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

/// A request for the connection task.
#[derive(Debug)]
struct Request {
    frame: Value,
    reply: oneshot::Sender<Result<Value, ClientError>>,
}

/// A client of the chat protocol that reconnects and recovers by itself; see
/// the module docs.
#[derive(Debug)]
pub struct ChatClient {
    requests: mpsc::Sender<Request>,
    events: mpsc::Receiver<Event>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ChatClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ChatClient {
    /// Starts the client; resolves once the first connection is open (its
    /// [`Event::Connected`] is not repeated on the event stream).
    pub async fn connect(config: ClientConfig) -> Result<ChatClient, ClientError> {
        let (requests, rx) = mpsc::channel(256);
        let (tx, mut events) = mpsc::channel(4096);
        let task = tokio::spawn(run(config, rx, tx));
        loop {
            match events.recv().await {
                Some(Event::Connected { .. }) => return Ok(ChatClient { requests, events, task }),
                Some(_) => continue,
                None => return Err(ClientError::Closed),
            }
        }
    }

    /// The next event; `None` once the client has stopped.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Sends a request frame and waits for its reply.
    pub async fn request(&self, frame: Value) -> Result<Value, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request { frame, reply })
            .await
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Publishes to a group (saved to history); the `published` reply.
    pub async fn publish(&self, group: &str, data: Value) -> Result<Value, ClientError> {
        self.request(json!({"type": "publish", "group": group, "data": data}))
            .await
    }

    /// Joins a group; after a reconnect it is rejoined and recovered too.
    pub async fn join(&self, group: &str) -> Result<Value, ClientError> {
        self.request(json!({"type": "join", "group": group})).await
    }
}

/// Where the client stands in each group: the epoch and the last saved
/// offset it delivered.
#[derive(Debug, Default)]
struct Positions(BTreeMap<String, Option<(String, u64)>>);

impl Positions {
    fn since_query(&self, group: &str) -> String {
        match self.0.get(group).and_then(Option::as_ref) {
            Some((epoch, offset)) => format!("?since={offset}&epoch={epoch}"),
            None => String::new(),
        }
    }

    fn join_frame(&self, group: &str) -> Value {
        match self.0.get(group).and_then(Option::as_ref) {
            Some((epoch, offset)) => json!({"type": "join", "group": group, "since": offset, "epoch": epoch}),
            None => json!({"type": "join", "group": group}),
        }
    }

    /// Whether a saved message is new (and records it): offsets already
    /// delivered in the same epoch are dropped.
    fn take(&mut self, group: &str, epoch: &str, offset: u64) -> bool {
        let slot = self.0.entry(group.to_owned()).or_default();
        match slot {
            Some((e, last)) if e == epoch && offset <= *last => false,
            _ => {
                *slot = Some((epoch.to_owned(), offset));
                true
            }
        }
    }
}

/// The connection task: connect, serve, and on any drop back off and again.
async fn run(config: ClientConfig, mut requests: mpsc::Receiver<Request>, events: mpsc::Sender<Event>) {
    let mut positions = Positions::default();
    positions.0.insert(config.group.clone(), None);
    let mut backoff = config.min_backoff;
    loop {
        if let Ok(ws) = connect_once(&config, &positions).await {
            backoff = config.min_backoff;
            serve(ws, &config.group, &mut positions, &mut requests, &events).await;
        }
        if events.is_closed() {
            return;
        }
        tokio::time::sleep(jitter(backoff)).await;
        backoff = (backoff * 2).min(config.max_backoff);
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect_once(config: &ClientConfig, positions: &Positions) -> Result<Ws, ()> {
    let mut url = format!(
        "{}/ws/{}{}",
        config.server,
        config.group,
        positions.since_query(&config.group)
    );
    if let Some(token) = &config.token {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("token={token}"));
    }
    tokio_tungstenite::connect_async(url)
        .await
        .map(|(ws, _)| ws)
        .map_err(|_| ())
}

/// Up to a quarter more or less than `d`, so that clients a restart
/// disconnected together do not reconnect together.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    let spread = f64::from(nanos % 1000) / 1000.0 - 0.5; // -0.5 .. 0.5
    d.mul_f64(1.0 + spread / 2.0)
}

/// Serves one connection until it drops, then tells the application it
/// disconnected (with the close code, when one came).
async fn serve(
    mut ws: Ws,
    url_group: &str,
    positions: &mut Positions,
    requests: &mut mpsc::Receiver<Request>,
    events: &mpsc::Sender<Event>,
) {
    let mut pending: HashMap<u64, oneshot::Sender<Result<Value, ClientError>>> = HashMap::new();
    let mut next_ref = 0u64;
    // Rejoin and recover every group but the URL's (the URL recovers that).
    let others: Vec<Value> = positions
        .0
        .keys()
        .filter(|g| g.as_str() != url_group)
        .map(|g| positions.join_frame(g))
        .collect();
    let mut code = None;
    for frame in others {
        if ws.send(Message::text(frame.to_string())).await.is_err() {
            break;
        }
    }
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(Request { mut frame, reply }) = request else { return };
                next_ref += 1;
                frame["ref"] = json!(next_ref);
                if frame["type"] == "join" {
                    if let Some(g) = frame["group"].as_str() {
                        positions.0.entry(g.to_owned()).or_default();
                    }
                }
                if ws.send(Message::text(frame.to_string())).await.is_err() {
                    let _ = reply.send(Err(ClientError::Disconnected));
                    break;
                }
                pending.insert(next_ref, reply);
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                    if !deliver(v, positions, &mut pending, events).await {
                        break;
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    code = f.map(|f| u16::from(f.code));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    for (_, reply) in pending.drain() {
        let _ = reply.send(Err(ClientError::Disconnected));
    }
    let _ = events.send(Event::Disconnected { code }).await;
}

/// Handles one server frame; `false` when the application is gone.
async fn deliver(
    v: Value,
    positions: &mut Positions,
    pending: &mut HashMap<u64, oneshot::Sender<Result<Value, ClientError>>>,
    events: &mpsc::Sender<Event>,
) -> bool {
    let text = |k: &str| v[k].as_str().map(str::to_owned);
    let event = match v["type"].as_str() {
        Some("welcome") => Some(Event::Connected {
            channel_id: text("channel_id").unwrap_or_default(),
        }),
        Some("message") => {
            let (group, epoch) = (text("group").unwrap_or_default(), text("epoch").unwrap_or_default());
            let offset = v["offset"].as_u64();
            if offset.is_some_and(|o| !positions.take(&group, &epoch, o)) {
                None
            } else {
                Some(Event::Message {
                    group,
                    offset,
                    from: text("from"),
                    data: v["data"].clone(),
                })
            }
        }
        Some("direct") => Some(Event::Direct {
            from: text("from").unwrap_or_default(),
            data: v["data"].clone(),
        }),
        Some("member_joined" | "member_left") => Some(Event::Member(v.clone())),
        Some("recovered") => Some(Event::Recovered {
            group: text("group").unwrap_or_default(),
            complete: v["complete"].as_bool().unwrap_or(false),
        }),
        _ => None,
    };
    if let Some(r) = v["ref"].as_u64().and_then(|r| pending.remove(&r)) {
        let result = match v["type"].as_str() {
            Some("error") => Err(ClientError::Rejected {
                code: text("code").unwrap_or_default(),
                message: text("message").unwrap_or_default(),
            }),
            _ => Ok(v.clone()),
        };
        let _ = r.send(result);
    }
    match event {
        Some(e) => events.send(e).await.is_ok(),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_messages_are_delivered_once_per_epoch() {
        let mut p = Positions::default();
        assert_eq!(p.since_query("g"), "");
        assert!(p.take("g", "e1", 1));
        assert!(p.take("g", "e1", 2));
        assert!(!p.take("g", "e1", 2), "a repeat is dropped");
        assert!(!p.take("g", "e1", 1), "so is an older one");
        assert_eq!(p.since_query("g"), "?since=2&epoch=e1");
        assert_eq!(
            p.join_frame("g"),
            json!({"type": "join", "group": "g", "since": 2, "epoch": "e1"})
        );
        assert!(p.take("g", "e2", 1), "a new epoch starts over");
    }

    #[test]
    fn backoff_is_jittered_within_a_quarter() {
        let d = Duration::from_millis(1000);
        let j = jitter(d);
        assert!(
            j >= Duration::from_millis(750) && j <= Duration::from_millis(1250),
            "{j:?}"
        );
    }
}
