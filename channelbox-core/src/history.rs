//! The history contract every store implements: per-group offsets, epochs,
//! limits and reads.

use std::future::Future;
use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::StoreError;
use crate::limits::HistoryLimits;
use crate::payload::PayloadKind;
use crate::position::{Epoch, StreamPosition};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A message to append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    /// The payload's kind.
    pub kind: PayloadKind,
    /// The payload bytes; these count against [`HistoryLimits::max_bytes`].
    pub payload: Bytes,
    /// Application metadata kept beside the payload (sender, user), not counted.
    pub meta: Bytes,
    /// When it was published, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

impl NewMessage {
    /// A message stamped now, without metadata.
    pub fn new(kind: PayloadKind, payload: Bytes) -> Self {
        NewMessage {
            kind,
            payload,
            meta: Bytes::new(),
            timestamp_ms: now_ms(),
        }
    }
}

/// Size of [`NewMessage::encode`]'s header: kind (1), timestamp (8), meta length (4).
pub const ENCODED_HEADER: usize = 13;

impl NewMessage {
    /// The message as bytes, for stores that keep or send it serialized: kind,
    /// timestamp, meta length (big-endian), meta, payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(ENCODED_HEADER + self.meta.len() + self.payload.len());
        v.push(self.kind.tag());
        v.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        v.extend_from_slice(&(self.meta.len() as u32).to_be_bytes());
        v.extend_from_slice(&self.meta);
        v.extend_from_slice(&self.payload);
        v
    }

    /// Decodes what [`NewMessage::encode`] wrote; `None` when it is not that.
    pub fn decode(v: &[u8]) -> Option<NewMessage> {
        let kind = PayloadKind::from_tag(*v.first()?)?;
        let timestamp_ms = u64::from_be_bytes(v.get(1..9)?.try_into().ok()?);
        let meta_len = u32::from_be_bytes(v.get(9..13)?.try_into().ok()?) as usize;
        let meta = v.get(ENCODED_HEADER..ENCODED_HEADER.checked_add(meta_len)?)?;
        let payload = &v[ENCODED_HEADER + meta_len..];
        Some(NewMessage {
            kind,
            payload: Bytes::copy_from_slice(payload),
            meta: Bytes::copy_from_slice(meta),
            timestamp_ms,
        })
    }
}

/// A message read back from history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its offset in the group, 1 for the first message of an epoch.
    pub offset: u64,
    /// The payload's kind.
    pub kind: PayloadKind,
    /// The payload bytes.
    pub payload: Bytes,
    /// Application metadata.
    pub meta: Bytes,
    /// When it was published, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

impl StoredMessage {
    /// The stored message for an appended one.
    pub fn from_new(offset: u64, message: NewMessage) -> Self {
        StoredMessage {
            offset,
            kind: message.kind,
            payload: message.payload,
            meta: message.meta,
            timestamp_ms: message.timestamp_ms,
        }
    }
}

/// Where a group's history stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// The group's epoch: it changes whenever the group's history is lost or reset.
    pub epoch: Epoch,
    /// The oldest retained offset; `last + 1` when nothing is retained.
    pub first: u64,
    /// The newest offset ever assigned in this epoch; 0 when none.
    pub last: u64,
}

impl Head {
    /// Whether a client that saw everything up to `seen` can still be brought
    /// up to date from history without a gap: same epoch, not ahead of the
    /// newest offset, and nothing after it trimmed yet.
    pub fn can_recover(&self, seen: &StreamPosition) -> bool {
        self.epoch == seen.epoch && seen.offset <= self.last && self.first <= seen.offset + 1
    }

    /// The position of the newest message (offset 0 when there is none).
    pub fn position(&self) -> StreamPosition {
        StreamPosition::new(self.epoch.clone(), self.last)
    }
}

/// Which messages to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadQuery {
    /// The newest `n` messages.
    Last(usize),
    /// The first `limit` messages with an offset above `offset`.
    Since {
        /// Read after this offset.
        offset: u64,
        /// Most messages returned.
        limit: usize,
    },
}

