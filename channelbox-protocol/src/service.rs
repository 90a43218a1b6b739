//! [`ChatService`]: admission of WebSocket upgrades, the per-connection session
//! that maps protocol frames to `ChannelBox` operations, and shutdown. Written
//! once; every transport feeds it [`Incoming`] frames and a [`Channel`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use channelbox_core::{
    BoxError, Channel, ChannelBox, ChannelConfig, CloseReason, Frame, HistoryStore, Incoming, NewMessage,
    OverflowPolicy, PayloadKind, PublishReport, ReadQuery, Recovery, Replay, StreamPosition, SubscribeFraming,
};
use futures_util::stream::{FuturesUnordered, Stream, StreamExt};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::auth::{now_secs, User};
use crate::config::{ProtocolConfig, DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT};
use crate::frames::{reply, ChatEnvelope, ErrorCode, ProtocolError, Sender};
use crate::metrics::Metrics;
use crate::names::{decode_group, query_param, valid_group};

/// An HTTP answer: status and JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// The JSON body.
    pub body: String,
}

impl HttpAnswer {
    /// A 200 with this JSON body.
    pub fn ok(body: Value) -> Self {
        HttpAnswer {
            status: 200,
            body: body.to_string(),
        }
    }

    /// An error answer `{"code","message"}`.
    pub fn error(status: u16, code: &str, message: impl Into<String>) -> Self {
        HttpAnswer {
            status,
            body: json!({"code": code, "message": message.into()}).to_string(),
        }
    }
}

/// An admitted WebSocket upgrade, ready to be opened once the socket exists.
/// Holds one of the server's connection slots until dropped.
#[derive(Debug)]
pub struct Admission {
    group: String,
    replay: Replay,
    user: Option<User>,
    _slot: Slot,
}

impl Admission {
    /// The URL group.
    pub fn group(&self) -> &str {
        &self.group
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
}

/// The chat protocol over a `ChannelBox`; cheap to clone.
#[derive(Clone, Debug)]
pub struct ChatService {
    inner: Arc<Inner>,
}

type PublishDone = Pin<Box<dyn Future<Output = (Option<Value>, String, Result<PublishReport, BoxError>)> + Send>>;

struct Framing<'a> {
    group: &'a str,
    id: Uuid,
}

impl SubscribeFraming for Framing<'_> {
    fn before(&self, start: &StreamPosition) -> Option<Frame> {
        Some(reply(
            json!({"type": "welcome", "channel_id": self.id, "group": self.group, "epoch": start.epoch, "offset": start.offset}),
            None,
        ))
    }

    fn after_recovery(&self, r: &Recovery) -> Option<Frame> {
        Some(reply(
            json!({"type": "recovered", "group": self.group, "from": r.from, "to": r.to, "complete": r.complete}),
            None,
        ))
    }
}

