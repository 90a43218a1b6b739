//! Namespaces (docs/protocol.md "Configuration file and namespaces"): groups
//! named `NAME:…` follow the options of namespace `NAME` when it is
//! configured; other groups follow the defaults.
//!
//! The history limits of a namespace (`history_bytes`, `history_messages`,
//! `history_ttl`) are applied by the store, which gets them as
//! [`channelbox_core::HistoryLimits::namespaces`] (see
//! [`Namespace::history_limits`]); `GET /api/namespaces` shows the limits the
//! store applies.

use std::collections::BTreeMap;
use std::time::Duration;

use channelbox_core::{GroupLimits, HistoryLimits};
use serde::{Deserialize, Deserializer, Serialize};
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

/// A whole number of at least 1 (`history_bytes`, `history_messages`).
fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match u64::deserialize(d)? {
        0 => Err(serde::de::Error::custom("must be at least 1")),
        n => Ok(Some(n)),
    }
}

/// A positive, finite number of seconds (`history_ttl`).
fn positive_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let seconds = f64::deserialize(d)?;
    if seconds > 0.0 && Duration::try_from_secs_f64(seconds).is_ok() {
        Ok(Some(seconds))
    } else {
        Err(serde::de::Error::custom(format!(
            "{seconds} is not a positive number of seconds"
        )))
    }
}

/// The options of one namespace. Unknown options, and values of the wrong
/// type or out of range, are refused when read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Namespace {
    /// Messages are saved (offsets, history, recovery); false: never saved.
    pub history: bool,
    /// Per-group history limit in payload bytes for the namespace's groups;
    /// `None`: the server's (`--history-bytes`).
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "at_least_one")]
    pub history_bytes: Option<u64>,
    /// Per-group history limit in messages; `None`: the server's
    /// (`--history-messages`, unlimited by default).
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "at_least_one")]
    pub history_messages: Option<u64>,
    /// Seconds a saved message is kept; `None`: the server's
    /// (`--history-ttl`, forever by default).
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "positive_seconds")]
    pub history_ttl: Option<f64>,
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
            history_bytes: None,
            history_messages: None,
            history_ttl: None,
            presence: true,
            events: true,
            publish: PublishRule::Members,
            join_hook: None,
            publish_hook: None,
        }
    }
}

impl Namespace {
    /// Whether the namespace sets a history limit of its own.
    pub fn has_history_limits(&self) -> bool {
        self.history_bytes.is_some() || self.history_messages.is_some() || self.history_ttl.is_some()
    }

