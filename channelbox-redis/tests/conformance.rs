//! The core HistoryStore conformance suite and the store model property test,
//! run against a real Redis (a redis-server of this test's own).

use std::sync::Arc;

use channelbox_core::testkit::model::{check_against_model, history_ops, small_limits};
use channelbox_core::{HistoryLimits, HistoryStore};
use channelbox_redis::testkit::RedisServer;
use channelbox_redis::{RedisConfig, RedisEngine};
use proptest::prelude::*;

async fn store(server: &RedisServer, limits: HistoryLimits) -> Arc<dyn HistoryStore> {
    // Each check starts from an empty Redis: the server is this test's own.
    server.run(&["FLUSHALL"]).expect("flushall");
    let config = RedisConfig {
        limits,
        ..RedisConfig::new(server.url())
    };
    RedisEngine::connect(config).await.expect("connect").store()
}

#[tokio::test]
async fn redis_store_passes_the_conformance_suite() {
    let server = RedisServer::start();
    channelbox_core::testkit::conformance::run_all(|limits| store(&server, limits)).await;
}

thread_local! {
    /// One redis-server per test thread, emptied before each case.
    static SERVER: RedisServer = RedisServer::start();
}

proptest! {
    #[test]
    fn redis_store_matches_the_model(ops in history_ops(60, false), limits in small_limits()) {
        SERVER.with(|server| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let store = store(server, limits.clone()).await;
                check_against_model(limits.clone(), &ops, || store.clone()).await;
            });
        });
    }
}
