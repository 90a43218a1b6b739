//! # channelbox-protocol
//!
//! The chat server's wire protocol v1 (docs/protocol.md), written once for every
//! transport. A transport (`channelbox-ws`, `channelbox-warp`) only:
//! 1. asks [`ChatService::admit`] about an upgrade request (URL group, token,
//!    query, connection limit) and answers its [`HttpAnswer`] on refusal;
//! 2. turns the socket into a core [`Channel`](channelbox_core::Channel) with
//!    [`ChatService::channel_config`];
//! 3. hands [`ChatService::run`] the channel and a stream of [`Incoming`] frames.
//!
//! A stream of server-sent events (`GET /sse/{group}`) is admitted by
//! [`ChatService::admit_events`] and opened by [`ChatService::events`], whose
//! [`EventStream`] is the response's body.
//!
//! The HTTP API (`/api/groups…`, `/api/admin/…`, `/metrics`) is here too, as
//! handlers that return an [`HttpAnswer`]; a web framework only routes to them.
//!
//! ```
//! use std::sync::Arc;
//! use channelbox_protocol::{ChatService, ProtocolConfig};
//! use channelbox_store_memory::MemoryStore;
//!
//! let service = ChatService::new(Arc::new(MemoryStore::default()), ProtocolConfig::default());
//! assert!(service.admit("chat", Some("history=10")).is_ok());
//! assert_eq!(service.admit("a%20b", None).unwrap_err().status, 400);
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod auth;
mod body;
mod config;
mod fields;
mod frames;
pub mod hooks;
mod metrics;
pub mod namespaces;
pub mod page;
mod paths;
mod request;
mod service;

pub use auth::{now_secs, same_secret, Permissions, TokenError, TokenVerifier, User, WeakSecret, MIN_SECRET_BYTES};
pub use channelbox_core::Incoming;
pub use config::{ProtocolConfig, DEFAULT_HISTORY_LIMIT, MAX_GROUP_BYTES, MAX_HISTORY_LIMIT, MAX_JSON_DEPTH};
pub use fields::{decode_group, query_param, too_deep, valid_group, GroupName, Limit, ReplayCount, Since};
pub use frames::{
    render_history, render_history_within, render_message, ChatEnvelope, ErrorCode, ProtocolError, Sender,
};
pub use metrics::{HookMetrics, Metrics, WriteCounter};
pub use paths::{group_segment, GroupEndpoint, GroupPath};
pub use request::{parse as parse_request, Direct, History, Join, Leave, Presence, Publish, Ref, Request};
pub use service::{
    Admission, Change, ChatService, ClusterEvent, Directory, EventStream, EventsEnd, HttpAnswer, Member, PublishTicket,
    UpgradeRequest, EVENT_STREAM_HEADERS,
};
