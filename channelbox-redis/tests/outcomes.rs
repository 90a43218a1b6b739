//! What a failed append tells its caller: an append Redis never answered
//! (its connection stalled or broke with the command in flight) is
//! [`StoreErrorKind::Unanswered`] — it may still run, and here it does — and
//! an append refused while Redis is known to be down is a plain error that
//! promises nothing happened. The chat server turns the first into an
//! `unavailable` whose message says the outcome is unknown.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use channelbox_core::{HistoryStore, NewMessage, PayloadKind, StoreErrorKind};
use channelbox_redis::testkit::RedisServer;
use channelbox_redis::{RedisConfig, RedisEngine, RedisStore};

mod common;
use common::save;

async fn store(server: &RedisServer) -> Arc<RedisStore> {
    RedisEngine::connect(RedisConfig::new(server.url()))
        .await
        .expect("connect")
        .store()
}

fn signal(server: &RedisServer, sig: &str) {
    let pid = server.pid().expect("running").to_string();
    let status = Command::new("kill").args([sig, &pid]).status().expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}

fn message(text: &str) -> NewMessage {
    NewMessage::new(PayloadKind::Text, text.to_owned().into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_redis_never_answered_is_unanswered_and_may_still_run() {
    let server = RedisServer::start();
    let s = store(&server).await;
    save(&s, "stalled", "before").await;
    // Redis stops with the append on its way: no answer within the
    // command's timeout.
    signal(&server, "-STOP");
    let err = s
        .append("stalled", message("in flight"))
        .expect("queued")
        .wait()
        .await
        .expect_err("no answer from a stopped Redis");
    signal(&server, "-CONT");
    assert_eq!(err.kind(), StoreErrorKind::Unanswered, "{err}");
    // It ran once Redis went on: "unknown" was the honest answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match s.head("stalled").await {
            Ok(head) if head.last == 2 => break,
            Ok(head) => assert_eq!(head.last, 1, "one message before, and at most this one after"),
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "the unanswered append never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_while_redis_is_known_down_is_a_plain_refusal() {
    let mut server = RedisServer::start();
    let s = store(&server).await;
    save(&s, "down", "before").await;
    server.kill();
    // The first appends may meet the broken connection in flight
    // (unanswered); once the link knows Redis is down, appends are refused
    // before anything is sent, and say that nothing happened.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Refused when asked, or when its turn came.
        let err = match s.append("down", message("refused")) {
            Ok(pending) => pending.wait().await.expect_err("Redis is down"),
            Err(err) => err,
        };
        if err.kind() != StoreErrorKind::Unanswered {
            assert_eq!(err.kind(), StoreErrorKind::Io, "{err}");
            break;
        }
        assert!(Instant::now() < deadline, "still unanswered after 10 s: {err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
