//! Where the writer thread stands, as it publishes it to every waiter: how
//! far writes are durable, whether the store is failing, and which writes
//! were lost in a failure (a bounded record).

use std::collections::VecDeque;
use std::sync::Arc;

/// Where the writer stands.
#[derive(Clone, Debug, Default)]
pub(crate) struct Progress {
    /// Every write up to this sequence number is on disk.
    pub(crate) durable: u64,
    /// Set while writes fail. Writes not durable by then fail with it, and
    /// the store refuses new ones until it has reopened sled and rolled the
    /// unacknowledged ones back.
    pub(crate) error: Option<Arc<str>>,
    /// Set while a batch failed but its failure mark (`marker.rs`) is not
    /// on disk yet: new writes are refused, and the failed ones are not
    /// answered, since a restart now could not roll them back. The number of
    /// the failed batch, and why it failed.
    pub(crate) unmarked: Option<(u64, Arc<str>)>,
    /// The newest ranges of sequence numbers (inclusive) whose writes failed:
    /// they never become durable, even once the marks have passed them.
    pub(crate) lost: VecDeque<(u64, u64)>,
    /// Every write up to this one was either durable or lost, in ranges no
    /// longer kept in `lost`: a write still waiting for one of these is
    /// answered as failed, the safe side.
    pub(crate) forgotten: u64,
}

/// How many ranges of lost writes [`Progress`] keeps: one per recovery,
/// and a writer recovers at most once a second (its retry interval), so
/// only a write whose waiter was not looked at for that many recoveries is
/// answered from `forgotten`.
const KEEP_LOST: usize = 64;

impl Progress {
    /// Whether write `seq` was lost in a failure (or may have been, for one
    /// older than the ranges kept).
    pub(crate) fn lost(&self, seq: u64) -> bool {
        seq <= self.forgotten && seq > 0 || self.lost.iter().any(|&(from, to)| (from..=to).contains(&seq))
    }

    /// Notes the writes `from..=to` as lost, keeping at most [`KEEP_LOST`]
    /// ranges.
    pub(crate) fn lose(&mut self, from: u64, to: u64) {
        if from <= to {
            self.lost.push_back((from, to));
        }
        while self.lost.len() > KEEP_LOST {
            if let Some((_, to)) = self.lost.pop_front() {
                self.forgotten = to;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_writes_stay_lost_in_a_bounded_record() {
        let mut p = Progress::default();
        // A flapping disk: many recoveries, each losing two writes after one
        // that became durable.
        for r in 0..1_000u64 {
            p.lose(r * 3 + 2, r * 3 + 3);
        }
        assert!(p.lost.len() <= KEEP_LOST, "{} ranges kept", p.lost.len());
        assert!(p.lost(2) && p.lost(3), "the oldest failure is still a failure");
        assert!(p.lost(2_999) && p.lost(3_000));
        assert!(!p.lost(2_998), "a durable write between recent failures");
        assert!(!p.lost(0) && !p.lost(3_001));
    }
}
