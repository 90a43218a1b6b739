//! Durability tests, one shape each: temp dir, open, write, drop, reopen, assert.
//! Plus the typed errors for directories the store cannot use.

use bytes::Bytes;
use channelbox_core::{HistoryLimits, HistoryStore, NewMessage, PayloadKind, ReadQuery, StoreErrorKind};
use channelbox_store_sled::{SledConfig, SledStore};

fn text(s: &str) -> NewMessage {
    NewMessage::new(PayloadKind::Text, Bytes::copy_from_slice(s.as_bytes()))
}

async fn append(store: &SledStore, group: &str, m: NewMessage) -> u64 {
    store.append(group, m).unwrap().wait().await.unwrap().offset
}

#[tokio::test]
async fn reopening_continues_offsets_epochs_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let config = SledConfig {
        limits: HistoryLimits {
            max_messages: Some(3),
            ..HistoryLimits::default()
        },
        ..SledConfig::new(dir.path())
    };
    let store = SledStore::open(config.clone()).unwrap();
    for i in 1..=5 {
        append(&store, "g", text(&format!("m{i}"))).await;
    }
    let epoch = store.head("g").await.unwrap().epoch;
    drop(store);

    let store = SledStore::open(config.clone()).unwrap();
    let head = store.head("g").await.unwrap();
    assert_eq!(head.epoch, epoch, "the epoch survives a restart");
    assert_eq!((head.first, head.last), (3, 5));
    assert_eq!(append(&store, "g", text("m6")).await, 6, "offsets continue");
    let page = store.read("g", ReadQuery::Last(10)).await.unwrap();
    let got: Vec<(u64, Bytes)> = page.messages.into_iter().map(|m| (m.offset, m.payload)).collect();
    assert_eq!(
        got,
        vec![(4, Bytes::from("m4")), (5, Bytes::from("m5")), (6, Bytes::from("m6"))],
        "the count limit still holds"
    );
}

#[tokio::test]
async fn a_flushed_group_keeps_its_new_epoch_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(SledConfig::new(dir.path())).unwrap();
    append(&store, "g", text("a")).await;
    let old = store.head("g").await.unwrap().epoch;
    let new = store.flush_group("g").await.unwrap();
    assert_ne!(old, new);
    drop(store);
    let store = SledStore::open(SledConfig::new(dir.path())).unwrap();
    let head = store.head("g").await.unwrap();
    assert_eq!(head.epoch, new, "the new epoch was persisted");
    assert_eq!(head.last, 0);
    store.flush_all().await.unwrap();
    let after_all = store.head("g").await.unwrap().epoch;
    drop(store);
    let store = SledStore::open(SledConfig::new(dir.path())).unwrap();
    assert_eq!(store.head("g").await.unwrap().epoch, after_all);
    assert_ne!(after_all, new);
}

#[test]
fn a_file_where_the_directory_should_be_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"hello").unwrap();
    let err = SledStore::open(SledConfig::new(&file)).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unusable);
    assert!(
        err.to_string().contains(&*file.to_string_lossy()),
        "names the path: {err}"
    );
    let below = file.join("history");
    let err = SledStore::open(SledConfig::new(&below)).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unusable);
    assert!(
        err.to_string().contains(&*below.to_string_lossy()),
        "names the path: {err}"
    );
}

#[test]
fn a_locked_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let _first = SledStore::open(SledConfig::new(dir.path())).unwrap();
    let err = SledStore::open(SledConfig::new(dir.path())).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Locked, "{err}");
    assert!(err.to_string().contains("locked"), "{err}");
    assert!(
        err.to_string().contains(&*dir.path().to_string_lossy()),
        "names the path: {err}"
    );
}

#[test]
fn another_format_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.insert(b"\x00format", b"channelbox-sled/999".as_slice()).unwrap();
        db.flush().unwrap();
    }
    let err = SledStore::open(SledConfig::new(dir.path())).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Incompatible);
    assert!(err.to_string().contains("channelbox-sled/999"), "{err}");

    let other = tempfile::tempdir().unwrap();
    {
        let db = sled::open(other.path()).unwrap();
        db.insert(b"someone else's key", b"value".as_slice()).unwrap();
        db.flush().unwrap();
    }
    let err = SledStore::open(SledConfig::new(other.path())).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Incompatible);
    assert!(err.to_string().contains("not a channelbox history"), "{err}");
}

