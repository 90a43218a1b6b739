//! The slot map of a Redis Cluster (`CLUSTER SLOTS`): which master serves
//! each hash slot, read anew after a redirect and by `cluster`'s polling
//! task; the failovers and the masters added later that a reading shows
//! (see `cluster` for what the engines do about them).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use channelbox_core::{StoreError, StoreErrorKind};
use redis::{AsyncConnectionConfig, Client, Value};

use crate::keys::{self, group_slot, tag_slot, SLOTS};
use crate::link::{redirected, unavailable};

/// A slot no known master serves.
pub(crate) const NOBODY: u16 = u16::MAX;
/// A slot served by a master whose engine is being made (see `cluster::grow`).
const COMING: u16 = u16::MAX - 1;
/// The most masters followed (Redis Cluster's own advice is at most 1,000
/// nodes); the slots of masters past it answer `unavailable`.
const MAX_MASTERS: usize = 1000;
/// The slot map is read at most this often.
const REFRESH_GAP: Duration = Duration::from_millis(100);
/// How long one node may take to answer `CLUSTER SLOTS`.
const ASK_TIMEOUT: Duration = Duration::from_millis(1000);
/// One line of `CLUSTER SLOTS`: slots `start..=end` served by `master`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Range {
    start: u16,
    end: u16,
    pub(crate) master: (String, u16),
}

/// The masters of a Cluster and which serves each slot.
#[derive(Debug)]
pub(crate) struct Slots {
    /// Per engine, the master it is on now: at start the masters ordered
    /// by address (every server alike); an engine whose master failed moves
    /// to the replica promoted in its place (see [`follow_failovers`]).
    masters: RwLock<Vec<(String, u16)>>,
    /// Per engine (room for [`MAX_MASTERS`]), moves on each time it moves
    /// to another master.
    generations: Vec<AtomicU64>,
    /// How many engines the routers have: `masters` past it (added later)
    /// wait for `cluster::grow` to make theirs.
    served: AtomicUsize,
    /// The slot map last read.
    ranges: RwLock<Vec<Range>>,
    /// Per slot, the index in `masters` of the one serving it now
    /// ([`COMING`] while that master's engine is being made).
    owners: RwLock<Vec<u16>>,
    /// Wakes `cluster::poll` when a reading named a master to add.
    pub(crate) added: tokio::sync::Notify,
    /// When the map was last read, and the node that answered then (asked
    /// first next time: a failed master may take a timeout to refuse);
    /// held while reading it.
    refreshed: tokio::sync::Mutex<(tokio::time::Instant, Option<(String, u16)>)>,
    /// Where `CLUSTER SLOTS` is asked after the masters: the seeds.
    seeds: Vec<(String, u16)>,
}

impl Slots {
    pub(crate) fn new(masters: Vec<(String, u16)>, ranges: Vec<Range>, seeds: Vec<(String, u16)>) -> Slots {
        Slots {
            generations: (0..MAX_MASTERS).map(|_| AtomicU64::new(0)).collect(),
            served: AtomicUsize::new(masters.len()),
            owners: RwLock::new(owners_of(&masters, &ranges, masters.len())),
            ranges: RwLock::new(ranges),
            added: tokio::sync::Notify::new(),
            masters: RwLock::new(masters),
            refreshed: tokio::sync::Mutex::new((tokio::time::Instant::now(), None)),
            seeds,
        }
    }

    /// The engine of the master serving `group`'s slot now; `unavailable`
    /// when no known master serves it, or a redirect (to be sent again)
    /// while its master's engine is being made.
    pub(crate) fn master_of(&self, group: &str) -> Result<usize, StoreError> {
        let owners = self.owners.read().unwrap_or_else(|p| p.into_inner());
        match owners[group_slot(group) as usize] {
            NOBODY => Err(unavailable(format!(
                "no known master serves the slot of group {group:?}"
            ))),
            COMING => Err(redirected("ADDED", Some("its master joined the cluster"))),
            i => Ok(i as usize),
        }
    }

    /// The master engine `index` is on now.
    pub(crate) fn address(&self, index: usize) -> Option<(String, u16)> {
        self.masters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(index)
            .cloned()
    }

    /// Moves on each time engine `index` moves to another master (see
    /// [`crate::sentinel::Target::generation`]).
    pub(crate) fn generation(&self, index: usize) -> u64 {
        self.generations[index].load(Ordering::Acquire)
    }

