//! The `HistoryStore` contract as an executable suite. Every store runs it from
//! its own tests with a one-line call:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use channelbox_core::{HistoryLimits, HistoryStore};
//! # async fn demo(make: fn(HistoryLimits) -> Arc<dyn HistoryStore>) {
//! channelbox_core::testkit::conformance::run_all(|limits| async move { make(limits) }).await;
//! # }
//! ```
//!
//! Each check gets a fresh store from the factory, with the limits it needs, and
//! panics with a message naming the rule that broke.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::history::{now_ms, HistoryStore, NewMessage, ReadQuery};
use crate::limits::HistoryLimits;
use crate::payload::PayloadKind;
use crate::position::StreamPosition;

mod namespaces;
pub use namespaces::{
    a_count_limit_of_zero_keeps_the_newest, a_roomier_namespace_keeps_more_on_every_path,
    namespaces_keep_their_own_limits,
};

pub(crate) fn msg(payload: &str) -> NewMessage {
    NewMessage::new(PayloadKind::Json, Bytes::copy_from_slice(payload.as_bytes()))
}

pub(crate) fn sized(n: usize) -> NewMessage {
    NewMessage::new(PayloadKind::Binary, Bytes::from(vec![7u8; n]))
}

pub(crate) async fn append(store: &dyn HistoryStore, group: &str, m: NewMessage) -> u64 {
    let pending = store.append(group, m).expect("append");
    let offset = pending.wait().await.expect("append becomes durable").offset;
    offset
}

pub(crate) fn offsets(messages: &[crate::StoredMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.offset).collect()
}

/// Runs every check of the contract.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn(HistoryLimits) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    offsets_start_at_one_and_increase(make(HistoryLimits::default()).await).await;
    groups_are_independent(make(HistoryLimits::default()).await).await;
    reads_last_and_since(make(HistoryLimits::default()).await).await;
    messages_round_trip(make(HistoryLimits::default()).await).await;
    byte_budget_trims_oldest_first(
        make(HistoryLimits {
            max_bytes: 100,
            ..HistoryLimits::default()
        })
        .await,
    )
    .await;
    newest_message_survives_alone(
        make(HistoryLimits {
            max_bytes: 10,
            ..HistoryLimits::default()
        })
        .await,
    )
    .await;
    count_limit_trims_oldest_first(
        make(HistoryLimits {
            max_messages: Some(5),
            ..HistoryLimits::default()
        })
        .await,
    )
    .await;
    age_limit_expires_messages(
        make(HistoryLimits {
            max_age: Some(Duration::from_secs(60)),
            ..HistoryLimits::default()
        })
        .await,
    )
    .await;
    namespaces::run_all(&make).await;
    unknown_group_is_empty_with_stable_epoch(make(HistoryLimits::default()).await).await;
    flush_group_resets_one_group(make(HistoryLimits::default()).await).await;
    flush_all_resets_every_group(make(HistoryLimits::default()).await).await;
    concurrent_appends_get_distinct_consecutive_offsets(make(HistoryLimits::default()).await).await;
    stats_count_retained_messages(
        make(HistoryLimits {
            max_messages: Some(3),
            ..HistoryLimits::default()
        })
        .await,
    )
    .await;
    // The total budget, sized from the store's own cost of a message.
    let probe = make(HistoryLimits::default()).await;
    if !probe.capabilities().total_budget {
        return;
    }
    let cost = probe.message_cost("g0", 100);
    let budget = 3 * crate::GROUP_COST + 10 * cost;
    total_budget_trims_the_least_recently_written_groups_first(
        make(HistoryLimits {
            max_total_bytes: Some(budget),
            ..HistoryLimits::default()
        })
        .await,
        budget,
    )
    .await;
}

