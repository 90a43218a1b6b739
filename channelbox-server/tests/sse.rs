//! Server-Sent Events against the real binary (docs/protocol.md "Server-Sent
//! Events"): the receive side of the protocol over `GET /sse/{group}` —
//! messages with their ids, `Last-Event-ID` recovery, heartbeat comments,
//! membership and `direct`, the close events of close-all, of a slow
//! consumer, of a cluster that lost a group's history (4002) and of a
//! stream that takes nothing (4003), the refusals before the stream, and a
//! cluster on Redis.

mod support;

use std::time::{Duration, Instant};

use channelbox_redis::testkit::RedisServer;
use serde_json::{json, Value};
use support::sse::{Sse, SseEvent};
use support::{get, http, Client, Server};

const ADMIN: &str = "sse-admin-token";

async fn publish(addr: &str, group: &str, data: &Value) -> Value {
    let path = format!("/api/groups/{group}/messages");
    let answer = http(addr, "POST", &path, &[], data.to_string().as_bytes()).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()
}

/// Asserts a saved message's event: its type, id and data.
fn assert_message(e: &SseEvent, epoch: &str, offset: u64, data: &Value) {
    assert_eq!(e.event.as_deref(), Some("message"), "{e:?}");
    assert_eq!(e.id.as_deref(), Some(format!("{epoch}:{offset}").as_str()), "{e:?}");
    let m = e.json();
    assert_eq!(
        (m["type"].as_str(), m["offset"].as_u64()),
        (Some("message"), Some(offset))
    );
    assert_eq!(&m["data"], data);
}

