//! Redis restarted from an older snapshot under running engines: a server
//! that knows offsets Redis lost moves the group to a new epoch by itself
//! after reconnecting — also for a group without members on it — so that a
//! server that never saw those offsets cannot hand them out again; two
//! servers noticing at once make one new epoch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use channelbox_core::{Epoch, HistoryStore, NewMessage, PayloadKind};
use channelbox_redis::testkit::RedisServer;
use channelbox_redis::{RedisConfig, RedisEngine, RedisStore};
use redis::Value;

mod common;
use common::save;

async fn store(server: &RedisServer) -> Arc<RedisStore> {
    RedisEngine::connect(RedisConfig::new(server.url()))
        .await
        .expect("connect")
        .store()
}

/// The group's epoch as Redis has it now.
fn epoch_in_redis(server: &RedisServer, group: &str) -> Option<String> {
    match server.run(&["HGET", &format!("cb:{{{group}}}:h"), "e"]) {
        Ok(Value::BulkString(b)) => Some(String::from_utf8_lossy(&b).into_owned()),
        _ => None,
    }
}

/// Waits until Redis holds an epoch of `group` other than `old`.
async fn moved_from(server: &RedisServer, group: &str, old: &Epoch) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(e) = epoch_in_redis(server, group).filter(|e| e != old.as_str()) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "{group} is still in epoch {old} after the rollback"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_saw_lost_offsets_moves_the_group_before_another_reuses_them() {
    let mut server = RedisServer::start();
    let seen_it = store(&server).await;
    for _ in 0..5 {
        save(&seen_it, "quiet", "m").await;
    }
    server.snapshot();
    let mut last = None;
    for _ in 0..3 {
        last = Some(save(&seen_it, "quiet", "m").await);
    }
    let old = last.expect("saved").epoch;
    server.restart_from_snapshot();
    // Nobody is a member of the group and nothing is published on the
    // server that saw offsets 6..8: it moves the group after reconnecting.
    let new = moved_from(&server, "quiet", &old).await;
    let newcomer = store(&server).await;
    let at = save(&newcomer, "quiet", "m").await;
    assert_eq!(at.epoch.as_str(), new, "the newcomer appends in the new epoch");
    assert_eq!(at.offset, 6, "after the survivors 1..5");
    assert_eq!(seen_it.head("quiet").await.expect("head").epoch.as_str(), new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_noticing_at_once_make_one_new_epoch() {
    let mut server = RedisServer::start();
    let (a, b) = (store(&server).await, store(&server).await);
    save(&a, "both", "m").await;
    server.snapshot();
    let old = save(&b, "both", "m").await.epoch;
    // Both know offset 2 (each read the head): both notice it is gone.
    assert_eq!(a.head("both").await.expect("head").last, 2);
    server.restart_from_snapshot();
    let new = moved_from(&server, "both", &old).await;
    let (on_a, on_b) = (save(&a, "both", "m").await, save(&b, "both", "m").await);
    assert_eq!((on_a.epoch.as_str(), on_b.epoch.as_str()), (new.as_str(), new.as_str()));
    assert_eq!(
        (on_a.offset, on_b.offset),
        (2, 3),
        "one new epoch, its offsets once each"
    );
}

#[tokio::test]
async fn a_stream_lost_while_its_head_survived_starts_a_new_epoch_that_keeps_new_messages() {
    let server = RedisServer::start();
    let config = RedisConfig {
        limits: channelbox_core::HistoryLimits {
            max_messages: Some(3),
            ..Default::default()
        },
        ..RedisConfig::new(server.url())
    };
    let store = RedisEngine::connect(config).await.expect("connect").store();
    let mut last = None;
    for _ in 0..3 {
        last = Some(save(&store, "evicted", "m").await);
    }
    let old = last.expect("saved");
    // An eviction took the stream and left the head with its counters.
    server.run(&["DEL", "cb:{evicted}:s"]).expect("del");
    let at = save(&store, "evicted", "m").await;
    assert_ne!(at.epoch, old.epoch, "head and stream disagreed: a new epoch");
    assert_eq!(at.offset, 4, "it continues after the newest offset handed out");
    let page = store
        .read("evicted", channelbox_core::ReadQuery::Last(10))
        .await
        .expect("read");
    let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, [4], "the new message is kept, not trimmed by stale counters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_server_without_the_floor_appends_only_after_the_group_moved() {
    let mut server = RedisServer::start();
    let seen_it = store(&server).await;
    let unaware = store(&server).await;
    // The unaware server talked to this Redis before, never to this group.
    save(&unaware, "elsewhere", "m").await;
    for _ in 0..3 {
        save(&seen_it, "held", "m").await;
    }
    server.snapshot();
    let lost = save(&seen_it, "held", "m").await;
    server.restart_from_snapshot();
    // As soon as it can, it appends: Redis would hand it offset 4 of the old
    // epoch, which the other server acknowledged before the restart.
    let deadline = Instant::now() + Duration::from_secs(10);
    let at = loop {
        let message = NewMessage::new(PayloadKind::Text, "m".into());
        let appended = match unaware.append("held", message) {
            Ok(pending) => pending.wait().await,
            Err(err) => Err(err),
        };
        if let Ok(at) = appended {
            break at;
        }
        assert!(Instant::now() < deadline, "the unaware server never appended");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        at.epoch != lost.epoch,
        "offset {} of epoch {} handed out twice",
        at.offset,
        at.epoch
    );
}

/// Redis lost a group, a new epoch replaced it, then Redis came back from a
/// snapshot taken before the loss: the old epoch is back at an offset below
/// what was handed out in it. The server whose floor is in the newer epoch
/// moves the group on instead of continuing the old epoch (found by
/// `cargo xtask chaos --store redis --seed 4`: emptied twice, then restarted
/// from the first snapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_brought_back_by_an_older_snapshot_is_not_continued() {
    let mut server = RedisServer::start();
    let engine = store(&server).await;
    for _ in 0..3 {
        save(&engine, "back", "m").await;
    }
    server.snapshot();
    let handed_out = save(&engine, "back", "m").await;
    assert_eq!(handed_out.offset, 4);
    // Redis loses the group; the next append starts a new epoch.
    server.run(&["DEL", "cb:{back}:h", "cb:{back}:s"]).expect("DEL");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let newer = save(&engine, "back", "m").await;
    assert_ne!(newer.epoch, handed_out.epoch);
    server.restart_from_snapshot();
    let deadline = Instant::now() + Duration::from_secs(10);
    let at = loop {
        let message = NewMessage::new(PayloadKind::Text, "m".into());
        let appended = match engine.append("back", message) {
            Ok(pending) => pending.wait().await,
            Err(err) => Err(err),
        };
        if let Ok(at) = appended {
            break at;
        }
        assert!(Instant::now() < deadline, "no append after the restart");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        at.epoch != handed_out.epoch,
        "offset {} of epoch {} handed out twice",
        at.offset,
        at.epoch
    );
}
