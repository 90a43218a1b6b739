//! Injected write failures (feature `failpoints`): what readers see while a
//! batch fails, the generation a group moves to after the rollback, and that
//! the rollback follows generations, not group names.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use channelbox_core::{Epoch, HistoryLimits, HistoryStore, NewMessage, PayloadKind, ReadQuery};
use channelbox_store_sled::{SledConfig, SledStore};

fn message(text: &str) -> NewMessage {
    NewMessage::new(PayloadKind::Text, Bytes::from(text.to_owned()))
}

fn open(dir: &tempfile::TempDir, limits: HistoryLimits) -> Arc<SledStore> {
    let config = SledConfig {
        limits,
        ..SledConfig::new(dir.path().join("history"))
    };
    Arc::new(SledStore::open(config).unwrap())
}

async fn acked(store: &SledStore, group: &str, text: &str) -> u64 {
    store.append(group, message(text)).unwrap().wait().await.unwrap().offset
}

/// Polls a future once, so that it queues its write, and hands it back.
fn started<T>(mut f: Pin<Box<dyn Future<Output = T> + Send + '_>>) -> Pin<Box<dyn Future<Output = T> + Send + '_>> {
    let poll = f.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    assert!(matches!(poll, Poll::Pending), "it waits for the writer");
    f
}

async fn recovered(store: &SledStore) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !store.healthy() {
        assert!(Instant::now() < deadline, "the store recovers by itself");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn texts(store: &SledStore, group: &str) -> Vec<(u64, String)> {
    let page = store.read(group, ReadQuery::Last(100)).await.unwrap();
    page.messages
        .iter()
        .map(|m| (m.offset, String::from_utf8_lossy(&m.payload).into_owned()))
        .collect()
}

fn numbered(texts: &[&str]) -> Vec<(u64, String)> {
    (1..).zip(texts.iter().map(|t| t.to_string())).collect()
}

#[tokio::test]
async fn readers_never_see_a_write_that_fails_and_its_offsets_move_to_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, HistoryLimits::default());
    for text in ["a", "b", "c"] {
        acked(&store, "g", text).await;
    }
    let before = store.head("g").await.unwrap().epoch;
    store.hold_recovery(true);
    store.pause_writer();
    let failing = store.append("g", message("failed")).unwrap();
    assert_eq!(failing.position().unwrap().offset, 4);
    let head = {
        let store = store.clone();
        tokio::spawn(async move { store.head("g").await })
    };
    tokio::task::yield_now().await;
    // The whole batch reaches sled, then its flush fails.
    store.fail_next_batch(usize::MAX);
    store.resume_writer();
    assert!(failing.wait().await.is_err(), "the append fails");
    let head = head.await.unwrap().unwrap();
    assert_eq!(
        (head.epoch.clone(), head.last),
        (before.clone(), 3),
        "a head taken meanwhile"
    );
    assert!(!store.healthy(), "still failing");
    assert_eq!(store.head("g").await.unwrap().last, 3, "a head while failing");
    assert_eq!(
        texts(&store, "g").await,
        numbered(&["a", "b", "c"]),
        "history while failing"
    );

    store.hold_recovery(false);
    recovered(&store).await;
    let after = store.head("g").await.unwrap();
    assert_eq!(after.last, 3);
    assert_ne!(
        after.epoch, before,
        "offset 4 of the old epoch was handed out, so it is never used again"
    );
    let next = store.append("g", message("d")).unwrap().wait().await.unwrap();
    assert_eq!((next.epoch, next.offset), (after.epoch, 4));
    assert_eq!(texts(&store, "g").await, numbered(&["a", "b", "c", "d"]));
}

#[tokio::test]
async fn a_flush_in_a_failing_batch_rolls_back_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, HistoryLimits::default());
    for text in ["a", "b", "c"] {
        acked(&store, "g", text).await;
    }
    let before = store.head("g").await.unwrap().epoch;
    store.pause_writer();
    store.fail_next_batch(0);
    let flush = started(store.flush_group("g"));
    let failing = store.append("g", message("in the flushed epoch")).unwrap();
    let flushed: Epoch = failing.position().unwrap().epoch.clone();
    assert_eq!(failing.position().unwrap().offset, 1);
    store.resume_writer();
    assert!(flush.await.is_err(), "the flush fails");
    assert!(failing.wait().await.is_err(), "the append fails");
    recovered(&store).await;

    assert_eq!(
        texts(&store, "g").await,
        numbered(&["a", "b", "c"]),
        "acknowledged messages stay"
    );
    let after = store.head("g").await.unwrap();
    assert_eq!(after.last, 3);
    assert_ne!(after.epoch, before);
    assert_ne!(after.epoch, flushed, "offset 1 of the flushed epoch was handed out");
    assert_eq!(acked(&store, "g", "d").await, 4);
}

