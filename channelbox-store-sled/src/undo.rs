//! The undo log: for every write that is not durable yet, what the groups it
//! changed looked like before it. Two things need it when the disk fails:
//! readers, which must see a group as the disk holds it (nothing a reader sees
//! may be rolled back later), and the rollback, which restores every group a
//! failed write touched to that state, keyed by generation, in a generation
//! of its own (see `recover.rs`).
//!
//! Entries are recorded under the store's lock in the order of their writes'
//! sequence numbers and forgotten once the writer has made their write
//! durable, so the log holds at most what waits for the writer.

use std::collections::{BTreeMap, VecDeque};

use crate::group::GroupState;

/// A group as readers may see it: whether it has an entry, its generation and
/// its newest offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Shown {
    pub(crate) exists: bool,
    pub(crate) generation: u64,
    pub(crate) last: u64,
}

impl Shown {
    pub(crate) fn of(group: Option<&GroupState>) -> Shown {
        group.map_or(Shown::default(), |g| Shown {
            exists: true,
            generation: g.generation,
            last: g.last,
        })
    }
}

/// One write's record: the group it changed and how it was before, or `None`
/// for a change of the whole store (a flush of every group, an eviction),
/// which changes the epoch of groups that have no entry.
#[derive(Debug)]
struct Entry {
    seq: u64,
    group: Option<String>,
    before: Shown,
    /// For a change of the whole store: the flush and eviction counts before.
    counters: (u64, u64),
}

/// How readers may see a group while writes fail; see [`Undo::durable_view`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum View {
    /// No write that is not durable changed it: memory is the disk.
    Memory,
    /// It had no entry before the oldest such write: empty.
    Absent,
    /// It is as it was before the oldest such write, in the same generation.
    Was(Shown),
    /// Such a write changed its generation (a flush, an eviction, a
    /// re-creation): sled may hold another generation's messages under its
    /// offsets, so it cannot be read until the store has recovered.
    Unsettled,
}

/// What a rollback must do for one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rollback {
    /// The group as the disk held it durably.
    pub(crate) durable: Shown,
    /// The highest generation the group had in memory since: the rollback
    /// moves it above, so no (epoch, offset) handed out is used again.
    pub(crate) newest: u64,
}

/// The log; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct Undo {
    entries: VecDeque<Entry>,
}

impl Undo {
    /// Records that write `seq` changes `group`, which was `before`.
    pub(crate) fn record(&mut self, seq: u64, group: &str, before: Shown) {
        self.entries.push_back(Entry {
            seq,
            group: Some(group.to_owned()),
            before,
            counters: (0, 0),
        });
    }

    /// Records that write `seq` changes the epoch of groups without an entry
    /// (or of every group), with the flush and eviction counts before it.
    pub(crate) fn record_store(&mut self, seq: u64, flushes: u64, evictions: u64) {
        self.entries.push_back(Entry {
            seq,
            group: None,
            before: Shown::default(),
            counters: (flushes, evictions),
        });
    }

    /// The flush and eviction counts as the disk holds them, when a change
    /// of the whole store is not durable.
    pub(crate) fn durable_counters(&self) -> Option<(u64, u64)> {
        self.entries.iter().find(|e| e.group.is_none()).map(|e| e.counters)
    }

    /// Forgets the writes up to `durable`: they can no longer be rolled back.
    pub(crate) fn forget_durable(&mut self, durable: u64) {
        while self.entries.front().is_some_and(|e| e.seq <= durable) {
            self.entries.pop_front();
        }
    }

    /// Forgets everything (the store reloaded its memory from disk).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    /// How `group` stands on disk as far as readers may know, given that
    /// every write recorded here is not durable, and that the group has
    /// generation `current` in memory (`None`: no entry). Only the group's
    /// own writes count: a change of the whole store changes its epoch
    /// through the counters (see [`Undo::durable_counters`]), not what sled
    /// holds for it.
    pub(crate) fn durable_view(&self, group: &str, current: Option<u64>) -> View {
        let mut own = self
            .entries
            .iter()
            .filter(|e| e.group.as_deref() == Some(group))
            .map(|e| e.before);
        let Some(first) = own.next() else {
            return View::Memory;
        };
        if !first.exists {
            return View::Absent;
        }
        let same = |s: Shown| s.exists && s.generation == first.generation;
        if own.all(same) && current == Some(first.generation) {
            View::Was(first)
        } else {
            View::Unsettled
        }
    }

    /// Every group a write after `durable` (and up to `upto`) changed, with
    /// what its rollback needs. `current` gives a group's generation in
    /// memory now.
    pub(crate) fn plan(
        &self,
        durable: u64,
        upto: u64,
        current: impl Fn(&str) -> Option<u64>,
    ) -> BTreeMap<String, Rollback> {
        let mut plan: BTreeMap<String, Rollback> = BTreeMap::new();
        for e in self.entries.iter().filter(|e| e.seq > durable && e.seq <= upto) {
            let Some(group) = &e.group else { continue };
            let r = plan.entry(group.clone()).or_insert(Rollback {
                durable: e.before,
                newest: current(group).unwrap_or(0),
            });
            r.newest = r.newest.max(e.before.generation);
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(generation: u64, last: u64) -> Shown {
        Shown {
            exists: true,
            generation,
            last,
        }
    }

    #[test]
    fn the_view_is_the_state_before_the_oldest_write_not_durable() {
        let mut undo = Undo::default();
        undo.record(3, "g", shown(1, 5));
        undo.record(4, "g", shown(1, 6));
        undo.record(5, "h", Shown::default());
        assert_eq!(undo.durable_view("g", Some(1)), View::Was(shown(1, 5)));
        assert_eq!(undo.durable_view("g", Some(2)), View::Unsettled, "flushed since");
        assert_eq!(undo.durable_view("h", Some(0)), View::Absent);
        assert_eq!(undo.durable_view("other", Some(1)), View::Memory);
        undo.forget_durable(3);
        assert_eq!(undo.durable_view("g", Some(1)), View::Was(shown(1, 6)));
        // An eviction of "e" and its re-creation.
        undo.record_store(6, 0, 4);
        undo.record(6, "e", shown(0, 1));
        undo.record(7, "e", Shown::default());
        assert_eq!(undo.durable_counters(), Some((0, 4)));
        assert_eq!(
            undo.durable_view("other", Some(1)),
            View::Memory,
            "other groups stay readable"
        );
        assert_eq!(undo.durable_view("e", Some(5 << 32)), View::Unsettled);
        undo.forget_durable(7);
        assert_eq!(undo.durable_view("g", Some(1)), View::Memory);
        assert_eq!(undo.durable_counters(), None);
    }

    #[test]
    fn the_plan_keeps_the_durable_state_and_the_newest_generation() {
        let mut undo = Undo::default();
        undo.record(2, "g", shown(1, 9));
        undo.record(3, "g", shown(1, 10)); // then flushed to generation 2
        undo.record(4, "g", shown(2, 0));
        undo.record(5, "new", Shown::default());
        let plan = undo.plan(2, u64::MAX, |g| (g == "g").then_some(2));
        assert_eq!(
            plan["g"],
            Rollback {
                durable: shown(1, 10),
                newest: 2
            }
        );
        assert_eq!(
            plan["new"],
            Rollback {
                durable: Shown::default(),
                newest: 0
            }
        );
        assert_eq!(plan.len(), 2);
    }
}
