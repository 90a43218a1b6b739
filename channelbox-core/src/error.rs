//! The error types of channelbox-core.

use std::borrow::Cow;

/// What went wrong in a [`HistoryStore`](crate::HistoryStore), as a kind a caller
/// can match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// Reading or writing the backing storage failed.
    Io,
    /// Stored data could not be decoded.
    Corrupt,
    /// The storage belongs to another format or version.
    Incompatible,
    /// The storage is in use by another process.
    Locked,
    /// The storage cannot be opened or written (permissions, not a directory).
    Unusable,
    /// A bad argument, such as an empty group name.
    InvalidInput,
    /// The store was closed.
    Closed,
    /// More writes are waiting for the disk than the store queues; retry once
    /// earlier ones are acknowledged.
    Busy,
    /// The request was sent but its answer never came (it timed out, the
    /// connection broke with it in flight, replicas did not confirm it in
    /// time): it may have taken effect. An append may still be saved and
    /// delivered, once, under one offset; unlike the other kinds, this one
    /// does not say that nothing happened.
    Unanswered,
}

/// An error from a history store, naming the backend and what it was working on.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    kind: StoreErrorKind,
    message: Cow<'static, str>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StoreError {
    /// A new error of this kind with a readable message.
    pub fn new(kind: StoreErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        StoreError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Keeps the underlying error as [`std::error::Error::source`].
    pub fn with_source(mut self, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl Clone for StoreError {
    fn clone(&self) -> Self {
        // Sources are not `Clone`; a clone keeps the message, which already names
        // what failed, and the source's text.
        let message = match &self.source {
            Some(src) => Cow::Owned(format!("{}: {src}", self.message)),
            None => self.message.clone(),
        };
        StoreError {
            kind: self.kind,
            message,
            source: None,
        }
    }
}

/// A bad configuration value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting has a value that cannot be used.
    #[error("{name}={value:?} is not valid: expected {expected}")]
    InvalidValue {
        /// The setting (flag or environment variable).
        name: String,
        /// The value given.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
}

/// An error from a [`ChannelBox`](crate::ChannelBox) operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BoxError {
    /// The group has no members (groups exist only while they have members).
    #[error("no such group: {0:?}")]
    NoSuchGroup(String),
    /// No channel with this id is registered.
    #[error("no such channel: {0}")]
    NoSuchChannel(uuid::Uuid),
    /// The channel is closed and cannot join groups.
    #[error("channel {0} is closed")]
    ChannelClosed(uuid::Uuid),
    /// A group name is empty.
    #[error("invalid group name {0:?}: it must not be empty")]
    InvalidGroup(String),
    /// The history store failed.
    #[error("history store: {0}")]
    Store(#[from] StoreError),
    /// The box is set up wrongly (a broker attached twice, say).
    #[error("box setup: {0}")]
    Setup(String),
}
