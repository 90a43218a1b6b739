//! A box in a cluster stays bounded when the engine misbehaves: a gap fill
//! that keeps failing ends in 4002 instead of holding the group for ever, and
//! head checks run one sweep at a time, all groups in one store call.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use channelbox_core::testkit::test_channel;
use channelbox_core::{
    BrokerEvent, Capabilities, ChannelBox, ChannelConfig, CloseReason, Epoch, Head, HistoryLimits, HistoryPage,
    HistoryStats, HistoryStore, NewMessage, NoFraming, PayloadKind, PendingAppend, ReadQuery, Replay, StoreError,
    StoreErrorKind, StreamPosition,
};
use channelbox_store_memory::{MemoryConfig, MemoryStore};
use tokio::sync::mpsc;

mod common;

/// A memory store whose reads can be made to fail and whose head checks are
/// slow and watched.
#[derive(Debug)]
struct Faulty {
    inner: MemoryStore,
    fail_reads: AtomicBool,
    checks_running: AtomicUsize,
    most_running: AtomicUsize,
    checks: Mutex<Vec<usize>>,
    check_takes: Duration,
}

impl Faulty {
    fn new(check_takes: Duration) -> Arc<Faulty> {
        Arc::new(Faulty {
            inner: MemoryStore::new(MemoryConfig {
                limits: HistoryLimits::default(),
            }),
            fail_reads: AtomicBool::new(false),
            checks_running: AtomicUsize::new(0),
            most_running: AtomicUsize::new(0),
            checks: Mutex::new(Vec::new()),
            check_takes,
        })
    }
}

#[async_trait]
impl HistoryStore for Faulty {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn limits(&self) -> &HistoryLimits {
        self.inner.limits()
    }
    fn message_cost(&self, group: &str, payload_bytes: usize) -> u64 {
        self.inner.message_cost(group, payload_bytes)
    }
    fn append(&self, group: &str, message: NewMessage) -> Result<PendingAppend, StoreError> {
        self.inner.append(group, message)
    }
    async fn head(&self, group: &str) -> Result<Head, StoreError> {
        self.inner.head(group).await
    }
    async fn check_heads(&self, groups: &[(String, StreamPosition)]) -> Vec<Result<Head, StoreError>> {
        let running = self.checks_running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(running, Ordering::SeqCst);
        self.checks.lock().unwrap().push(groups.len());
        tokio::time::sleep(self.check_takes).await;
        let mut heads = Vec::new();
        for (g, _) in groups {
            heads.push(self.inner.head(g).await);
        }
        self.checks_running.fetch_sub(1, Ordering::SeqCst);
        heads
    }
    async fn read(&self, group: &str, query: ReadQuery) -> Result<HistoryPage, StoreError> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(StoreError::new(StoreErrorKind::Io, "reads fail"));
        }
        self.inner.read(group, query).await
    }
    async fn flush_group(&self, group: &str) -> Result<Epoch, StoreError> {
        self.inner.flush_group(group).await
    }
    async fn flush_all(&self) -> Result<(), StoreError> {
        self.inner.flush_all().await
    }
    async fn stats(&self) -> Result<HistoryStats, StoreError> {
        self.inner.stats().await
    }
}

fn clustered(store: Arc<Faulty>) -> (ChannelBox, mpsc::Sender<BrokerEvent>) {
    let channels = ChannelBox::new(store as Arc<dyn HistoryStore>);
    let tx = common::broker::attach_hand_broker(&channels, 64);
    (channels, tx)
}

#[tokio::test]
async fn a_gap_fill_that_keeps_failing_ends_in_4002() {
    let store = Faulty::new(Duration::ZERO);
    let (channels, events) = clustered(store.clone());
    let (member, _rec) = test_channel(ChannelConfig::default());
    channels
        .subscribe(&member, "g", Replay::None, &NoFraming)
        .await
        .unwrap();
    let mut last = None;
    for n in 1..=3 {
        let message = NewMessage::new(PayloadKind::Text, n.to_string().into());
        last = Some(store.inner.append("g", message).unwrap().wait().await.unwrap());
    }
    store.fail_reads.store(true, Ordering::SeqCst);
    let message = NewMessage::new(PayloadKind::Text, "3".into());
    let position = last.unwrap();
    let event = BrokerEvent::Saved {
        group: "g".into(),
        position,
        message,
        except: None,
    };
    events.send(event).await.unwrap();
    // 1 and 2 are missing and history cannot be read: after the retries the
    // member is closed rather than left waiting behind the gap.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
    while member.close_reason().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the member waits for ever");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(member.close_reason(), Some(CloseReason::INSUFFICIENT_STATE));
}

#[tokio::test]
async fn head_checks_run_one_sweep_at_a_time_with_every_group_in_one_call() {
    let store = Faulty::new(Duration::from_secs(3));
    let (channels, _events) = clustered(store.clone());
    let mut members = Vec::new();
    for g in ["a", "b", "c"] {
        let (member, rec) = test_channel(ChannelConfig::default());
        channels.subscribe(&member, g, Replay::None, &NoFraming).await.unwrap();
        members.push((member, rec));
    }
    tokio::time::sleep(Duration::from_secs(7)).await;
    let checks = store.checks.lock().unwrap().clone();
    assert!(!checks.is_empty(), "the heads were checked");
    assert!(checks.iter().all(|n| *n == 3), "every group in one call: {checks:?}");
    assert_eq!(store.most_running.load(Ordering::SeqCst), 1, "one sweep at a time");
}
