//! [`HttpAnswer`]: what the HTTP API, the upgrade refusals and the site's
//! fixed answers (health, metrics, 404, 405) send, written once so that every
//! adapter sends the same status, content type and body.

use serde_json::{json, Value};

use super::ChatService;
use crate::frames::ProtocolError;

/// The content type of JSON answers.
const JSON: &str = "application/json";
/// The content type of `GET /healthz`'s 200.
const PLAIN_TEXT: &str = "text/plain";
/// The content type of the Prometheus text exposition (`GET /metrics`).
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An HTTP answer: status, content type and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// The `Content-Type` header's value.
    pub content_type: &'static str,
    /// The body (JSON unless `content_type` says otherwise).
    pub body: String,
}

impl HttpAnswer {
    /// A 200 with this JSON body.
    pub fn ok(body: Value) -> Self {
        HttpAnswer::json(200, body.to_string())
    }

    /// An answer whose body is JSON text already.
    pub fn json(status: u16, body: String) -> Self {
        HttpAnswer {
            status,
            content_type: JSON,
            body,
        }
    }

    /// An error answer `{"code","message"}`.
    pub fn error(status: u16, code: &str, message: impl Into<String>) -> Self {
        HttpAnswer::json(status, json!({"code": code, "message": message.into()}).to_string())
    }

    /// The answer for a protocol error, with `status`.
    pub(super) fn refusal(status: u16, err: &ProtocolError) -> Self {
        HttpAnswer::error(status, err.code.as_str(), err.message.clone())
    }

    /// 404 `not_found`: a path no route serves.
    pub fn not_found() -> Self {
        HttpAnswer::error(404, "not_found", "no such endpoint")
    }

    /// 405 `method_not_allowed`: a served path asked with another method.
    pub fn method_not_allowed() -> Self {
        HttpAnswer::error(405, "method_not_allowed", "this endpoint does not take that method")
    }
}

impl ChatService {
    /// `GET /healthz`: 200 `ok` in plain text, or 503 `unavailable` while the
    /// history store refuses writes.
    pub fn health(&self) -> HttpAnswer {
        if self.inner.channels.store().healthy() {
            HttpAnswer {
                status: 200,
                content_type: PLAIN_TEXT,
                body: "ok".to_owned(),
            }
        } else {
            HttpAnswer::error(503, "unavailable", "the history store is failing")
        }
    }

    /// `GET /metrics`: the Prometheus text exposition.
    pub async fn metrics(&self) -> HttpAnswer {
        HttpAnswer {
            status: 200,
            content_type: PROMETHEUS_TEXT,
            body: self.metrics_text().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_answers_carry_their_content_types() {
        let missing = HttpAnswer::not_found();
        assert_eq!((missing.status, missing.content_type), (404, JSON));
        assert_eq!(missing.body, r#"{"code":"not_found","message":"no such endpoint"}"#);
        let method = HttpAnswer::method_not_allowed();
        assert_eq!((method.status, method.content_type), (405, JSON));
        assert_eq!(
            method.body,
            r#"{"code":"method_not_allowed","message":"this endpoint does not take that method"}"#
        );
    }
}
