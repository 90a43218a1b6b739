//! Presence, member events and `echo` over real sockets: who is in a group
//! (over WebSocket and HTTP), `member_joined` / `member_left` for every way a
//! member leaves — `leave`, a close, being closed as a slow consumer — and
//! publishes that skip their sender.

mod support;

use std::time::Duration;

use channelbox_redis::testkit::RedisServer;
use serde_json::{json, Value};
use support::raw::upgrade;
use support::{http, Client, Server};
use tokio::io::AsyncWriteExt;

fn ids(presence: &Value) -> Vec<String> {
    let mut ids: Vec<String> = presence["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["channel_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn presence_lists_the_members_over_websocket_and_http() {
    let server = Server::memory();
    let (mut a, wa) = Client::join(&server.ws_url("/ws/room")).await;
    let (_b, wb) = Client::join(&server.ws_url("/ws/room")).await;
    let p = a.request(json!({"type": "presence"}), "p").await;
    assert_eq!(
        (p["type"].as_str(), p["group"].as_str()),
        (Some("presence"), Some("room"))
    );
    let mut want = vec![
        wa["channel_id"].as_str().unwrap().to_owned(),
        wb["channel_id"].as_str().unwrap().to_owned(),
    ];
    want.sort();
    assert_eq!(ids(&p), want);
    assert!(p["members"][0].get("user").is_none(), "no user without tokens");
    let empty = a.request(json!({"type": "presence", "group": "nobody"}), "e").await;
    assert_eq!(empty["members"], json!([]));
    let bad = a.request(json!({"type": "presence", "group": "a b"}), "x").await;
    assert_eq!(bad["code"], "invalid_group");
    let h = http(&server.addr, "GET", "/api/groups/room/presence", &[], b"").await;
    assert_eq!(h.status, 200);
    assert_eq!(ids(&h.json()), want);
}

/// On Redis, a server alone in its cluster has no other server's records
/// to read: presence lists its own members (it answered `unavailable`,
/// "empty command", when the read of the others had nothing to ask).
#[tokio::test]
async fn presence_on_redis_with_one_server_lists_its_members() {
    let redis = RedisServer::start();
    let url = redis.url();
    let server = Server::start(&["--store", "redis", "--redis-url", &url]);
    let (mut a, wa) = Client::join(&server.ws_url("/ws/room")).await;
    let p = a.request(json!({"type": "presence"}), "p").await;
    assert_eq!(p["type"], "presence", "{p}");
    assert_eq!(ids(&p), [wa["channel_id"].as_str().unwrap().to_owned()]);
    let groups = a.request(json!({"type": "groups"}), "g").await;
    assert_eq!(groups["groups"]["room"], 1, "{groups}");
}

/// The next member event `c` receives, skipping other frames.
async fn next_event(c: &mut Client) -> Value {
    loop {
        let v = c.recv().await;
        if v["type"].as_str().is_some_and(|t| t.starts_with("member_")) {
            return v;
        }
    }
}

#[tokio::test]
async fn member_events_for_every_way_of_joining_and_leaving() {
    let server = Server::memory();
    let (mut a, _) = Client::join(&server.ws_url("/ws/room?events=1")).await;
    let (quiet, wq) = Client::join(&server.ws_url("/ws/room")).await;
    let e = next_event(&mut a).await;
    assert_eq!(e["channel_id"], wq["channel_id"], "a is told of quiet, not of itself");
    drop(quiet);
    let e = next_event(&mut a).await;
    assert_eq!(
        (e["type"].as_str(), &e["channel_id"]),
        (Some("member_left"), &wq["channel_id"])
    );

    let (mut b, wb) = Client::join(&server.ws_url("/ws/room")).await;
    let b_id = wb["channel_id"].as_str().unwrap().to_owned();
    assert_eq!(
        next_event(&mut a).await,
        json!({"type": "member_joined", "group": "room", "channel_id": b_id})
    );
    b.request(json!({"type": "leave", "group": "room"}), "l").await;
    assert_eq!(next_event(&mut a).await["type"], "member_left");

    // Joining another group with events, then a member that closes.
    let side = a
        .request(json!({"type": "join", "group": "side", "events": true}), "j")
        .await;
    assert_eq!(side["type"], "joined");
    let (c, wc) = Client::join(&server.ws_url("/ws/side")).await;
    let c_id = wc["channel_id"].as_str().unwrap().to_owned();
    let e = next_event(&mut a).await;
    assert_eq!(
        (e["type"].as_str(), e["group"].as_str()),
        (Some("member_joined"), Some("side"))
    );
    drop(c);
    let e = next_event(&mut a).await;
    assert_eq!(e, json!({"type": "member_left", "group": "side", "channel_id": c_id}));

    // A member that never reads is closed as a slow consumer: it leaves too.
    let (mut slow, status) = upgrade(&server.addr, "/ws/room", &[]).await;
    assert_eq!(status, 101);
    let joined = next_event(&mut a).await;
    assert_eq!(joined["type"], "member_joined");
    // 20 MB from the backend: more than the kernel buffers for a client
    // that never reads, so its queue fills; a reads all the while.
    let addr = server.addr.clone();
    let body = serde_json::to_vec(&"y".repeat(50_000)).unwrap();
    let posting = tokio::spawn(async move {
        for _ in 0..400 {
            if http(&addr, "POST", "/api/groups/room/messages", &[], &body)
                .await
                .status
                != 200
            {
                break;
            }
        }
    });
    let left = tokio::time::timeout(Duration::from_secs(20), next_event(&mut a))
        .await
        .expect("the slow consumer's leave is reported");
    posting.abort();
    assert_eq!(
        (left["type"].as_str(), left["channel_id"].clone()),
        (Some("member_left"), joined["channel_id"].clone())
    );
    let _ = slow.shutdown().await;
}

#[tokio::test]
async fn echo_false_skips_the_sender_only() {
    let server = Server::memory();
    let (mut a, _) = Client::join(&server.ws_url("/ws/echo")).await;
    let (mut b, _) = Client::join(&server.ws_url("/ws/echo")).await;
    let r = a
        .request(json!({"type": "publish", "data": "quiet", "echo": false}), "q")
        .await;
    assert_eq!(r["type"], "published");
    assert_eq!(b.recv().await["data"], "quiet");
    let (_, m) = a.publish(json!({"data": "loud"}), "l").await;
    assert_eq!(
        m["data"], "loud",
        "the next message a gets is its echoed one, not 'quiet'"
    );
}
