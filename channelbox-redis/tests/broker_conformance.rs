//! The broker conformance suite (`channelbox_core::testkit::broker_conformance`)
//! run by the Redis broker in each form it is deployed in: one Redis, two
//! shards, and Sentinel (a master, a replica, three sentinels). Every Redis
//! is a process of the test's own.

use channelbox_core::testkit::broker_conformance::{run_all, BrokerHarness, HarnessFuture, Server};
use channelbox_redis::testkit::RedisServer;
use channelbox_redis::testkit_forms::SentinelSet;
use channelbox_redis::{shard_of, RedisConfig, RedisEngine, ShardedEngine};

/// A form of Redis and how to reach it.
enum Form {
    Single(RedisServer),
    Shards(Vec<RedisServer>),
    Sentinel(SentinelSet),
}

/// The group's head hash (see `keys`).
fn head_key(group: &str) -> String {
    format!("cb:{{{group}}}:h")
}

impl Form {
    /// Runs one command on the data node that holds `group` (the master).
    fn run(&self, group: &str, args: &[&str]) {
        match self {
            Form::Single(server) => {
                server.run(args).expect("command");
            }
            Form::Shards(servers) => {
                servers[shard_of(group, servers.len())].run(args).expect("command");
            }
            Form::Sentinel(set) => {
                let master = set.master_index().expect("a master");
                set.nodes[master].run(args).expect("command");
            }
        }
    }
}

impl BrokerHarness for Form {
    fn server(&self) -> HarnessFuture<'_, Server> {
        Box::pin(async move {
            match self {
                Form::Single(server) => {
                    let engine = RedisEngine::connect(RedisConfig::new(server.url()))
                        .await
                        .expect("connect");
                    Server {
                        store: engine.store(),
                        broker: engine.broker(),
                    }
                }
                Form::Shards(servers) => {
                    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
                    let engine = ShardedEngine::connect(&urls, &RedisConfig::new(urls[0].clone()))
                        .await
                        .expect("connect the shards");
                    Server {
                        store: engine.store(),
                        broker: engine.broker(),
                    }
                }
                Form::Sentinel(set) => {
                    let engine = RedisEngine::connect(RedisConfig::new(set.url()))
                        .await
                        .expect("connect");
                    Server {
                        store: engine.store(),
                        broker: engine.broker(),
                    }
                }
            }
        })
    }

    fn interrupt<'a>(&'a self, _index: usize, group: &'a str) -> HarnessFuture<'a, bool> {
        // The data node of the group's shard: every server's subscription
        // connection to it goes, and each reconnects.
        self.run(group, &["CLIENT", "KILL", "TYPE", "pubsub"]);
        Box::pin(async { true })
    }

    fn same_connection(&self, a: &str, b: &str) -> bool {
        match self {
            Form::Shards(servers) => shard_of(a, servers.len()) == shard_of(b, servers.len()),
            Form::Single(_) | Form::Sentinel(_) => true,
        }
    }

    fn roll_back<'a>(&'a self, group: &'a str) -> HarnessFuture<'a, bool> {
        // Counters that disagree with the stream, as after a partial loss:
        // the next script moves the group to a new epoch.
        self.run(group, &["HSET", &head_key(group), "n", "99"]);
        Box::pin(async { true })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redis_keeps_the_broker_contract() {
    run_all(&Form::Single(RedisServer::start())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_keep_the_broker_contract() {
    run_all(&Form::Shards(vec![RedisServer::start(), RedisServer::start()])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_keeps_the_broker_contract() {
    run_all(&Form::Sentinel(SentinelSet::start())).await;
}
