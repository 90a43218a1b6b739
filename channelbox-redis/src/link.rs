//! The command connection to Redis: one multiplexed connection (commands are
//! pipelined on it in the order they are sent), watched by a supervisor task
//! that pings it and reconnects with backoff. While it is down every command
//! fails at once with [`unavailable`], so that requests answer quickly instead
//! of waiting on a dead socket; when a connection comes up, the scripts are
//! loaded before anything uses it (a restarted Redis has none cached).
//!
//! Error replies that say something about Redis rather than the command are
//! handled here: `NOSCRIPT` (the script cache was flushed) reloads the
//! scripts and retries the command once; `READONLY` (a demoted master) and
//! `LOADING` (a restart still reading its data) drop the connection, so the
//! supervisor reconnects; those two and `OOM` (memory full under
//! `noeviction`) mark the link *degraded*: [`Link::healthy`] is false, so
//! requests answer `unavailable` and `/healthz` 503, until a probe write
//! succeeds again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use channelbox_core::{StoreError, StoreErrorKind};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Cmd, FromRedisValue, Pipeline, Value};

use crate::scripts;
use crate::sentinel::Target;

/// How long a command may take before Redis counts as unreachable.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_millis(1500);
/// How often the supervisor pings a live connection.
const PING_EVERY: Duration = Duration::from_millis(500);
/// Waits between reconnect attempts.
const RECONNECT_WAIT: Duration = Duration::from_millis(250);
/// What a Redis Cluster node answers when it does not serve a key's slot
/// (now): the request did not run, and may be sent again where the slot is.
pub(crate) const REDIRECT_CODES: [&str; 4] = ["MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"];
/// What the text of a [`redirected`] error says.
const REDIRECT_MARK: &str = "cluster redirect";

/// An error saying Redis cannot take the request now.
pub(crate) fn unavailable(what: impl std::fmt::Display) -> StoreError {
    StoreError::new(StoreErrorKind::Io, format!("redis: {what}"))
}

/// An error for a request sent to Redis whose answer never came (a timeout,
/// a connection broken with it in flight): it may have run.
pub(crate) fn unanswered(what: impl std::fmt::Display) -> StoreError {
    StoreError::new(StoreErrorKind::Unanswered, format!("redis: {what}"))
}

/// An error for a request that a Cluster node refused because it does not
/// serve the slot: the request did not run.
pub(crate) fn redirected(code: &str, details: Option<&str>) -> StoreError {
    unavailable(format!("{REDIRECT_MARK} {code} {}", details.unwrap_or_default()))
}

/// Whether `err` says a Cluster node refused the request for its slot (see
/// [`redirected`]): it did not run.
pub(crate) fn is_redirect(err: &StoreError) -> bool {
    err.to_string().contains(REDIRECT_MARK)
}

/// The error for a command of a pipeline that Redis refused.
pub(crate) fn refused(what: &str, err: &redis::ServerError) -> StoreError {
    if REDIRECT_CODES.contains(&err.code()) {
        redirected(err.code(), err.details())
    } else {
        unavailable(format!("{what} failed: {}", err.code()))
    }
}

/// The command connection and its health.
#[derive(Debug)]
pub(crate) struct Link {
    target: Arc<Target>,
    /// The key the supervisor writes to learn that a degraded Redis takes
    /// writes again (expiring at once: it holds nothing); on a Cluster node,
    /// one whose slot that node serves.
    probe_key: String,
    /// Whether the scripts and the broker publish with `SPUBLISH` (Redis
    /// Cluster's sharded pub/sub) rather than `PUBLISH`.
    sharded: bool,
    /// The [`Target::generation`] the connection was made under.
    generation: std::sync::atomic::AtomicU64,
    conn: Mutex<Option<MultiplexedConnection>>,
    up: AtomicBool,
    /// An error reply (`READONLY`, `LOADING`, `OOM`) said Redis takes no
    /// writes; cleared by the supervisor's probe write.
    degraded: AtomicBool,
    /// Woken each time a connection comes up (a reconnect may be to a Redis
    /// that lost writes: the store checks the heads it knows).
    came_up: Arc<tokio::sync::Notify>,
    /// When the current connection came up (ms since the Unix epoch).
    connected_at: AtomicU64,
    /// SHA1s of [`scripts::all`], once loaded.
    shas: OnceLock<Vec<String>>,
}

