//! Redis as it is deployed, for tests: a master with a replica watched by
//! three sentinels ([`SentinelSet`]), a Redis Cluster of three masters, with
//! or without a replica each ([`ClusterSet`]), every process a
//! `redis-server` of the test's own on a free port, killed by its PID.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Child;
use std::time::{Duration, Instant};

use crate::testkit::{free_port, node_args, run_on, spawn_into};

/// The master name the sentinels of a [`SentinelSet`] monitor.
pub const MASTER_NAME: &str = "cbmaster";

/// One `redis-server` (or `redis-server --sentinel`) process this test owns.
#[derive(Debug)]
pub struct RedisProcess {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisProcess {
    /// A data node on a free port: no persistence, `extra` arguments after
    /// the defaults (`--replicaof …`, say).
    pub fn start(extra: &[&str]) -> RedisProcess {
        let mut p = RedisProcess::unstarted();
        p.start_node(extra);
        p
    }

    fn unstarted() -> RedisProcess {
        let port = free_port();
        let dir = tempfile::tempdir().expect("a temporary directory for redis");
        RedisProcess { port, dir, child: None }
    }

    /// Starts the data node again on the same port (empty), with `extra`.
    pub fn start_node(&mut self, extra: &[&str]) {
        self.kill();
        let port = self.port.to_string();
        // A replica's full sync starts at once (Redis waits 5 s by default
        // for more replicas to share a diskless transfer).
        let mut args = node_args(&port);
        args.extend(["--repl-diskless-sync-delay", "0"]);
        args.extend_from_slice(extra);
        let dir = self.dir.path().to_str().expect("a UTF-8 temporary path").to_owned();
        args.extend_from_slice(&["--dir", &dir]);
        self.spawn(&args);
    }

    /// A sentinel monitoring `master_port` as [`MASTER_NAME`] (quorum 2,
    /// down after 1 s).
    fn sentinel(master_port: u16) -> RedisProcess {
        let mut p = RedisProcess::unstarted();
        let config = format!(
            "port {}\nbind 127.0.0.1\ndir {dir}\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
             sentinel failover-timeout {MASTER_NAME} 4000\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            p.port,
            dir = p.dir.path().display(),
        );
        let path = p.dir.path().join("sentinel.conf");
        std::fs::write(&path, config).expect("write sentinel.conf");
        p.spawn(&[path.to_str().expect("a UTF-8 path"), "--sentinel"]);
        p
    }

