//! The churn-and-soak driver of `cargo xtask soak`: many clients join random
//! groups (half of them recovering with `since`/`epoch`), publish, read and
//! disconnect (cleanly or abruptly), over and over, while the server's resident
//! memory is sampled every second. One JSON line.
//!
//! The checks: every publish is acknowledged (within its session's stay, or
//! late: counted as `slow`, or never: a failure); at the end no group and no
//! connection is left; and memory comes back near where it started. History is
//! data the server must keep, so with `--admin-token` the driver reads how many
//! history bytes are retained, flushes all history through the admin API, and
//! then requires the server's memory to be back within `--slack-mib` of its
//! start. Without a token it requires memory to have come down by half of what
//! the churn added, plus the slack.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use channelbox_bench::{http_get, http_request, rss_bytes, Target};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: Target,
    /// Concurrent clients.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// How long to churn.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Groups the clients spread over.
    #[arg(long, default_value_t = 50)]
    groups: u64,
    /// The server's admin token: lets the driver flush history before the
    /// final memory check.
    #[arg(long)]
    admin_token: Option<String>,
    /// How far above its start the server's memory may end, in MiB (allocator
    /// and page caches, buffers kept for reuse).
    #[arg(long, default_value_t = 32)]
    slack_mib: u64,
}

/// xorshift64*: enough randomness for choosing groups and pauses.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % below.max(1)
    }
}

#[derive(Default)]
struct Counts {
    sessions: AtomicU64,
    publishes: AtomicU64,
    acknowledged: AtomicU64,
    received: AtomicU64,
    recoveries: AtomicU64,
    /// Sessions whose acknowledgements came after their stay ended.
    slow: AtomicU64,
    failures: AtomicU64,
    /// The first few failures, for the report.
    errors: std::sync::Mutex<Vec<String>>,
}

/// How long a session keeps reading for acknowledgements after its stay.
const ACK_GRACE: Duration = Duration::from_secs(10);