impl Link {
    /// A link to `target`'s Redis, connecting in the background.
    pub(crate) fn start(target: Arc<Target>, probe_key: String, sharded: bool) -> Arc<Link> {
        let link = Arc::new(Link {
            target,
            probe_key,
            sharded,
            generation: std::sync::atomic::AtomicU64::new(0),
            conn: Mutex::new(None),
            up: AtomicBool::new(false),
            degraded: AtomicBool::new(false),
            came_up: Arc::new(tokio::sync::Notify::new()),
            connected_at: AtomicU64::new(0),
            shas: OnceLock::new(),
        });
        tokio::spawn(supervise(Arc::downgrade(&link)));
        link
    }

    /// The command that publishes on a group's channel: `SPUBLISH` on a
    /// Redis Cluster, `PUBLISH` otherwise.
    pub(crate) fn publish_command(&self) -> &'static str {
        if self.sharded {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// Whether the connection is up now.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Woken (one waiter) each time a connection comes up.
    pub(crate) fn came_up(&self) -> Arc<tokio::sync::Notify> {
        self.came_up.clone()
    }

    /// When the current connection came up (ms since the Unix epoch; 0
    /// before the first): a change means a reconnect.
    pub(crate) fn connected_at(&self) -> u64 {
        self.connected_at.load(Ordering::Acquire)
    }

    /// Whether the connection is up and Redis takes writes.
    pub(crate) fn healthy(&self) -> bool {
        self.is_up() && !self.degraded.load(Ordering::Acquire)
    }

    /// Reacts to an error reply's code (see the module docs); returns whether
    /// it was `NOSCRIPT`, i.e. whether the command may be retried once the
    /// scripts are loaded again.
    pub(crate) fn note_error_code(&self, code: &str) -> bool {
        match code {
            "NOSCRIPT" => return true,
            "READONLY" | "LOADING" => {
                if !self.degraded.swap(true, Ordering::AcqRel) {
                    tracing::warn!(code, "redis takes no writes: reconnecting");
                }
                self.up.store(false, Ordering::Release);
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            "OOM" | "MASTERDOWN" if !self.degraded.swap(true, Ordering::AcqRel) => {
                tracing::warn!(code, "redis refuses writes");
            }
            _ => {}
        }
        false
    }

    /// Loads the scripts again (after `NOSCRIPT`: Redis's cache was flushed).
    pub(crate) async fn reload_scripts(&self) -> Result<(), StoreError> {
        let mut conn = self.connection()?;
        let loaded = tokio::time::timeout(COMMAND_TIMEOUT, load_scripts(&mut conn, self.sharded)).await;
        self.settle(loaded).map(|_| ())
    }

    fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
        self.conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| unavailable("not connected"))
    }

