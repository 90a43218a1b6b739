//! Several independent Redis shards (`--redis-url` given several times, plain
//! or Sentinel): a group lives on shard `jump(fnv1a64(name), n)` — FNV-1a
//! 64-bit over the name's UTF-8 bytes, then Lamping and Veach's jump
//! consistent hash — as PROTOCOL.md fixes it, so every implementation places
//! groups alike.
//!
//! Every server must list the same shards in the same order, or two servers
//! would put one group on two shards. The list (each shard's address as
//! written) is recorded in every shard under [`SHARDS_KEY`] by the first
//! server that reaches it (`SET … NX GET`, one atomic command); a server that
//! finds another list there refuses to start, showing both. A shard that
//! does not answer at start-up does not stop the server: its groups answer
//! `unavailable`, and the check runs when it answers — a mismatch found then
//! is reported through [`ShardedEngine::failed`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use channelbox_core::{StoreError, StoreErrorKind};
use tokio::sync::mpsc;

use crate::router::{Placement, ShardedBroker, ShardedDirectory, ShardedStore};
use crate::{RedisAddress, RedisConfig, RedisEngine};

/// The key, in every shard, that holds the shard list (names, one a line).
pub const SHARDS_KEY: &str = "cb:shards";
/// How often a shard that did not answer at start-up is tried again.
const RECHECK_EVERY: Duration = Duration::from_millis(500);

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Lamping and Veach's jump consistent hash: a bucket in `0..buckets`
/// (0 when `buckets` is 0).
pub fn jump(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        // The paper's arithmetic, in floating point as published.
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    u32::try_from(b.max(0)).unwrap_or(0)
}

/// The shard of `group` among `shards`.
pub fn shard_of(group: &str, shards: usize) -> usize {
    jump(fnv1a64(group.as_bytes()), u32::try_from(shards).unwrap_or(u32::MAX)) as usize
}

/// The engines of several shards, behind one store, broker and directory.
#[derive(Debug)]
pub struct ShardedEngine {
    names: Vec<String>,
    store: Arc<ShardedStore>,
    broker: Arc<ShardedBroker>,
    directory: Arc<ShardedDirectory>,
    failures: Mutex<Option<mpsc::Receiver<StoreError>>>,
}

impl ShardedEngine {
    /// Starts an engine per URL (each with `template`'s settings), waits up
    /// to `template.connect_timeout` for each, and checks the shard list in
    /// those that answered; fails on no URL, a bad one, two naming one shard,
    /// or a shard that records another list.
    pub async fn connect(urls: &[String], template: &RedisConfig) -> Result<ShardedEngine, StoreError> {
        let invalid = |text: String| StoreError::new(StoreErrorKind::InvalidInput, text);
        if urls.is_empty() {
            return Err(invalid("no redis url given".to_owned()));
        }
        let mut addresses = Vec::new();
        for url in urls {
            let address = RedisAddress::parse(url).map_err(|e| invalid(format!("redis url {url:?}: {e}")))?;
            if matches!(address, RedisAddress::Cluster { .. }) {
                return Err(invalid(format!(
                    "{url}: a Redis Cluster cannot be one of several shards"
                )));
            }
            addresses.push(address);
        }
        let names: Vec<String> = addresses.iter().map(RedisAddress::shard_name).collect();
        if let Some(dup) = names.iter().enumerate().find(|(i, n)| names[..*i].contains(n)) {
            return Err(invalid(format!("the shard {} is listed twice", dup.1)));
        }
        let engines = addresses
            .iter()
            .map(|a| RedisEngine::start(a, template))
            .collect::<Result<Vec<_>, _>>()?;
        let (fail_tx, fail_rx) = mpsc::channel(engines.len().max(1));
        let checks = engines
            .iter()
            .enumerate()
            .map(|(i, e)| check_at_start(e, &names, i, template, &fail_tx));
        for result in futures_util::future::join_all(checks).await {
            result?;
        }
        let placement = Placement::Jump(engines.len());
        Ok(ShardedEngine {
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
            names,
            failures: Mutex::new(Some(fail_rx)),
        })
    }

    /// The shards' names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
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

