//! Disk trouble: when a write or flush fails (a full disk, an I/O error),
//! sled refuses every later operation, and the store refuses appends
//! (`unavailable` to clients) while reads of what it acknowledged go on.
//! The writer thread then tries, once a second, to reopen the database here.
//! Reopening rolls back every message that was written but never
//! acknowledged — its publisher was answered `unavailable`, so it must have
//! had no effect: no message kept, no offset used — reloads the store's
//! memory from disk, and lets appends resume. Nothing acknowledged is lost:
//! an acknowledged message was flushed before the failure, and the rollback
//! removes only offsets above the last acknowledged one of each group.

use std::sync::PoisonError;

use crate::error::SledError;
use crate::group::State;
use crate::layout::{group_key_of_prefix, group_value, u64_at};
use crate::open::{check_format, load_evictions, load_groups, open_db};
use crate::store::{lock, Inner};
use crate::writer::{Disk, Lost};

impl Disk for Inner {
    fn with_db<R>(&self, f: impl FnOnce(&sled::Db) -> R) -> Option<R> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        db.as_ref().map(f)
    }

    fn reopen(&self, lost: &Lost) -> Result<u64, SledError> {
        // The old database serves reads meanwhile: let it go only once the
        // disk takes writes again.
        probe_space(&self.path).map_err(|e| SledError::Unusable(self.path.clone(), e.to_string()))?;
        // The store's lock first, as appends take it before the writer's.
        let mut state = lock(&self.state);
        if state.closed {
            return Err(SledError::Closed(self.path.clone()));
        }
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        drop(slot.take());
        let db = open_db(&self.config)?;
        roll_back(&db, lost).map_err(|e| SledError::sled(&self.path, e))?;
        db.flush().map_err(|e| SledError::sled(&self.path, e))?;
        let (instance, flushes) = check_format(&db, &self.path)?;
        let groups = load_groups(&db, &self.path)?;
        let evictions = load_evictions(&db, &self.path)?;
        state.instance = instance;
        state.flushes = flushes;
        state.budget = State::budget_of(&groups, &self.limits, evictions);
        state.groups = groups;
        let discarded = self.writer.discard_queued();
        *slot = Some(db);
        Ok(discarded)
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

/// Removes each group's messages from its lowest unacknowledged offset on,
/// and brings its head back below that offset.
fn roll_back(db: &sled::Db, lost: &Lost) -> sled::Result<()> {
    for (prefix, &first) in lost {
        let mut from = prefix.clone();
        from.extend_from_slice(&first.to_be_bytes());
        let mut to = prefix.clone();
        to.extend_from_slice(&u64::MAX.to_be_bytes());
        let keys: Vec<sled::IVec> = db.range(from..=to).keys().collect::<sled::Result<_>>()?;
        for key in keys {
            db.remove(key)?;
        }
        let head = group_key_of_prefix(prefix);
        if let Some(value) = db.get(&head)? {
            let (generation, last) = (u64_at(&value, 0), u64_at(&value, 8));
            if let (Some(generation), Some(last)) = (generation, last) {
                if last >= first {
                    db.insert(&head, &group_value(generation, first - 1))?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{group_key, message_key, message_prefix};

    #[test]
    fn roll_back_removes_unacknowledged_offsets_and_lowers_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        for offset in 1..=10 {
            db.insert(message_key("g", offset), b"m".to_vec()).unwrap();
            db.insert(message_key("other", offset), b"m".to_vec()).unwrap();
        }
        db.insert(group_key("g"), &group_value(3, 10)).unwrap();
        let lost = Lost::from([(message_prefix("g"), 7)]);
        roll_back(&db, &lost).unwrap();
        assert_eq!(
            db.scan_prefix(message_prefix("g")).count(),
            6,
            "offsets 7..=10 are gone"
        );
        assert!(db.get(message_key("g", 6)).unwrap().is_some());
        assert!(db.get(message_key("g", 7)).unwrap().is_none());
        assert_eq!(
            db.scan_prefix(message_prefix("other")).count(),
            10,
            "other groups untouched"
        );
        let head = db.get(group_key("g")).unwrap().unwrap();
        assert_eq!((u64_at(&head, 0), u64_at(&head, 8)), (Some(3), Some(6)));
    }
}
