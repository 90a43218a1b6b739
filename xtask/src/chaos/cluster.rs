//! The processes of a chaos run: the chat servers (release build) on free
//! ports, a redis-server of the run's own, and the proxies in front of them;
//! and the nemesis's hands on them (kills, pauses, restarts, link faults).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::Value;

use super::nemesis::{Fault, Link, RedisData, Store};
use super::proxy::{Frames, LinkState, Proxy};
use crate::bench::{listening, pinned};
use crate::redis_setups::{node_args, redis_command, spawn_redis};

/// A chat server and where it listens.
struct Server {
    child: Child,
    addr: String,
}

/// A redis-server of the run's own, restartable on the same port.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

/// Everything a run starts; killed on drop.
pub(crate) struct Cluster {
    store: Store,
    dir: PathBuf,
    /// The chat server binary.
    program: String,
    mutation: Option<String>,
    servers: Vec<Server>,
    /// In front of each server, for the clients.
    client_proxies: Vec<Proxy>,
    redis: Option<Redis>,
    /// In front of Redis, one per server.
    redis_proxies: Vec<Proxy>,
}

impl Cluster {
    /// Starts Redis (for the Redis store), the servers and the proxies.
    pub(crate) fn start(store: Store, dir: &Path, program: &str, mutation: Option<String>) -> Result<Cluster, String> {
        let mut cluster = Cluster {
            store,
            dir: dir.to_path_buf(),
            program: program.to_owned(),
            mutation,
            servers: Vec::new(),
            client_proxies: Vec::new(),
            redis: None,
            redis_proxies: Vec::new(),
        };
        if store == Store::Sled {
            mount_tmpfs(&dir.join("disk"))?;
        }
        if store == Store::Redis {
            let port = redis_port()?;
            let rdir = dir.join("redis");
            std::fs::create_dir_all(&rdir).map_err(|e| e.to_string())?;
            let redis = Redis {
                child: Some(start_redis(port, &rdir)?),
                port,
                dir: rdir,
            };
            cluster.redis = Some(redis);
            for _ in 0..store.servers() {
                cluster
                    .redis_proxies
                    .push(Proxy::start(&format!("127.0.0.1:{port}"), Frames::Resp)?);
            }
        }
        for i in 0..store.servers() {
            let server = cluster.start_server(i)?;
            cluster.client_proxies.push(Proxy::start(&server.addr, Frames::Bytes)?);
            cluster.servers.push(server);
        }
        Ok(cluster)
    }

    /// The WebSocket URLs the clients use (through the proxies).
    pub(crate) fn client_urls(&self) -> Vec<String> {
        self.client_proxies.iter().map(|p| format!("ws://{}", p.addr)).collect()
    }

    /// A server's own address (not proxied), for the final reads.
    pub(crate) fn server_addr(&self, i: usize) -> &str {
        &self.servers[i].addr
    }

    fn start_server(&self, i: usize) -> Result<Server, String> {
        let mut args: Vec<String> = [
            "--addr",
            "127.0.0.1:0",
            "--store",
            self.store.name(),
            "--ping-interval",
            "2",
            "--pong-timeout",
            "2",
        ]
        .map(String::from)
        .to_vec();
        match self.store {
            Store::Sled => args.extend([
                "--data".to_owned(),
                self.dir.join("disk").join("sled").display().to_string(),
            ]),
            Store::Redis => args.extend([
                "--redis-url".to_owned(),
                format!("redis://{}/", self.redis_proxies[i].addr),
            ]),
            Store::Memory => {}
        }
        let mut command = pinned(None, &self.program, &args);
        if let Some(m) = &self.mutation {
            command.env("CHANNELBOX_MUTATION", m);
        }
        let (child, addr) = listening(command, &self.program)?;
        Ok(Server { child, addr })
    }

    /// Applies one fault and heals it at the end of its duration.
    pub(crate) fn apply(&mut self, fault: Fault) -> Result<(), String> {
        let sleep = |ms: u64| std::thread::sleep(Duration::from_millis(ms));
        match fault {
            Fault::KillServer { server, down_ms } => {
                let s = &mut self.servers[server];
                let _ = s.child.kill();
                let _ = s.child.wait();
                // Its port is free now, and a server of another run may take
                // it: the clients' reconnects must not reach that one.
                self.client_proxies[server].unplug();
                sleep(down_ms);
                let fresh = self.start_server(server)?;
                self.client_proxies[server].retarget(&fresh.addr);
                self.servers[server] = fresh;
            }
            Fault::PauseServer { server, ms } => {
                let pid = self.servers[server].child.id().to_string();
                signal("-STOP", &pid)?;
                sleep(ms);
                signal("-CONT", &pid)?;
            }
            Fault::KillRedis { data, down_ms } => self.kill_redis(data, down_ms)?,
            Fault::SnapshotRedis => {
                let redis = self.redis()?;
                redis_command(redis.port, "SAVE")?;
                std::fs::copy(redis.dir.join("dump.rdb"), redis.dir.join("older.rdb")).map_err(|e| e.to_string())?;
            }
            Fault::KillPubsub => {
                redis_command(self.redis()?.port, "CLIENT KILL TYPE pubsub")?;
            }
            Fault::Stall { link, ms } => self.link_fault(link, LinkState::Stall, ms),
            Fault::Partition { link, ms } => self.link_fault(link, LinkState::Partition, ms),
            Fault::Delay { link, delay_ms, ms } => self.link_fault(link, LinkState::Delay(delay_ms), ms),
            Fault::DropPubsub { server, ms } => {
                let before = self.redis_proxies[server].dropped();
                self.link_fault(Link::Redis(server), LinkState::DropPubsub, ms);
                let dropped = self.redis_proxies[server].dropped() - before;
                eprintln!("xtask chaos:   dropped {dropped} pub/sub messages on their way to server {server}");
            }
            Fault::FillDisk { ms } => self.fill_disk(ms)?,
        }
        Ok(())
    }

