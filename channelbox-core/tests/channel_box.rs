//! ChannelBox behaviour as users rely on it: membership statuses, fan-out,
//! slow consumers, history budget, ordering and auto-cleanup (subscriptions
//! with replay and recovery: `subscribe.rs`).

use std::collections::HashSet;
use std::time::Duration;

use channelbox_core::testkit::test_channel;
use channelbox_core::{
    AddStatus, BoxError, ChannelConfig, CloseReason, FrameKind, HistoryLimits, OverflowPolicy, PayloadType, ReadQuery,
    RemoveStatus,
};
use common::{json_of, new_box, wait_closed, WAIT};
use serde_json::{json, Value};

mod common;

#[tokio::test]
async fn membership_statuses_are_typed() {
    let cb = new_box(HistoryLimits::default());
    let (a, _) = test_channel(ChannelConfig::default());
    let (b, _) = test_channel(ChannelConfig::default());
    assert_eq!(
        cb.add_channel_to_group(&a, "room").await.unwrap(),
        AddStatus::GroupCreated
    );
    assert_eq!(cb.add_channel_to_group(&b, "room").await.unwrap(), AddStatus::Added);
    assert_eq!(
        cb.add_channel_to_group(&b, "room").await.unwrap(),
        AddStatus::AlreadyMember
    );
    assert_eq!(cb.show_groups().await.get("room"), Some(&2));
    assert_eq!(
        cb.remove_channel_from_group(&a, "room").await.unwrap(),
        RemoveStatus::Removed
    );
    assert_eq!(
        cb.remove_channel_from_group(&a, "room").await.unwrap(),
        RemoveStatus::NotMember
    );
    assert_eq!(
        cb.remove_channel_from_group(&b, "room").await.unwrap(),
        RemoveStatus::GroupDeleted
    );
    assert!(cb.show_groups().await.is_empty(), "an empty group disappears");
    assert!(matches!(
        cb.remove_channel_from_group(&b, "room").await,
        Err(BoxError::NoSuchGroup(g)) if g == "room"
    ));
    assert!(matches!(
        cb.add_channel_to_group(&a, "").await,
        Err(BoxError::InvalidGroup(_))
    ));
    let ghost = uuid::Uuid::new_v4();
    assert!(matches!(cb.send_to(ghost, "x").await, Err(BoxError::NoSuchChannel(id)) if id == ghost));
}

#[tokio::test]
async fn group_send_reaches_every_member_and_reports() {
    let cb = new_box(HistoryLimits::default());
    let mut inboxes = Vec::new();
    for _ in 0..10 {
        let (ch, rec) = test_channel(ChannelConfig::default());
        cb.add_channel_to_group(&ch, "g").await.unwrap();
        inboxes.push(rec);
    }
    let report = cb.group_send("g", json!({"n": 1}), true).await.unwrap();
    assert_eq!(report.offset, Some(1));
    assert_eq!(report.delivery.delivered, 10);
    assert!(report.delivery.overflowed.is_empty() && report.delivery.closed.is_empty());
    let unsaved = cb.group_send("g", json!({"n": 2}), false).await.unwrap();
    assert_eq!(unsaved.offset, None, "unsaved messages take no offset");
    for rec in &inboxes {
        rec.wait_for(2, WAIT).await;
        assert_eq!(json_of(rec), vec![json!({"n": 1}), json!({"n": 2})]);
    }
    let history = cb.show_history("g", ReadQuery::Last(10)).await.unwrap();
    assert_eq!(history.messages.len(), 1, "only the saved message is in history");
    assert_eq!(cb.stats().delivered, 20);
}

#[tokio::test]
async fn one_stalled_member_of_a_thousand_does_not_slow_the_others() {
    let cb = new_box(HistoryLimits::default());
    let config = ChannelConfig {
        max_queue_frames: 32,
        close_timeout: Duration::from_millis(100),
        ..ChannelConfig::default()
    };
    let mut members = Vec::new();
    for _ in 0..1000 {
        let (ch, rec) = test_channel(config.clone());
        cb.add_channel_to_group(&ch, "big").await.unwrap();
        members.push((ch, rec));
    }
    let (stalled, stalled_rec) = &members[0];
    stalled_rec.stall();
    let messages = 200;
    let mut overflowed = HashSet::new();
    for n in 0..messages {
        let report = cb.group_send("big", json!({"n": n}), true).await.unwrap();
        overflowed.extend(report.delivery.overflowed);
        // Let the healthy members drain between bursts, as sockets would; the
        // stalled one cannot.
        if n % 16 == 15 {
            for (_, rec) in &members[1..] {
                rec.wait_for(n + 1, WAIT).await;
            }
        }
    }
    assert_eq!(overflowed.len(), 1, "only one member overflowed");
    assert!(overflowed.contains(&stalled.id()), "the stalled member overflowed");
    wait_closed(stalled).await;
    assert_eq!(stalled.close_reason(), Some(CloseReason::SLOW_CONSUMER));
    assert!(!cb.is_member(stalled.id(), "big"), "the slow consumer left its group");
    for (_, rec) in &members[1..] {
        let frames = rec.wait_for(messages, WAIT).await;
        let got: Vec<Value> = frames
            .iter()
            .map(|f| serde_json::from_str(f.as_text().unwrap()).unwrap())
            .collect();
        let want: Vec<Value> = (0..messages).map(|n| json!({"n": n})).collect();
        assert_eq!(got, want, "every healthy member receives every message in order");
    }
    assert_eq!(cb.stats().slow_consumer_closes, 1);
    assert_eq!(cb.show_groups().await.get("big"), Some(&999));
}

