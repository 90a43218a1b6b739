//! The churn-and-soak driver of `cargo xtask soak`: many clients join random
//! groups (half of them recovering with `since`/`epoch`), publish, read and
//! disconnect (cleanly or abruptly), over and over, while the server's resident
//! memory is sampled every second. One JSON line.
//!
//! The run is split into `--rounds` rounds, everyone leaving after each. The
//! checks: every publish is acknowledged (within its session's stay, or late:
//! counted as `slow`, or never: a failure); after every round no group and no
//! connection is left; and churn does not accumulate memory: the server's idle
//! memory after the last round is within `--slack-mib` of its idle memory after
//! the second (the first warms up: history fills to its budget, allocator
//! pools grow). With `--admin-token` the driver also flushes all history at the
//! end and reports whether the memory came back: the server's resident
//! memory once every connection has closed and history is flushed, after a
//! short settle, against what it was before the first client; with
//! `--max-end-ratio R` the run fails above R times the start. (Not enforced
//! by default: the target of 1.2 is not met yet — the live heap is back
//! under 1 MiB, but the allocator keeps freed memory in partly used slabs.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use channelbox_bench::{http_get, http_request, metric, rss_bytes, rss_split, Target};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
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
    /// Rounds of churn, everyone leaving after each. The first warms up
    /// (history fills, caches and allocator pools grow); the server's idle
    /// memory after the last must be within the slack of that after the second.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..))]
    rounds: u64,
    /// With `--admin-token`: how far above its start the server's resident
    /// memory may end, as a ratio, once every connection has closed and
    /// history is flushed (unset: reported, not enforced).
    #[arg(long)]
    max_end_ratio: Option<f64>,
}

/// How long the driver lets the server settle after the history flush: the
/// lowest reading of one per second counts (allocators return freed pages
/// after a delay, some only when their threads run).
const END_SETTLE_SECONDS: u64 = 10;

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
    /// Sessions the server closed with 4000 because the client read too slowly
    /// (the driver's own load); not failures: the protocol's answer to a
    /// client that falls behind, which recovers with `since` next time.
    closed_slow: AtomicU64,
    failures: AtomicU64,
    /// The first few failures, for the report.
    errors: std::sync::Mutex<Vec<String>>,
}

/// How long a connection attempt may take (SYN retries would otherwise keep a
/// client past the end of its round for minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a session keeps reading for acknowledgements after its stay.
const ACK_GRACE: Duration = Duration::from_secs(10);