    /// The history limits of the namespace's groups: its own where it sets
    /// them, else `top`'s (the server's per-group limits). A `history_ttl`
    /// set in code beyond what reading allows never panics: more seconds
    /// than a `Duration` holds keep messages forever, zero, negative or NaN
    /// keep none.
    pub fn history_limits(&self, top: &GroupLimits) -> GroupLimits {
        let ttl = |seconds: f64| {
            Duration::try_from_secs_f64(seconds).unwrap_or(if seconds > 0.0 { Duration::MAX } else { Duration::ZERO })
        };
        GroupLimits {
            max_bytes: self.history_bytes.unwrap_or(top.max_bytes),
            max_messages: self.history_messages.or(top.max_messages),
            max_age: self.history_ttl.map(ttl).or(top.max_age),
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
        channelbox_core::namespace_of(group)
            .and_then(|name| self.named.get(name))
            .unwrap_or(&self.defaults)
    }

    /// The configured namespaces, by name.
    pub fn named(&self) -> &BTreeMap<String, Namespace> {
        &self.named
    }

    /// `limits` with the history limits of every namespace that sets any,
    /// for the store to apply.
    pub fn with_history_limits(&self, limits: HistoryLimits) -> HistoryLimits {
        let top = limits.group_defaults();
        self.named
            .iter()
            .filter(|(_, ns)| ns.has_history_limits())
            .fold(limits, |limits, (name, ns)| {
                limits.with_namespace(name.clone(), ns.history_limits(&top))
            })
    }

    /// The namespaces with history limits of their own that `limits` (a
    /// store's) does not apply: a store built without
    /// [`Namespaces::with_history_limits`] ignores them.
    pub fn unapplied_history_limits(&self, limits: &HistoryLimits) -> Vec<&str> {
        let top = limits.group_defaults();
        self.named
            .iter()
            .filter(|(name, ns)| ns.has_history_limits() && limits.of_namespace(name) != ns.history_limits(&top))
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// `GET /api/namespaces`: every namespace with every option in effect,
    /// the history limits as the store applies them (`limits`):
    /// `history_messages` and `history_ttl` are `null` when unlimited.
    pub fn describe(&self, limits: &HistoryLimits) -> Value {
        let all: serde_json::Map<String, Value> = self
            .named
            .iter()
            .map(|(name, ns)| {
                let mut options = serde_json::to_value(ns).unwrap_or(Value::Null);
                if let Value::Object(options) = &mut options {
                    let applied = limits.of_namespace(name);
                    options.insert("history_bytes".into(), applied.max_bytes.into());
                    options.insert("history_messages".into(), applied.max_messages.into());
                    let ttl = applied.max_age.map(|age| age.as_secs_f64());
                    options.insert("history_ttl".into(), ttl.into());
                }
                (name.clone(), options)
            })
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
    fn history_limits_are_the_namespaces_or_the_servers() {
        let read = |json: &str| serde_json::from_str::<Namespace>(json).expect("valid");
        let short = read(r#"{"history_messages": 2, "history_ttl": 1.5}"#);
        let top = HistoryLimits {
            max_bytes: 500,
            max_messages: Some(9),
            ..HistoryLimits::default()
        };
        let namespaces = Namespaces::new(BTreeMap::from([
            ("short".to_owned(), short),
            ("plain".to_owned(), Namespace::default()),
        ]));
        let limits = namespaces.with_history_limits(top.clone());
        let applied = limits.limits_for("short:x");
        assert_eq!(applied.max_bytes, 500, "unset: the server's");
        assert_eq!(applied.max_messages, Some(2));
        assert_eq!(applied.max_age, Some(Duration::from_millis(1500)));
        assert_eq!(limits.limits_for("plain:x"), top.group_defaults());
        assert!(!limits.namespaces.contains_key("plain"), "no limits of its own");
        assert!(namespaces.unapplied_history_limits(&limits).is_empty());
        assert_eq!(
            namespaces.unapplied_history_limits(&top),
            ["short"],
            "a store without them"
        );
        let described = namespaces.describe(&limits);
        assert_eq!(described["short"]["history_messages"], 2);
        assert_eq!(described["short"]["history_bytes"], 500);
        assert_eq!(described["short"]["history_ttl"], 1.5);
        assert_eq!(described["plain"]["history_messages"], 9);
        assert_eq!(described["plain"]["history_ttl"], Value::Null, "unlimited");
    }

    #[test]
    fn a_ttl_set_in_code_out_of_range_does_not_panic() {
        let top = HistoryLimits::default().group_defaults();
        let age = |ttl: f64| {
            let ns = Namespace {
                history_ttl: Some(ttl),
                ..Namespace::default()
            };
            ns.history_limits(&top).max_age
        };
        assert_eq!(age(1e300), Some(Duration::MAX), "too long: forever");
        assert_eq!(age(f64::INFINITY), Some(Duration::MAX));
        assert_eq!(age(-1.0), Some(Duration::ZERO), "negative: none kept");
        assert_eq!(age(f64::NAN), Some(Duration::ZERO));
        assert_eq!(age(2.5), Some(Duration::from_millis(2500)));
    }

    #[test]
    fn bad_history_limits_are_refused() {
        for (json, says) in [
            (r#"{"history_messages": 0}"#, "at least 1"),
            (r#"{"history_bytes": 0}"#, "at least 1"),
            (r#"{"history_messages": -3}"#, "invalid value"),
            (r#"{"history_messages": "two"}"#, "invalid type"),
            (r#"{"history_ttl": 0}"#, "positive"),
            (r#"{"history_ttl": -1.5}"#, "positive"),
            (r#"{"history_ttl": 1e300}"#, "positive"),
        ] {
            let err = serde_json::from_str::<Namespace>(json).expect_err(json);
            assert!(err.to_string().contains(says), "{json}: {err}");
        }
    }

    #[test]
    fn unknown_options_are_refused() {
        let err = serde_json::from_str::<Namespace>(r#"{"histroy": false}"#).expect_err("unknown option");
        assert!(err.to_string().contains("histroy"), "{err}");
    }
}
