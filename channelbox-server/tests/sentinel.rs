//! Redis under Sentinel, for real: a master, a replica and three sentinels of
//! this test's own; two chat servers with `--redis-url redis+sentinel://…`
//! and `--redis-replicas 1`. The master is SIGKILLed while both servers
//! publish; the servers follow the promotion by themselves, and what they
//! acknowledged is in history afterwards.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use channelbox_redis::testkit_forms::SentinelSet;
use futures_util::StreamExt;
use serde_json::{json, Value};
use support::{get, http, parse_json, Client, Server};
use tokio_tungstenite::tungstenite::Message;

/// What one publisher got: `(when, data n, offset)` per acknowledged publish.
type Acks = Arc<Mutex<Vec<(Instant, u64, u64)>>>;

/// What a member saw: the offsets of its messages in arrival order, and the
/// close code if it was closed.
#[derive(Debug, Default)]
struct Seen {
    offsets: Vec<u64>,
    closed: Option<Option<u16>>,
}

/// Publishes `{"p": p, "n": n}` over HTTP every 50 ms until `stop`, keeping
/// what was acknowledged; `unavailable` answers are expected while the
/// master is down.
fn publisher(addr: String, p: u64, stop: Arc<AtomicBool>) -> (Acks, tokio::task::JoinHandle<()>) {
    let acks: Acks = Arc::default();
    let kept = acks.clone();
    let task = tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(Ordering::Acquire) {
            let body = json!({"p": p, "n": n}).to_string();
            let r = http(&addr, "POST", "/api/groups/room/messages", &[], body.as_bytes()).await;
            if r.status == 200 {
                let offset = r.json()["offset"].as_u64().expect("an offset");
                kept.lock().expect("acks").push((Instant::now(), n, offset));
            } else {
                assert_eq!(r.status, 503, "only unavailable while failing over: {}", r.body);
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    (acks, task)
}

/// Reads a member's frames until its close, or until `want` is set (non-zero)
/// and it has that offset (or 5 s later).
fn member(mut c: Client, want: Arc<AtomicU64>) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        let mut since: Option<Instant> = None;
        loop {
            let w = want.load(Ordering::Acquire);
            if w > 0 {
                let at = *since.get_or_insert_with(Instant::now);
                if seen.offsets.last().is_some_and(|o| *o >= w) || at.elapsed() > Duration::from_secs(5) {
                    break;
                }
            }
            let Ok(item) = tokio::time::timeout(Duration::from_millis(200), c.ws.next()).await else {
                continue;
            };
            match item {
                Some(Ok(Message::Text(t))) => {
                    let v = parse_json(&t);
                    if v["type"] == "message" {
                        seen.offsets
                            .push(v["offset"].as_u64().expect("saved messages have offsets"));
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    seen.closed = Some(f.map(|f| u16::from(f.code)));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    seen.closed = Some(None);
                    break;
                }
            }
        }
        seen
    })
}

/// Polls `check` (blocking Redis calls, so on the blocking pool) until it
/// holds, at most `within`; the time it first held.
async fn until(within: Duration, what: &str, check: impl Fn() -> bool + Send + Sync + 'static) -> Instant {
    let check = Arc::new(check);
    let deadline = Instant::now() + within;
    loop {
        let c = check.clone();
        if tokio::task::spawn_blocking(move || c()).await.expect("check") {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn first_ack_after(acks: &Acks, at: Instant) -> Option<Instant> {
    acks.lock().expect("acks").iter().map(|a| a.0).find(|t| *t > at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_is_followed_and_nothing_acknowledged_is_lost() {
    failover(false).await;
}

/// The replica lags when the master dies: the promoted one lacks the newest
/// writes. None of those was acknowledged (their WAIT failed), so history
/// still has everything that was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_lagging_replica_loses_nothing_acknowledged() {
    failover(true).await;
}

/// A TCP proxy in front of the master: while `frozen`, what the master sends
/// on a replication connection (one whose client sent `PSYNC`) is dropped, so
/// the replica falls behind while its acknowledgements still flow back. (The
/// sentinels reach the master through it too: a replica whose master address
/// differs from theirs would be reconfigured by them.)
struct Proxy {
    port: u16,
    target: Arc<std::sync::atomic::AtomicU16>,
    frozen: Arc<AtomicBool>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let target = Arc::new(std::sync::atomic::AtomicU16::new(0));
        let frozen = Arc::new(AtomicBool::new(false));
        let (t, f) = (target.clone(), frozen.clone());
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let to = t.load(Ordering::Acquire);
                let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let (down_r, down_w) = down.into_split();
                let (up_r, up_w) = up.into_split();
                let replication = Arc::new(AtomicBool::new(false));
                tokio::spawn(forward(down_r, up_w, None, replication.clone()));
                tokio::spawn(forward(up_r, down_w, Some(f.clone()), replication));
            }
        });
        Proxy { port, target, frozen }
    }
}

