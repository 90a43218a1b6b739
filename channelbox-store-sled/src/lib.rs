//! # channelbox-store-sled
//!
//! A durable [`HistoryStore`](channelbox_core::HistoryStore) on
//! [sled](https://docs.rs/sled): history survives restarts and crashes.
//!
//! - **Durable acknowledgements.** An append's future completes only once its
//!   message is on disk. Appends that arrive while a flush runs share the next
//!   one (group commit), so many publishers cost few `fsync`s.
//!   [`CommitMode::PerAppend`] flushes for every append and exists as a baseline.
//! - **Restarts continue.** Opening a directory that holds a history continues
//!   it: the same epochs, offsets where they stopped, the same limits. After a
//!   crash a group's offsets are first..=last without holes: one writer thread
//!   applies every write's operations in an order whose every prefix is
//!   consistent, and sled recovers a prefix of its log.
//! - **Bounded.** At most 65,536 operations wait for the writer; past that an
//!   append fails with [`StoreErrorKind::Busy`](channelbox_core::StoreErrorKind)
//!   instead of queueing without limit.
//! - **Flushing** a group gives it a new epoch, persisted.
//! - **Disk trouble.** When a write fails (a full disk), appends are refused
//!   until the store has reopened sled by itself. Reads and heads only ever
//!   show what is durable, and the rollback gives every group a failed write
//!   touched a new epoch, so no (epoch, offset) names two messages. A store
//!   stopped or killed while failing rolls back when it is next opened, and
//!   then every group is in a new epoch; one that was not failing keeps its
//!   epochs and offsets.
//! - **Clear errors.** A directory of another format, a file where a directory is
//!   expected, an unwritable or locked directory each give a typed
//!   [`StoreError`](channelbox_core::StoreError) naming the path.
//!
//! ## Memory
//! sled's page cache ([`SledConfig::cache_bytes`], 16 MiB by default), plus, per
//! group, its head and 16 bytes per retained message (size and timestamp, so
//! trims need no disk read). With the default 1 MiB budget per group that is at
//! most 16 bytes for every retained message, e.g. 320 KiB for a group full of
//! 50-byte messages. Every write still waiting for the disk also keeps an
//! undo record (its group's name and head, some 60 bytes), so that readers
//! see only what is durable.
//!
//! ```
//! use channelbox_core::{HistoryStore, NewMessage, PayloadKind, ReadQuery};
//! use channelbox_store_sled::{SledConfig, SledStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let store = SledStore::open(SledConfig::new(dir.path().join("history")))?;
//! let pending = store.append("chat", NewMessage::new(PayloadKind::Text, "hello".into()))?;
//! pending.wait().await?; // on disk now
//! let epoch = store.head("chat").await?.epoch;
//! drop(store);
//!
//! let store = SledStore::open(SledConfig::new(dir.path().join("history")))?;
//! let page = store.read("chat", ReadQuery::Last(10)).await?;
//! assert_eq!((page.head.epoch, page.messages[0].offset), (epoch, 1));
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod config;
mod error;
mod group;
mod layout;
mod marker;
mod open;
mod progress;
mod recover;
mod store;
mod undo;
mod visible;
mod writer;

pub use config::{CommitMode, SledConfig};
pub use group::MESSAGE_OVERHEAD;
pub use store::SledStore;