/// Messages read from a group, oldest first, with the head they were read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryPage {
    /// The group's head when the page was read.
    pub head: Head,
    /// The messages, oldest first.
    pub messages: Vec<StoredMessage>,
}

/// What a store can do, so that callers branch instead of failing silently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// History survives a restart of the process.
    pub persistent: bool,
    /// An append's future completes only once the message is on disk.
    pub durable_appends: bool,
    /// The store applies [`HistoryLimits::max_total_bytes`] itself (a shared
    /// engine bounds its memory its own way, e.g. Redis's `maxmemory`).
    pub total_budget: bool,
}

impl Capabilities {
    /// Capabilities of a store that keeps history in memory only.
    pub const IN_MEMORY: Capabilities = Capabilities {
        persistent: false,
        durable_appends: false,
        total_budget: true,
    };
    /// Capabilities of a store that persists durably.
    pub const DURABLE: Capabilities = Capabilities {
        persistent: true,
        durable_appends: true,
        total_budget: true,
    };
    /// Capabilities of a shared engine: history outlives every server, its
    /// own settings decide what survives the engine, and its own memory
    /// limit bounds the whole.
    pub const SHARED: Capabilities = Capabilities {
        persistent: true,
        durable_appends: false,
        total_budget: false,
    };
}

/// Totals over all groups of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HistoryStats {
    /// Messages retained.
    pub messages: u64,
    /// Payload bytes retained.
    pub bytes: u64,
    /// What all groups cost against [`HistoryLimits::max_total_bytes`].
    pub cost: u64,
}

/// A future that resolves once an append is durable.
pub type DurableFuture = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'static>>;

/// A future that resolves to an append's position once the engine executed it.
pub type PositionFuture = Pin<Box<dyn Future<Output = Result<StreamPosition, StoreError>> + Send + 'static>>;

/// An append under way. A store in this process assigns the offset at once
/// ([`PendingAppend::assigned`]) and may still be writing it to disk; a shared
/// engine (Redis) assigns it after a round trip ([`PendingAppend::remote`]).
/// Either way [`PendingAppend::wait`] resolves to the position once the message
/// is durable as far as the store promises.
#[must_use = "an append is only acknowledged once it is durable"]
pub struct PendingAppend {
    assigned: Option<StreamPosition>,
    done: PositionFuture,
}

impl std::fmt::Debug for PendingAppend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAppend")
            .field("assigned", &self.assigned)
            .finish_non_exhaustive()
    }
}

impl PendingAppend {
    /// An append that is complete already.
    pub fn ready(offset: u64, epoch: Epoch) -> Self {
        let position = StreamPosition::new(epoch, offset);
        PendingAppend {
            assigned: Some(position.clone()),
            done: Box::pin(std::future::ready(Ok(position))),
        }
    }

    /// An append whose offset is assigned now and which is durable once
    /// `durable` resolves.
    pub fn assigned(offset: u64, epoch: Epoch, durable: DurableFuture) -> Self {
        let position = StreamPosition::new(epoch, offset);
        let at = position.clone();
        PendingAppend {
            assigned: Some(position),
            done: Box::pin(async move { durable.await.map(|()| at) }),
        }
    }

    /// An append whose offset the engine assigns: `done` resolves to it.
    pub fn remote(done: PositionFuture) -> Self {
        PendingAppend { assigned: None, done }
    }

    /// The position, when the store assigned it at once.
    pub fn position(&self) -> Option<&StreamPosition> {
        self.assigned.as_ref()
    }

    /// Waits until the append is durable; resolves to its position.
    pub async fn wait(self) -> Result<StreamPosition, StoreError> {
        self.done.await
    }
}

