//! One connection's life: join the URL group (welcome, replay, `recovered`),
//! then read the client's frames — rate limit, size, parsing — and hand each
//! request to its handler, until either side closes.
//!
//! At `debug`, a connection's log lines carry its `connection` span (channel
//! id, URL group, peer) and a request's its `request` span (type, ref); at
//! `info` warnings and errors name the channel themselves.

use std::future::Future;
use std::pin::Pin;

use channelbox_core::SubscribeFraming;
use channelbox_core::{
    BoxError, Channel, CloseReason, Frame, Incoming, PublishReport, Recovery, Replay, StoreErrorKind, StreamPosition,
};
use futures_util::stream::{FuturesUnordered, Stream, StreamExt};
use serde_json::{json, Value};
use tracing::Instrument;
use uuid::Uuid;

use super::pacing::{MembershipPacer, RateLimiter};
use super::{Admission, ChatService, Slot};
use crate::auth::User;
use crate::fields::GroupName;
use crate::frames::{reply, ErrorCode, ProtocolError};
use crate::request::{self, Ref};

/// A publish waiting for durability and delivery: its `ref`, group and result.
pub(super) type PublishDone = Pin<Box<dyn Future<Output = (Ref, String, Result<PublishReport, BoxError>)> + Send>>;

/// What a session knows about its connection.
pub(super) struct Session {
    pub(super) channel: Channel,
    pub(super) url_group: GroupName,
    pub(super) user: Option<User>,
    /// Paces the connection's joins and leaves.
    pub(super) membership: MembershipPacer,
    /// The connection's place among those open, given back when it ends.
    pub(super) _slot: Slot,
}

/// The frames around a subscription: `welcome` (URL group) or `joined`
/// (`join`) before the replay, `recovered` after it. Both name the group's
/// position where live delivery starts, so that a client can later recover a
/// group in which it has received nothing yet.
pub(super) struct Framing<'a> {
    pub(super) group: &'a str,
    /// `None` for the URL group's `welcome`; a `join`'s `ref` otherwise.
    pub(super) join: Option<Option<&'a Value>>,
    pub(super) id: Uuid,
    /// The connect hook's `data`, for `welcome`.
    pub(super) hook_data: Option<&'a Value>,
    /// The group's namespace saves nothing: a recovery is never complete.
    pub(super) unsaved: bool,
}

impl SubscribeFraming for Framing<'_> {
    fn before(&self, start: &StreamPosition) -> Option<Frame> {
        Some(match self.join {
            None => {
                let mut welcome = json!({"type": "welcome", "channel_id": self.id, "group": self.group, "epoch": start.epoch, "offset": start.offset});
                if let Some(data) = self.hook_data {
                    welcome["hook_data"] = data.clone();
                }
                reply(welcome, None)
            }
            Some(reference) => reply(
                json!({"type": "joined", "group": self.group, "epoch": start.epoch, "offset": start.offset}),
                reference,
            ),
        })
    }

    fn after_recovery(&self, r: &Recovery) -> Option<Frame> {
        let reference = self.join.flatten();
        Some(reply(
            json!({"type": "recovered", "group": self.group, "from": r.from, "to": r.to, "complete": r.complete && !self.unsaved}),
            reference,
        ))
    }
}

/// A connection the service runs, until dropped — also when its future is
/// dropped mid-way: then it leaves its groups (reported while its user is
/// still known) and the service forgets it.
struct Running<'a>(&'a ChatService, Uuid);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.inner.channels.forget(self.1);
        self.0.inner.peers.remove(self.1);
        if let Some(directory) = self.0.inner.directory.get() {
            directory.disconnected(self.1);
        }
    }
}

/// What reading one frame led to.
enum Read {
    /// Keep reading.
    Continue,
    /// A publish to await alongside later frames.
    Publish(PublishDone),
    /// Close with this reason.
    End(CloseReason),
}

impl ChatService {
    /// Runs one connection to its end: joins the URL group (welcome, replay,
    /// recovery), then answers the client's frames until either side closes.
    pub async fn run<S>(&self, admission: Admission, channel: Channel, incoming: S)
    where
        S: Stream<Item = Incoming> + Unpin + Send,
    {
        // At debug: at info the fmt layer would keep its fields formatted for
        // the connection's life (480 of an idle connection's 5.3 KB).
        let span = tracing::debug_span!(
            "connection",
            channel = %channel.id(),
            group = %admission.0.group,
            peer = admission.0.peer.map(tracing::field::display),
        );
        self.run_connection(admission, channel, incoming).instrument(span).await;
    }

