//! [`ChatService`]: the chat protocol over a `ChannelBox`, written once for
//! every transport.
//!
//! - this file: the service, admission of WebSocket upgrades, and shutdown;
//! - `session`: one connection's life — joining its URL group, then reading
//!   its frames (rate limit, size, parsing) until either side closes;
//! - `handlers`: one function per client request;
//! - `api`: the HTTP API as transport-agnostic handlers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use channelbox_core::{
    Broker, ChannelBox, ChannelConfig, CloseReason, HistoryStore, OverflowPolicy, Replay, StreamPosition,
};
use serde_json::Value;

use crate::auth::{now_secs, User};
use crate::config::ProtocolConfig;
use crate::fields::{query_param, GroupName, ReplayCount, Since};
use crate::frames::{ChatEnvelope, ProtocolError};
use crate::metrics::Metrics;

mod answer;
mod api;
mod cluster;
mod events;

pub use answer::HttpAnswer;
pub use api::PublishTicket;
pub use cluster::{Change, ClusterEvent, Directory, Member};
pub use events::{EventStream, EventsEnd, EVENT_STREAM_HEADERS};
mod handlers;
mod heartbeat;
mod hooks;
mod namespaces;
mod pacing;
pub use hooks::UpgradeRequest;
mod peers;
mod session;
#[cfg(test)]
mod tests;

/// An admitted WebSocket upgrade, ready to be opened once the socket exists.
/// Holds one of the server's connection slots until dropped.
///
/// One pointer wide: it is passed down through several futures, and each
/// keeps its arguments for its whole life, so every connection would carry
/// each copy of a larger one.
#[derive(Debug)]
pub struct Admission(Box<Admitted>);

#[derive(Debug)]
struct Admitted {
    group: GroupName,
    replay: Replay,
    user: Option<User>,
    peer: Option<SocketAddr>,
    /// `?events=1`: member events of the URL group.
    events: bool,
    /// The connection's channel id, known before the upgrade so that the
    /// connect hook can name it; transports open the channel with it.
    id: uuid::Uuid,
    /// Groups the connect hook joins before `welcome`.
    hook_groups: Vec<GroupName>,
    /// The connect hook's `data`, sent in `welcome` as `hook_data`.
    hook_data: Option<Value>,
    _slot: Slot,
}

impl Admitted {
    /// What a joined session keeps: the URL group, the user, the slot. The
    /// rest (and the box) goes when this returns, not when the connection ends.
    fn into_session_parts(self: Box<Self>) -> (GroupName, Option<User>, Slot) {
        let Admitted { group, user, _slot, .. } = *self;
        (group, user, _slot)
    }
}

impl Admission {
    /// The URL group.
    pub fn group(&self) -> &str {
        self.0.group.as_str()
    }

    /// The id the connection's channel must be opened with
    /// (`Channel::open_with_id`): the id the connect hook was told.
    pub fn channel_id(&self) -> uuid::Uuid {
        self.0.id
    }

    /// Records the peer's address, so that the connection's log lines name it.
    pub fn with_peer(mut self, peer: SocketAddr) -> Self {
        self.0.peer = Some(peer);
        self
    }
}

