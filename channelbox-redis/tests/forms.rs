//! The core HistoryStore conformance suite on the other Redis forms: two
//! shards (redis-servers of this test's own), a Sentinel-watched master with
//! one replica that every append waits for (`replicas: 1`), a Sentinel
//! shard next to a plain one, and a Redis Cluster of three masters.

use std::sync::Arc;

use channelbox_core::{HistoryLimits, HistoryStore, NewMessage, PayloadKind, ReadQuery};
use channelbox_redis::testkit::RedisServer;
use channelbox_redis::testkit_forms::{ClusterSet, SentinelSet};
use channelbox_redis::{ClusterEngine, RedisConfig, RedisEngine, ShardedEngine};

async fn sharded(servers: &[RedisServer], limits: HistoryLimits) -> Arc<dyn HistoryStore> {
    // Each check starts from empty shards: the servers are this test's own.
    for s in servers {
        s.run(&["FLUSHALL"]).expect("flushall");
    }
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let config = RedisConfig {
        limits,
        ..RedisConfig::new(urls[0].clone())
    };
    ShardedEngine::connect(&urls, &config).await.expect("connect").store()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_pass_the_conformance_suite() {
    let servers = [RedisServer::start(), RedisServer::start()];
    channelbox_core::testkit::conformance::run_all(|limits| sharded(&servers, limits)).await;
}

async fn under_sentinel(set: &SentinelSet, limits: HistoryLimits) -> Arc<dyn HistoryStore> {
    let master = set.master_index().expect("a master");
    set.nodes[master].run(&["FLUSHALL"]).expect("flushall");
    let config = RedisConfig {
        limits,
        replicas: 1,
        ..RedisConfig::new(set.url())
    };
    RedisEngine::connect(config).await.expect("connect").store()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_master_with_a_replica_passes_the_conformance_suite() {
    let set = tokio::task::spawn_blocking(SentinelSet::start)
        .await
        .expect("sentinels");
    channelbox_core::testkit::conformance::run_all(|limits| under_sentinel(&set, limits)).await;
}

async fn sentinel_and_plain(set: &SentinelSet, plain: &RedisServer, limits: HistoryLimits) -> Arc<dyn HistoryStore> {
    let master = set.master_index().expect("a master");
    set.nodes[master].run(&["FLUSHALL"]).expect("flushall");
    plain.run(&["FLUSHALL"]).expect("flushall");
    let urls = [set.url(), plain.url()];
    let config = RedisConfig {
        limits,
        ..RedisConfig::new(urls[0].clone())
    };
    ShardedEngine::connect(&urls, &config).await.expect("connect").store()
}

/// A Sentinel URL is a shard like any other (named by its master name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_shard_and_a_plain_one_pass_the_conformance_suite() {
    let set = tokio::task::spawn_blocking(SentinelSet::start)
        .await
        .expect("sentinels");
    let plain = RedisServer::start();
    channelbox_core::testkit::conformance::run_all(|limits| sentinel_and_plain(&set, &plain, limits)).await;
    let recorded = plain.run(&["GET", "cb:shards"]).expect("the shard list");
    let recorded: String = redis::from_redis_value(recorded).expect("a string");
    assert_eq!(recorded, format!("cbmaster\n127.0.0.1:{}", plain.port()));
}

/// A group on shard `shard` of two.
fn group_on(shard: usize, skip: usize) -> String {
    (0..)
        .map(|i| format!("g{i}"))
        .filter(|g| channelbox_redis::shard_of(g, 2) == shard)
        .nth(skip)
        .expect("a group")
}

/// `check_heads` through the router: each group is checked on its own
/// shard, the answers come back in the order asked, and a group whose head
/// is below what this server saw moves to a new epoch on its shard, with
/// `BrokerEvent::Moved` coming out of the merged event queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_checks_are_routed_per_shard_and_a_move_is_announced() {
    use channelbox_core::{Broker, BrokerEvent, NewMessage, PayloadKind, StreamPosition};
    let servers = [RedisServer::start(), RedisServer::start()];
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let engine = ShardedEngine::connect(&urls, &RedisConfig::new(urls[0].clone()))
        .await
        .expect("connect");
    let (store, broker) = (engine.store(), engine.broker());
    let mut events = broker.take_events().expect("the merged events");
    let groups = [group_on(1, 0), group_on(0, 0), group_on(1, 1)];
    let mut seen = Vec::new();
    for g in &groups {
        let m = NewMessage::new(PayloadKind::Text, "m".into());
        let at = store.append(g, m).expect("queued").wait().await.expect("saved");
        seen.push((g.clone(), at));
    }
    broker.subscribe(&groups[2]).await.expect("subscribed");
    // This server claims offset 9 of the third group's epoch: its head (1)
    // is below, as after a rollback of its shard.
    let old = seen[2].1.clone();
    seen[2].1 = StreamPosition::new(old.epoch.clone(), 9);
    let heads = store.check_heads(&seen).await;
    for ((g, at), head) in seen.iter().zip(&heads).take(2) {
        let head = head.as_ref().expect("checked");
        assert_eq!((&head.epoch, head.last), (&at.epoch, 1), "{g} is unchanged");
    }
    let moved = heads[2].as_ref().expect("checked");
    assert_ne!(moved.epoch, old.epoch, "moved to a new epoch");
    assert_eq!(moved.last, 1, "the survivor keeps its offset");
    let key = format!("cb:{{{}}}:h", groups[2]);
    let in_redis: String = redis::from_redis_value(servers[1].run(&["HGET", &key, "e"]).expect("hget")).expect("text");
    assert_eq!(in_redis, moved.epoch.as_str(), "moved on its own shard");
    assert!(matches!(servers[0].run(&["EXISTS", &key]), Ok(redis::Value::Int(0))));
    let event = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match events.recv().await.expect("events") {
                BrokerEvent::Moved { group, position } if group == groups[2] => return position,
                _ => {}
            }
        }
    })
    .await
    .expect("Moved within 5 s");
    assert_eq!(event.epoch, moved.epoch);
}

async fn on_cluster(set: &ClusterSet, limits: HistoryLimits) -> Arc<dyn HistoryStore> {
    for node in &set.nodes {
        node.run(&["FLUSHALL"]).expect("flushall");
    }
    let config = RedisConfig {
        limits,
        ..RedisConfig::new(set.url())
    };
    ClusterEngine::connect(config).await.expect("connect").store()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_of_three_masters_passes_the_conformance_suite() {
    let set = tokio::task::spawn_blocking(ClusterSet::start).await.expect("a cluster");
    channelbox_core::testkit::conformance::run_all(|limits| on_cluster(&set, limits)).await;
    let engine = ClusterEngine::connect(RedisConfig::new(set.url()))
        .await
        .expect("connect");
    assert_eq!(engine.masters().len(), 3, "one engine per master");
    // Names whose hash tag would be empty or odd keep every key in one slot
    // (a script over two slots would fail CROSSSLOT).
    let store = engine.store();
    for group in ["}x", "}", "~", "a}b", "{a}", "~}"] {
        let message = NewMessage::new(PayloadKind::Text, group.to_owned().into());
        let at = store
            .append(group, message)
            .expect("queued")
            .wait()
            .await
            .expect("saved");
        assert_eq!(at.offset, 1, "{group:?}");
        let page = store.read(group, ReadQuery::Last(10)).await.expect("read");
        assert_eq!(page.messages.len(), 1, "{group:?}");
    }
}
