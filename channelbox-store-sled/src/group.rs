//! What the store keeps in memory: per group its head and the size and
//! timestamp of every retained message (so trimming needs no disk read), and
//! for the whole store the total budget, enforced by evicting the groups
//! written least recently.

use std::collections::{HashMap, VecDeque};

use channelbox_core::{messages_to_trim, now_ms, BudgetedGroups, GroupLimits, HistoryLimits, TotalBudget};

use crate::layout::{group_key, group_value, message_prefix, KEY_EVICTIONS};
use crate::undo::{Shown, Undo};
use crate::writer::Op;

/// What a retained message costs this store besides its payload and its key's
/// group name: the offset and length prefix of its key, the value's header,
/// typical metadata (the sender's id), and sled's own bookkeeping per entry.
/// Counted against `HistoryLimits::max_total_bytes`.
pub const MESSAGE_OVERHEAD: u64 = 112;

/// A group as the store tracks it in memory: its head, and the size and
/// timestamp of every retained message, so trimming needs no disk read.
#[derive(Debug, Default)]
pub(crate) struct GroupState {
    pub(crate) generation: u64,
    pub(crate) last: u64,
    /// Offset of `retained[0]`.
    pub(crate) first: u64,
    pub(crate) bytes: u64,
    pub(crate) retained: VecDeque<(u64, u64)>,
    /// The newest offset the group's head key on disk records; `None` when the
    /// group has no head key yet. Opening takes a group's newest offset from
    /// its head and its messages, whichever is higher, so the head is rewritten
    /// only when that would otherwise be lost: for a new group, and before a
    /// trim removes every message.
    pub(crate) stored_last: Option<u64>,
    /// The sequence number of the newest write that changed the group's
    /// generation or offsets: a reader waits for it to be durable.
    pub(crate) seq: u64,
}

impl GroupState {
    pub(crate) fn first(&self) -> u64 {
        if self.retained.is_empty() {
            self.last + 1
        } else {
            self.first
        }
    }

    /// How many of the oldest retained messages the group's limits remove now.
    pub(crate) fn to_trim(&self, limits: &GroupLimits, now: u64) -> u64 {
        let r = &self.retained;
        messages_to_trim(limits, now, r.len() as u64, self.bytes, |i| r[i as usize])
    }

    /// The operations that write the group's head if the disk would otherwise
    /// lose its generation or newest offset: before its first message, and
    /// before everything retained is removed.
    pub(crate) fn store_head(&mut self, group: &str, emptying: bool, ops: &mut Vec<Op>) {
        if self.stored_last.is_none() || (emptying && self.stored_last != Some(self.last)) {
            ops.push(Op::Insert(
                group_key(group),
                group_value(self.generation, self.last).to_vec(),
            ));
            self.stored_last = Some(self.last);
        }
    }

    /// What the retained messages cost against the total budget.
    pub(crate) fn cost(&self, group: &str) -> u64 {
        self.bytes + self.retained.len() as u64 * (MESSAGE_OVERHEAD + group.len() as u64)
    }

    /// Forgets the `n` oldest retained messages, adding their removal, oldest
    /// first (a crash part way leaves a group without holes). Returns what
    /// they cost against the total budget.
    pub(crate) fn remove_oldest(&mut self, group: &str, n: u64, ops: &mut Vec<Op>) -> u64 {
        if n == 0 {
            return 0;
        }
        let before = self.cost(group);
        self.store_head(group, n >= self.retained.len() as u64, ops);
        let start = self.first();
        ops.push(Op::RemoveOffsets(message_prefix(group), start..start + n));
        for _ in 0..n {
            if let Some((size, _)) = self.retained.pop_front() {
                self.bytes -= size;
            }
        }
        self.first = start + n;
        before - self.cost(group)
    }

    /// Removes what the group's limits ([`HistoryLimits::limits_for`] it)
    /// say must go now; returns what it cost.
    pub(crate) fn trim(&mut self, group: &str, limits: &HistoryLimits, ops: &mut Vec<Op>) -> u64 {
        let n = self.to_trim(&limits.limits_for(group), now_ms());
        self.remove_oldest(group, n, ops)
    }