    fn spawn(&mut self, args: &[&str]) {
        spawn_into(&mut self.child, self.port, args);
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills it with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs one command and returns its answer.
    pub fn run(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        run_on(self.port, args)
    }

    /// `master_repl_offset` from `INFO replication`: how much of the
    /// replication stream the node has.
    pub fn repl_offset(&self) -> u64 {
        let info: String = redis::from_redis_value(self.run(&["INFO", "replication"]).expect("info")).expect("text");
        info.lines()
            .find_map(|l| l.strip_prefix("master_repl_offset:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("master_repl_offset")
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A master, one replica of it and three sentinels.
#[derive(Debug)]
pub struct SentinelSet {
    /// The data nodes: index 0 starts as the master, 1 as its replica.
    pub nodes: [RedisProcess; 2],
    /// The sentinels.
    pub sentinels: Vec<RedisProcess>,
}

impl SentinelSet {
    /// Starts the five processes and waits until the replica is in sync and
    /// every sentinel knows it.
    pub fn start() -> SentinelSet {
        SentinelSet::start_via(|port| port)
    }

    /// As [`SentinelSet::start`], but the master is reached (by the replica
    /// and the sentinels) through the port `via` returns for the master's: a
    /// proxy the test controls, say.
    pub fn start_via(via: impl FnOnce(u16) -> u16) -> SentinelSet {
        let master = RedisProcess::start(&[]);
        let via_port = via(master.port());
        let master_port = via_port.to_string();
        let replica = RedisProcess::start(&["--replicaof", "127.0.0.1", &master_port]);
        let sentinels = (0..3).map(|_| RedisProcess::sentinel(via_port)).collect();
        let set = SentinelSet {
            nodes: [master, replica],
            sentinels,
        };
        set.wait_until(Duration::from_secs(20), "the replica in sync and known", |s| {
            s.replica_known()
        });
        set
    }

    /// `redis+sentinel://…/cbmaster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The master's port as the first sentinel that answers names it.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let v = s.run(&["SENTINEL", "get-master-addr-by-name", MASTER_NAME]).ok()?;
            let (_, port): (String, u16) = redis::from_redis_value(v).ok()?;
            Some(port)
        })
    }

    /// The index in [`SentinelSet::nodes`] of the master the sentinels name.
    pub fn master_index(&self) -> Option<usize> {
        let port = self.master_port()?;
        self.nodes.iter().position(|n| n.port() == port)
    }

    fn replica_known(&self) -> bool {
        let Ok(v) = self.nodes[1].run(&["INFO", "replication"]) else {
            return false;
        };
        let info: String = redis::from_redis_value(v).unwrap_or_default();
        let synced = info.contains("master_link_status:up");
        // A failover needs the replica known and the sentinels known to
        // each other (a majority authorizes it).
        let count = |s: &RedisProcess, what: &str| {
            s.run(&["SENTINEL", what, MASTER_NAME])
                .ok()
                .and_then(|v| redis::from_redis_value::<Vec<redis::Value>>(v).ok())
                .map_or(0, |r| r.len())
        };
        synced
            && self
                .sentinels
                .iter()
                .all(|s| count(s, "replicas") >= 1 && count(s, "sentinels") >= 2)
    }

    /// Polls `check` until it holds; panics naming `what` after `within`.
    pub fn wait_until(&self, within: Duration, what: &str, check: impl Fn(&SentinelSet) -> bool) {
        let deadline = Instant::now() + within;
        while !check(self) {
            assert!(Instant::now() < deadline, "{what}: not within {within:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A Redis Cluster of three masters (with a replica each, or none), every
/// node a process of the test's own, created with `redis-cli --cluster
/// create`.
#[derive(Debug)]
pub struct ClusterSet {
    /// The masters at start; `redis-cli` gives them slots 0-5460,
    /// 5461-10922 and 10923-16383 in this order.
    pub nodes: Vec<RedisProcess>,
    /// With [`ClusterSet::start_with_replicas`], `replicas[i]` replicates
    /// `nodes[i]`; empty otherwise.
    pub replicas: Vec<RedisProcess>,
}

/// The arguments of a cluster node whose peers count as failed after
/// `node_timeout_ms` without an answer.
fn cluster_node(node_timeout_ms: &str) -> RedisProcess {
    cluster_node_with(node_timeout_ms, &[])
}

/// [`cluster_node`] with more arguments.
fn cluster_node_with(node_timeout_ms: &str, extra: &[&str]) -> RedisProcess {
    let mut args = vec![
        "--cluster-enabled",
        "yes",
        "--cluster-node-timeout",
        node_timeout_ms,
        // A replica takes over however long ago it heard from its master.
        "--cluster-replica-validity-factor",
        "0",
    ];
    args.extend_from_slice(extra);
    RedisProcess::start(&args)
}

impl ClusterSet {
    /// Starts three cluster-enabled nodes, makes them one cluster, and waits
    /// until every node serves the whole map.
    pub fn start() -> ClusterSet {
        ClusterSet::create("2000", &[])
    }

    /// Three masters that go on serving their slots while another is down
    /// (`cluster-require-full-coverage no`): a Cluster partly available.
    pub fn start_partial() -> ClusterSet {
        ClusterSet::create("1000", &["--cluster-require-full-coverage", "no"])
    }

    /// Three masters with a replica each, which the Cluster promotes about
    /// 2 s after its master stops answering (node timeout 1 s); waits until
    /// every replica is in sync with its master.
    pub fn start_with_replicas() -> ClusterSet {
        let mut set = ClusterSet::create("1000", &[]);
        let replicas: Vec<RedisProcess> = (0..set.nodes.len()).map(|_| cluster_node("1000")).collect();
        for (replica, master) in replicas.iter().zip(&set.nodes) {
            let port = master.port().to_string();
            replica
                .run(&["CLUSTER", "MEET", "127.0.0.1", &port])
                .expect("CLUSTER MEET");
        }
        for (replica, master) in replicas.iter().zip(&set.nodes) {
            let id: String = redis::from_redis_value(master.run(&["CLUSTER", "MYID"]).expect("MYID")).expect("an id");
            // Refused until the replica has heard of the master by gossip.
            let deadline = Instant::now() + Duration::from_secs(20);
            while replica.run(&["CLUSTER", "REPLICATE", &id]).is_err() {
                assert!(Instant::now() < deadline, "CLUSTER REPLICATE {id}: not within 20 s");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        set.replicas = replicas;
        set.wait_until(Duration::from_secs(20), "every replica in sync", |s| {
            s.settled()
                && s.replicas.iter().all(|r| {
                    r.slot_map() == s.nodes[0].slot_map()
                        && r.run(&["INFO", "replication"])
                            .ok()
                            .and_then(|v| redis::from_redis_value::<String>(v).ok())
                            .is_some_and(|i| i.contains("master_link_status:up"))
                })
        });
        set
    }

    /// Adds a master serving no slot yet (as `redis-cli --cluster
    /// add-node` does: `CLUSTER MEET`), waits until every node knows it,
    /// and returns its index in `nodes`; [`ClusterSet::migrate_slot`] then
    /// moves slots to it.
    pub fn add_master(&mut self) -> usize {
        let node = cluster_node("2000");
        let port = self.nodes[0].port().to_string();
        node.run(&["CLUSTER", "MEET", "127.0.0.1", &port])
            .expect("CLUSTER MEET");
        let new_port = node.port().to_string();
        self.nodes.push(node);
        self.wait_until(Duration::from_secs(20), "every node knows the added master", |s| {
            s.settled()
                && s.nodes.iter().all(|n| {
                    n.run(&["CLUSTER", "NODES"])
                        .ok()
                        .and_then(|v| redis::from_redis_value::<String>(v).ok())
                        .is_some_and(|nodes| nodes.contains(&format!(":{new_port}@")))
                })
        });
        self.nodes.len() - 1
    }

    /// The port of the master serving `slot` now, as the first node that
    /// answers (masters at start, then replicas) sees it.
    pub fn master_port(&self, slot: u16) -> Option<u16> {
        let map = self
            .nodes
            .iter()
            .chain(&self.replicas)
            .find_map(RedisProcess::slot_map)?;
        map.iter()
            .find(|(s, e, _)| *s <= i64::from(slot) && i64::from(slot) <= *e)
            .and_then(|(_, _, p)| u16::try_from(*p).ok())
    }

    /// The node (master or replica) listening on `port`.
    pub fn node_on(&self, port: u16) -> Option<&RedisProcess> {
        self.nodes.iter().chain(&self.replicas).find(|n| n.port() == port)
    }

    fn create(node_timeout_ms: &str, extra: &[&str]) -> ClusterSet {
        let nodes: Vec<RedisProcess> = (0..3).map(|_| cluster_node_with(node_timeout_ms, extra)).collect();
        let cli = std::env::var("CHANNELBOX_REDIS_CLI").unwrap_or_else(|_| "redis-cli".to_owned());
        let mut cmd = std::process::Command::new(&cli);
        cmd.args(["--cluster", "create"]);
        for n in &nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port()));
        }
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cli} ({e})"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let set = ClusterSet {
            nodes,
            replicas: Vec::new(),
        };
        set.wait_until(Duration::from_secs(20), "every node sees the cluster ok", |s| {
            s.settled()
        });
        set
    }

    /// `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Every node says `cluster_state:ok` and knows the same slot owners.
    fn settled(&self) -> bool {
        let maps: Vec<Option<Vec<(i64, i64, i64)>>> = self.nodes.iter().map(|n| n.slot_map()).collect();
        let ok = self.nodes.iter().all(|n| {
            n.run(&["CLUSTER", "INFO"])
                .ok()
                .and_then(|v| redis::from_redis_value::<String>(v).ok())
                .is_some_and(|i| i.contains("cluster_state:ok"))
        });
        ok && maps[0].is_some() && maps.iter().all(|m| *m == maps[0])
    }

    /// The index of the node serving `slot` (by the first node's map).
    pub fn owner_of(&self, slot: u16) -> usize {
        let map = self.nodes[0].slot_map().expect("a slot map");
        let port = map
            .iter()
            .find(|(s, e, _)| *s <= i64::from(slot) && i64::from(slot) <= *e)
            .map(|(_, _, p)| *p)
            .expect("an owner");
        self.nodes
            .iter()
            .position(|n| i64::from(n.port()) == port)
            .expect("a node of the set")
    }

    /// Moves `slot` from its master to node `to` as `redis-cli --cluster
    /// reshard` does: `IMPORTING` on the target, `MIGRATING` on the source,
    /// `MIGRATE` of its keys `batch` at a time (with `pause` between
    /// batches), then `SETSLOT … NODE` on every node.
    pub fn migrate_slot(&self, slot: u16, to: usize, batch: usize, pause: Duration) {
        let from = self.owner_of(slot);
        assert_ne!(from, to, "slot {slot} is on node {to} already");
        let id = |i: usize| -> String {
            redis::from_redis_value(self.nodes[i].run(&["CLUSTER", "MYID"]).expect("CLUSTER MYID")).expect("an id")
        };
        let (from_id, to_id) = (id(from), id(to));
        let slot_text = slot.to_string();
        let batch_text = batch.to_string();
        self.nodes[to]
            .run(&["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &from_id])
            .expect("IMPORTING");
        self.nodes[from]
            .run(&["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &to_id])
            .expect("MIGRATING");
        let to_port = self.nodes[to].port().to_string();
        loop {
            let keys: Vec<String> = redis::from_redis_value(
                self.nodes[from]
                    .run(&["CLUSTER", "GETKEYSINSLOT", &slot_text, &batch_text])
                    .expect("GETKEYSINSLOT"),
            )
            .expect("keys");
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            self.nodes[from].run(&args).expect("MIGRATE");
            std::thread::sleep(pause);
        }
        // The target first, then the source (as redis-cli does), then the rest.
        let mut order = vec![to, from];
        order.extend((0..self.nodes.len()).filter(|i| *i != to && *i != from));
        for i in order {
            self.nodes[i]
                .run(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id])
                .expect("SETSLOT NODE");
        }
    }

    /// Polls `check` until it holds; panics naming `what` after `within`.
    pub fn wait_until(&self, within: Duration, what: &str, check: impl Fn(&ClusterSet) -> bool) {
        let deadline = Instant::now() + within;
        while !check(self) {
            assert!(Instant::now() < deadline, "{what}: not within {within:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl RedisProcess {
    /// `CLUSTER SLOTS` as `(start, end, master port)`, sorted.
    fn slot_map(&self) -> Option<Vec<(i64, i64, i64)>> {
        let v = self.run(&["CLUSTER", "SLOTS"]).ok()?;
        let redis::Value::Array(lines) = v else { return None };
        let mut map = Vec::new();
        for line in lines {
            let redis::Value::Array(parts) = line else { return None };
            let int = |v: &redis::Value| match v {
                redis::Value::Int(i) => Some(*i),
                _ => None,
            };
            let redis::Value::Array(master) = parts.get(2)? else {
                return None;
            };
            map.push((int(parts.first()?)?, int(parts.get(1)?)?, int(master.get(1)?)?));
        }
        map.sort_unstable();
        Some(map)
    }
}
