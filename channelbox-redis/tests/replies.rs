//! Error replies that say something about Redis rather than the command:
//! `NOSCRIPT` (the script cache flushed) reloads the scripts and the append
//! goes through; `OOM` and `READONLY` make the store unhealthy (requests
//! `unavailable`, `/healthz` 503) while they last, and it recovers by itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use channelbox_core::{HistoryStore, NewMessage, PayloadKind, StoreError, StreamPosition};
use channelbox_redis::testkit::RedisServer;
use channelbox_redis::{RedisConfig, RedisEngine, RedisStore};

async fn store(server: &RedisServer) -> Arc<RedisStore> {
    RedisEngine::connect(RedisConfig::new(server.url()))
        .await
        .expect("connect")
        .store()
}

async fn save(store: &RedisStore) -> Result<StreamPosition, StoreError> {
    let message = NewMessage::new(PayloadKind::Text, "m".into());
    store.append("g", message)?.wait().await
}

/// Waits until the store's health is `healthy`, at most 10 s.
async fn health_becomes(store: &RedisStore, healthy: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.healthy() != healthy {
        assert!(Instant::now() < deadline, "{what}: health did not become {healthy}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_flushed_script_cache_is_reloaded_and_the_append_goes_through() {
    let server = RedisServer::start();
    let store = store(&server).await;
    assert_eq!(save(&store).await.expect("first").offset, 1);
    server.run(&["SCRIPT", "FLUSH"]).expect("flush");
    assert_eq!(save(&store).await.expect("after SCRIPT FLUSH").offset, 2);
    server.run(&["SCRIPT", "FLUSH"]).expect("flush");
    assert_eq!(store.head("g").await.expect("head after SCRIPT FLUSH").last, 2);
}

#[tokio::test]
async fn out_of_memory_makes_the_store_unhealthy_until_redis_takes_writes() {
    let server = RedisServer::start();
    let store = store(&server).await;
    save(&store).await.expect("first");
    server.run(&["CONFIG", "SET", "maxmemory", "1"]).expect("config");
    assert!(save(&store).await.is_err(), "OOM refuses the append");
    health_becomes(&store, false, "under OOM").await;
    assert!(save(&store).await.is_err(), "unavailable while it lasts");
    server.run(&["CONFIG", "SET", "maxmemory", "0"]).expect("config");
    health_becomes(&store, true, "memory back").await;
    assert!(save(&store).await.is_ok());
}

#[tokio::test]
async fn a_demoted_master_makes_the_store_unhealthy_until_it_is_promoted_again() {
    let server = RedisServer::start();
    let other = RedisServer::start();
    let store = store(&server).await;
    save(&store).await.expect("first");
    let port = other.port().to_string();
    server.run(&["REPLICAOF", "127.0.0.1", &port]).expect("replicaof");
    let deadline = Instant::now() + Duration::from_secs(10);
    while save(&store).await.is_ok() {
        assert!(Instant::now() < deadline, "a replica took appends");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    health_becomes(&store, false, "as a replica").await;
    server.run(&["REPLICAOF", "NO", "ONE"]).expect("promote");
    health_becomes(&store, true, "promoted").await;
    assert!(save(&store).await.is_ok());
}
