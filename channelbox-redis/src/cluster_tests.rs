//! Tests of the slot map and of following a failover.

use super::*;
use crate::keys::crc16;

/// The master on local port `p`.
fn node(p: u16) -> (String, u16) {
    ("127.0.0.1".to_owned(), p)
}

/// Slots `start..=end` served by the master on port `p`.
fn range(start: u16, end: u16, p: u16) -> Range {
    Range {
        start,
        end,
        master: node(p),
    }
}

#[test]
fn slots_are_redis_cluster_slots() {
    // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
    assert_eq!(crc16(b"123456789"), 0x31c3);
    assert_eq!(tag_slot("foo"), 12182);
    assert_eq!(tag_slot("bar"), 5061);
    assert_eq!(tag_slot(""), 0);
    // A group's keys hash on its tag.
    assert_eq!(group_slot("foo"), 12182);
    assert_eq!(group_slot("}foo"), tag_slot("~"));
}

#[test]
fn the_slot_map_is_read_and_homes_are_found() {
    let host = |h: &[u8], p: i64| Value::Array(vec![Value::BulkString(h.to_vec()), Value::Int(p)]);
    let line = |s: i64, e: i64, m: Value| Value::Array(vec![Value::Int(s), Value::Int(e), m]);
    let value = Value::Array(vec![
        line(0, 5460, host(b"127.0.0.1", 7000)),
        line(5461, 10922, host(b"", 7001)),
        line(10923, 16383, host(b"127.0.0.1", 7002)),
    ]);
    let ranges = parse_slots(&value, "10.0.0.1").expect("parsed");
    assert_eq!(ranges[1].master, ("10.0.0.1".to_owned(), 7001));
    let masters: Vec<(String, u16)> = ranges.iter().map(|r| r.master.clone()).collect();
    let owners = owners_of(&masters, &ranges, masters.len());
    assert_eq!((owners[0], owners[5461], owners[16383]), (0, 1, 2));
    for i in 0..3 {
        let home = home_of(&owners, i).expect("a home");
        let tag = home.trim_start_matches("cb:{").trim_end_matches('}');
        assert_eq!(owners[tag_slot(tag) as usize] as usize, i, "{home}");
    }
    assert_eq!(parse_slots(&Value::Int(1), "h"), None);
}

#[test]
fn an_engine_follows_the_replica_promoted_in_its_masters_place() {
    let mut masters = vec![node(7000), node(7001), node(7002)];
    let before = vec![
        range(0, 5460, 7000),
        range(5461, 10922, 7001),
        range(10923, 16383, 7002),
    ];
    let owners = owners_of(&masters, &before, masters.len());
    // Nothing new: nothing moves.
    assert!(follow_failovers(&mut masters, &owners, &before).is_empty());
    // 7001 failed; its replica 7004 serves its slots now.
    let after = vec![
        range(0, 5460, 7000),
        range(5461, 10922, 7004),
        range(10923, 16383, 7002),
    ];
    assert_eq!(follow_failovers(&mut masters, &owners, &after), vec![1]);
    assert_eq!(masters, vec![node(7000), node(7004), node(7002)]);
    let owners = owners_of(&masters, &after, masters.len());
    assert_eq!((owners[0], owners[5461], owners[16383]), (0, 1, 2));
    // Read again: followed once.
    assert!(follow_failovers(&mut masters, &owners, &after).is_empty());
    // A master added later (a slot resharded to it) takes no engine's
    // place while the engine's master is still named: its slot has none.
    let added = vec![
        range(0, 99, 7009),
        range(100, 5460, 7000),
        range(5461, 10922, 7004),
        range(10923, 16383, 7002),
    ];
    assert!(follow_failovers(&mut masters, &owners, &added).is_empty());
    assert_eq!(owners_of(&masters, &added, masters.len())[0], NOBODY);
    // Nor does a new master serving none of the slots of the one gone:
    // 7001 is gone (its slots went to 7000), 7005 serves some of 7000's.
    let mut masters = vec![node(7000), node(7001)];
    let owners = owners_of(&masters, &[range(0, 99, 7000), range(100, 16383, 7001)], 2);
    let unrelated = vec![range(0, 99, 7005), range(100, 16383, 7000)];
    assert!(follow_failovers(&mut masters, &owners, &unrelated).is_empty());
    assert_eq!(masters, vec![node(7000), node(7001)]);
}

#[test]
fn a_master_added_later_gets_an_engine_of_its_own() {
    let at_start = vec![range(0, 8191, 7000), range(8192, 16383, 7001)];
    let slots = Slots::new(vec![node(7000), node(7001)], at_start.clone(), Vec::new());
    let moved = (0..)
        .map(|i| format!("g{i}"))
        .find(|g| group_slot(g) < 100)
        .expect("a group");
    let stayed = (0..)
        .map(|i| format!("g{i}"))
        .find(|g| group_slot(g) >= 100)
        .expect("a group");
    assert_eq!(slots.master_of(&moved).expect("placed"), 0);
    // Slots 0-99 resharded to a new master, 7009.
    slots.apply(&[range(0, 99, 7009), range(100, 8191, 7000), range(8192, 16383, 7001)]);
    assert_eq!(
        slots.addresses(),
        vec!["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7009"]
    );
    let unserved = slots.unserved();
    assert_eq!(unserved.len(), 1);
    let (index, address, home) = &unserved[0];
    assert_eq!((*index, address.clone()), (2, node(7009)));
    let home = home.clone().expect("it serves a slot");
    let tag = home.trim_start_matches("cb:{").trim_end_matches('}');
    assert!(tag_slot(tag) < 100, "its home is in its slots: {home}");
    // Until its engine is made, its slots wait as after a redirect.
    let err = slots.master_of(&moved).expect_err("not placed yet");
    assert!(crate::link::is_redirect(&err), "{err}");
    assert_eq!(
        slots.master_of(&stayed).expect("placed"),
        if group_slot(&stayed) < 8192 { 0 } else { 1 }
    );
    slots.serve(2);
    assert_eq!(slots.master_of(&moved).expect("placed"), 2);
    assert!(slots.unserved().is_empty());
    // A master named once, then gone before it is served, holds up no
    // master added after it; a slot with no small `cb-N` tag has a home.
    let slot_67_on = |p| {
        vec![
            range(0, 66, 7009),
            range(67, 67, p),
            range(68, 99, 7009),
            range(100, 8191, 7000),
            range(8192, 16383, 7001),
        ]
    };
    slots.apply(&slot_67_on(7011));
    slots.apply(&slot_67_on(7012));
    let unserved = slots.unserved();
    assert_eq!(unserved.len(), 1, "{unserved:?}");
    assert_eq!((unserved[0].0, unserved[0].1.clone()), (3, node(7012)));
    let home = unserved[0].2.clone().expect("a home for slot 67");
    assert_eq!(tag_slot(home.trim_start_matches("cb:{").trim_end_matches('}')), 67);
    slots.serve(3);
    assert_eq!(slots.homes().len(), 3, "every engine but the first has a home");
    // Read again: added once.
    slots.apply(&[range(0, 99, 7009), range(100, 8191, 7000), range(8192, 16383, 7001)]);
    assert_eq!(slots.addresses().len(), 4);
    assert_eq!(slots.master_of(&moved).expect("placed"), 2);
}