/// Over the total budget, the group written least recently loses its oldest
/// messages first; one that loses them all is evicted and comes back in a new
/// epoch, so no client's old offsets pass for new ones; the group just
/// written keeps its newest message; the store's cost stays within budget.
pub async fn total_budget_trims_the_least_recently_written_groups_first(store: Arc<dyn HistoryStore>, budget: u64) {
    let epoch0 = store.head("g0").await.unwrap().epoch;
    for g in ["g0", "g1", "g2"] {
        for _ in 0..4 {
            append(&*store, g, sized(100)).await;
        }
    }
    let heads = [
        store.head("g0").await.unwrap(),
        store.head("g1").await.unwrap(),
        store.head("g2").await.unwrap(),
    ];
    assert!(
        heads[0].first > 1,
        "the least recently written group lost its oldest: {heads:?}"
    );
    assert_eq!((heads[1].first, heads[1].last), (1, 4), "{heads:?}");
    assert_eq!((heads[2].first, heads[2].last), (1, 4), "{heads:?}");
    assert!(store.stats().await.unwrap().cost <= budget);
    for _ in 0..12 {
        append(&*store, "g2", sized(100)).await;
        assert!(store.stats().await.unwrap().cost <= budget);
    }
    let g0 = store.head("g0").await.unwrap();
    assert_eq!(g0.last, 0, "g0 was evicted whole: {g0:?}");
    assert_ne!(g0.epoch, epoch0, "an evicted group comes back in a new epoch");
    let g2 = store.read("g2", ReadQuery::Last(1)).await.unwrap();
    assert_eq!(offsets(&g2.messages), vec![16], "the newest message stays");
    let at = store.append("g0", sized(100)).unwrap().wait().await.unwrap();
    assert_eq!(at.offset, 1);
    assert_ne!(at.epoch, epoch0);
    for _ in 0..30 {
        append(&*store, "alone", sized(100)).await;
    }
    let alone = store.read("alone", ReadQuery::Last(100)).await.unwrap();
    assert_eq!(
        offsets(&alone.messages).last(),
        Some(&30),
        "a group alone over budget keeps its newest"
    );
    assert!(store.stats().await.unwrap().cost <= budget);
}

/// Offsets are 1, 2, 3, … and the epoch does not change between appends.
pub async fn offsets_start_at_one_and_increase(store: Arc<dyn HistoryStore>) {
    let head = store.head("g").await.unwrap();
    for expected in 1..=5u64 {
        let at = store.append("g", msg("{}")).unwrap().wait().await.unwrap();
        assert_eq!(at.offset, expected, "offsets start at 1 and increase by 1");
        assert_eq!(at.epoch, head.epoch, "appending does not change the epoch");
    }
    let head = store.head("g").await.unwrap();
    assert_eq!((head.first, head.last), (1, 5), "head after five appends");
}

/// Each group has its own offsets.
pub async fn groups_are_independent(store: Arc<dyn HistoryStore>) {
    assert_eq!(append(&*store, "a", msg("1")).await, 1);
    assert_eq!(append(&*store, "a", msg("2")).await, 2);
    assert_eq!(append(&*store, "b", msg("1")).await, 1, "a new group starts at 1");
    let a = store.read("a", ReadQuery::Last(10)).await.unwrap();
    let b = store.read("b", ReadQuery::Last(10)).await.unwrap();
    assert_eq!(offsets(&a.messages), vec![1, 2]);
    assert_eq!(offsets(&b.messages), vec![1]);
}

/// Last-n and since-offset reads, oldest first.
pub async fn reads_last_and_since(store: Arc<dyn HistoryStore>) {
    for i in 1..=10 {
        append(&*store, "g", msg(&i.to_string())).await;
    }
    let read = |q| {
        let store = store.clone();
        async move { offsets(&store.read("g", q).await.unwrap().messages) }
    };
    assert_eq!(read(ReadQuery::Last(3)).await, vec![8, 9, 10], "last 3, oldest first");
    assert_eq!(read(ReadQuery::Last(100)).await, (1..=10).collect::<Vec<_>>());
    assert_eq!(read(ReadQuery::Last(0)).await, Vec::<u64>::new());
    assert_eq!(read(ReadQuery::Since { offset: 0, limit: 4 }).await, vec![1, 2, 3, 4]);
    assert_eq!(read(ReadQuery::Since { offset: 8, limit: 10 }).await, vec![9, 10]);
    assert_eq!(read(ReadQuery::Since { offset: 10, limit: 5 }).await, Vec::<u64>::new());
    assert_eq!(read(ReadQuery::Since { offset: 99, limit: 5 }).await, Vec::<u64>::new());
}

