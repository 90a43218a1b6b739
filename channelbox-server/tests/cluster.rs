//! A cluster for real: chat server processes with `--store redis` against a
//! redis-server this test starts (and kills, restarts, pauses), checked the
//! way clients see it — offsets in order with no gap and no duplicate on
//! every server, recovery on another server, 4002 when history was lost.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use channelbox_redis::testkit::RedisServer;
use serde_json::{json, Value};
use support::{get, http, Client, Event, Server};

const ADMIN: &str = "cluster-admin-token";

/// `n` servers of one cluster.
fn cluster(redis: &RedisServer, n: usize) -> Vec<Server> {
    (0..n).map(|_| node(redis)).collect()
}

fn node(redis: &RedisServer) -> Server {
    let url = redis.url();
    Server::start(&["--store", "redis", "--redis-url", &url, "--admin-token", ADMIN])
}

/// Reads `message` frames of `group` until one with offset `last`; returns
/// their offsets and data in arrival order.
async fn collect_until(c: &mut Client, last: u64) -> Vec<(u64, Value)> {
    let mut got = Vec::new();
    loop {
        let v = c.recv().await;
        if v["type"] == "message" {
            let offset = v["offset"].as_u64().expect("saved messages have offsets");
            got.push((offset, v["data"].clone()));
            if offset >= last {
                return got;
            }
        }
    }
}

