//! Fan-out: one message into every live member's queue, and into the held-back
//! buffer of members whose replay is still being read; `send_to` for one
//! channel. Every push is accounted by [`ChannelBox::account`]; a member
//! closed as a slow consumer leaves all its groups at once, not when its socket
//! finally gives up.

use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::membership::{Group, Members};
use super::{lock, ChannelBox, DeliveryReport};
use crate::channel::{Channel, Push, SendError};
use crate::envelope::{MessageRef, Rendered};
use crate::error::BoxError;
use crate::payload::{plain_frame, Frame, Payload};
use crate::transport::CloseReason;

/// Members whose queues a broadcast brings into the cache together.
const WARM_RUN: usize = 16;

impl ChannelBox {
    /// Pushes one message into every live member's queue but `except`'s, and
    /// into the held-back buffers of members whose replay is still being
    /// read. Called with the group's `order` lock held; never waits.
    pub(super) fn deliver(&self, g: &Group, msg: MessageRef<'_>, except: Option<Uuid>) -> DeliveryReport {
        let members = g.snapshot();
        let mut rendered = Rendered::new(&*self.inner.envelope, msg);
        let mut report = DeliveryReport::default();
        // Nothing more is rendered or pushed for a slow consumer once found.
        let mut slow = Vec::new();
        for run in members.chunks(WARM_RUN) {
            // In a large group every member's line is cold: load a run of
            // them at once, so that the misses overlap, before the pushes
            // (whose locked instructions would each wait out their own).
            std::hint::black_box(run.iter().fold(0, |acc, ch| acc ^ ch.warm()));
            for ch in run {
                // The id lives off the cache line a push touches: read it only
                // when a member is to be skipped.
                if except.is_some_and(|id| ch.id() == id) {
                    continue;
                }
                if self.account(
                    ch,
                    ch.try_send_with(|to| rendered.frame(to), Push::Coalesce),
                    &mut report,
                ) {
                    slow.push(ch.id());
                }
            }
        }
        let mut m = lock(&g.members);
        if !m.gated.is_empty() {
            self.hold_for_gated(&mut m, &mut rendered, &mut report, &mut slow, except);
        }
        drop(m);
        // Lock order: `order` (held by the caller) → `state` → `members`.
        for id in slow {
            self.forget(id);
        }
        self.inner
            .counters
            .delivered
            .fetch_add(report.delivered as u64, Ordering::Relaxed);
        report
    }

    /// Holds the message for members behind a gate. Half the queue is the most
    /// held for one member: the gate opens into a queue at most half full (see
    /// `subscribe`), so what is held always fits; a member that would need more
    /// is closed as a slow consumer.
    fn hold_for_gated(
        &self,
        m: &mut Members,
        rendered: &mut Rendered<'_>,
        report: &mut DeliveryReport,
        slow: &mut Vec<Uuid>,
        except: Option<Uuid>,
    ) {
        let Members { map, gated, .. } = m;
        for (id, held) in gated.iter_mut() {
            if except == Some(*id) {
                continue;
            }
            let Some(ch) = map.get(id) else { continue };
            if held.len() >= ch.config().max_queue_frames / 2 {
                ch.close(CloseReason::SLOW_CONSUMER);
                self.account(ch, Err(SendError::Overflow), report);
                slow.push(*id);
                continue;
            }
            held.push(rendered.frame(ch.payload_type()));
            report.delivered += 1;
        }
    }

    /// Sends a payload to one channel by id (Nexios's `send_to`).
    pub async fn send_to(&self, id: Uuid, payload: impl Into<Payload>) -> Result<DeliveryReport, BoxError> {
        let channel = self.channel(id).ok_or(BoxError::NoSuchChannel(id))?;
        let (kind, bytes) = payload.into().encode();
        let frame = plain_frame(kind, &bytes, channel.payload_type());
        Ok(self.send_frame_to_channel(&channel, frame))
    }

    /// Sends an encoded frame to one channel by id.
    pub fn send_frame_to(&self, id: Uuid, frame: Frame) -> Result<DeliveryReport, BoxError> {
        let channel = self.channel(id).ok_or(BoxError::NoSuchChannel(id))?;
        Ok(self.send_frame_to_channel(&channel, frame))
    }

    /// Sends an encoded frame to a channel with the box's accounting: an
    /// overflow is counted and a slow consumer leaves its groups at once.
    pub fn send_frame_to_channel(&self, channel: &Channel, frame: Frame) -> DeliveryReport {
        let mut report = DeliveryReport::default();
        if self.account(channel, channel.try_send(frame), &mut report) {
            self.forget(channel.id());
        }
        report
    }
}