    async fn run_connection<S>(&self, admission: Admission, channel: Channel, mut incoming: S)
    where
        S: Stream<Item = Incoming> + Unpin + Send,
    {
        // Kept in its box: a connection's future holds its locals for as
        // long as it lives, one pointer here instead of the admission. It
        // holds the connection's slot (counted against the limits) to the end.
        let admitted = admission.0;
        self.start_heartbeats();
        channel.heard();
        let user = admitted.user.as_ref().map(|u| u.id.clone());
        self.inner.peers.insert(&channel, user);
        let _running = Running(self, channel.id());
        // Listening before the join, so that no event after `welcome` is
        // missed; a join that fails takes the listener away again.
        if admitted.events {
            self.inner.peers.listen(admitted.group.as_str(), channel.id());
        }
        let metrics = &self.inner.metrics;
        metrics.connections.inc();
        tracing::debug!("connected");
        // The join is boxed: a connection's future keeps the largest state it
        // ever had for as long as it lives, and the join's is only needed once.
        let group = admitted.group.as_str();
        let hook_data = admitted.hook_data.as_ref();
        // The URL group's replay may take long for a slow reader: pongs are
        // read meanwhile, so that heartbeats do not close it.
        let mut stash = None;
        let joined = if admitted.hook_groups.is_empty()
            || Box::pin(self.join_hook_groups(&admitted.hook_groups, &channel)).await
        {
            let join = Box::pin(self.join_url_group(group, admitted.replay.clone(), &channel, hook_data));
            listening(join, &channel, &mut incoming, &mut stash).await
        } else {
            false
        };
        if !joined && admitted.events {
            self.inner.peers.unlisten(group, channel.id());
        }
        if joined {
            // What the session needs moves out of the admission, which goes:
            // an idle connection keeps its slot, not its request.
            let (group, user, _slot) = admitted.into_session_parts();
            let session = Session {
                channel: channel.clone(),
                url_group: group,
                user,
                membership: MembershipPacer::default(),
                _slot,
            };
            self.session(&session, incoming, stash).await;
        }
        tracing::debug!(reason = ?channel.close_reason(), "disconnected");
        metrics.connections.dec();
    }

    /// Joins the URL group (welcome, replay, recovery); `false` (and the
    /// channel closed with 1011) when it could not.
    async fn join_url_group(&self, group: &str, replay: Replay, channel: &Channel, hook_data: Option<&Value>) -> bool {
        let framing = Framing {
            group,
            join: None,
            id: channel.id(),
            hook_data,
            unsaved: !self.namespace(group).history,
        };
        let joined = match self.inner.directory.get() {
            Some(directory) => directory.connected(channel.id()).await.map_err(Into::into),
            None => Ok(()),
        };
        let joined = match joined {
            Ok(()) => self.inner.channels.subscribe(channel, group, replay, &framing).await,
            Err(err) => Err(err),
        };
        if let Err(err) = joined {
            tracing::warn!(error = %err, channel = %channel.id(), group, "could not join the URL group");
            channel.close(CloseReason::new(1011, "server error"));
            return false;
        }
        true
    }

    /// Joins the groups the connect hook gave, before `welcome` and without
    /// frames of their own; `false` (and the channel closed with 1011) when
    /// one could not be joined.
    async fn join_hook_groups(&self, groups: &[crate::fields::GroupName], channel: &Channel) -> bool {
        for group in groups {
            let joined = self
                .inner
                .channels
                .subscribe(channel, group.as_str(), Replay::None, &channelbox_core::NoFraming)
                .await;
            if let Err(err) = joined {
                tracing::warn!(
                    error = %err,
                    channel = %channel.id(),
                    group = group.as_str(),
                    "could not join a group the connect hook gave"
                );
                channel.close(CloseReason::new(1011, "server error"));
                return false;
            }
        }
        true
    }

