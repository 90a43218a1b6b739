//! Key and channel names. Everything of one group shares the hash tag
//! `{<group>}`, so a group's keys live in one slot of a Redis Cluster.

use uuid::Uuid;

/// The prefix of every key and channel, so channelbox shares a Redis politely.
pub(crate) const PREFIX: &str = "cb";

/// The group's head hash.
pub(crate) fn head(group: &str) -> String {
    format!("{PREFIX}:{{{group}}}:h")
}

/// The group's message stream.
pub(crate) fn stream(group: &str) -> String {
    format!("{PREFIX}:{{{group}}}:s")
}

/// The group's pub/sub channel: its saved and unsaved messages, resets and
/// member events.
pub(crate) fn channel(group: &str) -> String {
    format!("{PREFIX}:{{{group}}}:c")
}

/// The group out of a group channel's name.
pub(crate) fn group_of_channel(name: &[u8]) -> Option<&str> {
    let name = std::str::from_utf8(name).ok()?;
    name.strip_prefix("cb:{")?.strip_suffix("}:c")
}

/// The group out of a head hash's name (for scans).
pub(crate) fn group_of_head(name: &str) -> Option<&str> {
    name.strip_prefix("cb:{")?.strip_suffix("}:h")
}

/// What `SCAN` matches to find every group's head.
pub(crate) const HEAD_PATTERN: &str = "cb:{*}:h";

/// One server's members of a group, with their users (presence).
pub(crate) fn presence(group: &str, node: Uuid) -> String {
    format!("{PREFIX}:{{{group}}}:p:{node}")
}

/// The live servers: a sorted set scored by when each record expires (ms).
pub(crate) const NODES: &str = "cb:nodes";

/// One server's member counts by group.
pub(crate) fn node_groups(node: Uuid) -> String {
    format!("{PREFIX}:node:{node}:groups")
}

/// One server's control channel (`direct` frames for its channels).
pub(crate) fn node_channel(node: Uuid) -> String {
    format!("{PREFIX}:node:{node}")
}

/// The control channel of every server (admin close-all).
pub(crate) const ALL_CHANNEL: &str = "cb:all";

/// Which server runs a channel.
pub(crate) fn channel_home(id: Uuid) -> String {
    format!("{PREFIX}:ch:{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_share_the_group_tag() {
        assert_eq!(group_of_channel(channel("a b{c}").as_bytes()), Some("a b{c}"));
        assert_eq!(group_of_head(&head("chat")), Some("chat"));
        assert!(stream("g").starts_with("cb:{g}") && head("g").starts_with("cb:{g}"));
    }
}
