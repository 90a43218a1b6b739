//! The sled store's own failures, converted to `StoreError` at the edge with the
//! path they concern.

use std::path::{Path, PathBuf};

use channelbox_core::{StoreError, StoreErrorKind};

/// What can go wrong on disk.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SledError {
    #[error("history directory {0} is locked by another process")]
    Locked(PathBuf, #[source] sled::Error),
    #[error("history path {0} is not a usable directory: {1}")]
    Unusable(PathBuf, String),
    #[error("history directory {path} holds format {found:?}, this build reads {expected:?}")]
    Incompatible {
        path: PathBuf,
        found: String,
        expected: &'static str,
    },
    #[error("history directory {0} holds data that is not a channelbox history")]
    Foreign(PathBuf),
    #[error("history directory {0}: {1}")]
    Sled(PathBuf, #[source] sled::Error),
    #[error("history directory {path}: corrupt record for group {group:?}: {what}")]
    Corrupt {
        path: PathBuf,
        group: String,
        what: &'static str,
    },
    #[error("history directory {0}: durable flush failed: {1}")]
    Flush(PathBuf, String),
    #[error("sled store: a group name must not be empty")]
    EmptyGroup,
    /// A group name longer than a record's 16-bit length prefix can hold.
    #[error("sled store: a group name may have at most 65535 bytes, not {0}")]
    GroupNameTooLong(usize),
    #[error("history directory {0}: the store is closed")]
    Closed(PathBuf),
    #[error("history directory {0}: too many writes are waiting for the disk; retry shortly")]
    Busy(PathBuf),
}

impl SledError {
    pub(crate) fn sled(path: &Path, err: sled::Error) -> Self {
        SledError::Sled(path.to_owned(), err)
    }
}

impl From<SledError> for StoreError {
    fn from(err: SledError) -> Self {
        let kind = match &err {
            SledError::Locked(..) => StoreErrorKind::Locked,
            SledError::Unusable(..) => StoreErrorKind::Unusable,
            SledError::Incompatible { .. } | SledError::Foreign(_) => StoreErrorKind::Incompatible,
            SledError::Sled(..) | SledError::Flush(..) => StoreErrorKind::Io,
            SledError::Corrupt { .. } => StoreErrorKind::Corrupt,
            SledError::EmptyGroup | SledError::GroupNameTooLong(_) => StoreErrorKind::InvalidInput,
            SledError::Closed(_) => StoreErrorKind::Closed,
            SledError::Busy(_) => StoreErrorKind::Busy,
        };
        let message = err.to_string();
        StoreError::new(kind, message).with_source(err)
    }
}
