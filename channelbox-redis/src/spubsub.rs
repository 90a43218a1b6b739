//! The subscription connection of a Redis Cluster master: sharded pub/sub
//! (`SSUBSCRIBE` for group channels) next to plain pub/sub (`SUBSCRIBE` for
//! the control channels), on one RESP2 connection read here — redis-rs's
//! pub/sub type has no `SSUBSCRIBE`.
//!
//! Every command sent on it answers with exactly one frame (a confirmation,
//! a `pong`, or an error such as `MOVED`), because each names one channel;
//! answers are matched to commands in order. A `sunsubscribe` that answers
//! no command is the node dropping the channel because its slot moved away:
//! the group is handed to the router (`moved`), which subscribes where the
//! slot is now and has the box check the group for what it missed.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use channelbox_core::BrokerEvent;

use crate::broker::{route, Command, Routes};
use crate::keys;
use crate::link::{redirected, unavailable, COMMAND_TIMEOUT};
use crate::sentinel::Target;

/// How often the connection is pinged.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Waits between reconnect attempts.
const RECONNECT_WAIT: Duration = Duration::from_millis(250);
/// Frames read ahead of the task.
const FRAMES: usize = 4096;
/// The longest frame accepted (a bulk string or an array's length).
const MAX_LEN: i64 = 512 * 1024 * 1024;

/// A RESP2 value, as far as pub/sub needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Frame>),
}

/// Parses one frame from the front of `buf`: `Ok(None)` when incomplete,
/// `Err` on bytes that are not RESP2.
pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, String> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[1..end]).map_err(|_| "a line that is not UTF-8".to_owned())?;
    let after = end + 2;
    let number = || line.parse::<i64>().map_err(|_| format!("not a number: {line:?}"));
    match buf.first() {
        Some(b'+') => Ok(Some((Frame::Simple(line.to_owned()), after))),
        Some(b'-') => Ok(Some((Frame::Error(line.to_owned()), after))),
        Some(b':') => Ok(Some((Frame::Int(number()?), after))),
        Some(b'$') => {
            let len = number()?;
            if len < 0 {
                return Ok(Some((Frame::Bulk(None), after)));
            }
            if len > MAX_LEN {
                return Err(format!("a bulk string of {len} bytes"));
            }
            let len = len as usize;
            if buf.len() < after + len + 2 {
                return Ok(None);
            }
            Ok(Some((
                Frame::Bulk(Some(buf[after..after + len].to_vec())),
                after + len + 2,
            )))
        }
        Some(b'*') => {
            let count = number()?;
            if !(-1..=MAX_LEN).contains(&count) {
                return Err(format!("an array of {count} items"));
            }
            let mut items = Vec::new();
            let mut at = after;
            for _ in 0..count.max(0) {
                match parse(&buf[at..])? {
                    Some((item, used)) => {
                        items.push(item);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Frame::Array(items), at)))
        }
        _ => Err("not a RESP2 frame".to_owned()),
    }
}

