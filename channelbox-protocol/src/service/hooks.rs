//! The service's side of the backend hooks (docs/protocol.md "Backend
//! hooks"): the join hook before a `join` subscribes, the publish hook before
//! a publish takes its offset (WebSocket, and HTTP with a user token). Each
//! call is counted in the hook metrics; a hook that fails fails closed.
//!
//! A connection awaits its hooks in the order of its requests (its session
//! handles one frame at a time), so its publishes keep their send order; the
//! wait is that connection's own, so a slow hook stalls no other connection.

use std::time::Instant;

use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::{ChatService, HttpAnswer};
use crate::fields::GroupName;
use crate::frames::{ErrorCode, ProtocolError};
use crate::hooks::{Hook, Hooks, Verdict};

impl ChatService {
    /// Sets the backend hooks, once, before serving; `false` (and nothing
    /// changed) when they were set already.
    pub fn set_hooks(&self, hooks: Hooks) -> bool {
        self.inner.hooks.set(hooks).is_ok()
    }

    /// Calls `hook` with `body` when it is configured: `Ok(None)` when it is
    /// not, the rest of an `allow:true` answer, or the error to answer.
    pub(super) async fn call_hook(&self, hook: Hook, body: Value) -> Result<Option<Map<String, Value>>, ProtocolError> {
        let Some(hooks) = self.inner.hooks.get() else {
            return Ok(None);
        };
        let Some(url) = hooks.url(hook) else {
            return Ok(None);
        };
        let started = Instant::now();
        let verdict = hooks.ask(url, &body).await;
        let seconds = started.elapsed().as_secs_f64();
        self.inner
            .metrics
            .hooks
            .observe(hook.as_str(), seconds, verdict.is_err());
        match verdict {
            Ok(Verdict::Allow(answer)) => Ok(Some(answer)),
            Ok(Verdict::Refuse(err)) => Err(err),
            Err(why) => {
                tracing::warn!(hook = hook.as_str(), url, error = %why, "backend hook failed: refused");
                Err(ProtocolError::new(
                    ErrorCode::Unavailable,
                    format!("the {} hook did not answer; try again later", hook.as_str()),
                ))
            }
        }
    }

    /// The join hook: `Ok` when there is none or it allows `channel` (of
    /// `user`) into `group`.
    pub(super) async fn join_hook(
        &self,
        channel: Uuid,
        user: Option<&str>,
        group: &GroupName,
    ) -> Result<(), ProtocolError> {
        let mut body = json!({"channel_id": channel, "group": group.as_str()});
        if let Some(user) = user {
            body["user"] = json!(user);
        }
        self.call_hook(Hook::Join, body).await.map(drop)
    }

    /// The publish hook: the data to publish, the hook's replacement when it
    /// gives one, else `data` itself.
    pub(super) async fn publish_hook(
        &self,
        channel: Option<Uuid>,
        user: Option<&str>,
        group: &GroupName,
        data: Value,
    ) -> Result<Value, ProtocolError> {
        if self.inner.hooks.get().and_then(|h| h.url(Hook::Publish)).is_none() {
            return Ok(data);
        }
        let mut body = json!({"group": group.as_str(), "data": data});
        if let Some(channel) = channel {
            body["channel_id"] = json!(channel);
        }
        if let Some(user) = user {
            body["user"] = json!(user);
        }
        let answer = self.call_hook(Hook::Publish, body.clone()).await?;
        Ok(match answer.and_then(|mut a| a.remove("data")) {
            Some(replaced) => replaced,
            None => body["data"].take(),
        })
    }
}

/// A hook's refusal as an HTTP answer, with the status its code implies.
pub(super) fn hook_answer(err: &ProtocolError) -> HttpAnswer {
    let status = match err.code {
        ErrorCode::Forbidden => 403,
        ErrorCode::Unavailable => 503,
        ErrorCode::NotFound => 404,
        ErrorCode::TooLarge => 413,
        ErrorCode::RateLimited => 429,
        ErrorCode::BadRequest | ErrorCode::InvalidGroup => 400,
    };
    HttpAnswer::error(status, err.code.as_str(), err.message.clone())
}
