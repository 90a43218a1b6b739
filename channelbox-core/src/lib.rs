//! # channelbox-core
//!
//! Real-time connections ("channels") organized into named groups: broadcast to a
//! group with one call, send to one channel by id, keep a bounded history per
//! group, replay what a reconnecting client missed, and clean up closed or idle
//! channels by themselves. The Rust counterpart of Nexios's `ChannelBox`.
//!
//! This crate is the core only: it knows no transport and no storage engine.
//! Transports (`channelbox-ws`, `channelbox-warp`) turn a socket into a
//! [`Channel`] by providing a [`FrameSink`]; stores (`channelbox-store-memory`,
//! `channelbox-store-sled`) implement [`HistoryStore`].
//!
//! ```
//! use std::sync::Arc;
//! use channelbox_core::{testkit::test_channel, AddStatus, ChannelBox, ChannelConfig, HistoryStore, ReadQuery};
//! use channelbox_store_memory::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store: Arc<dyn HistoryStore> = Arc::new(MemoryStore::default());
//! let channels = ChannelBox::new(store);
//!
//! let (alice, inbox) = test_channel(ChannelConfig::default());
//! assert_eq!(channels.add_channel_to_group(&alice, "chat_42").await?, AddStatus::GroupCreated);
//!
//! let report = channels.group_send("chat_42", serde_json::json!({"text": "hi"}), true).await?;
//! assert_eq!((report.offset, report.delivery.delivered), (Some(1), 1));
//!
//! let history = channels.show_history("chat_42", ReadQuery::Last(10)).await?;
//! assert_eq!(history.messages.len(), 1);
//! assert_eq!(inbox.wait_for(1, std::time::Duration::from_secs(1)).await[0].as_text(), Some(r#"{"text":"hi"}"#));
//! # Ok(()) }
//! ```
//!
//! ## Features
//! - `testkit`: the [`HistoryStore`] and [`Broker`] conformance suites, a
//!   reference model for property tests, and an in-process recording channel.
//!
//! ## Clusters
//! A box joins others through a [`Broker`] (how saved messages reach every
//! server) and, for the chat service, a [`Directory`] (who is where): their
//! contracts live here, implemented by `channelbox-redis`, and in one
//! process by [`MemoryBus`].
//! - `chaos-mutations`: deliberately injected bugs for `cargo xtask chaos`
//!   (see [`mutation`]); never in a real build.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod broker;
mod budget;
mod channel;
mod channel_box;
mod directory;
mod envelope;
mod error;
mod history;
mod limits;
mod memory_broker;
pub mod mutation;
mod payload;
mod position;
mod transport;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use broker::{Broker, BrokerEvent, BrokerFuture};
pub use budget::{BudgetedGroups, TotalBudget, GROUP_COST};
pub use channel::{Channel, ChannelConfig, ChannelStats, Enqueued, OverflowPolicy, SendError};
pub use channel_box::{
    AddStatus, BoxStats, ChannelBox, DeliveryReport, MembershipObserver, NoFraming, PendingPublish, PublishOptions,
    PublishReport, Recovery, RemoveStatus, Replay, SubscribeFraming, Subscribed, GAP_WAIT, HEAD_CHECK, REPLAY_STALL,
};
pub use directory::{Change, ClusterEvent, Directory, Member};
pub use envelope::{Envelope, MessageRef, PlainEnvelope};
pub use error::{BoxError, ConfigError, StoreError, StoreErrorKind};
pub use history::{
    now_ms, Capabilities, DurableFuture, Head, HistoryPage, HistoryStats, HistoryStore, NewMessage, PendingAppend,
    PositionFuture, ReadQuery, StoredMessage, ENCODED_HEADER,
};
pub use limits::{
    messages_to_trim, namespace_of, GroupLimits, HistoryLimits, DEFAULT_HISTORY_BYTES, DEFAULT_TOTAL_BYTES,
    HISTORY_SIZE_ENV,
};
pub use memory_broker::{BusStore, MemoryBroker, MemoryBus, DEFAULT_BUS_QUEUE};
pub use payload::{Frame, FrameKind, Payload, PayloadKind, PayloadType};
pub use position::{Epoch, StreamPosition};
pub use transport::{CloseReason, FrameSink, Incoming, SinkError};
