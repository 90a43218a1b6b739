//! # channelbox-redis
//!
//! Redis as the engine of a channelbox cluster: several chat servers share
//! one Redis, and every group spans them.
//!
//! - [`RedisStore`] is the [`HistoryStore`](channelbox_core::HistoryStore):
//!   one Lua script per append creates the group's epoch when missing, takes
//!   the next offset, adds the message to the group's stream, trims it
//!   oldest-first by bytes, count and age (never the newest) and publishes it
//!   with its epoch and offset — atomically. Reads are by range and bounded.
//! - [`RedisBroker`] is the [`Broker`](channelbox_core::Broker): Redis
//!   pub/sub, resubscribing by itself after any loss; the box finds what was
//!   lost meanwhile by offset and fills it from history.
//! - [`RedisDirectory`] is the chat service's
//!   [`Directory`](channelbox_core::Directory): per-server records with a
//!   short TTL (member counts, presence, where each channel is) and control
//!   messages (`direct`, admin close-all, member events).
//! - [`wire`] is the pub/sub payload format, written once: what the broker
//!   and the directory send and parse, and what the scripts publish.
//!
//! Keys of one group share one hash tag (`{<group>}`, see `keys`), so a
//! group's script runs on one node of a Redis Cluster: [`ClusterEngine`]
//! runs an engine per master and routes each group to the master serving
//! its slot, following `MOVED`/`ASK`, migrations and failovers (see
//! `cluster`).
//! [`ShardedEngine`] routes groups over independent shards the same way. The client is redis-rs (`redis`, multiplexed tokio
//! connections): a connection pipelines commands in the order they are sent,
//! which keeps one caller's appends in order; reconnecting and resubscribing
//! are done here, so that the box hears of every loss (see `broker`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use channelbox_core::{ChannelBox, HistoryLimits};
//! use channelbox_redis::{RedisConfig, RedisEngine};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = RedisEngine::connect(RedisConfig::new("redis://127.0.0.1:6379/")).await?;
//! let channels = ChannelBox::new(engine.store());
//! channels.attach_broker(engine.broker())?;
//! let report = channels.group_send("chat", serde_json::json!({"text": "hi"}), true).await?;
//! assert!(report.offset.is_some());
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod appends;
mod broker;
mod cluster;
mod directory;
mod durability;
mod floors;
mod keys;
mod link;
mod router;
mod scripts;
mod sentinel;
mod shards;
mod slot_map;
mod spubsub;
mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
#[cfg(feature = "testkit")]
pub mod testkit_forms;
mod url;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use channelbox_core::{HistoryLimits, HistoryStore, StoreError, StoreErrorKind};
use uuid::Uuid;

use sentinel::Target;

pub use broker::RedisBroker;
pub use cluster::ClusterEngine;
pub use directory::{RedisDirectory, FLUSH_EVERY, RECORD_TTL};
pub use durability::MAX_WAIT;
pub use keys::{crc16, group_slot, SLOTS};
pub use router::{ShardedBroker, ShardedDirectory, ShardedStore};
pub use shards::{fnv1a64, jump, shard_of, ShardedEngine, SHARDS_KEY};
pub use store::{RedisStore, MAX_READ, MESSAGE_OVERHEAD};
pub use url::{split_url_list, RedisAddress, UrlError};

/// Control messages from the subscription task to the directory before the
/// newest are dropped.
const CONTROL_QUEUE: usize = 16_384;

/// How to reach Redis and what history to keep there.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://host:port/db`, `redis+sentinel://host:port[,…]/master` (see
    /// [`RedisAddress`]), or for [`ClusterEngine::connect`]
    /// `redis+cluster://host:port[,…]`.
    pub url: String,
    /// History limits, per group (each group its namespace's, passed to the
    /// scripts as arguments). `max_total_bytes` is not counted here:
    /// see [`RedisConfig::total_bytes`].
    pub limits: HistoryLimits,
    /// How long [`RedisEngine::connect`] waits for Redis.
    pub connect_timeout: Duration,
    /// How long a group's keys live without a saved message (each append
    /// starts it again); an epoch created by a read alone lives at most 600 s.
    pub meta_ttl: Duration,
    /// A bound on all groups' history together, applied by Redis itself:
    /// with `Some`, [`RedisEngine::connect`] (and, for each shard,
    /// [`ShardedEngine::connect`]) refuses a Redis whose `maxmemory` is 0 or
    /// whose `maxmemory-policy` cannot evict groups (`allkeys-lru`,
    /// `allkeys-lfu`, `volatile-lru` or `volatile-lfu`).
    pub total_bytes: Option<u64>,
    /// Replicas that must have a saved append before it is acknowledged
    /// (Redis `WAIT`); 0 waits for none.
    pub replicas: u32,
    /// How long to wait for them, at most [`MAX_WAIT`].
    pub replica_wait: Duration,
}

