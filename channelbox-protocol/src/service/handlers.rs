//! One handler per client request. Each checks what docs/protocol.md says in its
//! order — field types (done by serde in `request`), group names
//! (`invalid_group`), permissions (`forbidden`) — then acts on the box.

use std::time::Instant;

use bytes::Bytes;
use channelbox_core::{Frame, NewMessage, PayloadKind, PublishOptions, ReadQuery, SendError};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::session::{store_error, Framing, Handled, Session};
use super::{replay_from, ChatService};
use crate::fields::{GroupName, Limit};
use crate::frames::{render_history_within, reply, ErrorCode, ProtocolError, Sender};
use crate::namespaces::PublishRule;
use crate::request::{self, Request};

/// Parses a hyphenated UUID in any letter case.
fn parse_uuid(s: &str) -> Option<Uuid> {
    (s.len() == 36).then(|| Uuid::try_parse(s).ok()).flatten()
}

impl ChatService {
    /// Handles one parsed request.
    pub(super) async fn handle(
        &self,
        s: &Session,
        reference: Option<&Value>,
        request: Request,
    ) -> Result<Handled, ProtocolError> {
        if matches!(request, Request::Join(_) | Request::Leave(_)) {
            let wait = s.membership.take();
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        match request {
            Request::Publish(p) => self.on_publish(s, reference, p).await,
            Request::Join(j) => self.on_join(s, reference, j).await,
            Request::Leave(l) => self.on_leave(s, reference, l).map(Handled::Reply),
            Request::History(h) => self.on_history(s, reference, h).await.map(Handled::Reply),
            Request::Direct(d) => self.on_direct(s, reference, d).await.map(Handled::Reply),
            Request::Groups => Ok(Handled::Reply(self.on_groups(s, reference).await)),
            Request::Presence(p) => self.on_presence(s, reference, p).await.map(Handled::Reply),
            Request::Ping => Ok(Handled::Reply(reply(json!({"type": "pong"}), reference))),
        }
    }

    /// The group of a request: the given name checked, or the URL group.
    fn group_or_url(s: &Session, group: Option<String>) -> Result<GroupName, ProtocolError> {
        match group {
            Some(g) => GroupName::parse(&g),
            None => Ok(s.url_group.clone()),
        }
    }

    /// `forbidden` when the session's token does not allow `group`.
    fn allowed(&self, s: &Session, group: &GroupName) -> Result<(), ProtocolError> {
        match &s.user {
            Some(u) if !u.permissions.allows(group.as_str()) => Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!("your token does not allow group {group:?}"),
            )),
            _ => Ok(()),
        }
    }

    async fn on_publish(
        &self,
        s: &Session,
        reference: Option<&Value>,
        p: request::Publish,
    ) -> Result<Handled, ProtocolError> {
        let channels = &self.inner.channels;
        let group = Self::group_or_url(s, p.group)?;
        self.allowed(s, &group)?;
        let namespace = self.namespace(group.as_str());
        if namespace.publish == PublishRule::Backend {
            return Err(Self::namespace_forbids(group.as_str(), "publishing over WebSocket"));
        }
        let save = p.history && namespace.history;
        if namespace.publish == PublishRule::Members && !channels.is_member(s.channel.id(), group.as_str()) {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!("you are not a member of group {:?}", group.as_str()),
            ));
        }
        let user = s.user.as_ref().map(|u| u.id.clone());
        // Awaited here, before the offset is taken: this connection's next
        // frame waits for it, so its publishes keep their send order.
        let data = self
            .publish_hook(Some(s.channel.id()), user.as_deref(), &group, p.data)
            .await?;
        let sender = Sender {
            from: Some(s.channel.id()),
            user,
        };
        let message = NewMessage {
            kind: PayloadKind::Json,
            payload: Bytes::from(data.to_string()),
            meta: sender.to_meta(),
            timestamp_ms: channelbox_core::now_ms(),
        };
        // The offset is assigned here, in this connection's order; the wait for
        // the disk and the delivery run alongside later frames.
        let options = PublishOptions {
            save_history: save,
            except: (!p.echo).then(|| s.channel.id()),
        };
        let pending = channels
            .start_publish_with(group.as_str(), message, options)
            .map_err(|e| store_error(Some(s.channel.id()), &e))?;
        let (reference, service) = (reference.cloned(), self.clone());
        Ok(Handled::Publish(Box::pin(async move {
            let started = Instant::now();
            let result = pending.finish().await;
            if save {
                let seconds = started.elapsed().as_secs_f64();
                service.inner.metrics.publish_durable_seconds.observe(seconds);
            }
            (reference, group.to_string(), result)
        })))
    }

    async fn on_join(
        &self,
        s: &Session,
        reference: Option<&Value>,
        j: request::Join,
    ) -> Result<Handled, ProtocolError> {
        let channels = &self.inner.channels;
        let group = GroupName::parse(&j.group)?;
        self.allowed(s, &group)?;
        if j.events && !self.namespace(group.as_str()).events {
            return Err(Self::namespace_forbids(group.as_str(), "events"));
        }
        let id = s.channel.id();
        let max = self.inner.config.max_groups_per_connection;
        if !channels.is_member(id, group.as_str()) && channels.groups_of(id).map_or(0, |g| g.len()) >= max {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!("a connection may be in at most {max} groups"),
            ));
        }
        let user = s.user.as_ref().map(|u| u.id.as_str());
        self.join_hook(id, user, &group).await?;
        // `joined` goes out before the replay, `recovered` after it, both with
        // the request's `ref`: the subscription queues them in their place.
        let framing = Framing {
            group: group.as_str(),
            join: Some(reference),
            id,
            hook_data: None,
            unsaved: !self.namespace(group.as_str()).history,
        };
        let replay = replay_from(j.since, j.epoch, j.history);
        // Listening before the join, so that no event after `joined` is
        // missed; a join that fails (or a channel that closed during its
        // replay) takes a listener it added away again: nothing else would.
        let added = j.events && self.inner.peers.listen(group.as_str(), id);
        let joined = channels.subscribe(&s.channel, group.as_str(), replay, &framing).await;
        if added && (joined.is_err() || !channels.is_member(id, group.as_str())) {
            self.inner.peers.unlisten(group.as_str(), id);
        }
        joined.map_err(|e| store_error(Some(s.channel.id()), &e))?;
        Ok(Handled::Queued)
    }

    fn on_leave(&self, s: &Session, reference: Option<&Value>, l: request::Leave) -> Result<Frame, ProtocolError> {
        let group = GroupName::parse(&l.group)?;
        // Leaving a group one is not in succeeds all the same.
        let _ = self.inner.channels.remove_id_from_group(s.channel.id(), group.as_str());
        Ok(reply(json!({"type": "left", "group": group.as_str()}), reference))
    }

    async fn on_history(
        &self,
        s: &Session,
        reference: Option<&Value>,
        h: request::History,
    ) -> Result<Frame, ProtocolError> {
        let group = Self::group_or_url(s, h.group)?;
        self.allowed(s, &group)?;
        let body = self
            .history_text(
                &group,
                (h.limit.unwrap_or_default(), h.since.map(|s| s.0)),
                Some(("history", reference)),
                self.reply_budget(s),
            )
            .await
            .map_err(|e| store_error(Some(s.channel.id()), &e))?;
        Ok(Frame::text(body))
    }

    async fn on_direct(
        &self,
        s: &Session,
        reference: Option<&Value>,
        d: request::Direct,
    ) -> Result<Frame, ProtocolError> {
        let to = parse_uuid(&d.to)
            .ok_or_else(|| ProtocolError::new(ErrorCode::BadRequest, format!("{:?} is not a hyphenated UUID", d.to)))?;
        let mut frame = json!({"type": "direct", "from": s.channel.id(), "data": d.data});
        if let Some(u) = &s.user {
            frame["user"] = json!(u.id);
        }
        let not_found = || ProtocolError::new(ErrorCode::NotFound, format!("no channel {to}"));
        let sent = match (self.inner.channels.channel(to), self.inner.directory.get()) {
            (Some(local), _) => {
                // Refused, not queued, past half the target's queue: a flood
                // of directs must never make its target a slow consumer.
                match local.try_send_polite(Frame::text(frame.to_string())) {
                    Ok(_) => true,
                    Err(SendError::Closed) => false,
                    Err(SendError::Overflow) => {
                        return Err(ProtocolError::new(
                            ErrorCode::RateLimited,
                            format!("channel {to} has too much queued; try again later"),
                        ))
                    }
                }
            }
            (None, Some(directory)) => directory
                .direct(to, frame.to_string())
                .await
                .map_err(|e| store_error(Some(s.channel.id()), &e.into()))?,
            (None, None) => false,
        };
        if !sent {
            return Err(not_found());
        }
        Ok(reply(json!({"type": "sent", "to": to}), reference))
    }

    async fn on_presence(
        &self,
        s: &Session,
        reference: Option<&Value>,
        p: request::Presence,
    ) -> Result<Frame, ProtocolError> {
        let group = Self::group_or_url(s, p.group)?;
        self.allowed(s, &group)?;
        if !self.namespace(group.as_str()).presence {
            return Err(Self::namespace_forbids(group.as_str(), "presence"));
        }
        let mut body = self.presence_of(&group).await?;
        body["type"] = json!("presence");
        within_budget(&mut body, self.reply_budget(s));
        Ok(reply(body, reference))
    }

    async fn on_groups(&self, s: &Session, reference: Option<&Value>) -> Frame {
        let counts = self.member_counts().await;
        let allowed = counts
            .into_iter()
            .filter(|(g, _)| s.user.as_ref().is_none_or(|u| u.permissions.allows(g)));
        let (groups, truncated) = largest_groups(allowed, self.reply_budget(s));
        let mut body = json!({"type": "groups", "groups": groups});
        if truncated {
            body["truncated"] = json!(true);
        }
        reply(body, reference)
    }

    /// A history page as JSON text: `{"group","epoch","messages":[…]}`, with
    /// `type` and `ref` first and last when it is a WebSocket reply.
    /// Bytes a reply may take of the requester's queue: half its budget, and
    /// never more than what is left of it, so that a reply never makes its
    /// requester a slow consumer.
    pub(super) fn reply_budget(&self, s: &Session) -> usize {
        let total = self.inner.config.queue_bytes;
        let room = total.saturating_sub(s.channel.stats().pending_bytes);
        (total / 2).min(room)
    }

    /// A history page as JSON text within about `max_bytes` (the oldest of
    /// the selected messages, `"more":true` when some were left out).
    pub(super) async fn history_text(
        &self,
        group: &GroupName,
        (limit, since): (Limit, Option<u64>),
        reply_to: Option<(&str, Option<&Value>)>,
        max_bytes: usize,
    ) -> Result<String, channelbox_core::BoxError> {
        let limit = limit.get();
        let query = match since {
            Some(offset) => ReadQuery::Since { offset, limit },
            None => ReadQuery::Last(limit),
        };
        let page = self.inner.channels.show_history(group.as_str(), query).await?;
        Ok(render_history_within(group.as_str(), &page, reply_to, max_bytes))
    }
}

