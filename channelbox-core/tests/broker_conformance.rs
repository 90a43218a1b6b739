//! The in-memory broker: the broker conformance suite, its bounded queues,
//! and two boxes in one process sharing groups through it.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use channelbox_core::testkit::broker_conformance::{run_all, BrokerHarness, HarnessFuture, Server};
use channelbox_core::testkit::test_channel;
use channelbox_core::{
    Broker, BrokerEvent, BusStore, ChannelBox, ChannelConfig, HistoryStore, MemoryBroker, MemoryBus, NewMessage,
    NoFraming, PayloadKind, Replay,
};
use channelbox_store_memory::MemoryStore;

mod common;
use common::WAIT;

struct Memory {
    bus: MemoryBus,
    store: Arc<BusStore>,
    brokers: Mutex<Vec<Arc<MemoryBroker>>>,
}

impl Memory {
    fn new(queue: usize) -> Memory {
        let bus = MemoryBus::new(queue);
        let store = bus.store(Arc::new(MemoryStore::default()));
        Memory {
            bus,
            store,
            brokers: Mutex::new(Vec::new()),
        }
    }
}

impl BrokerHarness for Memory {
    fn server(&self) -> HarnessFuture<'_, Server> {
        let broker = self.bus.broker();
        self.brokers.lock().unwrap().push(broker.clone());
        let server = Server {
            store: self.store.clone(),
            broker,
        };
        Box::pin(async move { server })
    }

    fn interrupt<'a>(&'a self, index: usize, _group: &'a str) -> HarnessFuture<'a, bool> {
        let broker = self.brokers.lock().unwrap()[index].clone();
        self.bus.interrupt(&broker);
        Box::pin(async { true })
    }

    fn roll_back<'a>(&'a self, _group: &'a str) -> HarnessFuture<'a, bool> {
        // A store in this process never goes back.
        Box::pin(async { false })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_broker_keeps_the_broker_contract() {
    run_all(&Memory::new(1024)).await;
}

fn msg(text: &str) -> NewMessage {
    NewMessage::new(PayloadKind::Text, Bytes::copy_from_slice(text.as_bytes()))
}

/// A box that does not read its queue loses what does not fit and hears
/// `Lost` right after the last event it got, then `Back`, then what comes
/// after.
#[tokio::test]
async fn a_full_queue_is_lost_then_back_never_unbounded() {
    let memory = Memory::new(4);
    let broker = memory.bus.broker();
    let mut events = broker.take_events().unwrap();
    broker.subscribe("g").await.unwrap();
    for i in 0..10 {
        memory
            .store
            .append("g", msg(&format!("m{i}")))
            .unwrap()
            .wait()
            .await
            .unwrap();
    }
    assert!(!broker.connected(), "cut off while its queue is full");
    let mut got = Vec::new();
    for _ in 0..4 {
        match events.recv().await.unwrap() {
            BrokerEvent::Saved { position, .. } => got.push(position.offset),
            other => panic!("expected a saved message, got {other:?}"),
        }
    }
    assert_eq!(got, [1, 2, 3, 4], "what fitted, in order");
    assert_eq!(events.recv().await, Some(BrokerEvent::Lost));
    assert_eq!(events.recv().await, Some(BrokerEvent::Back));
    memory.store.append("g", msg("after")).unwrap().wait().await.unwrap();
    match events.recv().await.unwrap() {
        BrokerEvent::Saved { position, .. } => assert_eq!(position.offset, 11),
        other => panic!("expected the message after Back, got {other:?}"),
    }
    assert!(broker.connected());
}

/// Two boxes on one bus: a message sent on one reaches the member on the
/// other, with the offset the shared history gave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_boxes_share_a_group_through_the_bus() {
    let bus = MemoryBus::default();
    let history: Arc<dyn HistoryStore> = bus.store(Arc::new(MemoryStore::default()));
    let (a, b) = (ChannelBox::new(history.clone()), ChannelBox::new(history));
    a.attach_broker(bus.broker()).unwrap();
    b.attach_broker(bus.broker()).unwrap();
    let (member, inbox) = test_channel(ChannelConfig::default());
    b.subscribe(&member, "room", Replay::None, &NoFraming).await.unwrap();
    let report = a
        .group_send("room", serde_json::json!({"text": "hi"}), true)
        .await
        .unwrap();
    assert_eq!(report.offset, Some(1));
    let frames = inbox.wait_for(1, WAIT).await;
    assert_eq!(frames[0].as_text(), Some(r#"{"text":"hi"}"#));
}

/// Three boxes on a bus whose queues hold two events: publishers on two of
/// them at once, a member on each. Boxes that fall behind (or are cut off
/// on purpose) hear `Lost`/`Back` and fill what they missed from history:
/// every member gets every message once, in offset order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boxes_cut_off_by_full_queues_still_deliver_exactly() {
    const MESSAGES: u64 = 100;
    let bus = MemoryBus::new(2);
    let history: Arc<dyn HistoryStore> = bus.store(Arc::new(MemoryStore::default()));
    let boxes: Vec<ChannelBox> = (0..3).map(|_| ChannelBox::new(history.clone())).collect();
    let mut inboxes = Vec::new();
    let mut brokers = Vec::new();
    for b in &boxes {
        let broker = bus.broker();
        brokers.push(broker.clone());
        b.attach_broker(broker).unwrap();
        let (member, inbox) = test_channel(ChannelConfig::default());
        b.subscribe(&member, "room", Replay::None, &NoFraming).await.unwrap();
        inboxes.push((member, inbox));
    }
    let publish = |b: ChannelBox, from: u64| async move {
        for n in (from..=MESSAGES).step_by(2) {
            b.group_send("room", serde_json::json!({ "n": n }), true).await.unwrap();
        }
    };
    let (p1, p2) = (
        tokio::spawn(publish(boxes[0].clone(), 1)),
        tokio::spawn(publish(boxes[1].clone(), 2)),
    );
    // Besides the queues' own overflows, every box is cut off while the
    // publishers run.
    for broker in &brokers {
        tokio::task::yield_now().await;
        bus.interrupt(broker);
    }
    p1.await.unwrap();
    p2.await.unwrap();
    for (member, inbox) in &inboxes {
        let frames = inbox.wait_for(MESSAGES as usize, WAIT).await;
        assert_eq!(member.close_reason(), None, "no member closed");
        let texts: Vec<&str> = frames.iter().filter_map(|f| f.as_text()).collect();
        assert_eq!(texts.len() as u64, MESSAGES, "every message, once");
        // Offsets are assigned in the order the appends reach the shared
        // history; each member sees exactly that order.
        let history_order = history
            .read("room", channelbox_core::ReadQuery::Last(MESSAGES as usize))
            .await
            .unwrap();
        let expected: Vec<String> = history_order
            .messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect();
        assert_eq!(texts, expected, "offset order");
    }
    assert!(bus.cut_offs() >= 3, "every box was cut off at least once");
}