#[derive(Debug)]
struct Slot(Arc<Inner>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
struct Inner {
    channels: ChannelBox,
    config: ProtocolConfig,
    metrics: Metrics,
    /// Admitted connections, open or opening.
    open: AtomicUsize,
    /// Whether the heartbeat task was started.
    heartbeats: AtomicBool,
    /// The connections this service runs now, with their users: what
    /// heartbeats watch (channels an application registered in the box
    /// itself are not the service's to close), `presence` lists, and member
    /// events reach.
    peers: peers::Peers,
    /// The cluster's records and control messages, in a cluster.
    directory: std::sync::OnceLock<Arc<dyn Directory>>,
    /// The backend hooks, when the server has any.
    hooks: std::sync::OnceLock<crate::hooks::Hooks>,
    /// The configured namespaces, when the server has any.
    namespaces: std::sync::OnceLock<crate::namespaces::Namespaces>,
}

/// The chat protocol over a `ChannelBox`; cheap to clone.
#[derive(Clone, Debug)]
pub struct ChatService {
    inner: Arc<Inner>,
}

impl ChatService {
    /// A service over this store.
    pub fn new(store: Arc<dyn HistoryStore>, config: ProtocolConfig) -> Self {
        let channels = ChannelBox::with_envelope(store, Arc::new(ChatEnvelope));
        let metrics = Metrics::new(&channels);
        let service = ChatService {
            inner: Arc::new(Inner {
                channels,
                config,
                metrics,
                open: AtomicUsize::new(0),
                heartbeats: AtomicBool::new(false),
                peers: peers::Peers::default(),
                directory: std::sync::OnceLock::new(),
                hooks: std::sync::OnceLock::new(),
                namespaces: std::sync::OnceLock::new(),
            }),
        };
        let events = peers::Events(Arc::downgrade(&service.inner));
        service.inner.channels.observe(Arc::new(events));
        service
    }

    /// A service on one server of a cluster: the box gets the engine's
    /// broker (group messages from every server), and `directory` shares
    /// connections, member counts, presence, member events and admin
    /// close-all with the other servers. Must be called within a tokio
    /// runtime.
    pub fn clustered(
        store: Arc<dyn HistoryStore>,
        config: ProtocolConfig,
        broker: Arc<dyn Broker>,
        directory: Arc<dyn Directory>,
    ) -> Result<Self, channelbox_core::BoxError> {
        let service = ChatService::new(store, config);
        service.inner.channels.attach_broker(broker)?;
        cluster::follow(&service.inner, &directory);
        let _ = service.inner.directory.set(directory);
        Ok(service)
    }

    /// Whether the shared engine of a cluster cannot serve `group` now
    /// (never on a single server): it is unreachable, or — sharded, or a
    /// Redis Cluster — the part that keeps `group` is.
    fn cluster_down_for(&self, group: &str) -> bool {
        self.inner.directory.get().is_some()
            && (self.inner.channels.broker().is_some_and(|b| !b.connected())
                || !self.inner.channels.store().healthy_for(group))
    }

    /// The box behind the service.
    pub fn channels(&self) -> &ChannelBox {
        &self.inner.channels
    }

    /// The service's configuration.
    pub fn config(&self) -> &ProtocolConfig {
        &self.inner.config
    }

    /// How a transport must set up each connection's channel.
    pub fn channel_config(&self) -> ChannelConfig {
        let c = &self.inner.config;
        ChannelConfig {
            max_queue_frames: c.queue_frames,
            max_queue_bytes: c.queue_bytes,
            overflow: OverflowPolicy::Disconnect,
            expiry: c.expiry,
            write_delay: c.write_delay,
            ..ChannelConfig::default()
        }
    }

    /// Checks an upgrade request that carries no `Origin` header (not from a
    /// browser); see [`ChatService::admit_from`].
    pub fn admit(&self, raw_group: &str, query: Option<&str>) -> Result<Admission, HttpAnswer> {
        self.admit_from(raw_group, query, None)
    }

    /// Checks an upgrade request before the upgrade, in docs/protocol.md's order:
    /// the URL group (400), the `Origin` header (403), the token (401), the
    /// query (400) and the connection limit (503).
    pub fn admit_from(
        &self,
        raw_group: &str,
        query: Option<&str>,
        origin: Option<&str>,
    ) -> Result<Admission, HttpAnswer> {
        self.admit_with(raw_group, query, origin, None)
    }

    /// Checks a request for a stream of server-sent events (`GET
    /// /sse/{group}`) as [`ChatService::admit_from`] checks an upgrade; a
    /// `Last-Event-ID` header (`<epoch>:<offset>`, what an `EventSource`
    /// sends when it reconnects) recovers from there, over the query's
    /// `since`/`epoch`. A malformed one is refused with 400, as a bad query.
    pub fn admit_events(
        &self,
        raw_group: &str,
        query: Option<&str>,
        origin: Option<&str>,
        last_event_id: Option<&str>,
    ) -> Result<Admission, HttpAnswer> {
        self.admit_with(raw_group, query, origin, Some(last_event_id))
    }

    /// The checks of an upgrade or an event stream (`resume`: `Some` for an
    /// event stream, with its `Last-Event-ID`), in docs/protocol.md's order.
    fn admit_with(
        &self,
        raw_group: &str,
        query: Option<&str>,
        origin: Option<&str>,
        resume: Option<Option<&str>>,
    ) -> Result<Admission, HttpAnswer> {
        let group = GroupName::from_path_segment(raw_group).map_err(|e| HttpAnswer::refusal(400, &e))?;
        self.check_origin(origin)?;
        let user = self.upgrade_user(&group, query)?;
        let mut replay = replay_of(query).map_err(|e| HttpAnswer::refusal(400, &e))?;
        if let Some(Some(id)) = resume {
            replay = events::resume_from(id).map_err(|e| HttpAnswer::refusal(400, &e))?;
        }
        let events = query_param(query, "events").is_some_and(|v| v == "1" || v == "true");
        if events && !self.namespace(group.as_str()).events {
            return Err(HttpAnswer::refusal(
                403,
                &Self::namespace_forbids(group.as_str(), "events"),
            ));
        }
        if self.cluster_down_for(group.as_str()) {
            return Err(HttpAnswer::error(
                503,
                "unavailable",
                "the cluster's engine is unreachable",
            ));
        }
        let max = self.inner.config.max_connections;
        if self.inner.open.fetch_add(1, Ordering::AcqRel) >= max {
            self.inner.open.fetch_sub(1, Ordering::AcqRel);
            return Err(HttpAnswer::error(
                503,
                "unavailable",
                format!("the server is at its limit of {max} connections"),
            ));
        }
        Ok(Admission(Box::new(Admitted {
            group,
            replay,
            user,
            peer: None,
            events,
            id: uuid::Uuid::new_v4(),
            hook_groups: Vec::new(),
            hook_data: None,
            _slot: Slot(self.inner.clone()),
        })))
    }

    /// `forbidden` (403) for a browser page whose origin is not allowed: a
    /// page the user happens to visit must not join their local groups.
    fn check_origin(&self, origin: Option<&str>) -> Result<(), HttpAnswer> {
        let allowed = &self.inner.config.allowed_origins;
        match origin {
            Some(o) if !allowed.is_empty() && !allowed.iter().any(|a| a == o) => Err(HttpAnswer::error(
                403,
                "forbidden",
                "this origin may not open connections",
            )),
            _ => Ok(()),
        }
    }

    /// The user of an upgrade's `?token=`, when tokens are required.
    fn upgrade_user(&self, group: &GroupName, query: Option<&str>) -> Result<Option<User>, HttpAnswer> {
        let Some(verifier) = &self.inner.config.tokens else {
            return Ok(None);
        };
        let token =
            query_param(query, "token").ok_or_else(|| HttpAnswer::error(401, "unauthorized", "a token is required"))?;
        let user = verifier
            .verify(&token, now_secs())
            .map_err(|e| HttpAnswer::error(401, "unauthorized", e.to_string()))?;
        if !user.permissions.allows(group.as_str()) {
            return Err(HttpAnswer::error(
                401,
                "unauthorized",
                format!("the token does not allow group {group:?}"),
            ));
        }
        Ok(Some(user))
    }

    /// Closes every connection with 1001, waits (at most `grace`) for them to
    /// close, then makes the store durable.
    pub async fn shutdown(&self, grace: Duration) {
        let channels = &self.inner.channels;
        channels.close_all(CloseReason::GOING_AWAY);
        let deadline = Instant::now() + grace;
        while channels.stats().channels > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Err(err) = channels.store().sync().await {
            tracing::error!(error = %err, "flushing the history store at shutdown failed");
        }
    }

    /// The Prometheus text exposition.
    pub async fn metrics_text(&self) -> String {
        self.inner.metrics.render(&self.inner.channels).await
    }

    /// The counter of socket writes (`channelbox_socket_writes_total`), for
    /// the transport to count each write that took bytes.
    pub fn socket_writes(&self) -> crate::metrics::WriteCounter {
        crate::metrics::WriteCounter(self.inner.metrics.socket_writes.clone())
    }
}

/// What a subscription replays, from `since`/`epoch`/`history`: recovery with
/// `since` (`history` is then ignored), the newest n with `history`, else
/// nothing. Shared by the upgrade URL and `join`.
fn replay_from(since: Option<Since>, epoch: Option<String>, history: Option<ReplayCount>) -> Replay {
    match (since, history) {
        (Some(Since(offset)), _) => Replay::Since(StreamPosition::new(epoch.unwrap_or_default().into(), offset)),
        (None, Some(n)) if n.get() > 0 => Replay::Last(n.get()),
        _ => Replay::None,
    }
}

/// The replay an upgrade URL's query asks for.
fn replay_of(query: Option<&str>) -> Result<Replay, ProtocolError> {
    let since = query_param(query, "since").map(|s| Since::parse(&s)).transpose()?;
    let history = query_param(query, "history")
        .map(|s| ReplayCount::parse(&s))
        .transpose()?;
    Ok(replay_from(since, query_param(query, "epoch"), history))
}
