//! What keeps Redis bounded: group keys expire (600 s for an epoch a read
//! created, the meta TTL after the last saved message), `/metrics` figures
//! never scan Redis, `--history-total-bytes` is refused unless Redis evicts
//! by itself, and a corrupt entry is a gap rather than an error.

use std::time::Duration;

use channelbox_core::{HistoryStore, NewMessage, PayloadKind, ReadQuery};
use channelbox_redis::testkit::RedisServer;
use channelbox_redis::{RedisConfig, RedisEngine};
use redis::Value;

mod common;
use common::save;

async fn engine(server: &RedisServer, meta_ttl: Duration) -> RedisEngine {
    let config = RedisConfig {
        meta_ttl,
        ..RedisConfig::new(server.url())
    };
    RedisEngine::connect(config).await.expect("connect")
}

/// The names of every key of a group (`cb:{…}`).
fn group_keys(server: &RedisServer) -> Vec<String> {
    let Ok(Value::Array(names)) = server.run(&["KEYS", "cb:{*"]) else {
        panic!("KEYS failed");
    };
    names
        .iter()
        .filter_map(|v| match v {
            Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect()
}

fn ttl(server: &RedisServer, key: &str) -> i64 {
    match server.run(&["TTL", key]) {
        Ok(Value::Int(t)) => t,
        other => panic!("TTL {key}: {other:?}"),
    }
}

#[tokio::test]
async fn reads_of_random_names_leave_only_keys_that_expire_within_600_seconds() {
    let server = RedisServer::start();
    let engine = engine(&server, channelbox_redis::DEFAULT_META_TTL).await;
    let store = engine.store();
    for i in 0..50 {
        let name = format!("random-{}-{i}", uuid::Uuid::new_v4());
        if i % 2 == 0 {
            store.read(&name, ReadQuery::Last(10)).await.expect("read");
        } else {
            store.head(&name).await.expect("head");
        }
    }
    let keys = group_keys(&server);
    assert!(keys.len() >= 50, "every read created its group's epoch: {keys:?}");
    for key in &keys {
        let t = ttl(&server, key);
        assert!((1..=600).contains(&t), "{key} has TTL {t}");
    }
}

#[tokio::test]
async fn a_groups_keys_are_gone_after_its_meta_ttl_without_a_saved_message() {
    let server = RedisServer::start();
    let engine = engine(&server, Duration::from_secs(2)).await;
    let store = engine.store();
    save(&store, "brief", "one").await;
    let epoch = store.head("brief").await.expect("head").epoch;
    let keys = group_keys(&server);
    assert_eq!(keys.len(), 2, "head and stream: {keys:?}");
    for key in &keys {
        let t = ttl(&server, key);
        assert!((1..=2).contains(&t), "{key} has TTL {t}");
    }
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(group_keys(&server).is_empty(), "expired: {:?}", group_keys(&server));
    let again = store.head("brief").await.expect("head");
    assert_ne!(again.epoch, epoch, "a later reader gets a new epoch");
    assert_eq!(again.last, 0);
}

#[tokio::test]
async fn history_figures_are_kept_without_scanning_redis() {
    let server = RedisServer::start();
    let engine = engine(&server, channelbox_redis::DEFAULT_META_TTL).await;
    let store = engine.store();
    for i in 0..20 {
        save(&store, &format!("g{}", i % 4), "12345").await;
    }
    server.run(&["CONFIG", "RESETSTAT"]).expect("resetstat");
    let stats = store.stats().await.expect("stats");
    assert_eq!((stats.messages, stats.bytes), (20, 20 * 5), "{stats:?}");
    let Ok(Value::BulkString(info)) = server.run(&["INFO", "commandstats"]) else {
        panic!("INFO failed");
    };
    let info = String::from_utf8_lossy(&info);
    assert!(!info.contains("cmdstat_scan"), "stats scanned redis:\n{info}");
}

#[tokio::test]
async fn total_bytes_is_refused_unless_redis_evicts_by_itself() {
    let server = RedisServer::start();
    let config = RedisConfig {
        total_bytes: Some(1 << 20),
        ..RedisConfig::new(server.url())
    };
    let err = RedisEngine::connect(config.clone()).await.expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("maxmemory-policy") && text.contains("allkeys-lru"),
        "names what to set: {text}"
    );
    server.run(&["CONFIG", "SET", "maxmemory", "64mb"]).expect("config");
    let err = RedisEngine::connect(config.clone())
        .await
        .expect_err("noeviction refused");
    assert!(err.to_string().contains("noeviction"), "{err}");
    server
        .run(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"])
        .expect("config");
    RedisEngine::connect(config)
        .await
        .expect("accepted with an evicting policy");
}

#[tokio::test]
async fn a_corrupt_entry_reads_as_a_gap_not_an_error() {
    let server = RedisServer::start();
    let engine = engine(&server, channelbox_redis::DEFAULT_META_TTL).await;
    let store = engine.store();
    // A group as the scripts write it, whose entry 2 is damaged.
    let good = NewMessage::new(PayloadKind::Text, "ok".into()).encode();
    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connection");
    let (head, stream) = ("cb:{bad}:h", "cb:{bad}:s");
    let mut pipe = redis::pipe();
    pipe.cmd("HSET")
        .arg(head)
        .arg(&["e", "old", "l", "3", "b", "6", "n", "3"]);
    for (id, body) in [("1-0", &good[..]), ("2-0", &b"\xff\x00garbage"[..]), ("3-0", &good[..])] {
        pipe.cmd("XADD").arg(stream).arg(id).arg("b").arg(body);
        pipe.arg("z").arg(2).arg("t").arg(0);
    }
    let _: Vec<Value> = pipe.query_async(&mut conn).await.expect("write");
    let page = store
        .read("bad", ReadQuery::Since { offset: 0, limit: 10 })
        .await
        .expect("read");
    let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, [1, 3], "the corrupt entry is left out: a gap");
    assert_eq!(page.head.epoch.as_str(), "old", "nothing else was wrong with the group");
}