    /// The newest retained message's timestamp (0 when none): how recently
    /// the group was written, as far as a reopened store can tell.
    pub(crate) fn written_at(&self) -> u64 {
        self.retained.back().map_or(0, |(_, ts)| *ts)
    }
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) instance: String,
    pub(crate) flushes: u64,
    pub(crate) groups: HashMap<String, GroupState>,
    /// The whole store's budget, and the generation counter.
    pub(crate) budget: TotalBudget,
    pub(crate) closed: bool,
    /// What the writes not yet durable changed, for readers and rollbacks.
    pub(crate) undo: Undo,
    /// The newest flush of every group: it changes every group's epoch.
    pub(crate) flushed_all_seq: u64,
    /// The newest write that evicted a group: it changes the epoch of groups
    /// without an entry, and of none other.
    pub(crate) evicted_seq: u64,
}

impl State {
    /// The ledger of a reopened store: groups charged in the order they were
    /// last written, the counter above every generation on disk.
    pub(crate) fn budget_of(
        groups: &HashMap<String, GroupState>,
        limits: &HistoryLimits,
        evictions: u64,
    ) -> TotalBudget {
        let mut budget = TotalBudget::new(limits.max_total_bytes);
        let mut order: Vec<(&String, &GroupState)> = groups.iter().collect();
        order.sort_by_key(|(_, g)| g.written_at());
        for (name, g) in order {
            budget.charge(name, g.cost(name));
            budget.restore_evictions(evictions, g.generation);
        }
        budget.restore_evictions(evictions, 0);
        budget
    }

    /// Applies the total budget after writing `current`, adding the removals
    /// to `ops`; returns the groups it evicted, as they were.
    pub(crate) fn enforce_total(&mut self, current: &str, ops: &mut Vec<Op>) -> Vec<(String, Shown)> {
        let mut groups = Groups {
            groups: &mut self.groups,
            ops,
            evicted: Vec::new(),
        };
        self.budget.enforce(current, &mut groups);
        groups.evicted
    }

    /// Notes write `seq`, which changed `group` (as it was `before`) and
    /// evicted `evicted`: readers of those groups wait for it, and a rollback
    /// knows what it changed.
    pub(crate) fn wrote(&mut self, seq: u64, group: &str, before: Shown, evicted: Vec<(String, Shown)>) {
        self.undo.record(seq, group, before);
        if let Some(g) = self.groups.get_mut(group) {
            g.seq = seq;
        }
        if !evicted.is_empty() {
            let evictions = self.budget.evictions() - evicted.len() as u64;
            self.undo.record_store(seq, self.flushes, evictions);
            self.evicted_seq = seq;
        }
        for (name, was) in evicted {
            self.undo.record(seq, &name, was);
        }
    }

    /// The write a reader of `group` waits for: the newest that changed the
    /// group, or the epoch it has without an entry, or every epoch. A group
    /// with an entry does not wait for other groups' evictions: its epoch
    /// and messages do not depend on them.
    pub(crate) fn wait_seq(&self, group: &str) -> u64 {
        let own = match self.groups.get(group) {
            Some(g) => g.seq,
            None => self.evicted_seq,
        };
        own.max(self.flushed_all_seq)
    }
}

/// The groups as the total budget trims them, writing what it removes.
struct Groups<'a> {
    groups: &'a mut HashMap<String, GroupState>,
    ops: &'a mut Vec<Op>,
    evicted: Vec<(String, Shown)>,
}

impl BudgetedGroups for Groups<'_> {
    fn retained(&self, group: &str) -> Option<usize> {
        self.groups.get(group).map(|g| g.retained.len())
    }

    fn remove_oldest(&mut self, group: &str) -> u64 {
        match self.groups.get_mut(group) {
            Some(g) => g.remove_oldest(group, 1, self.ops),
            None => 0,
        }
    }

    /// The eviction count is stored before the head goes, so that the group
    /// comes back in an epoch it never had even after a crash.
    fn evict(&mut self, group: &str, evictions: u64) {
        self.ops
            .push(Op::Insert(KEY_EVICTIONS.to_vec(), evictions.to_be_bytes().to_vec()));
        self.ops.push(Op::Remove(group_key(group)));
        if let Some(g) = self.groups.remove(group) {
            self.evicted.push((group.to_owned(), Shown::of(Some(&g))));
        }
    }
}
