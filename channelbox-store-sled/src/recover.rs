//! Disk trouble: when a write or flush fails (a full disk, an I/O error),
//! sled refuses every later operation, and the store refuses appends
//! (`unavailable` to clients) while reads of what is durable go on
//! (`visible.rs`). The writer thread then tries, once a second, to reopen the
//! database here.
//!
//! Reopening rolls back every write that was not durable — its caller was
//! answered `unavailable`, so it must have had no effect: no message kept — and
//! moves every group such a write touched to a generation it never had, so
//! that no (epoch, offset) is ever used for two messages. Offsets of a failed
//! append may have been seen: the box's sequencer skips them, and a `welcome`
//! may name one as the group's position. The rollback is keyed by generation,
//! from the undo log (`undo.rs`): a group keeps exactly the messages of the
//! generation it had durably, up to its durable newest offset, whatever
//! flushes, evictions or re-creations of the same name failed after. It is
//! applied as one atomic sled batch, so a crash during it leaves the disk
//! as before it. Nothing acknowledged is lost: an acknowledged message was
//! durable before the failure.

use std::collections::{BTreeMap, HashMap};
use std::sync::PoisonError;

use crate::error::SledError;
use crate::group::{GroupState, State};
use crate::layout::{group_key, group_value, message_key, u64_at, KEY_EVICTIONS, KEY_FLUSHES, KEY_UNDO};
use crate::marker::{clear_marks, encode, mark_failed, Record};
use crate::open::{check_format, load_evictions, load_groups, open_db};
use crate::store::{lock, Inner};
use crate::undo::Rollback;
use crate::writer::{Disk, Op};

impl Disk for Inner {
    fn with_db<R>(&self, f: impl FnOnce(&sled::Db) -> R) -> Option<R> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        db.as_ref().map(f)
    }

    fn record(&self, batch: u64, durable: u64, upto: u64) -> Op {
        let mut state = lock(&self.state);
        state.undo.forget_durable(durable);
        let plan = state
            .undo
            .plan(durable, upto, |g| state.groups.get(g).map(|g| g.generation));
        let record = Record {
            batch,
            flushes: state.flushes,
            evictions: state.budget.evictions(),
            plan,
        };
        Op::Insert(KEY_UNDO.to_vec(), encode(&record))
    }

    fn mark_failed(&self, batch: u64) -> std::io::Result<()> {
        mark_failed(&self.path, batch)
    }

    fn reopen(&self, durable: u64) -> Result<u64, SledError> {
        // The old database serves reads meanwhile: let it go only once the
        // disk takes writes again.
        probe_space(&self.path).map_err(|e| SledError::Unusable(self.path.clone(), e.to_string()))?;
        // What to roll back is taken under the store's lock, and the disk
        // work done without it, so that readers (on async workers) never wait
        // for sled's recovery: while failing, no write changes the undo log
        // or the counters.
        let (plan, counters) = {
            let state = lock(&self.state);
            if state.closed {
                return Err(SledError::Closed(self.path.clone()));
            }
            let plan = state
                .undo
                .plan(durable, u64::MAX, |g| state.groups.get(g).map(|g| g.generation));
            // The counters never go back either: epochs handed out under a
            // flush count or eviction count that failed must stay unused.
            let counters = [(KEY_FLUSHES, state.flushes), (KEY_EVICTIONS, state.budget.evictions())];
            (plan, counters)
        };
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        drop(slot.take());
        let db = open_db(&self.config)?;
        let loaded = self.settle(&db, &plan, &counters);
        // Reads go on from the reopened database even if this attempt
        // failed: what readers see comes from the undo log, which holds until
        // a rollback succeeds, and sled holds the durable messages under it.
        *slot = Some(db);
        drop(slot);
        let (instance, flushes, groups, evictions) = loaded?;
        let mut state = lock(&self.state);
        state.instance = instance;
        state.flushes = flushes;
        state.budget = State::budget_of(&groups, &self.limits, evictions);
        state.groups = groups;
        state.undo.clear();
        state.flushed_all_seq = 0;
        state.evicted_seq = 0;
        // Under the store's lock, as appends push under it.
        let discarded = self.writer.discard_queued();
        drop(state);
        // The rollback is durable: a restart need not repeat it. A mark left
        // behind only costs a new instance id at the next opening.
        if let Err(err) = clear_marks(&self.path) {
            tracing::warn!(error = %err, "history store: cannot remove its failure mark");
        }
        Ok(discarded)
    }
}

/// What a reopened database holds once rolled back: instance id, flush
/// count, groups, eviction count.
type Loaded = (String, u64, HashMap<String, GroupState>, u64);

impl Inner {
    /// Rolls back on the reopened database, makes it durable, and loads it.
    fn settle(
        &self,
        db: &sled::Db,
        plan: &BTreeMap<String, Rollback>,
        counters: &[(&[u8], u64)],
    ) -> Result<Loaded, SledError> {
        if self.writer.reopen_fault() {
            return Err(SledError::Unusable(
                self.path.clone(),
                "injected failure of the rollback".into(),
            ));
        }
        roll_back(db, plan, counters).map_err(|e| SledError::sled(&self.path, e))?;
        db.flush().map_err(|e| SledError::sled(&self.path, e))?;
        let (instance, flushes) = check_format(db, &self.path)?;
        let groups = load_groups(db, &self.path)?;
        let evictions = load_evictions(db, &self.path)?;
        Ok((instance, flushes, groups, evictions))
    }
}

/// Room for this much must be on the disk before a failing store reopens:
/// sled preallocates segments of its log, so less would fail again at once.
const PROBE_BYTES: usize = 4 << 20;

