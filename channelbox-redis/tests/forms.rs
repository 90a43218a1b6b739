//! The core HistoryStore conformance suite on the other Redis forms: two
//! shards (redis-servers of this test's own), a Sentinel-watched master with
//! one replica that every append waits for (`replicas: 1`), and a Sentinel
//! shard next to a plain one.

use std::sync::Arc;

use channelbox_core::{HistoryLimits, HistoryStore};
use channelbox_redis::testkit::RedisServer;
use channelbox_redis::testkit_forms::SentinelSet;
use channelbox_redis::{RedisConfig, RedisEngine, ShardedEngine};

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