/// Waits until `check` holds, polling; panics naming `what` after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_on_every_server_give_every_member_one_gapless_sequence() {
    let redis = RedisServer::start();
    let servers = cluster(&redis, 3);
    const PER_PUBLISHER: u64 = 300;
    let total = PER_PUBLISHER * servers.len() as u64;
    let mut members = Vec::new();
    for s in &servers {
        for _ in 0..2 {
            members.push(Client::join(&s.ws_url("/ws/room")).await.0);
        }
    }
    let mut publishers = Vec::new();
    for s in &servers {
        publishers.push(Client::join(&s.ws_url("/ws/room")).await.0);
    }
    // Every publisher sends all its messages at once (pipelined), all together.
    let sends = publishers.into_iter().enumerate().map(|(p, mut c)| {
        tokio::spawn(async move {
            for n in 0..PER_PUBLISHER {
                c.send(json!({"type": "publish", "ref": n, "data": {"p": p, "n": n}}))
                    .await;
            }
            // Replies may come in another order than the requests (the
            // protocol says so); the offsets, read in send order by `ref`,
            // may not.
            let mut acked = vec![0; PER_PUBLISHER as usize];
            let mut answered = 0;
            while answered < PER_PUBLISHER as usize {
                let v = c.recv().await;
                if v["type"] == "published" {
                    let n = v["ref"].as_u64().expect("ref") as usize;
                    acked[n] = v["offset"].as_u64().expect("offset");
                    answered += 1;
                }
            }
            acked
        })
    });
    let sends: Vec<_> = sends.collect();
    for (i, m) in members.iter_mut().enumerate() {
        let got = collect_until(m, total).await;
        let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (1..=total).collect::<Vec<_>>(),
            "member {i}: offsets 1..={total} in order, once each"
        );
        for p in 0..servers.len() as u64 {
            let ns: Vec<u64> = got
                .iter()
                .filter(|(_, d)| d["p"] == p)
                .map(|(_, d)| d["n"].as_u64().unwrap_or(u64::MAX))
                .collect();
            assert_eq!(
                ns,
                (0..PER_PUBLISHER).collect::<Vec<_>>(),
                "member {i}: publisher {p}'s messages in its send order"
            );
        }
    }
    for s in sends {
        let acked = s.await.expect("publisher");
        assert!(
            acked.windows(2).all(|w| w[0] < w[1]),
            "one connection's offsets follow its send order"
        );
    }
    // What the members received is what Redis keeps.
    let history = get(&servers[2].addr, "/api/groups/room/history?limit=1000")
        .await
        .json();
    let kept: Vec<u64> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["offset"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(kept, (1..=total).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_while_publishing_loses_nothing_it_acknowledged() {
    let redis = RedisServer::start();
    let mut doomed = node(&redis);
    let survivor = node(&redis);
    let (mut watcher, welcome) = Client::join(&doomed.ws_url("/ws/live")).await;
    let epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    let (mut publisher, _) = Client::join(&doomed.ws_url("/ws/live")).await;
    for n in 0..2000 {
        publisher
            .send(json!({"type": "publish", "data": {"n": n}, "echo": false}))
            .await;
    }
    // Kill it mid-stream, once some publishes were acknowledged.
    let mut acked = BTreeMap::new();
    while acked.len() < 50 {
        let v = publisher.recv().await;
        if v["type"] == "published" {
            acked.insert(v["offset"].as_u64().expect("offset"), ());
        }
    }
    let mut seen = 0;
    while seen < 20 {
        let v = watcher.recv().await;
        if v["type"] == "message" {
            seen = v["offset"].as_u64().expect("offset");
        }
    }
    doomed.child.kill().expect("SIGKILL");
    // Whatever else the publisher had acknowledged before the kill.
    while let Event::Json(v) = publisher.next_event().await {
        if v["type"] == "published" {
            acked.insert(v["offset"].as_u64().expect("offset"), ());
        }
    }
    while let Event::Json(v) = watcher.next_event().await {
        if v["type"] == "message" {
            seen = v["offset"].as_u64().expect("offset");
        }
    }
    // The watcher recovers on the other server.
    let url = survivor.ws_url(&format!("/ws/live?since={seen}&epoch={epoch}"));
    let (mut back, welcome) = Client::join(&url).await;
    assert_eq!(welcome["epoch"], epoch.as_str(), "the same epoch on every server");
    let mut next = seen + 1;
    loop {
        let v = back.recv().await;
        match v["type"].as_str() {
            Some("message") => {
                assert_eq!(v["offset"], next, "replayed offsets continue without a gap");
                next += 1;
            }
            Some("recovered") => {
                assert_eq!(v["complete"], true, "{v}");
                assert_eq!(v["from"], seen);
                break;
            }
            _ => {}
        }
    }
    let last_acked = *acked.keys().last().expect("acks");
    assert!(
        next > last_acked,
        "every acknowledged message was replayed (up to {last_acked}, got to {})",
        next - 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_closes_members_with_4002_and_starts_a_new_epoch() {
    let mut redis = RedisServer::start();
    let servers = cluster(&redis, 2);
    let (mut member, welcome) = Client::join(&servers[0].ws_url("/ws/g")).await;
    let old_epoch = welcome["epoch"].as_str().expect("epoch").to_owned();
    let (mut other, _) = Client::join(&servers[1].ws_url("/ws/g")).await;
    for n in 0..5 {
        other.publish(json!({"data": n}), &format!("p{n}")).await;
    }
    redis.kill();
    redis.restart();
    assert_eq!(
        member.closed().await,
        Some(4002),
        "insufficient state once the loss is noticed"
    );
    assert_eq!(other.closed().await, Some(4002));
    let url = servers[0].ws_url(&format!("/ws/g?since=5&epoch={old_epoch}"));
    let mut back = None;
    eventually(Duration::from_secs(10), "upgrades accepted again", || async {
        get(&servers[0].addr, "/healthz").await.status == 200
    })
    .await;
    let (mut c, welcome) = Client::join(&url).await;
    assert_ne!(welcome["epoch"], old_epoch.as_str(), "a new epoch");
    let recovered = c.recv_type("recovered").await;
    assert_eq!(recovered["complete"], false, "history was lost: {recovered}");
    let (published, _) = c.publish(json!({"data": "again"}), "again").await;
    assert_eq!(
        published["offset"], 1,
        "publishing works again, from offset 1: {published}"
    );
    back.replace(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_subscription_connections_leave_no_gap_even_at_the_tail() {
    let redis = RedisServer::start();
    let servers = cluster(&redis, 2);
    let (mut member, _) = Client::join(&servers[1].ws_url("/ws/t")).await;
    let (mut publisher, _) = Client::join(&servers[0].ws_url("/ws/t")).await;
    let mut sent = 0;
    for round in 0..5 {
        for _ in 0..20 {
            sent += 1;
            publisher
                .send(json!({"type": "publish", "data": sent, "echo": false}))
                .await;
        }
        redis.run(&["CLIENT", "KILL", "TYPE", "pubsub"]).expect("client kill");
        // The last message of a round goes out right after the kill, then
        // nothing: only the head check can find it if it was lost.
        sent += 1;
        publisher
            .send(json!({"type": "publish", "data": sent, "echo": false}))
            .await;
        let got = collect_until(&mut member, sent).await;
        let first = got.first().map_or(0, |(o, _)| *o);
        let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (first..=sent).collect::<Vec<_>>(),
            "round {round}: no gap, no duplicate"
        );
        assert_eq!(first, sent - 20, "round {round}: continues the previous round");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_answers_unavailable_and_service_resumes_by_itself() {
    let redis = RedisServer::start();
    let servers = cluster(&redis, 2);
    let (mut member, _) = Client::join(&servers[0].ws_url("/ws/u")).await;
    let (mut remote, _) = Client::join(&servers[1].ws_url("/ws/u")).await;
    member.publish(json!({"data": "before"}), "before").await;
    remote.recv_type("message").await;
    // Unreachable without losing anything: the process stops answering.
    let pid = redis.pid().expect("pid").to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("SIGSTOP");
    eventually(Duration::from_secs(4), "healthz answers 503", || async {
        get(&servers[0].addr, "/healthz").await.status == 503
    })
    .await;
    let refused = member
        .request(json!({"type": "publish", "data": "during"}), "during")
        .await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    let pong = member.request(json!({"type": "ping"}), "ping").await;
    assert_eq!(pong["type"], "pong", "the connection stays open");
    let posted = http(
        &servers[1].addr,
        "POST",
        "/api/groups/u/messages",
        &[("Content-Type", "application/json")],
        b"1",
    )
    .await;
    assert_eq!(posted.status, 503);
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .expect("SIGCONT");
    eventually(Duration::from_secs(6), "healthz answers 200 again", || async {
        get(&servers[0].addr, "/healthz").await.status == 200
    })
    .await;
    let (published, _) = member.publish(json!({"data": "after"}), "after").await;
    let last = published["offset"].as_u64().expect("offset");
    // A request Redis received just before it stopped answering may still
    // have run when it resumed (its answer timed out): the offsets say so.
    let got = collect_until(&mut remote, last).await;
    let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        (2..=last).collect::<Vec<_>>(),
        "nobody was closed, nothing missed"
    );
    assert_eq!(got.last().map(|(_, d)| d.clone()), Some(json!("after")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_counts_presence_events_and_close_all_span_servers() {
    let redis = RedisServer::start();
    let servers = cluster(&redis, 2);
    let (mut watcher, _) = Client::join(&servers[0].ws_url("/ws/lobby?events=1")).await;
    let (mut a, a_welcome) = Client::join(&servers[0].ws_url("/ws/lobby")).await;
    let (mut b, b_welcome) = Client::join(&servers[1].ws_url("/ws/lobby")).await;
    let b_id = b_welcome["channel_id"].as_str().expect("id").to_owned();
    let joined = watcher.recv_type("member_joined").await;
    let second = watcher.recv_type("member_joined").await;
    let ids = [joined["channel_id"].clone(), second["channel_id"].clone()];
    assert!(
        ids.contains(&json!(b_id)),
        "an event for the member on the other server: {ids:?}"
    );

    let sent = a
        .request(json!({"type": "direct", "to": b_id, "data": "psst"}), "d")
        .await;
    assert_eq!(sent["type"], "sent", "{sent}");
    let direct = b.recv_type("direct").await;
    assert_eq!(
        (direct["data"].as_str(), &direct["from"]),
        (Some("psst"), &a_welcome["channel_id"])
    );
    let missing = a
        .request(
            json!({"type": "direct", "to": uuid::Uuid::new_v4().to_string(), "data": 1}),
            "m",
        )
        .await;
    assert_eq!(missing["code"], "not_found");

    eventually(Duration::from_secs(5), "counts of both servers", || async {
        get(&servers[0].addr, "/api/groups").await.json()["lobby"] == 3
    })
    .await;
    let presence = a.request(json!({"type": "presence"}), "p").await;
    assert_eq!(presence["members"].as_array().map(Vec::len), Some(3), "{presence}");

    let closed = http(
        &servers[0].addr,
        "POST",
        "/api/admin/close-all",
        &[("Authorization", &format!("Bearer {ADMIN}"))],
        b"",
    )
    .await;
    assert_eq!(closed.status, 200, "{}", closed.body);
    assert_eq!(
        b.closed().await,
        Some(1001),
        "the other server closes its connections too"
    );
    assert_eq!(a.closed().await, Some(1001));
}