    /// Resolves with the error when a shard that answered late records
    /// another shard list (the server must stop); pending forever otherwise.
    /// Only the first call waits; later ones are pending forever.
    pub async fn failed(&self) -> StoreError {
        let rx = self.failures.lock().unwrap_or_else(|p| p.into_inner()).take();
        match rx {
            Some(mut rx) => match rx.recv().await {
                Some(err) => err,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

/// Checks the shard list in `engine` if it answers within `wait`; otherwise
/// keeps trying in the background and reports a mismatch to `failures`.
async fn check_at_start(
    engine: &RedisEngine,
    names: &[String],
    index: usize,
    template: &RedisConfig,
    failures: &mpsc::Sender<StoreError>,
) -> Result<(), StoreError> {
    let total = template.total_bytes;
    if engine.wait_ready(template.connect_timeout).await {
        match check(engine, names, index, total).await {
            Err(err) if err.kind() == StoreErrorKind::Unusable => return Err(err),
            Ok(()) => return Ok(()),
            Err(_) => {}
        }
    }
    tracing::warn!(shard = %names[index], "a redis shard did not answer: its groups are unavailable until it does");
    let (engine, names, failures) = (engine.clone(), names.to_vec(), failures.clone());
    tokio::spawn(async move {
        loop {
            if engine.wait_ready(RECHECK_EVERY).await {
                match check(&engine, &names, index, total).await {
                    Ok(()) => return,
                    Err(err) if err.kind() == StoreErrorKind::Unusable => {
                        let _ = failures.send(err).await;
                        return;
                    }
                    Err(_) => {}
                }
            }
            tokio::time::sleep(RECHECK_EVERY).await;
        }
    });
    Ok(())
}

/// Records `names` in the shard, or compares them with the list there; a
/// different list is an [`StoreErrorKind::Unusable`] error showing both.
/// With `total` set, the shard must bound its memory itself, as one Redis
/// must (see [`RedisConfig::total_bytes`]).
async fn check(engine: &RedisEngine, names: &[String], index: usize, total: Option<u64>) -> Result<(), StoreError> {
    if let Some(total) = total {
        crate::check_total_bytes(&engine.link, total, &names[index]).await?;
    }
    let list = names.join("\n");
    let mut cmd = redis::cmd("SET");
    cmd.arg(SHARDS_KEY).arg(&list).arg("NX").arg("GET");
    let recorded: Option<String> = engine.link.query(&cmd).await?;
    match recorded {
        Some(recorded) if recorded != list => {
            let theirs: Vec<&str> = recorded.lines().collect();
            Err(StoreError::new(
                StoreErrorKind::Unusable,
                format!(
                    "the redis shards differ: this server lists [{}] but the shards record [{}]; \
                     every server must list the same shards in the same order",
                    names.join(", "),
                    theirs.join(", ")
                ),
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn jump_matches_the_reference_vectors() {
        // From the paper's C++ as other implementations test it.
        let cases: [(u64, u32, u32); 7] = [
            (1, 1, 0),
            (42, 57, 43),
            (256, 1024, 520),
            (3_735_883_980, 1, 0),
            (3_735_883_980, 666, 361),
            (16_045_690_984_833_335_023, 255, 237),
            (123_456, 1000, 984),
        ];
        for (key, buckets, want) in cases {
            assert_eq!(jump(key, buckets), want, "jump({key}, {buckets})");
        }
    }

    #[tokio::test]
    async fn bad_shard_lists_are_refused_before_connecting() {
        let config = RedisConfig::new("unused");
        let err = |urls: &[&str]| {
            let urls: Vec<String> = urls.iter().map(|u| (*u).to_owned()).collect();
            let config = config.clone();
            async move {
                ShardedEngine::connect(&urls, &config)
                    .await
                    .expect_err("refused")
                    .to_string()
            }
        };
        assert!(err(&[]).await.contains("no redis url"));
        assert!(err(&["redis://h:1/", "redis://h:1/"]).await.contains("listed twice"));
        assert!(err(&["redis://h:1/", "redis+cluster://h:2"]).await.contains("Cluster"));
        assert!(err(&["redis://h:1/", "nope"]).await.contains("unknown scheme"));
    }

    #[test]
    fn groups_spread_and_stay_when_shards_are_added() {
        let names: Vec<String> = (0..1000).map(|i| format!("group-{i}")).collect();
        let on_two: Vec<usize> = names.iter().map(|n| shard_of(n, 2)).collect();
        assert!(on_two.contains(&0) && on_two.contains(&1));
        for (n, two) in names.iter().zip(&on_two) {
            let three = shard_of(n, 3);
            assert!(three == *two || three == 2, "a group moves only to the new shard");
        }
        assert_eq!(shard_of("x", 1), 0);
    }
}
