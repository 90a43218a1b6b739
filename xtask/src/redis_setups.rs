//! The Redis setups of `cargo xtask bench --cluster`, every process a
//! `redis-server` of the benchmark's own on a free port (never the machine's
//! shared one), killed by its PID on drop: one Redis, a Sentinel set (a
//! master, one replica, three sentinels), two independent shards and a Redis
//! Cluster of three masters (made one with `redis-cli --cluster create`, as
//! the test kit's `ClusterSet` does). The
//! benchmark adds up the CPU time of every process of a setup, sentinels and
//! replicas included, since an operator pays for all of them.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The master name the sentinels monitor.
const MASTER_NAME: &str = "cbbench";

/// A directory removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One `redis-server` process (a data node or a sentinel), killed on drop.
pub(crate) struct Node {
    child: Child,
    port: u16,
    _dir: Dir,
}

/// A port nobody listens on now, on 127.0.0.1.
/// A free port whose cluster bus port (the port + 10000) exists too: a
/// cluster-enabled redis-server on a port above 55535 refuses to start, and
/// the kernel hands out ports up to 60999.
pub(crate) fn free_port() -> Result<u16, String> {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("no free port: {e}"))?;
        if port <= 65535 - 10000 {
            return Ok(port);
        }
    }
}

/// The arguments every data node starts with: `port`, on 127.0.0.1 only,
/// with no automatic persistence.
pub(crate) fn node_args(port: &str) -> Vec<&str> {
    vec![
        "--port",
        port,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
}

/// Starts `redis-server` with `args` (which must set the port to `port`)
/// and waits until it answers `PING`; one that never answers is killed.
pub(crate) fn spawn_redis<S: AsRef<OsStr>>(port: u16, args: impl IntoIterator<Item = S>) -> Result<Child, String> {
    let mut child = Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start redis-server ({e}); install it: apt-get install -y redis-server"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_command(port, "PING").as_deref() != Ok("+PONG") {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("redis-server on port {port} did not answer"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// Sends one inline command to the Redis on `port` and returns the first
/// line of the answer.
pub(crate) fn redis_command(port: u16, line: &str) -> Result<String, String> {
    Ok(redis_reply(port, line, false)?.lines().next().unwrap_or("").to_owned())
}

/// Sends one inline command to the Redis on `port` and returns the answer:
/// all of it when `whole` (followed by `QUIT`, so that Redis closes the
/// connection after the last byte), else the first read.
fn redis_reply(port: u16, line: &str, whole: bool) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let quit = if whole { "QUIT\r\n" } else { "" };
    s.write_all(format!("{line}\r\n{quit}").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    if whole {
        s.take(1 << 20).read_to_end(&mut buf).map_err(|e| e.to_string())?;
    } else {
        buf.resize(256, 0);
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        buf.truncate(n);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

impl Node {
    /// Starts `redis-server` with `args` (which must set the port to `port`)
    /// and waits until it answers `PING`.
    fn spawn(port: u16, dir: PathBuf, args: &[String]) -> Result<Node, String> {
        // The directory goes away on drop, even if the server never answers.
        let dir = Dir(dir);
        let child = spawn_redis(port, args)?;
        Ok(Node { child, port, _dir: dir })
    }

    fn fresh_dir(port: u16) -> Result<PathBuf, String> {
        let dir = std::env::temp_dir().join(format!("channelbox-cluster-bench-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        Ok(dir)
    }

    /// A data node without persistence; `extra` after the defaults.
    fn data(extra: &[&str]) -> Result<Node, String> {
        let port = free_port()?;
        let dir = Node::fresh_dir(port)?;
        let port_arg = port.to_string();
        let mut args: Vec<String> = node_args(&port_arg).into_iter().map(String::from).collect();
        args.extend(["--repl-diskless-sync-delay", "0"].map(String::from));
        args.extend(extra.iter().map(|a| a.to_string()));
        args.extend(["--dir".to_owned(), dir.display().to_string()]);
        Node::spawn(port, dir, &args)
    }

    /// A sentinel monitoring the master on `master_port` (quorum 2).
    fn sentinel(master_port: u16) -> Result<Node, String> {
        let port = free_port()?;
        let dir = Node::fresh_dir(port)?;
        let config = format!(
            "port {port}\nbind 127.0.0.1\ndir {}\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} 5000\n",
            dir.display()
        );
        let path = dir.join("sentinel.conf");
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        Node::spawn(port, dir, &[path.display().to_string(), "--sentinel".to_owned()])
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Sends one inline command and returns the first line of the answer.
    fn command(&self, line: &str) -> Result<String, String> {
        redis_command(self.port, line)
    }

    /// Sends one inline command and returns the answer (see [`redis_reply`]).
    fn reply(&self, line: &str, whole: bool) -> Result<String, String> {
        redis_reply(self.port, line, whole)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Redis processes of one form, and the chat server's flags to use them.
pub(crate) struct Setup {
    /// The masters, emptied between runs.
    masters: Vec<Node>,
    /// Replicas and sentinels: measured, never written to.
    others: Vec<Node>,
    /// `--redis-url …` for the chat server.
    args: Vec<String>,
}

impl Setup {
    /// One Redis.
    pub(crate) fn single() -> Result<Setup, String> {
        Setup::shards(1)
    }

    /// `n` independent Redis processes, one `--redis-url` each.
    pub(crate) fn shards(n: usize) -> Result<Setup, String> {
        let masters = (0..n).map(|_| Node::data(&[])).collect::<Result<Vec<_>, _>>()?;
        let args = masters
            .iter()
            .flat_map(|m| ["--redis-url".to_owned(), m.url()])
            .collect();
        Ok(Setup {
            masters,
            others: Vec::new(),
            args,
        })
    }

    /// A master, one replica in sync with it and three sentinels, reached by
    /// `redis+sentinel://`.
    pub(crate) fn sentinel() -> Result<Setup, String> {
        let master = Node::data(&[])?;
        let port = master.port.to_string();
        let replica = Node::data(&["--replicaof", "127.0.0.1", &port])?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !replica
            .reply("INFO replication", true)?
            .contains("master_link_status:up")
        {
            if Instant::now() > deadline {
                return Err("the Sentinel set's replica did not sync".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut others = vec![replica];
        for _ in 0..3 {
            others.push(Node::sentinel(master.port)?);
        }
        let hosts: Vec<String> = others[1..].iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        let url = format!("redis+sentinel://{}/{MASTER_NAME}", hosts.join(","));
        Ok(Setup {
            masters: vec![master],
            others,
            args: vec!["--redis-url".to_owned(), url],
        })
    }

    /// A Redis Cluster of three masters (no replicas) made one with
    /// `redis-cli --cluster create` (`$CHANNELBOX_REDIS_CLI`, else
    /// `redis-cli`), reached by `redis+cluster://` with every node a seed;
    /// returns once every node says the cluster is ok with all slots assigned.
    pub(crate) fn cluster() -> Result<Setup, String> {
        let masters = (0..3)
            .map(|_| Node::data(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]))
            .collect::<Result<Vec<_>, _>>()?;
        let hosts: Vec<String> = masters.iter().map(|m| format!("127.0.0.1:{}", m.port)).collect();
        let cli = std::env::var("CHANNELBOX_REDIS_CLI").unwrap_or_else(|_| "redis-cli".to_owned());
        let out = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&hosts)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {cli} ({e}); install it: apt-get install -y redis-tools"))?;
        if !out.status.success() {
            return Err(format!(
                "{cli} --cluster create failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let settled = |m: &Node| {
            m.reply("CLUSTER INFO", true).is_ok_and(|info| {
                info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_assigned:16384")
                    && info.contains("cluster_known_nodes:3")
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !masters.iter().all(settled) {
            if Instant::now() > deadline {
                return Err("the Redis Cluster did not settle (cluster_state:ok on every node)".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let url = format!("redis+cluster://{}", hosts.join(","));
        Ok(Setup {
            masters,
            others: Vec::new(),
            args: vec!["--redis-url".to_owned(), url],
        })
    }

    /// For each of `groups`, the index of the master holding keys in the
    /// group's hash slot (`CLUSTER KEYSLOT {group}`, then `CLUSTER
    /// COUNTKEYSINSLOT` on every master), or `None` if none holds any: which
    /// master of a Cluster served the group in the run just measured. A
    /// group's hash tag is its name for the bench's names (none starts with
    /// `}` or `~`).
    pub(crate) fn masters_of(&self, groups: &[&str]) -> Result<Vec<Option<usize>>, String> {
        let int = |port: u16, answer: String| {
            answer
                .strip_prefix(':')
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| format!("port {port} answered {answer:?}"))
        };
        let first = self.masters.first().ok_or("a setup without masters")?;
        let mut owners = Vec::new();
        for group in groups {
            let slot = int(first.port, first.command(&format!("CLUSTER KEYSLOT {{{group}}}"))?)?;
            let mut owner = None;
            for (i, m) in self.masters.iter().enumerate() {
                if int(m.port, m.command(&format!("CLUSTER COUNTKEYSINSLOT {slot}"))?)? > 0 {
                    owner = Some(i);
                }
            }
            owners.push(owner);
        }
        Ok(owners)
    }

    /// Empties every master (a replica follows its master).
    pub(crate) fn flush(&self) -> Result<(), String> {
        for m in &self.masters {
            let answer = m.command("FLUSHALL")?;
            if answer != "+OK" {
                return Err(format!("FLUSHALL on port {}: {answer}", m.port));
            }
        }
        Ok(())
    }

    /// How many keys each master holds (`DBSIZE`), to show where the groups landed.
    pub(crate) fn keys(&self) -> Result<Vec<u64>, String> {
        self.masters
            .iter()
            .map(|m| {
                let answer = m.command("DBSIZE")?;
                answer
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| format!("DBSIZE on port {}: {answer}", m.port))
            })
            .collect()
    }

    /// The chat server's flags for this setup.
    pub(crate) fn server_args(&self) -> &[String] {
        &self.args
    }

    /// The PID of every process of the setup.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.masters.iter().chain(&self.others).map(|n| n.child.id()).collect()
    }
}
