//! A box in a cluster, with an in-process broker whose events the test
//! writes by hand over a memory store: offsets arriving out of order, twice,
//! or not at all must reach members in order and once; a gap history can
//! no longer fill, or a new epoch, closes the members with 4002.

use std::sync::Arc;
use std::time::Duration;

use channelbox_core::testkit::{test_channel, Recorder};
use channelbox_core::{
    BrokerEvent, Channel, ChannelBox, ChannelConfig, CloseReason, HistoryLimits, HistoryStore, NewMessage, NoFraming,
    PayloadKind, Replay, StreamPosition,
};
use channelbox_store_memory::{MemoryConfig, MemoryStore};
use tokio::sync::mpsc;

mod common;

struct Cluster {
    channels: ChannelBox,
    store: Arc<MemoryStore>,
    events: mpsc::Sender<BrokerEvent>,
}

impl Cluster {
    fn new(limits: HistoryLimits) -> Cluster {
        let store = Arc::new(MemoryStore::new(MemoryConfig { limits }));
        let channels = ChannelBox::new(store.clone() as Arc<dyn HistoryStore>);
        let tx = common::broker::attach_hand_broker(&channels, 1024);
        Cluster {
            channels,
            store,
            events: tx,
        }
    }

    async fn member(&self) -> (Channel, Recorder) {
        let (ch, rec) = test_channel(ChannelConfig::default());
        self.channels
            .subscribe(&ch, "g", Replay::None, &NoFraming)
            .await
            .unwrap();
        (ch, rec)
    }

    /// Saves message `n` in history as another server would; returns its position.
    async fn save(&self, n: u64) -> StreamPosition {
        let message = NewMessage::new(PayloadKind::Text, n.to_string().into());
        self.store.append("g", message).unwrap().wait().await.unwrap()
    }

    async fn arrive(&self, at: &StreamPosition) {
        let message = NewMessage::new(PayloadKind::Text, at.offset.to_string().into());
        let event = BrokerEvent::Saved {
            group: "g".into(),
            position: at.clone(),
            message,
            except: None,
        };
        self.events.send(event).await.unwrap();
    }
}

/// The payloads received (text payloads arrive as JSON strings).
fn texts(rec: &Recorder) -> Vec<String> {
    rec.texts()
        .iter()
        .map(|t| serde_json::from_str::<String>(t).unwrap_or_else(|_| t.clone()))
        .collect()
}

async fn settle() {
    tokio::time::sleep(channelbox_core::GAP_WAIT * 3).await;
}

#[tokio::test]
async fn offsets_out_of_order_or_twice_reach_members_in_order_once() {
    let c = Cluster::new(HistoryLimits::default());
    let (_m, rec) = c.member().await;
    let at: Vec<_> = [c.save(1).await, c.save(2).await, c.save(3).await].into();
    for i in [1, 0, 0, 2, 1] {
        c.arrive(&at[i]).await;
    }
    rec.wait_for(3, Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(texts(&rec), ["1", "2", "3"]);
}

#[tokio::test]
async fn a_lost_offset_is_filled_from_history_before_what_follows_it() {
    let c = Cluster::new(HistoryLimits::default());
    let (_m, rec) = c.member().await;
    let at: Vec<_> = [c.save(1).await, c.save(2).await, c.save(3).await].into();
    c.arrive(&at[0]).await;
    c.arrive(&at[2]).await;
    rec.wait_for(3, Duration::from_secs(2)).await;
    assert_eq!(texts(&rec), ["1", "2", "3"], "2 came from history, in its place");
}

#[tokio::test]
async fn a_lost_tail_is_found_by_the_head_check_after_a_reconnect() {
    let c = Cluster::new(HistoryLimits::default());
    let (_m, rec) = c.member().await;
    let at: Vec<_> = [c.save(1).await, c.save(2).await].into();
    c.arrive(&at[0]).await;
    rec.wait_for(1, Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(texts(&rec), ["1"], "nothing reveals the loss yet");
    c.events.send(BrokerEvent::Back).await.unwrap();
    rec.wait_for(2, Duration::from_secs(2)).await;
    assert_eq!(texts(&rec), ["1", "2"]);
}

#[tokio::test]
async fn a_gap_gone_from_history_closes_members_with_4002() {
    let c = Cluster::new(HistoryLimits {
        max_messages: Some(2),
        ..HistoryLimits::default()
    });
    let (m, rec) = c.member().await;
    let mut last = None;
    for n in 1..=5 {
        last = Some(c.save(n).await);
    }
    c.arrive(&last.unwrap()).await;
    settle().await;
    assert!(texts(&rec).is_empty(), "nothing after a gap is delivered");
    assert_eq!(m.close_reason(), Some(CloseReason::INSUFFICIENT_STATE));
}

#[tokio::test]
async fn a_message_of_another_epoch_closes_members_with_4002_before_it_is_delivered() {
    let c = Cluster::new(HistoryLimits::default());
    let (m, rec) = c.member().await;
    c.arrive(&StreamPosition::new("elsewhere".into(), 1)).await;
    settle().await;
    assert!(texts(&rec).is_empty());
    assert_eq!(m.close_reason(), Some(CloseReason::INSUFFICIENT_STATE));
}

#[tokio::test]
async fn a_reset_continues_in_the_new_epoch_without_closing_anyone() {
    let c = Cluster::new(HistoryLimits::default());
    let (m, rec) = c.member().await;
    let first = c.save(1).await;
    c.arrive(&first).await;
    let epoch = c.store.flush_group("g").await.unwrap();
    c.events
        .send(BrokerEvent::Reset {
            group: "g".into(),
            position: StreamPosition::new(epoch.clone(), 0),
        })
        .await
        .unwrap();
    let again = c.save(1).await;
    assert_eq!(again.epoch, epoch);
    c.arrive(&again).await;
    rec.wait_for(2, Duration::from_secs(2)).await;
    assert_eq!(texts(&rec), ["1", "1"]);
    assert_eq!(m.close_reason(), None, "a flush is not a loss");
}
