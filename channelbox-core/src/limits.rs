//! History limits: per group, with overrides per namespace, and for the
//! whole store; and the one trimming rule every store applies.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::ConfigError;

/// The environment variable Nexios reads for the per-group history size.
pub const HISTORY_SIZE_ENV: &str = "CHANNEL_BOX_HISTORY_SIZE";

/// The default per-group history budget: 1 MiB of payload, as in Nexios.
pub const DEFAULT_HISTORY_BYTES: u64 = 1 << 20;

/// The default budget of a whole store: 256 MiB, counted as each store's
/// [`HistoryStore::message_cost`](crate::HistoryStore::message_cost) over all groups.
pub const DEFAULT_TOTAL_BYTES: u64 = 256 << 20;

/// The namespace of a group: the part of its name before the first `:`
/// (`chat` for `chat:room:1`); `None` for a name without `:`.
pub fn namespace_of(group: &str) -> Option<&str> {
    group.split_once(':').map(|(name, _)| name)
}

/// The limits of one group's history. The oldest messages are trimmed first,
/// and the newest message always survives a trim by bytes or count, even
/// alone above the byte budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLimits {
    /// Most payload bytes kept.
    pub max_bytes: u64,
    /// Most messages kept; `None` is unbounded.
    pub max_messages: Option<u64>,
    /// Longest a message is kept, judged by its timestamp (this limit removes
    /// the newest message too once it is old enough); `None` is forever.
    pub max_age: Option<Duration>,
}

impl GroupLimits {
    /// The oldest timestamp (ms) a message may have at `now_ms` and still be kept.
    /// An age longer than `u64::MAX` milliseconds keeps every message: it
    /// saturates rather than wrapping to a short age.
    pub fn oldest_allowed(&self, now_ms: u64) -> Option<u64> {
        self.max_age.map(|age| {
            let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
            now_ms.saturating_sub(age_ms)
        })
    }
}

/// History limits: per group (the top-level ones, replaced for the groups of
/// a namespace by that namespace's), and for the whole store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Most payload bytes kept per group.
    pub max_bytes: u64,
    /// Most messages kept per group.
    pub max_messages: Option<u64>,
    /// Longest a message is kept, judged by its timestamp (this limit removes the
    /// newest message too once it is old enough).
    pub max_age: Option<Duration>,
    /// Most bytes all groups together may cost, each message counted as its
    /// store's [`HistoryStore::message_cost`](crate::HistoryStore::message_cost);
    /// above it the groups written least recently are trimmed first (see
    /// [`crate::TotalBudget`]). `None` is unbounded. One budget for the whole
    /// store, whatever the namespaces.
    pub max_total_bytes: Option<u64>,
    /// The limits of the groups of a namespace ([`namespace_of`]), by
    /// namespace name: they replace the three per-group limits above for
    /// those groups. Every store looks them up with
    /// [`HistoryLimits::limits_for`].
    pub namespaces: BTreeMap<String, GroupLimits>,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            max_bytes: DEFAULT_HISTORY_BYTES,
            max_messages: None,
            max_age: None,
            max_total_bytes: Some(DEFAULT_TOTAL_BYTES),
            namespaces: BTreeMap::new(),
        }
    }
}