    /// The masters the engines are on now (`host:port`), in engine order.
    pub(crate) fn addresses(&self) -> Vec<String> {
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
    /// promoted replica, masters added to the Cluster are listed for
    /// `cluster::grow`, then every slot gets its engine.
    fn apply(&self, ranges: &[Range]) {
        let mut masters = self.masters.write().unwrap_or_else(|p| p.into_inner());
        let before = self.owners.read().unwrap_or_else(|p| p.into_inner()).clone();
        for i in follow_failovers(&mut masters, &before, ranges) {
            let (host, port) = &masters[i];
            tracing::warn!(engine = i, %host, port = *port, "a redis cluster master failed over: following it");
            self.generations[i].fetch_add(1, Ordering::AcqRel);
        }
        let named: BTreeSet<&(String, u16)> = ranges.iter().map(|r| &r.master).collect();
        // A master added but not served yet that this reading no longer
        // names (its slots moved on, it left or failed) is forgotten, so that
        // it holds up no master added after it.
        let served = self.served.load(Ordering::Acquire);
        let listed = masters.len();
        let mut i = served;
        while i < masters.len() {
            if named.contains(&masters[i]) {
                i += 1;
            } else {
                masters.remove(i);
            }
        }
        if masters.len() < listed {
            // An engine being made for one of those numbers reconnects to
            // the master that has it now.
            for generation in &self.generations[served..listed] {
                generation.fetch_add(1, Ordering::AcqRel);
            }
        }
        for node in named {
            if !masters.contains(node) {
                if masters.len() == MAX_MASTERS {
                    tracing::error!(host = %node.0, port = node.1, "more redis cluster masters than followed: its slots are not served");
                    continue;
                }
                tracing::warn!(host = %node.0, port = node.1, "a redis cluster master was added: serving it");
                masters.push(node.clone());
                self.added.notify_one();
            }
        }
        *self.ranges.write().unwrap_or_else(|p| p.into_inner()) = ranges.to_vec();
        let owners = owners_of(&masters, ranges, self.served.load(Ordering::Acquire));
        *self.owners.write().unwrap_or_else(|p| p.into_inner()) = owners;
    }

    /// The masters added after start whose engines are not made yet: their
    /// index, address and home prefix (see [`home_in`]).
    pub(crate) fn unserved(&self) -> Vec<(usize, (String, u16), Option<String>)> {
        let masters = self.masters.read().unwrap_or_else(|p| p.into_inner());
        let ranges = self.ranges.read().unwrap_or_else(|p| p.into_inner());
        (self.served.load(Ordering::Acquire)..masters.len())
            .map(|i| (i, masters[i].clone(), home_in(&ranges, &masters[i])))
            .collect()
    }

    /// The home prefix each engine but the first should have now (see
    /// [`home_of`]): the homes of the servers agree once they read the same
    /// map, and a home whose slot moved to another master moves too.
    pub(crate) fn homes(&self) -> Vec<(usize, String)> {
        let owners = self.owners.read().unwrap_or_else(|p| p.into_inner());
        (1..self.served.load(Ordering::Acquire))
            .filter_map(|i| home_of(&owners, i).map(|home| (i, home)))
            .collect()
    }

    /// Engine `index`, the next, is in the routers now: its slots are
    /// placed on it.
    pub(crate) fn serve(&self, index: usize) {
        let masters = self.masters.read().unwrap_or_else(|p| p.into_inner());
        if index >= masters.len() {
            // Forgotten meanwhile: served when a master takes its number.
            return;
        }
        self.served.store(index + 1, Ordering::Release);
        let ranges = self.ranges.read().unwrap_or_else(|p| p.into_inner());
        *self.owners.write().unwrap_or_else(|p| p.into_inner()) = owners_of(&masters, &ranges, index + 1);
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

/// Per slot, the index in `masters` of its master ([`NOBODY`] if none;
/// [`COMING`] for one at or past `served`, whose engine is not made yet).
pub(crate) fn owners_of(masters: &[(String, u16)], ranges: &[Range], served: usize) -> Vec<u16> {
    let mut owners = vec![NOBODY; SLOTS];
    for r in ranges {
        if let Some(i) = masters.iter().position(|m| *m == r.master) {
            let owner = if i < served { i as u16 } else { COMING };
            let end = (r.end as usize).min(SLOTS - 1);
            owners[r.start as usize..=end].fill(owner);
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

/// Per slot, the smallest `N` whose tag `cb-N` hashes to it (every slot
/// has one; a few need `N` past 100,000), computed once.
fn home_tags() -> &'static [u32] {
    static TAGS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![u32::MAX; SLOTS];
        let mut missing = SLOTS;
        let mut n = 0u32;
        while missing > 0 && n < u32::MAX {
            let slot = tag_slot(&format!("cb-{n}")) as usize;
            if tags[slot] == u32::MAX {
                tags[slot] = n;
                missing -= 1;
            }
            n += 1;
        }
        tags
    })
}

/// The home prefix of the smallest tag among `slots`.
fn home_among(slots: impl Iterator<Item = usize>) -> Option<String> {
    let tags = home_tags();
    slots
        .map(|slot| tags[slot])
        .min()
        .map(|n| format!("{}:{{cb-{n}}}", keys::PREFIX))
}

/// The home prefix of master `index`: `cb:{cb-N}` for the smallest `N`
/// whose tag's slot that master serves (`None` when it serves none).
pub(crate) fn home_of(owners: &[u16], index: usize) -> Option<String> {
    home_among((0..owners.len()).filter(|slot| owners[*slot] as usize == index))
}

/// The home prefix of `master` in `ranges`: `cb:{cb-N}` for the smallest
/// `N` whose tag's slot it serves (`None` when it serves none).
fn home_in(ranges: &[Range], master: &(String, u16)) -> Option<String> {
    home_among(
        ranges
            .iter()
            .filter(|r| r.master == *master)
            .flat_map(|r| r.start as usize..=(r.end as usize).min(SLOTS - 1)),
    )
}

/// Reads the slot map from the first of `seeds` that answers with a slot
/// assigned, trying them all again every 100 ms until `deadline`.
pub(crate) async fn read_slot_map(
    seeds: &[(String, u16)],
    deadline: tokio::time::Instant,
) -> Result<Vec<Range>, StoreError> {
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

/// `host:port,host:port…`.
pub(crate) fn address_list(nodes: &[(String, u16)]) -> String {
    nodes
        .iter()
        .map(|(h, p)| format!("{h}:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
