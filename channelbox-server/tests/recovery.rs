//! Recovery over real sockets: the URL's `since`/`epoch`/`history`, the same on
//! `join` for any other group, and the cases where recovery is incomplete.

mod support;

use serde_json::json;
use support::{Client, Server};

#[tokio::test]
async fn recovery_complete_and_incomplete() {
    let server = Server::memory();
    let (mut a, welcome) = Client::join(&server.ws_url("/ws/rec")).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    for n in 1..=5 {
        a.request(json!({"type": "publish", "data": n}), &format!("{n}")).await;
    }
    let (mut b, _) = Client::join(&server.ws_url(&format!("/ws/rec?since=2&epoch={epoch}"))).await;
    for want in 3..=5 {
        let m = b.recv().await;
        assert_eq!(
            (m["type"].as_str(), m["offset"].as_u64()),
            (Some("message"), Some(want))
        );
    }
    let r = b.recv().await;
    assert_eq!(
        r,
        json!({"type": "recovered", "group": "rec", "from": 2, "to": 5, "complete": true})
    );
    a.request(json!({"type": "publish", "data": 6}), "6").await;
    assert_eq!(b.recv().await["offset"], 6, "then live, no gap");

    let (mut c, _) = Client::join(&server.ws_url("/ws/rec?since=2&epoch=other")).await;
    assert_eq!(
        c.recv().await,
        json!({"type": "recovered", "group": "rec", "from": 2, "to": 2, "complete": false})
    );
    let (mut d, _) = Client::join(&server.ws_url("/ws/rec?since=2")).await;
    assert_eq!(d.recv().await["complete"], false, "since without epoch");
    let (mut e, _) = Client::join(&server.ws_url(&format!("/ws/rec?since=99&epoch={epoch}"))).await;
    assert_eq!(
        e.recv().await,
        json!({"type": "recovered", "group": "rec", "from": 99, "to": 99, "complete": false})
    );
    let (mut f, _) = Client::join(&server.ws_url(&format!("/ws/rec?since=6&epoch={epoch}"))).await;
    assert_eq!(
        f.recv().await,
        json!({"type": "recovered", "group": "rec", "from": 6, "to": 6, "complete": true}),
        "nothing missed"
    );
}

#[tokio::test]
async fn recovery_after_trimming_is_incomplete() {
    let server = Server::start(&["--store", "memory", "--history-messages", "3"]);
    let (mut a, welcome) = Client::join(&server.ws_url("/ws/t")).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    for n in 1..=8 {
        a.request(json!({"type": "publish", "data": n}), &format!("{n}")).await;
    }
    let (mut b, _) = Client::join(&server.ws_url(&format!("/ws/t?since=2&epoch={epoch}"))).await;
    assert_eq!(b.recv().await["complete"], false);
    let (mut c, _) = Client::join(&server.ws_url(&format!("/ws/t?since=5&epoch={epoch}"))).await;
    for want in 6..=8 {
        assert_eq!(c.recv().await["offset"], want);
    }
    assert_eq!(c.recv().await["complete"], true);
}

#[tokio::test]
async fn history_on_connect() {
    let server = Server::memory();
    let (mut a, _) = Client::join(&server.ws_url("/ws/hc")).await;
    for n in 1..=5 {
        a.request(json!({"type": "publish", "data": n}), &format!("{n}")).await;
    }
    let (mut b, w) = Client::join(&server.ws_url("/ws/hc?history=2")).await;
    assert_eq!(w["offset"], 5);
    assert_eq!(b.recv().await["offset"], 4);
    assert_eq!(b.recv().await["offset"], 5);
    assert_eq!(
        b.request(json!({"type": "ping"}), "p").await["type"],
        "pong",
        "nothing more was replayed"
    );
    let (mut c, _) = Client::join(&server.ws_url("/ws/hc?history=0")).await;
    assert_eq!(c.request(json!({"type": "ping"}), "p").await["type"], "pong");
}

#[tokio::test]
async fn join_recovers_another_group_like_the_url_does() {
    let server = Server::memory();
    let (mut a, _) = Client::join(&server.ws_url("/ws/home")).await;
    let joined = a.request(json!({"type": "join", "group": "side"}), "j1").await;
    let first_epoch = joined["epoch"].clone();
    assert!(first_epoch.is_string(), "{joined}");
    assert_eq!(
        joined,
        json!({"type": "joined", "group": "side", "epoch": first_epoch, "offset": 0, "ref": "j1"})
    );
    for n in 1..=4 {
        a.request(json!({"type": "publish", "group": "side", "data": n}), &format!("p{n}"))
            .await;
    }
    let page = a
        .request(json!({"type": "history", "group": "side", "limit": 1}), "h")
        .await;
    let epoch = page["epoch"].as_str().unwrap().to_owned();
    assert_eq!(first_epoch, epoch, "joined named the group's epoch");

    let (mut b, _) = Client::join(&server.ws_url("/ws/home")).await;
    b.send(json!({"type": "join", "group": "side", "since": 1, "epoch": epoch, "ref": "r"}))
        .await;
    assert_eq!(
        b.recv().await,
        json!({"type": "joined", "group": "side", "epoch": epoch, "offset": 4, "ref": "r"}),
        "a recovering join names where live delivery starts"
    );
    for want in 2..=4 {
        let m = b.recv().await;
        assert_eq!(
            (m["type"].as_str(), m["group"].as_str(), m["offset"].as_u64()),
            (Some("message"), Some("side"), Some(want))
        );
    }
    assert_eq!(
        b.recv().await,
        json!({"type": "recovered", "group": "side", "from": 1, "to": 4, "complete": true, "ref": "r"})
    );
    a.request(json!({"type": "publish", "group": "side", "data": 5}), "p5")
        .await;
    assert_eq!(b.recv().await["offset"], 5, "then live, no gap");

    let (mut c, _) = Client::join(&server.ws_url("/ws/home")).await;
    c.send(json!({"type": "join", "group": "side", "since": 1, "epoch": "other", "ref": 9}))
        .await;
    assert_eq!(
        c.recv().await,
        json!({"type": "joined", "group": "side", "epoch": epoch, "offset": 5, "ref": 9}),
        "an incomplete recovery starts over from the joined position"
    );
    assert_eq!(
        c.recv().await,
        json!({"type": "recovered", "group": "side", "from": 1, "to": 1, "complete": false, "ref": 9}),
        "another epoch: nothing replayed"
    );
    let (mut d, _) = Client::join(&server.ws_url("/ws/home")).await;
    d.send(json!({"type": "join", "group": "side", "history": 2, "ref": "h2"}))
        .await;
    assert_eq!(
        d.recv().await,
        json!({"type": "joined", "group": "side", "epoch": epoch, "offset": 5, "ref": "h2"})
    );
    let offsets = [d.recv().await["offset"].clone(), d.recv().await["offset"].clone()];
    assert_eq!(offsets, [json!(4), json!(5)], "the newest two, then live");
    let r = d
        .request(json!({"type": "join", "group": "side", "since": "x"}), "bad")
        .await;
    assert_eq!(r["code"], "bad_request");
}
