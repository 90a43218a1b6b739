//! [`RedisBroker`]: the [`Broker`] on Redis pub/sub. One task owns the
//! subscription connection: it subscribes and unsubscribes in the order the
//! calls were made, turns what arrives into [`BrokerEvent`]s (and control
//! messages for the [`crate::RedisDirectory`]), pings the connection, and on
//! any failure reports `Lost`, reconnects with backoff, subscribes everything
//! again and reports `Back` — after which the box checks every group's head,
//! so nothing published meanwhile is missed.
//!
//! What travels on the channels is [`crate::wire`]'s: every payload sent
//! here is written by [`Wire::encode`] and every one received is read by
//! [`Wire::decode`] (the scripts write saved messages, resets and moves in
//! the same layout).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use channelbox_core::{
    now_ms, Broker, BrokerEvent, BrokerFuture, NewMessage, StoreError, StoreErrorKind, StreamPosition,
};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::directory::{control_of, Control};
use crate::floors::Floors;
use crate::keys;
use crate::link::{unavailable, Link, COMMAND_TIMEOUT};
use crate::sentinel::Target;
use crate::wire::Wire;

/// Events waiting for the box before the subscription task waits for it
/// (and Redis buffers for us, up to its own output limit).
const EVENT_QUEUE: usize = 65_536;
/// How often the subscription connection is pinged.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Waits between reconnect attempts.
const RECONNECT_WAIT: Duration = Duration::from_millis(250);

/// How long the subscription connection may be down before the cluster
/// counts as unreachable: a reconnect (after `CLIENT KILL`, say) takes less,
/// and what it missed is found by offset afterwards.
const RESUBSCRIBE_GRACE_MS: u64 = 1000;

/// Whether the subscription connection is up, and since when it is down.
#[derive(Debug)]
pub(crate) struct SubscriptionHealth {
    /// When it went down (ms since the Unix epoch); 0 while it is up.
    down_since: AtomicU64,
}

impl SubscriptionHealth {
    fn new() -> Self {
        SubscriptionHealth {
            down_since: AtomicU64::new(now_ms().max(1)),
        }
    }

    fn set(&self, up: bool) {
        let value = if up { 0 } else { now_ms().max(1) };
        self.down_since.store(value, Ordering::Release);
    }

    /// Up, or down for less than the resubscribe grace.
    pub(crate) fn healthy(&self) -> bool {
        let since = self.down_since.load(Ordering::Acquire);
        since == 0 || now_ms().saturating_sub(since) < RESUBSCRIBE_GRACE_MS
    }
}

enum Command {
    Subscribe(String, oneshot::Sender<Result<(), StoreError>>),
    Unsubscribe(String),
}

/// Carries group messages between the servers of a cluster over Redis pub/sub.
#[derive(Debug)]
pub struct RedisBroker {
    node: Uuid,
    link: Arc<Link>,
    commands: mpsc::UnboundedSender<Command>,
    events: Mutex<Option<mpsc::Receiver<BrokerEvent>>>,
    up: Arc<SubscriptionHealth>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Subscribe(c, _) => write!(f, "Subscribe({c})"),
            Command::Unsubscribe(c) => write!(f, "Unsubscribe({c})"),
        }
    }
}

/// Where the subscription task sends what it receives.
pub(crate) struct Routes {
    pub(crate) node: Uuid,
    pub(crate) events: mpsc::Sender<BrokerEvent>,
    pub(crate) control: mpsc::Sender<Control>,
    pub(crate) up: Arc<SubscriptionHealth>,
    /// Positions of saved messages, moves and resets raise the floors.
    pub(crate) floors: Arc<Floors>,
}

impl RedisBroker {
    /// Starts the subscription task; `control` receives what arrives on the
    /// control channels.
    pub(crate) fn start(
        target: Arc<Target>,
        link: Arc<Link>,
        node: Uuid,
        control: mpsc::Sender<Control>,
        floors: Arc<Floors>,
    ) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let up = Arc::new(SubscriptionHealth::new());
        let routes = Routes {
            node,
            events: events_tx,
            control,
            up: up.clone(),
            floors,
        };
        tokio::spawn(run(target, rx, routes));
        RedisBroker {
            node,
            link,
            commands,
            events: Mutex::new(Some(events_rx)),
            up,
        }
    }

    /// The subscription connection's health (shared with the store's).
    pub(crate) fn health(&self) -> Arc<SubscriptionHealth> {
        self.up.clone()
    }

    fn request(&self, command: Command) -> Result<(), StoreError> {
        self.commands
            .send(command)
            .map_err(|_| unavailable("the subscription task stopped"))
    }
}

impl Broker for RedisBroker {
    fn subscribe(&self, group: &str) -> BrokerFuture {
        let (tx, rx) = oneshot::channel();
        let placed = self.request(Command::Subscribe(keys::channel(group), tx));
        Box::pin(async move {
            placed?;
            rx.await.map_err(|_| unavailable("the subscription task stopped"))?
        })
    }

    fn unsubscribe(&self, group: &str) -> BrokerFuture {
        let placed = self.request(Command::Unsubscribe(keys::channel(group)));
        Box::pin(async move { placed })
    }

    fn publish_unsaved(&self, group: &str, message: &NewMessage, except: Option<Uuid>) -> BrokerFuture {
        let wire = Wire::Unsaved {
            node: self.node,
            except,
            message: message.clone(),
        };
        let body = wire
            .encode()
            .map_err(|e| StoreError::new(StoreErrorKind::InvalidInput, e.to_string()));
        let link = self.link.clone();
        let channel = keys::channel(group);
        Box::pin(async move {
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(channel).arg(body?);
            link.query::<i64>(&cmd).await.map(|_| ())
        })
    }

