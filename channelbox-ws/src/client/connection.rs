//! The connection task: connect (with a deadline covering TCP, the
//! handshake and `welcome`), rejoin and recover, serve requests and frames
//! with a liveness check, and on any end back off and connect again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::Message;

use super::state::{Connection, Groups, Kind, Replay};
use super::{ClientConfig, Event, Request};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How a connection (or an attempt at one) ended.
struct Ended {
    code: Option<u16>,
    reason: String,
    /// How long it was up after `welcome` (zero for a failed attempt).
    up: Duration,
    /// The application dropped the client.
    gone: bool,
}

impl Ended {
    fn failed(reason: impl Into<String>) -> Self {
        Ended {
            code: None,
            reason: reason.into(),
            up: Duration::ZERO,
            gone: false,
        }
    }
}

/// The connection task: connect, serve, and on any end back off and again.
pub(super) async fn run(
    config: ClientConfig,
    mut requests: mpsc::Receiver<Request>,
    events: mpsc::Sender<Event>,
    refs: Arc<AtomicU64>,
) {
    let mut groups = Groups::new(&config.group);
    let mut backoff = config.min_backoff;
    loop {
        let ended = match connect_once(&config, &groups).await {
            Ok((ws, welcome)) => {
                let mut link = Link {
                    config: &config,
                    ws,
                    groups: &mut groups,
                    events: &events,
                    refs: &refs,
                    conn: Connection::default(),
                };
                link.serve(welcome, &mut requests).await
            }
            Err(ended) => ended,
        };
        if ended.gone || events.is_closed() {
            return;
        }
        let (code, reason) = (ended.code, ended.reason);
        if events.send(Event::Disconnected { code, reason }).await.is_err() {
            return;
        }
        // The backoff starts over only after a connection that stayed up: one
        // the server ends at once (4002, 4003, a refused rejoin) waits longer
        // each time.
        if ended.up >= config.stable_after {
            backoff = config.min_backoff;
        }
        tokio::time::sleep(jitter(backoff)).await;
        backoff = (backoff * 2).min(config.max_backoff);
    }
}

/// Opens a connection and waits for its `welcome`, all within
/// `connect_timeout`.
async fn connect_once(config: &ClientConfig, groups: &Groups) -> Result<(Ws, Value), Ended> {
    let mut url = format!("{}/ws/{}{}", config.server, groups.url(), groups.url_query());
    if let Some(token) = &config.token {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("token={token}"));
    }
    let deadline = Instant::now() + config.connect_timeout;
    let (mut ws, _) = timeout_at(deadline, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| Ended::failed("connect timeout"))?
        .map_err(|e| Ended::failed(e.to_string()))?;
    loop {
        match timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(Ended::failed("connect timeout")),
            Ok(Some(Ok(Message::Text(text)))) => {
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if v["type"] == "welcome" {
                    return Ok((ws, v));
                }
            }
            Ok(Some(Ok(Message::Close(f)))) => {
                let mut ended = Ended::failed(f.as_ref().map_or(String::new(), |f| f.reason.to_string()));
                ended.code = f.map(|f| u16::from(f.code));
                return Err(ended);
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(Ended::failed(e.to_string())),
            Ok(None) => return Err(Ended::failed("closed before welcome")),
        }
    }
}

/// Up to a quarter more or less than `d`, so that clients a restart
/// disconnected together do not reconnect together.
pub(super) fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    let spread = f64::from(nanos % 1000) / 1000.0 - 0.5; // -0.5 .. 0.5
    d.mul_f64(1.0 + spread / 2.0)
}

/// One open connection and what the task keeps across connections.
struct Link<'a> {
    config: &'a ClientConfig,
    ws: Ws,
    groups: &'a mut Groups,
    events: &'a mpsc::Sender<Event>,
    refs: &'a AtomicU64,
    conn: Connection,
}

/// What woke the serving loop.
enum Wake {
    Request(Option<Request>),
    Frame(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Timer,
}

impl Link<'_> {
    /// Serves one connection until it ends.
    async fn serve(&mut self, welcome: Value, requests: &mut mpsc::Receiver<Request>) -> Ended {
        let welcomed = Instant::now();
        let mut ended = match self.start(&welcome).await {
            Ok(()) => self.serve_loop(requests).await,
            Err(ended) => ended,
        };
        ended.up = welcomed.elapsed();
        let mut out = Vec::new();
        std::mem::take(&mut self.conn).ended(&mut out);
        if !ended.gone {
            ended.gone = !self.emit(out).await;
        }
        ended
    }