    /// Fills the tmpfs under sled's data until a write fails, holds it
    /// full for `ms`, and frees it.
    fn fill_disk(&self, ms: u64) -> Result<(), String> {
        let filler = self.dir.join("disk").join("filler");
        let mut file = std::fs::File::create(&filler).map_err(|e| e.to_string())?;
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        std::thread::sleep(Duration::from_millis(ms));
        drop(file);
        std::fs::remove_file(&filler).map_err(|e| e.to_string())
    }

    fn link_fault(&self, link: Link, state: LinkState, ms: u64) {
        let proxy = match link {
            Link::Clients(i) => &self.client_proxies[i],
            Link::Redis(i) => &self.redis_proxies[i],
        };
        proxy.set(state);
        std::thread::sleep(Duration::from_millis(ms));
        proxy.set(LinkState::Pass);
    }

    fn redis(&self) -> Result<&Redis, String> {
        self.redis.as_ref().ok_or_else(|| "no Redis in this run".to_owned())
    }

    fn kill_redis(&mut self, data: RedisData, down_ms: u64) -> Result<(), String> {
        let redis = self.redis.as_mut().ok_or("no Redis in this run")?;
        if data == RedisData::Current {
            redis_command(redis.port, "SAVE")?;
        }
        if let Some(mut child) = redis.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for proxy in &self.redis_proxies {
            proxy.unplug();
        }
        // Empty: no file; Snapshot: the older copy (empty when none was
        // taken yet); Current: the file the SAVE above wrote.
        let dump = redis.dir.join("dump.rdb");
        let older = redis.dir.join("older.rdb");
        match data {
            RedisData::Empty => {
                let _ = std::fs::remove_file(&dump);
            }
            RedisData::Snapshot if older.exists() => {
                std::fs::copy(&older, &dump).map_err(|e| e.to_string())?;
            }
            RedisData::Snapshot => {
                let _ = std::fs::remove_file(&dump);
            }
            RedisData::Current => {}
        }
        std::thread::sleep(Duration::from_millis(down_ms));
        redis.child = Some(start_redis(redis.port, &redis.dir)?);
        let upstream = format!("127.0.0.1:{}", redis.port);
        for proxy in &self.redis_proxies {
            proxy.retarget(&upstream);
        }
        Ok(())
    }

    /// The final history of `group`, read from server 0 page by page:
    /// the epoch and every (offset, payload id).
    pub(crate) fn history(&self, group: &str) -> Result<(String, Vec<(u64, String)>), String> {
        let mut since = 0u64;
        let mut out = Vec::new();
        let mut epoch = String::new();
        loop {
            let path = format!("/api/groups/{group}/history?limit=1000&since={since}");
            let page = http_get(self.server_addr(0), &path)?;
            epoch = page["epoch"].as_str().unwrap_or(&epoch).to_owned();
            let messages = page["messages"].as_array().cloned().unwrap_or_default();
            for m in &messages {
                let offset = m["offset"].as_u64().ok_or_else(|| format!("no offset in {m}"))?;
                out.push((offset, m["data"]["id"].as_str().unwrap_or("").to_owned()));
                since = offset;
            }
            if messages.is_empty() || (messages.len() < 1000 && page["more"] != Value::Bool(true)) {
                return Ok((epoch, out));
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = signal("-CONT", &s.child.id().to_string());
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        if let Some(mut child) = self.redis.as_mut().and_then(|r| r.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.store == Store::Sled {
            let _ = Command::new("umount").arg(self.dir.join("disk")).status();
        }
    }
}

/// The size of sled's disk: room for a run's history, small enough to fill
/// in a moment.
const DISK: &str = "size=64m";

/// Mounts a small tmpfs at `dir` for sled (needs root, as the hostile suite).
fn mount_tmpfs(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", DISK, "tmpfs"])
        .arg(dir)
        .status()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !status.success() {
        return Err(format!(
            "mounting a tmpfs at {} failed: the sled run needs root for its full-disk faults",
            dir.display()
        ));
    }
    Ok(())
}

fn signal(sig: &str, pid: &str) -> Result<(), String> {
    let status = Command::new("kill")
        .args([sig, pid])
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("kill {sig} {pid} failed"));
    }
    Ok(())
}

/// A free port for the run's Redis below the kernel's ephemeral range
/// (32768 and up): Redis restarts on the same port, and while it is down a
/// server started on port 0 (of this run or a parallel one) must not take it.
/// Parallel runs start looking at different ports (their process ids).
fn redis_port() -> Result<u16, String> {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = std::process::id() % SPAN;
    (0..SPAN)
        .map(|i| (LOW + (start + i * 7) % SPAN) as u16)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .ok_or_else(|| "no free port for Redis below 32768".to_owned())
}

/// Starts redis-server on `port` with `dir` (loading its dump.rdb, if any)
/// and waits until it answers.
fn start_redis(port: u16, dir: &Path) -> Result<Child, String> {
    let port_arg = port.to_string();
    let mut args = node_args(&port_arg);
    args.extend(["--dbfilename", "dump.rdb", "--dir"]);
    spawn_redis(port, args.into_iter().map(OsStr::new).chain([dir.as_os_str()]))
}

/// A GET answered with JSON (the body after the head; chunked bodies are
/// joined).
fn http_get(addr: &str, path: &str) -> Result<Value, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("no HTTP head")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: {}", head.lines().next().unwrap_or("")));
    }
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e}"))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
