//! A TCP proxy the chaos driver controls, placed between the clients and a
//! server, or between a server and Redis: it forwards bytes as they come, or
//! delays them, stalls them (holds them without closing), or partitions the
//! link (closes every connection and refuses new ones). This machine's kernel
//! has no `netem`, and a proxy works without privileges.
//!
//! In front of Redis it also reads what Redis sends back as RESP frames
//! ([`super::resp`]), so that it can lose pub/sub messages the way Redis may
//! (pub/sub is at most once: a Cluster loses them across its bus or while a
//! slot moves) while the subscriber's connection stays up.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::resp::PushFilter;

/// What the link does with the bytes now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LinkState {
    /// Forward at once.
    Pass,
    /// Hold every byte (connections stay open) until the state changes.
    Stall,
    /// Forward each chunk after this many milliseconds.
    Delay(u64),
    /// Close every connection and refuse new ones.
    Partition,
    /// Forward, except the pub/sub messages Redis pushes to a subscribed
    /// connection: those are dropped whole (on a proxy started with
    /// [`Frames::Resp`]; elsewhere this is [`LinkState::Pass`]).
    DropPubsub,
}

/// How a proxy sees the bytes flowing back from its upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Frames {
    /// As bytes.
    Bytes,
    /// As RESP frames from Redis, which [`LinkState::DropPubsub`] filters.
    Resp,
}

struct Shared {
    upstream: Mutex<String>,
    state: Mutex<LinkState>,
    /// Open connections by id: (client side, upstream side), for cutting.
    conns: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    next_id: AtomicU64,
    stop: AtomicBool,
    frames: Frames,
    /// Pub/sub messages dropped so far.
    dropped: AtomicU64,
}

/// A running proxy; stops accepting on drop and closes what it forwards.
pub(crate) struct Proxy {
    /// The address clients connect to instead of the upstream.
    pub(crate) addr: String,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Starts a proxy on a free port of 127.0.0.1 in front of `upstream`,
    /// seeing what comes back as `frames`.
    pub(crate) fn start(upstream: &str, frames: Frames) -> Result<Proxy, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?.to_string();
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream.to_owned()),
            state: Mutex::new(LinkState::Pass),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            frames,
            dropped: AtomicU64::new(0),
        });
        let accept = Arc::clone(&shared);
        std::thread::spawn(move || accept_loop(listener, accept));
        Ok(Proxy { addr, shared })
    }

    /// Points new connections at another upstream (a restarted server).
    pub(crate) fn retarget(&self, upstream: &str) {
        *lock(&self.shared.upstream) = upstream.to_owned();
    }

    /// The upstream is down (a killed server, a stopped Redis): new
    /// connections are refused, not sent to its address, which another
    /// process (another run's server) may take meanwhile. [`Proxy::retarget`]
    /// plugs it in again.
    pub(crate) fn unplug(&self) {
        lock(&self.shared.upstream).clear();
    }

    /// Changes what the link does; a partition also cuts what is open.
    pub(crate) fn set(&self, state: LinkState) {
        *lock(&self.shared.state) = state;
        if state == LinkState::Partition {
            self.cut();
        }
    }

    /// How many pub/sub messages [`LinkState::DropPubsub`] dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::SeqCst)
    }

    /// Closes every open connection (both sides).
    pub(crate) fn cut(&self) {
        for (_, (a, b)) in lock(&self.shared.conns).drain() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(&self.addr);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for incoming in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = incoming else { continue };
        if *lock(&shared.state) == LinkState::Partition {
            continue;
        }
        let upstream = lock(&shared.upstream).clone();
        if upstream.is_empty() {
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(
            &upstream.parse().unwrap_or_else(|_| ([127, 0, 0, 1], 1).into()),
            Duration::from_secs(2),
        ) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            continue;
        };
        lock(&shared.conns).insert(id, (c3, s3));
        let up = Arc::clone(&shared);
        std::thread::spawn(move || pump(client, server, id, up, None));
        let down = Arc::clone(&shared);
        let filter = (shared.frames == Frames::Resp).then(PushFilter::default);
        std::thread::spawn(move || pump(s2, c2, id, down, filter));
    }
}

/// Copies one direction until either side closes, obeying the link state;
/// with a `filter`, what passes is cut into RESP frames and pub/sub messages
/// are dropped while the state says so.
fn pump(mut from: TcpStream, mut to: TcpStream, id: u64, shared: Arc<Shared>, mut filter: Option<PushFilter>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let state = loop {
            let state = *lock(&shared.state);
            match state {
                LinkState::Pass | LinkState::DropPubsub => break state,
                LinkState::Delay(ms) => {
                    std::thread::sleep(Duration::from_millis(ms));
                    break state;
                }
                LinkState::Stall => std::thread::sleep(Duration::from_millis(10)),
                LinkState::Partition => {
                    finish(&from, &to, id, &shared);
                    return;
                }
            }
            if shared.stop.load(Ordering::SeqCst) {
                break state;
            }
        };
        let bytes = match filter.as_mut() {
            Some(f) => {
                out.clear();
                let dropped = f.feed(&buf[..n], state == LinkState::DropPubsub, &mut out);
                shared.dropped.fetch_add(dropped, Ordering::SeqCst);
                &out[..]
            }
            None => &buf[..n],
        };
        if to.write_all(bytes).is_err() {
            break;
        }
    }
    finish(&from, &to, id, &shared);
}

fn finish(from: &TcpStream, to: &TcpStream, id: u64, shared: &Shared) {
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    lock(&shared.conns).remove(&id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::resp::tests::{message, SUBSCRIBED};

    fn echo_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn forwards_and_partitions() {
        let proxy = Proxy::start(&echo_server(), Frames::Bytes).unwrap();
        let mut s = TcpStream::connect(&proxy.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        proxy.set(LinkState::Partition);
        let mut rest = [0u8; 1];
        assert!(
            matches!(s.read(&mut rest), Ok(0) | Err(_)),
            "a partition closes the link"
        );
    }

    /// A fake Redis: confirms a subscription at once, then answers every
    /// byte it reads with a message carrying that byte.
    fn publishing_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let Some(Ok(mut s)) = listener.incoming().next() else {
                return;
            };
            s.write_all(SUBSCRIBED).unwrap();
            let mut byte = [0u8; 1];
            while let Ok(1) = s.read(&mut byte) {
                let payload = String::from_utf8_lossy(&byte).into_owned();
                if s.write_all(&message("cb:g", &payload)).is_err() {
                    break;
                }
            }
        });
        addr
    }

    #[test]
    fn a_proxy_drops_messages_only_while_told_and_keeps_the_connection() {
        let proxy = Proxy::start(&publishing_server(), Frames::Resp).unwrap();
        let mut s = TcpStream::connect(&proxy.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut confirmed = vec![0u8; SUBSCRIBED.len()];
        s.read_exact(&mut confirmed).unwrap();
        assert_eq!(confirmed, SUBSCRIBED);
        proxy.set(LinkState::DropPubsub);
        s.write_all(b"a").unwrap();
        // Wait until the proxy has seen the answer (a bound only so that a
        // broken proxy fails the test instead of hanging it).
        for _ in 0..2000 {
            if proxy.dropped() > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(proxy.dropped(), 1, "the message was dropped");
        proxy.set(LinkState::Pass);
        s.write_all(b"b").unwrap();
        let expected = message("cb:g", "b");
        let mut got = vec![0u8; expected.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&expected));
        assert_eq!(proxy.dropped(), 1);
    }
}
