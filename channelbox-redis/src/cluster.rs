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
//!   [`REFRESH_GAP`]); a request refused that way did not run, and the
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
//!   one serving most of the slots it served ([`follow_failovers`]). Its
//!   [`Target`] generation moves on, so its command link and its
//!   subscription connection reconnect there, as after a Sentinel
//!   failover: the same floors, the reconnect check of every group it has a
//!   floor for, the hold of appends after a changed `run_id`, and `Back`
//!   once its subscriptions are restored, after which the box checks every
//!   group's head and fills what it missed. A promoted replica that lacked
//!   writes is thus found by the rollback check (the group moves to a new
//!   epoch, its members are closed with 4002). Until the new master answers,
//!   that engine's groups answer `unavailable`. A master that is not a
//!   promoted replica of one at start (added later, its slots resharded to
//!   it) is not followed: its slots answer `unavailable` until a restart.
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

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use channelbox_core::{StoreError, StoreErrorKind};
use redis::{AsyncConnectionConfig, Client, Value};

use crate::keys::{self, group_slot, tag_slot, SLOTS};
use crate::router::{Placement, ShardedBroker, ShardedDirectory, ShardedStore};
use crate::sentinel::Target;
use crate::{RedisConfig, RedisEngine};

/// A slot no known master serves.
const NOBODY: u16 = u16::MAX;
/// The slot map is read at most this often.
const REFRESH_GAP: Duration = Duration::from_millis(100);
/// How long one node may take to answer `CLUSTER SLOTS`.
const ASK_TIMEOUT: Duration = Duration::from_millis(1000);
/// How often the slot map is read besides after a redirect: a failover
/// refuses nothing with `MOVED` (the failed master just does not answer),
/// so it is found this way.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// One line of `CLUSTER SLOTS`: slots `start..=end` served by `master`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Range {
    start: u16,
    end: u16,
    master: (String, u16),
}

/// The masters of a Cluster and which serves each slot.
#[derive(Debug)]
pub(crate) struct Slots {
    /// Per engine, the master it is on now: at start the masters ordered
    /// by address (every server alike); an engine whose master failed moves
    /// to the replica promoted in its place (see [`follow_failovers`]).
    masters: RwLock<Vec<(String, u16)>>,
    /// Per engine, moves on each time it moves to another master.
    generations: Vec<AtomicU64>,
    /// Per slot, the index in `masters` of the one serving it now.
    owners: RwLock<Vec<u16>>,
    /// When the map was last read, and the node that answered then (asked
    /// first next time: a failed master may take a timeout to refuse);
    /// held while reading it.
    refreshed: tokio::sync::Mutex<(tokio::time::Instant, Option<(String, u16)>)>,
    /// Where `CLUSTER SLOTS` is asked after the masters: the seeds.
    seeds: Vec<(String, u16)>,
}

impl Slots {
    fn new(masters: Vec<(String, u16)>, owners: Vec<u16>, seeds: Vec<(String, u16)>) -> Slots {
        Slots {
            generations: masters.iter().map(|_| AtomicU64::new(0)).collect(),
            masters: RwLock::new(masters),
            owners: RwLock::new(owners),
            refreshed: tokio::sync::Mutex::new((tokio::time::Instant::now(), None)),
            seeds,
        }
    }

    /// The master serving `group`'s slot now.
    pub(crate) fn master_of(&self, group: &str) -> Option<usize> {
        let owners = self.owners.read().unwrap_or_else(|p| p.into_inner());
        match owners[group_slot(group) as usize] {
            NOBODY => None,
            i => Some(i as usize),
        }
    }

    /// The master engine `index` is on now.
    pub(crate) fn address(&self, index: usize) -> (String, u16) {
        self.masters.read().unwrap_or_else(|p| p.into_inner())[index].clone()
    }

    /// Moves on each time engine `index` moves to another master (see
    /// [`Target::generation`]).
    pub(crate) fn generation(&self, index: usize) -> u64 {
        self.generations[index].load(Ordering::Acquire)
    }

    /// The masters the engines are on now (`host:port`), in engine order.
    fn addresses(&self) -> Vec<String> {
        let masters = self.masters.read().unwrap_or_else(|p| p.into_inner());
        masters.iter().map(|(h, p)| format!("{h}:{p}")).collect()
    }

