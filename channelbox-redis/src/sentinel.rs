//! Where the command and subscription connections connect: one fixed Redis,
//! the master that Sentinel names now, or the Redis Cluster master an
//! engine is on now (see `cluster`: it follows a failover). A [`Target`] hands out a client
//! for each (re)connect; a Sentinel target asks the sentinels every time and
//! checks with `ROLE` that the node it names is a master, so a connection is
//! never made to a replica that cannot take writes.
//!
//! A failover is followed by itself: a task per sentinel subscribes to
//! `+switch-master`, and one task asks the sentinels every second (a missed
//! pub/sub message, or a demoted master that still answers, is found that
//! way; what most of the answering sentinels name is followed, so one stale
//! sentinel cannot make the servers flip between masters). When the master they name differs from the one in use, the
//! [`Target::generation`] moves on; the command link and the broker compare
//! it on every ping and reconnect, so requests answer `unavailable` only
//! until the new master answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::{AsyncConnectionConfig, Client, ErrorKind, RedisError, RedisResult, Value};

use crate::cluster::Slots;

/// How long one sentinel, or the master it names, may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the sentinels are asked for the master, besides `+switch-master`.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// Waits before resubscribing to a sentinel that went away.
const RESUBSCRIBE_WAIT: Duration = Duration::from_millis(500);

/// What the connections connect to.
#[derive(Debug)]
pub(crate) enum Target {
    /// One Redis, always the same.
    Single(Client),
    /// The master the sentinels name.
    Sentinel(Arc<Sentinels>),
    /// The Cluster master engine `.1` is on now.
    Cluster(Arc<Slots>, usize),
}

impl Target {
    /// A client for the Redis to connect to now.
    pub(crate) async fn client(&self) -> RedisResult<Client> {
        match self {
            Target::Single(client) => Ok(client.clone()),
            Target::Sentinel(s) => s.master_client().await,
            Target::Cluster(slots, index) => {
                // A number forgotten before its engine was served (a master
                // named once, then gone): nothing to connect to until a
                // master takes it.
                let (host, port) = slots.address(*index).ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "no redis cluster master has this engine's number now",
                    ))
                })?;
                Client::open((host.as_str(), port))
            }
        }
    }

    /// Moves on whenever the master changes; a connection made under an
    /// older generation must reconnect.
    pub(crate) fn generation(&self) -> u64 {
        match self {
            Target::Single(_) => 0,
            Target::Sentinel(s) => s.generation.load(Ordering::Acquire),
            Target::Cluster(slots, index) => slots.generation(*index),
        }
    }
}

/// The sentinels of one master, and the master last found through them.
#[derive(Debug)]
pub(crate) struct Sentinels {
    sentinels: Vec<(String, u16)>,
    master: String,
    current: Mutex<Option<(String, u16)>>,
    generation: AtomicU64,
}

impl Sentinels {
    /// Starts following `master` through `sentinels` (the tasks end when the
    /// returned value is dropped).
    pub(crate) fn start(sentinels: Vec<(String, u16)>, master: String) -> Arc<Sentinels> {
        let s = Arc::new(Sentinels {
            sentinels,
            master,
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
        });
        tokio::spawn(poll(Arc::downgrade(&s)));
        for (host, port) in &s.sentinels {
            if let Ok(client) = Client::open((host.as_str(), *port)) {
                tokio::spawn(follow_switches(Arc::downgrade(&s), client));
            }
        }
        s
    }

    /// What the sentinels that answer name as the master, each address with
    /// how many name it, the most named first (ties in the order written).
    /// They are asked together, each within [`ASK_TIMEOUT`].
    async fn ask(&self) -> Vec<((String, u16), usize)> {
        let asks = self.sentinels.iter().map(|(h, p)| self.ask_one(h, *p));
        let mut counted: Vec<((String, u16), usize)> = Vec::new();
        for addr in futures_util::future::join_all(asks).await.into_iter().flatten() {
            match counted.iter_mut().find(|(a, _)| *a == addr) {
                Some((_, n)) => *n += 1,
                None => counted.push((addr, 1)),
            }
        }
        counted.sort_by_key(|c| std::cmp::Reverse(c.1));
        counted
    }

    async fn ask_one(&self, host: &str, port: u16) -> Option<(String, u16)> {
        let client = Client::open((host, port)).ok()?;
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg("get-master-addr-by-name").arg(&self.master);
        let answer = async {
            let mut conn = client.get_multiplexed_async_connection_with_config(&config()).await?;
            cmd.query_async::<Option<(String, u16)>>(&mut conn).await
        };
        tokio::time::timeout(ASK_TIMEOUT, answer).await.ok()?.ok()?
    }

    /// A client for the master, checked to be one: the address most
    /// sentinels name when most do (a stale minority is not followed), or
    /// else the first of theirs that is a master.
    async fn master_client(&self) -> RedisResult<Client> {
        let named = self.ask().await;
        let candidates = if majority(&named).is_some() {
            &named[..1]
        } else {
            &named[..]
        };
        let mut last = failure(format!("no sentinel names a master {:?}", self.master));
        for (addr, _) in candidates {
            match is_master(addr).await {
                Ok(client) => {
                    *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(addr.clone());
                    return Ok(client);
                }
                Err(err) => last = err,
            }
        }
        Err(last)
    }

