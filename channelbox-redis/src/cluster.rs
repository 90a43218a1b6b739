//! Redis Cluster (`redis+cluster://HOST:PORT[,HOST:PORT…]`): one engine per
//! master — the command link, append task, floors, broker and directory of
//! one Redis, unchanged — behind the router of `router`, which places a
//! group on the master serving its hash slot.
//!
//! - **One slot per group.** Every key of a group carries the group's hash
//!   tag (`keys`), so each script touches one slot and runs on one node; the
//!   slot is CRC16 (XMODEM) of the tag, modulo 16384, as Redis computes it.
//! - **The slot map** is read with `CLUSTER SLOTS` at start and again after
//!   any `MOVED`, `ASK`, `TRYAGAIN` or `CLUSTERDOWN` (at most once per
//!   100 ms); a request refused that way did not run, and the
//!   router sends it again to the master the new map names, for up to
//!   `router::REDIRECT_FOR`. While a slot migrates, a group whose keys have
//!   left the old master is refused there (`ASK`) until the slot is
//!   assigned to the new one: its requests wait (and retry) meanwhile, so
//!   the group's script never runs on two masters for one offset.
//! - **Failovers are followed.** The engines are those of the masters at
//!   start, ordered by address, and the map is also read every
//!   [`POLL_EVERY`]. When it names a master no engine is on, and an
//!   engine's master is no longer named (it failed, and the Cluster
//!   promoted a replica of it), that engine moves to the new master: the
//!   one serving most of the slots it served (`slot_map::follow_failovers`). Its
//!   [`Target`] generation moves on, so its command link and its
//!   subscription connection reconnect there, as after a Sentinel
//!   failover: the same floors, the reconnect check of every group it has a
//!   floor for, the hold of appends after a changed `run_id`, and `Back`
//!   once its subscriptions are restored, after which the box checks every
//!   group's head and fills what it missed. A promoted replica that lacked
//!   writes is thus found by the rollback check (the group moves to a new
//!   epoch, its members are closed with 4002). Until the new master answers,
//!   that engine's groups answer `unavailable`.
//! - **Masters added later are served.** A master the map names that is
//!   not a promoted replica (added to the Cluster, slots resharded to it)
//!   gets an engine of its own, numbered after the others, made by the
//!   polling task as soon as a reading shows it ([`grow`]); until that
//!   engine answers (2 s at most) the slots it serves refuse requests as a
//!   redirect does, so they wait and are sent again, and a subscription
//!   whose slot moved there follows it. Its home prefix is the smallest
//!   `cb:{cb-N}` whose slot it serves; every poll moves each engine's
//!   records (but the first's) to the home its master has now, so servers
//!   that added it at different moments of a reshard agree once they read
//!   the same map. (So does any reshard that gives an engine a slot with a
//!   smaller tag: for a second or two after, that engine's presence and
//!   counts from other servers may be incomplete, as its records are
//!   written again at the new home.)
//! - **Pub/sub** is sharded (Redis 7): the scripts and the broker
//!   `SPUBLISH` on the group's channel (in the group's slot), which reaches
//!   only the subscribers of the node serving that slot; each engine's broker
//!   `SSUBSCRIBE`s its groups on its master (`spubsub`, one connection per
//!   master). When a slot moves, its master drops those subscriptions
//!   (`sunsubscribe`); the router subscribes them on the new master and
//!   tells the box `Back`, which checks every group's head and fills what
//!   was published meanwhile from history — the same path as a lost
//!   connection. Control channels (`direct`, close-all) stay plain pub/sub,
//!   which a Cluster carries to every node.
//! - **Directory records** of servers and channels live under a home prefix
//!   per master, `cb:{cb-N}`, whose tag the master serves at start (the
//!   smallest `N` that hashes to one of its slots), so each engine's
//!   directory writes only to its own master.
//!
//! Epochs and floors are per engine, as per shard: the rollback rules of a
//! single Redis hold for each master.

use std::sync::{Arc, Weak};
use std::time::Duration;

use channelbox_core::{StoreError, StoreErrorKind};
use redis::Client;

use crate::router::{Placement, ShardedBroker, ShardedDirectory, ShardedStore};
use crate::sentinel::Target;
pub(crate) use crate::slot_map::Slots;
use crate::slot_map::{address_list, home_of, owners_of, read_slot_map, NOBODY};
use crate::{RedisConfig, RedisEngine};

