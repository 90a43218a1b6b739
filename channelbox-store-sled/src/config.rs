//! Options of the sled store.

use std::path::PathBuf;

use channelbox_core::{ConfigError, HistoryLimits};

/// How appends are made durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CommitMode {
    /// Appends that arrive while a flush is running share the next flush: one
    /// `fsync` for many appends. The default.
    #[default]
    Group,
    /// Every append flushes on its own. Slow; kept as a measured baseline.
    PerAppend,
}

/// How a [`SledStore`](crate::SledStore) is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SledConfig {
    /// The directory holding the store. Created if missing.
    pub path: PathBuf,
    /// Per-group limits; they hold across restarts.
    pub limits: HistoryLimits,
    /// sled's page cache, in bytes (default 16 MiB).
    pub cache_bytes: u64,
    /// How appends become durable.
    pub commit: CommitMode,
}

impl SledConfig {
    /// The defaults for a store in `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SledConfig {
            path: path.into(),
            limits: HistoryLimits::default(),
            cache_bytes: 16 << 20,
            commit: CommitMode::Group,
        }
    }

    /// The defaults for `path`, with the byte budget from `CHANNEL_BOX_HISTORY_SIZE`.
    pub fn from_env(path: impl Into<PathBuf>) -> Result<Self, ConfigError> {
        Ok(SledConfig {
            limits: HistoryLimits::from_env()?,
            ..SledConfig::new(path)
        })
    }
}
