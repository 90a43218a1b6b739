//! The per-group sequencer: it hands saved messages to delivery in offset order.
//!
//! Offsets are assigned in call order, but appends become durable — and
//! publishes finish — in any order. Each finished offset is *completed* here:
//! the sequencer releases it only once every offset below it was released or
//! abandoned, drops offsets it released already (a subscriber that arrived
//! since read them from history), and forgets everything of an epoch that was
//! reset. It holds no lock of its own: the group's `order` mutex guards it.

use std::collections::BTreeMap;

use crate::position::{Epoch, StreamPosition};

/// Most completed offsets held back behind a gap: past it the gap is not
/// closing, and the group's members are closed with 4002 instead of holding
/// ever more messages in memory.
pub(super) const MAX_PENDING: usize = 65_536;

/// Delivery in offset order for one epoch of one group. `T` is what waits for
/// its turn (a message with its publisher's report channel, in the box).
pub(super) struct Sequencer<T> {
    epoch: Epoch,
    /// The next offset to release; everything below it was released.
    next: u64,
    /// Completed offsets above `next`; `None` for an abandoned offset (a failed
    /// or dropped append), which is skipped when its turn comes.
    pending: BTreeMap<u64, Option<T>>,
    /// The newest offset known to exist (completed here, or seen in the
    /// store's head): everything from `next` up to it must come.
    known: u64,
    /// Most offsets `pending` may hold ([`MAX_PENDING`]).
    bound: usize,
}

/// Offsets a sequencer waits for that nothing may bring: after `after`, up to
/// and including `last`. With a broker, a lost message leaves one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Gap {
    /// The newest released offset.
    pub(super) after: u64,
    /// The newest missing offset.
    pub(super) last: u64,
}

/// What [`Sequencer::complete`] did with an offset.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Completion<T> {
    /// Taken: released now (with everything it unblocked) or held back until
    /// the offsets below it complete.
    Taken,
    /// The offset was released before: the item is handed back undelivered.
    Stale(Option<T>),
    /// Held back behind a gap while [`MAX_PENDING`] offsets are held back
    /// already: refused, the item handed back. The gap is not closing.
    Overflow(Option<T>),
}

impl<T> Sequencer<T> {
    /// A sequencer for `epoch` whose next offset to release is `next`.
    pub(super) fn new(epoch: Epoch, next: u64) -> Self {
        Sequencer {
            epoch,
            next,
            pending: BTreeMap::new(),
            known: next.saturating_sub(1),
            bound: MAX_PENDING,
        }
    }

    /// A sequencer that holds at most `bound` offsets back behind a gap.
    #[cfg(test)]
    fn bounded(epoch: Epoch, next: u64, bound: usize) -> Self {
        Sequencer {
            bound,
            ..Sequencer::new(epoch, next)
        }
    }

    /// Records that offsets up to `last` exist (the store's head says so).
    pub(super) fn note_known(&mut self, last: u64) {
        self.known = self.known.max(last);
    }

    /// The offsets missing before the next one can be released, if any.
    pub(super) fn gap(&self) -> Option<Gap> {
        let upto = match self.pending.first_key_value() {
            Some((first, _)) => first - 1,
            None => self.known,
        };
        (upto >= self.next).then_some(Gap {
            after: self.next - 1,
            last: upto,
        })
    }

    /// The epoch whose offsets this sequencer orders.
    pub(super) fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// The newest released position: every saved message up to it was handed
    /// to delivery; a subscriber must read it from history.
    pub(super) fn released(&self) -> StreamPosition {
        StreamPosition::new(self.epoch.clone(), self.next - 1)
    }

    /// Completes `offset` with its item (`None` when its append failed or was
    /// abandoned) and calls `release` for every item that is in order now, in
    /// offset order.
    pub(super) fn complete(&mut self, offset: u64, item: Option<T>, mut release: impl FnMut(u64, T)) -> Completion<T> {
        if offset < self.next {
            return Completion::Stale(item);
        }
        if offset > self.next && self.pending.len() >= self.bound && !self.pending.contains_key(&offset) {
            return Completion::Overflow(item);
        }
        self.pending.insert(offset, item);
        self.known = self.known.max(offset);
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() != self.next {
                break;
            }
            let item = entry.remove();
            self.next += 1;
            if let Some(item) = item {
                release(self.next - 1, item);
            }
        }
        Completion::Taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released(
        seq: &mut Sequencer<&'static str>,
        offset: u64,
        item: Option<&'static str>,
    ) -> Vec<(u64, &'static str)> {
        let mut out = Vec::new();
        let completion = seq.complete(offset, item, |o, t| out.push((o, t)));
        assert_eq!(completion, Completion::Taken);
        out
    }