/// How long a master added later may take to answer before its slots are
/// placed on its engine anyway (its requests then fail as `unavailable`
/// until it does).
const READY_WAIT: Duration = Duration::from_secs(2);
/// How often the slot map is read besides after a redirect: a failover
/// refuses nothing with `MOVED` (the failed master just does not answer),
/// so it is found this way.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// What the polling task adds engines to.
#[derive(Debug)]
struct Routers {
    store: Weak<ShardedStore>,
    broker: Weak<ShardedBroker>,
    directory: Weak<ShardedDirectory>,
    config: RedisConfig,
}

/// Reads the slot map every [`POLL_EVERY`] until the engine is gone, makes
/// the engines of masters added meanwhile ([`grow`]) as soon as a reading
/// shows them, and moves each engine's directory records to the home its
/// master has now (see [`Slots::homes`]).
async fn poll(slots: Weak<Slots>, routers: Routers) {
    let mut checking = None;
    loop {
        {
            let Some(slots) = slots.upgrade() else { return };
            let added = slots.added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            grow(&slots, &routers, &mut checking).await;
            if let Some(directory) = routers.directory.upgrade() {
                for (index, home) in slots.homes() {
                    directory.move_home(index, home);
                }
            }
            if let Some(broker) = routers.broker.upgrade() {
                broker.place_waiting();
            }
            let _ = tokio::time::timeout(POLL_EVERY, added).await;
        }
        let Some(slots) = slots.upgrade() else { return };
        slots.refresh().await;
    }
}

/// Makes an engine for each master added to the Cluster since start, in
/// order: waits until it answers ([`READY_WAIT`] at most), checks
/// `--history-total-bytes` on it as at start, adds it to the routers, then
/// places its slots on it and subscribes the groups that waited for it. A
/// master that fails the check keeps its engine in `checking` and is
/// checked again at the next reading; one whose engine cannot be made is
/// tried again then. Meanwhile its slots wait, as do those of masters
/// added after it.
async fn grow(slots: &Arc<Slots>, routers: &Routers, checking: &mut Option<(usize, RedisEngine)>) {
    // The first unserved master each time: a reading may forget one (and
    // renumber those after it) while this waits.
    while let Some((index, (host, port), home)) = slots.unserved().into_iter().next() {
        let (Some(store), Some(broker), Some(directory)) = (
            routers.store.upgrade(),
            routers.broker.upgrade(),
            routers.directory.upgrade(),
        ) else {
            return;
        };
        // Made already when a reading forgot this master before it was
        // served: the engine follows whichever master has its number now.
        if store.engines() <= index {
            let engine = match checking.take().filter(|(i, _)| *i == index) {
                Some((_, engine)) => engine,
                None => {
                    let Some(home) = &home else { return };
                    let target = Arc::new(Target::Cluster(slots.clone(), index));
                    match RedisEngine::start_on(target, &routers.config, home, true) {
                        Ok(engine) => engine,
                        Err(err) => {
                            tracing::error!(%err, %host, port, "the engine of an added redis cluster master could not be made");
                            return;
                        }
                    }
                }
            };
            if !engine.wait_ready(READY_WAIT).await {
                tracing::warn!(%host, port, "an added redis cluster master does not answer yet");
            }
            if let Some(total) = routers.config.total_bytes {
                if let Err(err) = crate::check_total_bytes(&engine.link, total, &format!("{host}:{port}")).await {
                    tracing::error!(%err, "an added redis cluster master is not served");
                    *checking = Some((index, engine));
                    return;
                }
            }
            let numbers = [
                store.add(engine.store()),
                broker.add(engine.broker()),
                directory.add(engine.directory()),
            ];
            if numbers.iter().any(|n| *n != index) {
                tracing::error!(
                    ?numbers,
                    index,
                    "engines out of order: an added redis cluster master is not served"
                );
                return;
            }
        }
        slots.serve(index);
        tracing::info!(engine = index, %host, port, "an added redis cluster master is served");
    }
}

/// Starts an engine per master (in `masters`' order) with `config`'s
/// settings, each under its home prefix (see [`home_of`]), each connecting
/// to the master `slots` says it is on now.
fn start_engines(
    masters: &[(String, u16)],
    owners: &[u16],
    slots: &Arc<Slots>,
    config: &RedisConfig,
) -> Result<Vec<RedisEngine>, StoreError> {
    let mut engines = Vec::with_capacity(masters.len());
    for (i, (host, port)) in masters.iter().enumerate() {
        let home = home_of(owners, i).ok_or_else(|| {
            StoreError::new(
                StoreErrorKind::Unusable,
                format!("the master {host}:{port} serves no slot"),
            )
        })?;
        // Refused here rather than at each connection attempt.
        Client::open((host.as_str(), *port)).map_err(|e| {
            StoreError::new(
                StoreErrorKind::InvalidInput,
                format!("redis cluster master {host}:{port}: {e}"),
            )
        })?;
        engines.push(RedisEngine::start_on(
            Arc::new(Target::Cluster(slots.clone(), i)),
            config,
            &home,
            true,
        )?);
    }
    Ok(engines)
}

