//! The service's abuse rules, tested in process: connections are in-memory
//! channels fed by a stream, over a memory store that can be made to fail.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use channelbox_core::testkit::{test_channel, Recorder};
use channelbox_core::{
    Capabilities, Channel, Head, HistoryLimits, HistoryPage, HistoryStats, HistoryStore, Incoming, NewMessage,
    PayloadKind, PendingAppend, ReadQuery, StoreError, StoreErrorKind,
};
use channelbox_store_memory::{MemoryConfig, MemoryStore};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::ChatService;
use crate::config::ProtocolConfig;

/// A memory store whose reads fail while `failing` is set, and whose
/// appends never become durable while `stalled` is set.
#[derive(Debug, Default)]
struct FlakyReads {
    inner: MemoryStore,
    failing: AtomicBool,
    stalled: AtomicBool,
}

impl FlakyReads {
    fn check(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::new(StoreErrorKind::Io, "reads fail in this test"));
        }
        Ok(())
    }
}

#[async_trait]
impl HistoryStore for FlakyReads {
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
        let pending = self.inner.append(group, message)?;
        match pending.position() {
            Some(at) if self.stalled.load(Ordering::SeqCst) => Ok(PendingAppend::assigned(
                at.offset,
                at.epoch.clone(),
                Box::pin(std::future::pending()),
            )),
            _ => Ok(pending),
        }
    }
    async fn head(&self, group: &str) -> Result<Head, StoreError> {
        self.check()?;
        self.inner.head(group).await
    }
    async fn read(&self, group: &str, query: ReadQuery) -> Result<HistoryPage, StoreError> {
        self.check()?;
        self.inner.read(group, query).await
    }
    async fn flush_group(&self, group: &str) -> Result<channelbox_core::Epoch, StoreError> {
        self.inner.flush_group(group).await
    }
    async fn flush_all(&self) -> Result<(), StoreError> {
        self.inner.flush_all().await
    }
    async fn stats(&self) -> Result<HistoryStats, StoreError> {
        self.inner.stats().await
    }
}

/// One in-memory connection: what it is sent, and the frames it sends.
struct Conn {
    channel: Channel,
    recorder: Recorder,
    tx: mpsc::Sender<Incoming>,
}