impl HistoryLimits {
    /// The default limits with `max_bytes` from `CHANNEL_BOX_HISTORY_SIZE` when set.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut limits = HistoryLimits::default();
        if let Ok(value) = std::env::var(HISTORY_SIZE_ENV) {
            limits.max_bytes = value.trim().parse().map_err(|_| ConfigError::InvalidValue {
                name: HISTORY_SIZE_ENV.into(),
                value,
                expected: "a number of bytes",
            })?;
        }
        Ok(limits)
    }

    /// These limits with `limits` for the groups of namespace `name`.
    pub fn with_namespace(mut self, name: impl Into<String>, limits: GroupLimits) -> Self {
        self.namespaces.insert(name.into(), limits);
        self
    }

    /// The per-group limits of groups outside every configured namespace.
    pub fn group_defaults(&self) -> GroupLimits {
        GroupLimits {
            max_bytes: self.max_bytes,
            max_messages: self.max_messages,
            max_age: self.max_age,
        }
    }

    /// The limits of `group`: its namespace's when that namespace has limits
    /// of its own, else [`HistoryLimits::group_defaults`]. Stores call this
    /// whenever they append to, trim or expire a group.
    pub fn limits_for(&self, group: &str) -> GroupLimits {
        if self.namespaces.is_empty() {
            return self.group_defaults();
        }
        namespace_of(group).map_or_else(|| self.group_defaults(), |name| self.of_namespace(name))
    }

    /// The limits of the groups of namespace `name`: its own, or
    /// [`HistoryLimits::group_defaults`] when it has none.
    pub fn of_namespace(&self, name: &str) -> GroupLimits {
        self.namespaces
            .get(name)
            .copied()
            .unwrap_or_else(|| self.group_defaults())
    }
}

/// Applies a group's [`GroupLimits`] to a run of retained message sizes and
/// timestamps, oldest first: returns how many of the oldest must go. Shared
/// by stores so the trimming rule is written once.
pub fn messages_to_trim(
    limits: &GroupLimits,
    now_ms: u64,
    count: u64,
    bytes: u64,
    mut oldest: impl FnMut(u64) -> (u64, u64),
) -> u64 {
    let oldest_allowed = limits.oldest_allowed(now_ms);
    let mut trim = 0;
    let mut bytes = bytes;
    while trim < count {
        let (size, ts) = oldest(trim);
        // Age applies to every message; bytes and count never remove the newest.
        let too_old = oldest_allowed.is_some_and(|t| ts < t);
        let newest = trim + 1 == count;
        let over_bytes = bytes > limits.max_bytes;
        let over_count = limits.max_messages.is_some_and(|m| count - trim > m);
        if !(too_old || (!newest && (over_bytes || over_count))) {
            break;
        }
        bytes -= size;
        trim += 1;
    }
    trim
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_gets_its_namespaces_limits_or_the_defaults() {
        let short = GroupLimits {
            max_bytes: 10,
            max_messages: Some(2),
            max_age: Some(Duration::from_secs(5)),
        };
        let limits = HistoryLimits::default().with_namespace("short", short);
        assert_eq!(limits.limits_for("short:x"), short);
        assert_eq!(limits.limits_for("short:x:y"), short, "the part before the first colon");
        assert_eq!(
            limits.limits_for("short"),
            limits.group_defaults(),
            "no colon, no namespace"
        );
        assert_eq!(limits.limits_for("long:x"), limits.group_defaults());
        assert_eq!(limits.limits_for("x:short:y"), limits.group_defaults());
        assert_eq!(limits.group_defaults().max_bytes, DEFAULT_HISTORY_BYTES);
    }

    #[test]
    fn an_age_beyond_u64_milliseconds_keeps_everything() {
        // 18446744073709552 s is 2^64 ms plus 384: cast to u64 it was 384 ms.
        let huge = GroupLimits {
            max_bytes: 100,
            max_messages: None,
            max_age: Some(Duration::from_secs(u64::MAX / 1000 + 1)),
        };
        let now = 1_700_000_000_000;
        assert_eq!(huge.oldest_allowed(now), Some(0));
        assert_eq!(messages_to_trim(&huge, now, 1, 1, |_| (1, now - 1_000)), 0);
        let max = GroupLimits {
            max_age: Some(Duration::MAX),
            ..huge
        };
        assert_eq!(max.oldest_allowed(now), Some(0));
    }

    #[test]
    fn the_newest_survives_bytes_and_count_but_not_age() {
        let limits = GroupLimits {
            max_bytes: 5,
            max_messages: Some(1),
            max_age: Some(Duration::from_secs(1)),
        };
        let sizes = [(4, 10_000), (4, 10_000), (9, 10_000)];
        assert_eq!(messages_to_trim(&limits, 10_000, 3, 17, |i| sizes[i as usize]), 2);
        assert_eq!(messages_to_trim(&limits, 20_000, 3, 17, |i| sizes[i as usize]), 3);
    }
}
