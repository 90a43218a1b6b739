//! The HTTP API of PROTOCOL.md as transport-agnostic handlers: each takes the
//! request's parts and returns an [`HttpAnswer`]; a web framework only routes.

use bytes::Bytes;
use channelbox_core::{NewMessage, PayloadKind};
use serde_json::{json, Map, Value};

use super::{ChatService, HttpAnswer};
use crate::auth::{now_secs, Permissions};
use crate::config::{DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT};
use crate::frames::Sender;
use crate::names::{decode_group, query_param, valid_group};

/// Who is calling.
enum Access {
    All,
    User(Permissions),
}

impl Access {
    fn allows(&self, group: &str) -> bool {
        match self {
            Access::All => true,
            Access::User(p) => p.allows(group),
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

fn internal(err: impl std::fmt::Display) -> HttpAnswer {
    tracing::error!(error = %err, "history store failed");
    HttpAnswer::error(
        500,
        "internal_error",
        format!("the server could not complete the request: {err}"),
    )
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
        if config.admin_token.as_deref() == Some(token) {
            return Ok(Access::All);
        }
        verifier
            .verify(token, now_secs())
            .map(|user| Access::User(user.permissions))
            .map_err(|e| unauthorized(&e.to_string()))
    }

    fn admin(&self, authorization: Option<&str>) -> Result<(), HttpAnswer> {
        let Some(admin) = &self.inner.config.admin_token else {
            return Err(HttpAnswer::error(404, "not_found", "the admin API is disabled"));
        };
        match bearer(authorization) {
            Some(t) if t == admin => Ok(()),
            _ => Err(unauthorized("the admin API needs Authorization: Bearer <admin token>")),
        }
    }

    /// The group of a `/api/groups/{g}/…` path, checked in the order of a
    /// WebSocket upgrade: the name (400), the caller (401), its permission (403).
    fn api_group(&self, raw: &str, authorization: Option<&str>) -> Result<String, HttpAnswer> {
        let group = decode_group(raw)
            .ok_or_else(|| HttpAnswer::error(400, "invalid_group", format!("{raw:?} is not a valid group name")))?;
        let access = self.api_access(authorization)?;
        if !access.allows(&group) {
            return Err(forbidden(&group));
        }
        Ok(group)
    }

    /// `GET /api/groups`: `{"<name>": <member count>, …}`.
    pub async fn api_groups(&self, authorization: Option<&str>) -> HttpAnswer {
        let access = match self.api_access(authorization) {
            Ok(a) => a,
            Err(e) => return e,
        };
        let groups: Map<String, Value> = self
            .inner
            .channels
            .groups()
            .into_iter()
            .filter(|(g, _)| access.allows(g))
            .map(|(g, n)| (g, json!(n)))
            .collect();
        HttpAnswer::ok(Value::Object(groups))
    }

    /// `GET /api/groups/{g}/history?limit=n&since=o`.
    pub async fn api_history(&self, raw_group: &str, query: Option<&str>, authorization: Option<&str>) -> HttpAnswer {
        let group = match self.api_group(raw_group, authorization) {
            Ok(g) => g,
            Err(e) => return e,
        };
        let limit = match query_param(query, "limit") {
            None => DEFAULT_HISTORY_LIMIT,
            Some(s) => match s.parse::<u64>() {
                Ok(n) if n >= 1 => (n as usize).min(MAX_HISTORY_LIMIT),
                _ => return HttpAnswer::error(400, "bad_request", format!("limit={s:?} is not a positive integer")),
            },
        };
        let since = match query_param(query, "since") {
            None => None,
            Some(s) => match s.parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => {
                    return HttpAnswer::error(400, "bad_request", format!("since={s:?} is not a non-negative integer"))
                }
            },
        };
        match self.history_body(&group, limit, since).await {
            Ok(body) => HttpAnswer { status: 200, body },
            Err(e) => internal(e),
        }
    }

    /// `POST /api/groups/{g}/messages`: publish from the backend (`from: null`),
    /// answered with `{"offset": n}` once the message is durable.
    pub async fn api_publish(&self, raw_group: &str, body: &[u8], authorization: Option<&str>) -> HttpAnswer {
        let group = match self.api_group(raw_group, authorization) {
            Ok(g) => g,
            Err(e) => return e,
        };
        let max = self.inner.config.max_message_bytes;
        if body.len() > max {
            return HttpAnswer::error(413, "too_large", format!("messages are limited to {max} bytes"));
        }
        let data: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return HttpAnswer::error(400, "bad_request", format!("the body is not valid JSON: {e}")),
        };
        let message = NewMessage {
            kind: PayloadKind::Json,
            payload: Bytes::from(data.to_string()),
            meta: Sender::default().to_meta(),
            timestamp_ms: channelbox_core::now_ms(),
        };
        let started = std::time::Instant::now();
        match self.inner.channels.publish(&group, message, true).await {
            Ok(report) => {
                self.inner
                    .metrics
                    .publish_durable_seconds
                    .observe(started.elapsed().as_secs_f64());
                HttpAnswer::ok(json!({"offset": report.offset}))
            }
            Err(e) => internal(e),
        }
    }

    /// `POST /api/admin/close-all`: closes every connection with 1001.
    pub async fn api_close_all(&self, authorization: Option<&str>) -> HttpAnswer {
        if let Err(e) = self.admin(authorization) {
            return e;
        }
        let closed = self.inner.channels.close_all(channelbox_core::CloseReason::GOING_AWAY);
        HttpAnswer::ok(json!({"closed": closed}))
    }

    /// `DELETE /api/admin/history[?group=g]`: flushes every group, or one.
    pub async fn api_flush_history(&self, query: Option<&str>, authorization: Option<&str>) -> HttpAnswer {
        if let Err(e) = self.admin(authorization) {
            return e;
        }
        let group = match query_param(query, "group") {
            None => None,
            Some(g) if valid_group(&g) => Some(g),
            Some(g) => return HttpAnswer::error(400, "invalid_group", format!("{g:?} is not a valid group name")),
        };
        match self.inner.channels.flush_history(group.as_deref()).await {
            Ok(()) => HttpAnswer::ok(json!({"flushed": true})),
            Err(e) => internal(e),
        }
    }
}
