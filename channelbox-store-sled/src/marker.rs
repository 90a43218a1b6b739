//! Disk trouble across a restart: what lets a store that was failing, and
//! was dropped or killed before it recovered by itself, still roll back.
//!
//! Two pieces, both written before anyone can observe a failed write:
//! - **The batch record.** The writer thread writes, as the first operation
//!   of every batch (of every write, with `CommitMode::PerAppend`), the
//!   key `\x00undo`: the batch's number and what undoing it needs — every
//!   group it changes, as it was durably, and the store's counters. sled
//!   recovers a prefix of its log, so whenever any operation of a batch
//!   survives, so does its record. It shares the batch's flush: no extra
//!   `fsync`.
//! - **The failure mark.** Before a failed batch's writes are answered, the
//!   writer creates an empty file `.rollback-N` (N the batch's number) in
//!   the store's directory and syncs the directory. An empty file needs no
//!   data block, only an inode and a directory entry, so this works on a
//!   full disk where sled's log cannot grow.
//!
//! Opening a directory that holds a mark settles it before anything else:
//! if the stored record is the failed batch's, its writes may have reached
//! the disk, and the rollback of `recover.rs` undoes them; in any case the
//! store takes a new instance id, so every epoch it had is new (the failed
//! batch's groups, and offsets it handed out, are no longer known). Without
//! a mark — a SIGKILL with no disk trouble — opening changes nothing: same
//! epochs, same offsets.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::SledError;
use crate::layout::{u64_at, KEY_EVICTIONS, KEY_FLUSHES, KEY_INSTANCE, KEY_UNDO};
use crate::recover::roll_back;
use crate::undo::{Rollback, Shown};

const MARK_PREFIX: &str = ".rollback-";

/// A batch record as stored.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) batch: u64,
    pub(crate) flushes: u64,
    pub(crate) evictions: u64,
    pub(crate) plan: BTreeMap<String, Rollback>,
}

/// Encodes a batch record: number, counters, then per group its name (u16
/// length first), whether it existed, its durable generation and newest
/// offset, and the newest generation it had.
pub(crate) fn encode(record: &Record) -> Vec<u8> {
    let mut v = Vec::with_capacity(24 + record.plan.len() * 48);
    for n in [record.batch, record.flushes, record.evictions] {
        v.extend_from_slice(&n.to_be_bytes());
    }
    for (name, r) in &record.plan {
        v.extend_from_slice(&(name.len() as u16).to_be_bytes());
        v.extend_from_slice(name.as_bytes());
        v.push(u8::from(r.durable.exists));
        for n in [r.durable.generation, r.durable.last, r.newest] {
            v.extend_from_slice(&n.to_be_bytes());
        }
    }
    v
}

/// Decodes a batch record; `None` if it is malformed.
pub(crate) fn decode(v: &[u8]) -> Option<Record> {
    let mut record = Record {
        batch: u64_at(v, 0)?,
        flushes: u64_at(v, 8)?,
        evictions: u64_at(v, 16)?,
        plan: BTreeMap::new(),
    };
    let mut at = 24;
    while at < v.len() {
        let len = u16::from_be_bytes(v.get(at..at + 2)?.try_into().ok()?) as usize;
        let name = std::str::from_utf8(v.get(at + 2..at + 2 + len)?).ok()?;
        at += 2 + len;
        let durable = Shown {
            exists: *v.get(at)? == 1,
            generation: u64_at(v, at + 1)?,
            last: u64_at(v, at + 9)?,
        };
        let newest = u64_at(v, at + 17)?;
        at += 25;
        record.plan.insert(name.to_owned(), Rollback { durable, newest });
    }
    Some(record)
}

/// The number of the newest batch whose record is on disk (0 if none).
pub(crate) fn stored_batch(db: &sled::Db, path: &Path) -> Result<u64, SledError> {
    let v = db.get(KEY_UNDO).map_err(|e| SledError::sled(path, e))?;
    Ok(v.and_then(|v| u64_at(&v, 0)).unwrap_or(0))
}

/// Makes durable that batch `batch` failed: an empty file, and the
/// directory synced.
pub(crate) fn mark_failed(dir: &Path, batch: u64) -> std::io::Result<()> {
    std::fs::File::create(dir.join(format!("{MARK_PREFIX}{batch}")))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The newest failed batch marked in `dir`, if any.
fn marked(dir: &Path) -> std::io::Result<Option<u64>> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let batch = name
            .to_str()
            .and_then(|n| n.strip_prefix(MARK_PREFIX)?.parse::<u64>().ok());
        newest = newest.max(batch);
    }
    Ok(newest)
}

/// Removes every failure mark (the rollback they ask for is durable).
pub(crate) fn clear_marks(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_str().is_some_and(|n| n.starts_with(MARK_PREFIX)) {
            std::fs::remove_file(entry.path())?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

/// At opening: if the store was failing when it last stopped, rolls back the
/// failed batch where its record shows it may have reached the disk, and
/// gives the store a new instance id. Running it again (a crash meanwhile)
/// changes nothing more than another instance id.
pub(crate) fn settle(db: &sled::Db, path: &Path) -> Result<(), SledError> {
    let io = |e: std::io::Error| SledError::Unusable(path.to_owned(), e.to_string());
    let s = |e| SledError::sled(path, e);
    let Some(failed) = marked(path).map_err(io)? else {
        return Ok(());
    };
    let record = db.get(KEY_UNDO).map_err(s)?.and_then(|v| decode(&v));
    if let Some(r) = record.filter(|r| r.batch == failed) {
        let counters = [(KEY_FLUSHES, r.flushes), (KEY_EVICTIONS, r.evictions)];
        roll_back(db, &r.plan, &counters).map_err(s)?;
    }
    let instance = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    db.insert(KEY_INSTANCE, instance.as_bytes()).map_err(s)?;
    db.flush().map_err(s)?;
    tracing::warn!(path = %path.display(), "history store was failing when it stopped: rolled back, every group is in a new epoch");
    clear_marks(path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_decodes_to_what_was_encoded() {
        let record = Record {
            batch: 7,
            flushes: 2,
            evictions: 3,
            plan: BTreeMap::from([
                (
                    "g".to_owned(),
                    Rollback {
                        durable: Shown {
                            exists: true,
                            generation: 4,
                            last: 9,
                        },
                        newest: 5,
                    },
                ),
                (
                    "new".to_owned(),
                    Rollback {
                        durable: Shown::default(),
                        newest: 0,
                    },
                ),
            ]),
        };
        assert_eq!(decode(&encode(&record)), Some(record));
        assert_eq!(decode(&[1, 2, 3]), None);
    }

    #[test]
    fn marks_are_found_newest_first_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(marked(dir.path()).unwrap(), None);
        mark_failed(dir.path(), 3).unwrap();
        mark_failed(dir.path(), 12).unwrap();
        assert_eq!(marked(dir.path()).unwrap(), Some(12));
        clear_marks(dir.path()).unwrap();
        assert_eq!(marked(dir.path()).unwrap(), None);
    }
}
