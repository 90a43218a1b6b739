//! Property test: random sequences of ChannelBox operations against a plain
//! reference model of membership, delivery and history — subscriptions with a
//! replay or a recovery included, interleaved with publishes, leaves, closes
//! and flushes. The model says exactly which frames each channel receives, in
//! order: live messages, `send_to` payloads, and around each subscription the
//! start mark, the replayed messages and the recovery outcome.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use channelbox_core::testkit::model::HistoryModel;
use channelbox_core::testkit::{test_channel, Recorder};
use channelbox_core::{
    AddStatus, BoxError, Channel, ChannelBox, ChannelConfig, CloseReason, Frame, HistoryLimits, HistoryStore,
    NewMessage, Payload, ReadQuery, Recovery, RemoveStatus, Replay, StreamPosition, SubscribeFraming,
};
use channelbox_store_memory::{MemoryConfig, MemoryStore};
use proptest::prelude::*;
use serde_json::{json, Value};

const CHANNELS: usize = 4;
const GROUPS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    Join(usize, usize),
    Leave(usize, usize),
    Send { group: usize, save: bool },
    SendTo(usize),
    Close(usize),
    Flush(usize),
    Read(usize, usize),
    Subscribe(usize, usize, ReplayOp),
}

/// What a subscription asks to replay.
#[derive(Clone, Debug)]
enum ReplayOp {
    None,
    Last(usize),
    /// Recovery after this offset, in the group's current epoch or in one
    /// that no longer exists.
    Since {
        offset: u64,
        current_epoch: bool,
    },
}

fn replay_op() -> impl Strategy<Value = ReplayOp> {
    prop_oneof![
        1 => Just(ReplayOp::None),
        2 => (0usize..6).prop_map(ReplayOp::Last),
        4 => (0u64..12, prop::bool::weighted(0.85))
            .prop_map(|(offset, current_epoch)| ReplayOp::Since { offset, current_epoch }),
    ]
}

/// Marks the frames around a subscription, so the model can check them.
struct Marks;

impl SubscribeFraming for Marks {
    fn before(&self, start: &StreamPosition) -> Option<Frame> {
        Some(Frame::text(json!({"start": start.offset}).to_string()))
    }

    fn after_recovery(&self, r: &Recovery) -> Option<Frame> {
        Some(Frame::text(
            json!({"recovered": [r.from, r.to, r.complete]}).to_string(),
        ))
    }
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0..CHANNELS;
    let g = 0..GROUPS;
    prop_oneof![
        4 => (c.clone(), g.clone()).prop_map(|(c, g)| Op::Join(c, g)),
        2 => (c.clone(), g.clone()).prop_map(|(c, g)| Op::Leave(c, g)),
        6 => (g.clone(), any::<bool>()).prop_map(|(group, save)| Op::Send { group, save }),
        1 => c.clone().prop_map(Op::SendTo),
        1 => c.clone().prop_map(Op::Close),
        1 => g.clone().prop_map(Op::Flush),
        2 => (g.clone(), 0usize..6).prop_map(|(g, n)| Op::Read(g, n)),
        4 => (c, g, replay_op()).prop_map(|(c, g, r)| Op::Subscribe(c, g, r)),
    ]
}

#[derive(Default)]
struct Model {
    members: BTreeMap<usize, BTreeSet<usize>>,
    registered: BTreeSet<usize>,
    closed: BTreeSet<usize>,
    /// What each channel must have received, in order.
    inbox: Vec<Vec<Value>>,
}

fn group(g: usize) -> String {
    format!("g{g}")
}