/// Whether the disk takes writes again: a probe file written, synced and
/// removed.
fn probe_space(dir: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let probe = dir.join(".space-probe");
    let written = std::fs::File::create(&probe).and_then(|mut f| {
        f.write_all(&vec![0u8; PROBE_BYTES])?;
        f.sync_all()
    });
    let removed = std::fs::remove_file(&probe);
    written.and(removed)
}

/// Brings every group of `plan` back to its durable state in a new
/// generation, and raises the `counters` to at least these values, in one
/// atomic batch.
///
/// A group whose head on disk still has its durable generation keeps its
/// messages up to its durable newest offset (a failed trim may have removed
/// some of the oldest, which a trim may do). Any other head means that a
/// failed flush or eviction reached the disk, and they remove a generation's
/// messages before its head: nothing of the durable generation is left, and
/// what is there belongs to a generation that never became durable.
pub(crate) fn roll_back(
    db: &sled::Db,
    plan: &BTreeMap<String, Rollback>,
    counters: &[(&[u8], u64)],
) -> sled::Result<()> {
    let mut batch = sled::Batch::default();
    for (name, r) in plan {
        let on_disk = db.get(group_key(name))?.and_then(|v| u64_at(&v, 0));
        let newest = r.newest.max(r.durable.generation);
        if on_disk.is_some_and(|generation| generation > newest) {
            // A generation the group never had in memory: this rollback
            // reached the disk before reopening failed, and is done.
            continue;
        }
        let keep = match on_disk {
            Some(generation) if r.durable.exists && generation == r.durable.generation => r.durable.last,
            _ => 0,
        };
        for key in db
            .range(message_key(name, keep + 1)..=message_key(name, u64::MAX))
            .keys()
        {
            batch.remove(key?);
        }
        let newest = newest.max(on_disk.unwrap_or(0));
        batch.insert(group_key(name), &group_value(newest + 1, keep));
    }
    for &(key, at_least) in counters {
        let stored = db.get(key)?.and_then(|v| u64_at(&v, 0)).unwrap_or(0);
        if stored < at_least {
            batch.insert(key, &at_least.to_be_bytes());
        }
    }
    db.apply_batch(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::message_prefix;
    use crate::undo::Shown;

    fn durable(generation: u64, last: u64) -> Shown {
        Shown {
            exists: true,
            generation,
            last,
        }
    }

    fn head(db: &sled::Db, group: &str) -> (Option<u64>, Option<u64>) {
        let v = db.get(group_key(group)).unwrap().unwrap();
        (u64_at(&v, 0), u64_at(&v, 8))
    }

    #[test]
    fn a_group_keeps_its_durable_messages_in_a_new_generation() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        for offset in 1..=10 {
            db.insert(message_key("g", offset), b"m".to_vec()).unwrap();
            db.insert(message_key("other", offset), b"m".to_vec()).unwrap();
        }
        db.insert(group_key("g"), &group_value(3, 1)).unwrap();
        db.insert(KEY_FLUSHES, &2u64.to_be_bytes()).unwrap();
        let plan = BTreeMap::from([(
            "g".to_owned(),
            Rollback {
                durable: durable(3, 6),
                newest: 3,
            },
        )]);
        roll_back(&db, &plan, &[(KEY_FLUSHES, 5), (KEY_EVICTIONS, 0)]).unwrap();
        // Reopening may fail after the rollback reached the disk, and then
        // runs it again: it must change nothing more.
        roll_back(&db, &plan, &[(KEY_FLUSHES, 5), (KEY_EVICTIONS, 0)]).unwrap();
        assert_eq!(db.scan_prefix(message_prefix("g")).count(), 6, "7..=10 are gone");
        assert!(db.get(message_key("g", 6)).unwrap().is_some());
        assert_eq!(
            db.scan_prefix(message_prefix("other")).count(),
            10,
            "other groups untouched"
        );
        assert_eq!(
            head(&db, "g"),
            (Some(4), Some(6)),
            "a new generation, the durable offset"
        );
        assert_eq!(u64_at(&db.get(KEY_FLUSHES).unwrap().unwrap(), 0), Some(5));
        assert!(db.get(KEY_EVICTIONS).unwrap().is_none(), "0 is not written");
    }

    #[test]
    fn a_failed_flush_that_reached_the_disk_leaves_no_message_of_its_generation() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        // The flush to generation 4 reached the disk, then offsets 1..=2 of it.
        db.insert(group_key("g"), &group_value(4, 0)).unwrap();
        for offset in 1..=2 {
            db.insert(message_key("g", offset), b"new".to_vec()).unwrap();
        }
        let plan = BTreeMap::from([(
            "g".to_owned(),
            Rollback {
                durable: durable(3, 6),
                newest: 4,
            },
        )]);
        roll_back(&db, &plan, &[]).unwrap();
        assert_eq!(db.scan_prefix(message_prefix("g")).count(), 0);
        assert_eq!(head(&db, "g"), (Some(5), Some(0)));
    }

    #[test]
    fn a_group_created_by_a_failed_write_is_kept_empty_in_a_new_generation() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        db.insert(message_key("g", 1), b"failed".to_vec()).unwrap();
        let plan = BTreeMap::from([(
            "g".to_owned(),
            Rollback {
                durable: Shown::default(),
                newest: 7 << 32,
            },
        )]);
        roll_back(&db, &plan, &[]).unwrap();
        assert_eq!(db.scan_prefix(message_prefix("g")).count(), 0);
        assert_eq!(head(&db, "g"), (Some((7 << 32) + 1), Some(0)));
    }
}