    async fn session<S>(&self, s: &Session, mut incoming: S, mut stash: Stash)
    where
        S: Stream<Item = Incoming> + Unpin + Send,
    {
        // Publishes waiting for the store; made on the first one, since an
        // empty `FuturesUnordered` already holds two allocations and most
        // connections only listen.
        let mut pending: Option<FuturesUnordered<PublishDone>> = None;
        let mut limiter = RateLimiter::new(self.inner.config.rate_limit);
        let end = loop {
            // A frame read while a request was being handled comes first.
            // Boxed like the read below: unboxed, its state would be laid
            // out in every connection's future.
            if let Some(frame) = stash.take() {
                match Box::pin(self.on_frame(s, frame, &mut limiter, &mut incoming, &mut stash)).await {
                    Read::Continue => {}
                    Read::Publish(done) => pending.get_or_insert_with(FuturesUnordered::new).push(done),
                    Read::End(reason) => break Some(reason),
                }
                continue;
            }
            // Past its bound of publishes in flight a connection is not read
            // (back-pressure through TCP) until one of them is answered.
            let room = pending.as_ref().is_none_or(|p| p.len() < MAX_PUBLISHES_IN_FLIGHT);
            tokio::select! {
                biased;
                Some((reference, group, result)) = async { pending.as_mut()?.next().await },
                    if pending.as_ref().is_some_and(|p| !p.is_empty()) => {
                    let frame = match result {
                        Ok(report) => reply(
                            json!({"type": "published", "group": group, "offset": report.offset, "epoch": report.epoch}),
                            reference.as_ref(),
                        ),
                        Err(err) => store_error(Some(s.channel.id()), &err).frame(reference.as_ref()),
                    };
                    self.send(s, frame);
                }
                _ = s.channel.closed() => break None,
                frame = incoming.next(), if room => {
                    // Boxed: reading a frame is rare next to waiting for one,
                    // and every idle connection would carry its largest state.
                    match Box::pin(self.on_frame(s, frame, &mut limiter, &mut incoming, &mut stash)).await {
                        Read::Continue => {}
                        Read::Publish(done) => pending.get_or_insert_with(FuturesUnordered::new).push(done),
                        Read::End(reason) => break Some(reason),
                    }
                }
            }
        };
        if let Some(reason) = end {
            s.channel.close(reason);
        }
        // Publishes still waiting for the disk must be delivered to the group
        // even though their sender left.
        if let Some(mut pending) = pending.filter(|p| !p.is_empty()) {
            tokio::spawn(async move { while pending.next().await.is_some() {} }.in_current_span());
        }
    }

    /// Handles one item of the client's stream (`None`: it ended).
    async fn on_frame<S>(
        &self,
        s: &Session,
        frame: Option<Incoming>,
        limiter: &mut RateLimiter,
        incoming: &mut S,
        stash: &mut Stash,
    ) -> Read
    where
        S: Stream<Item = Incoming> + Unpin + Send,
    {
        let Some(frame) = frame else {
            return Read::End(CloseReason::ABNORMAL);
        };
        // Anything proves the peer alive (heartbeats); anything but a pong
        // is activity (expiry).
        s.channel.heard();
        if !matches!(frame, Incoming::Pong) {
            s.channel.touch();
        }
        match frame {
            // A request may wait long (a join's replay to a slow reader):
            // the client's pongs are read meanwhile.
            Incoming::Text(_) if !limiter.allow() => self.rate_limited(s),
            Incoming::Text(text) if text.len() > self.inner.config.max_message_bytes => self.too_large(s),
            Incoming::Text(text) => {
                let work = Box::pin(self.dispatch(s, &text));
                match listening(work, &s.channel, incoming, stash).await {
                    Some(done) => Read::Publish(done),
                    None => Read::Continue,
                }
            }
            other => self.read(s, other, limiter),
        }
    }

    /// Handles one frame from the client that is no request to dispatch.
    fn read(&self, s: &Session, frame: Incoming, limiter: &mut RateLimiter) -> Read {
        match frame {
            Incoming::Ping | Incoming::Pong => Read::Continue,
            Incoming::Close => Read::End(CloseReason::NORMAL),
            Incoming::Failed => Read::End(CloseReason::ABNORMAL),
            Incoming::InvalidUtf8 => Read::End(CloseReason::new(1007, "invalid utf-8")),
            Incoming::TooLarge => self.too_large(s),
            // Handled by `on_frame`.
            Incoming::Text(_) => Read::Continue,
            Incoming::Binary(_) if !limiter.allow() => self.rate_limited(s),
            Incoming::Binary(_) => {
                let err = ProtocolError::new(ErrorCode::BadRequest, "binary frames are not accepted; send JSON text");
                self.send(s, err.frame(None));
                Read::Continue
            }
        }
    }

    fn rate_limited(&self, s: &Session) -> Read {
        let err = ProtocolError::new(ErrorCode::RateLimited, "too many frames: this one was dropped");
        self.send(s, err.frame(None));
        Read::Continue
    }

    fn too_large(&self, s: &Session) -> Read {
        let max = self.inner.config.max_message_bytes;
        let err = ProtocolError::new(ErrorCode::TooLarge, format!("messages are limited to {max} bytes"));
        self.send(s, err.frame(None));
        Read::End(CloseReason::new(1009, "message too big"))
    }

    /// Queues a frame for the session's client; a full queue makes it a slow
    /// consumer, which leaves its groups at once.
    pub(super) fn send(&self, s: &Session, frame: Frame) {
        self.inner.channels.send_frame_to_channel(&s.channel, frame);
    }

