//! Subscribing: joining a group with a replay of its history, so that replay
//! and live delivery meet with no gap and no duplicate even while others
//! publish.
//!
//! The member joins *gated*: live messages for it are held in a buffer while
//! its replay is read. The sequencer's released position, taken under the
//! `order` lock at the moment of joining, splits the stream: everything up to
//! it is history (replayed), everything after it live (held, then queued).
//! Replays are read a page at a time and paced by the member's queue — never
//! more than half of it at a time — so a replay longer than the queue reaches
//! a client that keeps reading instead of closing it as a slow consumer, and
//! one that stops reading is closed instead of holding history in memory.

use std::time::Duration;

use super::membership::Group;
use super::recovery::{Page, Recovery, ReplayPlan};
use super::replays::ReplayPage;
use super::sequencer::Sequencer;
use super::{lock, AddStatus, ChannelBox, DeliveryReport};
use crate::channel::{Channel, SendError};
use crate::error::BoxError;
use crate::payload::Frame;
use crate::position::StreamPosition;
use crate::transport::CloseReason;

/// Messages read from history at a time for a replay: what a subscriber
/// costs in memory while its replay is under way.
const REPLAY_PAGE: usize = 256;

/// How long a replay waits for a client to take anything from its queue
/// before closing it as a slow consumer.
pub const REPLAY_STALL: Duration = Duration::from_secs(10);

/// What to replay to a channel that subscribes to a group.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Replay {
    /// Nothing: only live messages.
    #[default]
    None,
    /// The newest `n` saved messages.
    Last(usize),
    /// Recovery: everything after this position, if history still has it.
    Since(StreamPosition),
}

/// Frames a transport wants around a subscription's replay; see
/// [`ChannelBox::subscribe`].
pub trait SubscribeFraming: Sync {
    /// The first frame, queued before any replayed or live message. `start`
    /// is the newest position that will not be delivered live.
    fn before(&self, start: &StreamPosition) -> Option<Frame> {
        let _ = start;
        None
    }

    /// Queued after a recovery's replay, before any live message.
    fn after_recovery(&self, recovery: &Recovery) -> Option<Frame> {
        let _ = recovery;
        None
    }
}

/// No frames around a subscription.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoFraming;

impl SubscribeFraming for NoFraming {}

/// What [`ChannelBox::subscribe`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribed {
    /// The membership change.
    pub status: AddStatus,
    /// Where live delivery starts: the channel receives live every saved
    /// message after this position (offset 0 if the group has none).
    pub start: StreamPosition,
    /// How many saved messages were replayed.
    pub replayed: usize,
    /// The recovery outcome, for [`Replay::Since`].
    pub recovery: Option<Recovery>,
}

impl ChannelBox {
    /// Joins a channel to a group and replays history into it so that replay and
    /// live delivery meet with no gap and no duplicate, even while others publish.
    ///
    /// The frames are queued in this order: `framing.before`, the replayed
    /// messages, `framing.after_recovery` (for [`Replay::Since`]), then live
    /// messages. While history is read, live messages for this channel are held
    /// in a buffer bounded by its queue size. A channel that is already a member
    /// keeps receiving live messages meanwhile, so a replay into it may repeat
    /// some of them.
    pub async fn subscribe(
        &self,
        channel: &Channel,
        group: &str,
        replay: Replay,
        framing: &dyn SubscribeFraming,
    ) -> Result<Subscribed, BoxError> {
        let (status, g, start) = self.join_gated(channel, group, framing).await?;
        let (replayed, recovery) = match self.replay_pages(&g, channel, &replay, &start).await {
            Ok(r) => r,
            Err(err) => {
                self.open_gate(&g, channel, None, framing);
                return Err(err);
            }
        };
        // Live messages held meanwhile (at most half a queue) go in next.
        if self.paced(channel).await {
            self.open_gate(&g, channel, recovery.as_ref(), framing);
        }
        Ok(Subscribed {
            status,
            start,
            replayed,
            recovery,
        })
    }

    /// Reads history a page at a time and queues it, paced. Returns how many
    /// messages were replayed and, for a recovery, its outcome: complete when
    /// every page continued the one before up to the start; a gap found on a
    /// later page (history trimmed while replaying) ends it incomplete after
    /// what was replayed without a gap.
    async fn replay_pages(
        &self,
        g: &Group,
        channel: &Channel,
        replay: &Replay,
        start: &StreamPosition,
    ) -> Result<(usize, Option<Recovery>), BoxError> {
        let plan = match ReplayPlan::new(replay, start) {
            Ok(Some(plan)) => plan,
            Ok(None) => return Ok((0, None)),
            Err(incomplete) => return Ok((0, Some(incomplete))),
        };
        let (mut cursor, mut replayed) = (plan.after, 0);
        let complete = loop {
            match self
                .read_page(&g.name, &plan, &start.epoch, cursor, REPLAY_PAGE)
                .await?
            {
                Page::Done => break true,
                Page::Gap => break false,
                Page::Replay { page, len } => {
                    if !self.replay_paced(g, channel, start, &page, len).await {
                        return Ok((replayed, None));
                    }
                    replayed += len;
                    cursor = page.messages[len - 1].offset;
                }
            }
        };
        let recovery = plan.recovering.map(|seen| Recovery {
            from: seen.offset,
            to: cursor,
            complete,
            replayed,
        });
        Ok((replayed, recovery))
    }

