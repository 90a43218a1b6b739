//! Namespaces (docs/protocol.md "Configuration file and namespaces"): groups
//! named `NAME:…` follow the options of namespace `NAME` when it is
//! configured; other groups follow the defaults.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who may publish to a namespace's groups over WebSocket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishRule {
    /// Members of the group (the default).
    #[default]
    Members,
    /// Nobody over WebSocket: only HTTP publishes (the backend).
    Backend,
    /// Any connected channel, member or not.
    Anyone,
}

/// The options of one namespace. Unknown options are refused when read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Namespace {
    /// Messages are saved (offsets, history, recovery); false: never saved.
    pub history: bool,
    /// `presence` is answered; false: `forbidden`.
    pub presence: bool,
    /// Member events may be asked for; false: `forbidden` (403 on the URL).
    pub events: bool,
    /// Who may publish over WebSocket.
    pub publish: PublishRule,
    /// Replaces the server's join hook for the namespace; `""` turns it off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join_hook: Option<String>,
    /// Replaces the server's publish hook for the namespace; `""` turns it off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_hook: Option<String>,
}

impl Default for Namespace {
    fn default() -> Self {
        Namespace {
            history: true,
            presence: true,
            events: true,
            publish: PublishRule::Members,
            join_hook: None,
            publish_hook: None,
        }
    }
}

/// The configured namespaces, by name.
#[derive(Clone, Debug, Default)]
pub struct Namespaces {
    named: BTreeMap<String, Namespace>,
    defaults: Namespace,
}

impl Namespaces {
    /// These namespaces; groups outside them get the defaults.
    pub fn new(named: BTreeMap<String, Namespace>) -> Self {
        Namespaces {
            named,
            defaults: Namespace::default(),
        }
    }

    /// The options in effect for `group`: its namespace's (the part before
    /// the first `:`), or the defaults.
    pub fn of(&self, group: &str) -> &Namespace {
        group
            .split_once(':')
            .and_then(|(name, _)| self.named.get(name))
            .unwrap_or(&self.defaults)
    }

    /// `GET /api/namespaces`: every namespace with every option in effect.
    pub fn describe(&self) -> Value {
        let all: serde_json::Map<String, Value> = self
            .named
            .iter()
            .map(|(name, ns)| (name.clone(), serde_json::to_value(ns).unwrap_or(Value::Null)))
            .collect();
        Value::Object(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_follows_the_namespace_before_its_first_colon() {
        let quiet = Namespace {
            history: false,
            ..Namespace::default()
        };
        let namespaces = Namespaces::new(BTreeMap::from([("quiet".to_owned(), quiet.clone())]));
        assert_eq!(namespaces.of("quiet:room:1"), &quiet);
        assert_eq!(namespaces.of("quiet"), &Namespace::default(), "no colon, no namespace");
        assert_eq!(namespaces.of("other:room"), &Namespace::default());
    }

    #[test]
    fn unknown_options_are_refused() {
        let err = serde_json::from_str::<Namespace>(r#"{"histroy": false}"#).expect_err("unknown option");
        assert!(err.to_string().contains("histroy"), "{err}");
    }
}