/// Waits until each master's engine answers, each for what is left until
/// `deadline` (500 ms at least), and checks `config.total_bytes` on each.
async fn wait_engines(
    engines: &[RedisEngine],
    masters: &[(String, u16)],
    config: &RedisConfig,
    deadline: tokio::time::Instant,
) -> Result<(), StoreError> {
    for (engine, (host, port)) in engines.iter().zip(masters) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !engine.wait_ready(left.max(Duration::from_millis(500))).await {
            return Err(StoreError::new(
                StoreErrorKind::Unusable,
                format!(
                    "the redis cluster master {host}:{port} did not answer within {:?}",
                    config.connect_timeout
                ),
            ));
        }
        if let Some(total) = config.total_bytes {
            crate::check_total_bytes(&engine.link, total, &format!("{host}:{port}")).await?;
        }
    }
    Ok(())
}

/// One server's connections to a Redis Cluster: an engine per master,
/// routed by hash slot.
#[derive(Debug)]
pub struct ClusterEngine {
    slots: Arc<Slots>,
    store: Arc<ShardedStore>,
    broker: Arc<ShardedBroker>,
    directory: Arc<ShardedDirectory>,
}

impl ClusterEngine {
    /// Reads the slot map from the first seed that answers (within
    /// `config.connect_timeout`), starts an engine per master with
    /// `config`'s settings, and waits until each answers. `config.url` must
    /// be a `redis+cluster://` URL. Fails on a map with a slot no master
    /// serves (the cluster is not fully set up), or a master that does not
    /// answer in time.
    pub async fn connect(config: RedisConfig) -> Result<ClusterEngine, StoreError> {
        let invalid = |text: String| StoreError::new(StoreErrorKind::InvalidInput, text);
        let address =
            crate::RedisAddress::parse(&config.url).map_err(|e| invalid(format!("redis url {:?}: {e}", config.url)))?;
        let crate::RedisAddress::Cluster { nodes: seeds } = address else {
            return Err(invalid(format!("{} is not a redis+cluster:// URL", config.url)));
        };
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let ranges = read_slot_map(&seeds, deadline).await?;
        let mut masters: Vec<(String, u16)> = ranges.iter().map(|r| r.master.clone()).collect();
        masters.sort();
        masters.dedup();
        let owners = owners_of(&masters, &ranges, masters.len());
        if let Some(slot) = owners.iter().position(|o| *o == NOBODY) {
            return Err(StoreError::new(
                StoreErrorKind::Unusable,
                format!(
                    "redis cluster at {}: slot {slot} is served by no master (is the cluster fully set up?)",
                    address_list(&seeds)
                ),
            ));
        }
        let slots = Arc::new(Slots::new(masters.clone(), ranges, seeds));
        let engines = start_engines(&masters, &owners, &slots, &config)?;
        wait_engines(&engines, &masters, &config, deadline).await?;
        let placement = Placement::Slots(slots.clone());
        let cluster = ClusterEngine {
            slots,
            store: Arc::new(ShardedStore::new(
                engines.iter().map(RedisEngine::store).collect(),
                placement.clone(),
            )),
            broker: Arc::new(ShardedBroker::new(
                engines.iter().map(RedisEngine::broker).collect(),
                placement.clone(),
            )),
            directory: Arc::new(ShardedDirectory::new(
                engines.iter().map(RedisEngine::directory).collect(),
                placement,
            )),
        };
        let routers = Routers {
            store: Arc::downgrade(&cluster.store),
            broker: Arc::downgrade(&cluster.broker),
            directory: Arc::downgrade(&cluster.directory),
            config,
        };
        tokio::spawn(poll(Arc::downgrade(&cluster.slots), routers));
        Ok(cluster)
    }

    /// The masters the engines are on now (`host:port`), in the order the
    /// engines are numbered: at start the masters ordered by address; an
    /// engine whose master failed over is on the promoted replica.
    pub fn masters(&self) -> Vec<String> {
        self.slots.addresses()
    }

    /// The history store.
    pub fn store(&self) -> Arc<ShardedStore> {
        self.store.clone()
    }

    /// The broker.
    pub fn broker(&self) -> Arc<ShardedBroker> {
        self.broker.clone()
    }

    /// The chat service's directory.
    pub fn directory(&self) -> Arc<ShardedDirectory> {
        self.directory.clone()
    }
}
