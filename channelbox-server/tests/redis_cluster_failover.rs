//! A Redis Cluster of three masters with one replica each (redis-servers of
//! this test's own, node timeout 1 s): a master SIGKILLed, its replica
//! promoted by the Cluster, both servers following by themselves — also when
//! the replica lacked the newest writes (the group then moves to a new
//! epoch, members closed with 4002, no (epoch, offset) pair reused). And a
//! Cluster partly available (a master down, no replica to promote, the
//! others serving on): new connections to its groups are refused with 503
//! before the upgrade, the other groups' are served.

mod support;

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use channelbox_redis::group_slot;
use channelbox_redis::testkit_forms::ClusterSet;
use futures_util::StreamExt;
use serde_json::{json, Value};
use support::ledger::Ledger;
use support::{http, parse_json, Client, Server};
use tokio_tungstenite::tungstenite::Message;

fn server(set: &ClusterSet) -> Server {
    let url = set.url();
    Server::start(&["--store", "redis", "--redis-url", &url])
}

/// What one member saw: per connection (a 4002 closes one, and the member
/// joins again), the `(epoch, offset)` of each message in arrival order.
#[derive(Debug, Default)]
struct Member {
    connections: Vec<Vec<(String, u64)>>,
    /// The `data` of every message received.
    data: HashSet<Value>,
    /// How many times it was closed with 4002.
    closed_4002: usize,
}

