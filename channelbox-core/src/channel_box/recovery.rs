//! Recovery: what a subscriber is replayed — a [`ReplayPlan`], read from
//! history page by page without holding any lock — and [`is_complete`], the
//! one rule that decides whether a client that saw a position now has every
//! message after it with no gap (applied to each page of a recovery).

use std::sync::Arc;

use super::replays::ReplayPage;
use super::subscribe::Replay;
use super::{lock, ChannelBox};
use crate::error::BoxError;
use crate::history::{ReadQuery, StoredMessage};
use crate::position::{Epoch, StreamPosition};

/// The outcome of a recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The offset the client asked to recover after.
    pub from: u64,
    /// The last replayed offset (`from` when nothing was replayed).
    pub to: u64,
    /// Whether the client now has every message of the group with no gap.
    pub complete: bool,
    /// How many messages were replayed.
    pub replayed: usize,
}

impl Recovery {
    pub(super) fn incomplete(from: u64) -> Self {
        Recovery {
            from,
            to: from,
            complete: false,
            replayed: 0,
        }
    }
}

/// Whether `messages`, read from history whose epoch is `epoch`, bring a client
/// that saw `seen` up to offset `upto` with no gap: same epoch, and exactly the
/// offsets `seen.offset + 1 ..= upto` (offsets only grow, so the count and the
/// first one decide it).
pub(super) fn is_complete(seen: &StreamPosition, upto: u64, epoch: &Epoch, messages: &[StoredMessage]) -> bool {
    if crate::mutation::active("recover_always_complete") {
        return true;
    }
    *epoch == seen.epoch
        && seen.offset <= upto
        && messages.len() as u64 == upto - seen.offset
        && messages.first().is_none_or(|m| m.offset == seen.offset + 1)
}

impl ChannelBox {
    /// What a client that saw `seen` missed, up to the group's newest message,
    /// and whether that is complete (false when the epoch differs, messages
    /// after `seen` were trimmed, or more than `limit` are missing). Reads at
    /// most `limit` messages; nothing is returned when it is not complete.
    pub async fn recover(
        &self,
        group: &str,
        seen: &StreamPosition,
        limit: usize,
    ) -> Result<(Vec<StoredMessage>, bool), BoxError> {
        let query = ReadQuery::Since {
            offset: seen.offset,
            limit,
        };
        let page = self.inner.store.read(group, query).await?;
        if !is_complete(seen, page.head.last, &page.head.epoch, &page.messages) {
            return Ok((Vec::new(), false));
        }
        Ok((page.messages, true))
    }
}

/// Where a replay reads from and what it promises.
pub(super) struct ReplayPlan {
    /// Read after this offset.
    pub(super) after: u64,
    /// Read up to this offset (the subscription's start).
    pub(super) upto: u64,
    /// For a recovery, the position the client saw: every page must then
    /// continue exactly where the previous one ended.
    pub(super) recovering: Option<StreamPosition>,
}

impl ReplayPlan {
    /// The plan for `replay` into a subscription that goes live after `start`;
    /// `Err` with the outcome when a recovery is incomplete before reading.
    pub(super) fn new(replay: &Replay, start: &StreamPosition) -> Result<Option<ReplayPlan>, Recovery> {
        let upto = start.offset;
        match replay {
            Replay::None | Replay::Last(0) => Ok(None),
            Replay::Last(n) => Ok(Some(ReplayPlan {
                after: upto.saturating_sub(*n as u64),
                upto,
                recovering: None,
            })),
            Replay::Since(seen)
                if (seen.epoch != start.epoch || seen.offset > upto)
                    && !crate::mutation::active("recover_always_complete") =>
            {
                Err(Recovery::incomplete(seen.offset))
            }
            Replay::Since(seen) => Ok(Some(ReplayPlan {
                after: seen.offset,
                upto,
                recovering: Some(seen.clone()),
            })),
        }
    }
}

/// What one page of a replay holds, judged by the plan.
pub(super) enum Page {
    /// The first `len` messages of `page` are to be replayed, oldest first;
    /// the next page reads after the last of them.
    Replay {
        /// The page, perhaps shared with other subscribers.
        page: Arc<ReplayPage>,
        /// How many of its messages this replay takes.
        len: usize,
    },
    /// Nothing more to replay.
    Done,
    /// A recovery's history has a gap or another epoch: stop, incomplete.
    Gap,
}

impl ChannelBox {
    /// Reads the next page of a replay after `cursor`, at most `page` messages:
    /// from the shared replay pages when another subscriber read the same
    /// range, else from the store (and shared when complete).
    pub(super) async fn read_page(
        &self,
        group: &str,
        plan: &ReplayPlan,
        epoch: &Epoch,
        cursor: u64,
        page: usize,
    ) -> Result<Page, BoxError> {
        if cursor >= plan.upto {
            return Ok(Page::Done);
        }
        let limit = usize::try_from(plan.upto - cursor).map_or(page, |left| left.min(page));
        if let Some(shared) = lock(&self.inner.replays).get(group, epoch, cursor, limit) {
            return Ok(Page::Replay {
                page: shared,
                len: limit,
            });
        }
        let query = ReadQuery::Since { offset: cursor, limit };
        let read = self.inner.store.read(group, query).await?;
        let mut messages = read.messages;
        messages.retain(|m| m.offset <= plan.upto);
        // Every page is a recovery of its own range: exactly the offsets
        // after the cursor, in the same epoch.
        let seen = StreamPosition::new(epoch.clone(), cursor);
        let complete = is_complete(&seen, cursor + limit as u64, &read.head.epoch, &messages);
        if plan.recovering.is_some() && !complete {
            return Ok(Page::Gap);
        } else if read.head.epoch != *epoch || messages.is_empty() {
            return Ok(Page::Done);
        }
        let len = messages.len();
        let page = Arc::new(ReplayPage::new(messages));
        if complete {
            // Only for a group that is here: pages go with their group
            // (`drop_pages_of_gone`), and one put back after its last member
            // left during the read would stay until evicted.
            let state = lock(&self.inner.state);
            if state.groups.contains_key(group) {
                lock(&self.inner.replays).put(group, epoch, cursor, page.clone());
            }
        }
        Ok(Page::Replay { page, len })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::payload::PayloadKind;

    fn msgs(offsets: &[u64]) -> Vec<StoredMessage> {
        offsets
            .iter()
            .map(|&offset| StoredMessage {
                offset,
                kind: PayloadKind::Text,
                payload: Bytes::new(),
                meta: Bytes::new(),
                timestamp_ms: 0,
            })
            .collect()
    }

    #[test]
    fn complete_means_same_epoch_and_every_offset_after_the_one_seen() {
        let e = Epoch::new("e");
        let seen = StreamPosition::new(e.clone(), 3);
        assert!(is_complete(&seen, 6, &e, &msgs(&[4, 5, 6])));
        assert!(is_complete(&seen, 3, &e, &[]), "nothing missed is complete");
        assert!(!is_complete(&seen, 6, &e, &msgs(&[5, 6])), "4 was trimmed");
        assert!(!is_complete(&seen, 6, &e, &msgs(&[4, 5])), "6 is missing");
        assert!(!is_complete(&seen, 6, &Epoch::new("other"), &msgs(&[4, 5, 6])));
        assert!(!is_complete(&seen, 2, &e, &[]), "the client is ahead of the group");
    }
}
