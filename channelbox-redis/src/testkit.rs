//! A `redis-server` of a test's own, on a free port with a temporary
//! directory and no automatic persistence, stopped by its PID — so a test can
//! kill, restart and cut off Redis without touching the machine's shared one.
//! A test can also take a snapshot ([`RedisServer::snapshot`], `SAVE` into
//! the temporary directory) and bring Redis back from it after a SIGKILL
//! ([`RedisServer::restart_from_snapshot`]): the writes made since are lost,
//! as after a restart from an older snapshot or a failover to a lagging
//! replica.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The snapshot's file name in the server's directory.
const SNAPSHOT: &str = "dump.rdb";

/// The command that installs `redis-server` on Debian, for error messages.
pub const INSTALL_HINT: &str = "sudo apt-get install -y redis-server";

/// A `redis-server` process this test owns.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers.
    pub fn start() -> RedisServer {
        let port = free_port();
        let dir = tempfile::tempdir().expect("a temporary directory for redis");
        let mut server = RedisServer { port, dir, child: None };
        server.spawn();
        server
    }

    /// The URL to connect to.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills it with SIGKILL (its data, kept in memory only, is gone).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty), after [`RedisServer::kill`].
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.dir.path().join(SNAPSHOT));
        self.spawn();
    }

    /// Writes a snapshot of everything now (`SAVE`), which
    /// [`RedisServer::restart_from_snapshot`] brings back.
    pub fn snapshot(&self) {
        self.run(&["SAVE"]).expect("SAVE");
        assert!(self.dir.path().join(SNAPSHOT).exists(), "SAVE wrote no {SNAPSHOT}");
    }

    /// Kills it with SIGKILL and starts it again on the same port from the
    /// last [`RedisServer::snapshot`]: everything written since is lost.
    pub fn restart_from_snapshot(&mut self) {
        self.kill();
        assert!(self.dir.path().join(SNAPSHOT).exists(), "no snapshot to restart from");
        self.spawn();
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut args = node_args(&port);
        args.extend(["--dbfilename", SNAPSHOT, "--dir"]);
        let args = args.into_iter().map(OsStr::new);
        spawn_into(&mut self.child, self.port, args.chain([self.dir.path().as_os_str()]));
    }

    /// Runs one command and returns its answer.
    pub fn run(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        run_on(self.port, args)
    }

    /// The temporary directory it runs in.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
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

/// Starts `redis-server` (or `$CHANNELBOX_REDIS_SERVER`) with `args`, which
/// must set the port to `port`, into `slot` and waits until it answers. The
/// child is in `slot` before the wait, so that an owner whose drop kills
/// `slot` also kills a server that never answers.
pub(crate) fn spawn_into<S: AsRef<OsStr>>(slot: &mut Option<Child>, port: u16, args: impl IntoIterator<Item = S>) {
    let binary = std::env::var("CHANNELBOX_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
    let child = Command::new(&binary)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary} ({e}); install it with: {INSTALL_HINT}"));
    *slot = Some(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while run_on(port, &["PING"]).is_err() {
        assert!(Instant::now() < deadline, "redis-server on port {port} did not answer");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs one command on the Redis at 127.0.0.1:`port` and returns its answer.
pub(crate) fn run_on(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn)
}

/// A free port whose cluster bus port (the port + 10000) exists too: a
/// cluster-enabled redis-server on a port above 55535 refuses to start, and
/// the kernel hands out ports up to 60999.
pub(crate) fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if port <= MAX_NODE_PORT {
            return port;
        }
    }
}

/// The highest port a cluster node may have: its bus port is 10000 higher.
const MAX_NODE_PORT: u16 = 65535 - 10000;
