//! Restarts while the disk is failing (feature `failpoints`): a store that is
//! dropped (or killed) before it recovered by itself must still roll the
//! failed writes back at the next opening, and move their groups to new
//! epochs, since their offsets were handed out; a store that was not failing
//! keeps its epochs and offsets across a restart.

use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use channelbox_core::{Epoch, HistoryLimits, HistoryStore, NewMessage, PayloadKind, ReadQuery};
use channelbox_store_sled::{CommitMode, SledConfig, SledStore};

fn message(text: &str) -> NewMessage {
    NewMessage::new(PayloadKind::Text, Bytes::from(text.to_owned()))
}

fn config(dir: &tempfile::TempDir) -> SledConfig {
    SledConfig {
        limits: HistoryLimits::default(),
        ..SledConfig::new(dir.path().join("history"))
    }
}

async fn acked(store: &SledStore, group: &str, text: &str) -> (Epoch, u64) {
    let at = store.append(group, message(text)).unwrap().wait().await.unwrap();
    (at.epoch, at.offset)
}

async fn texts(store: &SledStore, group: &str) -> Vec<String> {
    let page = store.read(group, ReadQuery::Last(100)).await.unwrap();
    page.messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect()
}

async fn recovered(store: &SledStore) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !store.healthy() {
        assert!(Instant::now() < deadline, "the store recovers by itself");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Three acknowledged messages in "g", then one more whose batch fails after
/// `applied` of its operations reached sled; the store stays failing.
async fn failing_store(dir: &tempfile::TempDir, applied: usize) -> (SledStore, Epoch) {
    let store = SledStore::open(config(dir)).unwrap();
    for text in ["a", "b", "c"] {
        acked(&store, "g", text).await;
    }
    acked(&store, "other", "kept").await;
    let epoch = store.head("g").await.unwrap().epoch;
    store.hold_recovery(true);
    store.fail_next_batch(applied);
    let failing = store.append("g", message("failed")).unwrap();
    assert_eq!(failing.position().unwrap().offset, 4);
    assert!(failing.wait().await.is_err(), "the append fails");
    assert!(!store.healthy());
    (store, epoch)
}

/// After the restart: the failed message is gone, offset 4 of the old epoch
/// is never used again, and acknowledged messages stay.
async fn check_rolled_back(store: &SledStore, before: &Epoch) {
    assert_eq!(texts(store, "g").await, ["a", "b", "c"], "the failed message is gone");
    let head = store.head("g").await.unwrap();
    assert_eq!(head.last, 3);
    assert_ne!(&head.epoch, before, "offset 4 of the old epoch was handed out");
    let (epoch, offset) = acked(store, "g", "d").await;
    assert_eq!((epoch, offset), (head.epoch, 4));
    assert_eq!(
        texts(store, "other").await,
        ["kept"],
        "other groups keep their messages"
    );
}

#[tokio::test]
async fn a_store_dropped_while_failing_rolls_back_at_the_next_opening() {
    for applied in [usize::MAX, 1, 0] {
        let dir = tempfile::tempdir().unwrap();
        let (store, before) = failing_store(&dir, applied).await;
        // sled flushes what its tree holds when the last handle goes: with
        // every operation applied, "failed" is then on disk at offset 4.
        drop(store);
        let store = SledStore::open(config(&dir)).unwrap();
        check_rolled_back(&store, &before).await;
        // The rollback is done once: the next restart keeps the epochs.
        let epoch = store.head("g").await.unwrap().epoch;
        drop(store);
        let store = SledStore::open(config(&dir)).unwrap();
        assert_eq!(store.head("g").await.unwrap().epoch, epoch, "applied {applied}");
        assert_eq!(texts(&store, "g").await, ["a", "b", "c", "d"]);
    }
}

#[tokio::test]
async fn a_store_that_recovered_keeps_its_epochs_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (store, before) = failing_store(&dir, usize::MAX).await;
    store.hold_recovery(false);
    recovered(&store).await;
    let head = store.head("g").await.unwrap();
    assert_ne!(head.epoch, before);
    let other = store.head("other").await.unwrap();
    drop(store);
    let store = SledStore::open(config(&dir)).unwrap();
    assert_eq!(store.head("g").await.unwrap(), head, "no second rollback");
    assert_eq!(
        store.head("other").await.unwrap(),
        other,
        "an untouched group keeps its epoch"
    );
}

