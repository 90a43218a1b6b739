//! Options of the in-memory store.

use channelbox_core::{ConfigError, HistoryLimits};

/// How a [`MemoryStore`](crate::MemoryStore) is set up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Per-group limits.
    pub limits: HistoryLimits,
}

impl MemoryConfig {
    /// The defaults, with the byte budget from `CHANNEL_BOX_HISTORY_SIZE` when set.
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(MemoryConfig {
            limits: HistoryLimits::from_env()?,
        })
    }
}