/// A token bucket: `rate` frames per second, burst `rate`.
struct RateLimiter {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    fn new(rate: u32) -> Self {
        RateLimiter {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What a session knows about its connection.
struct Session {
    channel: Channel,
    url_group: String,
    user: Option<User>,
}

fn bad(message: impl Into<String>) -> ProtocolError {
    ProtocolError::new(ErrorCode::BadRequest, message)
}

/// A group field: absent means `default`; a non-string is `bad_request`; a
/// string that breaks the rules is `invalid_group`.
fn group_field(obj: &Map<String, Value>, default: Option<&str>) -> Result<String, ProtocolError> {
    match obj.get("group") {
        None => default
            .map(str::to_owned)
            .ok_or_else(|| bad("the field \"group\" is required")),
        Some(Value::String(g)) if valid_group(g) => Ok(g.clone()),
        Some(Value::String(g)) => Err(ProtocolError::new(
            ErrorCode::InvalidGroup,
            format!("{g:?} is not a valid group name: 1 to 128 bytes, no whitespace or control characters"),
        )),
        Some(_) => Err(bad("the field \"group\" must be a string")),
    }
}

/// A positive integer field no greater than `max`; absent means `default`.
fn limit_field(v: Option<&Value>) -> Result<usize, ProtocolError> {
    match v {
        None => Ok(DEFAULT_HISTORY_LIMIT),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Ok((n as usize).min(MAX_HISTORY_LIMIT)),
            _ => Err(bad("\"limit\" must be a positive integer")),
        },
    }
}

fn since_field(v: Option<&Value>) -> Result<Option<u64>, ProtocolError> {
    match v {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad("\"since\" must be a non-negative integer")),
    }
}

/// Parses a hyphenated UUID in any letter case.
fn parse_uuid(s: &str) -> Option<Uuid> {
    (s.len() == 36).then(|| Uuid::try_parse(s).ok()).flatten()
}

fn store_error(err: &BoxError) -> ProtocolError {
    tracing::error!(error = %err, "history store failed");
    ProtocolError {
        code: ErrorCode::BadRequest,
        message: format!("the server could not complete the request: {err}"),
    }
}

impl ChatService {
    /// A service over this store.
    pub fn new(store: Arc<dyn HistoryStore>, config: ProtocolConfig) -> Self {
        let channels = ChannelBox::with_envelope(store, Arc::new(ChatEnvelope));
        let metrics = Metrics::new(&channels);
        ChatService {
            inner: Arc::new(Inner {
                channels,
                config,
                metrics,
                open: AtomicUsize::new(0),
            }),
        }
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
            ..ChannelConfig::default()
        }
    }

    /// Checks an upgrade request before the upgrade: the URL group (400), the
    /// token (401), the query and the connection limit.
    pub fn admit(&self, raw_group: &str, query: Option<&str>) -> Result<Admission, HttpAnswer> {
        let group = decode_group(raw_group).ok_or_else(|| {
            HttpAnswer::error(400, "invalid_group", format!("{raw_group:?} is not a valid group name"))
        })?;
        let user = match &self.inner.config.tokens {
            None => None,
            Some(verifier) => {
                let token = query_param(query, "token")
                    .ok_or_else(|| HttpAnswer::error(401, "unauthorized", "a token is required"))?;
                let user = verifier
                    .verify(&token, now_secs())
                    .map_err(|e| HttpAnswer::error(401, "unauthorized", e.to_string()))?;
                if !user.permissions.allows(&group) {
                    return Err(HttpAnswer::error(
                        401,
                        "unauthorized",
                        format!("the token does not allow group {group:?}"),
                    ));
                }
                Some(user)
            }
        };
        let since = match query_param(query, "since") {
            None => None,
            Some(s) => Some(s.parse::<u64>().map_err(|_| {
                HttpAnswer::error(400, "bad_request", format!("since={s:?} is not a non-negative integer"))
            })?),
        };
        let history = match query_param(query, "history") {
            None => 0,
            Some(s) => s
                .parse::<i64>()
                .map_err(|_| HttpAnswer::error(400, "bad_request", format!("history={s:?} is not an integer")))?,
        };
        let replay = match since {
            Some(offset) => Replay::Since(StreamPosition::new(
                query_param(query, "epoch").unwrap_or_default().into(),
                offset,
            )),
            None if history > 0 => Replay::Last((history as usize).min(MAX_HISTORY_LIMIT)),
            None => Replay::None,
        };
        let max = self.inner.config.max_connections;
        if self.inner.open.fetch_add(1, Ordering::AcqRel) >= max {
            self.inner.open.fetch_sub(1, Ordering::AcqRel);
            return Err(HttpAnswer::error(
                503,
                "unavailable",
                format!("the server is at its limit of {max} connections"),
            ));
        }
        Ok(Admission {
            group,
            replay,
            user,
            _slot: Slot(self.inner.clone()),
        })
    }