    /// The `welcome`, then a leave of the URL group if the application left
    /// it (the URL joined it again), then a rejoin (with a ref, recovering)
    /// of every other group.
    async fn start(&mut self, welcome: &Value) -> Result<(), Ended> {
        self.handle(welcome).await?;
        if self.groups.url_left() {
            let reference = self.refs.fetch_add(1, Ordering::Relaxed);
            let frame = json!({"type": "leave", "group": self.groups.url(), "ref": reference});
            self.conn.expect(reference, Kind::Other, None);
            self.send(Message::text(frame.to_string())).await?;
        }
        for group in self.groups.others() {
            let reference = self.refs.fetch_add(1, Ordering::Relaxed);
            let frame = self.groups.join_frame(&group, reference);
            let replay = if frame.get("since").is_some() {
                Replay::Since
            } else {
                Replay::Nothing
            };
            let kind = Kind::Join {
                group,
                replay,
                rejoin: true,
                left: false,
            };
            self.conn.expect(reference, kind, None);
            self.send(Message::text(frame.to_string())).await?;
        }
        Ok(())
    }

    async fn serve_loop(&mut self, requests: &mut mpsc::Receiver<Request>) -> Ended {
        let (every, patience) = (self.config.ping_interval, self.config.pong_timeout);
        let mut heard = Instant::now();
        let mut pinged: Option<Instant> = None;
        loop {
            // Silent for `every`: ping; no frame within `patience` of it: dead.
            let wake_at = pinged.map_or(heard + every, |p| p + patience);
            // Not biased: a flood of frames must not starve the requests,
            // nor a flood of requests the frames.
            let wake = tokio::select! {
                frame = self.ws.next() => Wake::Frame(frame),
                request = requests.recv() => Wake::Request(request),
                () = sleep_until(wake_at), if !every.is_zero() => Wake::Timer,
            };
            let result = match wake {
                Wake::Frame(frame) => {
                    (heard, pinged) = (Instant::now(), None);
                    self.on_message(frame).await
                }
                Wake::Request(Some(request)) => self.submit(request).await,
                Wake::Request(None) => Err(Ended {
                    gone: true,
                    ..Ended::failed("client dropped")
                }),
                Wake::Timer if pinged.is_some() => Err(Ended::failed("no pong")),
                Wake::Timer => {
                    pinged = Some(Instant::now());
                    self.send(Message::Ping(Vec::new().into())).await
                }
            };
            if let Err(ended) = result {
                return ended;
            }
        }
    }

    async fn on_message(
        &mut self,
        frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<(), Ended> {
        match frame {
            Some(Ok(Message::Text(text))) => match serde_json::from_str::<Value>(&text) {
                Ok(v) => self.handle(&v).await,
                Err(_) => Ok(()),
            },
            Some(Ok(Message::Close(f))) => {
                let mut ended = Ended::failed(f.as_ref().map_or(String::new(), |f| f.reason.to_string()));
                ended.code = f.map(|f| u16::from(f.code));
                Err(ended)
            }
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(Ended::failed(e.to_string())),
            None => Err(Ended::failed("connection closed")),
        }
    }

    /// One server frame: its events, and the end it calls for.
    async fn handle(&mut self, v: &Value) -> Result<(), Ended> {
        let mut out = Vec::new();
        let end = self.conn.on_frame(self.groups, v, &mut out);
        if !self.emit(out).await {
            return Err(Ended {
                gone: true,
                ..Ended::failed("client dropped")
            });
        }
        match end {
            Some(reason) => Err(Ended::failed(reason)),
            None => Ok(()),
        }
    }

    /// Sends an application's request, recording what its reply will mean.
    async fn submit(&mut self, request: Request) -> Result<(), Ended> {
        let Request {
            frame,
            reference,
            reply,
        } = request;
        self.conn.request(self.groups, &frame, reference, reply);
        self.send(Message::text(frame.to_string())).await
    }

    /// Sends a frame; one that the socket does not take within
    /// `pong_timeout` means the connection is dead.
    async fn send(&mut self, message: Message) -> Result<(), Ended> {
        let patience = self.config.pong_timeout.max(Duration::from_secs(1));
        match timeout(patience, self.ws.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Ended::failed(e.to_string())),
            Err(_) => Err(Ended::failed("send timeout")),
        }
    }

    /// Hands events to the application; `false` once it is gone.
    async fn emit(&self, out: Vec<Event>) -> bool {
        for event in out {
            if self.events.send(event).await.is_err() {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
