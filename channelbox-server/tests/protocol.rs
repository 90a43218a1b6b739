//! End-to-end tests of docs/protocol.md over real sockets: the chat example binary,
//! a real WebSocket client, one test per row of the protocol: requests,
//! replies and errors here; recovery in `recovery.rs`, HTTP in `http_api.rs`.

mod support;

use serde_json::{json, Value};
use support::{get, Client, Server};

#[tokio::test]
async fn welcome_publish_message_and_published() {
    let server = Server::memory();
    let (mut a, welcome) = Client::join(&server.ws_url("/ws/chat")).await;
    assert_eq!(welcome["group"], "chat");
    assert_eq!(welcome["offset"], 0);
    assert!(welcome["epoch"].is_string());
    let a_id = welcome["channel_id"].as_str().unwrap().to_owned();
    let (mut b, _) = Client::join(&server.ws_url("/ws/chat")).await;

    a.send(json!({"type": "publish", "data": {"text": "hi"}, "ref": 7}))
        .await;
    let mut got_published = None;
    let mut got_message = None;
    while got_published.is_none() || got_message.is_none() {
        let v = a.recv().await;
        match v["type"].as_str() {
            Some("published") => got_published = Some(v),
            Some("message") => got_message = Some(v),
            other => panic!("unexpected {other:?}"),
        }
    }
    let published = got_published.unwrap();
    assert_eq!(
        published,
        json!({"type": "published", "group": "chat", "offset": 1, "epoch": welcome["epoch"], "ref": 7})
    );
    let m = got_message.unwrap();
    assert_eq!(m["group"], "chat");
    assert_eq!(m["offset"], 1);
    assert_eq!(m["epoch"], welcome["epoch"]);
    assert_eq!(m["from"], a_id.as_str());
    assert!(m["ts"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(m["data"], json!({"text": "hi"}));
    assert!(m.get("ref").is_none(), "message frames carry no ref");
    assert!(m.get("user").is_none(), "no user without tokens");
    let at_b = b.recv().await;
    assert_eq!(at_b, m, "every member gets the same frame");
}

#[tokio::test]
async fn unsaved_publishes_have_no_offset_and_no_history() {
    let server = Server::memory();
    let (mut a, _) = Client::join(&server.ws_url("/ws/room")).await;
    let (r, m) = a.publish(json!({"data": 1, "history": false}), "x").await;
    assert_eq!(r["offset"], Value::Null);
    assert_eq!(m["offset"], Value::Null);
    assert_eq!(m["data"], 1);
    let r = a.request(json!({"type": "publish", "data": null}), "y").await;
    assert_eq!(r["offset"], 1, "saved offsets stay consecutive");
    let h = a.request(json!({"type": "history"}), "h").await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 1);
    assert_eq!(h["messages"][0]["data"], Value::Null);
}

#[tokio::test]
async fn join_leave_and_publishing_elsewhere() {
    let server = Server::memory();
    let (mut a, _) = Client::join(&server.ws_url("/ws/one")).await;
    let r = a
        .request(json!({"type": "publish", "group": "two", "data": 1}), "1")
        .await;
    assert_eq!(r["type"], "error");
    assert_eq!(r["code"], "forbidden");
    let joined = a.request(json!({"type": "join", "group": "two"}), "2").await;
    let epoch = joined["epoch"].as_str().expect("joined names the epoch").to_owned();
    assert_eq!(
        joined,
        json!({"type": "joined", "group": "two", "epoch": epoch, "offset": 0, "ref": "2"}),
        "a group without messages is at offset 0"
    );
    assert_eq!(
        a.request(json!({"type": "join", "group": "two"}), "3").await,
        json!({"type": "joined", "group": "two", "epoch": epoch, "offset": 0, "ref": "3"}),
        "idempotent"
    );
    let (r, m) = a.publish(json!({"group": "two", "data": 1}), "4").await;
    assert_eq!(r["type"], "published");
    assert_eq!(m["group"], "two");
    assert_eq!(
        a.request(json!({"type": "join", "group": "two"}), "4b").await,
        json!({"type": "joined", "group": "two", "epoch": epoch, "offset": 1, "ref": "4b"}),
        "joined carries the newest saved offset"
    );
    assert_eq!(
        a.request(json!({"type": "leave", "group": "two"}), "5").await,
        json!({"type": "left", "group": "two", "ref": "5"})
    );
    assert_eq!(
        a.request(json!({"type": "leave", "group": "two"}), "6").await["type"],
        "left",
        "idempotent"
    );
    assert_eq!(
        a.request(json!({"type": "leave", "group": "one"}), "7").await["type"],
        "left"
    );
    assert_eq!(
        a.request(json!({"type": "ping"}), "8").await,
        json!({"type": "pong", "ref": "8"}),
        "still connected"
    );
    let r = a.request(json!({"type": "join", "group": "bad name"}), "9").await;
    assert_eq!(r["code"], "invalid_group");
    let r = a.request(json!({"type": "join", "group": 5}), "10").await;
    assert_eq!(r["code"], "bad_request");
    let r = a.request(json!({"type": "join"}), "11").await;
    assert_eq!(r["code"], "bad_request");
}

#[tokio::test]
async fn history_requests() {
    let server = Server::memory();
    let (mut a, _) = Client::join(&server.ws_url("/ws/h")).await;
    for n in 1..=12 {
        a.request(json!({"type": "publish", "data": n}), &format!("p{n}")).await;
    }
    let h = a.request(json!({"type": "history", "limit": 3}), "a").await;
    assert_eq!(h["group"], "h");
    assert!(h["epoch"].is_string());
    let data: Vec<Value> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].clone())
        .collect();
    assert_eq!(data, vec![json!(10), json!(11), json!(12)], "newest, oldest first");
    assert!(h["messages"][0].get("type").is_none(), "elements have no type");
    assert_eq!(h["messages"][0]["offset"], 10);
    let h = a.request(json!({"type": "history", "since": 4, "limit": 2}), "b").await;
    let offsets: Vec<Value> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].clone())
        .collect();
    assert_eq!(offsets, vec![json!(5), json!(6)], "paging forward");
    let h = a.request(json!({"type": "history", "limit": 5000}), "c").await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 12, "limit above 1000 is 1000");
    for bad in [json!(0), json!(-1), json!(2.5), json!("3")] {
        let r = a.request(json!({"type": "history", "limit": bad}), "d").await;
        assert_eq!(r["code"], "bad_request", "limit {bad}");
    }
    let h = a.request(json!({"type": "history", "group": "never"}), "e").await;
    assert_eq!(h["messages"], json!([]));
}