/// What is read back is what was appended.
pub async fn messages_round_trip(store: Arc<dyn HistoryStore>) {
    let sent = [
        NewMessage {
            kind: PayloadKind::Json,
            payload: Bytes::from_static(br#"{"text":"hello"}"#),
            meta: Bytes::from_static(br#"{"from":"x"}"#),
            timestamp_ms: now_ms(),
        },
        NewMessage {
            kind: PayloadKind::Text,
            payload: Bytes::from_static("grüße".as_bytes()),
            meta: Bytes::new(),
            timestamp_ms: now_ms() + 1,
        },
        NewMessage {
            kind: PayloadKind::Binary,
            payload: Bytes::from_static(&[0, 255, 1, 254]),
            meta: Bytes::from_static(&[9]),
            timestamp_ms: now_ms() + 2,
        },
    ];
    for m in &sent {
        append(&*store, "g", m.clone()).await;
    }
    let page = store.read("g", ReadQuery::Last(10)).await.unwrap();
    assert_eq!(page.messages.len(), 3);
    for (got, want) in page.messages.iter().zip(&sent) {
        assert_eq!(got.kind, want.kind, "kind round-trips");
        assert_eq!(got.payload, want.payload, "payload round-trips");
        assert_eq!(got.meta, want.meta, "meta round-trips");
        assert_eq!(got.timestamp_ms, want.timestamp_ms, "timestamp round-trips");
    }
}

/// Above the byte budget the oldest go first; the history is never wiped whole.
pub async fn byte_budget_trims_oldest_first(store: Arc<dyn HistoryStore>) {
    for i in 1..=25u64 {
        assert_eq!(
            append(&*store, "g", sized(10)).await,
            i,
            "offsets keep increasing while trimming"
        );
    }
    let page = store.read("g", ReadQuery::Last(1000)).await.unwrap();
    let bytes: usize = page.messages.iter().map(|m| m.payload.len()).sum();
    assert!(bytes <= 100, "retained {bytes} bytes, budget 100");
    assert_eq!(
        offsets(&page.messages),
        (16..=25).collect::<Vec<_>>(),
        "the newest 100 bytes are kept"
    );
    assert_eq!((page.head.first, page.head.last), (16, 25));
}

/// The newest message survives even alone above the budget.
pub async fn newest_message_survives_alone(store: Arc<dyn HistoryStore>) {
    append(&*store, "g", sized(4)).await;
    append(&*store, "g", sized(50)).await;
    let page = store.read("g", ReadQuery::Last(10)).await.unwrap();
    assert_eq!(
        offsets(&page.messages),
        vec![2],
        "only the newest, oversized message is kept"
    );
    append(&*store, "g", sized(60)).await;
    let page = store.read("g", ReadQuery::Last(10)).await.unwrap();
    assert_eq!(offsets(&page.messages), vec![3]);
    assert_eq!(page.head.first, 3);
}

/// The message-count limit keeps the newest messages.
pub async fn count_limit_trims_oldest_first(store: Arc<dyn HistoryStore>) {
    for _ in 0..12 {
        append(&*store, "g", msg("{}")).await;
    }
    let page = store.read("g", ReadQuery::Last(100)).await.unwrap();
    assert_eq!(offsets(&page.messages), vec![8, 9, 10, 11, 12]);
    assert!(
        !page.head.can_recover(&StreamPosition::new(page.head.epoch.clone(), 5)),
        "a trimmed gap cannot be recovered"
    );
    assert!(page.head.can_recover(&StreamPosition::new(page.head.epoch.clone(), 7)));
}

/// Messages older than the age limit are never read back.
pub async fn age_limit_expires_messages(store: Arc<dyn HistoryStore>) {
    let old = now_ms() - 120_000;
    for _ in 0..3 {
        let mut m = msg("old");
        m.timestamp_ms = old;
        append(&*store, "g", m).await;
    }
    append(&*store, "g", msg("new")).await;
    let page = store.read("g", ReadQuery::Last(10)).await.unwrap();
    assert_eq!(offsets(&page.messages), vec![4], "expired messages are gone");
    assert_eq!(page.head.first, 4);
    let mut m = msg("old");
    m.timestamp_ms = old;
    append(&*store, "h", m).await;
    let page = store.read("h", ReadQuery::Last(10)).await.unwrap();
    assert!(page.messages.is_empty(), "age removes even the newest message");
    assert_eq!(page.head.last, 1, "offsets are not reused after expiry");
}

/// A group that never had a message reads empty, with an epoch that stays put.
pub async fn unknown_group_is_empty_with_stable_epoch(store: Arc<dyn HistoryStore>) {
    let a = store.head("never").await.unwrap();
    let b = store.head("never").await.unwrap();
    assert!(!a.epoch.as_str().is_empty(), "every group has an epoch");
    assert_eq!(a, b, "reading does not change the head");
    assert_eq!((a.first, a.last), (1, 0));
    let page = store.read("never", ReadQuery::Last(10)).await.unwrap();
    assert!(page.messages.is_empty());
    assert_eq!(page.head.epoch, a.epoch);
    assert_eq!(append(&*store, "never", msg("1")).await, 1);
    assert_eq!(
        store.head("never").await.unwrap().epoch,
        a.epoch,
        "the first append keeps the epoch"
    );
}

/// Flushing a group gives it a new epoch and restarts its offsets; others keep theirs.
pub async fn flush_group_resets_one_group(store: Arc<dyn HistoryStore>) {
    for _ in 0..3 {
        append(&*store, "a", msg("1")).await;
        append(&*store, "b", msg("1")).await;
    }
    let a0 = store.head("a").await.unwrap();
    let b0 = store.head("b").await.unwrap();
    let new_epoch = store.flush_group("a").await.unwrap();
    let a1 = store.head("a").await.unwrap();
    assert_ne!(a1.epoch, a0.epoch, "a flushed group gets a new epoch");
    assert_eq!(a1.epoch, new_epoch, "flush_group returns the new epoch");
    assert_eq!((a1.first, a1.last), (1, 0));
    assert!(store.read("a", ReadQuery::Last(10)).await.unwrap().messages.is_empty());
    assert_eq!(store.head("b").await.unwrap(), b0, "other groups are untouched");
    assert_eq!(append(&*store, "a", msg("1")).await, 1, "offsets restart at 1");
    let again = store.flush_group("a").await.unwrap();
    assert!(again != new_epoch && again != a0.epoch, "every flush is a new epoch");
}

/// Flushing everything gives every group a new epoch.
pub async fn flush_all_resets_every_group(store: Arc<dyn HistoryStore>) {
    append(&*store, "a", msg("1")).await;
    append(&*store, "b", msg("1")).await;
    let before = [
        store.head("a").await.unwrap(),
        store.head("b").await.unwrap(),
        store.head("c").await.unwrap(),
    ];
    store.flush_all().await.unwrap();
    for (name, old) in ["a", "b", "c"].into_iter().zip(before) {
        let head = store.head(name).await.unwrap();
        assert_ne!(head.epoch, old.epoch, "group {name} gets a new epoch");
        assert_eq!(head.last, 0);
    }
    assert_eq!(store.stats().await.unwrap().messages, 0);
}

/// Appends from many tasks get distinct, consecutive offsets, in each task's order.
pub async fn concurrent_appends_get_distinct_consecutive_offsets(store: Arc<dyn HistoryStore>) {
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                // Every append is started before any is awaited: pipelined.
                let pending: Vec<_> = (0..50)
                    .map(|i| store.append("g", msg(&format!("{t}-{i}"))).unwrap())
                    .collect();
                let mut got = Vec::new();
                for p in pending {
                    got.push(p.wait().await.unwrap().offset);
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        let got = task.await.unwrap();
        assert!(got.windows(2).all(|w| w[0] < w[1]), "one task's offsets increase");
        all.extend(got);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=400).collect::<Vec<_>>(),
        "offsets are distinct and consecutive"
    );
}

/// Stats count what is retained, after trims.
pub async fn stats_count_retained_messages(store: Arc<dyn HistoryStore>) {
    for _ in 0..5 {
        append(&*store, "a", sized(10)).await;
    }
    append(&*store, "b", sized(7)).await;
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.messages, 4, "3 kept in a, 1 in b");
    assert_eq!(stats.bytes, 37);
}
