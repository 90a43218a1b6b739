//! The HTTP API of docs/protocol.md as transport-agnostic handlers: each takes the
//! request's parts and returns an [`HttpAnswer`]; a web framework only routes.

use bytes::Bytes;
use channelbox_core::{NewMessage, PayloadKind};
use serde_json::{json, Value};

use super::{ChatService, HttpAnswer};
use crate::auth::{now_secs, same_secret, User};
use crate::config::HTTP_HISTORY_BYTES;
use crate::fields::{query_param, GroupName, Limit, Since};
use crate::frames::Sender;

/// A publish over HTTP that passed its checks, waiting for its body.
#[derive(Debug)]
pub struct PublishTicket {
    group: GroupName,
    user: Option<String>,
}

/// Who is calling.
enum Access {
    /// Tokens are not required, or the admin token was given.
    All,
    /// A user token: its groups, and its user on what it publishes.
    User(User),
}

impl Access {
    fn allows(&self, group: &str) -> bool {
        match self {
            Access::All => true,
            Access::User(u) => u.permissions.allows(group),
        }
    }
}

fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization?.strip_prefix("Bearer ").map(str::trim)
}

fn unauthorized(message: &str) -> HttpAnswer {
    HttpAnswer::error(401, "unauthorized", message)
}

fn forbidden(group: &str) -> HttpAnswer {
    HttpAnswer::error(403, "forbidden", format!("your token does not allow group {group:?}"))
}

/// A failed box operation: 503 `unavailable` for the store (its own words
/// only in the log), 400 for the box's other errors.
fn failed(err: &channelbox_core::BoxError) -> HttpAnswer {
    let e = super::session::store_error(None, err);
    let status = if e.code == crate::frames::ErrorCode::Unavailable {
        503
    } else {
        400
    };
    HttpAnswer::refusal(status, &e)
}

impl ChatService {
    /// With tokens required, the `/api/groups…` endpoints take the admin token
    /// (everything) or a user token (its groups); without, they are open.
    fn api_access(&self, authorization: Option<&str>) -> Result<Access, HttpAnswer> {
        let config = &self.inner.config;
        let Some(verifier) = &config.tokens else {
            return Ok(Access::All);
        };
        let token = bearer(authorization).ok_or_else(|| unauthorized("an Authorization: Bearer token is required"))?;
        if config
            .admin_token
            .as_deref()
            .is_some_and(|admin| same_secret(token, admin))
        {
            return Ok(Access::All);
        }
        verifier
            .verify(token, now_secs())
            .map(Access::User)
            .map_err(|e| unauthorized(&e.to_string()))
    }

    pub(super) fn admin(&self, authorization: Option<&str>) -> Result<(), HttpAnswer> {
        let Some(admin) = &self.inner.config.admin_token else {
            return Err(HttpAnswer::error(404, "not_found", "the admin API is disabled"));
        };
        match bearer(authorization) {
            Some(t) if same_secret(t, admin) => Ok(()),
            _ => Err(unauthorized("the admin API needs Authorization: Bearer <admin token>")),
        }
    }

    /// The group of a `/api/groups/{g}/…` path, checked in the order of a
    /// WebSocket upgrade: the name (400), the caller (401), its permission (403).
    fn api_group(&self, raw: &str, authorization: Option<&str>) -> Result<GroupName, HttpAnswer> {
        let group = GroupName::from_path_segment(raw).map_err(|e| HttpAnswer::refusal(400, &e))?;
        let access = self.api_access(authorization)?;
        if !access.allows(group.as_str()) {
            return Err(forbidden(group.as_str()));
        }
        Ok(group)
    }

    /// `GET /api/groups`: `{"<name>": <member count>, …}`.
    pub async fn api_groups(&self, authorization: Option<&str>) -> HttpAnswer {
        let access = match self.api_access(authorization) {
            Ok(a) => a,
            Err(e) => return e,
        };
        let counts = self.member_counts().await;
        // At most the largest 10,000, without a field saying so: the answer
        // is the bare map.
        let (groups, _) =
            super::handlers::largest_groups(counts.into_iter().filter(|(g, _)| access.allows(g)), usize::MAX);
        HttpAnswer::ok(Value::Object(groups))
    }

    /// `GET /api/groups/{g}/history?limit=n&since=o`.
    pub async fn api_history(&self, raw_group: &str, query: Option<&str>, authorization: Option<&str>) -> HttpAnswer {
        let group = match self.api_group(raw_group, authorization) {
            Ok(g) => g,
            Err(e) => return e,
        };
        let parsed = (|| {
            let limit = query_param(query, "limit").map(|s| Limit::parse(&s)).transpose()?;
            let since = query_param(query, "since").map(|s| Since::parse(&s)).transpose()?;
            Ok::<_, crate::frames::ProtocolError>((limit.unwrap_or_default(), since.map(|s| s.0)))
        })();
        let (limit, since) = match parsed {
            Ok(p) => p,
            Err(e) => return HttpAnswer::refusal(400, &e),
        };
        match self
            .history_text(&group, (limit, since), None, HTTP_HISTORY_BYTES)
            .await
        {
            Ok(body) => HttpAnswer::json(200, body),
            Err(e) => failed(&e),
        }
    }

    /// `GET /api/groups/{g}/presence`: `{"group","members":[…]}`, with the
    /// permission `history` needs.
    pub async fn api_presence(&self, raw_group: &str, authorization: Option<&str>) -> HttpAnswer {
        match self.api_group(raw_group, authorization) {
            Ok(group) if !self.namespace(group.as_str()).presence => {
                HttpAnswer::refusal(403, &Self::namespace_forbids(group.as_str(), "presence"))
            }
            Ok(group) => match self.presence_of(&group).await {
                Ok(body) => HttpAnswer::ok(body),
                Err(e) => HttpAnswer::refusal(503, &e),
            },
            Err(e) => e,
        }
    }