#[tokio::test]
async fn drop_oldest_keeps_a_stalled_member_connected_with_a_visible_gap() {
    let cb = new_box(HistoryLimits::default());
    let (ch, rec) = test_channel(ChannelConfig {
        max_queue_frames: 4,
        overflow: OverflowPolicy::DropOldest,
        ..ChannelConfig::default()
    });
    cb.add_channel_to_group(&ch, "g").await.unwrap();
    rec.stall();
    // The first frame is taken by the writer (stuck writing it); the queue then
    // holds the newest four.
    cb.group_send("g", json!(0), true).await.unwrap();
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut dropped_any = false;
    for n in 1..20 {
        let report = cb.group_send("g", json!(n), true).await.unwrap();
        assert_eq!(report.delivery.delivered, 1, "drop-oldest always queues the new frame");
        dropped_any |= !report.delivery.overflowed.is_empty();
    }
    assert!(dropped_any);
    assert!(!ch.is_closed(), "drop-oldest does not disconnect");
    let stats = ch.stats();
    assert_eq!(stats.queued, 20, "every frame was accepted, dropped ones included");
    assert_eq!((stats.pending_frames, stats.overflowed), (4, 15));
    rec.resume();
    let frames = rec.wait_for(5, WAIT).await;
    tokio::time::timeout(WAIT, async {
        while ch.stats().written < 5 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the writer counts what it wrote");
    let stats = ch.stats();
    assert_eq!((stats.queued, stats.pending_frames, stats.pending_bytes), (20, 0, 0));
    let got: Vec<Value> = frames
        .iter()
        .map(|f| serde_json::from_str(f.as_text().unwrap()).unwrap())
        .collect();
    assert_eq!(got, vec![json!(0), json!(16), json!(17), json!(18), json!(19)]);
}

#[tokio::test]
async fn history_over_its_byte_budget_keeps_the_newest_and_offsets_keep_increasing() {
    let cb = new_box(HistoryLimits {
        max_bytes: 1000,
        ..HistoryLimits::default()
    });
    let body = "x".repeat(90); // 92 bytes as a JSON string
    for n in 1..=100u64 {
        let report = cb.group_send("g", json!(body), true).await.unwrap();
        assert_eq!(report.offset, Some(n), "offsets keep increasing across trims");
    }
    let page = cb.show_history("g", ReadQuery::Last(1000)).await.unwrap();
    let bytes: usize = page.messages.iter().map(|m| m.payload.len()).sum();
    assert!(bytes <= 1000, "history holds {bytes} bytes, budget 1000");
    assert!(!page.messages.is_empty(), "history is never wiped whole");
    let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset).collect();
    assert_eq!(
        offsets,
        (91..=100).collect::<Vec<_>>(),
        "the newest messages that fit are the ones kept"
    );
}

#[tokio::test]
async fn concurrent_publishers_are_seen_in_offset_order_by_every_member() {
    let cb = new_box(HistoryLimits::default());
    let mut inboxes = Vec::new();
    for _ in 0..20 {
        let (ch, rec) = test_channel(ChannelConfig::default());
        cb.add_channel_to_group(&ch, "g").await.unwrap();
        inboxes.push(rec);
    }
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let cb = cb.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    cb.group_send("g", json!({"t": t, "i": i}), true).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let history: Vec<Value> = cb
        .show_history("g", ReadQuery::Last(1000))
        .await
        .unwrap()
        .messages
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    assert_eq!(history.len(), 400);
    for rec in &inboxes {
        rec.wait_for(400, WAIT).await;
        assert_eq!(json_of(rec), history, "live order equals offset order");
    }
}

#[tokio::test]
async fn pipelined_publishes_keep_the_callers_order() {
    let cb = new_box(HistoryLimits::default());
    let pending: Vec<_> = (0..10)
        .map(|n| {
            let (kind, bytes) = channelbox_core::Payload::Json(json!(n)).encode();
            cb.start_publish("g", channelbox_core::NewMessage::new(kind, bytes), true)
                .unwrap()
        })
        .collect();
    let offsets: Vec<Option<u64>> = pending.iter().map(|p| p.offset()).collect();
    assert_eq!(offsets, (1..=10).map(Some).collect::<Vec<_>>());
    // Finish them concurrently, started in reverse: delivery still follows
    // offsets (a finish completes once everything before it was delivered).
    let (ch, rec) = test_channel(ChannelConfig::default());
    cb.add_channel_to_group(&ch, "g").await.unwrap();
    let tasks: Vec<_> = pending.into_iter().rev().map(|p| tokio::spawn(p.finish())).collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    rec.wait_for(10, WAIT).await;
    assert_eq!(json_of(&rec), (0..10).map(|n| json!(n)).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_abandoned_publish_does_not_stall_the_group() {
    let cb = new_box(HistoryLimits::default());
    let (ch, rec) = test_channel(ChannelConfig::default());
    cb.add_channel_to_group(&ch, "g").await.unwrap();
    let (kind, bytes) = channelbox_core::Payload::Json(json!("lost")).encode();
    let abandoned = cb
        .start_publish("g", channelbox_core::NewMessage::new(kind, bytes), true)
        .unwrap();
    drop(abandoned);
    let report = cb.group_send("g", json!("after"), true).await.unwrap();
    assert_eq!(report.offset, Some(2));
    assert_eq!(report.delivery.delivered, 1);
    rec.wait_for(1, WAIT).await;
    assert_eq!(json_of(&rec), vec![json!("after")]);
}

#[tokio::test]
async fn send_to_reaches_one_channel_in_its_payload_type() {
    let cb = new_box(HistoryLimits::default());
    let (json_ch, json_rec) = test_channel(ChannelConfig::default());
    let (text_ch, text_rec) = test_channel(ChannelConfig {
        payload_type: PayloadType::Text,
        ..ChannelConfig::default()
    });
    let (bin_ch, bin_rec) = test_channel(ChannelConfig {
        payload_type: PayloadType::Bytes,
        ..ChannelConfig::default()
    });
    for ch in [&json_ch, &text_ch, &bin_ch] {
        cb.add_channel_to_group(ch, "g").await.unwrap();
    }
    assert_eq!(cb.send_to(text_ch.id(), "secret").await.unwrap().delivered, 1);
    cb.group_send("g", "hello", false).await.unwrap();
    assert_eq!(text_rec.wait_for(2, WAIT).await.len(), 2);
    assert_eq!(text_rec.texts(), vec!["secret", "hello"]);
    assert_eq!(
        json_rec.wait_for(1, WAIT).await[0].as_text(),
        Some("\"hello\""),
        "text to a JSON channel is a JSON string"
    );
    let bin = bin_rec.wait_for(1, WAIT).await;
    assert_eq!(bin[0].kind(), FrameKind::Binary);
    assert_eq!(&bin[0].data()[..], b"hello");
}

#[tokio::test]
async fn closed_channels_leave_every_group_by_themselves() {
    let cb = new_box(HistoryLimits::default());
    let (a, _) = test_channel(ChannelConfig::default());
    let (b, _) = test_channel(ChannelConfig::default());
    for g in ["x", "y"] {
        cb.add_channel_to_group(&a, g).await.unwrap();
    }
    cb.add_channel_to_group(&b, "y").await.unwrap();
    a.close(CloseReason::NORMAL);
    wait_closed(&a).await;
    let groups = cb.show_groups().await;
    assert_eq!(groups.get("x"), None, "x lost its only member");
    assert_eq!(groups.get("y"), Some(&1));
    assert!(cb.channel(a.id()).is_none());
    let report = cb.group_send("y", json!(1), false).await.unwrap();
    assert_eq!(report.delivery.delivered, 1);
    assert!(matches!(
        cb.add_channel_to_group(&a, "x").await,
        Err(BoxError::ChannelClosed(_))
    ));
}

#[tokio::test]
async fn idle_channels_expire_and_are_removed() {
    let cb = new_box(HistoryLimits::default());
    let (idle, rec) = test_channel(ChannelConfig {
        expiry: Some(Duration::from_millis(100)),
        ..ChannelConfig::default()
    });
    let (busy, _) = test_channel(ChannelConfig {
        expiry: Some(Duration::from_millis(300)),
        ..ChannelConfig::default()
    });
    cb.add_channel_to_group(&idle, "g").await.unwrap();
    cb.add_channel_to_group(&busy, "g").await.unwrap();
    wait_closed(&idle).await;
    assert_eq!(rec.close_reason(), Some(CloseReason::EXPIRED));
    assert_eq!(cb.show_groups().await.get("g"), Some(&1));
    // Activity keeps a channel alive past its expiry.
    for _ in 0..6 {
        busy.touch();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!busy.is_closed(), "activity postpones expiry");
}

#[tokio::test]
async fn close_all_connections_closes_with_going_away() {
    let cb = new_box(HistoryLimits::default());
    let mut all = Vec::new();
    for _ in 0..5 {
        let (ch, rec) = test_channel(ChannelConfig::default());
        cb.add_channel_to_group(&ch, "g").await.unwrap();
        all.push((ch, rec));
    }
    assert_eq!(cb.close_all_connections().await, 5);
    for (ch, rec) in &all {
        wait_closed(ch).await;
        assert_eq!(rec.close_reason(), Some(CloseReason::GOING_AWAY));
    }
    assert!(cb.show_groups().await.is_empty());
    assert_eq!(cb.stats().channels, 0);
}

#[tokio::test]
async fn flush_history_starts_a_new_epoch() {
    let cb = new_box(HistoryLimits::default());
    cb.group_send("g", json!(1), true).await.unwrap();
    cb.group_send("h", json!(1), true).await.unwrap();
    let before = cb.head("g").await.unwrap().epoch;
    cb.flush_history(Some("g")).await.unwrap();
    assert_ne!(cb.head("g").await.unwrap().epoch, before);
    assert_eq!(cb.group_send("g", json!(2), true).await.unwrap().offset, Some(1));
    assert_eq!(
        cb.show_history("h", ReadQuery::Last(10)).await.unwrap().messages.len(),
        1
    );
    cb.flush_history(None).await.unwrap();
    assert!(cb
        .show_history("h", ReadQuery::Last(10))
        .await
        .unwrap()
        .messages
        .is_empty());
}

#[tokio::test]
async fn flush_groups_empties_every_group() {
    let cb = new_box(HistoryLimits::default());
    let (a, _) = test_channel(ChannelConfig::default());
    cb.add_channel_to_group(&a, "g").await.unwrap();
    cb.flush_groups().await;
    assert!(cb.show_groups().await.is_empty());
    assert!(!a.is_closed(), "channels stay open");
    assert_eq!(cb.send_to(a.id(), "still here").await.unwrap().delivered, 1);
}

#[tokio::test]
async fn the_membership_observer_hears_every_join_and_leave_once() {
    use std::sync::{Arc, Mutex};
    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);
    impl channelbox_core::MembershipObserver for Log {
        fn joined(&self, group: &str, channel: uuid::Uuid) {
            self.0
                .lock()
                .unwrap()
                .push(format!("+{group}:{}", &channel.to_string()[..4]));
        }
        fn left(&self, group: &str, channel: uuid::Uuid) {
            self.0
                .lock()
                .unwrap()
                .push(format!("-{group}:{}", &channel.to_string()[..4]));
        }
    }
    let cb = new_box(HistoryLimits::default());
    let log = Arc::new(Log::default());
    assert!(cb.observe(log.clone()));
    assert!(!cb.observe(Arc::new(Log::default())), "one observer");
    let (a, _) = test_channel(ChannelConfig::default());
    let (b, _) = test_channel(ChannelConfig::default());
    let short = |c: &channelbox_core::Channel| c.id().to_string()[..4].to_owned();
    let (sa, sb) = (short(&a), short(&b));
    cb.add_channel_to_group(&a, "g").await.unwrap();
    cb.add_channel_to_group(&a, "g").await.unwrap();
    cb.add_channel_to_group(&a, "h").await.unwrap();
    cb.add_channel_to_group(&b, "g").await.unwrap();
    cb.remove_channel_from_group(&b, "g").await.unwrap();
    cb.remove_channel_from_group(&b, "g").await.ok();
    a.close(CloseReason::NORMAL);
    wait_closed(&a).await;
    let mut tail = log.0.lock().unwrap().split_off(4);
    tail.sort();
    assert_eq!(
        log.0.lock().unwrap().clone(),
        vec![
            format!("+g:{sa}"),
            format!("+h:{sa}"),
            format!("+g:{sb}"),
            format!("-g:{sb}")
        ],
        "a repeated join and a leave of a group not in are no events"
    );
    assert_eq!(
        tail,
        vec![format!("-g:{sa}"), format!("-h:{sa}")],
        "a close leaves every group"
    );
}
