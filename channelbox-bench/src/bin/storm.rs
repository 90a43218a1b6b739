//! The recovery-storm tool of `cargo xtask bench --storm`.
//!
//! `--phase fill`: saves `--history` messages in each of `--groups` groups
//! (one pipelining publisher per group). `--phase storm`, against the server
//! restarted on the same data: `--clients` clients spread over the groups
//! reconnect at once, each `--behind` messages behind (`since`/`epoch`), and
//! each must receive exactly the offsets it missed and `recovered` with
//! `complete:true`; then every group gets `--live` messages live. Prints one
//! JSON line: server CPU per replayed message and per live delivery, their
//! ratio, how long the storm took, and the server's peak resident memory.

use std::time::{Duration, Instant};

use channelbox_bench::{cpu_seconds, http_get, number_after, raw, Target};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: Target,
    /// `fill` or `storm`.
    #[arg(long)]
    phase: String,
    #[arg(long, default_value_t = 50)]
    groups: usize,
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Messages saved per group before the restart.
    #[arg(long, default_value_t = 400)]
    history: u64,
    /// How far behind each client reconnects.
    #[arg(long, default_value_t = 200)]
    behind: u64,
    /// Live messages per group after the storm.
    #[arg(long, default_value_t = 20)]
    live: u64,
}

/// Upgrades in flight at once.
const HANDSHAKES: usize = 256;

/// How every `message` frame begins.
const MESSAGE: &[u8] = br#"{"type":"message""#;

fn group(g: usize) -> String {
    format!("storm-{g}")
}

/// Publishes `n` messages to each group, one pipelining connection per group.
async fn publish(addr: &str, groups: usize, n: u64) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for g in 0..groups {
        let url = format!("ws://{addr}/ws/{}", group(g));
        tasks.push(tokio::spawn(async move {
            let (ws, _) = tokio_tungstenite::connect_async(url).await?;
            let (mut tx, mut rx) = ws.split();
            for i in 0..n {
                let frame = json!({"type": "publish", "data": {"i": i, "text": "a message of a storm"}, "echo": false});
                tx.send(Message::text(frame.to_string())).await?;
            }
            let mut acked = 0;
            while acked < n {
                match rx.next().await {
                    Some(Ok(Message::Text(t))) if t.contains("\"published\"") => acked += 1,
                    Some(Ok(_)) => {}
                    _ => anyhow::bail!("publisher closed after {acked} of {n}"),
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Reads a client until its `recovered`; the offsets it got and whether complete.
async fn recover(sub: &mut raw::RawSubscriber) -> (Vec<u64>, bool) {
    let (mut offsets, mut done) = (Vec::new(), None);
    while done.is_none() {
        let open = sub
            .read_frames(|t| {
                let Ok(text) = std::str::from_utf8(t) else { return };
                if text.contains("\"type\":\"recovered\"") {
                    done = Some(text.contains("\"complete\":true"));
                } else if text.contains("\"type\":\"message\"") {
                    offsets.extend(number_after(text, "\"offset\":"));
                }
            })
            .await;
        if !matches!(open, Ok(true)) && done.is_none() {
            return (offsets, false);
        }
    }
    (offsets, done.unwrap_or(false))
}

async fn storm(args: &Args) -> anyhow::Result<serde_json::Value> {
    let addr = &args.server.addr;
    let mut heads = Vec::new();
    for g in 0..args.groups {
        let body = http_get(addr, &format!("/api/groups/{}/history?limit=1", group(g))).await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let last = v["messages"][0]["offset"].as_u64().unwrap_or(0);
        heads.push((v["epoch"].as_str().unwrap_or("").to_owned(), last));
    }
    let cpu_before = cpu_seconds(args.server.pid).unwrap_or(0.0);
    let started = Instant::now();
    let mut tasks = Vec::new();
    // Clients connect as fast as the server takes them, a bounded number of
    // handshakes in flight (past the server's bound on connections waiting
    // to upgrade, the oldest would be closed), retrying like real clients.
    let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
    for c in 0..args.clients {
        let g = c % args.groups;
        let (epoch, last) = heads[g].clone();
        let since = last.saturating_sub(args.behind);
        let path = format!("/ws/{}?since={since}&epoch={epoch}", group(g));
        let addr = addr.clone();
        let handshakes = handshakes.clone();
        tasks.push(tokio::spawn(async move {
            let mut attempt = 0;
            let mut sub = loop {
                let permit = handshakes.acquire().await?;
                match raw::connect(&addr, &path).await {
                    Ok(sub) => break sub,
                    Err(e) if attempt >= 5 => return Err(e.into()),
                    Err(_) => attempt += 1,
                }
                drop(permit);
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            };
            let (offsets, complete) = recover(&mut sub).await;
            let exact = offsets == (since + 1..=last).collect::<Vec<_>>();
            Ok::<_, anyhow::Error>((sub, complete && exact, offsets.len() as u64))
        }));
    }
    let mut subs = Vec::new();
    let (mut recovered, mut replayed) = (0u64, 0u64);
    for t in tasks {
        let (sub, ok, n) = t.await??;
        recovered += u64::from(ok);
        replayed += n;
        subs.push(sub);
    }
    let storm_secs = started.elapsed().as_secs_f64();
    let storm_cpu = cpu_seconds(args.server.pid).unwrap_or(0.0) - cpu_before;
    // Live: every group gets messages while everyone listens.
    let cpu_before = cpu_seconds(args.server.pid).unwrap_or(0.0);
    let expected = args.live;
    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut sub| {
            tokio::spawn(async move {
                let mut got = 0;
                while got < expected {
                    let before = got;
                    let open = sub.read_frames(|t| got += u64::from(t.starts_with(MESSAGE))).await;
                    if !matches!(open, Ok(true)) && got == before {
                        break;
                    }
                }
                got
            })
        })
        .collect();
    publish(addr, args.groups, args.live).await?;
    let mut live = 0;
    for r in readers {
        live += r.await?;
    }
    let live_cpu = cpu_seconds(args.server.pid).unwrap_or(0.0) - cpu_before;
    let per_replayed = storm_cpu / replayed.max(1) as f64;
    let per_live = live_cpu / live.max(1) as f64;
    Ok(json!({
        "clients": args.clients,
        "groups": args.groups,
        "behind": args.behind,
        "recovered_complete_and_exact": recovered,
        "replayed": replayed,
        "storm_seconds": storm_secs,
        "server_cpu_us_per_replayed_message": per_replayed * 1e6,
        "server_cpu_us_per_live_delivery": per_live * 1e6,
        "ratio_replay_to_live": per_replayed / per_live.max(1e-12),
        "live_deliveries": live,
        "peak_rss_bytes": peak_rss(args.server.pid),
    }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.phase.as_str() {
        "fill" => publish(&args.server.addr, args.groups, args.history).await?,
        "storm" => {
            let report = tokio::time::timeout(Duration::from_secs(300), storm(&args)).await??;
            println!("{report}");
        }
        other => anyhow::bail!("unknown phase {other:?}"),
    }
    Ok(())
}
