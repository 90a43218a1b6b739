//! The memory store's own failures, converted to `StoreError` at the edge.

use channelbox_core::{StoreError, StoreErrorKind};

/// What can go wrong in memory: only bad arguments.
#[derive(Debug)]
pub(crate) enum MemoryError {
    EmptyGroup,
}

impl From<MemoryError> for StoreError {
    fn from(err: MemoryError) -> Self {
        match err {
            MemoryError::EmptyGroup => StoreError::new(
                StoreErrorKind::InvalidInput,
                "memory store: a group name must not be empty",
            ),
        }
    }
}
