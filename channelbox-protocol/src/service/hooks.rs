//! The service's side of the backend hooks (docs/protocol.md "Backend
//! hooks"): the connect hook before an upgrade is answered, the join hook
//! before a `join` subscribes, the publish hook before a publish takes its
//! offset (WebSocket, and HTTP with a user token). Each call is counted in
//! the hook metrics; a hook that fails fails closed.
//!
//! A connection awaits its hooks in the order of its requests (its session
//! handles one frame at a time), so its publishes keep their send order; the
//! wait is that connection's own, so a slow hook stalls no other connection.

use std::time::Instant;

use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::{Admission, ChatService, HttpAnswer};
use crate::auth::{Permissions, User};
use crate::fields::GroupName;
use crate::frames::{ErrorCode, ProtocolError};
use crate::hooks::{Hook, Hooks, Verdict};

/// What an upgrade request shows the connect hook, besides its group: the
/// query and the headers docs/protocol.md names. A transport fills in what the
/// request has.
#[derive(Clone, Copy, Debug, Default)]
pub struct UpgradeRequest<'a> {
    /// The query string, undecoded (`token` is left out of the hook's copy).
    pub query: Option<&'a str>,
    /// `Origin`.
    pub origin: Option<&'a str>,
    /// `User-Agent`.
    pub user_agent: Option<&'a str>,
    /// `Cookie`.
    pub cookie: Option<&'a str>,
    /// `Authorization`.
    pub authorization: Option<&'a str>,
}

impl UpgradeRequest<'_> {
    /// `{"query":{…},"headers":{…}}` of the hook's request.
    fn describe(&self) -> (Map<String, Value>, Map<String, Value>) {
        let query = self
            .query
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .map(|(k, v)| (decode(k), Value::String(decode(v))))
            .filter(|(k, _)| k != "token")
            .collect();
        let headers = [
            ("origin", self.origin),
            ("user-agent", self.user_agent),
            ("cookie", self.cookie),
            ("authorization", self.authorization),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name.to_owned(), Value::String(value?.to_owned()))))
        .collect();
        (query, headers)
    }
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

impl ChatService {
    /// Whether a connect hook is configured: a transport that cannot wait
    /// for it before answering an upgrade must refuse upgrades then.
    pub fn has_connect_hook(&self) -> bool {
        self.inner.hooks.get().and_then(|h| h.url(Hook::Connect)).is_some()
    }

    /// Asks the connect hook, when there is one, about an admitted upgrade
    /// (after [`ChatService::admit_from`], before the upgrade is answered):
    /// the admission with the hook's user, groups and data, or the refusal
    /// to answer instead of the upgrade (403 with the hook's code, or 503
    /// when the hook failed).
    pub async fn connect_hook(
        &self,
        admission: Admission,
        request: UpgradeRequest<'_>,
    ) -> Result<Admission, HttpAnswer> {
        if !self.has_connect_hook() {
            return Ok(admission);
        }
        let mut admitted = admission.0;
        let (query, headers) = request.describe();
        let mut body = json!({
            "channel_id": admitted.id,
            "group": admitted.group.as_str(),
            "query": query,
            "headers": headers,
        });
        if let Some(user) = &admitted.user {
            body["user"] = json!(user.id);
        }
        if let Some(peer) = admitted.peer {
            body["remote_addr"] = json!(peer.to_string());
        }
        let mut answer = match self.call_hook(Hook::Connect, body).await {
            Ok(answer) => answer.unwrap_or_default(),
            Err(e) if e.code == ErrorCode::Unavailable => return Err(hook_answer(&e)),
            Err(e) => return Err(HttpAnswer::error(403, e.code.as_str(), e.message)),
        };
        if let Some(Value::String(user)) = answer.remove("user") {
            let permissions = admitted
                .user
                .take()
                .map_or_else(|| Permissions::new(vec!["*".to_owned()]), |u| u.permissions);
            admitted.user = Some(User { id: user, permissions });
        }
        admitted.hook_groups = hook_groups(answer.remove("groups"))?;
        admitted.hook_data = answer.remove("data");
        Ok(Admission(admitted))
    }

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
        let Some(url) = self.hook_url(hooks, hook, body["group"].as_str()) else {
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
                let channel = body["channel_id"].as_str();
                tracing::warn!(hook = hook.as_str(), url, channel, error = %why, "backend hook failed: refused");
                Err(ProtocolError::new(
                    ErrorCode::Unavailable,
                    format!("the {} hook did not answer; try again later", hook.as_str()),
                ))
            }
        }
    }

    /// The URL of `hook` for `group`: its namespace's when it sets one (`""`
    /// turns the hook off there), else the server's.
    fn hook_url<'a>(&'a self, hooks: &'a Hooks, hook: Hook, group: Option<&str>) -> Option<&'a str> {
        let namespace = group.map(|g| self.namespace(g));
        let own = match hook {
            Hook::Join => namespace.and_then(|n| n.join_hook.as_deref()),
            Hook::Publish => namespace.and_then(|n| n.publish_hook.as_deref()),
            Hook::Connect => None,
        };
        match own {
            Some("") => None,
            Some(url) => Some(url),
            None => hooks.url(hook),
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
        let configured = self.inner.hooks.get();
        if configured
            .and_then(|h| self.hook_url(h, Hook::Publish, Some(group.as_str())))
            .is_none()
        {
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

/// The connect hook's `groups`: valid group names, or the hook failed.
fn hook_groups(groups: Option<Value>) -> Result<Vec<GroupName>, HttpAnswer> {
    let failed = |why: &str| {
        tracing::warn!(hook = "connect", error = why, "backend hook failed: refused");
        HttpAnswer::error(503, "unavailable", "the connect hook did not answer; try again later")
    };
    match groups {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(names)) => names
            .iter()
            .map(|n| n.as_str().and_then(|n| GroupName::parse(n).ok()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| failed("`groups` holds a name that is no valid group")),
        Some(_) => Err(failed("`groups` is not an array")),
    }
}