/// Copies one direction: towards the master (`frozen` is `None`) it marks a
/// replication connection; from it, it drops what a frozen one carries.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Option<Arc<AtomicBool>>,
    replication: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16_384];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            return;
        }
        let chunk = &buf[..n];
        if frozen.is_none() && chunk.windows(5).any(|w| w.eq_ignore_ascii_case(b"PSYNC")) {
            replication.store(true, Ordering::Release);
        }
        let drop = frozen.as_ref().is_some_and(|f| f.load(Ordering::Acquire)) && replication.load(Ordering::Acquire);
        if !drop && to.write_all(chunk).await.is_err() {
            return;
        }
    }
}

/// Freezes the proxy for 1.5 s of publishing and checks the replica lags.
async fn lag(set: &Arc<Mutex<SentinelSet>>, proxy: &Proxy) {
    proxy.frozen.store(true, Ordering::Release);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = set.clone();
    let (master, replica) = tokio::task::spawn_blocking(move || {
        let set = s.lock().expect("set");
        (set.nodes[0].repl_offset(), set.nodes[1].repl_offset())
    })
    .await
    .expect("offsets");
    assert!(replica < master, "the replica lags: {replica} < {master}");
}

async fn failover(lagging: bool) {
    let proxy = Proxy::start().await;
    let (target, proxy_port) = (proxy.target.clone(), proxy.port);
    let set = Arc::new(Mutex::new(
        tokio::task::spawn_blocking(move || {
            SentinelSet::start_via(|master| {
                target.store(master, Ordering::Release);
                proxy_port
            })
        })
        .await
        .expect("sentinels"),
    ));
    let url = set.lock().expect("set").url();
    let args = ["--store", "redis", "--redis-url", &url, "--redis-replicas", "1"];
    let servers = [Server::start(&args), Server::start(&args)];
    let stop = Arc::new(AtomicBool::new(false));
    let want = Arc::new(AtomicU64::new(0));
    let mut members = Vec::new();
    for s in &servers {
        members.push(member(Client::join(&s.ws_url("/ws/room")).await.0, want.clone()));
    }
    let publishers: Vec<_> = (0..2)
        .map(|p| publisher(servers[p].addr.clone(), p as u64, stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        publishers.iter().all(|(a, _)| !a.lock().expect("acks").is_empty()),
        "publishing works"
    );
    if lagging {
        lag(&set, &proxy).await;
    }

    // SIGKILL the master; wait for the promotion, then bring the old master
    // back as a replica of the new one (so WAIT 1 can succeed again).
    set.lock().expect("set").nodes[0].kill();
    let s = set.clone();
    let promoted = until(Duration::from_secs(30), "the replica promoted", move || {
        s.lock().expect("set").master_index() == Some(1)
    })
    .await;
    {
        let mut set = set.lock().expect("set");
        let new_master = set.nodes[1].port().to_string();
        set.nodes[0].start_node(&["--replicaof", "127.0.0.1", &new_master]);
    }
    for (p, (acks, _)) in publishers.iter().enumerate() {
        let deadline = promoted + Duration::from_secs(10);
        while first_ack_after(acks, promoted).is_none() {
            assert!(
                Instant::now() < deadline,
                "publisher {p}: no publish succeeded within 10 s of the promotion"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let after = first_ack_after(acks, promoted).map(|t| t - promoted);
        eprintln!("publisher {p}: publishing again {after:?} after the promotion was seen");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Release);
    for (_, task) in &publishers {
        while !task.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let last = check_history(&servers[0], &publishers).await;
    want.store(last.max(1), Ordering::Release);
    check_members(members, last).await;
}

/// Every acknowledged publish is in history, at the offset it was given;
/// returns the newest offset in history.
async fn check_history(server: &Server, publishers: &[(Acks, tokio::task::JoinHandle<()>)]) -> u64 {
    let history = get(&server.addr, "/api/groups/room/history?limit=1000").await.json();
    let kept: HashSet<(u64, u64, u64)> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m: &Value| {
            let field = |v: &Value| v.as_u64().expect("numbers");
            (field(&m["data"]["p"]), field(&m["data"]["n"]), field(&m["offset"]))
        })
        .collect();
    for (p, (acks, _)) in publishers.iter().enumerate() {
        let acks = acks.lock().expect("acks");
        for (_, n, offset) in acks.iter() {
            assert!(
                kept.contains(&(p as u64, *n, *offset)),
                "publisher {p}'s message {n}, acknowledged at offset {offset}, is in history"
            );
        }
    }
    kept.iter().map(|k| k.2).max().unwrap_or(0)
}

/// Every member got offsets 1, 2, 3, … in order up to `last`, or up to
/// where it was closed with 4002.
async fn check_members(members: Vec<tokio::task::JoinHandle<Seen>>, last: u64) {
    for (i, m) in members.into_iter().enumerate() {
        let seen = m.await.expect("member");
        let gapless = seen.offsets.iter().enumerate().all(|(k, o)| *o == k as u64 + 1);
        assert!(gapless, "member {i}: offsets in order, no gap: {:?}", seen.offsets);
        match seen.closed {
            None => assert_eq!(seen.offsets.last(), Some(&last), "member {i} got everything"),
            Some(code) => assert_eq!(code, Some(4002), "member {i} closed: only with 4002"),
        }
    }
}
