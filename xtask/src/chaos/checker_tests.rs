//! The checker's own tests: a clean log passes, and each broken promise
//! (and each excuse the protocol allows) is told apart.

use super::*;
use serde_json::json;

fn history(epoch: &str, ids: &[&str]) -> BTreeMap<String, History> {
    let messages = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (i as u64 + 1, id.to_string()))
        .collect();
    BTreeMap::from([("g".to_owned(), (epoch.to_owned(), messages))])
}

fn msg(o: u64, id: &str) -> Value {
    json!({"k": "msg", "g": "g", "o": o, "id": id})
}

fn ack(o: u64, id: &str) -> Value {
    json!({"k": "ack", "g": "g", "e": "E", "o": o, "id": id})
}

#[test]
fn a_clean_run_passes() {
    let log = vec![
        json!({"k": "join", "g": "g"}),
        ack(1, "a"),
        msg(1, "a"),
        msg(2, "b"),
        msg(3, "c"),
        json!({"k": "end", "groups": ["g"]}),
    ];
    assert_eq!(
        check(&[log], &history("E", &["a", "b", "c"]), false),
        Vec::<String>::new()
    );
}

#[test]
fn a_member_is_owed_what_was_sent_after_it_joined() {
    let h = history("E", &["a", "b"]);
    let joined = json!({"k": "joined", "g": "g", "t": 0});
    let send = |id: &str, t: u64| json!({"k": "send", "g": "g", "id": id, "t": t});
    let end = json!({"k": "end", "groups": ["g"], "t": 5000});
    let publisher = vec![send("a", 50), send("b", 1000)];
    let silent = vec![joined.clone(), end.clone()];
    let found = check(&[publisher.clone(), silent], &h, false);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("2 (b, sent at 1000 ms)"), "{found:?}");
    let told = vec![joined, json!({"k": "rec", "g": "g", "complete": false, "t": 2000}), end];
    assert_eq!(check(&[publisher, told], &h, false), Vec::<String>::new());
}

#[test]
fn a_survivor_of_an_epoch_move_is_not_a_second_save() {
    let mut known = Known::default();
    let mut out = Vec::new();
    known.record("g", "E1", 7, "a", &mut out);
    known.record("g", "E2", 7, "a", &mut out);
    assert!(out.is_empty(), "same offset in the next epoch: {out:?}");
    known.record("g", "E2", 8, "a", &mut out);
    assert_eq!(out.len(), 1, "another offset is a second save: {out:?}");
}

#[test]
fn an_epoch_move_is_silent_only_where_it_continues() {
    let h = history("E2", &["a", "b", "c", "d"]);
    let at = |e: &str, o: u64, id: &str| json!({"k": "msg", "g": "g", "e": e, "o": o, "id": id});
    let moved = vec![at("E1", 1, "a"), at("E1", 2, "b"), at("E2", 3, "c"), at("E2", 4, "d")];
    assert_eq!(check(&[moved], &h, false), Vec::<String>::new());
    let rolled_back = vec![at("E1", 1, "a"), at("E1", 2, "x"), at("E1", 3, "y"), at("E2", 3, "c")];
    let found = check(&[rolled_back], &h, false);
    assert!(found.iter().any(|v| v.contains("went from epoch E1")), "{found:?}");
}

#[test]
fn each_broken_promise_is_found() {
    let h = history("E", &["a", "b", "c"]);
    let end = json!({"k": "end", "groups": ["g"]});
    // A gap without being told, and a message never received at the end.
    let gap = vec![msg(1, "a"), msg(3, "c"), end.clone()];
    let found = check(&[gap], &h, false);
    assert!(found.iter().any(|v| v.contains("gap")), "{found:?}");
    assert!(found.iter().any(|v| v.contains("never received 2 (b)")), "{found:?}");
    // The same gap after `recovered complete:false` is fine.
    let told = vec![
        msg(1, "a"),
        json!({"k": "rec", "g": "g", "complete": false}),
        msg(3, "c"),
    ];
    assert_eq!(check(&[told], &h, false), Vec::<String>::new());
    // Two payloads under one (epoch, offset).
    let twice = vec![ack(2, "x")];
    assert!(check(&[twice], &h, false).iter().any(|v| v.starts_with("(1)")));
    // An acknowledged message missing from its epoch's history.
    let lost = vec![ack(4, "d")];
    assert!(check(&[lost], &h, false).iter().any(|v| v.starts_with("(3)")));
    // A refused publish that was saved anyway.
    let refused = vec![json!({"k": "refused", "g": "g", "id": "b", "code": "unavailable", "msg": "disk full"})];
    assert!(check(&[refused], &h, false).iter().any(|v| v.starts_with("(4)")));
    // ... unless the server said Redis did not answer, fast or slow.
    let unanswered =
        "the history store did not answer in time; the request may still take effect (its outcome is unknown)";
    let timeout = vec![
        json!({"k": "send", "g": "g", "id": "b", "t": 100}),
        json!({"k": "refused", "g": "g", "id": "b", "code": "unavailable", "msg": unanswered, "t": 105}),
    ];
    assert!(check(std::slice::from_ref(&timeout), &h, true).is_empty());
    assert!(
        !check(&[timeout], &h, false).is_empty(),
        "only Redis has unknown outcomes"
    );
    // A slow refusal that does not say so promised no effect.
    let slow = vec![
        json!({"k": "send", "g": "g", "id": "b", "t": 100}),
        json!({"k": "refused", "g": "g", "id": "b", "code": "unavailable", "msg": "try again", "t": 1700}),
    ];
    assert!(check(&[slow], &h, true).iter().any(|v| v.starts_with("(4)")));
    // A client left in an old epoch without being told.
    let stale = vec![ack(1, "a"), msg(1, "a"), end];
    let moved = history("F", &["z"]);
    assert!(check(&[stale], &moved, false).iter().any(|v| v.contains("never told")));
}