#[tokio::test]
async fn an_empty_group_name_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(SledConfig::new(dir.path())).unwrap();
    let err = store.append("", text("x")).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::InvalidInput);
}

#[tokio::test]
async fn a_group_name_longer_than_a_record_holds_is_rejected_by_its_length() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(SledConfig::new(dir.path())).unwrap();
    let err = store.append(&"g".repeat(65_536), text("x")).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::InvalidInput);
    assert!(err.to_string().contains("65536"), "{err}");
    store
        .append(&"g".repeat(65_535), text("x"))
        .unwrap()
        .wait()
        .await
        .unwrap();
}

/// Reads racing appends that trim: every page is a run without holes that
/// starts where its head says the history starts (or where the reader asked),
/// and flushes racing reads never mix generations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_trimming_appends_and_flushes_have_no_holes() {
    let dir = tempfile::tempdir().unwrap();
    let config = SledConfig {
        limits: HistoryLimits {
            max_messages: Some(20),
            ..HistoryLimits::default()
        },
        ..SledConfig::new(dir.path())
    };
    let store = std::sync::Arc::new(SledStore::open(config).unwrap());
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..4000u64 {
                let p = store.append("g", text(&format!("m{i}"))).unwrap();
                if i % 8 == 0 {
                    p.wait().await.unwrap();
                }
                if i % 1000 == 999 {
                    store.flush_group("g").await.unwrap();
                }
            }
        })
    };
    let mut pages = 0;
    while !writer.is_finished() {
        for query in [ReadQuery::Last(20), ReadQuery::Since { offset: 0, limit: 100 }] {
            let page = store.read("g", query).await.unwrap();
            let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset).collect();
            if let Some(&first) = offsets.first() {
                assert_eq!(first, page.head.first, "a page starts where its history starts");
                let expected: Vec<u64> = (first..first + offsets.len() as u64).collect();
                assert_eq!(offsets, expected, "no holes");
                assert!(*offsets.last().unwrap() <= page.head.last);
                for m in &page.messages {
                    // Offsets restart at each flush; payload numbers do not, but
                    // within one generation they rise with the offset.
                    let n: u64 = std::str::from_utf8(&m.payload).unwrap()[1..].parse().unwrap();
                    assert_eq!(n % 1000 + 1, m.offset, "one generation per page");
                }
            }
            pages += 1;
        }
    }
    writer.await.unwrap();
    assert!(pages > 10, "the reader raced the writer");
}

#[cfg(unix)]
#[tokio::test]
async fn a_new_history_directory_is_private_to_its_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join("data");
    let store = SledStore::open(SledConfig::new(&path)).unwrap();
    drop(store);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{mode:o}");
}

#[tokio::test]
async fn the_total_budget_holds_across_a_restart_and_evicted_groups_stay_in_new_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let probe = SledStore::open(SledConfig::new(dir.path().join("probe"))).unwrap();
    let budget = 2 * channelbox_core::GROUP_COST + 6 * probe.message_cost("old", 50);
    drop(probe);
    let config = SledConfig {
        limits: HistoryLimits {
            max_total_bytes: Some(budget),
            ..HistoryLimits::default()
        },
        ..SledConfig::new(dir.path().join("data"))
    };
    let store = SledStore::open(config.clone()).unwrap();
    append(&store, "old", text(&"o".repeat(50))).await;
    let old_epoch = store.head("old").await.unwrap().epoch;
    for _ in 0..10 {
        append(&store, "new", text(&"n".repeat(50))).await;
    }
    assert_eq!(store.head("old").await.unwrap().last, 0, "evicted");
    let cost = store.stats().await.unwrap().cost;
    drop(store);

    let store = SledStore::open(config).unwrap();
    assert_eq!(
        store.stats().await.unwrap().cost,
        cost,
        "the ledger is rebuilt from disk"
    );
    let old = store.head("old").await.unwrap();
    assert_eq!(old.last, 0);
    assert_ne!(old.epoch, old_epoch, "the eviction survives the restart");
    let p = store.append("old", text("again")).unwrap().wait().await.unwrap();
    assert_eq!(p.offset, 1);
    assert_ne!(p.epoch, old_epoch, "old offsets never pass for new ones");
}
