//! A Redis Cluster of three masters for real (`--redis-url
//! redis+cluster://…`, redis-servers of this test's own): 20 groups over
//! slots of every master, publishers on two servers, exact delivery; a
//! busy group's slot migrated to another master while both servers publish
//! to it: no gap, no duplicate, no (epoch, offset) pair reused, nothing
//! acknowledged lost; and a master SIGKILLed, its replica promoted by the
//! Cluster, both servers following by themselves — also when the replica
//! lacked the newest writes (the group then moves to a new epoch).

mod support;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use channelbox_redis::group_slot;
use channelbox_redis::testkit_forms::ClusterSet;
use futures_util::StreamExt;
use serde_json::{json, Value};
use support::ledger::Ledger;
use support::{http, parse_json, Client, Server};
use tokio_tungstenite::tungstenite::Message;

fn start_cluster() -> ClusterSet {
    ClusterSet::start()
}

fn server(set: &ClusterSet) -> Server {
    let url = set.url();
    Server::start(&["--store", "redis", "--redis-url", &url])
}

/// `n` group names, each in its own slot, spread over every master.
fn groups_over_masters(set: &ClusterSet, n: usize) -> Vec<String> {
    let mut per_master: Vec<Vec<String>> = vec![Vec::new(); set.nodes.len()];
    let mut slots = BTreeSet::new();
    let want = n.div_ceil(set.nodes.len());
    for i in 0.. {
        let g = format!("room-{i}");
        let slot = group_slot(&g);
        let owner = set.owner_of(slot);
        if per_master[owner].len() < want && slots.insert(slot) {
            per_master[owner].push(g);
        }
        if per_master.iter().all(|m| m.len() >= want) {
            break;
        }
    }
    let mut groups: Vec<String> = per_master.into_iter().flatten().collect();
    groups.truncate(n);
    groups
}

/// Reads `count` messages from a member: `(epoch, offset, data)` in arrival order.
async fn receive(member: &mut Client, count: usize) -> Vec<(String, u64, u64)> {
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        let v = member.recv_type("message").await;
        got.push((
            v["epoch"].as_str().expect("epoch").to_owned(),
            v["offset"].as_u64().expect("offset"),
            v["data"].as_u64().expect("data"),
        ));
    }
    got
}

/// Checks one member's messages against what the publishers were told:
/// one epoch, offsets 1.. in order with no gap or duplicate, each pair
/// naming the message it was acknowledged for.
fn check_exact(group: &str, got: &[(String, u64, u64)], acked: &BTreeMap<u64, (String, u64)>) {
    let offsets: Vec<u64> = got.iter().map(|m| m.1).collect();
    let want: Vec<u64> = (1..=acked.len() as u64).collect();
    assert_eq!(offsets, want, "group {group}: every offset once, in order");
    for (epoch, offset, data) in got {
        let (acked_epoch, acked_data) = &acked[offset];
        assert_eq!(
            (epoch, data),
            (acked_epoch, acked_data),
            "group {group}: offset {offset} names one message"
        );
    }
}

/// Publishes `data` values in windows of `window` sent back to back (then
/// their `published` read), recording the acknowledged `(offset, (epoch,
/// data))` in the order sent; checks that one connection's publishes got
/// increasing offsets in that order.
async fn publish_all(
    publisher: &mut Client,
    data: impl Iterator<Item = u64>,
    window: usize,
) -> Vec<(u64, (String, u64))> {
    let data: Vec<u64> = data.collect();
    let mut acked = Vec::new();
    for chunk in data.chunks(window) {
        for d in chunk {
            publisher
                .send(json!({"type": "publish", "data": d, "echo": false, "ref": format!("r{d}")}))
                .await;
        }
        for d in chunk {
            let reference = format!("r{d}");
            let v = loop {
                let v = publisher.recv().await;
                if v["ref"] == reference.as_str() {
                    break v;
                }
            };
            assert_eq!(v["type"], "published", "publish {d}: {v}");
            acked.push((
                v["offset"].as_u64().expect("offset"),
                (v["epoch"].as_str().expect("epoch").to_owned(), *d),
            ));
        }
    }
    let offsets: Vec<u64> = acked.iter().map(|a| a.0).collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "one connection's offsets follow its order: {offsets:?}"
    );
    acked
}