#[tokio::test]
async fn an_eviction_and_re_creation_in_a_failing_batch_roll_back_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    // Three 10-byte messages of "g" cost 625 with the group's entry; a
    // 1,000-byte message of "h" puts the store over 1,500 and evicts "g"
    // whole, and "g" written again evicts "h".
    let limits = HistoryLimits {
        max_total_bytes: Some(1500),
        ..HistoryLimits::default()
    };
    let store = open(&dir, limits);
    let ten = ["aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc"];
    for text in ten {
        acked(&store, "g", text).await;
    }
    let before = store.head("g").await.unwrap().epoch;
    store.pause_writer();
    store.fail_next_batch(0);
    let evicting = store.append("h", message(&"x".repeat(1000))).unwrap();
    let recreated = store.append("g", message("")).unwrap();
    let recreated_at = recreated.position().unwrap().clone();
    assert_eq!(recreated_at.offset, 1, "g was evicted and created again");
    assert_ne!(recreated_at.epoch, before);
    store.resume_writer();
    assert!(evicting.wait().await.is_err());
    assert!(recreated.wait().await.is_err());
    recovered(&store).await;

    assert_eq!(texts(&store, "g").await, numbered(&ten), "acknowledged messages stay");
    let after = store.head("g").await.unwrap();
    assert_eq!(after.last, 3);
    assert_ne!(after.epoch, before);
    assert_ne!(after.epoch, recreated_at.epoch);
    assert!(texts(&store, "h").await.is_empty(), "the failed message is gone");
    assert_eq!(acked(&store, "g", "dddddddddd").await, 4);

    // And all of it holds after a restart.
    let epoch = store.head("g").await.unwrap().epoch;
    drop(store);
    let store = open(&dir, HistoryLimits::default());
    assert_eq!(store.head("g").await.unwrap().epoch, epoch);
    assert_eq!(texts(&store, "g").await.len(), 4);
}

#[tokio::test]
async fn a_failing_eviction_leaves_other_groups_readable() {
    let dir = tempfile::tempdir().unwrap();
    // "g" costs 625 and "o" 373; a 1,000-byte message of "h" (1,369) puts
    // the store over 1,800 and evicts "g", the least recently written
    // group, and no more.
    let limits = HistoryLimits {
        max_total_bytes: Some(1800),
        ..HistoryLimits::default()
    };
    let store = open(&dir, limits);
    for text in ["aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc"] {
        acked(&store, "g", text).await;
    }
    acked(&store, "o", "kept").await;
    let o = store.head("o").await.unwrap();
    let fresh = store.head("never-written").await.unwrap();
    store.hold_recovery(true);
    store.fail_next_batch(0);
    let evicting = store.append("h", message(&"x".repeat(1000))).unwrap();
    assert!(evicting.wait().await.is_err());
    assert!(!store.healthy(), "still failing, the eviction not durable");

    assert_eq!(store.head("o").await.unwrap(), o, "a group the eviction did not touch");
    assert_eq!(texts(&store, "o").await, numbered(&["kept"]));
    assert_eq!(
        store.head("never-written").await.unwrap(),
        fresh,
        "a group without an entry, in the epoch the disk gives it"
    );
    assert_eq!(store.head("h").await.unwrap().last, 0, "the failed append is not seen");

    store.hold_recovery(false);
    recovered(&store).await;
    assert_eq!(texts(&store, "g").await.len(), 3, "the eviction was rolled back");
    assert_eq!(store.head("o").await.unwrap(), o, "untouched: same epoch");
}

#[tokio::test]
async fn reads_go_on_while_attempts_to_reopen_fail() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, HistoryLimits::default());
    for text in ["a", "b", "c"] {
        acked(&store, "g", text).await;
    }
    store.fail_reopens(true);
    store.fail_next_batch(usize::MAX);
    assert!(store.append("g", message("failed")).unwrap().wait().await.is_err());
    // Attempts come once a second; let a few of them fail.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!store.healthy(), "still failing");
    assert_eq!(
        texts(&store, "g").await,
        numbered(&["a", "b", "c"]),
        "history while failing"
    );
    assert_eq!(store.head("g").await.unwrap().last, 3);
    store.fail_reopens(false);
    recovered(&store).await;
    assert_eq!(acked(&store, "g", "d").await, 4);
    assert_eq!(texts(&store, "g").await, numbered(&["a", "b", "c", "d"]));
}
