//! The service's namespaces: set once before serving, looked up by group at
//! every entry point (upgrade, requests, HTTP), and listed by
//! `GET /api/namespaces`.

use serde_json::Value;

use super::{ChatService, HttpAnswer};
use crate::frames::{ErrorCode, ProtocolError};
use crate::namespaces::{Namespace, Namespaces};

/// The options of groups when no namespace is configured.
static DEFAULTS: std::sync::LazyLock<Namespace> = std::sync::LazyLock::new(Namespace::default);

impl ChatService {
    /// Sets the namespaces, once, before serving; `false` (and nothing
    /// changed) when they were set already. Their history limits are the
    /// store's to apply: build its `HistoryLimits` with
    /// [`Namespaces::with_history_limits`]; those the store does not apply
    /// are logged as a warning.
    pub fn set_namespaces(&self, namespaces: Namespaces) -> bool {
        let unapplied = namespaces.unapplied_history_limits(self.inner.channels.store().limits());
        if !unapplied.is_empty() {
            tracing::warn!(
                namespaces = ?unapplied,
                "the store does not apply these namespaces' history limits \
                 (build its limits with Namespaces::with_history_limits)"
            );
        }
        self.inner.namespaces.set(namespaces).is_ok()
    }

    /// The options in effect for `group`.
    pub fn namespace(&self, group: &str) -> &Namespace {
        match self.inner.namespaces.get() {
            Some(namespaces) => namespaces.of(group),
            None => &DEFAULTS,
        }
    }

    /// `forbidden`, naming the namespace option that refuses.
    pub(super) fn namespace_forbids(group: &str, what: &str) -> ProtocolError {
        ProtocolError::new(ErrorCode::Forbidden, format!("{what} is off for group {group:?}"))
    }

    /// `GET /api/namespaces` (admin token): every namespace with every
    /// option in effect, its history limits as the store applies them.
    pub fn api_namespaces(&self, authorization: Option<&str>) -> HttpAnswer {
        if let Err(e) = self.admin(authorization) {
            return e;
        }
        let limits = self.inner.channels.store().limits();
        let described = match self.inner.namespaces.get() {
            Some(namespaces) => namespaces.describe(limits),
            None => Value::Object(Default::default()),
        };
        HttpAnswer::ok(described)
    }
}