    /// Runs one connection to its end: joins the URL group (welcome, replay,
    /// recovery), then answers the client's frames until either side closes.
    pub async fn run<S>(&self, admission: Admission, channel: Channel, incoming: S)
    where
        S: Stream<Item = Incoming> + Unpin + Send,
    {
        let metrics = &self.inner.metrics;
        metrics.connections.inc();
        let framing = Framing {
            group: &admission.group,
            id: channel.id(),
        };
        let joined = self
            .inner
            .channels
            .subscribe(&channel, &admission.group, admission.replay.clone(), &framing)
            .await;
        if let Err(err) = joined {
            tracing::warn!(error = %err, group = %admission.group, "could not join the URL group");
            channel.close(CloseReason::new(1011, "server error"));
        } else {
            let session = Session {
                channel: channel.clone(),
                url_group: admission.group.clone(),
                user: admission.user.clone(),
            };
            self.session(&session, incoming).await;
        }
        metrics.connections.dec();
        drop(admission);
    }

    async fn session<S>(&self, s: &Session, mut incoming: S)
    where
        S: Stream<Item = Incoming> + Unpin + Send,
    {
        let mut pending: FuturesUnordered<PublishDone> = FuturesUnordered::new();
        let mut limiter = RateLimiter::new(self.inner.config.rate_limit);
        let end = loop {
            tokio::select! {
                biased;
                Some((reference, group, result)) = pending.next(), if !pending.is_empty() => {
                    let frame = match result {
                        Ok(report) => reply(
                            json!({"type": "published", "group": group, "offset": report.offset}),
                            reference.as_ref(),
                        ),
                        Err(err) => store_error(&err).frame(reference.as_ref()),
                    };
                    self.send(s, frame);
                }
                _ = s.channel.closed() => break None,
                frame = incoming.next() => {
                    let Some(frame) = frame else { break Some(CloseReason::ABNORMAL) };
                    s.channel.touch();
                    match frame {
                        Incoming::Control => {}
                        Incoming::Close => break Some(CloseReason::NORMAL),
                        Incoming::Failed => break Some(CloseReason::ABNORMAL),
                        Incoming::TooLarge => {
                            let max = self.inner.config.max_message_bytes;
                            let err = ProtocolError::new(ErrorCode::TooLarge, format!("messages are limited to {max} bytes"));
                            self.send(s, err.frame(None));
                            break Some(CloseReason::new(1009, "message too big"));
                        }
                        Incoming::InvalidUtf8 => break Some(CloseReason::new(1007, "invalid utf-8")),
                        Incoming::Binary(_) | Incoming::Text(_) if !limiter.allow() => {
                            let err = ProtocolError::new(ErrorCode::RateLimited, "too many frames: this one was dropped");
                            self.send(s, err.frame(None));
                        }
                        Incoming::Binary(_) => {
                            self.send(s, bad("binary frames are not accepted; send JSON text").frame(None));
                        }
                        Incoming::Text(text) => {
                            if text.len() > self.inner.config.max_message_bytes {
                                let max = self.inner.config.max_message_bytes;
                                let err = ProtocolError::new(ErrorCode::TooLarge, format!("messages are limited to {max} bytes"));
                                self.send(s, err.frame(None));
                                break Some(CloseReason::new(1009, "message too big"));
                            }
                            // Boxed: the session waits in this loop for its
                            // whole life, and an inline `dispatch` (joins,
                            // history reads) would make every idle
                            // connection's task as large as its largest request.
                            if let Some(done) = Box::pin(self.dispatch(s, &text)).await {
                                pending.push(done);
                            }
                        }
                    }
                }
            }
        };
        if let Some(reason) = end {
            s.channel.close(reason);
        }
        // Publishes still waiting for the disk must be delivered to the group
        // even though their sender left.
        if !pending.is_empty() {
            tokio::spawn(async move { while pending.next().await.is_some() {} });
        }
    }

    /// Queues a frame for the session's client; a full queue makes it a slow
    /// consumer, which leaves its groups at once.
    fn send(&self, s: &Session, frame: Frame) {
        self.inner.channels.send_frame_to_channel(&s.channel, frame);
    }