#[tokio::test]
async fn direct_messages() {
    let server = Server::memory();
    let (mut a, wa) = Client::join(&server.ws_url("/ws/d")).await;
    let (mut b, wb) = Client::join(&server.ws_url("/ws/elsewhere")).await;
    let b_id = wb["channel_id"].as_str().unwrap().to_owned();
    let r = a
        .request(
            json!({"type": "direct", "to": b_id.to_uppercase(), "data": {"x": 1}}),
            "1",
        )
        .await;
    assert_eq!(r, json!({"type": "sent", "to": b_id, "ref": "1"}));
    let d = b.recv().await;
    assert_eq!(d, json!({"type": "direct", "from": wa["channel_id"], "data": {"x": 1}}));
    let ghost = "00000000-0000-4000-8000-000000000000";
    let r = a.request(json!({"type": "direct", "to": ghost, "data": 1}), "2").await;
    assert_eq!(r["code"], "not_found");
    let r = a
        .request(json!({"type": "direct", "to": "not-a-uuid", "data": 1}), "3")
        .await;
    assert_eq!(r["code"], "bad_request");
    let r = a
        .request(json!({"type": "direct", "to": b_id.replace('-', ""), "data": 1}), "4")
        .await;
    assert_eq!(r["code"], "bad_request", "only the hyphenated form");
    let r = a.request(json!({"type": "direct", "to": b_id}), "5").await;
    assert_eq!(r["code"], "bad_request", "data is required");
}

