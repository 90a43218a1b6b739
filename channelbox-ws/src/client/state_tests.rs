//! Unit tests of the client's state: positions, joins, recoveries, refusals.

use super::*;

fn frame(conn: &mut Connection, groups: &mut Groups, v: Value) -> (Vec<Event>, Option<&'static str>) {
    let mut out = Vec::new();
    let end = conn.on_frame(groups, &v, &mut out);
    (out, end)
}

#[test]
fn saved_messages_are_delivered_once_per_epoch() {
    let mut g = Groups::new("g");
    assert_eq!(g.url_query(), "");
    assert!(g.take("g", "e1", 1));
    assert!(g.take("g", "e1", 2));
    assert!(!g.take("g", "e1", 2), "a repeat is dropped");
    assert!(!g.take("g", "e1", 1), "so is an older one");
    assert_eq!(g.url_query(), "?since=2&epoch=e1");
    assert!(g.take("g", "e2", 1), "a new epoch starts over");
    assert!(!g.take("left", "e1", 1), "a group not joined is not delivered…");
    assert!(g.others().is_empty(), "…nor recorded");
}

#[test]
fn welcome_and_joined_name_the_position_of_a_group_without_messages() {
    let (mut g, mut c) = (Groups::new("home"), Connection::default());
    frame(
        &mut c,
        &mut g,
        json!({"type": "welcome", "channel_id": "x", "epoch": "e", "offset": 4}),
    );
    assert_eq!(g.url_query(), "?since=4&epoch=e");
    let mut frames = json!({"type": "join", "group": "side"});
    c.expect(7, Kind::of(&frames, &mut g), None);
    let (out, _) = frame(
        &mut c,
        &mut g,
        json!({"type": "joined", "group": "side", "epoch": "s", "offset": 9, "ref": 7}),
    );
    assert!(
        matches!(
            &out[..],
            [Event::Joined {
                offset: 9,
                reference: 7,
                ..
            }]
        ),
        "{out:?}"
    );
    assert_eq!(
        g.join_frame("side", 8),
        json!({"type": "join", "group": "side", "since": 9, "epoch": "s", "ref": 8})
    );
    frames["type"] = json!("leave");
    Kind::of(&frames, &mut g);
    assert!(g.others().is_empty(), "a group left is not rejoined");
}

#[test]
fn a_recovering_join_takes_the_joined_position_after_recovered() {
    let (mut g, mut c) = (Groups::new("home"), Connection::default());
    g.at.insert(
        "side".into(),
        Some(Position {
            epoch: "s".into(),
            offset: 2,
        }),
    );
    let kind = Kind::Join {
        group: "side".into(),
        replay: Replay::Since,
        rejoin: true,
        left: false,
    };
    c.expect(1, kind, None);
    frame(
        &mut c,
        &mut g,
        json!({"type": "joined", "group": "side", "epoch": "s", "offset": 5, "ref": 1}),
    );
    assert_eq!(g.position("side").unwrap().offset, 2, "the replay comes first");
    let (out, _) = frame(
        &mut c,
        &mut g,
        json!({"type": "message", "group": "side", "epoch": "s", "offset": 3}),
    );
    assert!(matches!(&out[..], [Event::Message { offset: Some(3), .. }]));
    frame(
        &mut c,
        &mut g,
        json!({"type": "recovered", "group": "side", "from": 2, "to": 3, "complete": false}),
    );
    assert_eq!(
        g.position("side").unwrap().offset,
        5,
        "live delivery starts after the joined offset"
    );
}

#[test]
fn refused_rejoins_and_publishes_are_reported() {
    let (mut g, mut c) = (Groups::new("home"), Connection::default());
    g.at.insert("a".into(), None);
    g.at.insert("b".into(), None);
    for (r, group) in [(1, "a"), (2, "b")] {
        let kind = Kind::Join {
            group: group.into(),
            replay: Replay::Nothing,
            rejoin: true,
            left: false,
        };
        c.expect(r, kind, None);
    }
    let err = |r: u64, code: &str| json!({"type": "error", "code": code, "message": "m", "ref": r});
    let (out, end) = frame(&mut c, &mut g, err(1, "forbidden"));
    assert!(matches!(&out[..], [Event::RejoinFailed { retrying: false, .. }]) && end.is_none());
    assert_eq!(g.others(), vec!["b".to_owned()], "dropped for good");
    let (out, end) = frame(&mut c, &mut g, err(2, "unavailable"));
    assert!(matches!(&out[..], [Event::RejoinFailed { retrying: true, .. }]));
    assert_eq!(end, Some("rejoin failed"));
    c.expect(3, Kind::of(&json!({"type": "publish", "data": 1}), &mut g), None);
    c.expect(4, Kind::Publish("home".into()), None);
    let (out, _) = frame(&mut c, &mut g, err(3, "unavailable"));
    assert!(
        matches!(&out[..], [Event::PublishRefused { reference: 3, .. }]),
        "{out:?}"
    );
    let mut out = Vec::new();
    c.ended(&mut out);
    assert!(
        matches!(&out[..], [Event::PublishUnanswered { reference: 4, .. }]),
        "{out:?}"
    );
}

#[test]
fn a_group_left_stays_left_even_when_its_join_is_answered_later() {
    let (mut g, mut c) = (Groups::new("home"), Connection::default());
    // The application joins and leaves before the `joined` arrives.
    c.request(&mut g, &json!({"type": "join", "group": "side"}), 1, None);
    c.request(&mut g, &json!({"type": "leave", "group": "side"}), 2, None);
    let (out, _) = frame(
        &mut c,
        &mut g,
        json!({"type": "joined", "group": "side", "epoch": "s", "offset": 3, "ref": 1}),
    );
    assert!(out.is_empty(), "{out:?}");
    assert!(g.others().is_empty(), "a group left is not rejoined");
    let (out, _) = frame(
        &mut c,
        &mut g,
        json!({"type": "message", "group": "side", "epoch": "s", "offset": 4}),
    );
    assert!(out.is_empty(), "nothing of a group left is delivered: {out:?}");
}

#[test]
fn the_url_group_left_is_neither_recovered_nor_delivered() {
    let (mut g, mut c) = (Groups::new("home"), Connection::default());
    frame(
        &mut c,
        &mut g,
        json!({"type": "welcome", "channel_id": "x", "epoch": "e", "offset": 4}),
    );
    assert!(!g.url_left());
    c.request(&mut g, &json!({"type": "leave", "group": "home"}), 1, None);
    assert!(g.url_left(), "a new connection must leave it again");
    assert_eq!(g.url_query(), "", "and does not recover it");
    let (out, _) = frame(
        &mut c,
        &mut g,
        json!({"type": "message", "group": "home", "epoch": "e", "offset": 5}),
    );
    assert!(out.is_empty(), "{out:?}");
    // Joined again, it is the URL group as before.
    c.request(&mut g, &json!({"type": "join", "group": "home"}), 2, None);
    frame(
        &mut c,
        &mut g,
        json!({"type": "joined", "group": "home", "epoch": "e", "offset": 6, "ref": 2}),
    );
    assert!(!g.url_left());
    assert_eq!(g.url_query(), "?since=6&epoch=e");
}