/// Waits (within 10 s) until `check` holds for the answer of `GET path`.
async fn eventually(addr: &str, path: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = get(addr, path).await.json();
        if check(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{path} never satisfied the check: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn http_publishes_arrive_as_events_with_ids_and_pings_as_comments() {
    let server = Server::start(&["--store", "memory", "--ping-interval", "1", "--pong-timeout", "1"]);
    let mut sse = Sse::open(&server.addr, "/sse/chat", &[]).await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.header("content-type").as_deref(), Some("text/event-stream"));
    let welcome = sse.event().await;
    assert_eq!(welcome.event.as_deref(), Some("welcome"));
    let epoch = welcome.json()["epoch"].as_str().expect("epoch").to_owned();
    let at_join = format!("{epoch}:0");
    assert_eq!(welcome.id.as_deref(), Some(at_join.as_str()), "the position at join");
    for n in 1..=3u64 {
        let data = json!({"n": n, "text": "line one\nline two"});
        let answer = publish(&server.addr, "chat", &data).await;
        assert_eq!(answer["offset"], n);
        assert_message(&sse.event().await, &epoch, n, &data);
    }
    // Heartbeats are comments; a client that reads them stays connected
    // past the ping interval plus the pong timeout, several times over.
    let mut pings = 0;
    while pings < 4 {
        let e = sse.next().await.expect("the stream stays open");
        if e.comment.as_deref() == Some("ping") {
            pings += 1;
        }
    }
    let data = json!({"after": "pings"});
    publish(&server.addr, "chat", &data).await;
    assert_message(&sse.event().await, &epoch, 4, &data);
}

#[tokio::test]
async fn last_event_id_recovers_over_the_query_completely_or_says_it_cannot() {
    let server = Server::memory();
    let mut epoch = String::new();
    for n in 1..=5u64 {
        epoch = publish(&server.addr, "room", &json!({"n": n})).await["epoch"]
            .as_str()
            .expect("epoch")
            .to_owned();
    }
    // The header wins over the query's since/epoch.
    let query = format!("/sse/room?since=4&epoch={epoch}");
    let last = format!("{epoch}:2");
    let mut sse = Sse::open(&server.addr, &query, &[("Last-Event-ID", &last)]).await;
    assert_eq!(sse.event().await.event.as_deref(), Some("welcome"));
    for n in 3..=5u64 {
        assert_message(&sse.event().await, &epoch, n, &json!({"n": n}));
    }
    let recovered = sse.event().await;
    assert_eq!(recovered.event.as_deref(), Some("recovered"));
    let r = recovered.json();
    assert_eq!(
        (r["from"].as_u64(), r["to"].as_u64(), r["complete"].as_bool()),
        (Some(2), Some(5), Some(true))
    );
    // Live after the replay, no gap and no duplicate.
    publish(&server.addr, "room", &json!({"n": 6})).await;
    assert_message(&sse.event().await, &epoch, 6, &json!({"n": 6}));

    // An epoch the server never had: nothing replayed, complete:false.
    let mut lost = Sse::open(&server.addr, "/sse/room", &[("Last-Event-ID", "gone-1.0:3")]).await;
    assert_eq!(lost.event().await.event.as_deref(), Some("welcome"));
    let recovered = lost.event().await;
    assert_eq!(recovered.event.as_deref(), Some("recovered"), "{recovered:?}");
    assert_eq!(recovered.json()["complete"], false);
}

/// A browser's `EventSource` sends `Last-Event-ID` only once it saw an id:
/// `welcome` carries the group's position at join, so a stream that drops
/// before any saved message arrived still recovers what came in between.
#[tokio::test]
async fn reconnecting_with_the_id_of_welcome_recovers_what_was_published_in_between() {
    let server = Server::memory();
    for n in 1..=2u64 {
        publish(&server.addr, "room", &json!({"n": n})).await;
    }
    let mut sse = Sse::open(&server.addr, "/sse/room", &[]).await;
    let welcome = sse.event().await;
    assert_eq!(welcome.event.as_deref(), Some("welcome"));
    let w = welcome.json();
    let epoch = w["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(w["offset"], 2);
    let id = welcome.id.clone().expect("welcome carries an id");
    assert_eq!(id, format!("{epoch}:2"));
    drop(sse);
    eventually(&server.addr, "/api/groups", |g| g.get("room").is_none_or(|n| n == 0)).await;
    publish(&server.addr, "room", &json!({"n": 3})).await;

    let mut back = Sse::open(&server.addr, "/sse/room", &[("Last-Event-ID", &id)]).await;
    let welcome = back.event().await;
    assert_eq!(welcome.event.as_deref(), Some("welcome"));
    assert_eq!(
        welcome.id, None,
        "a recovering stream's welcome has no id: a drop before the replay must not skip it"
    );
    assert_message(&back.event().await, &epoch, 3, &json!({"n": 3}));
    let recovered = back.event().await;
    assert_eq!(recovered.event.as_deref(), Some("recovered"), "{recovered:?}");
    let r = recovered.json();
    assert_eq!(
        (r["from"].as_u64(), r["to"].as_u64(), r["complete"].as_bool()),
        (Some(2), Some(3), Some(true))
    );
    let after_replay = format!("{epoch}:3");
    assert_eq!(
        recovered.id.as_deref(),
        Some(after_replay.as_str()),
        "recovered carries the position live delivery starts after"
    );
    publish(&server.addr, "room", &json!({"n": 4})).await;
    assert_message(&back.event().await, &epoch, 4, &json!({"n": 4}));
}

/// After a recovery that found the history gone, `recovered`'s id is the
/// new position at join, so a stream that drops before the next message
/// does not ask for the lost epoch again.
#[tokio::test]
async fn after_an_incomplete_recovery_the_id_moves_to_the_position_at_join() {
    let server = Server::memory();
    let epoch = publish(&server.addr, "room", &json!({"n": 1})).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let mut sse = Sse::open(&server.addr, "/sse/room?since=7&epoch=gone-1.0", &[]).await;
    assert_eq!(sse.event().await.id, None);
    let recovered = sse.event().await;
    assert_eq!(recovered.json()["complete"], false, "{recovered:?}");
    let at_join = format!("{epoch}:1");
    assert_eq!(recovered.id.as_deref(), Some(at_join.as_str()));
    publish(&server.addr, "room", &json!({"n": 2})).await;
    assert_message(&sse.event().await, &epoch, 2, &json!({"n": 2}));
}

#[tokio::test]
async fn a_stream_is_a_member_counted_listed_and_reachable_by_direct() {
    let server = Server::memory();
    let mut sse = Sse::open(&server.addr, "/sse/room?events=1", &[]).await;
    let id = sse.event().await.json()["channel_id"].as_str().expect("id").to_owned();
    let groups = get(&server.addr, "/api/groups").await.json();
    assert_eq!(groups["room"], 1, "{groups}");
    let presence = get(&server.addr, "/api/groups/room/presence").await.json();
    assert_eq!(presence["members"][0]["channel_id"], id.as_str(), "{presence}");
    assert_eq!(server.metric("channelbox_connections").await, 1.0);

    let (mut ws, _) = Client::join(&server.ws_url("/ws/room?events=1")).await;
    let joined = sse.event().await;
    assert_eq!(joined.event.as_deref(), Some("member_joined"), "{joined:?}");
    let sent = ws
        .request(json!({"type": "direct", "to": id, "data": {"hi": 1}}), "d")
        .await;
    assert_eq!(sent["type"], "sent", "{sent}");
    let direct = sse.event().await;
    assert_eq!(direct.event.as_deref(), Some("direct"), "{direct:?}");
    assert_eq!(direct.json()["data"], json!({"hi": 1}));
    ws.publish(json!({"type": "publish", "data": "from ws"}), "p").await;
    assert_eq!(sse.until("message").await.json()["data"], "from ws");

    // The client goes away: the stream's channel leaves its group.
    drop(sse);
    eventually(&server.addr, "/api/groups", |g| g["room"] == 1).await;
    assert_eq!(ws.recv_type("member_left").await["channel_id"], id.as_str());
}

#[tokio::test]
async fn close_all_sends_a_close_event_and_ends_the_stream() {
    let server = Server::start(&["--store", "memory", "--admin-token", ADMIN]);
    let mut sse = Sse::open(&server.addr, "/sse/chat", &[]).await;
    assert_eq!(sse.event().await.event.as_deref(), Some("welcome"));
    let auth = format!("Bearer {ADMIN}");
    let closed = http(
        &server.addr,
        "POST",
        "/api/admin/close-all",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(closed.status, 200, "{}", closed.body);
    let close = sse.event().await;
    assert_eq!(close.event.as_deref(), Some("close"));
    assert_eq!(close.json(), json!({"code": 1001, "reason": "going away"}));
    assert!(sse.next().await.is_none(), "the stream ends after its close event");
}

#[tokio::test]
async fn a_stream_that_stops_reading_is_closed_as_a_slow_consumer() {
    let server = Server::start(&["--store", "memory", "--queue", "4", "--queue-bytes", "262144"]);
    let mut slow = Sse::open_with_buffer(&server.addr, "/sse/flood", &[], Some(4096)).await;
    assert_eq!(slow.event().await.event.as_deref(), Some("welcome"));
    let mut fast = Sse::open(&server.addr, "/sse/flood", &[]).await;
    assert_eq!(fast.event().await.event.as_deref(), Some("welcome"));
    // The slow one reads nothing while 48 KB messages are published until
    // its queue overflows; the fast one keeps up.
    let text = "x".repeat(48 * 1024);
    let mut sent = 0u64;
    while server.metric("channelbox_slow_consumer_closes_total").await < 1.0 {
        assert!(sent < 2_000, "no slow consumer after {sent} messages");
        for _ in 0..10 {
            sent += 1;
            publish(&server.addr, "flood", &json!({"n": sent, "text": text})).await;
            assert_eq!(fast.until("message").await.json()["data"]["n"], sent);
        }
    }
    // Reading again, it finds in-order messages, then the close event, then
    // the end of the stream.
    let mut last = 0;
    let close = loop {
        let e = slow.next().await.expect("the close event before the end");
        match e.event.as_deref() {
            Some("message") => {
                let n = e.json()["data"]["n"].as_u64().expect("n");
                assert_eq!(n, last + 1, "in order, no gap");
                last = n;
            }
            Some("close") => break e,
            _ => {}
        }
    };
    assert_eq!(close.json(), json!({"code": 4000, "reason": "slow consumer"}));
    assert!(slow.next().await.is_none(), "the stream ends after its close event");
    assert!(last < sent, "the slow consumer missed the rest");
}

#[tokio::test]
async fn refused_before_the_stream_as_an_upgrade_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("channelbox.toml");
    std::fs::write(&config, "[namespaces.quiet]\nevents = false\n").expect("write");
    let config = config.to_str().expect("utf-8");
    let server = Server::start(&[
        "--store",
        "memory",
        "--config",
        config,
        "--allowed-origin",
        "https://chat.example",
        "--max-connections",
        "1",
    ]);
    let refused = |path: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let addr = server.addr.clone();
        async move {
            let answer = http(&addr, "GET", path, headers, b"").await;
            (
                answer.status,
                answer.json()["code"].as_str().unwrap_or_default().to_owned(),
            )
        }
    };
    assert_eq!(refused("/sse/a%20b", &[]).await, (400, "invalid_group".into()));
    assert_eq!(refused("/sse/chat?since=x", &[]).await.0, 400);
    assert_eq!(refused("/sse/chat", &[("Last-Event-ID", "no-offset")]).await.0, 400);
    assert_eq!(
        refused("/sse/quiet:room?events=1", &[]).await,
        (403, "forbidden".into())
    );
    let evil: &[(&str, &str)] = &[("Origin", "https://evil.example")];
    assert_eq!(refused("/sse/chat", evil).await, (403, "forbidden".into()));
    // The one connection allowed is taken: 503.
    let mut open = Sse::open(&server.addr, "/sse/chat", &[("Origin", "https://chat.example")]).await;
    assert_eq!(open.event().await.event.as_deref(), Some("welcome"));
    assert_eq!(refused("/sse/chat", &[]).await, (503, "unavailable".into()));

    let secret = "an-sse-test-secret-of-at-least-32-bytes";
    let tokens = Server::start(&["--store", "memory", "--token-secret", secret]);
    let answer = http(&tokens.addr, "GET", "/sse/chat", &[], b"").await;
    assert_eq!(
        (answer.status, answer.json()["code"].clone()),
        (401, json!("unauthorized"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_one_server_receives_what_another_server_publishes() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args = ["--store", "redis", "--redis-url", &url];
    let (listener, publisher) = (Server::start(&args), Server::start(&args));
    let mut sse = Sse::open(&listener.addr, "/sse/news", &[]).await;
    let welcome = sse.event().await.json();
    let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    let start = welcome["offset"].as_u64().expect("offset");
    for n in 1..=20u64 {
        let answer = publish(&publisher.addr, "news", &json!({"n": n})).await;
        assert_eq!(answer["epoch"], epoch.as_str());
    }
    for n in 1..=20u64 {
        assert_message(&sse.event().await, &epoch, start + n, &json!({"n": n}));
    }
    // Recovery on the other server from the last id seen halfway.
    let last = format!("{epoch}:{}", start + 10);
    let mut again = Sse::open(&publisher.addr, "/sse/news", &[("Last-Event-ID", &last)]).await;
    assert_eq!(again.event().await.event.as_deref(), Some("welcome"));
    for n in 11..=20u64 {
        assert_message(&again.event().await, &epoch, start + n, &json!({"n": n}));
    }
    assert_eq!(again.event().await.json()["complete"], true);
}

/// The next `close` event, reading past everything else; then the end.
async fn close_event(sse: &mut Sse) -> Value {
    let close = loop {
        let e = sse.next().await.expect("a close event before the end");
        if e.event.as_deref() == Some("close") {
            break e.json();
        }
    };
    assert!(sse.next().await.is_none(), "the stream ends after its close event");
    close
}

/// Redis restarted empty under a cluster: the group's history is gone, so a
/// stream is closed with 4002 `insufficient state`, as a WebSocket is, and
/// reconnecting with its last id is told that nothing can be recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lost_in_a_cluster_closes_a_stream_with_4002() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let args = ["--store", "redis", "--redis-url", &url];
    let (listener, publisher) = (Server::start(&args), Server::start(&args));
    let mut sse = Sse::open(&listener.addr, "/sse/g", &[]).await;
    let welcome = sse.event().await;
    let mut last = welcome.id.clone().expect("welcome's id");
    for n in 1..=5u64 {
        publish(&publisher.addr, "g", &json!({"n": n})).await;
        last = sse.until("message").await.id.expect("a saved message's id");
    }
    redis.kill();
    redis.restart();
    assert_eq!(
        close_event(&mut sse).await,
        json!({"code": 4002, "reason": "insufficient state"})
    );
    // The server answers 503 until it is back on Redis.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut back = loop {
        let s = Sse::open(&listener.addr, "/sse/g", &[("Last-Event-ID", &last)]).await;
        if s.status == 200 {
            break s;
        }
        assert_eq!(s.status, 503, "{}", s.head);
        assert!(Instant::now() < deadline, "still refused 10 s after Redis came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let welcome = back.event().await.json();
    assert_ne!(
        Some(welcome["epoch"].as_str().expect("epoch")),
        last.rsplit_once(':').map(|(e, _)| e)
    );
    let recovered = back.until("recovered").await.json();
    assert_eq!(recovered["complete"], false, "history was lost: {recovered}");
}

/// A stream whose client stops reading takes nothing, not even the `: ping`
/// comments: once its socket is full it is silent, and with a queue large
/// enough not to overflow first it is closed with 4003 `no pong`; it leaves
/// its group at once, and a client that reads again finds the close event.
#[tokio::test]
async fn a_stream_that_takes_nothing_is_closed_with_4003() {
    // Twice what the server's send buffer can grow to (tcp_wmem's maximum,
    // 4 MB by default), so that the body is no longer taken; the queue holds
    // four times that, so that it does not overflow first.
    let text = "x".repeat(48 * 1024);
    let messages = 2 * send_buffer_max() / text.len() + 20;
    let queue_bytes = (4 * messages * (text.len() + 1024)).to_string();
    let server = Server::start(&[
        "--store",
        "memory",
        "--ping-interval",
        "1",
        "--pong-timeout",
        "1",
        "--queue",
        "100000",
        "--queue-bytes",
        &queue_bytes,
    ]);
    let mut stuck = Sse::open_with_buffer(&server.addr, "/sse/silent", &[], Some(4096)).await;
    assert_eq!(stuck.event().await.event.as_deref(), Some("welcome"));
    for n in 1..=messages as u64 {
        publish(&server.addr, "silent", &json!({"n": n, "text": text})).await;
    }
    eventually(&server.addr, "/api/groups", |g| g.get("silent").is_none_or(|n| n == 0)).await;
    assert_eq!(
        close_event(&mut stuck).await,
        json!({"code": 4003, "reason": "no pong"})
    );
    assert_eq!(server.metric("channelbox_slow_consumer_closes_total").await, 0.0);
}

/// The largest send buffer the kernel grows a TCP socket's to (the third
/// figure of `net.ipv4.tcp_wmem`), or Linux's default of 4 MB.
fn send_buffer_max() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20)
}