/// One session: connect, publish a few, read a while, leave.
async fn session(
    addr: &str,
    rng: &mut Rng,
    groups: u64,
    last: &mut Option<(u64, String, u64)>,
    c: &Counts,
) -> anyhow::Result<()> {
    // Half the time, come back to the last group and recover what was missed.
    let (g, query) = match last {
        Some((lg, epoch, offset)) if rng.next(2) == 0 => {
            c.recoveries.fetch_add(1, Ordering::Relaxed);
            (*lg, format!("since={offset}&epoch={epoch}"))
        }
        _ => (rng.next(groups), "history=5".to_owned()),
    };
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/soak-{g}?{query}")).await?;
    c.sessions.fetch_add(1, Ordering::Relaxed);
    let (mut tx, mut rx) = ws.split();
    let publishes = 1 + rng.next(4);
    for i in 0..publishes {
        let frame = json!({"type": "publish", "data": {"i": i, "pad": "soak"}, "ref": i});
        tx.send(Message::text(frame.to_string())).await?;
        c.publishes.fetch_add(1, Ordering::Relaxed);
    }
    let stay = Duration::from_millis(50 + rng.next(450));
    let mut until = tokio::time::Instant::now() + stay;
    let mut acked = 0;
    let mut late = false;
    loop {
        let item = match tokio::time::timeout_at(until, rx.next()).await {
            Ok(Some(item)) => item,
            Ok(None) => break,
            // The stay is over; wait a while longer for missing acknowledgements.
            Err(_) if acked < publishes && !late => {
                late = true;
                until = tokio::time::Instant::now() + ACK_GRACE;
                continue;
            }
            Err(_) => break,
        };
        let Message::Text(t) = item? else { continue };
        let v: Value = serde_json::from_str(&t)?;
        match v["type"].as_str() {
            Some("published") => {
                acked += 1;
                c.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            Some("message") => {
                c.received.fetch_add(1, Ordering::Relaxed);
                if let (Some(o), Some(e)) = (v["offset"].as_u64(), v["epoch"].as_str()) {
                    *last = Some((g, e.to_owned(), o));
                }
            }
            _ => {}
        }
        if late && acked == publishes {
            break;
        }
    }
    anyhow::ensure!(
        acked == publishes,
        "{acked} of {publishes} publishes acknowledged within {:?}",
        stay + ACK_GRACE
    );
    if late {
        c.slow.fetch_add(1, Ordering::Relaxed);
    }
    if rng.next(2) == 0 {
        // A clean close; otherwise the socket is just dropped.
        let _ = tx.send(Message::Close(None)).await;
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let counts = Arc::new(Counts::default());
    let rss_start = rss_bytes(args.server.pid).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let clients: Vec<_> = (0..args.connections)
        .map(|i| {
            let (addr, counts, groups) = (args.server.addr.clone(), counts.clone(), args.groups);
            tokio::spawn(async move {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((i as u64 + 1) * 0x1000_0000_01B3));
                let mut last = None;
                while Instant::now() < deadline {
                    if let Err(err) = session(&addr, &mut rng, groups, &mut last, &counts).await {
                        counts.failures.fetch_add(1, Ordering::Relaxed);
                        {
                            let mut errors = counts.errors.lock().unwrap_or_else(|p| p.into_inner());
                            if errors.len() < 5 {
                                errors.push(format!("{err:#}"));
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    let mut curve = vec![rss_start];
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        curve.push(rss_bytes(args.server.pid).unwrap_or(0));
    }
    for c in clients {
        let _ = c.await;
    }
    // Everyone has left: the server must have let go of every group and channel.
    let mut groups = String::new();
    let mut connections = String::new();
    for _ in 0..100 {
        groups = http_get(&args.server.addr, "/api/groups").await?;
        let metrics = http_get(&args.server.addr, "/metrics").await?;
        connections = metrics
            .lines()
            .find(|l| l.starts_with("channelbox_connections "))
            .unwrap_or_default()
            .to_owned();
        if groups.trim() == "{}" && connections.trim() == "channelbox_connections 0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_end = rss_bytes(args.server.pid).unwrap_or(0);
    curve.push(rss_end);
    let rss_peak = curve.iter().copied().max().unwrap_or(0);
    let leaked = groups.trim() != "{}" || connections.trim() != "channelbox_connections 0";
    let metric = |text: &str, name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let history_bytes = metric(&http_get(&args.server.addr, "/metrics").await?, "channelbox_history_bytes");
    let slack = args.slack_mib << 20;
    let (rss_flushed, recovered) = match &args.admin_token {
        Some(token) => {
            // History is kept on purpose; what must come back is the rest.
            let answer = http_request(&args.server.addr, "DELETE", "/api/admin/history", Some(token)).await?;
            anyhow::ensure!(answer.contains("\"flushed\":true"), "flushing history failed: {answer}");
            tokio::time::sleep(Duration::from_secs(2)).await;
            let rss = rss_bytes(args.server.pid).unwrap_or(0);
            (Some(rss), rss <= rss_start + slack)
        }
        // Back down by at least half of what churn added.
        None => (None, rss_end <= rss_start + (rss_peak - rss_start) / 2 + slack),
    };
    let c = &counts;
    let report = json!({
        "connections": args.connections,
        "seconds": args.seconds,
        "sessions": c.sessions.load(Ordering::Relaxed),
        "publishes": c.publishes.load(Ordering::Relaxed),
        "acknowledged": c.acknowledged.load(Ordering::Relaxed),
        "received": c.received.load(Ordering::Relaxed),
        "recoveries": c.recoveries.load(Ordering::Relaxed),
        "slow_sessions": c.slow.load(Ordering::Relaxed),
        "failures": c.failures.load(Ordering::Relaxed),
        "first_errors": *c.errors.lock().unwrap_or_else(|p| p.into_inner()),
        "groups_left": groups.trim(),
        "connections_left": connections,
        "rss_start": rss_start,
        "rss_peak": rss_peak,
        "rss_end": rss_end,
        "history_bytes_at_end": history_bytes,
        "rss_after_history_flush": rss_flushed,
        "rss_curve": curve,
        "leaked": leaked,
        "memory_recovered": recovered,
    });
    println!("{report}");
    anyhow::ensure!(!leaked, "groups or connections leaked: {groups} / {connections}");
    anyhow::ensure!(recovered, "memory did not come back near its baseline");
    let failures = c.failures.load(Ordering::Relaxed);
    anyhow::ensure!(failures == 0, "{failures} sessions failed (errors or unacknowledged publishes)");
    Ok(())
}
