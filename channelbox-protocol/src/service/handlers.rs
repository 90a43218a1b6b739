//! One handler per client request. Each checks what docs/protocol.md says in its
//! order — field types (done by serde in `request`), group names
//! (`invalid_group`), permissions (`forbidden`) — then acts on the box.

use std::time::Instant;

use bytes::Bytes;
use channelbox_core::{Frame, NewMessage, PayloadKind, PublishOptions, ReadQuery};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::session::{store_error, Framing, Handled, Session};
use super::{replay_from, ChatService};
use crate::fields::{GroupName, Limit};
use crate::frames::{render_history, reply, ErrorCode, ProtocolError, Sender};
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
            None => GroupName::parse(&s.url_group),
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
            .map_err(|e| store_error(&e))?;
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
        if j.events {
            self.inner.peers.listen(group.as_str(), id);
        }
        channels
            .subscribe(&s.channel, group.as_str(), replay, &framing)
            .await
            .map_err(|e| store_error(&e))?;
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
                h.limit.unwrap_or_default(),
                h.since.map(|s| s.0),
                Some(("history", reference)),
            )
            .await
            .map_err(|e| store_error(&e))?;
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
                self.inner
                    .channels
                    .send_frame_to_channel(&local, Frame::text(frame.to_string()));
                true
            }
            (None, Some(directory)) => directory
                .direct(to, frame.to_string())
                .await
                .map_err(|e| store_error(&e.into()))?,
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
        Ok(reply(body, reference))
    }

    async fn on_groups(&self, s: &Session, reference: Option<&Value>) -> Frame {
        let groups: Map<String, Value> = self
            .member_counts()
            .await
            .into_iter()
            .filter(|(g, _)| s.user.as_ref().is_none_or(|u| u.permissions.allows(g)))
            .map(|(g, n)| (g, json!(n)))
            .collect();
        reply(json!({"type": "groups", "groups": groups}), reference)
    }

    /// A history page as JSON text: `{"group","epoch","messages":[…]}`, with
    /// `type` and `ref` first and last when it is a WebSocket reply.
    pub(super) async fn history_text(
        &self,
        group: &GroupName,
        limit: Limit,
        since: Option<u64>,
        reply_to: Option<(&str, Option<&Value>)>,
    ) -> Result<String, channelbox_core::BoxError> {
        let limit = limit.get();
        let query = match since {
            Some(offset) => ReadQuery::Since { offset, limit },
            None => ReadQuery::Last(limit),
        };
        let page = self.inner.channels.show_history(group.as_str(), query).await?;
        Ok(render_history(group.as_str(), &page, reply_to))
    }
}
