//! The write delay (`ChannelConfig::write_delay`): a broadcast's frames are
//! held back to go out together, in order, none later than the delay after
//! it was pushed; a frame sent with `try_send`, a queue a quarter full and a
//! close end the wait; a lone frame after a quiet spell, and every frame
//! without a delay, is written at once. Time is paused: the instants are
//! tokio's clock, exact, so nothing here depends on the machine's speed.

use std::time::Duration;

use channelbox_core::testkit::{test_channel, Recorder};
use channelbox_core::{ChannelBox, ChannelConfig, CloseReason, Frame, HistoryLimits};
use common::{json_of, new_box, wait_closed, WAIT};
use serde_json::{json, Value};
use tokio::time::Instant;

mod common;

const DELAY: Duration = Duration::from_millis(20);
const MS: Duration = Duration::from_millis(1);

fn with_delay(write_delay: Duration) -> ChannelConfig {
    ChannelConfig {
        write_delay,
        ..ChannelConfig::default()
    }
}

async fn member(config: ChannelConfig) -> (ChannelBox, channelbox_core::Channel, Recorder) {
    let cb = new_box(HistoryLimits::default());
    let (ch, rec) = test_channel(config);
    cb.add_channel_to_group(&ch, "g").await.expect("joins");
    (cb, ch, rec)
}

/// Broadcasts `{"n": n}` to the group, unsaved.
async fn broadcast(cb: &ChannelBox, n: u64) {
    cb.group_send("g", json!({ "n": n }), false).await.expect("sends");
}

fn numbered(range: std::ops::Range<u64>) -> Vec<Value> {
    range.map(|n| json!({ "n": n })).collect()
}

#[tokio::test(start_paused = true)]
async fn a_trickle_goes_out_a_few_frames_per_write_in_order_each_within_the_delay() {
    let (cb, _ch, rec) = member(with_delay(DELAY)).await;
    let mut pushed = Vec::new();
    for n in 0..40 {
        pushed.push(Instant::now());
        broadcast(&cb, n).await;
        tokio::time::sleep(5 * MS).await;
    }
    rec.wait_for(40, WAIT).await;
    assert_eq!(json_of(&rec), numbered(0..40), "every frame, in order");
    let writes = rec.writes();
    let mut frames = pushed.iter().enumerate();
    for (at, len) in &writes {
        for _ in 0..*len {
            let (n, pushed) = frames.next().expect("no more frames written than pushed");
            let waited = at.duration_since(*pushed);
            assert!(waited <= DELAY, "frame {n} waited {waited:?}, more than the delay");
        }
    }
    // A frame every 5 ms held up to 20 ms: about four per write, the
    // first two written as they came (the writer holds only once frames
    // come more often than the delay).
    assert!(writes.len() <= 15, "40 frames in {} writes: {writes:?}", writes.len());
}

#[tokio::test(start_paused = true)]
async fn a_lone_frame_after_a_quiet_spell_is_written_at_once() {
    let (cb, _ch, rec) = member(with_delay(DELAY)).await;
    for n in 0..3 {
        let pushed = Instant::now();
        broadcast(&cb, n).await;
        let frames = rec.wait_for(n as usize + 1, WAIT).await;
        assert_eq!(frames.len(), n as usize + 1);
        let (at, len) = *rec.writes().last().expect("written");
        assert_eq!((at, len), (pushed, 1), "frame {n} is written as it is pushed");
        tokio::time::sleep(10 * DELAY).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_frame_that_must_not_wait_ends_the_hold_and_takes_the_held_frames_along() {
    let (cb, ch, rec) = member(with_delay(DELAY)).await;
    broadcast(&cb, 0).await;
    rec.wait_for(1, WAIT).await;
    tokio::time::sleep(MS).await;
    // Less than the delay after the first write: the writer holds after this one.
    broadcast(&cb, 1).await;
    rec.wait_for(2, WAIT).await;
    tokio::time::sleep(MS).await;
    broadcast(&cb, 2).await;
    tokio::time::sleep(MS).await;
    assert_eq!(rec.frames().len(), 2, "frame 2 is held back");
    let replied = Instant::now();
    ch.try_send(Frame::text("{\"reply\":true}")).expect("queued");
    rec.wait_for(4, WAIT).await;
    assert_eq!(
        *rec.writes().last().expect("written"),
        (replied, 2),
        "the reply and frame 2, at once"
    );
    let mut want = numbered(0..3);
    want.push(json!({"reply": true}));
    assert_eq!(json_of(&rec), want);
}

#[tokio::test(start_paused = true)]
async fn a_queue_a_quarter_full_is_written_without_waiting() {
    let config = ChannelConfig {
        max_queue_frames: 16,
        ..with_delay(DELAY)
    };
    let (cb, _ch, rec) = member(config).await;
    broadcast(&cb, 0).await;
    rec.wait_for(1, WAIT).await;
    tokio::time::sleep(MS).await;
    broadcast(&cb, 1).await;
    rec.wait_for(2, WAIT).await;
    tokio::time::sleep(MS).await;
    for n in 2..5 {
        broadcast(&cb, n).await;
    }
    tokio::time::sleep(MS).await;
    assert_eq!(rec.frames().len(), 2, "three of sixteen frames queued: held back");
    let filled = Instant::now();
    broadcast(&cb, 5).await;
    rec.wait_for(6, WAIT).await;
    assert_eq!(
        *rec.writes().last().expect("written"),
        (filled, 4),
        "a quarter of the queue goes at once"
    );
    assert_eq!(json_of(&rec), numbered(0..6));
}

#[tokio::test(start_paused = true)]
async fn a_close_ends_the_hold_after_the_held_frames() {
    let (cb, ch, rec) = member(with_delay(DELAY)).await;
    broadcast(&cb, 0).await;
    rec.wait_for(1, WAIT).await;
    tokio::time::sleep(MS).await;
    broadcast(&cb, 1).await;
    rec.wait_for(2, WAIT).await;
    broadcast(&cb, 2).await;
    let closed = Instant::now();
    ch.close(CloseReason::GOING_AWAY);
    wait_closed(&ch).await;
    assert_eq!(
        json_of(&rec),
        numbered(0..3),
        "the held frame is written before the close"
    );
    assert_eq!(rec.writes().last().map(|w| w.0), Some(closed));
    assert_eq!(rec.close_reason(), Some(CloseReason::GOING_AWAY));
}

#[tokio::test(start_paused = true)]
async fn without_a_delay_every_frame_is_written_as_it_is_pushed() {
    let (cb, _ch, rec) = member(ChannelConfig::default()).await;
    let mut pushed = Vec::new();
    for n in 0..10 {
        pushed.push(Instant::now());
        broadcast(&cb, n).await;
        rec.wait_for(n as usize + 1, WAIT).await;
        tokio::time::sleep(MS).await;
    }
    let writes = rec.writes();
    assert_eq!(writes, pushed.into_iter().map(|at| (at, 1)).collect::<Vec<_>>());
    assert_eq!(json_of(&rec), numbered(0..10));
}