/// The most groups one `groups` reply or `GET /api/groups` answer lists.
pub(super) const MAX_GROUPS_LISTED: usize = 10_000;

/// The largest groups by member count (ties by name), at most
/// [`MAX_GROUPS_LISTED`] and about `max_bytes` of JSON, as a JSON object;
/// whether some were left out.
pub(super) fn largest_groups(
    counts: impl Iterator<Item = (String, usize)>,
    max_bytes: usize,
) -> (Map<String, Value>, bool) {
    // A listed group costs its quoted name, a colon, the count and a comma.
    let cost = |(g, n): &(String, usize)| g.len() + 4 + n.to_string().len();
    let mut all: Vec<(String, usize)> = counts.collect();
    let total: usize = all.iter().map(cost).sum();
    // Room for `{"type":"groups","groups":{…},"truncated":true,"ref":…}`.
    let budget = max_bytes.saturating_sub(256);
    let truncated = all.len() > MAX_GROUPS_LISTED || total > budget;
    if truncated {
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(MAX_GROUPS_LISTED);
        let mut used = 0;
        let fits = all
            .iter()
            .take_while(|g| {
                used += cost(g);
                used <= budget
            })
            .count();
        all.truncate(fits);
    }
    (all.into_iter().map(|(g, n)| (g, json!(n))).collect(), truncated)
}

/// Cuts a `presence` body's `members` to about `max_bytes` of JSON (with
/// `"truncated":true`), so that the reply cannot overflow its requester.
fn within_budget(body: &mut Value, max_bytes: usize) {
    let budget = max_bytes.saturating_sub(256);
    let Some(members) = body.get_mut("members").and_then(Value::as_array_mut) else {
        return;
    };
    let mut used = 0;
    let fits = members
        .iter()
        .take_while(|m| {
            used += m.to_string().len() + 1;
            used <= budget
        })
        .count();
    if fits < members.len() {
        members.truncate(fits);
        body["truncated"] = json!(true);
    }
}
