//! Group names and query strings as PROTOCOL.md defines them.

use percent_encoding::percent_decode_str;

use crate::config::MAX_GROUP_BYTES;

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
}