    /// The sentinels name `addr`: a change of master when it is not the one
    /// in use.
    fn noticed(&self, addr: (String, u16)) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|c| *c != addr) {
            tracing::warn!(master = %self.master, host = %addr.0, port = addr.1, "redis master switched");
            *current = Some(addr);
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// The address more than half of the answers name, if any (`named` is
/// sorted most named first).
fn majority(named: &[((String, u16), usize)]) -> Option<&(String, u16)> {
    let total: usize = named.iter().map(|(_, n)| n).sum();
    named.first().filter(|(_, n)| n * 2 > total).map(|(a, _)| a)
}

/// A client for `addr` if `ROLE` says it is a master.
async fn is_master(addr: &(String, u16)) -> RedisResult<Client> {
    let client = Client::open((addr.0.as_str(), addr.1))?;
    let role = async {
        let mut conn = client.get_multiplexed_async_connection_with_config(&config()).await?;
        redis::cmd("ROLE").query_async::<Vec<Value>>(&mut conn).await
    };
    let role = tokio::time::timeout(ASK_TIMEOUT, role)
        .await
        .map_err(|_| failure(format!("the master {}:{} did not answer", addr.0, addr.1)))??;
    if !matches!(role.first(), Some(Value::BulkString(r)) if r == b"master") {
        return Err(failure(format!("{}:{} is not a master (yet)", addr.0, addr.1)));
    }
    Ok(client)
}

fn config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(ASK_TIMEOUT))
        .set_response_timeout(Some(ASK_TIMEOUT))
}

fn failure(text: String) -> RedisError {
    RedisError::from((ErrorKind::Io, "sentinel", text))
}

/// Asks the sentinels every second; follows what most of those that answer
/// name.
async fn poll(sentinels: Weak<Sentinels>) {
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        let Some(s) = sentinels.upgrade() else { return };
        if let Some(addr) = majority(&s.ask().await) {
            s.noticed(addr.clone());
        }
    }
}

/// Listens to one sentinel's `+switch-master`
/// (`<name> <old-ip> <old-port> <new-ip> <new-port>`), resubscribing when it
/// goes away.
async fn follow_switches(sentinels: Weak<Sentinels>, client: Client) {
    loop {
        if sentinels.strong_count() == 0 {
            return;
        }
        let Ok(Ok(mut pubsub)) = tokio::time::timeout(ASK_TIMEOUT, client.get_async_pubsub()).await else {
            tokio::time::sleep(RESUBSCRIBE_WAIT).await;
            continue;
        };
        if !matches!(
            tokio::time::timeout(ASK_TIMEOUT, pubsub.subscribe("+switch-master")).await,
            Ok(Ok(()))
        ) {
            tokio::time::sleep(RESUBSCRIBE_WAIT).await;
            continue;
        }
        let mut stream = pubsub.on_message();
        loop {
            let msg = match tokio::time::timeout(POLL_EVERY, stream.next()).await {
                Err(_) => {
                    if sentinels.strong_count() == 0 {
                        return;
                    }
                    continue;
                }
                Ok(None) => break,
                Ok(Some(msg)) => msg,
            };
            let Some(s) = sentinels.upgrade() else { return };
            if let Some(addr) = parse_switch(&s.master, msg.get_payload_bytes()) {
                s.noticed(addr);
            }
        }
    }
}

/// The new address in a `+switch-master` message about `master`.
fn parse_switch(master: &str, payload: &[u8]) -> Option<(String, u16)> {
    let text = std::str::from_utf8(payload).ok()?;
    let parts: Vec<&str> = text.split(' ').collect();
    match parts.as_slice() {
        [name, _, _, host, port] if *name == master => Some(((*host).to_owned(), port.parse().ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{majority, parse_switch};

    #[test]
    fn a_stale_minority_is_not_followed() {
        let a = ("a".to_owned(), 1);
        let b = ("b".to_owned(), 2);
        assert_eq!(majority(&[(a.clone(), 2), (b.clone(), 1)]), Some(&a));
        assert_eq!(majority(&[(a.clone(), 1), (b.clone(), 1)]), None);
        assert_eq!(majority(&[(b.clone(), 1)]), Some(&b));
        assert_eq!(majority(&[]), None);
    }

    #[test]
    fn switch_messages_name_the_new_master() {
        assert_eq!(
            parse_switch("m", b"m 127.0.0.1 7000 127.0.0.1 7001"),
            Some(("127.0.0.1".to_owned(), 7001))
        );
        assert_eq!(parse_switch("m", b"other 127.0.0.1 7000 127.0.0.1 7001"), None);
        assert_eq!(parse_switch("m", b"m 127.0.0.1 7000 127.0.0.1"), None);
        assert_eq!(parse_switch("m", b"m a 1 b x"), None);
    }
}
