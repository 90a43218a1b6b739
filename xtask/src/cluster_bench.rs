//! `cargo xtask bench --cluster`: the chat server as a cluster on Redis
//! processes of its own (free ports), against the single-process memory
//! store measured in the same run. Each configuration gets fresh servers (and
//! an emptied Redis), and the configurations take turns run by run:
//!
//! - `memory, 1 process`: the baseline, one server, no Redis;
//! - `redis, 1 server` and `redis, 3 servers`: 1,000 subscribers spread
//!   evenly, one publisher on every server;
//! - `redis, 3 servers, publish-heavy`: few subscribers and several
//!   publishers per server, for publishes per second through one Redis;
//! - the same two 3-server loads on Sentinel (a master, one replica, three
//!   sentinels; with and without `--redis-replicas 1`);
//! - the same two loads spread over two groups, on one Redis and on two
//!   shards (one group on each);
//! - the same two loads and two groups on a Redis Cluster of three masters
//!   (`redis+cluster://`), the groups' hash slots on different masters (the
//!   run records which master held each group, and fails if they shared
//!   one).
//!
//! Prints a table and writes target/bench/cluster.json: deliveries per server
//! CPU-second (all servers' CPU added up) and its ratio to the baseline, p99
//! latency, publishes per second, Redis CPU per publish (the CPU time of every
//! Redis process of the setup added up: masters, replica, sentinels, shards).

use std::process::Stdio;

use serde_json::{json, Value};

use crate::bench::{f, interleaved, listening, median, pinned, Plan};
use crate::redis_setups::Setup;

/// Where the servers keep history and exchange messages.
#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Memory,
    Single,
    /// Sentinel, with `--redis-replicas` this many.
    Sentinel(u8),
    Shards,
    /// A Redis Cluster of three masters.
    Cluster,
}

struct Config {
    name: &'static str,
    backend: Backend,
    servers: usize,
    subscribers: usize,
    publishers: usize,
    /// Messages, and the in-flight window, as multiples of the plan's.
    heavy: bool,
    /// The groups, messages and subscribers spread over them.
    groups: &'static str,
}

/// One group, as every row before sharding had.
const ONE_GROUP: &str = "bench";

/// Two groups on different shards of two: `jump(fnv1a64(name), 2)` (the
/// placement PROTOCOL.md fixes) is 1 for `bench-2` and 0 for `bench-3`, so
/// that both shards work (the run records each master's key count). On a
/// Cluster of three masters, whose slots `redis-cli --cluster create` splits
/// 0–5460, 5461–10922 and 10923–16383, their hash slots (CRC16 of the name,
/// modulo 16384) are 4091 and 8154: the first and the second master (the
/// run checks where their keys landed).
const TWO_GROUPS: &str = "bench-2,bench-3";

const fn config(name: &'static str, backend: Backend, servers: usize, heavy: bool) -> Config {
    let (subscribers, publishers) = if heavy { (3, 4) } else { (1000, 1) };
    Config {
        name,
        backend,
        servers,
        subscribers,
        publishers,
        heavy,
        groups: ONE_GROUP,
    }
}

/// `config`, with the messages spread over two groups.
const fn two_groups(config: Config) -> Config {
    Config {
        groups: TWO_GROUPS,
        ..config
    }
}

const CONFIGS: &[Config] = &[
    config("memory, 1 process (baseline)", Backend::Memory, 1, false),
    config("redis, 1 server", Backend::Single, 1, false),
    config("redis, 3 servers", Backend::Single, 3, false),
    config("redis, 3 servers, publish-heavy", Backend::Single, 3, true),
    config("sentinel, 3 servers", Backend::Sentinel(0), 3, false),
    config("sentinel, 3 servers, publish-heavy", Backend::Sentinel(0), 3, true),
    config("sentinel+replicas 1, 3 servers", Backend::Sentinel(1), 3, false),
    config("sentinel+replicas 1, 3 srv, pub-heavy", Backend::Sentinel(1), 3, true),
    two_groups(config("redis, 3 servers, 2 groups", Backend::Single, 3, false)),
    two_groups(config("redis, 3 srv, pub-heavy, 2 groups", Backend::Single, 3, true)),
    two_groups(config("2 shards, 3 servers, 2 groups", Backend::Shards, 3, false)),
    two_groups(config("2 shards, 3 srv, pub-heavy, 2 groups", Backend::Shards, 3, true)),
    two_groups(config(
        "cluster 3 masters, 3 servers, 2 groups",
        Backend::Cluster,
        3,
        false,
    )),
    two_groups(config("cluster, 3 srv, pub-heavy, 2 groups", Backend::Cluster, 3, true)),
];

