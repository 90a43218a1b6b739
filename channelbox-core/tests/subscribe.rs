//! ChannelBox subscriptions as users rely on them: recovery and replays that
//! meet live delivery with no gap and no duplicate, incomplete recoveries, and
//! replays paced by the member's queue.

use channelbox_core::testkit::test_channel;
use channelbox_core::{ChannelConfig, HistoryLimits, Replay, StreamPosition, SubscribeFraming};
use common::{json_of, new_box, WAIT};
use serde_json::{json, Value};

mod common;

struct Marks;

impl SubscribeFraming for Marks {
    fn before(&self, start: &StreamPosition) -> Option<channelbox_core::Frame> {
        Some(channelbox_core::Frame::text(
            json!({"welcome": start.offset}).to_string(),
        ))
    }
    fn after_recovery(&self, r: &channelbox_core::Recovery) -> Option<channelbox_core::Frame> {
        Some(channelbox_core::Frame::text(
            json!({"recovered": r.complete, "to": r.to}).to_string(),
        ))
    }
}

#[tokio::test]
async fn recovery_joins_replay_and_live_without_gap_or_duplicate_while_others_publish() {
    let cb = new_box(HistoryLimits::default());
    let total = 600u64;
    let publisher = {
        let cb = cb.clone();
        tokio::spawn(async move {
            for n in 1..=total {
                cb.group_send("g", json!(n), true).await.unwrap();
                if n % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let epoch = cb.head("g").await.unwrap().epoch;
    let mut subscribers = Vec::new();
    for k in 0..30u64 {
        tokio::task::yield_now().await;
        let since = (k * 13).min(cb.head("g").await.unwrap().last);
        let (ch, rec) = test_channel(ChannelConfig {
            max_queue_frames: 2048,
            max_queue_bytes: 1 << 24,
            ..ChannelConfig::default()
        });
        let sub = cb
            .subscribe(
                &ch,
                "g",
                Replay::Since(StreamPosition::new(epoch.clone(), since)),
                &Marks,
            )
            .await
            .unwrap();
        let recovery = sub.recovery.unwrap();
        assert!(recovery.complete, "history holds everything, so recovery is complete");
        subscribers.push((since, sub.start.offset, rec));
    }
    publisher.await.unwrap();
    for (since, start, rec) in subscribers {
        let expected_frames = 2 + (total - since) as usize;
        let got = rec.wait_for(expected_frames, WAIT).await;
        let values: Vec<Value> = got
            .iter()
            .map(|f| serde_json::from_str(f.as_text().unwrap()).unwrap())
            .collect();
        assert_eq!(values[0], json!({"welcome": start}), "welcome comes first");
        let recovered_at = values.iter().position(|v| v.get("recovered").is_some()).unwrap();
        assert_eq!(values[recovered_at], json!({"recovered": true, "to": start}));
        let numbers: Vec<u64> = values
            .iter()
            .filter(|v| v.is_u64())
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(
            numbers,
            ((since + 1)..=total).collect::<Vec<_>>(),
            "replay then live, no gap, no duplicate (since {since})"
        );
        assert_eq!(
            recovered_at,
            1 + (start - since) as usize,
            "recovered sits between replay and live"
        );
    }
}

#[tokio::test]
async fn recovery_is_incomplete_for_another_epoch_or_a_trimmed_gap() {
    let cb = new_box(HistoryLimits {
        max_messages: Some(5),
        ..HistoryLimits::default()
    });
    for n in 1..=10 {
        cb.group_send("g", json!(n), true).await.unwrap();
    }
    let epoch = cb.head("g").await.unwrap().epoch;
    let (messages, complete) = cb
        .recover("g", &StreamPosition::new(epoch.clone(), 7), 100)
        .await
        .unwrap();
    assert!(complete);
    assert_eq!(messages.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![8, 9, 10]);
    let (messages, complete) = cb
        .recover("g", &StreamPosition::new(epoch.clone(), 2), 100)
        .await
        .unwrap();
    assert!(!complete && messages.is_empty(), "messages 3..5 were trimmed");
    let (messages, complete) = cb
        .recover("g", &StreamPosition::new("another-epoch".into(), 8), 100)
        .await
        .unwrap();
    assert!(!complete && messages.is_empty(), "another epoch");
    let (ch, rec) = test_channel(ChannelConfig::default());
    let sub = cb
        .subscribe(&ch, "g", Replay::Since(StreamPosition::new("old".into(), 9)), &Marks)
        .await
        .unwrap();
    let r = sub.recovery.unwrap();
    assert!(!r.complete);
    assert_eq!((r.from, r.to, r.replayed), (9, 9, 0));
    rec.wait_for(2, WAIT).await;
    assert_eq!(
        json_of(&rec),
        vec![json!({"welcome": 10}), json!({"recovered": false, "to": 9})]
    );
}

#[tokio::test]
async fn subscribe_with_last_n_replays_the_newest() {
    let cb = new_box(HistoryLimits::default());
    for n in 1..=10 {
        cb.group_send("g", json!(n), true).await.unwrap();
    }
    let (ch, rec) = test_channel(ChannelConfig::default());
    let sub = cb.subscribe(&ch, "g", Replay::Last(3), &Marks).await.unwrap();
    assert_eq!(sub.replayed, 3);
    cb.group_send("g", json!(11), true).await.unwrap();
    rec.wait_for(5, WAIT).await;
    assert_eq!(
        json_of(&rec),
        vec![json!({"welcome": 10}), json!(8), json!(9), json!(10), json!(11)]
    );
}

/// A recovery longer than the queue reaches a client that keeps reading: it is
/// paced by the queue, not cut off as a slow consumer, and live messages sent
/// meanwhile follow it without gap or duplicate.
#[tokio::test]
async fn a_recovery_longer_than_the_queue_is_paced_not_cut_off() {
    let cb = new_box(HistoryLimits::default());
    for n in 1..=200 {
        cb.group_send("g", json!(n), true).await.unwrap();
    }
    let epoch = cb.head("g").await.unwrap().epoch;
    let config = ChannelConfig {
        max_queue_frames: 16,
        ..ChannelConfig::default()
    };
    let (ch, rec) = test_channel(config);
    let subscribing = {
        let (cb, ch) = (cb.clone(), ch.clone());
        tokio::spawn(async move {
            cb.subscribe(&ch, "g", Replay::Since(StreamPosition::new(epoch, 10)), &Marks)
                .await
        })
    };
    // Live messages while the replay is under way: held at the gate.
    for n in 201..=204 {
        cb.group_send("g", json!(n), true).await.unwrap();
        tokio::task::yield_now().await;
    }
    let sub = subscribing.await.unwrap().unwrap();
    let r = sub.recovery.unwrap();
    assert!(r.complete, "{r:?}");
    // The subscription may start after some of the live messages.
    assert!(r.from == 10 && (200..=204).contains(&r.to), "{r:?}");
    assert!(!ch.is_closed(), "a reading client is not a slow consumer");
    rec.wait_for(1 + 190 + 1 + 4, WAIT).await;
    let got = json_of(&rec);
    let numbers: Vec<Value> = got.iter().filter(|v| v.is_number()).cloned().collect();
    let expected: Vec<Value> = (11..=204).map(|n| json!(n)).collect();
    assert_eq!(numbers, expected, "replay then live, in order, each once");
    assert_eq!(cb.stats().slow_consumer_closes, 0);
}

#[tokio::test]
async fn a_recovery_of_several_pages_arrives_whole_and_in_order() {
    let cb = new_box(HistoryLimits::default());
    for n in 1..=700 {
        cb.group_send("g", json!(n), true).await.unwrap();
    }
    let epoch = cb.head("g").await.unwrap().epoch;
    let (ch, rec) = test_channel(ChannelConfig::default());
    let sub = cb
        .subscribe(&ch, "g", Replay::Since(StreamPosition::new(epoch, 0)), &Marks)
        .await
        .unwrap();
    let r = sub.recovery.unwrap();
    assert_eq!((r.from, r.to, r.complete, r.replayed), (0, 700, true, 700));
    rec.wait_for(1 + 700 + 1, WAIT).await;
    let numbers: Vec<Value> = json_of(&rec).into_iter().filter(Value::is_number).collect();
    assert_eq!(numbers, (1..=700).map(|n| json!(n)).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn a_replay_to_a_client_that_stops_reading_ends_as_a_slow_consumer() {
    let cb = new_box(HistoryLimits::default());
    for n in 1..=100 {
        cb.group_send("g", json!(n), true).await.unwrap();
    }
    let config = ChannelConfig {
        max_queue_frames: 16,
        ..ChannelConfig::default()
    };
    let (ch, rec) = test_channel(config);
    rec.stall();
    let started = tokio::time::Instant::now();
    cb.subscribe(&ch, "g", Replay::Last(100), &Marks).await.unwrap();
    assert!(
        started.elapsed() >= channelbox_core::REPLAY_STALL,
        "it waited for the client first"
    );
    assert!(ch.is_closed());
    assert!(!cb.is_member(ch.id(), "g"), "it left the group at once");
    assert_eq!(cb.stats().slow_consumer_closes, 1);
    tokio::time::timeout(WAIT, ch.closed())
        .await
        .expect("the writer gives up");
    assert_eq!(ch.close_reason(), Some(channelbox_core::CloseReason::SLOW_CONSUMER));
}

/// A memory store that counts reads.
#[derive(Debug)]
struct CountingStore {
    inner: channelbox_store_memory::MemoryStore,
    reads: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl channelbox_core::HistoryStore for CountingStore {
    fn capabilities(&self) -> channelbox_core::Capabilities {
        self.inner.capabilities()
    }
    fn limits(&self) -> &HistoryLimits {
        self.inner.limits()
    }
    fn message_cost(&self, group: &str, payload_bytes: usize) -> u64 {
        self.inner.message_cost(group, payload_bytes)
    }
    fn append(
        &self,
        group: &str,
        message: channelbox_core::NewMessage,
    ) -> Result<channelbox_core::PendingAppend, channelbox_core::StoreError> {
        self.inner.append(group, message)
    }
    async fn head(&self, group: &str) -> Result<channelbox_core::Head, channelbox_core::StoreError> {
        self.inner.head(group).await
    }
    async fn read(
        &self,
        group: &str,
        query: channelbox_core::ReadQuery,
    ) -> Result<channelbox_core::HistoryPage, channelbox_core::StoreError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.read(group, query).await
    }
    async fn flush_group(&self, group: &str) -> Result<channelbox_core::Epoch, channelbox_core::StoreError> {
        self.inner.flush_group(group).await
    }
    async fn flush_all(&self) -> Result<(), channelbox_core::StoreError> {
        self.inner.flush_all().await
    }
    async fn stats(&self) -> Result<channelbox_core::HistoryStats, channelbox_core::StoreError> {
        self.inner.stats().await
    }
}

/// A box over a read-counting store whose group `g` holds 1..=`n`.
async fn counted_group(
    n: u64,
) -> (
    std::sync::Arc<CountingStore>,
    channelbox_core::ChannelBox,
    channelbox_core::Epoch,
) {
    let store = std::sync::Arc::new(CountingStore {
        inner: channelbox_store_memory::MemoryStore::default(),
        reads: Default::default(),
    });
    let cb = channelbox_core::ChannelBox::new(store.clone());
    for i in 1..=n {
        cb.group_send("g", json!(i), true).await.unwrap();
    }
    let epoch = cb.head("g").await.unwrap().epoch;
    (store, cb, epoch)
}

#[tokio::test]
async fn clients_recovering_the_same_range_share_one_read_of_history() {
    let (store, cb, epoch) = counted_group(300).await;
    let mut inboxes = Vec::new();
    for _ in 0..20 {
        let (ch, rec) = test_channel(ChannelConfig {
            max_queue_frames: 1024,
            ..ChannelConfig::default()
        });
        let seen = Replay::Since(StreamPosition::new(epoch.clone(), 10));
        let sub = cb.subscribe(&ch, "g", seen, &Marks).await.unwrap();
        assert_eq!(sub.recovery.map(|r| (r.complete, r.to)), Some((true, 300)));
        inboxes.push((ch, rec));
    }
    // 290 messages are two pages (256 + 34): read once each, for all 20.
    assert_eq!(store.reads.load(std::sync::atomic::Ordering::Relaxed), 2);
    for (_, rec) in &inboxes {
        rec.wait_for(292, WAIT).await;
        let got: Vec<u64> = json_of(rec).iter().filter_map(Value::as_u64).collect();
        assert_eq!(got, (11..=300).collect::<Vec<_>>(), "every client gets the whole range");
    }
}

#[tokio::test]
async fn replay_pages_go_with_the_groups_last_member() {
    let (store, cb, epoch) = counted_group(100).await;
    let reads = || store.reads.load(std::sync::atomic::Ordering::Relaxed);
    let recover = |cb: channelbox_core::ChannelBox, epoch: channelbox_core::Epoch| async move {
        let (ch, rec) = test_channel(ChannelConfig::default());
        let seen = Replay::Since(StreamPosition::new(epoch, 50));
        let sub = cb.subscribe(&ch, "g", seen, &Marks).await.unwrap();
        assert_eq!(sub.recovery.map(|r| (r.complete, r.to)), Some((true, 100)));
        (ch, rec)
    };
    let (first, _rec) = recover(cb.clone(), epoch.clone()).await;
    let (second, _rec2) = recover(cb.clone(), epoch.clone()).await;
    assert_eq!(reads(), 1, "a member recovering while another is here shares its page");
    // Both leave (one by disconnecting, one by leaving the group): the group is
    // gone here, and so is its page — an idle server holds none of it.
    cb.remove_channel_from_group(&first, "g").await.unwrap();
    assert!(cb.forget(second.id()));
    assert!(cb.groups().is_empty());
    let (_third, rec3) = recover(cb.clone(), epoch.clone()).await;
    assert_eq!(
        reads(),
        2,
        "the page was dropped with the group, so history is read again"
    );
    rec3.wait_for(52, WAIT).await;
    let got: Vec<u64> = json_of(&rec3).iter().filter_map(Value::as_u64).collect();
    assert_eq!(got, (51..=100).collect::<Vec<_>>());
}