fn text(frame: &Frame) -> Option<&[u8]> {
    match frame {
        Frame::Bulk(Some(b)) => Some(b),
        Frame::Simple(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// What a command sent is waiting for.
enum Pending {
    /// A subscription; the caller waits when it is a group's.
    Subscribe(
        String,
        Option<tokio::sync::oneshot::Sender<Result<(), channelbox_core::StoreError>>>,
    ),
    Unsubscribe(String),
    /// A ping, with when it was sent.
    Ping(tokio::time::Instant),
}

/// A command of one channel, packed.
fn packed(name: &str, channel: &str) -> Vec<u8> {
    redis::cmd(name).arg(channel).get_packed_command()
}

/// Whether `channel` is a group's (sharded) or a control channel (plain).
fn is_group(channel: &str) -> bool {
    keys::group_of_channel(channel.as_bytes()).is_some()
}

/// The connection: the write half, and the frames the reader task parsed.
struct Connection {
    write: OwnedWriteHalf,
    frames: mpsc::Receiver<Result<Frame, String>>,
    pending: VecDeque<Pending>,
}

impl Connection {
    async fn open(target: &Target) -> Option<Connection> {
        let client = target.client().await.ok()?;
        let (host, port) = match &client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
            _ => return None,
        };
        let stream = tokio::time::timeout(COMMAND_TIMEOUT, TcpStream::connect((host.as_str(), port)))
            .await
            .ok()?
            .ok()?;
        let _ = stream.set_nodelay(true);
        let (mut read, write) = stream.into_split();
        let (tx, frames) = mpsc::channel(FRAMES);
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                loop {
                    match parse(&buf) {
                        Ok(Some((frame, used))) => {
                            buf.advance(used);
                            if tx.send(Ok(frame)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(err) => {
                            let _ = tx.send(Err(err)).await;
                            return;
                        }
                    }
                }
                match read.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        Some(Connection {
            write,
            frames,
            pending: VecDeque::new(),
        })
    }

    async fn send(&mut self, bytes: &[u8], pending: Pending) -> bool {
        let written = tokio::time::timeout(COMMAND_TIMEOUT, self.write.write_all(bytes)).await;
        self.pending.push_back(pending);
        matches!(written, Ok(Ok(())))
    }

    /// Pings, unless a ping is unanswered for twice the command timeout:
    /// then the connection is dead (a pong waits behind the messages before
    /// it, so one late round is not enough to say); `false` then, or when
    /// the ping cannot be written.
    async fn ping(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let late = self
            .pending
            .iter()
            .any(|p| matches!(p, Pending::Ping(sent) if now.duration_since(*sent) > COMMAND_TIMEOUT * 2));
        if late {
            return false;
        }
        self.send(&redis::cmd("PING").get_packed_command(), Pending::Ping(now))
            .await
    }

    async fn subscribe(
        &mut self,
        channel: &str,
        done: Option<tokio::sync::oneshot::Sender<Result<(), channelbox_core::StoreError>>>,
    ) -> bool {
        let name = if is_group(channel) { "SSUBSCRIBE" } else { "SUBSCRIBE" };
        self.send(&packed(name, channel), Pending::Subscribe(channel.to_owned(), done))
            .await
    }

    async fn unsubscribe(&mut self, channel: &str) -> bool {
        let name = if is_group(channel) {
            "SUNSUBSCRIBE"
        } else {
            "UNSUBSCRIBE"
        };
        self.send(&packed(name, channel), Pending::Unsubscribe(channel.to_owned()))
            .await
    }
}

/// Where a dropped group subscription is reported (its slot moved away).
pub(crate) type Moved = mpsc::Sender<String>;

/// The subscription task of a Cluster master (see the module docs).
pub(crate) async fn run(
    target: Arc<Target>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    routes: Routes,
    moved: Moved,
) {
    let mut wanted: HashSet<String> = [keys::node_channel(routes.node), keys::ALL_CHANNEL.to_owned()].into();
    loop {
        let generation = target.generation();
        let Some(mut conn) = Connection::open(&target).await else {
            if !wait_to_reconnect(&mut commands, &mut wanted).await {
                return;
            }
            continue;
        };
        if !subscribe_wanted(&routes, &moved, &mut conn, &mut wanted).await {
            tokio::time::sleep(RECONNECT_WAIT).await;
            continue;
        }
        routes.up.set(true);
        tracing::info!(channels = wanted.len(), "subscribed to the redis cluster master");
        if routes.events.send(BrokerEvent::Back).await.is_err() {
            return;
        }
        let watch = Watch {
            target: &target,
            generation,
        };
        if !serve(&routes, &moved, &mut conn, &mut wanted, &mut commands, watch).await {
            return;
        }
        // Callers waiting for a confirmation learn it did not come.
        for p in conn.pending.drain(..) {
            if let Pending::Subscribe(_, Some(tx)) = p {
                let _ = tx.send(Err(unavailable("subscribing failed")));
            }
        }
        routes.up.set(false);
        tracing::warn!("lost the redis cluster subscription connection");
        if routes.events.send(BrokerEvent::Lost).await.is_err() {
            return;
        }
    }
}

/// Waits [`RECONNECT_WAIT`] before the next connection attempt, refusing
/// subscriptions meanwhile and forgetting channels unsubscribed; `false`
/// once the broker is gone (no more commands).
async fn wait_to_reconnect(commands: &mut mpsc::UnboundedReceiver<Command>, wanted: &mut HashSet<String>) -> bool {
    let wait = tokio::time::sleep(RECONNECT_WAIT);
    tokio::pin!(wait);
    loop {
        tokio::select! {
            _ = &mut wait => return true,
            cmd = commands.recv() => match cmd {
                None => return false,
                Some(Command::Subscribe(_, tx)) => { let _ = tx.send(Err(unavailable("not connected"))); }
                Some(Command::Unsubscribe(ch)) => { wanted.remove(&ch); }
            },
        }
    }
}

/// Subscribes everything wanted on a new connection; `true` once every
/// subscription is confirmed (within twice the command timeout), before
/// `Back`.
async fn subscribe_wanted(routes: &Routes, moved: &Moved, conn: &mut Connection, wanted: &mut HashSet<String>) -> bool {
    let mut ok = true;
    for ch in wanted.clone() {
        ok = ok && conn.subscribe(&ch, None).await;
    }
    ok && tokio::time::timeout(COMMAND_TIMEOUT * 2, async {
        while !conn.pending.is_empty() {
            match conn.frames.recv().await {
                Some(Ok(frame)) => {
                    if !handle(routes, moved, conn, wanted, frame).await {
                        return false;
                    }
                }
                _ => return false,
            }
        }
        true
    })
    .await
    .unwrap_or(false)
}

/// What a connection was made to: the target, and its generation then.
struct Watch<'a> {
    target: &'a Target,
    generation: u64,
}

/// Serves a connected connection: the broker's commands, the frames read,
/// and a ping every [`PING_EVERY`]. Returns when the connection must be
/// dropped (`true`: it failed, or the engine moved to another master since
/// it was made) or the broker is gone (`false`).
async fn serve(
    routes: &Routes,
    moved: &Moved,
    conn: &mut Connection,
    wanted: &mut HashSet<String>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    watch: Watch<'_>,
) -> bool {
    let mut ping = tokio::time::interval(PING_EVERY);
    loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                None => return false,
                Some(Command::Subscribe(ch, tx)) => {
                    if wanted.contains(&ch) {
                        let _ = tx.send(Ok(()));
                        continue;
                    }
                    // Wanted from now on (an unsubscribe made before the
                    // confirmation comes then wins); a refusal removes it.
                    wanted.insert(ch.clone());
                    if !conn.subscribe(&ch, Some(tx)).await {
                        return true;
                    }
                }
                Some(Command::Unsubscribe(ch)) => {
                    wanted.remove(&ch);
                    if !conn.unsubscribe(&ch).await {
                        return true;
                    }
                }
            },
            frame = conn.frames.recv() => match frame {
                Some(Ok(frame)) => {
                    if !handle(routes, moved, conn, wanted, frame).await {
                        return true;
                    }
                }
                Some(Err(err)) => {
                    tracing::warn!(%err, "the redis cluster subscription connection sent garbage");
                    return true;
                }
                None => return true,
            },
            _ = ping.tick() => {
                if watch.target.generation() != watch.generation || !conn.ping().await {
                    return true;
                }
            }
        }
    }
}