impl Conn {
    async fn open(service: &ChatService, path_group: &str, query: Option<&str>) -> Conn {
        let admission = service.admit(path_group, query).expect("admitted");
        let (channel, recorder) = test_channel(service.channel_config());
        let (tx, rx) = mpsc::channel(64);
        let incoming = Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }));
        let (service, ch) = (service.clone(), channel.clone());
        tokio::spawn(async move { service.run(admission, ch, incoming).await });
        let conn = Conn { channel, recorder, tx };
        conn.wait_for("welcome").await;
        conn
    }

    async fn send(&self, frame: Value) {
        self.tx
            .send(Incoming::Text(frame.to_string()))
            .await
            .expect("session runs");
    }

    fn frames(&self) -> Vec<Value> {
        self.recorder
            .frames()
            .iter()
            .filter_map(|f| serde_json::from_slice(f.data()).ok())
            .collect()
    }

    /// The first frame of this type, waiting up to 5 s for it.
    async fn wait_for(&self, kind: &str) -> Value {
        for _ in 0..500 {
            if let Some(f) = self.frames().into_iter().find(|f| f["type"] == kind) {
                return f;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no {kind} frame in {:?}", self.frames());
    }

    /// The reply with this `ref`, waiting up to 5 s for it.
    async fn reply(&self, reference: u64) -> Value {
        for _ in 0..500 {
            if let Some(f) = self.frames().into_iter().find(|f| f["ref"] == reference) {
                return f;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no reply {reference} in {:?}", self.frames());
    }
}

fn memory() -> MemoryStore {
    MemoryStore::new(MemoryConfig::default())
}

#[tokio::test]
async fn a_join_that_fails_leaves_no_member_event_listener() {
    let store = Arc::new(FlakyReads::default());
    let service = ChatService::new(store.clone(), ProtocolConfig::default());
    let a = Conn::open(&service, "lobby", None).await;
    store.failing.store(true, Ordering::SeqCst);
    a.send(json!({"type": "join", "group": "other", "events": true, "history": 5, "ref": 1}))
        .await;
    let refused = a.reply(1).await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    assert_eq!(
        service.inner.peers.listeners_of("other"),
        0,
        "the failed join left a listener"
    );
    // A join that succeeds does listen.
    store.failing.store(false, Ordering::SeqCst);
    a.send(json!({"type": "join", "group": "other", "events": true, "ref": 2}))
        .await;
    assert_eq!(a.reply(2).await["type"], "joined");
    assert_eq!(service.inner.peers.listeners_of("other"), 1);
}

#[tokio::test]
async fn a_direct_flood_is_refused_and_never_closes_its_target() {
    let service = ChatService::new(Arc::new(memory()), ProtocolConfig::default());
    let victim = Conn::open(&service, "lobby", None).await;
    // The victim never reads: nothing leaves its queue.
    victim.recorder.stall();
    let attacker = Conn::open(&service, "lobby", None).await;
    let data = "x".repeat(64 * 1024 - 200);
    for r in 0..17u64 {
        attacker
            .send(json!({"type": "direct", "to": victim.channel.id(), "data": data, "ref": r}))
            .await;
    }
    let replies: Vec<Value> = {
        let mut all = Vec::new();
        for r in 0..17u64 {
            all.push(attacker.reply(r).await);
        }
        all
    };
    let sent = replies.iter().filter(|f| f["type"] == "sent").count();
    let limited = replies.iter().filter(|f| f["code"] == "rate_limited").count();
    assert_eq!(sent + limited, 17, "{replies:?}");
    assert!(limited > 0 && sent >= 7, "sent {sent}, refused {limited}");
    assert!(!victim.channel.is_closed(), "the flood closed its target");
}

#[tokio::test]
async fn a_history_of_a_full_group_pages_and_never_closes_its_requester() {
    let store = Arc::new(memory());
    let payload = format!("\"{}\"", "h".repeat(1000));
    for _ in 0..1100 {
        let m = NewMessage::new(PayloadKind::Json, payload.clone().into());
        store.append("full", m).expect("appends").wait().await.expect("saved");
    }
    let config = ProtocolConfig::default();
    let half = config.queue_bytes / 2;
    let service = ChatService::new(store, config);
    let reader = Conn::open(&service, "full", None).await;
    reader.send(json!({"type": "history", "limit": 1000, "ref": 1})).await;
    let first = reader.reply(1).await;
    let got = first["messages"].as_array().expect("messages").len();
    assert_eq!(first["more"], true, "{got} messages and no more");
    assert!(got > 0 && got < 1000, "{got} messages");
    assert!(first.to_string().len() <= half, "the reply is above half the queue");
    assert!(
        !reader.channel.is_closed(),
        "the reply made its requester a slow consumer"
    );
    // The client pages on from the last offset it got, to the end.
    let mut last = first["messages"][got - 1]["offset"].as_u64().expect("offset");
    let mut total = got;
    for r in 2..20u64 {
        reader
            .send(json!({"type": "history", "limit": 1000, "since": last, "ref": r}))
            .await;
        let page = reader.reply(r).await;
        let messages = page["messages"].as_array().expect("messages");
        assert!(!messages.is_empty());
        assert_eq!(messages[0]["offset"].as_u64(), Some(last + 1), "pages are contiguous");
        last = messages[messages.len() - 1]["offset"].as_u64().expect("offset");
        total += messages.len();
        if page.get("more").is_none() {
            break;
        }
    }
    assert_eq!(last, 1100);
    assert!(total >= 1000, "{total} messages paged");
}

#[test]
fn groups_are_capped_largest_first_and_within_the_budget() {
    // Five groups of 0 (only possible as a cluster's stale count) and one of 100.
    let count = |i: usize| {
        if i < 5 {
            0
        } else {
            i % 7 + 1 + usize::from(i == 42) * 100
        }
    };
    let counts = (0..10_005).map(|i| (format!("g{i:05}"), count(i)));
    let (listed, truncated) = super::handlers::largest_groups(counts, usize::MAX);
    assert!(truncated);
    assert_eq!(listed.len(), 10_000);
    assert_eq!(listed["g00042"], 101);
    assert!(
        listed.values().all(|n| n.as_u64() > Some(0)),
        "the smallest were left out"
    );
    let few = (0..10).map(|i| (format!("g{i}"), 1));
    let (listed, truncated) = super::handlers::largest_groups(few, usize::MAX);
    assert_eq!((listed.len(), truncated), (10, false));
    let many = (0..5_000).map(|i| (format!("{i:0>100}"), i));
    let (listed, truncated) = super::handlers::largest_groups(many, 64 * 1024);
    assert!(truncated && listed.len() < 1000 && listed.contains_key(&format!("{:0>100}", 4999)));
}

#[tokio::test]
async fn past_its_publishes_in_flight_a_connection_is_not_read() {
    let store = Arc::new(FlakyReads::default());
    let service = ChatService::new(store.clone(), ProtocolConfig::default());
    let c = Conn::open(&service, "lobby", None).await;
    store.stalled.store(true, Ordering::SeqCst);
    let tx = c.tx.clone();
    let sending = tokio::spawn(async move {
        for i in 0..super::session::MAX_PUBLISHES_IN_FLIGHT {
            let frame = json!({"type": "publish", "data": i, "ref": i});
            tx.send(Incoming::Text(frame.to_string())).await.expect("session runs");
        }
        let ping = json!({"type": "ping", "ref": "after"});
        tx.send(Incoming::Text(ping.to_string())).await.expect("session runs");
    });
    tokio::time::timeout(Duration::from_secs(5), sending)
        .await
        .expect("the frames fit in the stream's buffer")
        .expect("sent");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let frames = c.frames();
    assert!(
        !frames.iter().any(|f| f["ref"] == "after"),
        "a frame past the bound was read while every publish waited"
    );
    assert!(!c.channel.is_closed());
}