    /// Parses and handles one text frame; a publish returns the future of its
    /// completion.
    async fn dispatch(&self, s: &Session, text: &str) -> Option<PublishDone> {
        let (reference, request) = match request::parse(text) {
            Ok(parsed) => parsed,
            Err((reference, err)) => {
                tracing::debug!(error = %err.message, "refused a frame");
                self.send(s, err.frame(reference.as_ref()));
                return None;
            }
        };
        let span = tracing::debug_span!("request", kind = request.kind(), r#ref = ?reference);
        async {
            match self.handle(s, reference.as_ref(), request).await {
                Ok(Handled::Reply(frame)) => {
                    self.send(s, frame);
                    None
                }
                Ok(Handled::Publish(done)) => Some(done),
                Ok(Handled::Queued) => None,
                Err(err) => {
                    tracing::debug!(code = err.code.as_str(), error = %err.message, "request refused");
                    self.send(s, err.frame(reference.as_ref()));
                    None
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// Publishes one connection may have waiting for the store; past this its
/// frames are not read until one is answered (back-pressure through TCP, no
/// error). Below the queue's half (docs/protocol.md: keep fewer than
/// `queue/2` publishes unacknowledged), since each answer takes a frame.
pub(super) const MAX_PUBLISHES_IN_FLIGHT: usize = 256;

/// A frame of the client's stream read while a request was handled, kept
/// for the session loop (`Some(None)`: the stream ended).
pub(super) type Stash = Option<Option<Incoming>>;

/// Runs `work` while reading the client's stream for control frames, so that
/// a long request (a replay to a slow reader) does not hide the client's
/// pongs from heartbeats. The first other frame is stashed, and reading stops
/// until the session loop has handled it: at most one frame waits here.
async fn listening<F, S>(work: F, channel: &Channel, incoming: &mut S, stash: &mut Stash) -> F::Output
where
    F: Future + Unpin,
    S: Stream<Item = Incoming> + Unpin + Send,
{
    let mut work = work;
    loop {
        tokio::select! {
            biased;
            done = &mut work => return done,
            frame = incoming.next(), if stash.is_none() => match frame {
                Some(Incoming::Pong) => channel.heard(),
                Some(Incoming::Ping) => {
                    channel.heard();
                    channel.touch();
                }
                other => *stash = Some(other),
            },
        }
    }
}

/// What a handler produced.
pub(super) enum Handled {
    /// A reply to queue.
    Reply(Frame),
    /// A publish whose reply comes once it is durable.
    Publish(PublishDone),
    /// The replies were queued already (a `join` that replays).
    Queued,
}

/// The message of `unavailable` when the store never answered: the request
/// may still take effect (a publish may still appear, once, under one
/// offset). Clients tell it from a plain refusal by these words.
pub(crate) const UNANSWERED: &str =
    "the history store did not answer in time; the request may still take effect (its outcome is unknown)";

/// The error a client sees when a box operation failed. A store failure is
/// `unavailable`, with the store's own words (paths, OS errors) only in the
/// log; its message says when the outcome is unknown (the store never
/// answered: the request may still take effect, docs/protocol.md). The box's
/// other errors name the group or channel, nothing else. The log names
/// `channel`, the connection whose request failed.
pub(super) fn store_error(channel: Option<Uuid>, err: &BoxError) -> ProtocolError {
    let channel = channel.map(tracing::field::display);
    match err {
        BoxError::Store(e) if e.kind() == StoreErrorKind::Unanswered => {
            tracing::error!(error = %e, channel, "history store did not answer");
            ProtocolError::new(ErrorCode::Unavailable, UNANSWERED)
        }
        BoxError::Store(e) => {
            tracing::error!(error = %e, channel, "history store failed");
            ProtocolError::new(
                ErrorCode::Unavailable,
                "the history store cannot take the request now; try again later",
            )
        }
        other => ProtocolError::new(ErrorCode::BadRequest, other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use channelbox_core::StoreError;

    use super::*;

    #[test]
    fn an_unanswered_store_error_says_its_outcome_is_unknown_and_others_do_not() {
        let unanswered = store_error(
            None,
            &BoxError::Store(StoreError::new(StoreErrorKind::Unanswered, "redis: no answer in time")),
        );
        assert_eq!(unanswered.code, ErrorCode::Unavailable);
        assert!(
            unanswered.message.contains("outcome is unknown"),
            "{}",
            unanswered.message
        );
        let refused = store_error(
            None,
            &BoxError::Store(StoreError::new(StoreErrorKind::Io, "redis: not connected")),
        );
        assert_eq!(refused.code, ErrorCode::Unavailable);
        assert!(!refused.message.contains("unknown"), "{}", refused.message);
        assert!(!refused.message.contains("redis"), "the store's words stay in the log");
    }
}
