//! A Redis Cluster of three masters for real (`--redis-url
//! redis+cluster://…`, redis-servers of this test's own): 20 groups over
//! slots of every master, publishers on two servers, exact delivery; a
//! busy group's slot migrated to another master while both servers publish
//! to it: no gap, no duplicate, no (epoch, offset) pair reused, nothing
//! acknowledged lost; the same with a master added after the servers
//! started, served without a restart. Failovers are in
//! `redis_cluster_failover.rs`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use channelbox_redis::group_slot;
use channelbox_redis::testkit_forms::ClusterSet;
use serde_json::{json, Value};
use support::{http, Client, Server};

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
    slot_migrates_while_two_servers_publish(false).await;
}

/// A master added to the Cluster after the servers started, and the busy
/// group's slot resharded to it while they publish: they serve it without a
/// restart, as exactly as a migration between the masters they started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_groups_slot_moves_to_a_master_added_after_start() {
    slot_migrates_while_two_servers_publish(true).await;
}

/// The busy group's slot migrated to the next master (or, with `added`, to a
/// master added after the servers started) while two servers publish to it.
async fn slot_migrates_while_two_servers_publish(added: bool) {
    let set = tokio::task::spawn_blocking(start_cluster).await.expect("a cluster");
    let servers = [server(&set), server(&set)];
    let group = "busy";
    let slot = group_slot(group);
    let from = set.owner_of(slot);
    let (set, to) = if added {
        let mut set = set;
        tokio::task::spawn_blocking(move || {
            let to = set.add_master();
            (set, to)
        })
        .await
        .expect("a master added")
    } else {
        let to = (from + 1) % set.nodes.len();
        (set, to)
    };
    let set = std::sync::Arc::new(set);
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
    presence_lists(&servers[0], group, 3, "after the migration").await;
    if added {
        home_moves_with_its_slot(&set, &servers, to).await;
        presence_lists(&servers[0], group, 3, "after the added master's home moved").await;
    }
}

/// Waits until `server` lists `n` members of `group` (5 s at most).
async fn presence_lists(server: &Server, group: &str, n: usize, when: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let p = http(&server.addr, "GET", &format!("/api/groups/{group}/presence"), &[], b"").await;
        if p.json()["members"].as_array().map_or(0, Vec::len) == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "presence across servers {when}: {}",
            p.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Moves to the added master `to` the slot of a smaller home tag (`cb-M`,
/// not the first engine's master's): both servers move that master's
/// server records there (and the records of the master it came from, if it
/// was that one's home), so they still agree on where they are.
async fn home_moves_with_its_slot(set: &std::sync::Arc<ClusterSet>, servers: &[Server], to: usize) {
    let first = (0..set.nodes.len())
        .filter(|i| *i != to)
        .min_by_key(|i| set.nodes[*i].port())
        .expect("a master");
    let slot_of = |key: &str| -> u16 {
        let v = set.nodes[0].run(&["CLUSTER", "KEYSLOT", key]).expect("KEYSLOT");
        redis::from_redis_value::<i64>(v).expect("a slot") as u16
    };
    let m = (0..)
        .find(|m| ![first, to].contains(&set.owner_of(slot_of(&format!("cb:{{cb-{m}}}:nodes")))))
        .expect("a tag");
    let nodes_key = format!("cb:{{cb-{m}}}:nodes");
    let slot = slot_of(&nodes_key);
    let migrating = set.clone();
    tokio::task::spawn_blocking(move || migrating.migrate_slot(slot, to, 10, Duration::from_millis(10)))
        .await
        .expect("migrated");
    // Each server's count of the busy group (on the added master) is at
    // the new home: written there by the server, not carried over by the
    // migration (which holds the records of the master the slot left).
    let counted_there = || -> usize {
        let ids: Vec<String> = set.nodes[to]
            .run(&["ZRANGE", &nodes_key, "0", "-1"])
            .ok()
            .and_then(|v| redis::from_redis_value(v).ok())
            .unwrap_or_default();
        ids.iter()
            .filter(|id| {
                set.nodes[to]
                    .run(&["HGET", &format!("cb:{{cb-{m}}}:node:{id}:groups"), "busy"])
                    .ok()
                    .and_then(|v| redis::from_redis_value::<Option<i64>>(v).ok())
                    .flatten()
                    .is_some_and(|n| n > 0)
            })
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while counted_there() < servers.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "both servers record their members at the added master's new home cb-{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
