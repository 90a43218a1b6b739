//! Recovery: what a subscriber is replayed, read from history without holding
//! any lock, and [`is_complete`], the one rule that decides whether a client
//! that saw a position now has every message after it with no gap.

use super::subscribe::Replay;
use super::ChannelBox;
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
    fn incomplete(from: u64) -> Self {
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

    /// Reads what a subscription that starts live after `start` replays, and
    /// the recovery outcome for [`Replay::Since`].
    pub(super) async fn read_replay(
        &self,
        group: &str,
        replay: &Replay,
        start: &StreamPosition,
    ) -> Result<(Vec<StoredMessage>, Option<Recovery>), BoxError> {
        let upto = start.offset;
        match replay {
            Replay::None | Replay::Last(0) => Ok((Vec::new(), None)),
            Replay::Last(n) => {
                let offset = upto.saturating_sub(*n as u64);
                let page = self
                    .inner
                    .store
                    .read(group, ReadQuery::Since { offset, limit: *n })
                    .await?;
                let mut msgs = page.messages;
                if page.head.epoch != start.epoch {
                    msgs.clear();
                }
                msgs.retain(|m| m.offset <= upto);
                Ok((msgs, None))
            }
            Replay::Since(seen) => {
                if seen.epoch != start.epoch || seen.offset > upto {
                    return Ok((Vec::new(), Some(Recovery::incomplete(seen.offset))));
                }
                let limit = usize::try_from(upto - seen.offset).unwrap_or(usize::MAX);
                let query = ReadQuery::Since {
                    offset: seen.offset,
                    limit,
                };
                let page = self.inner.store.read(group, query).await?;
                let mut msgs = page.messages;
                msgs.retain(|m| m.offset <= upto);
                if !is_complete(seen, upto, &page.head.epoch, &msgs) {
                    return Ok((Vec::new(), Some(Recovery::incomplete(seen.offset))));
                }
                let recovery = Recovery {
                    from: seen.offset,
                    to: msgs.last().map_or(seen.offset, |m| m.offset),
                    complete: true,
                    replayed: msgs.len(),
                };
                Ok((msgs, Some(recovery)))
            }
        }
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