    /// Joins gated and takes the split point between history and live from the
    /// group's sequencer (starting it from the store's head if needed); queues
    /// `framing.before`.
    async fn join_gated(
        &self,
        channel: &Channel,
        group: &str,
        framing: &dyn SubscribeFraming,
    ) -> Result<(AddStatus, std::sync::Arc<Group>, StreamPosition), BoxError> {
        // The order lock is needed with a started sequencer; starting one needs
        // the store, which is async, so read the head first. In a cluster the
        // server subscribes before reading it: every message after the head
        // then arrives live (or, lost, is found by its offset).
        self.subscribe_node(group).await?;
        let head = self.inner.store.head(group).await?;
        loop {
            let (status, g) = self.join(channel, group, true)?;
            let mut order = lock(&g.order);
            // The group may have lost its last member between `join` and here;
            // then our membership went with it: join again.
            if !self.is_current(&g) {
                continue;
            }
            if order.is_none() {
                // Starting from the store's head: cached pages of any other
                // epoch of the group (one that went back and moved on) must
                // not be replayed.
                lock(&self.inner.replays).purge(group, Some(&head.epoch));
            }
            let start = order
                .get_or_insert_with(|| Sequencer::new(head.epoch.clone(), head.last + 1))
                .released();
            // Whatever was held back before now has an offset up to
            // `start.offset`: it is history from here on, not live.
            if let Some(held) = lock(&g.members).gated.get_mut(&channel.id()) {
                held.clear();
            }
            if let Some(frame) = framing.before(&start) {
                let _ = channel.try_send(frame);
            }
            drop(order);
            return Ok((status, g, start));
        }
    }

    /// Queues one page of a replay for a gated channel, never more than half
    /// its queue at a time. Live messages are held at the gate meanwhile; a
    /// client too slow for both is closed when the held ones reach half a
    /// queue. Returns whether the channel is still open.
    async fn replay_paced(
        &self,
        g: &Group,
        channel: &Channel,
        start: &StreamPosition,
        page: &ReplayPage,
        len: usize,
    ) -> bool {
        let envelope = &*self.inner.envelope;
        let frames = page.frames(envelope, &g.name, &start.epoch, channel.payload_type());
        for frame in &frames[..len] {
            if !self.paced(channel).await {
                return false;
            }
            let result = channel.try_send(frame.clone());
            if result.is_err() {
                if self.account(channel, result, &mut DeliveryReport::default()) {
                    self.forget(channel.id());
                }
                return false;
            }
        }
        true
    }

    /// Waits until the channel's queue is under half full. A client that takes
    /// nothing for [`REPLAY_STALL`] cannot be replayed to: it is closed as a
    /// slow consumer rather than holding its page of history. Returns whether
    /// the channel is still open.
    async fn paced(&self, channel: &Channel) -> bool {
        if !channel.is_half_empty() && tokio::time::timeout(REPLAY_STALL, channel.half_empty()).await.is_err() {
            channel.close(CloseReason::SLOW_CONSUMER);
            self.account(channel, Err(SendError::Overflow), &mut DeliveryReport::default());
            self.forget(channel.id());
            return false;
        }
        !channel.is_closed()
    }

    /// Ends the gate: the `recovered` frame, then the live messages held while
    /// history was read and replayed.
    fn open_gate(&self, g: &Group, channel: &Channel, recovery: Option<&Recovery>, framing: &dyn SubscribeFraming) {
        let order = lock(&g.order);
        let mut report = DeliveryReport::default();
        let mut slow = false;
        if let Some(frame) = recovery.and_then(|r| framing.after_recovery(r)) {
            slow |= self.account(channel, channel.try_send(frame), &mut report);
        }
        let mut m = lock(&g.members);
        if let Some(held) = m.gated.remove(&channel.id()) {
            for frame in held {
                slow |= self.account(channel, channel.try_send(frame), &mut report);
            }
        }
        m.snapshot = None;
        drop(m);
        drop(order);
        if slow {
            self.forget(channel.id());
        }
    }
}