    /// `POST /api/groups/{g}/messages`, before its body is read: the group
    /// (400), the caller (401), its permission (403), the declared length
    /// (413), the content type (415). A web framework calls this, then reads
    /// at most [`ChatService::max_body_bytes`] bytes of body (with the
    /// deadline of docs/protocol.md) and hands them to
    /// [`ChatService::api_publish`].
    pub fn api_publish_check(
        &self,
        raw_group: &str,
        authorization: Option<&str>,
        content_type: Option<&str>,
        content_length: Option<u64>,
    ) -> Result<PublishTicket, HttpAnswer> {
        let group = GroupName::from_path_segment(raw_group).map_err(|e| HttpAnswer::refusal(400, &e))?;
        let access = self.api_access(authorization)?;
        if !access.allows(group.as_str()) {
            return Err(forbidden(group.as_str()));
        }
        if content_length.is_some_and(|n| n > self.max_body_bytes() as u64) {
            return Err(self.body_too_large());
        }
        let json = content_type
            .and_then(|t| t.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(HttpAnswer::error(
                415,
                "bad_request",
                "a publish needs Content-Type: application/json",
            ));
        }
        let user = match access {
            Access::User(u) => Some(u.id),
            Access::All => None,
        };
        Ok(PublishTicket { group, user })
    }

    /// The largest request body the server reads (`--max-message-bytes`).
    pub fn max_body_bytes(&self) -> usize {
        self.inner.config.max_message_bytes
    }

    /// The answer to a body above [`ChatService::max_body_bytes`]: 413.
    pub fn body_too_large(&self) -> HttpAnswer {
        let max = self.max_body_bytes();
        HttpAnswer::error(413, "too_large", format!("request bodies are limited to {max} bytes"))
    }

    /// `POST /api/groups/{g}/messages` with its body, once
    /// [`ChatService::api_publish_check`] passed: publishes from the backend
    /// (`from: null`, and the token's `user` when a user token was given),
    /// answered with `{"offset","epoch"}` once the message is durable.
    /// `POST /api/groups/{g}/messages` after [`ChatService::api_publish_check`]:
    /// reads the body from a framework's stream of chunks within the limits
    /// of docs/protocol.md (at most [`ChatService::max_body_bytes`], 413
    /// beyond; 408 when it stalls for 10 seconds), then publishes it.
    pub async fn api_publish_stream<S, B, E>(&self, ticket: PublishTicket, body: S) -> HttpAnswer
    where
        S: futures_util::Stream<Item = Result<B, E>>,
        B: bytes::Buf,
    {
        match crate::body::read(body, self.max_body_bytes()).await {
            Ok(bytes) => self.api_publish(ticket, &bytes).await,
            Err(crate::body::Refused::TooLarge) => self.body_too_large(),
            Err(crate::body::Refused::Stalled) => HttpAnswer::error(408, "bad_request", "the request body stalled"),
            Err(crate::body::Refused::Failed) => {
                HttpAnswer::error(400, "bad_request", "the request body could not be read")
            }
        }
    }

    /// Publishes a body read whole; see [`ChatService::api_publish_stream`].
    pub async fn api_publish(&self, ticket: PublishTicket, body: &[u8]) -> HttpAnswer {
        if body.len() > self.max_body_bytes() {
            return self.body_too_large();
        }
        let data: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return HttpAnswer::error(400, "bad_request", format!("the body is not valid JSON: {e}")),
        };
        // A user token's publish asks the publish hook; the backend's own
        // (admin token, or no tokens at all) does not.
        let data = match &ticket.user {
            Some(user) => match self.publish_hook(None, Some(user), &ticket.group, data).await {
                Ok(data) => data,
                Err(e) => return super::hooks::hook_answer(&e),
            },
            None => data,
        };
        let sender = Sender {
            from: None,
            user: ticket.user,
        };
        let message = NewMessage {
            kind: PayloadKind::Json,
            payload: Bytes::from(data.to_string()),
            meta: sender.to_meta(),
            timestamp_ms: channelbox_core::now_ms(),
        };
        let started = std::time::Instant::now();
        let save = self.namespace(ticket.group.as_str()).history;
        match self.inner.channels.publish(ticket.group.as_str(), message, save).await {
            Ok(report) => {
                self.inner
                    .metrics
                    .publish_durable_seconds
                    .observe(started.elapsed().as_secs_f64());
                HttpAnswer::ok(json!({"offset": report.offset, "epoch": report.epoch}))
            }
            Err(e) => failed(&e),
        }
    }

    /// `POST /api/admin/close-all`: closes every connection with 1001.
    pub async fn api_close_all(&self, authorization: Option<&str>) -> HttpAnswer {
        if let Err(e) = self.admin(authorization) {
            return e;
        }
        match self.close_everywhere().await {
            Ok(closed) => HttpAnswer::ok(json!({"closed": closed})),
            Err(e) => HttpAnswer::refusal(503, &e),
        }
    }

    /// `DELETE /api/admin/history[?group=g]`: flushes every group, or one.
    pub async fn api_flush_history(&self, query: Option<&str>, authorization: Option<&str>) -> HttpAnswer {
        if let Err(e) = self.admin(authorization) {
            return e;
        }
        let group = match query_param(query, "group").map(|g| GroupName::parse(&g)).transpose() {
            Ok(g) => g,
            Err(e) => return HttpAnswer::refusal(400, &e),
        };
        match self
            .inner
            .channels
            .flush_history(group.as_ref().map(GroupName::as_str))
            .await
        {
            Ok(()) => HttpAnswer::ok(json!({"flushed": true})),
            Err(e) => failed(&e),
        }
    }
}
