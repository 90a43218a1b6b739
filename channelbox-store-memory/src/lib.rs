//! # channelbox-store-memory
//!
//! The in-memory [`HistoryStore`](channelbox_core::HistoryStore): each group's
//! history is a `VecDeque` under one lock, bounded by the configured limits. It is
//! fast and simple, and it forgets everything when the process ends: every
//! `MemoryStore` starts a new epoch, so a client recovering across a restart is
//! told its recovery is incomplete instead of being handed wrong offsets.
//! For history that survives restarts, use `channelbox-store-sled`.
//!
//! ```
//! use channelbox_core::{HistoryLimits, HistoryStore, NewMessage, PayloadKind, ReadQuery};
//! use channelbox_store_memory::{MemoryConfig, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), channelbox_core::StoreError> {
//! let store = MemoryStore::new(MemoryConfig {
//!     limits: HistoryLimits { max_messages: Some(100), ..HistoryLimits::default() },
//! });
//! let pending = store.append("chat", NewMessage::new(PayloadKind::Text, "hello".into()))?;
//! assert_eq!(pending.wait().await?.offset, 1);
//! let page = store.read("chat", ReadQuery::Last(10)).await?;
//! assert_eq!(page.messages[0].payload, "hello");
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod config;
mod error;
mod store;

pub use config::MemoryConfig;
pub use store::{MemoryStore, MESSAGE_OVERHEAD};