/// Merges two publishers' acknowledgements; a pair acknowledged twice fails.
fn merged(a: Vec<(u64, (String, u64))>, b: Vec<(u64, (String, u64))>) -> BTreeMap<u64, (String, u64)> {
    let mut all = BTreeMap::new();
    for (offset, named) in a.into_iter().chain(b) {
        if let Some(before) = all.insert(offset, named.clone()) {
            panic!("offset {offset} acknowledged twice: {before:?} and {named:?}");
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_groups_over_three_masters_are_exact_across_two_servers() {
    let set = tokio::task::spawn_blocking(start_cluster).await.expect("a cluster");
    let servers = [server(&set), server(&set)];
    let groups = groups_over_masters(&set, 20);
    assert_eq!(groups.len(), 20);
    let owners: BTreeSet<usize> = groups.iter().map(|g| set.owner_of(group_slot(g))).collect();
    assert_eq!(owners.len(), 3, "the groups use every master");
    const PER: u64 = 15;
    // A member of every group on each server.
    let mut members = Vec::new();
    for g in &groups {
        let a = Client::join(&servers[0].ws_url(&format!("/ws/{g}"))).await.0;
        let b = Client::join(&servers[1].ws_url(&format!("/ws/{g}"))).await.0;
        members.push((a, b));
    }
    // Each server subscribes to each group by sharded pub/sub on the master
    // of its slot, and by nothing else.
    for g in &groups {
        let channel = format!("cb:{{{g}}}:c");
        let owner = set.owner_of(group_slot(g));
        let count = |kind: &str, node: usize| -> i64 {
            let v = set.nodes[node].run(&["PUBSUB", kind, &channel]).expect("pubsub");
            let (_, n): (String, i64) = redis::from_redis_value(v).expect("a count");
            n
        };
        assert_eq!(
            count("SHARDNUMSUB", owner),
            2,
            "group {g}: both servers, on master {owner}"
        );
        for node in 0..set.nodes.len() {
            assert_eq!(
                count("NUMSUB", node),
                0,
                "group {g}: no plain subscription (node {node})"
            );
        }
    }
    // Publishers on both servers, at once, on every group.
    let mut tasks = Vec::new();
    for g in &groups {
        for (s, srv) in servers.iter().enumerate() {
            let url = srv.ws_url(&format!("/ws/{g}"));
            tasks.push(tokio::spawn(async move {
                let (mut publisher, _) = Client::join(&url).await;
                let base = s as u64 * 1000;
                publish_all(&mut publisher, base..base + PER, 1).await
            }));
        }
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("publisher"));
    }
    let mut results = results.into_iter();
    for (g, (a, b)) in groups.iter().zip(members.iter_mut()) {
        let acked = merged(results.next().expect("0"), results.next().expect("1"));
        assert_eq!(acked.len() as u64, 2 * PER);
        check_exact(g, &receive(a, acked.len()).await, &acked);
        check_exact(g, &receive(b, acked.len()).await, &acked);
    }
    // Each group's head and stream are on the master of its slot (the
    // others redirect).
    for g in &groups {
        let owner = set.owner_of(group_slot(g));
        for key in [format!("cb:{{{g}}}:h"), format!("cb:{{{g}}}:s")] {
            let n: i64 =
                redis::from_redis_value(set.nodes[owner].run(&["EXISTS", &key]).expect("exists")).expect("count");
            assert_eq!(n, 1, "group {g}: {key} on master {owner}");
        }
    }
    let health = http(&servers[0].addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_groups_slot_migrates_while_two_servers_publish() {
    let set = std::sync::Arc::new(tokio::task::spawn_blocking(start_cluster).await.expect("a cluster"));
    let servers = [server(&set), server(&set)];
    let group = "busy";
    let slot = group_slot(group);
    let from = set.owner_of(slot);
    let to = (from + 1) % set.nodes.len();
    const PER: u64 = 300;
    let mut a = Client::join(&servers[0].ws_url(&format!("/ws/{group}"))).await.0;
    let mut b = Client::join(&servers[1].ws_url(&format!("/ws/{group}"))).await.0;
    let mut publishers = Vec::new();
    for (s, srv) in servers.iter().enumerate() {
        let url = srv.ws_url(&format!("/ws/{group}"));
        publishers.push(tokio::spawn(async move {
            let (mut publisher, _) = Client::join(&url).await;
            let base = s as u64 * 10_000;
            publish_all(&mut publisher, base..base + PER, 10).await
        }));
    }
    // Let the publishers run, then move the slot while they do: its keys one
    // per MIGRATE (the group's head and stream move apart), with pauses.
    let first = receive(&mut a, 50).await;
    let migrating = set.clone();
    tokio::task::spawn_blocking(move || migrating.migrate_slot(slot, to, 1, Duration::from_millis(150)))
        .await
        .expect("migrated");
    assert_eq!(set.owner_of(slot), to, "the slot is on the other master now");
    assert!(
        publishers.iter().all(|p| !p.is_finished()),
        "the publishers were still publishing when the migration ended"
    );
    // Both servers follow the slot: their sharded subscriptions move to the
    // new master (the old one dropped them with `sunsubscribe`).
    let channel = format!("cb:{{{group}}}:c");
    let subscribers = |node: usize| -> i64 {
        let v = set.nodes[node]
            .run(&["PUBSUB", "SHARDNUMSUB", &channel])
            .expect("pubsub");
        let (_, n): (String, i64) = redis::from_redis_value(v).expect("a count");
        n
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while subscribers(to) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "both servers subscribe on the new master"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(subscribers(from), 0, "and none is left on the old one");
    // Requests were refused on the way (the old master answered ASK,
    // TRYAGAIN or MOVED) and sent again: what follows checks they were
    // exact.
    let stats: String =
        redis::from_redis_value(set.nodes[from].run(&["INFO", "errorstats"]).expect("info")).expect("text");
    eprintln!(
        "refused by the old master: {}",
        stats
            .lines()
            .filter(|l| l.starts_with("errorstat_"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert!(
        ["errorstat_ASK", "errorstat_TRYAGAIN", "errorstat_MOVED"]
            .iter()
            .any(|e| stats.contains(e)),
        "the migration refused requests: {stats}"
    );
    let acked_b = publishers.pop().expect("b").await.expect("publisher b");
    let acked_a = publishers.pop().expect("a").await.expect("publisher a");
    let acked = merged(acked_a, acked_b);
    assert_eq!(acked.len() as u64, 2 * PER, "every publish acknowledged");
    let epochs: BTreeSet<&String> = acked.values().map(|(e, _)| e).collect();
    assert_eq!(epochs.len(), 1, "one epoch throughout: {epochs:?}");
    let mut got_a = first;
    got_a.extend(receive(&mut a, acked.len() - got_a.len()).await);
    check_exact(group, &got_a, &acked);
    check_exact(group, &receive(&mut b, acked.len()).await, &acked);
    // History on the new master holds every acknowledged message.
    let key = format!("cb:{{{group}}}:s");
    let len: i64 = redis::from_redis_value(set.nodes[to].run(&["XLEN", &key]).expect("xlen")).expect("len");
    assert_eq!(len as usize, acked.len(), "every acknowledged message is in history");
    let history = http(
        &servers[1].addr,
        "GET",
        &format!("/api/groups/{group}/history?limit=1000"),
        &[],
        b"",
    )
    .await;
    assert_eq!(history.status, 200, "{}", history.body);
    let body: Value = history.json();
    let offsets: Vec<u64> = body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["offset"].as_u64().expect("offset"))
        .collect();
    assert_eq!(
        offsets,
        (1..=acked.len() as u64).collect::<Vec<_>>(),
        "{}",
        history.body
    );
    // Presence follows the slot too: a member who joins on one server after
    // the migration is listed by the other (with the two who stayed).
    let _c = Client::join(&servers[1].ws_url(&format!("/ws/{group}"))).await.0;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let p = http(
            &servers[0].addr,
            "GET",
            &format!("/api/groups/{group}/presence"),
            &[],
            b"",
        )
        .await;
        let listed = p.json()["members"].as_array().map_or(0, Vec::len);
        if listed == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "presence across servers after the migration: {}",
            p.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
/// replaced): while the failover is not over, a join may be refused — closed
/// with 1011 when Redis cannot take it yet, or 4002 again when the server
/// learns of the new epoch after welcoming it — so it tries again, for at
/// most 15 s.
async fn rejoin(url: &str, name: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut client = Client::connect(url).await;
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

/// `master_repl_offset` from `INFO replication`: how much of the
/// replication stream a node has.
fn repl_offset(node: &channelbox_redis::testkit_forms::RedisProcess) -> u64 {
    let info: String = redis::from_redis_value(node.run(&["INFO", "replication"]).expect("info")).expect("text");
    info.lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("master_repl_offset")
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
            tokio::task::block_in_place(|| (repl_offset(&set.nodes[owner]), repl_offset(&set.replicas[owner])));
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
