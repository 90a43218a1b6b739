//! Backend hooks (docs/protocol.md "Backend hooks"): the application's
//! backend decides whether a connection may join a group or publish, and may
//! replace what is published. The service POSTs JSON to a URL and waits at
//! most the hook timeout; anything but a 200 with `{"allow":…}` in time fails
//! closed (`unavailable`). How the request travels is a [`HookTransport`], so
//! that this crate names no HTTP client; channelbox-server gives it one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::frames::{ErrorCode, ProtocolError};

/// How long a hook may take when no timeout is configured (`--hook-timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a transport's POST came back with: the status and the body, or why
/// there was no answer (refused connection, broken stream).
pub type HookFuture<'a> = Pin<Box<dyn Future<Output = Result<(u16, Vec<u8>), String>> + Send + 'a>>;

/// Sends one hook request: `POST url` with a JSON body. The service bounds
/// the call by the hook timeout itself; a transport should reuse connections.
pub trait HookTransport: Send + Sync + std::fmt::Debug {
    /// POSTs `body` (JSON) to `url`.
    fn post<'a>(&'a self, url: &'a str, body: Vec<u8>) -> HookFuture<'a>;
}

/// The hooks of docs/protocol.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Before a WebSocket upgrade is answered.
    Connect,
    /// Before a `join` request is answered.
    Join,
    /// Before a publish is accepted.
    Publish,
}

impl Hook {
    /// The hook's name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Join => "join",
            Hook::Publish => "publish",
        }
    }
}

/// The hooks a server calls: their URLs, the transport and the timeout.
#[derive(Clone, Debug)]
pub struct Hooks {
    transport: Arc<dyn HookTransport>,
    /// `--connect-hook`.
    pub connect: Option<String>,
    /// `--join-hook`.
    pub join: Option<String>,
    /// `--publish-hook`.
    pub publish: Option<String>,
    /// `--hook-timeout`: how long a hook may take before it fails closed.
    pub timeout: Duration,
}

impl Hooks {
    /// No hook yet, over `transport`, with [`DEFAULT_TIMEOUT`].
    pub fn new(transport: Arc<dyn HookTransport>) -> Self {
        Hooks {
            transport,
            connect: None,
            join: None,
            publish: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The URL of `hook`, when it is configured.
    pub fn url(&self, hook: Hook) -> Option<&str> {
        match hook {
            Hook::Connect => self.connect.as_deref(),
            Hook::Join => self.join.as_deref(),
            Hook::Publish => self.publish.as_deref(),
        }
    }

    /// POSTs `body` to `url` and reads the verdict; every failure (no answer
    /// in time, a status but 200, a body without `allow`) is an `Err` naming
    /// what went wrong, for the log: the caller fails closed.
    pub(crate) async fn ask(&self, url: &str, body: &Value) -> Result<Verdict, String> {
        let sent = self.transport.post(url, body.to_string().into_bytes());
        let (status, answer) = match tokio::time::timeout(self.timeout, sent).await {
            Err(_) => return Err(format!("no answer within {:?}", self.timeout)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(answer)) => answer,
        };
        if status != 200 {
            return Err(format!("answered HTTP {status}"));
        }
        let answer: Map<String, Value> =
            serde_json::from_slice(&answer).map_err(|e| format!("the answer is no JSON object: {e}"))?;
        match answer.get("allow") {
            Some(Value::Bool(true)) => Ok(Verdict::Allow(answer)),
            Some(Value::Bool(false)) => Ok(Verdict::Refuse(refusal(&answer))),
            _ => Err("the answer has no boolean `allow`".to_owned()),
        }
    }
}

/// A hook's answer.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// `{"allow":true,…}`, with the rest of the answer (`data`, `user`, …).
    Allow(Map<String, Value>),
    /// `{"allow":false,"code"?,"message"?}`, as the error to answer.
    Refuse(ProtocolError),
}

/// The error of a refusal: the hook's code when it is one of the protocol's,
/// `forbidden` otherwise, and its message.
fn refusal(answer: &Map<String, Value>) -> ProtocolError {
    let code = answer
        .get("code")
        .and_then(Value::as_str)
        .and_then(ErrorCode::parse)
        .unwrap_or(ErrorCode::Forbidden);
    let message = answer
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("refused by the backend");
    ProtocolError::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn refusals_keep_known_codes_and_default_to_forbidden() {
        let known = refusal(&map(
            json!({"allow": false, "code": "rate_limited", "message": "slow down"}),
        ));
        assert_eq!(
            (known.code, known.message.as_str()),
            (ErrorCode::RateLimited, "slow down")
        );
        let unknown = refusal(&map(json!({"allow": false, "code": "nope"})));
        assert_eq!(unknown.code, ErrorCode::Forbidden);
    }
}