/// A store of per-group message history.
///
/// Contract (checked by `testkit::conformance`):
/// - `append` assigns offsets 1, 2, 3, … per group and epoch, in the order the
///   calls are made: before it returns (a store in this process), or by the
///   engine, which executes one caller's appends in call order (a shared
///   engine). [`PendingAppend::wait`] resolves when the message is durable as
///   far as the store promises ([`Capabilities`]). Splitting the two lets a
///   connection pipeline its publishes while keeping their order.
/// - The epoch changes whenever the group's history is lost or reset
///   (`flush_group`, `flush_all`, an in-memory store restarting); offsets restart
///   at 1 in a new epoch.
/// - Limits trim the oldest messages first; the newest message always survives.
///   Each group follows [`HistoryLimits::limits_for`] it (its namespace's limits).
/// - Reads return messages oldest first, never an expired one.
#[async_trait]
pub trait HistoryStore: Send + Sync + std::fmt::Debug + 'static {
    /// What this store can do.
    fn capabilities(&self) -> Capabilities;

    /// The limits this store applies: each group's are
    /// [`HistoryLimits::limits_for`] the group, looked up whenever it appends,
    /// trims or expires.
    fn limits(&self) -> &HistoryLimits;

    /// What one message of `group` with this payload size costs against
    /// [`HistoryLimits::max_total_bytes`]: the payload plus the store's fixed
    /// overhead per message (documented by each store).
    fn message_cost(&self, group: &str, payload_bytes: usize) -> u64;

    /// Appends a message to a group; see the trait docs for the ordering contract.
    fn append(&self, group: &str, message: NewMessage) -> Result<PendingAppend, StoreError>;

    /// Appends a message that channel `except` (its sender, with `echo` off)
    /// must not receive live. A store that also carries the message to every
    /// server (a shared engine with a broker) passes `except` along; the
    /// others ignore it, as the box applies it itself.
    fn append_except(
        &self,
        group: &str,
        message: NewMessage,
        except: Option<uuid::Uuid>,
    ) -> Result<PendingAppend, StoreError> {
        let _ = except;
        self.append(group, message)
    }

    /// The group's head (a group that never had a message has an epoch too).
    async fn head(&self, group: &str) -> Result<Head, StoreError>;

    /// The heads of several groups in one go, each checked against a
    /// position this server knows to exist (what it delivered or had
    /// acknowledged): a store that can lose acknowledged writes — a shared
    /// engine restarted from an older snapshot — first moves a group whose
    /// head went below that position, in its epoch, to a new epoch, so that
    /// no offset of an epoch is ever handed out twice. One answer per group,
    /// in order. The default reads each head in turn (a store in one process
    /// never goes back).
    async fn check_heads(&self, groups: &[(String, StreamPosition)]) -> Vec<Result<Head, StoreError>> {
        let mut heads = Vec::with_capacity(groups.len());
        for (group, _) in groups {
            heads.push(self.head(group).await);
        }
        heads
    }

    /// Reads messages of a group.
    async fn read(&self, group: &str, query: ReadQuery) -> Result<HistoryPage, StoreError>;

    /// Drops a group's history and gives it a new epoch, which is returned.
    async fn flush_group(&self, group: &str) -> Result<Epoch, StoreError>;

    /// Drops every group's history; each gets a new epoch.
    async fn flush_all(&self) -> Result<(), StoreError>;

    /// Totals over all groups.
    async fn stats(&self) -> Result<HistoryStats, StoreError>;

    /// Whether the store takes writes now; `false` while it is failing (a
    /// full disk, say) and refusing appends until it recovers by itself.
    fn healthy(&self) -> bool {
        true
    }

    /// Whether the store takes `group`'s requests now. The same as
    /// [`HistoryStore::healthy`] unless the store spreads groups over parts
    /// that fail apart (shards, the masters of a Redis Cluster): then a
    /// group whose part is down is not, while the others are.
    fn healthy_for(&self, group: &str) -> bool {
        let _ = group;
        self.healthy()
    }

    /// Makes everything appended so far durable. Called on shutdown.
    async fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