/// Handles one frame; `false` when the connection must be dropped.
async fn handle(
    routes: &Routes,
    moved: &Moved,
    conn: &mut Connection,
    wanted: &mut HashSet<String>,
    frame: Frame,
) -> bool {
    let items = match frame {
        Frame::Array(items) => items,
        Frame::Error(err) => return refused(moved, conn, wanted, &err),
        _ => return true,
    };
    let kind = items.first().and_then(text).unwrap_or_default().to_ascii_lowercase();
    match kind.as_slice() {
        b"message" | b"smessage" => {
            let (Some(channel), Some(payload)) = (items.get(1).and_then(text), items.get(2).and_then(text)) else {
                return true;
            };
            let channel = String::from_utf8_lossy(channel).into_owned();
            route(routes, &channel, payload).await
        }
        b"pong" => {
            if let Some(i) = conn.pending.iter().position(|p| matches!(p, Pending::Ping(_))) {
                conn.pending.remove(i);
            }
            true
        }
        b"subscribe" | b"ssubscribe" => {
            let channel = items
                .get(1)
                .and_then(text)
                .map(|c| String::from_utf8_lossy(c).into_owned());
            if matches!(conn.pending.front(), Some(Pending::Subscribe(ch, _)) if Some(ch) == channel.as_ref()) {
                if let Some(Pending::Subscribe(_, Some(tx))) = conn.pending.pop_front() {
                    let _ = tx.send(Ok(()));
                }
            }
            true
        }
        b"unsubscribe" | b"sunsubscribe" => {
            let Some(channel) = items.get(1).and_then(text) else {
                return true;
            };
            let channel = String::from_utf8_lossy(channel).into_owned();
            if matches!(conn.pending.front(), Some(Pending::Unsubscribe(ch)) if *ch == channel) {
                conn.pending.pop_front();
                return true;
            }
            // Not asked for: the node dropped it (its slot moved away).
            if wanted.remove(&channel) && is_group(&channel) {
                return report_moved(moved, &channel);
            }
            true
        }
        _ => true,
    }
}

/// An error answer: the oldest command's; `false` when the connection must
/// be dropped.
fn refused(moved: &Moved, conn: &mut Connection, wanted: &mut HashSet<String>, err: &str) -> bool {
    match conn.pending.pop_front() {
        Some(Pending::Subscribe(ch, done)) => {
            let code = err.split(' ').next().unwrap_or_default();
            let refused = if crate::link::REDIRECT_CODES.contains(&code) {
                redirected(code, Some(err))
            } else {
                unavailable(format!("subscribing to {ch} failed: {err}"))
            };
            wanted.remove(&ch);
            match done {
                Some(tx) => {
                    let _ = tx.send(Err(refused));
                    true
                }
                // A resubscription refused: the slot is elsewhere now.
                None if is_group(&ch) => report_moved(moved, &ch),
                None => false,
            }
        }
        Some(Pending::Unsubscribe(_)) => true,
        Some(Pending::Ping(_)) | None => false,
    }
}

/// Hands a dropped group channel to the router; `false` (drop the
/// connection, so that everything is subscribed again and checked) when
/// the router's queue is full.
fn report_moved(moved: &Moved, channel: &str) -> bool {
    let Some(group) = keys::group_of_channel(channel.as_bytes()) else {
        return true;
    };
    tracing::info!(group, "a group's slot moved to another redis cluster master");
    moved.try_send(group.to_owned()).is_ok()
}

#[cfg(test)]
#[path = "spubsub_tests.rs"]
mod tests;