    /// Handles one text frame; a publish returns the future of its completion.
    async fn dispatch(&self, s: &Session, text: &str) -> Option<PublishDone> {
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                let _ = s
                    .channel
                    .try_send(bad(format!("the frame is not valid JSON: {e}")).frame(None));
                return None;
            }
        };
        let Value::Object(obj) = value else {
            self.send(s, bad("the frame must be a JSON object").frame(None));
            return None;
        };
        let reference = match obj.get("ref") {
            None => None,
            Some(r @ (Value::String(_) | Value::Number(_))) => Some(r.clone()),
            Some(_) => {
                let _ = s
                    .channel
                    .try_send(bad("\"ref\" must be a string or a number").frame(None));
                return None;
            }
        };
        let result = match obj.get("type") {
            Some(Value::String(t)) => self.handle(s, t, &obj, &reference).await,
            Some(_) => Err(bad("\"type\" must be a string")),
            None => Err(bad("the field \"type\" is required")),
        };
        match result {
            Ok(Handled::Reply(frame)) => {
                self.send(s, frame);
                None
            }
            Ok(Handled::Publish(done)) => Some(done),
            Err(err) => {
                self.send(s, err.frame(reference.as_ref()));
                None
            }
        }
    }

    fn allowed(&self, s: &Session, group: &str) -> Result<(), ProtocolError> {
        match &s.user {
            Some(u) if !u.permissions.allows(group) => Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!("your token does not allow group {group:?}"),
            )),
            _ => Ok(()),
        }
    }

    async fn handle(
        &self,
        s: &Session,
        kind: &str,
        obj: &Map<String, Value>,
        reference: &Option<Value>,
    ) -> Result<Handled, ProtocolError> {
        let channels = &self.inner.channels;
        let id = s.channel.id();
        let r = reference.as_ref();
        match kind {
            "publish" => {
                let data = obj.get("data").ok_or_else(|| bad("the field \"data\" is required"))?;
                let group = group_field(obj, Some(&s.url_group))?;
                let save = match obj.get("history") {
                    None => true,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(bad("\"history\" must be a boolean")),
                };
                self.allowed(s, &group)?;
                if !channels.is_member(id, &group) {
                    return Err(ProtocolError::new(
                        ErrorCode::Forbidden,
                        format!("you are not a member of group {group:?}"),
                    ));
                }
                let sender = Sender {
                    from: Some(id),
                    user: s.user.as_ref().map(|u| u.id.clone()),
                };
                let message = NewMessage {
                    kind: PayloadKind::Json,
                    payload: Bytes::from(data.to_string()),
                    meta: sender.to_meta(),
                    timestamp_ms: channelbox_core::now_ms(),
                };
                // The offset is assigned here, in this connection's order; the
                // wait for the disk and the delivery run alongside later frames.
                let pending = channels
                    .start_publish(&group, message, save)
                    .map_err(|e| store_error(&e))?;
                let reference = reference.clone();
                let service = self.clone();
                Ok(Handled::Publish(Box::pin(async move {
                    let started = Instant::now();
                    let result = pending.finish().await;
                    if save {
                        service
                            .inner
                            .metrics
                            .publish_durable_seconds
                            .observe(started.elapsed().as_secs_f64());
                    }
                    (reference, group, result)
                })))
            }
            "join" => {
                let group = group_field(obj, None)?;
                self.allowed(s, &group)?;
                let max = self.inner.config.max_groups_per_connection;
                if !channels.is_member(id, &group) && channels.groups_of(id).map_or(0, |g| g.len()) >= max {
                    return Err(ProtocolError::new(
                        ErrorCode::Forbidden,
                        format!("a connection may be in at most {max} groups"),
                    ));
                }
                channels
                    .subscribe(&s.channel, &group, Replay::None, &channelbox_core::NoFraming)
                    .await
                    .map_err(|e| store_error(&e))?;
                Ok(Handled::Reply(reply(json!({"type": "joined", "group": group}), r)))
            }
            "leave" => {
                let group = group_field(obj, None)?;
                // Leaving a group one is not in succeeds all the same.
                let _ = channels.remove_id_from_group(id, &group);
                Ok(Handled::Reply(reply(json!({"type": "left", "group": group}), r)))
            }
            "history" => {
                let group = group_field(obj, Some(&s.url_group))?;
                let limit = limit_field(obj.get("limit"))?;
                let since = since_field(obj.get("since"))?;
                self.allowed(s, &group)?;
                let body = self
                    .history_body(&group, limit, since)
                    .await
                    .map_err(|e| store_error(&e))?;
                Ok(Handled::Reply(Frame::text(with_type_and_ref(body, "history", r))))
            }
            "direct" => {
                let to = match obj.get("to") {
                    Some(Value::String(t)) => {
                        parse_uuid(t).ok_or_else(|| bad(format!("{t:?} is not a hyphenated UUID")))?
                    }
                    Some(_) => return Err(bad("\"to\" must be a string")),
                    None => return Err(bad("the field \"to\" is required")),
                };
                let data = obj.get("data").ok_or_else(|| bad("the field \"data\" is required"))?;
                let mut frame = json!({"type": "direct", "from": id, "data": data});
                if let Some(u) = &s.user {
                    frame["user"] = json!(u.id);
                }
                channels
                    .send_frame_to(to, Frame::text(frame.to_string()))
                    .map_err(|_| ProtocolError::new(ErrorCode::NotFound, format!("no channel {to}")))?;
                Ok(Handled::Reply(reply(json!({"type": "sent", "to": to}), r)))
            }
            "groups" => {
                let groups: Map<String, Value> = channels
                    .groups()
                    .into_iter()
                    .filter(|(g, _)| s.user.as_ref().is_none_or(|u| u.permissions.allows(g)))
                    .map(|(g, n)| (g, json!(n)))
                    .collect();
                Ok(Handled::Reply(reply(json!({"type": "groups", "groups": groups}), r)))
            }
            "ping" => Ok(Handled::Reply(reply(json!({"type": "pong"}), r))),
            other => Err(bad(format!("unknown type {other:?}"))),
        }
    }

    /// `{"group","epoch","messages":[…]}` for a history request, as JSON text.
    async fn history_body(&self, group: &str, limit: usize, since: Option<u64>) -> Result<String, BoxError> {
        let query = match since {
            Some(offset) => ReadQuery::Since { offset, limit },
            None => ReadQuery::Last(limit),
        };
        let page = self.inner.channels.show_history(group, query).await?;
        let mut out = String::with_capacity(64 + page.messages.len() * 128);
        out.push_str(r#"{"group":"#);
        out.push_str(&Value::String(group.to_owned()).to_string());
        out.push_str(r#","epoch":"#);
        out.push_str(&Value::String(page.head.epoch.to_string()).to_string());
        out.push_str(r#","messages":["#);
        for (i, m) in page.messages.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let msg = channelbox_core::MessageRef {
                group,
                epoch: page.head.epoch.as_str(),
                offset: Some(m.offset),
                kind: m.kind,
                payload: &m.payload,
                meta: &m.meta,
                timestamp_ms: m.timestamp_ms,
            };
            out.push_str(&crate::frames::render_message(&msg, false));
        }
        out.push_str("]}");
        Ok(out)
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
}

enum Handled {
    Reply(Frame),
    Publish(PublishDone),
}

/// Prepends `"type"` to a JSON object text and appends `"ref"` when given.
fn with_type_and_ref(body: String, kind: &str, reference: Option<&Value>) -> String {
    let mut out = String::with_capacity(body.len() + 48);
    out.push_str(r#"{"type":"#);
    out.push_str(&Value::String(kind.to_owned()).to_string());
    out.push(',');
    out.push_str(&body[1..body.len() - 1]);
    if let Some(r) = reference {
        out.push_str(r#","ref":"#);
        out.push_str(&r.to_string());
    }
    out.push('}');
    out
}

mod api;
