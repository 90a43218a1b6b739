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
        });
    }

    /// Records that write `seq` changes the epoch of groups without an entry.
    pub(crate) fn record_store(&mut self, seq: u64) {
        self.entries.push_back(Entry {
            seq,
            group: None,
            before: Shown::default(),
        });
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
    /// every write recorded here is not durable: `Ok(None)` when no such write
    /// changed it (memory is the disk), `Ok(Some(before))` for its state before
    /// the oldest one that did, and `Err(())` while a change of the whole store
    /// is not durable (the epoch of every group is uncertain then).
    pub(crate) fn durable_view(&self, group: &str) -> Result<Option<Shown>, ()> {
        if self.entries.iter().any(|e| e.group.is_none()) {
            return Err(());
        }
        Ok(self
            .entries
            .iter()
            .find(|e| e.group.as_deref() == Some(group))
            .map(|e| e.before))
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
        assert_eq!(undo.durable_view("g"), Ok(Some(shown(1, 5))));
        assert_eq!(undo.durable_view("other"), Ok(None));
        undo.forget_durable(3);
        assert_eq!(undo.durable_view("g"), Ok(Some(shown(1, 6))));
        undo.record_store(6);
        assert_eq!(undo.durable_view("other"), Err(()), "a flush of all is pending");
        undo.forget_durable(6);
        assert_eq!(undo.durable_view("g"), Ok(None));
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
