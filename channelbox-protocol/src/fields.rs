//! Validated values that every entry point of the protocol shares — WebSocket
//! frames, the upgrade URL's query and the HTTP API — so each rule is written
//! once: group names ([`GroupName`]), history page sizes ([`Limit`]), replay
//! counts ([`ReplayCount`]), `since` offsets, and the JSON nesting bound.
//!
//! A value that has the wrong JSON type fails in serde (`bad_request`); a
//! string that breaks the group-name rules fails here with `invalid_group`.

use std::fmt;

use percent_encoding::percent_decode_str;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use crate::config::{DEFAULT_HISTORY_LIMIT, MAX_GROUP_BYTES, MAX_HISTORY_LIMIT, MAX_JSON_DEPTH};
use crate::frames::{ErrorCode, ProtocolError};

/// A valid group name: 1 to 128 bytes of UTF-8, no control characters, no
/// whitespace (Unicode's definitions).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupName(String);

impl GroupName {
    /// Checks a name; `invalid_group` when it breaks the rules.
    pub fn parse(name: &str) -> Result<Self, ProtocolError> {
        if valid_group(name) {
            Ok(GroupName(name.to_owned()))
        } else {
            Err(ProtocolError::new(
                ErrorCode::InvalidGroup,
                format!("{name:?} is not a valid group name: 1 to 128 bytes, no whitespace or control characters"),
            ))
        }
    }

    /// Percent-decodes a URL path segment into a group name; `invalid_group`
    /// for a malformed escape, bytes that are not UTF-8, or a name that breaks
    /// the rules.
    pub fn from_path_segment(segment: &str) -> Result<Self, ProtocolError> {
        decode_group(segment).map(GroupName).ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::InvalidGroup,
                format!("{segment:?} is not a valid group name"),
            )
        })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for GroupName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// How many messages one history read returns: at least 1; above 1000 is
/// treated as 1000; 100 when not given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit(usize);

impl Default for Limit {
    fn default() -> Self {
        Limit(DEFAULT_HISTORY_LIMIT)
    }
}

impl Limit {
    /// A limit from a number; `None` for 0.
    pub fn new(n: u64) -> Option<Self> {
        (n >= 1).then(|| Limit(usize::try_from(n).unwrap_or(usize::MAX).min(MAX_HISTORY_LIMIT)))
    }

    /// A limit from a query parameter's text.
    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        text.parse::<u64>()
            .ok()
            .and_then(Limit::new)
            .ok_or_else(|| bad_request(format!("limit={text:?} is not a positive integer")))
    }

    /// The number of messages.
    pub fn get(self) -> usize {
        self.0
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d).map_err(|_| D::Error::custom("\"limit\" must be a positive integer"))?;
        Limit::new(n).ok_or_else(|| D::Error::custom("\"limit\" must be a positive integer"))
    }
}

/// A `since` offset: a non-negative integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Since(pub u64);

impl Since {
    /// A `since` from a query parameter's text.
    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        text.parse::<u64>()
            .map(Since)
            .map_err(|_| bad_request(format!("since={text:?} is not a non-negative integer")))
    }
}

impl<'de> Deserialize<'de> for Since {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u64::deserialize(d)
            .map(Since)
            .map_err(|_| D::Error::custom("\"since\" must be a non-negative integer"))
    }
}

/// How many of the newest messages a subscription replays (`?history=n`):
/// any integer, at most 1000 used, n ≤ 0 replays nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReplayCount(usize);

impl ReplayCount {
    /// A count from any integer.
    pub fn new(n: i64) -> Self {
        ReplayCount(usize::try_from(n.max(0)).unwrap_or(0).min(MAX_HISTORY_LIMIT))
    }

    /// A count from a query parameter's text.
    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        text.parse::<i64>()
            .map(ReplayCount::new)
            .map_err(|_| bad_request(format!("history={text:?} is not an integer")))
    }

    /// The number of messages.
    pub fn get(self) -> usize {
        self.0
    }
}

impl<'de> Deserialize<'de> for ReplayCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        i64::deserialize(d)
            .map(ReplayCount::new)
            .map_err(|_| D::Error::custom("\"history\" must be an integer"))
    }
}