/// The Redis processes of the run, started once and emptied between runs.
struct Setups {
    single: Setup,
    sentinel: Setup,
    shards: Setup,
    cluster: Setup,
}

impl Setups {
    fn start() -> Result<Setups, String> {
        Ok(Setups {
            single: Setup::single()?,
            sentinel: Setup::sentinel()?,
            shards: Setup::shards(2)?,
            cluster: Setup::cluster()?,
        })
    }

    fn of(&self, backend: Backend) -> Option<&Setup> {
        match backend {
            Backend::Memory => None,
            Backend::Single => Some(&self.single),
            Backend::Sentinel(_) => Some(&self.sentinel),
            Backend::Shards => Some(&self.shards),
            Backend::Cluster => Some(&self.cluster),
        }
    }
}

/// The chat server's arguments for `config`.
fn server_args(config: &Config, setup: Option<&Setup>) -> Vec<String> {
    let store = if setup.is_some() { "redis" } else { "memory" };
    let mut args: Vec<String> = ["--addr", "127.0.0.1:0", "--store", store].map(String::from).to_vec();
    if let Some(setup) = setup {
        args.extend(setup.server_args().iter().cloned());
    }
    if let Backend::Sentinel(n) = config.backend {
        args.extend(["--redis-replicas".to_owned(), n.to_string()]);
    }
    args
}

