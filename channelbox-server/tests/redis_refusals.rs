//! A Redis that refuses writes (`OOM` under `noeviction`, here) while the
//! chat server keeps running: publishes answer 503 `unavailable` and
//! `/healthz` 503 while it lasts, and both recover by themselves.

mod support;

use std::time::{Duration, Instant};

use channelbox_redis::testkit::RedisServer;
use support::{get, http, Server};

async fn publish_status(server: &Server) -> u16 {
    http(
        &server.addr,
        "POST",
        "/api/groups/room/messages",
        &[],
        br#"{"text":"hi"}"#,
    )
    .await
    .status
}

/// Polls `path` until it answers `status`, at most 10 s.
async fn answers(server: &Server, path: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&server.addr, path).await.status != status {
        assert!(Instant::now() < deadline, "{path} did not answer {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_answers_unavailable_and_healthz_503_until_it_takes_writes() {
    let redis = RedisServer::start();
    let server = Server::start(&["--store", "redis", "--redis-url", &redis.url()]);
    assert_eq!(publish_status(&server).await, 200);
    redis.run(&["CONFIG", "SET", "maxmemory", "1"]).expect("config");
    assert_eq!(publish_status(&server).await, 503, "OOM: unavailable");
    answers(&server, "/healthz", 503).await;
    assert_eq!(publish_status(&server).await, 503, "while it lasts");
    redis.run(&["CONFIG", "SET", "maxmemory", "0"]).expect("config");
    answers(&server, "/healthz", 200).await;
    assert_eq!(publish_status(&server).await, 200, "resumed by itself");
}