/// For an optional field that, when present, must hold a value of its type:
/// `null` is refused like any other wrong type, where a plain `Option` would
/// take it for "absent". Use with `#[serde(default, deserialize_with = "present")]`.
pub(crate) fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

fn bad_request(message: String) -> ProtocolError {
    ProtocolError::new(ErrorCode::BadRequest, message)
}

/// Whether `name` is a valid group name: 1 to 128 bytes of UTF-8, no control
/// characters, no whitespace (Unicode's definitions).
pub fn valid_group(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_GROUP_BYTES && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Percent-decodes a path segment into a valid group name; `None` for a
/// malformed escape, bytes that are not UTF-8, or a name that breaks the rules.
pub fn decode_group(segment: &str) -> Option<String> {
    if !well_formed_escapes(segment) {
        return None;
    }
    let name = percent_decode_str(segment).decode_utf8().ok()?.into_owned();
    valid_group(&name).then_some(name)
}

fn well_formed_escapes(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if i + 2 >= b.len() || !(b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

/// The decoded value of `key` in a query string (`a=1&b=2`), if present.
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode_str(k).decode_utf8_lossy();
        (k == key).then(|| {
            percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// Whether JSON text nests arrays and objects deeper than [`MAX_JSON_DEPTH`]
/// (the outermost object is level 1). Checked on the raw text before parsing,
/// so the parser's own recursion is bounded by this rule, not by its stack.
pub fn too_deep(text: &str) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in text.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_follow_the_rules() {
        assert!(valid_group("chat"));
        assert!(valid_group("chat_42-é"));
        assert!(valid_group(&"a".repeat(128)));
        assert!(!valid_group(&"a".repeat(129)));
        assert!(!valid_group(""));
        assert!(!valid_group("a b"));
        assert!(!valid_group("a\u{3000}b"), "Unicode whitespace");
        assert!(!valid_group("a\u{7}b"));
        assert_eq!(decode_group("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(decode_group("a%20b"), None);
        assert_eq!(decode_group("a%2"), None);
        assert_eq!(decode_group("a%zz"), None);
        assert_eq!(decode_group("%FF"), None);
        assert_eq!(GroupName::parse("a b").unwrap_err().code, ErrorCode::InvalidGroup);
        assert_eq!(
            GroupName::from_path_segment("a%2").unwrap_err().code,
            ErrorCode::InvalidGroup
        );
    }

    #[test]
    fn query_params_are_decoded() {
        let q = Some("since=5&epoch=ab%2Dc&history");
        assert_eq!(query_param(q, "since").as_deref(), Some("5"));
        assert_eq!(query_param(q, "epoch").as_deref(), Some("ab-c"));
        assert_eq!(query_param(q, "history").as_deref(), Some(""));
        assert_eq!(query_param(q, "token"), None);
        assert_eq!(query_param(None, "since"), None);
    }

    #[test]
    fn limits_since_and_replay_counts_share_one_rule_per_source() {
        assert_eq!(Limit::parse("5").unwrap().get(), 5);
        assert_eq!(Limit::parse("5000").unwrap().get(), 1000);
        for bad in ["0", "-1", "1.5", "x", ""] {
            assert_eq!(Limit::parse(bad).unwrap_err().code, ErrorCode::BadRequest, "{bad}");
        }
        assert_eq!(serde_json::from_str::<Limit>("7").unwrap().get(), 7);
        assert!(serde_json::from_str::<Limit>("0").is_err());
        assert!(serde_json::from_str::<Limit>("2.5").is_err());
        assert_eq!(Since::parse("0").unwrap(), Since(0));
        assert!(Since::parse("-3").is_err());
        assert!(serde_json::from_str::<Since>("-3").is_err());
        assert_eq!(ReplayCount::parse("-4").unwrap().get(), 0);
        assert_eq!(ReplayCount::parse("2000").unwrap().get(), 1000);
        assert!(ReplayCount::parse("x").is_err());
    }

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        let at = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        assert!(!too_deep(&at(MAX_JSON_DEPTH)));
        assert!(too_deep(&at(MAX_JSON_DEPTH + 1)));
        let in_string = format!(r#"{{"data":"{}\"{}"}}"#, "[".repeat(500), "{".repeat(500));
        assert!(!too_deep(&in_string), "brackets inside strings do not nest");
    }
}
