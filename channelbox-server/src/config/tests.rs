//! Unit tests of the configuration: the flags' defaults are the protocol's,
//! and passwords in URLs are masked.

use super::*;

#[test]
fn the_defaults_are_the_protocols() {
    let config = Config::try_parse_from(["channelbox"]).expect("defaults parse");
    let protocol = config.protocol().expect("defaults are valid");
    let expected = ProtocolConfig::default();
    assert_eq!(protocol.queue_frames, expected.queue_frames);
    assert_eq!(protocol.queue_bytes, expected.queue_bytes);
    assert_eq!(protocol.max_message_bytes, expected.max_message_bytes);
    assert_eq!(protocol.ping_interval, expected.ping_interval);
    assert_eq!(protocol.pong_timeout, expected.pong_timeout);
    assert_eq!(protocol.compression, expected.compression);
    assert_eq!(protocol.write_delay, expected.write_delay);
    let off = Config::try_parse_from(["channelbox", "--compression", "off"]).expect("parses");
    assert!(!off.protocol().expect("valid").compression);
}

#[test]
fn passwords_in_urls_are_masked() {
    assert_eq!(
        mask_url_password("redis://u:hunter2@h:6379/"),
        "redis://u:********@h:6379/"
    );
    assert_eq!(mask_url_password("redis://h:6379/"), "redis://h:6379/");
}
