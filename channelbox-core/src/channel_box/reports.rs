//! What the box's operations return — membership statuses, delivery and
//! publish reports, life-time counters — and [`ChannelBox::account`], the one
//! place where a frame's delivery result becomes a report entry and a count.

use std::sync::atomic::{AtomicU64, Ordering};

use uuid::Uuid;

use super::ChannelBox;
use crate::channel::{Channel, Enqueued, OverflowPolicy, SendError};
use crate::position::Epoch;

/// What `add_channel_to_group` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddStatus {
    /// The group did not exist; it was created with this channel as its first member.
    GroupCreated,
    /// The channel joined an existing group.
    Added,
    /// The channel was already a member; nothing changed.
    AlreadyMember,
}

/// What `remove_channel_from_group` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveStatus {
    /// The channel left the group; other members remain.
    Removed,
    /// The channel left and was the last member, so the group is gone.
    GroupDeleted,
    /// The channel was not a member of that group.
    NotMember,
}

/// Who got a frame.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Members whose queue accepted the frame.
    pub delivered: usize,
    /// Members whose queue was full (they are closed as slow consumers, or had
    /// older frames dropped, depending on their overflow policy).
    pub overflowed: Vec<Uuid>,
    /// Members that were already closed.
    pub closed: Vec<Uuid>,
}

/// The result of a publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishReport {
    /// The message's offset, when it was saved to history.
    pub offset: Option<u64>,
    /// The group's epoch, when it was saved to history.
    pub epoch: Option<Epoch>,
    /// Who got it.
    pub delivery: DeliveryReport,
}

/// Counters over the life of a [`ChannelBox`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoxStats {
    /// Open channels registered.
    pub channels: usize,
    /// Groups with at least one member.
    pub groups: usize,
    /// Messages published with `group_send` / `publish`.
    pub published: u64,
    /// Message frames handed to members' queues by broadcasts (not replays).
    pub delivered: u64,
    /// Frames refused or dropped by full queues.
    pub overflows: u64,
    /// Channels closed as slow consumers.
    pub slow_consumer_closes: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) published: AtomicU64,
    pub(super) delivered: AtomicU64,
    overflows: AtomicU64,
    slow_consumer_closes: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self, channels: usize, groups: usize) -> BoxStats {
        BoxStats {
            channels,
            groups,
            published: self.published.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            overflows: self.overflows.load(Ordering::Relaxed),
            slow_consumer_closes: self.slow_consumer_closes.load(Ordering::Relaxed),
        }
    }
}

impl ChannelBox {
    /// Accounts one frame handed to `channel`: records the result in `report`
    /// and counts overflows and slow-consumer closes. Returns whether the
    /// channel was closed as a slow consumer, so that the caller makes it leave
    /// its groups (outside the locks it holds).
    ///
    /// Every delivery goes through here — broadcasts, replays, replies,
    /// `send_to` — so the counters agree with what clients saw.
    pub(super) fn account(
        &self,
        channel: &Channel,
        result: Result<Enqueued, SendError>,
        report: &mut DeliveryReport,
    ) -> bool {
        // The id is read only when needed: it lives outside the cache line a
        // broadcast's push touches.
        let counters = &self.inner.counters;
        match result {
            Ok(e) if e.dropped == 0 => {
                report.delivered += 1;
                false
            }
            Ok(_) => {
                report.delivered += 1;
                report.overflowed.push(channel.id());
                counters.overflows.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(SendError::Overflow) => {
                report.overflowed.push(channel.id());
                counters.overflows.fetch_add(1, Ordering::Relaxed);
                if channel.config().overflow == OverflowPolicy::Disconnect {
                    counters.slow_consumer_closes.fetch_add(1, Ordering::Relaxed);
                }
                channel.is_closed()
            }
            Err(SendError::Closed) => {
                report.closed.push(channel.id());
                false
            }
        }
    }
}