async fn run(ops: Vec<Op>) {
    let limits = HistoryLimits {
        max_bytes: 40,
        max_messages: Some(4),
        max_age: None,
        max_total_bytes: None,
        ..HistoryLimits::default()
    };
    let store: Arc<dyn HistoryStore> = Arc::new(MemoryStore::new(MemoryConfig { limits: limits.clone() }));
    let cb = ChannelBox::new(store);
    let mut history = HistoryModel::new(limits);
    let channels: Vec<(Channel, Recorder)> = (0..CHANNELS).map(|_| test_channel(ChannelConfig::default())).collect();
    let mut m = Model {
        inbox: vec![Vec::new(); CHANNELS],
        ..Model::default()
    };
    let mut seq = 0u64;
    for op in ops {
        match op {
            Op::Join(c, g) => {
                let got = cb.add_channel_to_group(&channels[c].0, &group(g)).await;
                if m.closed.contains(&c) {
                    assert!(matches!(got, Err(BoxError::ChannelClosed(_))), "{op:?}");
                    continue;
                }
                let members = m.members.entry(g).or_default();
                let want = if members.contains(&c) {
                    AddStatus::AlreadyMember
                } else if members.is_empty() {
                    AddStatus::GroupCreated
                } else {
                    AddStatus::Added
                };
                members.insert(c);
                m.registered.insert(c);
                assert_eq!(got.unwrap(), want, "{op:?}");
            }
            Op::Leave(c, g) => {
                let got = cb.remove_channel_from_group(&channels[c].0, &group(g)).await;
                let members = m.members.entry(g).or_default();
                if members.is_empty() {
                    assert!(matches!(got, Err(BoxError::NoSuchGroup(_))), "{op:?}");
                    continue;
                }
                let want = if !members.remove(&c) {
                    RemoveStatus::NotMember
                } else if members.is_empty() {
                    RemoveStatus::GroupDeleted
                } else {
                    RemoveStatus::Removed
                };
                assert_eq!(got.unwrap(), want, "{op:?}");
            }
            Op::Send { group: g, save } => {
                seq += 1;
                let value = json!({"m": seq});
                let report = cb.group_send(&group(g), value.clone(), save).await.unwrap();
                let members = m.members.get(&g).cloned().unwrap_or_default();
                assert_eq!(report.delivery.delivered, members.len(), "{op:?}");
                for c in members {
                    m.inbox[c].push(value.clone());
                }
                if save {
                    let (kind, bytes) = Payload::Json(value).encode();
                    let want = history.append(&group(g), NewMessage::new(kind, bytes), channelbox_core::now_ms());
                    assert_eq!(report.offset, Some(want), "{op:?}");
                } else {
                    assert_eq!(report.offset, None);
                }
            }
            Op::SendTo(c) => {
                seq += 1;
                let value = json!({"d": seq});
                let got = cb.send_to(channels[c].0.id(), value.clone()).await;
                if m.registered.contains(&c) {
                    assert_eq!(got.unwrap().delivered, 1, "{op:?}");
                    m.inbox[c].push(value);
                } else {
                    assert!(matches!(got, Err(BoxError::NoSuchChannel(_))), "{op:?}");
                }
            }
            Op::Close(c) => {
                channels[c].0.close(CloseReason::NORMAL);
                tokio::time::timeout(Duration::from_secs(10), channels[c].0.closed())
                    .await
                    .unwrap();
                m.closed.insert(c);
                m.registered.remove(&c);
                for members in m.members.values_mut() {
                    members.remove(&c);
                }
            }
            Op::Flush(g) => {
                cb.flush_history(Some(&group(g))).await.unwrap();
                history.flush_group(&group(g));
            }
            Op::Subscribe(c, g, ref replay) => {
                let replay = match replay {
                    ReplayOp::None => Replay::None,
                    ReplayOp::Last(n) => Replay::Last(*n),
                    ReplayOp::Since { offset, current_epoch } => {
                        let epoch = match current_epoch {
                            true => cb.head(&group(g)).await.unwrap().epoch,
                            false => "gone".into(),
                        };
                        Replay::Since(StreamPosition::new(epoch, *offset))
                    }
                };
                let got = cb.subscribe(&channels[c].0, &group(g), replay.clone(), &Marks).await;
                if m.closed.contains(&c) {
                    assert!(matches!(got, Err(BoxError::ChannelClosed(_))), "{op:?}");
                    continue;
                }
                got.unwrap();
                let frames = expected_subscription(&mut history, &group(g), &replay, channelbox_core::now_ms());
                m.inbox[c].extend(frames);
                m.members.entry(g).or_default().insert(c);
                m.registered.insert(c);
            }
            Op::Read(g, n) => {
                // Timestamps are the box's own; compare what the model decides.
                let strip = |ms: Vec<channelbox_core::StoredMessage>| -> Vec<(u64, bytes::Bytes)> {
                    ms.into_iter().map(|m| (m.offset, m.payload)).collect()
                };
                let got = cb.show_history(&group(g), ReadQuery::Last(n)).await.unwrap().messages;
                let want = history.read(&group(g), ReadQuery::Last(n), channelbox_core::now_ms());
                assert_eq!(strip(got), strip(want), "{op:?}");
            }
        }
        let groups = cb.show_groups().await;
        let want: BTreeMap<String, usize> = m
            .members
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(g, s)| (group(*g), s.len()))
            .collect();
        assert_eq!(groups, want, "membership after {op:?}");
    }
    for (c, (_, rec)) in channels.iter().enumerate() {
        let frames = rec.wait_for(m.inbox[c].len(), Duration::from_secs(10)).await;
        let got: Vec<Value> = frames
            .iter()
            .map(|f| serde_json::from_str(f.as_text().unwrap()).unwrap())
            .collect();
        assert_eq!(
            got, m.inbox[c],
            "channel {c} received exactly what the model says, in order"
        );
    }
}

/// What a subscription queues, by the model: the start mark (the newest
/// offset, every publish having completed), the replayed messages, and for a
/// recovery its outcome, complete only when history still holds every offset
/// after the one seen in the same epoch.
fn expected_subscription(history: &mut HistoryModel, g: &str, replay: &Replay, now: u64) -> Vec<Value> {
    let start = history.last(g);
    let mut frames = vec![json!({"start": start})];
    let (query, recovery) = match replay {
        Replay::None | Replay::Last(0) => return frames,
        Replay::Last(n) => {
            let offset = start.saturating_sub(*n as u64);
            (ReadQuery::Since { offset, limit: *n }, None)
        }
        Replay::Since(seen) => (
            ReadQuery::Since {
                offset: seen.offset,
                limit: 100,
            },
            Some(seen),
        ),
    };
    let read: Vec<_> = history
        .read(g, query, now)
        .into_iter()
        .filter(|m| m.offset <= start)
        .collect();
    let replayed = read.iter().map(|m| serde_json::from_slice(&m.payload).unwrap());
    let Some(seen) = recovery else {
        frames.extend(replayed);
        return frames;
    };
    let complete = seen.epoch != "gone"
        && seen.offset <= start
        && read.len() as u64 == start - seen.offset
        && read.first().is_none_or(|m| m.offset == seen.offset + 1);
    if complete {
        frames.extend(replayed);
    }
    let to = if complete { start } else { seen.offset };
    frames.push(json!({"recovered": [seen.offset, to, complete]}));
    frames
}

proptest! {
    #[test]
    fn channel_box_matches_the_model(ops in proptest::collection::vec(op(), 0..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops));
    }
}
