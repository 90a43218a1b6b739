//! Opening a store: the directory and sled's lock (retried briefly, since a
//! store just dropped may still hold it), the format marker, and loading every
//! group's head and retained sizes into memory.

use std::collections::HashMap;
use std::path::Path;

use crate::config::SledConfig;
use crate::error::SledError;
use crate::group::GroupState;
use crate::layout::*;

pub(crate) fn open_db(config: &SledConfig) -> Result<sled::Db, SledError> {
    let path = &config.path;
    if path.exists() && !path.is_dir() {
        return Err(SledError::Unusable(
            path.clone(),
            "it is a file, not a directory".into(),
        ));
    }
    if !path.exists() {
        // History is the users' messages: only the server's own user may
        // read it. Parents created on the way get the same mode.
        let mut dir = std::fs::DirBuilder::new();
        dir.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut dir, 0o700);
        dir.create(path)
            .map_err(|e| SledError::Unusable(path.clone(), e.to_string()))?;
    }
    // sled releases its lock file from a background thread a moment after a
    // `Db` is dropped, so a store reopened at once in the same process may find
    // it still held: retry briefly before calling the directory locked.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match try_open(config) {
            Err(SledError::Locked(..)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

pub(crate) fn try_open(config: &SledConfig) -> Result<sled::Db, SledError> {
    let path = &config.path;
    sled::Config::new()
        .path(path)
        .cache_capacity(config.cache_bytes)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None)
        .open()
        .map_err(|err| match &err {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") => {
                SledError::Locked(path.clone(), err)
            }
            sled::Error::Io(io) => SledError::Unusable(path.clone(), io.to_string()),
            _ => SledError::sled(path, err),
        })
}

/// Checks the format marker, writing it into a new, empty store.
pub(crate) fn check_format(db: &sled::Db, path: &Path) -> Result<(String, u64), SledError> {
    let s = |e| SledError::sled(path, e);
    match db.get(KEY_FORMAT).map_err(s)? {
        Some(found) if &*found == FORMAT.as_bytes() => {}
        Some(found) => {
            return Err(SledError::Incompatible {
                path: path.to_owned(),
                found: String::from_utf8_lossy(&found).into_owned(),
                expected: FORMAT,
            })
        }
        None if db.is_empty() => {
            let instance = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
            db.insert(KEY_INSTANCE, instance.as_bytes()).map_err(s)?;
            db.insert(KEY_FLUSHES, &0u64.to_be_bytes()).map_err(s)?;
            db.insert(KEY_FORMAT, FORMAT.as_bytes()).map_err(s)?;
            db.flush().map_err(s)?;
        }
        None => return Err(SledError::Foreign(path.to_owned())),
    }
    let instance = db
        .get(KEY_INSTANCE)
        .map_err(s)?
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .ok_or(SledError::Foreign(path.to_owned()))?;
    let flushes = db
        .get(KEY_FLUSHES)
        .map_err(s)?
        .and_then(|v| u64_at(&v, 0))
        .ok_or(SledError::Foreign(path.to_owned()))?;
    Ok((instance, flushes))
}

/// Reads every group's head and retained sizes.
pub(crate) fn load_groups(db: &sled::Db, path: &Path) -> Result<HashMap<String, GroupState>, SledError> {
    let s = |e| SledError::sled(path, e);
    let mut groups: HashMap<String, GroupState> = HashMap::new();
    for item in db.scan_prefix([GROUP_PREFIX]) {
        let (k, v) = item.map_err(s)?;
        let name = String::from_utf8_lossy(&k[1..]).into_owned();
        let corrupt = || SledError::Corrupt {
            path: path.to_owned(),
            group: name.clone(),
            what: "group head",
        };
        let generation = u64_at(&v, 0).ok_or_else(corrupt)?;
        let last = u64_at(&v, 8).ok_or_else(corrupt)?;
        groups.insert(
            name.clone(),
            GroupState {
                generation,
                last,
                first: last + 1,
                stored_last: Some(last),
                ..GroupState::default()
            },
        );
    }
    for item in db.scan_prefix([MESSAGE_PREFIX]) {
        let (k, v) = item.map_err(s)?;
        let len = k.get(1..3).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize);
        let parsed = len.and_then(|len| {
            let name = std::str::from_utf8(k.get(3..3 + len)?).ok()?;
            let offset = u64_at(&k, 3 + len)?;
            Some((name.to_owned(), offset))
        });
        let Some((name, offset)) = parsed else {
            return Err(SledError::Corrupt {
                path: path.to_owned(),
                group: String::from_utf8_lossy(&k).into_owned(),
                what: "message key",
            });
        };
        let Some((_, ts, _meta, payload)) = decode_message(&v) else {
            return Err(SledError::Corrupt {
                path: path.to_owned(),
                group: name,
                what: "message",
            });
        };
        let g = groups.entry(name).or_default();
        if g.retained.is_empty() {
            g.first = offset;
        }
        g.last = g.last.max(offset);
        g.bytes += payload.len() as u64;
        g.retained.push_back((payload.len() as u64, ts));
    }
    Ok(groups)
}

/// How many groups the total budget evicted, as stored (0 when the key is
/// absent: stores written before it existed).
pub(crate) fn load_evictions(db: &sled::Db, path: &Path) -> Result<u64, SledError> {
    Ok(db
        .get(KEY_EVICTIONS)
        .map_err(|e| SledError::sled(path, e))?
        .and_then(|v| u64_at(&v, 0))
        .unwrap_or(0))
}

/// Writes a head for every group that has messages but none (a crash after
/// a new group's first message, before its head), in a generation no entry
/// of that name has had: from then on every group on disk has its head, which
/// a rollback after disk trouble relies on to tell generations apart.
pub(crate) fn write_missing_heads(
    db: &sled::Db,
    groups: &mut HashMap<String, GroupState>,
    fresh: u64,
    path: &Path,
) -> Result<(), SledError> {
    let s = |e| SledError::sled(path, e);
    let mut wrote = false;
    for (name, g) in groups.iter_mut().filter(|(_, g)| g.stored_last.is_none()) {
        g.generation = fresh;
        g.stored_last = Some(g.last);
        db.insert(group_key(name), &group_value(g.generation, g.last))
            .map_err(s)?;
        wrote = true;
    }
    if wrote {
        db.flush().map_err(s)?;
    }
    Ok(())
}