    #[test]
    fn in_order_offsets_are_released_at_once() {
        let mut seq = Sequencer::new(Epoch::new("e"), 1);
        assert_eq!(released(&mut seq, 1, Some("a")), [(1, "a")]);
        assert_eq!(released(&mut seq, 2, Some("b")), [(2, "b")]);
        assert_eq!(seq.released(), StreamPosition::new(Epoch::new("e"), 2));
    }

    #[test]
    fn an_offset_ahead_is_held_back_until_the_gap_closes() {
        let mut seq = Sequencer::new(Epoch::new("e"), 5);
        assert_eq!(released(&mut seq, 7, Some("c")), []);
        assert_eq!(released(&mut seq, 6, Some("b")), []);
        assert_eq!(seq.released().offset, 4, "nothing released while 5 is missing");
        assert_eq!(released(&mut seq, 5, Some("a")), [(5, "a"), (6, "b"), (7, "c")]);
        assert_eq!(seq.released().offset, 7);
    }

    #[test]
    fn duplicates_and_already_released_offsets_are_handed_back() {
        let mut seq = Sequencer::new(Epoch::new("e"), 1);
        assert_eq!(released(&mut seq, 1, Some("a")), [(1, "a")]);
        let mut out = Vec::new();
        assert_eq!(
            seq.complete(1, Some("again"), |o, t| out.push((o, t))),
            Completion::Stale(Some("again"))
        );
        assert!(out.is_empty(), "a duplicate is never released twice");
        let mut seq = Sequencer::new(Epoch::new("e"), 10);
        assert_eq!(seq.complete(3, Some("old"), |_, _| {}), Completion::Stale(Some("old")));
    }

    #[test]
    fn a_gap_is_what_lies_before_the_first_held_offset_or_up_to_the_known_head() {
        let mut seq = Sequencer::new(Epoch::new("e"), 1);
        assert_eq!(seq.gap(), None);
        assert_eq!(released(&mut seq, 4, Some("d")), []);
        assert_eq!(seq.gap(), Some(Gap { after: 0, last: 3 }));
        assert_eq!(released(&mut seq, 1, Some("a")), [(1, "a")]);
        assert_eq!(seq.gap(), Some(Gap { after: 1, last: 3 }));
        released(&mut seq, 2, Some("b"));
        assert_eq!(released(&mut seq, 3, Some("c")), [(3, "c"), (4, "d")]);
        assert_eq!(seq.gap(), None);
        seq.note_known(6);
        assert_eq!(seq.gap(), Some(Gap { after: 4, last: 6 }), "a lost tail");
        seq.note_known(2);
        assert_eq!(seq.gap(), Some(Gap { after: 4, last: 6 }), "known never goes back");
    }

    #[test]
    fn offsets_held_back_behind_a_gap_are_bounded() {
        let mut seq = Sequencer::bounded(Epoch::new("e"), 1, 3);
        for offset in 2..=4 {
            assert_eq!(released(&mut seq, offset, Some("x")), []);
        }
        assert_eq!(seq.complete(5, Some("y"), |_, _| {}), Completion::Overflow(Some("y")));
        assert_eq!(
            released(&mut seq, 1, Some("a")).len(),
            4,
            "the next offset is always taken"
        );
        assert_eq!(released(&mut seq, 5, Some("y")), [(5, "y")]);
    }

    #[test]
    fn abandoned_offsets_are_skipped_without_stalling_later_ones() {
        let mut seq = Sequencer::new(Epoch::new("e"), 1);
        assert_eq!(released(&mut seq, 2, Some("b")), []);
        assert_eq!(released(&mut seq, 1, None), [(2, "b")]);
        assert_eq!(seq.released().offset, 2);
    }
}