    /// Reads the slot map anew from the first node that answers with one —
    /// the one that answered last time, the masters, then the seeds (at
    /// most once per [`REFRESH_GAP`]; callers that arrive meanwhile wait for
    /// the reading under way) — and follows failovers it shows.
    pub(crate) async fn refresh(&self) {
        let mut last = self.refreshed.lock().await;
        if last.0.elapsed() < REFRESH_GAP {
            return;
        }
        let mut asked: Vec<(String, u16)> = last.1.iter().cloned().collect();
        let masters = self.masters.read().unwrap_or_else(|p| p.into_inner()).clone();
        for node in masters.into_iter().chain(self.seeds.iter().cloned()) {
            if !asked.contains(&node) {
                asked.push(node);
            }
        }
        last.1 = None;
        for node in asked {
            match ask_slots(&node).await {
                Ok(ranges) if !ranges.is_empty() => {
                    self.apply(&ranges);
                    last.1 = Some(node);
                    break;
                }
                _ => {}
            }
        }
        last.0 = tokio::time::Instant::now();
    }

    /// Takes a slot map read: engines whose master failed over move to the
    /// promoted replica, then every slot gets its engine.
    fn apply(&self, ranges: &[Range]) {
        let mut masters = self.masters.write().unwrap_or_else(|p| p.into_inner());
        let before = self.owners.read().unwrap_or_else(|p| p.into_inner()).clone();
        for i in follow_failovers(&mut masters, &before, ranges) {
            let (host, port) = &masters[i];
            tracing::warn!(engine = i, %host, port = *port, "a redis cluster master failed over: following it");
            self.generations[i].fetch_add(1, Ordering::AcqRel);
        }
        let owners = owners_of(&masters, ranges);
        *self.owners.write().unwrap_or_else(|p| p.into_inner()) = owners;
    }
}

/// Reads the slot map every [`POLL_EVERY`] until the engine is gone.
async fn poll(slots: Weak<Slots>) {
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        let Some(slots) = slots.upgrade() else { return };
        slots.refresh().await;
    }
}

/// A failover in `ranges`: each master it names that no engine is on (in
/// address order) takes the place of the engine that served most of its
/// slots in `owners` (the map before), if that engine's master is no
/// longer named — it failed, and this is the replica promoted in its
/// place. A master that served none of an engine's slots (added later) is
/// not followed. Returns the engines moved.
fn follow_failovers(masters: &mut [(String, u16)], owners: &[u16], ranges: &[Range]) -> Vec<usize> {
    let named: BTreeSet<&(String, u16)> = ranges.iter().map(|r| &r.master).collect();
    let newcomers: Vec<(String, u16)> = named
        .iter()
        .filter(|m| !masters.contains(m))
        .map(|m| (*m).clone())
        .collect();
    let mut moved = Vec::new();
    for node in newcomers {
        let mut served = vec![0usize; masters.len()];
        for r in ranges.iter().filter(|r| r.master == node) {
            let end = (r.end as usize).min(SLOTS - 1);
            for owner in &owners[r.start as usize..=end] {
                if let Some(n) = served.get_mut(*owner as usize) {
                    *n += 1;
                }
            }
        }
        let gone = (0..masters.len())
            .filter(|i| served[*i] > 0 && !named.contains(&masters[*i]))
            .max_by_key(|i| (served[*i], std::cmp::Reverse(*i)));
        if let Some(i) = gone {
            masters[i] = node;
            moved.push(i);
        }
    }
    moved
}

/// Per slot, the index in `masters` of its master ([`NOBODY`] if none).
fn owners_of(masters: &[(String, u16)], ranges: &[Range]) -> Vec<u16> {
    let mut owners = vec![NOBODY; SLOTS];
    for r in ranges {
        if let Some(i) = masters.iter().position(|m| *m == r.master) {
            let end = (r.end as usize).min(SLOTS - 1);
            for owner in &mut owners[r.start as usize..=end] {
                *owner = i as u16;
            }
        }
    }
    owners
}