#[tokio::test]
async fn with_one_flush_per_append_a_failure_keeps_the_writes_flushed_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = SledConfig {
        commit: CommitMode::PerAppend,
        ..config(&dir)
    };
    let store = SledStore::open(config.clone()).unwrap();
    acked(&store, "g", "a").await;
    store.hold_recovery(true);
    store.pause_writer();
    // Three writes in one batch; the failure comes after the first two
    // operations: "b" and "c" are flushed (acknowledged), "d" fails.
    let writes: Vec<_> = ["b", "c", "d"]
        .into_iter()
        .map(|t| store.append("g", message(t)).unwrap())
        .collect();
    store.fail_next_batch(2);
    store.resume_writer();
    let mut results = Vec::new();
    for w in writes {
        results.push(w.wait().await.is_ok());
    }
    assert_eq!(results, [true, true, false]);
    drop(store);
    let store = SledStore::open(config).unwrap();
    assert_eq!(texts(&store, "g").await, ["a", "b", "c"], "acknowledged ones stay");
    assert_eq!(store.head("g").await.unwrap().last, 3);
}

#[tokio::test]
async fn a_failure_that_cannot_be_marked_is_told_to_nobody_until_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(&dir)).unwrap();
    for text in ["a", "b", "c"] {
        acked(&store, "g", text).await;
    }
    acked(&store, "other", "kept").await;
    store.hold_recovery(true);
    store.fail_marks(true);
    store.fail_next_batch(usize::MAX);
    let failing = store.append("g", message("failed")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.healthy() {
        assert!(Instant::now() < deadline, "the batch fails");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut waiting = Box::pin(failing.wait());
    let poll = waiting.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    assert!(
        matches!(poll, Poll::Pending),
        "not answered: a restart could not roll it back"
    );
    assert!(store.append("g", message("refused")).is_err(), "new writes are refused");
    assert_eq!(store.head("g").await.unwrap().last, 3, "reads go on");
    store.fail_marks(false);
    assert!(waiting.await.is_err(), "answered once the mark is on disk");
    let before = store.head("g").await.unwrap().epoch;
    drop(store);
    let store = SledStore::open(config(&dir)).unwrap();
    check_rolled_back(&store, &before).await;
}

#[tokio::test]
async fn a_store_dropped_before_its_failure_was_marked_marks_it_on_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(&dir)).unwrap();
    for text in ["a", "b", "c"] {
        acked(&store, "g", text).await;
    }
    acked(&store, "other", "kept").await;
    let before = store.head("g").await.unwrap().epoch;
    store.hold_recovery(true);
    store.fail_marks(true);
    store.fail_next_batch(0);
    let failing = store.append("g", message("failed")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.healthy() {
        assert!(Instant::now() < deadline, "the batch fails");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The disk takes the mark again just as the store is stopped: its
    // writers are told the store closed, so the mark must be there.
    store.fail_marks(false);
    drop(store);
    assert!(failing.wait().await.is_err());
    let store = SledStore::open(config(&dir)).unwrap();
    check_rolled_back(&store, &before).await;
}

#[tokio::test]
async fn a_writer_thread_that_panics_leaves_nobody_waiting_and_a_restart_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(config(&dir)).unwrap();
    for text in ["a", "b", "c"] {
        acked(&store, "g", text).await;
    }
    acked(&store, "other", "kept").await;
    let before = store.head("g").await.unwrap().epoch;
    store.panic_next_batch();
    let failing = store.append("g", message("failed")).unwrap();
    assert!(failing.wait().await.is_err(), "the append is answered");
    assert!(!store.healthy(), "and the store stays failing");
    assert_eq!(store.head("g").await.unwrap().last, 3, "reads go on");
    assert!(store.append("g", message("refused")).is_err());
    drop(store);
    let store = SledStore::open(config(&dir)).unwrap();
    check_rolled_back(&store, &before).await;
}