#[tokio::test]
async fn groups_and_ping() {
    let server = Server::memory();
    let (mut a, _) = Client::join(&server.ws_url("/ws/g1")).await;
    let (_b, _) = Client::join(&server.ws_url("/ws/g1")).await;
    let (_c, _) = Client::join(&server.ws_url("/ws/g2")).await;
    let r = a.request(json!({"type": "groups"}), "g").await;
    assert_eq!(r, json!({"type": "groups", "groups": {"g1": 2, "g2": 1}, "ref": "g"}));
    assert_eq!(
        a.request(json!({"type": "ping"}), "p").await,
        json!({"type": "pong", "ref": "p"})
    );
    a.send(json!({"type": "ping", "ref": 3.5})).await;
    assert_eq!(a.recv().await, json!({"type": "pong", "ref": 3.5}));
}

#[tokio::test]
async fn bad_requests_keep_the_connection_open() {
    let server = Server::memory();
    let (mut a, _) = Client::join(&server.ws_url("/ws/bad")).await;
    let cases: Vec<&str> = vec![
        "not json",
        "[1,2]",
        "\"text\"",
        r#"{"type":"nope"}"#,
        r#"{"data":1}"#,
        r#"{"type":5}"#,
        r#"{"type":"publish"}"#,
        r#"{"type":"publish","data":1,"group":5}"#,
        r#"{"type":"publish","data":1,"history":"yes"}"#,
        r#"{"type":"ping","ref":{"a":1}}"#,
    ];
    for case in cases {
        a.send_text(case).await;
        let r = a.recv().await;
        assert_eq!(r["type"], "error", "{case}");
        assert_eq!(r["code"], "bad_request", "{case}");
        assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    a.send(json!({"type": "nope", "ref": "r1"})).await;
    assert_eq!(a.recv().await["ref"], "r1", "errors echo ref");
    a.send_binary(b"\x00\x01").await;
    assert_eq!(a.recv().await["code"], "bad_request", "binary frames");
    // The frame object is level 1: 127 nested arrays in `data` make 128.
    let nested = |arrays: usize| format!("{}{}", "[".repeat(arrays), "]".repeat(arrays));
    a.send_text(&format!(r#"{{"type":"publish","data":{},"ref":"deep"}}"#, nested(128)))
        .await;
    let r = a.recv().await;
    assert_eq!(
        (r["code"].as_str(), r["ref"].as_str()),
        (Some("bad_request"), None),
        "129 levels"
    );
    a.send_text(&format!(r#"{{"type":"publish","data":{},"ref":"ok"}}"#, nested(127)))
        .await;
    let r = loop {
        let r = a.recv().await;
        if r["type"] != "message" {
            break r;
        }
    };
    assert_eq!(
        (r["type"].as_str(), r["ref"].as_str()),
        (Some("published"), Some("ok")),
        "128 levels"
    );
    let r = a
        .request(json!({"type": "publish", "group": "a b", "data": 1}), "ig")
        .await;
    assert_eq!(r["code"], "invalid_group", "invalid names before permissions");
    assert_eq!(a.request(json!({"type": "ping"}), "alive").await["type"], "pong");
}

#[tokio::test]
async fn deeply_nested_json_within_the_size_limit() {
    let server = Server::start(&["--store", "memory", "--max-message-bytes", "300000"]);
    let (mut a, _) = Client::join(&server.ws_url("/ws/deep")).await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    a.send_text(&format!(r#"{{"type":"publish","data":{deep}}}"#)).await;
    assert_eq!(a.recv().await["code"], "bad_request");
    assert_eq!(a.request(json!({"type": "ping"}), "alive").await["type"], "pong");
}

#[tokio::test]
async fn too_large_messages_close_with_1009() {
    let server = Server::start(&["--store", "memory", "--max-message-bytes", "1000"]);
    let (mut a, _) = Client::join(&server.ws_url("/ws/big")).await;
    let (mut b, _) = Client::join(&server.ws_url("/ws/big")).await;
    a.send(json!({"type": "publish", "data": "x".repeat(2000)})).await;
    let e = a.recv().await;
    assert_eq!(e["code"], "too_large");
    assert_eq!(a.closed().await, Some(1009));
    assert_eq!(
        b.request(json!({"type": "ping"}), "b").await["type"],
        "pong",
        "others are unaffected"
    );
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let server = Server::memory();
    let (mut a, _) = Client::join(&server.ws_url("/ws/utf")).await;
    a.send_invalid_utf8().await;
    assert_eq!(a.closed().await, Some(1007));
}

#[tokio::test]
async fn rate_limited_frames_are_dropped_and_answered_without_ref() {
    let server = Server::start(&["--store", "memory", "--rate-limit", "5"]);
    let (mut a, _) = Client::join(&server.ws_url("/ws/rl")).await;
    let started = std::time::Instant::now();
    for i in 0..20 {
        a.send(json!({"type": "ping", "ref": i})).await;
    }
    // Tokens refill at 5 per second while the frames are on their way.
    let refill = (started.elapsed().as_secs_f64() * 5.0).ceil() as usize + 1;
    let mut pongs = 0;
    let mut limited = 0;
    for _ in 0..20 {
        let v = a.recv().await;
        match v["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(v["code"], "rate_limited");
                assert!(v.get("ref").is_none(), "rate_limited carries no ref");
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (5..=5 + refill).contains(&pongs),
        "a burst of 5 (+{refill} refilled) got through, got {pongs}"
    );
    assert!(limited > 0);
    assert_eq!(pongs + limited, 20);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(
        a.request(json!({"type": "ping"}), "later").await["type"],
        "pong",
        "the connection stays open"
    );
}

#[tokio::test]
async fn idle_connections_expire_with_4001() {
    let server = Server::start(&["--store", "memory", "--expiry", "1"]);
    let (mut idle, _) = Client::join(&server.ws_url("/ws/e")).await;
    let (mut busy, _) = Client::join(&server.ws_url("/ws/e")).await;
    let pinger = tokio::spawn(async move {
        for i in 0..6 {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            busy.request(json!({"type": "ping"}), &format!("{i}")).await;
        }
        busy
    });
    assert_eq!(idle.closed().await, Some(4001));
    let mut busy = pinger.await.unwrap();
    assert_eq!(
        busy.request(json!({"type": "ping"}), "still").await["type"],
        "pong",
        "activity keeps it open"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_as_a_slow_consumer() {
    let server = Server::start(&["--store", "memory", "--queue", "16", "--queue-bytes", "200000"]);
    let (stalled, _) = Client::join(&server.ws_url("/ws/slow")).await;
    let (mut reader, _) = Client::join(&server.ws_url("/ws/slow")).await;
    let (mut publisher, _) = Client::join(&server.ws_url("/ws/slow")).await;
    let body = "y".repeat(8_000);
    let total = 1500;
    let rss_before = support::rss_bytes(server.child.id());
    let count_task = tokio::spawn(async move {
        let mut n = 0;
        while n < total {
            if reader.recv().await["type"] == "message" {
                n += 1;
            }
        }
        n
    });
    for i in 0..total {
        publisher
            .send(json!({"type": "publish", "data": body, "history": false, "ref": i}))
            .await;
        // Keep fewer than queue/2 publishes unacknowledged, as clients should.
        if i % 4 == 3 {
            loop {
                let v = publisher.recv().await;
                if v["type"] == "published" && v["ref"] == i {
                    break;
                }
            }
        }
    }
    assert_eq!(count_task.await.unwrap(), total, "a reading member got every message");
    // 12 MB went to a client that never read: the server's memory stays
    // bounded by the queue limits, whatever the stalled client does.
    let grown = support::rss_bytes(server.child.id()).saturating_sub(rss_before);
    eprintln!("server memory grew by {grown} bytes while 12 MB went to a stalled client");
    assert!(grown < 32 << 20, "the server grew by {grown} bytes");
    let metrics = get(&server.addr, "/metrics").await.body;
    assert!(metrics.contains("channelbox_slow_consumer_closes_total 1"), "{metrics}");
    drop(stalled);
}