/// The `offset` of a `message` frame.
fn offset_of(t: &str) -> Option<u64> {
    let at = t.find(r#","offset":"#)? + r#","offset":"#.len();
    let digits = t[at..].bytes().take_while(u8::is_ascii_digit).count();
    t[at..at + digits].parse().ok()
}

/// The `epoch` of a `message` frame (epochs hold no quotes or escapes).
fn epoch_of(t: &str) -> Option<&str> {
    let at = t.find(r#","epoch":""#)? + r#","epoch":""#.len();
    Some(&t[at..at + t[at..].find('"')?])
}

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
    let url = format!("ws://{addr}/ws/soak-{g}?{query}");
    let (ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| anyhow::anyhow!("no WebSocket connection within {CONNECT_TIMEOUT:?}"))??;
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
        let t = match item {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(Some(f))) if u16::from(f.code) == 4000 => {
                c.closed_slow.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Ok(Message::Close(f)) => anyhow::bail!("closed by the server: {f:?}"),
            Ok(_) => continue,
            Err(e) => return Err(e.into()),
        };
        // Substring checks, not a JSON parse: the driver shares one core with
        // 10,000 clients and must keep up with what they receive.
        if t.contains(r#""type":"published""#) {
            acked += 1;
            c.acknowledged.fetch_add(1, Ordering::Relaxed);
        } else if t.contains(r#""type":"message""#) {
            c.received.fetch_add(1, Ordering::Relaxed);
            if let (Some(o), Some(e)) = (offset_of(&t), epoch_of(&t)) {
                *last = Some((g, e.to_owned(), o));
            }
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

/// Waits until the server holds no group and no connection; returns what it
/// last reported (groups JSON, connection gauge line).
async fn wait_until_empty(addr: &str) -> anyhow::Result<(String, String)> {
    let mut groups = String::new();
    let mut connections = String::new();
    for _ in 0..100 {
        groups = http_get(addr, "/api/groups").await?;
        let metrics = http_get(addr, "/metrics").await?;
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
    Ok((groups.trim().to_owned(), connections))
}

/// A gauge or counter from the Prometheus text.
/// `connections` clients churn until `deadline`.
async fn churn(args: &Args, round: u64, counts: &Arc<Counts>, deadline: Instant, curve: &mut Vec<u64>) {
    let clients: Vec<_> = (0..args.connections)
        .map(|i| {
            let (addr, counts, groups) = (args.server.addr.clone(), counts.clone(), args.groups);
            tokio::spawn(async move {
                let seed = (i as u64 + 1 + round * 1_000_003) * 0x1000_0000_01B3;
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
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
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        curve.push(rss_bytes(args.server.pid).unwrap_or(0));
    }
    for c in clients {
        let _ = c.await;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let counts = Arc::new(Counts::default());
    let addr = args.server.addr.clone();
    let rss_start = rss_bytes(args.server.pid).unwrap_or(0);
    let split_start = rss_split(args.server.pid);
    let mut curve = vec![rss_start];
    // Rounds of churn, everyone leaving after each. The server's idle memory
    // after the second round, holding the history the rounds left, is the
    // baseline the last must come back to: churn must not accumulate.
    let mut idle = Vec::new();
    let mut left = Vec::new();
    let mut rss_after_load = 0;
    for round in 0..args.rounds {
        let deadline = Instant::now() + Duration::from_secs(args.seconds) / args.rounds as u32;
        churn(&args, round, &counts, deadline, &mut curve).await;
        // The last reading `churn` took while its clients were still busy:
        // by the time it returns they have all left.
        rss_after_load = curve.last().copied().unwrap_or(0);
        // Everyone has left: the server must have let go of every group and channel.
        left.push(wait_until_empty(&addr).await?);
        // Closing connections finish their close handshakes and the allocator
        // returns freed pages over a few seconds (jemalloc's decay is a
        // second): idle is the lowest reading of the
        // next ten, each after a metrics scrape as a monitor would make.
        let mut lowest = u64::MAX;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            http_get(&addr, "/metrics").await?;
            let rss = rss_bytes(args.server.pid).unwrap_or(0);
            curve.push(rss);
            lowest = lowest.min(rss);
        }
        idle.push(lowest);
    }
    let rss_peak = curve.iter().copied().max().unwrap_or(0);
    let leaked = left
        .iter()
        .any(|(g, c)| g != "{}" || c.trim() != "channelbox_connections 0");
    let metrics = http_get(&addr, "/metrics").await?;
    let history_bytes = metric(&metrics, "channelbox_history_bytes");
    let slow_consumer_closes = metric(&metrics, "channelbox_slow_consumer_closes_total").unwrap_or(0);
    let slack = args.slack_mib << 20;
    let (first_idle, last_idle) = (idle[1], idle[idle.len() - 1]);
    let plateau = last_idle <= first_idle + slack;
    // History is kept on purpose; with the admin token, drop it and look at
    // what the server holds without it.
    let rss_flushed = match &args.admin_token {
        Some(token) => {
            let answer = http_request(&addr, "DELETE", "/api/admin/history", Some(token)).await?;
            anyhow::ensure!(answer.contains("\"flushed\":true"), "flushing history failed: {answer}");
            // As after each round: the lowest of a few readings, each after a
            // metrics scrape, so that an allocator that purges on its next
            // call gets one.
            let mut lowest = u64::MAX;
            for _ in 0..END_SETTLE_SECONDS {
                tokio::time::sleep(Duration::from_secs(1)).await;
                http_get(&addr, "/metrics").await?;
                let rss = rss_bytes(args.server.pid).unwrap_or(0);
                curve.push(rss);
                lowest = lowest.min(rss);
            }
            Some(lowest)
        }
        None => None,
    };
    let end_ratio = rss_flushed.map(|end| end as f64 / rss_start.max(1) as f64);
    // Most of the RSS at start is the program's code, file-backed; the load
    // pages in more of it (code first run then), which the kernel can drop.
    let split_end = rss_flushed.and_then(|_| rss_split(args.server.pid));
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    if let (Some((anon0, file0)), Some((anon1, file1))) = (split_start, split_end) {
        eprintln!(
            "soak: of which anonymous (heap, stacks) {:.1} MiB at start, {:.1} MiB at the end; file-backed (code) {:.1} MiB, then {:.1} MiB",
            mib(anon0),
            mib(anon1),
            mib(file0),
            mib(file1)
        );
    }
    eprintln!(
        "soak: server RSS {:.1} MiB at start, {:.1} MiB after the load, {:.1} MiB at peak, {} after the connections closed and history was flushed",
        mib(rss_start),
        mib(rss_after_load),
        mib(rss_peak),
        match (rss_flushed, end_ratio) {
            (Some(end), Some(ratio)) => format!(
                "{:.1} MiB ({ratio:.2}x the start; bound {})",
                mib(end),
                args.max_end_ratio.map_or_else(|| "none".to_owned(), |r| format!("{r:.2}x"))
            ),
            _ => "not measured (no --admin-token to flush history)".to_owned(),
        }
    );
    let c = &counts;
    let failures = c.failures.load(Ordering::Relaxed);
    let report = json!({
        "connections": args.connections,
        "seconds": args.seconds,
        "sessions": c.sessions.load(Ordering::Relaxed),
        "publishes": c.publishes.load(Ordering::Relaxed),
        "acknowledged": c.acknowledged.load(Ordering::Relaxed),
        "received": c.received.load(Ordering::Relaxed),
        "recoveries": c.recoveries.load(Ordering::Relaxed),
        "slow_sessions": c.slow.load(Ordering::Relaxed),
        "closed_as_slow_consumer": c.closed_slow.load(Ordering::Relaxed),
        "server_slow_consumer_closes": slow_consumer_closes,
        "failures": failures,
        "first_errors": *c.errors.lock().unwrap_or_else(|p| p.into_inner()),
        "left_after_each_round": left,
        "rss_start": rss_start,
        "rss_after_load": rss_after_load,
        "rss_peak": rss_peak,
        "rss_idle_after_each_round": idle,
        "history_bytes_at_end": history_bytes,
        "rss_after_history_flush": rss_flushed,
        "rss_end_ratio": end_ratio,
        "rss_anon_file_start": split_start,
        "rss_anon_file_end": split_end,
        "max_end_ratio": args.max_end_ratio,
        "rss_curve": curve,
        "leaked": leaked,
        "memory_plateau": plateau,
    });
    println!("{report}");
    anyhow::ensure!(!leaked, "groups or connections leaked: {left:?}");
    anyhow::ensure!(
        plateau,
        "memory grew from {first_idle} to {last_idle} bytes between idle points: churn accumulates"
    );
    if let (Some(end), Some(ratio), Some(bound)) = (rss_flushed, end_ratio, args.max_end_ratio) {
        anyhow::ensure!(
            ratio <= bound,
            "memory did not come back: {end} bytes resident after the connections closed and history was flushed, {ratio:.2}x the {rss_start} at start (bound {bound:.2}x)"
        );
    }
    anyhow::ensure!(
        failures == 0,
        "{failures} sessions failed (errors or unacknowledged publishes)"
    );
    Ok(())
}
