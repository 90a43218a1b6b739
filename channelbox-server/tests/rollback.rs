//! Redis going back in time under a running cluster: SIGKILLed and restarted
//! from a snapshot taken a few messages earlier, while the chat servers keep
//! running. No (epoch, offset) pair may then name two messages in anything a
//! client received, was acknowledged or read from history: the group goes on
//! in a new epoch (made once, by whichever server noticed first), recovery
//! from the old epoch says `complete:false`, and publishing resumes.

mod support;

use std::time::{Duration, Instant};

use channelbox_redis::testkit::RedisServer;
use futures_util::StreamExt;
use serde_json::{json, Value};
use support::ledger::Ledger;
use support::{get, parse_json, Client, Server};
use tokio_tungstenite::tungstenite::Message;

/// One server of a cluster on `redis`.
fn node(redis: &RedisServer) -> Server {
    Server::start(&["--store", "redis", "--redis-url", &redis.url()])
}

/// Reads frames until the server closes the connection, recording every saved
/// message; returns the close code. Panics after `within`.
async fn until_closed(c: &mut Client, ledger: &mut Ledger, source: &str, within: Duration) -> Option<u16> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let item = tokio::time::timeout(left, c.ws.next())
            .await
            .unwrap_or_else(|_| panic!("{source}: not closed within {within:?}"));
        match item {
            Some(Ok(Message::Text(t))) => {
                ledger.record_frame(&parse_json(&t), source);
            }
            Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    }
}

/// Reads frames until a saved message with offset `last`, recording each.
async fn until_offset(c: &mut Client, last: u64, ledger: &mut Ledger, source: &str) {
    loop {
        let v = c.recv().await;
        if ledger.record_frame(&v, source) && v["offset"].as_u64() >= Some(last) {
            return;
        }
    }
}

/// Publishes `data` and waits for its `published`, recording the answer.
async fn publish(c: &mut Client, data: Value, ledger: &mut Ledger, source: &str) -> Value {
    let reference = data.to_string();
    let (published, message) = c.publish(json!({ "data": data }), &reference).await;
    assert_eq!(published["type"], "published", "{source}: {published}");
    ledger.record_published(&published, &data, source);
    ledger.record_frame(&message, source);
    published
}

/// Records both servers' history of `group`; returns the first answer.
async fn record_history(servers: &[&Server], group: &str, ledger: &mut Ledger) -> Value {
    let mut first = None;
    for (i, s) in servers.iter().enumerate() {
        let answer = get(&s.addr, &format!("/api/groups/{group}/history?limit=1000")).await;
        assert_eq!(answer.status, 200, "history on server {i}: {}", answer.body);
        let body = answer.json();
        ledger.record_history(&body, &format!("history on server {i}"));
        first.get_or_insert(body);
    }
    first.unwrap_or_default()
}

/// Waits until every server answers `/healthz` with 200.
async fn healthy(servers: &[&Server]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for s in servers {
        while get(&s.addr, "/healthz").await.status != 200 {
            assert!(Instant::now() < deadline, "a server stayed unhealthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Connects with `since`/`epoch` and returns the `recovered` frame.
async fn recover(server: &Server, since: u64, epoch: &str, ledger: &mut Ledger, source: &str) -> (Client, Value) {
    let (mut c, welcome) = Client::join(&server.ws_url(&format!("/ws/room?since={since}&epoch={epoch}"))).await;
    assert_ne!(welcome["epoch"], epoch, "{source}: the welcome names the new epoch");
    loop {
        let v = c.recv().await;
        if v["type"] == "recovered" {
            return (c, v);
        }
        ledger.record_frame(&v, source);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_from_an_older_snapshot_never_reuses_an_epoch_offset_pair() {
    const BEFORE: u64 = 10;
    const LOST: u64 = 5;
    let mut redis = RedisServer::start();
    let (a, b) = (node(&redis), node(&redis));
    let mut ledger = Ledger::new();
    let (mut member_a, welcome) = Client::join(&a.ws_url("/ws/room")).await;
    let (mut member_b, _) = Client::join(&b.ws_url("/ws/room")).await;
    let old_epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    let (mut publisher, _) = Client::join(&a.ws_url("/ws/room")).await;
    for n in 1..=BEFORE {
        publish(&mut publisher, json!({ "n": n }), &mut ledger, "publisher").await;
    }
    redis.snapshot();
    for n in BEFORE + 1..=BEFORE + LOST {
        publish(&mut publisher, json!({ "n": n }), &mut ledger, "publisher").await;
    }
    until_offset(&mut member_a, BEFORE + LOST, &mut ledger, "member on a").await;
    until_offset(&mut member_b, BEFORE + LOST, &mut ledger, "member on b").await;
    record_history(&[&a, &b], "room", &mut ledger).await;

    // Redis loses the last five messages; the servers keep running and notice.
    redis.restart_from_snapshot();
    let within = Duration::from_secs(15);
    for (c, source) in [
        (&mut member_a, "member on a"),
        (&mut member_b, "member on b"),
        (&mut publisher, "publisher"),
    ] {
        let code = until_closed(c, &mut ledger, source, within).await;
        assert_eq!(code, Some(4002), "{source} is closed with 4002 insufficient state");
    }
    healthy(&[&a, &b]).await;

    // Recovery from any position of the old epoch is incomplete, on either
    // server: the old epoch ended where Redis lost it.
    let (mut watcher_b, recovered) = recover(&b, BEFORE + LOST, &old_epoch, &mut ledger, "recovery on b").await;
    assert_eq!(recovered["complete"], false, "{recovered}");
    let (mut watcher_a, recovered) = recover(&a, BEFORE - 2, &old_epoch, &mut ledger, "recovery on a").await;
    assert_eq!(recovered["complete"], false, "{recovered}");

    // Publishing resumes, in the new epoch, after the surviving messages.
    let (mut publisher, _) = Client::join(&b.ws_url("/ws/room")).await;
    let mut new_epochs = Vec::new();
    for n in 1..=LOST {
        let published = publish(&mut publisher, json!({ "after": n }), &mut ledger, "publisher after").await;
        new_epochs.push(published["epoch"].as_str().unwrap_or_default().to_owned());
        assert!(published["offset"].as_u64() > Some(BEFORE), "{published}");
    }
    new_epochs.dedup();
    assert_eq!(new_epochs.len(), 1, "one new epoch: {new_epochs:?}");
    assert_ne!(new_epochs[0], old_epoch);
    let last = ledger.last("room", &new_epochs[0]).expect("new messages");
    until_offset(&mut watcher_a, last, &mut ledger, "watcher on a").await;
    until_offset(&mut watcher_b, last, &mut ledger, "watcher on b").await;
    let history = record_history(&[&a, &b], "room", &mut ledger).await;
    assert_eq!(history["epoch"], new_epochs[0].as_str());
    let kept: Vec<u64> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["offset"].as_u64())
        .collect();
    assert_eq!(
        kept,
        (1..=BEFORE + LOST).collect::<Vec<_>>(),
        "the survivors keep their offsets, the new messages follow"
    );
    ledger.assert_unique();
    assert_eq!(ledger.epochs("room").len(), 2, "the old epoch and one new one");
}