/// Joins a member (the server has subscribed to the group once it is
/// welcomed), then reads in a task, recording every message in `ledger`,
/// until it has received every `data` in `want` (once set), or 20 s after
/// it was set. Closed with 4002 (its epoch replaced), it joins again with
/// `history=1000`; any other close fails the test.
async fn member(
    ws_url: String,
    ledger: Arc<Mutex<Ledger>>,
    want: Arc<Mutex<Option<HashSet<Value>>>>,
    name: &'static str,
) -> tokio::task::JoinHandle<Member> {
    let mut client = Client::join(&ws_url).await.0;
    tokio::spawn(async move {
        let mut seen = Member::default();
        let mut since: Option<Instant> = None;
        seen.connections.push(Vec::new());
        loop {
            if let Some(want) = want.lock().expect("want").as_ref() {
                let at = *since.get_or_insert_with(Instant::now);
                if want.is_subset(&seen.data) || at.elapsed() > Duration::from_secs(20) {
                    return seen;
                }
            }
            let Ok(item) = tokio::time::timeout(Duration::from_millis(200), client.ws.next()).await else {
                continue;
            };
            match item {
                Some(Ok(Message::Text(t))) => {
                    let v = parse_json(&t);
                    if ledger.lock().expect("ledger").record_frame(&v, name) {
                        let epoch = v["epoch"].as_str().expect("epoch").to_owned();
                        let offset = v["offset"].as_u64().expect("offset");
                        seen.connections.last_mut().expect("a connection").push((epoch, offset));
                        seen.data.insert(v["data"].clone());
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    let code = f.map(|f| u16::from(f.code));
                    assert_eq!(code, Some(4002), "{name}: closed only because its epoch was replaced");
                    seen.closed_4002 += 1;
                    client = rejoin(&format!("{ws_url}?history=1000"), name).await;
                    seen.connections.push(Vec::new());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{name}: the connection failed ({e})"),
                None => panic!("{name}: the connection ended without a close"),
            }
        }
    })
}

/// Joins again after a 4002 (the server's answer to its epoch being
/// replaced): while the failover is not over, a join may be refused — the
/// upgrade answered 503 while the group's master is down, closed with 1011
/// when Redis cannot take it yet, or 4002 again when the server learns of
/// the new epoch after welcoming it — so it tries again, for at most 15 s.
async fn rejoin(url: &str, name: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ws = match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) if response.status() == 503 => {
                assert!(Instant::now() < deadline, "{name}: upgrades refused for 15 s");
                eprintln!("{name}: an upgrade answered 503");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(err) => panic!("{name}: upgrade: {err}"),
        };
        let mut client = Client { ws };
        match client.next_event().await {
            support::Event::Json(v) if v["type"] == "welcome" => return client,
            support::Event::Json(v) => panic!("{name}: the first frame is welcome: {v}"),
            support::Event::Closed(code) => {
                assert!(matches!(code, Some(1011 | 4002)), "{name}: a join closed with {code:?}");
                assert!(Instant::now() < deadline, "{name}: joins refused for 15 s");
                eprintln!("{name}: a join again closed with {code:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Publishes `data` over HTTP until it is acknowledged (`unavailable`, 503,
/// while the group's master fails over), recording the acknowledgement in
/// `ledger`; gives up at `deadline`. Each try has data of its own (an
/// `unavailable` publish may still be saved, so its data is not sent again).
async fn publish_until_saved(
    server: &Server,
    group: &str,
    data: impl Fn(u64) -> Value,
    ledger: &Mutex<Ledger>,
    deadline: Instant,
) -> (Value, Instant) {
    for attempt in 0.. {
        let d = data(attempt);
        let r = http(
            &server.addr,
            "POST",
            &format!("/api/groups/{group}/messages"),
            &[],
            d.to_string().as_bytes(),
        )
        .await;
        if r.status == 200 {
            let mut published = r.json();
            published["group"] = Value::from(group);
            ledger
                .lock()
                .expect("ledger")
                .record_published(&published, &d, "published");
            return (d, Instant::now());
        }
        assert_eq!(r.status, 503, "only unavailable while failing over: {}", r.body);
        assert!(
            Instant::now() < deadline,
            "a publish to {group} through {} is still refused: {}",
            server.addr,
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!("attempts do not end")
}

/// Cuts the replica of master `owner` off for good: the master refuses
/// `PSYNC` and `SYNC` to its default user and drops the replica's
/// connection, so the replica has nothing written after this.
fn cut_off_replica(set: &ClusterSet, owner: usize) {
    let master = &set.nodes[owner];
    master
        .run(&["ACL", "SETUSER", "default", "-psync", "-sync"])
        .expect("ACL SETUSER");
    master.run(&["CLIENT", "KILL", "TYPE", "replica"]).expect("CLIENT KILL");
    set.wait_until(Duration::from_secs(10), "the replica cut off", |s| {
        let info: String =
            redis::from_redis_value(s.replicas[owner].run(&["INFO", "replication"]).expect("info")).expect("text");
        info.contains("master_link_status:down")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masters_failover_is_followed_by_both_servers() {
    failover(false).await;
}

/// The replica lacks the newest writes when it is promoted: both servers
/// saw offsets it does not have, so the group moves to a new epoch and the
/// members are closed with 4002; no pair is handed out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_replica_lacking_writes_moves_the_group_to_a_new_epoch() {
    failover(true).await;
}

async fn failover(lagging: bool) {
    let mut set = tokio::task::spawn_blocking(ClusterSet::start_with_replicas)
        .await
        .expect("a cluster with replicas");
    let servers = [server(&set), server(&set)];
    let group = "failover";
    let slot = group_slot(group);
    let owner = set.owner_of(slot);
    let replica_port = set.replicas[owner].port();
    let ledger = Arc::new(Mutex::new(Ledger::new()));
    let want: Arc<Mutex<Option<HashSet<Value>>>> = Arc::default();
    let members = [
        member(
            servers[0].ws_url(&format!("/ws/{group}")),
            ledger.clone(),
            want.clone(),
            "member on 0",
        )
        .await,
        member(
            servers[1].ws_url(&format!("/ws/{group}")),
            ledger.clone(),
            want.clone(),
            "member on 1",
        )
        .await,
    ];
    // Both servers subscribed on the group's master before anything is
    // published (the members' joins confirmed it).
    let far = Instant::now() + Duration::from_secs(10);
    for round in 0..10u64 {
        for (s, srv) in servers.iter().enumerate() {
            let data = |a: u64| json!({"phase": "before", "s": s, "n": round, "try": a});
            publish_until_saved(srv, group, data, &ledger, far).await;
        }
    }

    if lagging {
        tokio::task::block_in_place(|| cut_off_replica(&set, owner));
        for round in 0..5u64 {
            for (s, srv) in servers.iter().enumerate() {
                let data = |a: u64| json!({"phase": "lost", "s": s, "n": round, "try": a});
                publish_until_saved(srv, group, data, &ledger, far).await;
            }
        }
        let (master, replica) =
            tokio::task::block_in_place(|| (set.nodes[owner].repl_offset(), set.replicas[owner].repl_offset()));
        assert!(replica < master, "the replica lags: {replica} < {master}");
    }

    // SIGKILL the group's master; the Cluster promotes its replica.
    set.nodes[owner].kill();
    let killed = Instant::now();
    let promoted = loop {
        let port = tokio::task::block_in_place(|| set.master_port(slot));
        if port == Some(replica_port) {
            break Instant::now();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "the replica promoted: not within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("promoted {:?} after the kill", promoted - killed);

    // Each server publishes again by itself, at most 10 s after the promotion.
    for (s, srv) in servers.iter().enumerate() {
        let data = |a: u64| json!({"phase": "during", "s": s, "try": a});
        let (_, at) = publish_until_saved(srv, group, data, &ledger, promoted + Duration::from_secs(10)).await;
        eprintln!(
            "server {s} publishes again {:?} after the promotion",
            at.saturating_duration_since(promoted)
        );
    }
    // Both servers' subscriptions are on the promoted replica now.
    let channel = format!("cb:{{{group}}}:c");
    let replica = set.node_on(replica_port).expect("the replica");
    let subscribers = || -> i64 {
        let v = replica.run(&["PUBSUB", "SHARDNUMSUB", &channel]).expect("pubsub");
        let (_, n): (String, i64) = redis::from_redis_value(v).expect("a count");
        n
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::task::block_in_place(subscribers) < 2 {
        assert!(Instant::now() < deadline, "both servers subscribe on the new master");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // What is published now reaches every member.
    let mut after = HashSet::new();
    for n in 0..10u64 {
        for (s, srv) in servers.iter().enumerate() {
            let data = |a: u64| json!({"phase": "after", "s": s, "n": n, "try": a});
            after.insert(
                publish_until_saved(srv, group, data, &ledger, Instant::now() + Duration::from_secs(10))
                    .await
                    .0,
            );
        }
    }
    *want.lock().expect("want") = Some(after.clone());
    for (i, m) in members.into_iter().enumerate() {
        let seen = m.await.expect("member");
        let missing = after.difference(&seen.data).count();
        assert_eq!(
            missing, 0,
            "member {i} received every message published after the failover"
        );
        // Within one connection: one epoch, offsets one after another.
        for (c, got) in seen.connections.iter().enumerate() {
            let epochs: BTreeSet<&String> = got.iter().map(|(e, _)| e).collect();
            assert!(epochs.len() <= 1, "member {i}, connection {c}: one epoch: {epochs:?}");
            assert!(
                got.windows(2).all(|w| w[1].1 == w[0].1 + 1),
                "member {i}, connection {c}: no gap, no duplicate: {got:?}"
            );
        }
        eprintln!(
            "member {i}: {} connections, {} closed with 4002",
            seen.connections.len(),
            seen.closed_4002
        );
        if lagging {
            assert!(seen.closed_4002 > 0, "member {i}: told that its epoch was replaced");
        }
    }
    // History through either server agrees with everything seen.
    for srv in &servers {
        let r = http(
            &srv.addr,
            "GET",
            &format!("/api/groups/{group}/history?limit=1000"),
            &[],
            b"",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let mut body = r.json();
        body["group"] = Value::from(group);
        ledger.lock().expect("ledger").record_history(&body, "history");
    }
    let ledger = ledger.lock().expect("ledger");
    ledger.assert_unique();
    let epochs = ledger.epochs(group);
    eprintln!("epochs of the group: {epochs:?}");
    if lagging {
        assert!(epochs.len() >= 2, "the group moved to a new epoch: {epochs:?}");
    }
}

/// A master down for good (no replica) in a Cluster that serves the other
/// slots on: an upgrade to one of its groups answers 503 before the upgrade
/// (not 101 then a close), while groups on the other masters take new
/// connections and publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_to_a_downed_masters_groups_get_503_the_others_open() {
    let mut set = tokio::task::spawn_blocking(ClusterSet::start_partial)
        .await
        .expect("a cluster");
    let srv = server(&set);
    // The first engine is on the master with the lowest port (it keeps the
    // channel records every connection writes); another is stopped.
    let ports: Vec<u16> = set.nodes.iter().map(|n| n.port()).collect();
    let lowest = (0..ports.len()).min_by_key(|i| ports[*i]).expect("a master");
    let downed = (lowest + 1) % ports.len();
    let on = |node: usize| {
        (0..)
            .map(|i| format!("room-{i}"))
            .find(|g| set.owner_of(group_slot(g)) == node)
            .expect("a group")
    };
    let (lost, kept) = (on(downed), on(lowest));
    let status = |group: String| {
        let url = srv.ws_url(&format!("/ws/{group}"));
        async move {
            match tokio_tungstenite::connect_async(url).await {
                Ok(_) => 101,
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
                Err(err) => panic!("upgrade: {err}"),
            }
        }
    };
    assert_eq!(status(lost.clone()).await, 101, "served before the loss");
    set.nodes[downed].kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(lost.clone()).await != 503 {
        assert!(
            Instant::now() < deadline,
            "503 for {lost} within 5 s of its master's loss"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut member, _) = Client::join(&srv.ws_url(&format!("/ws/{kept}"))).await;
    let ack = member.request(json!({"type": "publish", "data": "on"}), "on").await;
    assert_eq!(ack["type"], "published", "a group on a live master is served: {ack}");
    assert_eq!(status(lost).await, 503, "still refused");
}
