//! The whole store's history budget ([`HistoryLimits::max_total_bytes`]): a
//! ledger of what every group's retained messages cost, and of which group was
//! written least recently, so that a store over budget trims that group first,
//! oldest messages first, exactly as a per-group budget trims.
//!
//! Stores keep one [`TotalBudget`] under their own lock, charge it on every
//! append, release it on every trim, and ask [`TotalBudget::next_victim`]
//! while it is over. A group that loses all its messages this way is evicted
//! whole: its entry (head, generation) goes too, so the number of groups a
//! store remembers is bounded by the budget. An evicted group must come back
//! in an epoch it never had, or a client's old offsets would pass for new
//! ones. So a group's generation has two halves: the high 32 bits are the
//! store's eviction count when its entry was created
//! ([`TotalBudget::fresh_generation`]), the low 32 bits count its flushes
//! since. Flushing one group never changes another's epoch, and a group that
//! was never written keeps its epoch until an eviction happens.
//!
//! [`HistoryLimits::max_total_bytes`]: crate::HistoryLimits::max_total_bytes

use std::collections::{BTreeMap, HashMap};

/// What one group entry costs against the budget besides its messages: the
/// store's map entry, head and bookkeeping.
pub const GROUP_COST: u64 = 256;

/// A store's groups as [`TotalBudget::enforce`] trims them.
pub trait BudgetedGroups {
    /// How many messages `group` retains; `None` when the store has no entry
    /// for it.
    fn retained(&self, group: &str) -> Option<usize>;

    /// Removes the oldest retained message of `group`; returns what it cost.
    fn remove_oldest(&mut self, group: &str) -> u64;

    /// Drops the entry of `group`, which has no messages left. `evictions` is
    /// the store's eviction count once this one is counted (what a persistent
    /// store saves before the removal).
    fn evict(&mut self, group: &str, evictions: u64);
}

/// The ledger of a store's whole-history budget; see the module docs.
#[derive(Debug, Default, Clone)]
pub struct TotalBudget {
    limit: Option<u64>,
    used: u64,
    /// Write sequence numbers, increasing; a group's is its last append's.
    writes: u64,
    by_write: BTreeMap<u64, String>,
    last_write: HashMap<String, u64>,
    /// Groups evicted over the store's life.
    evictions: u64,
}

impl TotalBudget {
    /// A ledger for this limit (`None`: unbounded, only counted).
    pub fn new(limit: Option<u64>) -> Self {
        TotalBudget {
            limit,
            ..TotalBudget::default()
        }
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Whether the charges exceed the limit.
    pub fn over(&self) -> bool {
        self.limit.is_some_and(|l| self.used > l)
    }

    /// Charges `cost` for a message appended to `group` (and [`GROUP_COST`]
    /// the first time the group is seen); the group becomes the most recently
    /// written.
    pub fn charge(&mut self, group: &str, cost: u64) {
        self.writes += 1;
        match self.last_write.insert(group.to_owned(), self.writes) {
            Some(previous) => {
                self.by_write.remove(&previous);
            }
            None => self.used += GROUP_COST,
        }
        self.by_write.insert(self.writes, group.to_owned());
        self.used += cost;
    }

    /// Gives back the cost of a removed message.
    pub fn release(&mut self, cost: u64) {
        self.used = self.used.saturating_sub(cost);
    }

    /// Forgets a group whose entry the store dropped (evicted or flushed),
    /// giving back [`GROUP_COST`]; its messages' costs must be released first.
    pub fn forget(&mut self, group: &str) {
        if let Some(write) = self.last_write.remove(group) {
            self.by_write.remove(&write);
            self.used = self.used.saturating_sub(GROUP_COST);
        }
    }

    /// Forgets every group and charge (a flush of the whole store).
    pub fn clear(&mut self) {
        self.used = 0;
        self.by_write.clear();
        self.last_write.clear();
    }

    /// The group to trim next while over budget: the least recently written.
    pub fn next_victim(&self) -> Option<&str> {
        self.by_write.values().next().map(String::as_str)
    }

    /// Trims `groups` while over budget: the group written least recently
    /// loses its oldest messages first, and one left without messages is
    /// evicted whole. `current` (just written) keeps its newest message.
    pub fn enforce(&mut self, current: &str, groups: &mut impl BudgetedGroups) {
        while self.over() {
            let Some(victim) = self.next_victim().map(str::to_owned) else {
                return;
            };
            let keep = usize::from(victim == current);
            match groups.retained(&victim) {
                None => {
                    self.forget(&victim);
                    continue;
                }
                Some(n) if n > keep => {
                    let cost = groups.remove_oldest(&victim);
                    self.release(cost);
                    if n > 1 || keep == 1 {
                        continue;
                    }
                }
                Some(_) if keep == 1 => return,
                Some(_) => {}
            }
            groups.evict(&victim, self.evictions + 1);
            self.forget(&victim);
            self.evicted();
        }
    }

    /// The generation of a group entry created now (and the one a group that
    /// has no entry reports).
    pub fn fresh_generation(&self) -> u64 {
        self.evictions << 32
    }

    /// Counts an eviction: entries created from now on get generations no
    /// entry had before.
    pub fn evicted(&mut self) {
        self.evictions += 1;
    }

    /// Evictions so far (what a persistent store saves).
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Makes the eviction count at least `at_least`, and at least what the
    /// generation of an existing entry implies (when a store reopens).
    pub fn restore_evictions(&mut self, at_least: u64, generation: u64) {
        self.evictions = self.evictions.max(at_least).max(generation >> 32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_written_group_is_the_victim() {
        let mut b = TotalBudget::new(Some(2 * GROUP_COST + 100));
        b.charge("a", 40);
        b.charge("b", 40);
        assert!(!b.over());
        b.charge("a", 40);
        assert!(b.over(), "{} used", b.used());
        assert_eq!(b.next_victim(), Some("b"), "a was written since");
        b.release(40);
        assert!(!b.over());
        b.forget("b");
        assert_eq!((b.used(), b.next_victim()), (GROUP_COST + 80, Some("a")));
    }

    #[test]
    fn entries_created_after_an_eviction_get_new_generations() {
        let mut b = TotalBudget::new(None);
        let first = b.fresh_generation();
        // A group flushed many times stays below the next eviction's range.
        let flushed = first + 1_000;
        b.evicted();
        assert!(b.fresh_generation() > flushed);
        b.restore_evictions(0, 5 << 32);
        assert_eq!(b.evictions(), 5);
        b.restore_evictions(7, 0);
        assert_eq!(b.fresh_generation(), 7 << 32);
    }
}