/// The default [`RedisConfig::meta_ttl`]: 30 days.
pub const DEFAULT_META_TTL: Duration = Duration::from_secs(2_592_000);

impl RedisConfig {
    /// Default limits, waiting 5 s for Redis.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            limits: HistoryLimits::default(),
            connect_timeout: Duration::from_secs(5),
            meta_ttl: DEFAULT_META_TTL,
            total_bytes: None,
            replicas: 0,
            replica_wait: MAX_WAIT,
        }
    }
}

/// One server's connections to the cluster's Redis: its store, broker and
/// directory share them.
#[derive(Clone, Debug)]
pub struct RedisEngine {
    link: Arc<link::Link>,
    store: Arc<RedisStore>,
    broker: Arc<RedisBroker>,
    directory: Arc<RedisDirectory>,
}

impl RedisEngine {
    /// Connects (commands and pub/sub), loads the scripts, and starts the
    /// background tasks; fails when Redis cannot be reached within
    /// `connect_timeout`. Afterwards, losing Redis makes requests fail with
    /// an `unavailable` error until it is back, which is noticed by itself.
    pub async fn connect(config: RedisConfig) -> Result<RedisEngine, StoreError> {
        let address = RedisAddress::parse(&config.url)
            .map_err(|e| StoreError::new(StoreErrorKind::InvalidInput, format!("redis url {:?}: {e}", config.url)))?;
        let engine = RedisEngine::start(&address, &config)?;
        if !engine.wait_ready(config.connect_timeout).await {
            return Err(StoreError::new(
                StoreErrorKind::Unusable,
                format!("redis at {address} did not answer within {:?}", config.connect_timeout),
            ));
        }
        engine.check_total_bytes(config.total_bytes, &address).await?;
        Ok(engine)
    }