    /// Drops the connection after a failed command; the supervisor reconnects.
    fn broken(&self, err: &redis::RedisError) {
        if err.is_io_error() || err.is_timeout() || err.is_connection_dropped() || err.is_connection_refusal() {
            self.up.store(false, Ordering::Release);
            *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// The SHA1 of script `index` of [`scripts::all`].
    pub(crate) fn sha(&self, index: usize) -> Result<&str, StoreError> {
        self.shas
            .get()
            .map(|s| s[index].as_str())
            .ok_or_else(|| unavailable("not connected yet"))
    }

    /// Runs one command; after `NOSCRIPT` once more with the scripts loaded.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let mut conn = self.connection()?;
        let mut result = tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<T>(&mut conn)).await;
        if matches!(&result, Ok(Err(e)) if e.code() == Some("NOSCRIPT")) {
            self.reload_scripts().await?;
            result = tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<T>(&mut conn)).await;
        }
        self.settle(result)
    }

    /// Runs a pipeline; with `ignore_errors` set on it, per-command errors
    /// come back as [`Value::ServerError`] items.
    pub(crate) async fn pipeline(&self, pipe: &Pipeline) -> Result<Vec<Value>, StoreError> {
        self.pipeline_within(pipe, Duration::ZERO).await
    }

    /// Runs a pipeline that may take `extra` longer than a command (one that
    /// ends with a `WAIT`).
    pub(crate) async fn pipeline_within(&self, pipe: &Pipeline, extra: Duration) -> Result<Vec<Value>, StoreError> {
        // redis-rs refuses an empty pipeline ("empty command"); it has no
        // answers to wait for. (A presence read on a server alone in its
        // cluster asks no other node's records.)
        if pipe.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.connection()?;
        let result = tokio::time::timeout(COMMAND_TIMEOUT + extra, pipe.query_async::<Vec<Value>>(&mut conn)).await;
        self.settle(result)
    }

    fn settle<T>(&self, result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>) -> Result<T, StoreError> {
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(err)) => {
                self.broken(&err);
                if let Some(code) = err.code() {
                    if REDIRECT_CODES.contains(&code) {
                        let text = err.to_string();
                        return Err(redirected(code, Some(&text)).with_source(err));
                    }
                    self.note_error_code(code);
                    // An error reply: the command ran and failed, or was
                    // refused; either way it had no effect.
                    return Err(unavailable(&err).with_source(err));
                }
                // The connection failed with the command handed to it:
                // whether Redis ran it is unknown.
                Err(unanswered(&err).with_source(err))
            }
            Err(_) => {
                self.up.store(false, Ordering::Release);
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Err(unanswered("no answer in time"))
            }
        }
    }
}

/// Connects, loads the scripts, pings while up; reconnects when down.
async fn supervise(link: Weak<Link>) {
    loop {
        let Some(l) = link.upgrade() else { return };
        if l.is_up() && l.generation.load(Ordering::Acquire) != l.target.generation() {
            // The master changed (Sentinel): connect to the new one.
            l.up.store(false, Ordering::Release);
            *l.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        if l.is_up() {
            // While an error reply said Redis takes no writes, the ping is
            // a write: its success ends the degraded state.
            let degraded = l.degraded.load(Ordering::Acquire);
            let ping = if degraded {
                let mut probe = redis::cmd("SET");
                probe.arg(&l.probe_key).arg(1).arg("PX").arg(1000);
                l.query::<redis::Value>(&probe).await.map(|_| ())
            } else {
                l.query::<String>(&redis::cmd("PING")).await.map(|_| ())
            };
            match ping {
                Ok(()) if degraded => {
                    l.degraded.store(false, Ordering::Release);
                    tracing::info!("redis takes writes again");
                }
                Ok(()) => {}
                Err(_) => tracing::warn!("lost the connection to redis, or it takes no writes"),
            }
            drop(l);
            tokio::time::sleep(PING_EVERY).await;
            continue;
        }
        let generation = l.target.generation();
        match connect(&l.target, l.sharded).await {
            Ok((conn, shas)) => {
                l.generation.store(generation, Ordering::Release);
                let _ = l.shas.set(shas);
                *l.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn);
                l.connected_at
                    .store(channelbox_core::now_ms().max(1), Ordering::Release);
                l.up.store(true, Ordering::Release);
                l.came_up.notify_one();
                tracing::info!("connected to redis");
            }
            Err(err) => {
                tracing::debug!(%err, "cannot connect to redis");
                drop(l);
                tokio::time::sleep(RECONNECT_WAIT).await;
            }
        }
    }
}

async fn connect(target: &Target, sharded: bool) -> redis::RedisResult<(MultiplexedConnection, Vec<String>)> {
    let client = target.client().await?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT));
    let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
    let shas = load_scripts(&mut conn, sharded).await?;
    Ok((conn, shas))
}

/// Loads every script; returns their SHA1s.
async fn load_scripts(conn: &mut MultiplexedConnection, sharded: bool) -> redis::RedisResult<Vec<String>> {
    let mut shas = Vec::new();
    for script in scripts::all_for(sharded) {
        let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(script).query_async(conn).await?;
        shas.push(sha);
    }
    Ok(shas)
}
