//! The paths that name a group, `/ws/{group}` and `/sse/{group}`, parsed
//! once for every adapter, so that each finds the same raw segment and the
//! group rules of docs/protocol.md ("Opening a connection") judge it alike.

use crate::fields::GroupName;
use crate::frames::ProtocolError;

/// An endpoint whose path names a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupEndpoint {
    /// `GET /ws/{group}`: a WebSocket connection.
    WebSocket,
    /// `GET /sse/{group}`: a stream of server-sent events.
    Events,
}

impl GroupEndpoint {
    /// The path's first segment: `ws` or `sse`.
    pub const fn segment(self) -> &'static str {
        match self {
            GroupEndpoint::WebSocket => "ws",
            GroupEndpoint::Events => "sse",
        }
    }
}

/// A path that names a group: its endpoint and its group segment as sent
/// (still percent-encoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupPath<'a> {
    /// Which endpoint the path names.
    pub endpoint: GroupEndpoint,
    /// The group segment, percent-encoded as the client sent it.
    pub raw_group: &'a str,
}

impl<'a> GroupPath<'a> {
    /// Parses `/ws/{group}` or `/sse/{group}` (a path without its query);
    /// `None` for any other path, an empty group segment or more segments,
    /// which are no endpoint (404), not a bad group.
    pub fn parse(path: &'a str) -> Option<Self> {
        let rest = path.strip_prefix('/')?;
        let (first, rest) = rest.split_once('/')?;
        let endpoint = [GroupEndpoint::WebSocket, GroupEndpoint::Events]
            .into_iter()
            .find(|e| e.segment() == first)?;
        Some(GroupPath {
            endpoint,
            raw_group: group_segment(rest)?,
        })
    }

    /// The group the segment names, percent-decoded and checked: `invalid_group`
    /// for a malformed escape or a name that breaks the rules.
    pub fn group(&self) -> Result<GroupName, ProtocolError> {
        GroupName::from_path_segment(self.raw_group)
    }
}

/// What follows `/ws/` or `/sse/` as a group segment: one non-empty segment,
/// else `None`. For adapters whose router has already matched the first segment.
pub fn group_segment(rest: &str) -> Option<&str> {
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_paths_are_one_raw_segment_after_ws_or_sse() {
        let ws = GroupPath::parse("/ws/caf%C3%A9").unwrap();
        assert_eq!((ws.endpoint, ws.raw_group), (GroupEndpoint::WebSocket, "caf%C3%A9"));
        assert_eq!(ws.group().unwrap().as_str(), "café");
        let sse = GroupPath::parse("/sse/room").unwrap();
        assert_eq!((sse.endpoint, sse.raw_group), (GroupEndpoint::Events, "room"));
        for path in ["/ws/", "/ws", "/ws/a/b", "/ws/a/", "ws/a", "/wss/a", "/api/ws/a", "/"] {
            assert_eq!(GroupPath::parse(path), None, "{path}");
        }
    }

    #[test]
    fn the_group_rules_judge_the_raw_segment_once() {
        fn group(path: &str) -> Result<String, ProtocolError> {
            GroupPath::parse(path).unwrap().group().map(|g| g.as_str().to_owned())
        }
        assert!(group("/ws/a%20b").is_err(), "whitespace");
        assert!(group("/ws/a%zz").is_err(), "a malformed escape");
        assert!(group("/ws/%FF").is_err(), "not UTF-8");
        assert!(group(&format!("/ws/{}", "x".repeat(129))).is_err(), "too long");
        // Decoded once: an escaped percent sign stays a percent sign.
        assert_eq!(group("/ws/a%2520b").unwrap(), "a%20b");
        assert_eq!(group("/ws/a%2Fb").unwrap(), "a/b");
    }
}