/// `CLUSTER SLOTS` of one node.
async fn ask_slots(node: &(String, u16)) -> Result<Vec<Range>, StoreError> {
    let unusable = |what: String| {
        StoreError::new(
            StoreErrorKind::Io,
            format!("redis cluster {}:{}: {what}", node.0, node.1),
        )
    };
    let client = Client::open((node.0.as_str(), node.1)).map_err(|e| unusable(e.to_string()))?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(ASK_TIMEOUT))
        .set_response_timeout(Some(ASK_TIMEOUT));
    let answer = async {
        let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
        redis::cmd("CLUSTER").arg("SLOTS").query_async::<Value>(&mut conn).await
    };
    let value = tokio::time::timeout(ASK_TIMEOUT * 2, answer)
        .await
        .map_err(|_| unusable("no answer in time".to_owned()))?
        .map_err(|e| unusable(format!("CLUSTER SLOTS failed ({e})")))?;
    parse_slots(&value, &node.0).ok_or_else(|| unusable("unexpected answer to CLUSTER SLOTS".to_owned()))
}

/// `CLUSTER SLOTS`: `[[start, end, [host, port, id, …], replicas…], …]`. A
/// master shown without a host (`""`, or `?` while unknown) is at the host
/// asked.
fn parse_slots(value: &Value, asked_host: &str) -> Option<Vec<Range>> {
    let Value::Array(lines) = value else { return None };
    let int = |v: &Value| match v {
        Value::Int(i) => u16::try_from(*i).ok(),
        _ => None,
    };
    let mut ranges = Vec::with_capacity(lines.len());
    for line in lines {
        let Value::Array(parts) = line else { return None };
        let (start, end) = (int(parts.first()?)?, int(parts.get(1)?)?);
        let Value::Array(master) = parts.get(2)? else {
            return None;
        };
        let host = match master.first()? {
            Value::BulkString(h) => String::from_utf8(h.clone()).ok()?,
            Value::SimpleString(h) => h.clone(),
            _ => return None,
        };
        let host = if host.is_empty() || host == "?" {
            asked_host.to_owned()
        } else {
            host
        };
        ranges.push(Range {
            start,
            end,
            master: (host, int(master.get(1)?)?),
        });
    }
    Some(ranges)
}

/// The home prefix of master `index`: `cb:{cb-N}` for the smallest `N`
/// whose tag's slot that master serves (`None` when it serves none).
fn home_of(owners: &[u16], index: usize) -> Option<String> {
    (0..100_000u32)
        .find(|n| owners[tag_slot(&format!("cb-{n}")) as usize] as usize == index)
        .map(|n| format!("{}:{{cb-{n}}}", keys::PREFIX))
}

/// Reads the slot map from the first of `seeds` that answers with a slot
/// assigned, trying them all again every 100 ms until `deadline`.
async fn read_slot_map(seeds: &[(String, u16)], deadline: tokio::time::Instant) -> Result<Vec<Range>, StoreError> {
    loop {
        let mut last = None;
        for seed in seeds {
            match ask_slots(seed).await {
                Ok(ranges) if !ranges.is_empty() => {
                    last = Some(Ok(ranges));
                    break;
                }
                Ok(_) => last = Some(Err(StoreError::new(StoreErrorKind::Unusable, "no slot is assigned"))),
                Err(err) => last = Some(Err(err)),
            }
        }
        match last {
            Some(Ok(ranges)) => return Ok(ranges),
            Some(Err(err)) if tokio::time::Instant::now() >= deadline => {
                return Err(StoreError::new(
                    StoreErrorKind::Unusable,
                    format!("redis cluster at {}: {err}", address_list(seeds)),
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
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
        let owners = owners_of(&masters, &ranges);
        if let Some(slot) = owners.iter().position(|o| *o == NOBODY) {
            return Err(StoreError::new(
                StoreErrorKind::Unusable,
                format!(
                    "redis cluster at {}: slot {slot} is served by no master (is the cluster fully set up?)",
                    address_list(&seeds)
                ),
            ));
        }
        let slots = Arc::new(Slots::new(masters.clone(), owners.clone(), seeds));
        let engines = start_engines(&masters, &owners, &slots, &config)?;
        wait_engines(&engines, &masters, &config, deadline).await?;
        tokio::spawn(poll(Arc::downgrade(&slots)));
        let placement = Placement::Slots(slots.clone());
        Ok(ClusterEngine {
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
        })
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

fn address_list(nodes: &[(String, u16)]) -> String {
    nodes
        .iter()
        .map(|(h, p)| format!("{h}:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