    /// Waits until every connection of the engine is up (commands, the
    /// append connection when replicas are awaited, and pub/sub), at most
    /// `wait`: a store returned by [`RedisEngine::connect`] takes appends at
    /// once.
    pub(crate) async fn wait_ready(&self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.store.healthy() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Refuses a Redis that does not bound its memory itself when `total`
    /// is set (see [`RedisConfig::total_bytes`]).
    pub(crate) async fn check_total_bytes(&self, total: Option<u64>, address: &RedisAddress) -> Result<(), StoreError> {
        match total {
            Some(total) => check_total_bytes(&self.link, total, &address.to_string()).await,
            None => Ok(()),
        }
    }

    /// Starts the connections and tasks for `address` without waiting for
    /// Redis to answer.
    pub(crate) fn start(address: &RedisAddress, config: &RedisConfig) -> Result<RedisEngine, StoreError> {
        let invalid = |text: String| StoreError::new(StoreErrorKind::InvalidInput, text);
        if config.replica_wait > MAX_WAIT || (config.replicas > 0 && config.replica_wait.is_zero()) {
            return Err(invalid(format!(
                "the replica wait is {:?}: it must be 1 ms to {MAX_WAIT:?}",
                config.replica_wait
            )));
        }
        let target = Arc::new(match address {
            RedisAddress::Single { url, .. } => Target::Single(
                redis::Client::open(url.as_str()).map_err(|e| invalid(format!("redis url {url:?}: {e}")))?,
            ),
            RedisAddress::Sentinel { sentinels, master } => {
                Target::Sentinel(sentinel::Sentinels::start(sentinels.clone(), master.clone()))
            }
            RedisAddress::Cluster { .. } => {
                return Err(invalid(format!(
                    "{address}: a Redis Cluster is connected with ClusterEngine::connect"
                )));
            }
        });
        RedisEngine::start_on(target, config, keys::HOME, false)
    }

    /// Starts the connections and tasks to `target`, with the server and
    /// channel records of the directory under `home` (see `keys`); with
    /// `sharded`, group messages go by sharded pub/sub (a Cluster master).
    pub(crate) fn start_on(
        target: Arc<Target>,
        config: &RedisConfig,
        home: &str,
        sharded: bool,
    ) -> Result<RedisEngine, StoreError> {
        let node = Uuid::new_v4();
        let link = link::Link::start(target.clone(), keys::probe(home), sharded);
        let wait = durability::ReplicaWait::new(
            config.replicas,
            config.replica_wait,
            (config.replicas > 0).then(|| link::Link::start(target.clone(), keys::probe(home), sharded)),
        );
        let (control_tx, control_rx) = tokio::sync::mpsc::channel(CONTROL_QUEUE);
        let floors = Arc::new(floors::Floors::default());
        let broker = RedisBroker::start(target, link.clone(), node, control_tx, floors.clone());
        let shared = Arc::new(appends::Shared::new(floors, config.meta_ttl));
        let store = RedisStore::new(link.clone(), config.limits.clone(), broker.health(), shared, wait);
        let directory = RedisDirectory::start(node, home.to_owned(), link.clone(), control_rx);
        Ok(RedisEngine {
            link,
            store: Arc::new(store),
            broker: Arc::new(broker),
            directory: Arc::new(directory),
        })
    }

    /// The history store.
    pub fn store(&self) -> Arc<RedisStore> {
        self.store.clone()
    }

    /// The broker, for [`ChannelBox::attach_broker`](channelbox_core::ChannelBox::attach_broker).
    pub fn broker(&self) -> Arc<RedisBroker> {
        self.broker.clone()
    }

    /// The chat service's directory.
    pub fn directory(&self) -> Arc<RedisDirectory> {
        self.directory.clone()
    }
}

/// The `maxmemory-policy` values under which Redis bounds history by
/// evicting whole groups, least recently (or frequently) used first.
const EVICTING_POLICIES: [&str; 4] = ["allkeys-lru", "allkeys-lfu", "volatile-lru", "volatile-lfu"];

/// `--history-total-bytes` on Redis: refused unless Redis bounds its memory
/// itself. channelbox does not count all groups' bytes in Redis: one
/// counter touched by every append would serialise every group on one key,
/// and could not share a hash slot with the groups' keys on Redis Cluster.
/// Redis's own `maxmemory` with an LRU/LFU policy does the job: it evicts
/// the groups used least recently, whole, and a group that lost its history
/// continues in a new epoch (recovery across it says `complete:false`).
pub(crate) async fn check_total_bytes(link: &link::Link, total: u64, url: &str) -> Result<(), StoreError> {
    let refuse = |why: String| {
        StoreError::new(
            StoreErrorKind::Unusable,
            format!(
                "--history-total-bytes {total} cannot be applied on the redis at {url}: {why}. \
                 Redis must bound the memory itself: set `maxmemory` (for example \
                 `CONFIG SET maxmemory {total}`) and `maxmemory-policy` to one of {} \
                 (`allkeys-lru` is the usual choice; an evicted group continues in a new \
                 epoch), or leave out --history-total-bytes",
                EVICTING_POLICIES.join(", ")
            ),
        )
    };
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET").arg("maxmemory*");
    let pairs: std::collections::HashMap<String, String> = link
        .query(&cmd)
        .await
        .map_err(|e| refuse(format!("CONFIG GET maxmemory* failed ({e})")))?;
    let maxmemory: u64 = pairs.get("maxmemory").and_then(|v| v.parse().ok()).unwrap_or(0);
    let policy = pairs.get("maxmemory-policy").cloned().unwrap_or_default();
    if maxmemory == 0 {
        return Err(refuse("its maxmemory is 0 (unbounded)".to_owned()));
    }
    if !EVICTING_POLICIES.contains(&policy.as_str()) {
        return Err(refuse(format!("its maxmemory-policy is {policy:?}")));
    }
    Ok(())
}
