//! The history limits of namespaces ([`HistoryLimits::limits_for`]): every
//! path of a store that appends, trims, expires or counts must use the
//! group's own limits, whether they are tighter or roomier than the defaults.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{append, msg, offsets, sized};
use crate::history::{now_ms, HistoryStore, ReadQuery};
use crate::limits::{GroupLimits, HistoryLimits};

/// Runs every check of this module, each on a fresh store from `make`.
pub(super) async fn run_all<F, Fut>(make: &F)
where
    F: Fn(HistoryLimits) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    namespaces_keep_their_own_limits(make(namespaced_limits()).await).await;
    a_roomier_namespace_keeps_more_on_every_path(make(roomy_limits()).await).await;
    a_count_limit_of_zero_keeps_the_newest(
        make(HistoryLimits {
            max_messages: Some(0),
            ..HistoryLimits::default()
        })
        .await,
    )
    .await;
}

/// Five messages per group by default; namespace `short` keeps 2, `small`
/// 100 payload bytes, `aged` one minute.
fn namespaced_limits() -> HistoryLimits {
    let defaults = HistoryLimits {
        max_messages: Some(5),
        ..HistoryLimits::default()
    };
    let own = |max_bytes, max_messages, max_age| GroupLimits {
        max_bytes,
        max_messages,
        max_age,
    };
    let top = defaults.max_bytes;
    defaults
        .with_namespace("short", own(top, Some(2), None))
        .with_namespace("small", own(100, None, None))
        .with_namespace("aged", own(top, None, Some(Duration::from_secs(60))))
}

/// Groups in namespaces with different limits keep different amounts of
/// history, each by its own namespace's limits (looked up at append, read
/// and expiry time); groups outside them, a name without `:` included, keep
/// the defaults.
pub async fn namespaces_keep_their_own_limits(store: Arc<dyn HistoryStore>) {
    for group in ["short:x", "small:x", "long:x", "plain", "short"] {
        for _ in 0..8 {
            append(&*store, group, sized(40)).await;
        }
    }
    let kept = |group: &'static str| {
        let store = store.clone();
        async move {
            let page = store.read(group, ReadQuery::Last(100)).await.unwrap();
            assert_eq!(page.head.last, 8, "{group}: offsets go on while trimming");
            offsets(&page.messages)
        }
    };
    assert_eq!(kept("short:x").await, vec![7, 8], "namespace short keeps 2 messages");
    assert_eq!(kept("small:x").await, vec![7, 8], "namespace small keeps 100 bytes");
    for default in ["long:x", "plain", "short"] {
        assert_eq!(
            kept(default).await,
            vec![4, 5, 6, 7, 8],
            "{default} keeps the default 5"
        );
    }
    let old = now_ms() - 120_000;
    for group in ["aged:x", "plain:y"] {
        let mut m = msg("old");
        m.timestamp_ms = old;
        append(&*store, group, m).await;
        append(&*store, group, msg("new")).await;
    }
    assert_eq!(
        kept_since(&*store, "aged:x").await,
        vec![2],
        "namespace aged expires after a minute"
    );
    assert_eq!(
        kept_since(&*store, "plain:y").await,
        vec![1, 2],
        "others keep old messages"
    );
    let aged = store.head("aged:x").await.unwrap();
    assert_eq!((aged.first, aged.last), (2, 2));
    let stats = store.stats().await.unwrap();
    assert_eq!(
        stats.messages,
        2 + 2 + 3 * 5 + 1 + 2,
        "stats count each group's own limits"
    );
}

/// Offsets of a group's messages read forward from the start.
async fn kept_since(store: &dyn HistoryStore, group: &str) -> Vec<u64> {
    let page = store
        .read(group, ReadQuery::Since { offset: 0, limit: 100 })
        .await
        .unwrap();
    offsets(&page.messages)
}

/// Three messages and one minute per group by default; namespace `roomy`
/// keeps eight messages, however old.
fn roomy_limits() -> HistoryLimits {
    let defaults = HistoryLimits {
        max_messages: Some(3),
        max_age: Some(Duration::from_secs(60)),
        ..HistoryLimits::default()
    };
    let roomy = GroupLimits {
        max_bytes: defaults.max_bytes,
        max_messages: Some(8),
        max_age: None,
    };
    defaults.with_namespace("roomy", roomy)
}

/// A namespace whose limits are roomier than the defaults keeps what they
/// allow on every path that trims: append, head, both reads and stats. A
/// store that used the defaults anywhere (for the count, or the age at read
/// time) would lose messages here that the tighter namespaces of
/// [`namespaces_keep_their_own_limits`] lose anyway.
pub async fn a_roomier_namespace_keeps_more_on_every_path(store: Arc<dyn HistoryStore>) {
    let old = now_ms() - 120_000;
    for group in ["roomy:x", "plain:x"] {
        let mut first = sized(10);
        first.timestamp_ms = old;
        append(&*store, group, first).await;
        for _ in 0..5 {
            append(&*store, group, sized(10)).await;
        }
    }
    let all: Vec<u64> = (1..=6).collect();
    let head = store.head("roomy:x").await.unwrap();
    assert_eq!((head.first, head.last), (1, 6), "head: roomy keeps old messages and 8");
    let page = store.read("roomy:x", ReadQuery::Last(100)).await.unwrap();
    assert_eq!(offsets(&page.messages), all, "read last: roomy's limits");
    assert_eq!(kept_since(&*store, "roomy:x").await, all, "read since: roomy's limits");
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.messages, 6 + 3, "stats: roomy keeps 6, plain the default 3");
    assert_eq!(kept_since(&*store, "roomy:x").await, all, "after stats: roomy's limits");
    assert_eq!(
        kept_since(&*store, "plain:x").await,
        vec![4, 5, 6],
        "plain: the defaults"
    );
}

/// A message-count limit of zero keeps only the newest message, as one of
/// one does (the newest always survives the count), on every store.
pub async fn a_count_limit_of_zero_keeps_the_newest(store: Arc<dyn HistoryStore>) {
    for _ in 0..3 {
        append(&*store, "g", msg("{}")).await;
    }
    assert_eq!(kept_since(&*store, "g").await, vec![3], "zero is not unlimited");
}