/// One configuration, one run, with fresh servers (and an empty Redis).
fn measure(config: &Config, setups: &Setups, plan: &Plan) -> Result<Value, String> {
    let setup = setups.of(config.backend);
    if let Some(setup) = setup {
        setup.flush()?;
    }
    let args = server_args(config, setup);
    let mut servers = Vec::new();
    for _ in 0..config.servers {
        servers.push(listening(pinned(None, "target/release/examples/chat", &args), "chat")?);
    }
    let list: Vec<String> = servers.iter().map(|(c, addr)| format!("{addr}={}", c.id())).collect();
    let (messages, inflight) = if config.heavy {
        (plan.messages * 3, 2000)
    } else {
        (plan.messages / 4, 200)
    };
    let redis_pids = setup.map_or_else(|| vec![0], Setup::pids);
    let redis_pids: Vec<String> = redis_pids.iter().map(u32::to_string).collect();
    let args = vec![
        format!("--servers {}", list.join(",")),
        format!("--redis-pid {}", redis_pids.join(",")),
        format!("--subscribers {}", config.subscribers),
        format!("--publishers {}", config.publishers),
        format!("--messages {}", messages.max(10)),
        format!("--inflight {inflight}"),
        format!("--groups {}", config.groups),
    ];
    let out = pinned(None, "target/release/cluster", &args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run the cluster load generator: {e}"));
    for (mut child, _) in servers {
        let _ = child.kill();
        let _ = child.wait();
    }
    let out = out?;
    if !out.status.success() {
        return Err(format!(
            "the cluster load generator failed on {} ({})",
            config.name, out.status
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut result: Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("load generator output {text:?}: {e}"))?;
    if let Some(setup) = setup {
        result["redis_keys_per_master"] = json!(setup.keys()?);
    }
    if let (Backend::Cluster, Some(setup)) = (config.backend, setup) {
        let groups: Vec<&str> = config.groups.split(',').collect();
        let owners = setup.masters_of(&groups)?;
        let mut seen = Vec::new();
        for (group, owner) in groups.iter().zip(&owners) {
            match owner {
                Some(i) if !seen.contains(i) => seen.push(*i),
                Some(i) => return Err(format!("{}: group {group} shares master {i} with another", config.name)),
                None => return Err(format!("{}: no master holds keys of group {group}", config.name)),
            }
        }
        result["redis_master_of_group"] = json!(owners);
    }
    Ok(result)
}

/// A figure of every run: the median, with the runs' minimum and maximum.
fn spread(runs: &[Value], path: &[&str]) -> Value {
    let values: Vec<f64> = runs.iter().map(|r| f(r, path)).collect();
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({"median": median(values), "min": min, "max": max})
}

/// One configuration's row of the results file.
fn row(config: &Config, runs: Vec<Value>, base: f64) -> Value {
    let m = |path: &[&str]| median(runs.iter().map(|r| f(r, path)).collect());
    let dpc = m(&["deliveries_per_server_cpu_sec"]);
    json!({
        "config": config.name,
        "servers": config.servers,
        "subscribers": config.subscribers,
        "publishers_per_server": config.publishers,
        "deliveries_per_server_cpu_sec": dpc,
        "ratio_to_memory_baseline": dpc / base.max(1.0),
        "deliveries_per_sec": m(&["deliveries_per_sec"]),
        "publishes_per_sec": m(&["publishes_per_sec"]),
        "redis_cpu_us_per_publish": m(&["redis_cpu_us_per_publish"]),
        "p50_us": m(&["latency_us", "p50"]),
        "p99_us": m(&["latency_us", "p99"]),
        "groups": config.groups,
        "lost": runs.iter().map(|r| f(r, &["lost"])).sum::<f64>(),
        "duplicated": runs.iter().map(|r| f(r, &["duplicated"])).sum::<f64>(),
        "publishes_refused": runs.iter().map(|r| f(r, &["publishes_refused"])).sum::<f64>(),
        "subscribers_ended_early": runs.iter().map(|r| f(r, &["subscribers_ended_early"])).sum::<f64>(),
        "runs_timed_out": runs.iter().filter(|r| r["timed_out"].as_bool() == Some(true)).count(),
        "spread": {
            "deliveries_per_server_cpu_sec": spread(&runs, &["deliveries_per_server_cpu_sec"]),
            "publishes_per_sec": spread(&runs, &["publishes_per_sec"]),
            "redis_cpu_us_per_publish": spread(&runs, &["redis_cpu_us_per_publish"]),
        },
        "runs": runs,
    })
}

fn print_row(row: &Value) {
    let g = |k: &str| row[k].as_f64().unwrap_or(0.0);
    eprintln!(
        "xtask bench --cluster: {:<38} {:>11.0} deliveries/server-cpu-s ({:.2}x)  {:>9.0} publishes/s  redis {:>6.1} µs/publish  p99 {:>7.0} µs  lost {} dup {} refused {} closed {} timed out {}",
        row["config"].as_str().unwrap_or(""),
        g("deliveries_per_server_cpu_sec"),
        g("ratio_to_memory_baseline"),
        g("publishes_per_sec"),
        g("redis_cpu_us_per_publish"),
        g("p99_us"),
        row["lost"],
        row["duplicated"],
        row["publishes_refused"],
        row["subscribers_ended_early"],
        row["runs_timed_out"],
    );
}

/// Runs every configuration `plan.runs` times, in turns, and reports.
pub(crate) fn run(plan: &Plan) -> Result<(), String> {
    let setups = Setups::start()?;
    let runs = interleaved(CONFIGS, plan.runs, |config| measure(config, &setups, plan))?;
    drop(setups);
    let mut rows = Vec::new();
    let mut baseline = None;
    for (config, runs) in CONFIGS.iter().zip(runs) {
        let dpc = median(runs.iter().map(|r| f(r, &["deliveries_per_server_cpu_sec"])).collect());
        let row = row(config, runs, *baseline.get_or_insert(dpc));
        print_row(&row);
        rows.push(row);
    }
    std::fs::create_dir_all("target/bench").map_err(|e| e.to_string())?;
    let path = "target/bench/cluster.json";
    let results = json!({"plan": {"messages": plan.messages, "runs": plan.runs}, "configs": rows});
    std::fs::write(path, serde_json::to_string_pretty(&results).unwrap_or_default()).map_err(|e| e.to_string())?;
    eprintln!("xtask bench --cluster: results written to {path}");
    Ok(())
}
