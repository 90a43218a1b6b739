//! `cargo xtask bench --cluster`: the chat server as a cluster on one Redis
//! (a redis-server of its own on a free port), against the single-process
//! memory store measured in the same run. Each configuration gets fresh
//! processes, and the configurations take turns run by run:
//!
//! - `memory, 1 process`: the baseline, one server, no Redis;
//! - `redis, 1 server` and `redis, 3 servers`: 1,000 subscribers spread
//!   evenly, one publisher on every server;
//! - `redis, 3 servers, publish-heavy`: few subscribers and several
//!   publishers per server, for publishes per second through one Redis.
//!
//! Prints a table and writes target/bench/cluster.json: deliveries per server
//! CPU-second (all servers' CPU added up) and its ratio to the baseline, p99
//! latency, publishes per second, Redis CPU per publish.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bench::{f, interleaved, listening, median, pinned, Plan};

struct Config {
    name: &'static str,
    store: &'static str,
    servers: usize,
    subscribers: usize,
    publishers: usize,
    /// Messages, and the in-flight window, as multiples of the plan's.
    heavy: bool,
}

const CONFIGS: &[Config] = &[
    Config {
        name: "memory, 1 process (baseline)",
        store: "memory",
        servers: 1,
        subscribers: 1000,
        publishers: 1,
        heavy: false,
    },
    Config {
        name: "redis, 1 server",
        store: "redis",
        servers: 1,
        subscribers: 1000,
        publishers: 1,
        heavy: false,
    },
    Config {
        name: "redis, 3 servers",
        store: "redis",
        servers: 3,
        subscribers: 1000,
        publishers: 1,
        heavy: false,
    },
    Config {
        name: "redis, 3 servers, publish-heavy",
        store: "redis",
        servers: 3,
        subscribers: 3,
        publishers: 4,
        heavy: true,
    },
];

/// A redis-server of the benchmark's own, killed on drop.
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile_dir::Dir,
}

mod tempfile_dir {
    /// A directory removed on drop.
    pub(crate) struct Dir(pub(crate) std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Redis {
    fn start() -> Result<Redis, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let dir = std::env::temp_dir().join(format!("channelbox-cluster-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start redis-server ({e}); install it: apt-get install -y redis-server"))?;
        let redis = Redis {
            child,
            port,
            _dir: tempfile_dir::Dir(dir),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.command("PING").as_deref() != Ok("+PONG") {
            if Instant::now() > deadline {
                return Err("redis-server did not answer".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(redis)
    }

    /// Sends one inline command and returns the first line of the answer.
    fn command(&self, line: &str) -> Result<String, String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        s.write_all(format!("{line}\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_owned())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One configuration, one run, with fresh servers (and an empty Redis).
fn measure(config: &Config, redis: &Redis, plan: &Plan) -> Result<Value, String> {
    redis.command("FLUSHALL")?;
    let url = format!("redis://127.0.0.1:{}/", redis.port);
    let mut servers = Vec::new();
    for _ in 0..config.servers {
        let mut args: Vec<String> = ["--addr", "127.0.0.1:0", "--store", config.store]
            .map(String::from)
            .to_vec();
        if config.store == "redis" {
            args.extend(["--redis-url".to_owned(), url.clone()]);
        }
        servers.push(listening(pinned(None, "target/release/examples/chat", &args), "chat")?);
    }
    let list: Vec<String> = servers.iter().map(|(c, addr)| format!("{addr}={}", c.id())).collect();
    let (messages, inflight) = if config.heavy {
        (plan.messages * 3, 2000)
    } else {
        (plan.messages / 4, 200)
    };
    let redis_pid = if config.store == "redis" { redis.child.id() } else { 0 };
    let args = vec![
        format!("--servers {}", list.join(",")),
        format!("--redis-pid {redis_pid}"),
        format!("--subscribers {}", config.subscribers),
        format!("--publishers {}", config.publishers),
        format!("--messages {}", messages.max(10)),
        format!("--inflight {inflight}"),
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
        return Err(format!("the cluster load generator failed ({})", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).map_err(|e| format!("load generator output {text:?}: {e}"))
}

/// Runs every configuration `plan.runs` times, in turns, and reports.
pub(crate) fn run(plan: &Plan) -> Result<(), String> {
    let redis = Redis::start()?;
    let runs = interleaved(CONFIGS, plan.runs, |config| measure(config, &redis, plan))?;
    let mut rows = Vec::new();
    let mut baseline = None;
    for (config, runs) in CONFIGS.iter().zip(runs) {
        let m = |path: &[&str]| median(runs.iter().map(|r| f(r, path)).collect());
        let dpc = m(&["deliveries_per_server_cpu_sec"]);
        let base = *baseline.get_or_insert(dpc);
        let row = json!({
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
            "lost": runs.iter().map(|r| f(r, &["lost"])).sum::<f64>(),
            "duplicated": runs.iter().map(|r| f(r, &["duplicated"])).sum::<f64>(),
            "runs": runs,
        });
        eprintln!(
            "xtask bench --cluster: {:<34} {:>11.0} deliveries/server-cpu-s ({:.2}x)  {:>9.0} publishes/s  redis {:>5.1} µs/publish  p99 {:>7.0} µs  lost {} dup {}",
            config.name,
            dpc,
            row["ratio_to_memory_baseline"].as_f64().unwrap_or(0.0),
            row["publishes_per_sec"].as_f64().unwrap_or(0.0),
            row["redis_cpu_us_per_publish"].as_f64().unwrap_or(0.0),
            row["p99_us"].as_f64().unwrap_or(0.0),
            row["lost"],
            row["duplicated"],
        );
        rows.push(row);
    }
    std::fs::create_dir_all("target/bench").map_err(|e| e.to_string())?;
    let path = "target/bench/cluster.json";
    let results = json!({"plan": {"messages": plan.messages, "runs": plan.runs}, "configs": rows});
    std::fs::write(path, serde_json::to_string_pretty(&results).unwrap_or_default()).map_err(|e| e.to_string())?;
    eprintln!("xtask bench --cluster: results written to {path}");
    Ok(())
}
