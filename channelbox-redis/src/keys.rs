//! Key and channel names. Everything of one group shares the hash tag
//! `{<tag>}`, so a group's keys live in one slot of a Redis Cluster: the tag
//! is the group's name, except that a name starting with `}` or `~` gets a
//! `~` in front (Redis takes the text up to the first `}` as the tag; an
//! empty one would make each key hash alone, and `~` keeps the mapping
//! one-to-one). What is about servers and channels rather than groups lives
//! under a *home* prefix (`cb` on one Redis; on a Cluster one per master,
//! whose hash tag that master owns).

use uuid::Uuid;

/// The text inside a group's hash tag braces.
fn tag(group: &str) -> std::borrow::Cow<'_, str> {
    if group.starts_with(['}', '~']) {
        std::borrow::Cow::Owned(format!("~{group}"))
    } else {
        std::borrow::Cow::Borrowed(group)
    }
}

/// The group a tag stands for (the inverse of `tag`).
fn untag(tag: &str) -> &str {
    tag.strip_prefix('~').unwrap_or(tag)
}

/// The hash tag Redis Cluster hashes for every key of `group` (the text
/// between the braces of its keys, up to the first `}`).
pub(crate) fn hash_tag(group: &str) -> String {
    let t = tag(group);
    match t.find('}') {
        Some(end) => t[..end].to_owned(),
        None => t.into_owned(),
    }
}

/// The prefix of every key and channel, so channelbox shares a Redis politely.
pub(crate) const PREFIX: &str = "cb";

/// The group's head hash.
pub(crate) fn head(group: &str) -> String {
    format!("{PREFIX}:{{{}}}:h", tag(group))
}

/// The group's message stream.
pub(crate) fn stream(group: &str) -> String {
    format!("{PREFIX}:{{{}}}:s", tag(group))
}

/// The group's pub/sub channel: its saved and unsaved messages, resets and
/// member events.
pub(crate) fn channel(group: &str) -> String {
    format!("{PREFIX}:{{{}}}:c", tag(group))
}

/// The group out of a group channel's name.
pub(crate) fn group_of_channel(name: &[u8]) -> Option<&str> {
    let name = std::str::from_utf8(name).ok()?;
    Some(untag(name.strip_prefix("cb:{")?.strip_suffix("}:c")?))
}

/// The group out of a head hash's name (for scans).
pub(crate) fn group_of_head(name: &str) -> Option<&str> {
    Some(untag(name.strip_prefix("cb:{")?.strip_suffix("}:h")?))
}

/// What `SCAN` matches to find every group's head.
pub(crate) const HEAD_PATTERN: &str = "cb:{*}:h";

/// One server's members of a group, with their users (presence).
pub(crate) fn presence(group: &str, node: Uuid) -> String {
    format!("{PREFIX}:{{{}}}:p:{node}", tag(group))
}

/// The home prefix on one Redis (and on each shard).
pub(crate) const HOME: &str = PREFIX;

/// The live servers: a sorted set scored by when each record expires (ms).
pub(crate) fn nodes(home: &str) -> String {
    format!("{home}:nodes")
}

/// One server's member counts by group.
pub(crate) fn node_groups(home: &str, node: Uuid) -> String {
    format!("{home}:node:{node}:groups")
}

/// One server's control channel (`direct` frames for its channels).
pub(crate) fn node_channel(node: Uuid) -> String {
    format!("{PREFIX}:node:{node}")
}

/// The control channel of every server (admin close-all).
pub(crate) const ALL_CHANNEL: &str = "cb:all";

/// Which server runs a channel.
pub(crate) fn channel_home(home: &str, id: Uuid) -> String {
    format!("{home}:ch:{id}")
}

/// The key a degraded link writes to learn that Redis takes writes again.
pub(crate) fn probe(home: &str) -> String {
    format!("{home}:probe")
}

/// Hash slots in a Redis Cluster.
pub const SLOTS: usize = 16_384;

/// CRC16 (XMODEM: polynomial 0x1021, initial 0), as Redis Cluster hashes keys.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for b in bytes {
        crc ^= u16::from(*b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash slot of every key of `group`.
pub fn group_slot(group: &str) -> u16 {
    crc16(hash_tag(group).as_bytes()) % SLOTS as u16
}

/// The slot of a hash tag's text.
pub(crate) fn tag_slot(tag: &str) -> u16 {
    crc16(tag.as_bytes()) % SLOTS as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_share_the_group_tag() {
        assert_eq!(group_of_channel(channel("a b{c}").as_bytes()), Some("a b{c}"));
        assert_eq!(group_of_head(&head("chat")), Some("chat"));
        assert!(stream("g").starts_with("cb:{g}") && head("g").starts_with("cb:{g}"));
        assert_eq!(nodes(HOME), "cb:nodes");
        assert_eq!(channel_home(HOME, Uuid::nil()), format!("cb:ch:{}", Uuid::nil()));
    }

    /// The tag Redis would hash for `key`: the text between the first `{`
    /// and the next `}`, if not empty; otherwise the whole key.
    fn redis_tag(key: &str) -> &str {
        if let Some(open) = key.find('{') {
            if let Some(len) = key[open + 1..].find('}') {
                if len > 0 {
                    return &key[open + 1..open + 1 + len];
                }
            }
        }
        key
    }

    #[test]
    fn every_key_of_a_group_shares_one_nonempty_tag() {
        for group in ["chat", "}x", "}", "~", "~a", "a}b", "{a}", "a{b}c", "}}", "é}"] {
            let keys = [head(group), stream(group), channel(group), presence(group, Uuid::nil())];
            let want = hash_tag(group);
            assert!(!want.is_empty(), "{group:?}");
            for key in &keys {
                assert_eq!(redis_tag(key), want, "{group:?}: {key}");
            }
            assert_eq!(group_of_channel(channel(group).as_bytes()), Some(group));
            assert_eq!(group_of_head(&head(group)), Some(group));
        }
        // One-to-one: a name with `~` in front keeps its own keys.
        assert_ne!(head("}x"), head("~}x"));
        assert_ne!(head("~x"), head("x"));
    }
}