    fn take_events(&self) -> Option<mpsc::Receiver<BrokerEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn connected(&self) -> bool {
        self.up.healthy() && self.link.is_up()
    }
}

/// The subscription task: connected, it serves commands, messages and pings
/// until something fails; then it reports the loss and connects again.
async fn run(target: Arc<Target>, mut commands: mpsc::UnboundedReceiver<Command>, routes: Routes) {
    let mut wanted: HashSet<String> = [keys::node_channel(routes.node), keys::ALL_CHANNEL.to_owned()].into();
    loop {
        let generation = target.generation();
        let Some((mut sink, mut stream)) = connect(&target, &wanted).await else {
            // Down: subscriptions cannot be confirmed; unsubscriptions just
            // leave the wanted set.
            let wait = tokio::time::sleep(RECONNECT_WAIT);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    cmd = commands.recv() => match cmd {
                        None => return,
                        Some(Command::Subscribe(_, tx)) => { let _ = tx.send(Err(unavailable("not connected"))); }
                        Some(Command::Unsubscribe(ch)) => { wanted.remove(&ch); }
                    },
                }
            }
            continue;
        };
        routes.up.set(true);
        tracing::info!(channels = wanted.len(), "subscribed to redis");
        if routes.events.send(BrokerEvent::Back).await.is_err() {
            return;
        }
        let mut ping = tokio::time::interval(PING_EVERY);
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(Command::Subscribe(ch, tx)) => {
                        if wanted.contains(&ch) {
                            let _ = tx.send(Ok(()));
                            continue;
                        }
                        match tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(&ch)).await {
                            Ok(Ok(())) => {
                                wanted.insert(ch);
                                let _ = tx.send(Ok(()));
                            }
                            _ => {
                                let _ = tx.send(Err(unavailable("subscribing failed")));
                                break;
                            }
                        }
                    }
                    Some(Command::Unsubscribe(ch)) => {
                        wanted.remove(&ch);
                        if tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(&ch)).await.is_err() {
                            break;
                        }
                    }
                },
                msg = stream.next() => match msg {
                    None => break,
                    Some(msg) => {
                        if !route(&routes, msg.get_channel_name(), msg.get_payload_bytes()).await {
                            return;
                        }
                    }
                },
                _ = ping.tick() => {
                    let pong = tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<redis::Value>()).await;
                    // A new master (Sentinel) counts as a loss: subscribe there.
                    if !matches!(pong, Ok(Ok(_))) || target.generation() != generation {
                        break;
                    }
                }
            }
        }
        routes.up.set(false);
        tracing::warn!("lost the redis subscription connection");
        if routes.events.send(BrokerEvent::Lost).await.is_err() {
            return;
        }
    }
}

async fn connect(
    target: &Target,
    wanted: &HashSet<String>,
) -> Option<(redis::aio::PubSubSink, redis::aio::PubSubStream)> {
    let client = target.client().await.ok()?;
    let pubsub = tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub())
        .await
        .ok()?
        .ok()?;
    let (mut sink, stream) = pubsub.split();
    let channels: Vec<&String> = wanted.iter().collect();
    tokio::time::timeout(COMMAND_TIMEOUT * 2, sink.subscribe(channels))
        .await
        .ok()?
        .ok()?;
    Some((sink, stream))
}

/// The broker event a group channel's payload stands for; `None` for a
/// member event (the directory's) and this server's own unsaved messages.
fn event_of(node: Uuid, group: &str, wire: Wire) -> Option<BrokerEvent> {
    let group = group.to_owned();
    Some(match wire {
        Wire::Saved {
            position,
            except,
            message,
        } => BrokerEvent::Saved {
            group,
            position,
            message,
            except,
        },
        Wire::Reset { epoch } => BrokerEvent::Reset {
            group,
            position: StreamPosition::new(epoch, 0),
        },
        Wire::Moved { position } => BrokerEvent::Moved { group, position },
        Wire::Unsaved {
            node: from,
            except,
            message,
        } if from != node => BrokerEvent::Unsaved { group, message, except },
        Wire::Unsaved { .. } | Wire::Member { .. } | Wire::Direct { .. } | Wire::CloseAll { .. } => return None,
    })
}

/// Turns one pub/sub message into an event; `false` once nobody listens.
async fn route(routes: &Routes, channel: &str, payload: &[u8]) -> bool {
    let wire = match Wire::decode(payload) {
        Ok(wire) => wire,
        Err(err) => {
            tracing::warn!(%err, channel, "pub/sub payload ignored");
            return true;
        }
    };
    let group = keys::group_of_channel(channel.as_bytes());
    if let Some(control) = control_of(routes.node, group, &wire) {
        send_control(routes, control);
        return true;
    }
    let Some(group) = group else {
        return true;
    };
    let Some(event) = event_of(routes.node, group, wire) else {
        return true;
    };
    if let BrokerEvent::Saved { position, .. }
    | BrokerEvent::Reset { position, .. }
    | BrokerEvent::Moved { position, .. } = &event
    {
        routes.floors.note(group, position);
    }
    routes.events.send(event).await.is_ok()
}

/// Control messages never hold up group messages: past the queue's bound
/// they are dropped (and logged), as pub/sub drops them for a slow reader.
fn send_control(routes: &Routes, control: Control) {
    if routes.control.try_send(control).is_err() {
        tracing::warn!("control message dropped: the service does not keep up");
    }
}
