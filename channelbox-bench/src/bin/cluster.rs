//! The cluster load generator of `cargo xtask bench --cluster`: subscribers
//! spread evenly over the servers of one group, publishers on every server,
//! and one JSON line: deliveries per server CPU-second (the servers' CPU time
//! added up), latency from the send stamp, publishes per second (to the last
//! `published`), Redis CPU per publish, lost and duplicated messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use channelbox_bench::{cpu_seconds, http_get, now_us, raw, stamp, Histogram, Tally};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
struct Args {
    /// The servers, `host:port=pid`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    servers: Vec<String>,
    /// The pids of every Redis process of the run (data nodes, replicas,
    /// sentinels, all shards), comma-separated, for their CPU time added up;
    /// 0 or none: no Redis.
    #[arg(long, value_delimiter = ',')]
    redis_pid: Vec<u32>,
    /// Subscribers, spread evenly over the servers (publishers not included).
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Publishers on each server.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Messages, over all publishers.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Most messages published and not yet received by the subscribers on average.
    #[arg(long, default_value_t = 200)]
    inflight: u64,
    /// The groups, comma-separated: subscriber `i` joins group `i` modulo
    /// their number on server `i / groups` modulo the servers' (so that even
    /// a few subscribers cover every group), message `seq` goes to group
    /// `seq` modulo their number.
    #[arg(long, value_delimiter = ',', default_value = "bench")]
    groups: Vec<String>,
    /// Payload bytes (padding included).
    #[arg(long, default_value_t = 64)]
    payload: usize,
}

struct Node {
    addr: String,
    pid: u32,
}

fn nodes(args: &Args) -> anyhow::Result<Vec<Node>> {
    args.servers
        .iter()
        .map(|s| {
            let (addr, pid) = s
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("{s:?} is not host:port=pid"))?;
            Ok(Node {
                addr: addr.to_owned(),
                pid: pid.parse()?,
            })
        })
        .collect()
}

/// Waits until the cluster counts `n` members of the bench groups.
async fn members_reach(addr: &str, groups: &[String], n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = http_get(addr, "/api/groups").await?;
        let counts = serde_json::from_str::<serde_json::Value>(&body)?;
        let have: usize = groups
            .iter()
            .map(|g| counts[g.as_str()].as_u64().unwrap_or(0) as usize)
            .sum();
        if have == n {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "only {have} of {n} members");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many of the messages `0..messages` go to group `g` of `groups`.
fn messages_of(g: usize, groups: usize, messages: u64) -> u64 {
    let (g, groups) = (g as u64, groups as u64);
    messages / groups + u64::from(g < messages % groups)
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| cpu_seconds(*p)).sum()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nodes = nodes(&args)?;
    anyhow::ensure!(!nodes.is_empty(), "no --servers");
    let groups = args.groups.len();
    anyhow::ensure!(
        groups >= 1 && groups <= nodes.len() * args.publishers,
        "every group needs a publisher: {groups} groups, {} publishers",
        nodes.len() * args.publishers
    );
    let mut sockets = Vec::with_capacity(args.subscribers);
    let mut expected = 0;
    for i in 0..args.subscribers {
        let g = i % groups;
        let path = format!("/ws/{}", args.groups[g]);
        let ws = raw::connect(&nodes[(i / groups) % nodes.len()].addr, &path).await?;
        expected += messages_of(g, groups, args.messages);
        sockets.push((ws, g));
    }
    let mut publishers = Vec::new();
    for node in &nodes {
        for _ in 0..args.publishers {
            let g = publishers.len() % groups;
            let url = format!("ws://{}/ws/{}", node.addr, args.groups[g]);
            let (ws, _) = tokio_tungstenite::connect_async(url).await?;
            publishers.push((ws, g));
        }
    }
    members_reach(&nodes[0].addr, &args.groups, args.subscribers + publishers.len()).await?;

    let received_all = Arc::new(AtomicU64::new(0));
    let last_receive = Arc::new(AtomicU64::new(0));
    let totals = Arc::new(Mutex::new((0u64, 0u64, Histogram::default(), 0u64)));
    let mut readers = Vec::new();
    for (mut ws, g) in sockets {
        let (received_all, last, totals, messages, mine) = (
            received_all.clone(),
            last_receive.clone(),
            totals.clone(),
            args.messages,
            messages_of(g, groups, args.messages),
        );
        readers.push(tokio::spawn(async move {
            let mut tally = Tally::new(messages);
            let mut ended = false;
            while tally.received < mine {
                let before = tally.received;
                let open = ws
                    .read_frames(|t| {
                        if let Some((seq, sent)) = stamp(t) {
                            tally.record(seq, sent);
                        }
                    })
                    .await;
                received_all.fetch_add(tally.received - before, Ordering::Relaxed);
                if !matches!(open, Ok(true)) {
                    ended = true;
                    received_all.fetch_add(mine - tally.received, Ordering::Relaxed);
                    break;
                }
            }
            last.fetch_max(now_us(), Ordering::Relaxed);
            let mut t = totals.lock().expect("totals");
            t.0 += tally.received;
            t.1 += tally.duplicates;
            t.2.merge(&tally.latency);
            t.3 += u64::from(ended);
        }));
    }

    let server_pids: Vec<u32> = nodes.iter().map(|n| n.pid).collect();
    let (cpu_before, redis_before) = (cpu_of(&server_pids), cpu_of(&args.redis_pid));
    let started = Instant::now();
    let start_us = now_us();
    let acked = Arc::new(AtomicU64::new(0));
    let last_ack = Arc::new(AtomicU64::new(0));
    // Refused publishes (an `error` reply, `unavailable` say): their messages
    // never reach anyone, so they explain losses the servers did not cause.
    let refused = Arc::new(Mutex::new((0u64, None::<String>)));
    let pad = "x".repeat(args.payload.saturating_sub(40));
    // Each group numbers its own messages `g, g + groups, g + 2 * groups, …`.
    let next_turn: Vec<Arc<AtomicU64>> = (0..groups).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let readers_n = readers.len() as u64;
    let mut tasks = Vec::new();
    for (ws, g) in publishers {
        let (mut tx, mut rx) = ws.split();
        let (acked, last_ack, refused) = (acked.clone(), last_ack.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = rx.next().await {
                let Message::Text(t) = &msg else { continue };
                if t.contains("\"type\":\"published\"") {
                    acked.fetch_add(1, Ordering::Relaxed);
                    last_ack.fetch_max(now_us(), Ordering::Relaxed);
                } else if t.contains("\"type\":\"error\"") {
                    let mut r = refused.lock().expect("refused");
                    r.0 += 1;
                    r.1.get_or_insert_with(|| t.to_string());
                }
            }
        }));
        let (next_turn, received_all, pad, messages, inflight) = (
            next_turn[g].clone(),
            received_all.clone(),
            pad.clone(),
            args.messages,
            args.inflight,
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let seq = g as u64 + groups as u64 * next_turn.fetch_add(1, Ordering::Relaxed);
                if seq >= messages {
                    break;
                }
                // A reader gets one message in `groups`: the average reader's
                // progress, in messages of all groups, is `groups` times its count.
                while readers_n > 0
                    && seq * readers_n >= inflight * readers_n + groups as u64 * received_all.load(Ordering::Relaxed)
                {
                    tokio::task::yield_now().await;
                }
                let data = json!({"seq": seq, "t": now_us(), "p": pad});
                let frame = json!({"type": "publish", "data": data, "echo": false});
                if tx.send(Message::text(frame.to_string())).await.is_err() {
                    break;
                }
            }
        }));
    }
    let all_read = async {
        for r in readers {
            let _ = r.await;
        }
    };
    let timed_out = tokio::time::timeout(Duration::from_secs(60), all_read).await.is_err();
    let cpu = cpu_of(&server_pids) - cpu_before;
    let redis_cpu = cpu_of(&args.redis_pid) - redis_before;
    let wall = started.elapsed().as_secs_f64();
    for t in tasks {
        t.abort();
    }
    let (received, duplicates, latency, ended_early) = {
        let t = totals.lock().expect("totals");
        (t.0, t.1, t.2.clone(), t.3)
    };
    let publishes = acked.load(Ordering::Relaxed);
    let (refused, first_refusal) = refused.lock().expect("refused").clone();
    let publish_secs = last_ack.load(Ordering::Relaxed).saturating_sub(start_us).max(1) as f64 / 1e6;
    let delivery_secs = last_receive.load(Ordering::Relaxed).saturating_sub(start_us).max(1) as f64 / 1e6;
    let report = json!({
        "servers": nodes.len(),
        "subscribers": args.subscribers,
        "publishers": args.publishers * nodes.len(),
        "messages": args.messages,
        "deliveries": received,
        "deliveries_per_sec": received as f64 / delivery_secs,
        "deliveries_per_server_cpu_sec": if cpu > 0.0 { received as f64 / cpu } else { 0.0 },
        "server_cpu_sec": cpu,
        "publishes": publishes,
        "publishes_per_sec": publishes as f64 / publish_secs,
        "redis_cpu_sec": redis_cpu,
        "redis_cpu_us_per_publish": if publishes > 0 { redis_cpu * 1e6 / publishes as f64 } else { 0.0 },
        "latency_us": {"p50": latency.quantile(0.5), "p99": latency.quantile(0.99), "max": latency.max()},
        "groups": groups,
        "lost": expected.saturating_sub(received),
        "duplicated": duplicates,
        "subscribers_ended_early": ended_early,
        "publishes_refused": refused,
        "first_refusal": first_refusal,
        "timed_out": timed_out,
        "wall_sec": wall,
    });
    println!("{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::messages_of;

    #[test]
    fn the_groups_share_out_every_message_once() {
        for (groups, messages) in [(1, 10), (2, 10), (2, 11), (3, 7), (4, 2)] {
            let shares: Vec<u64> = (0..groups).map(|g| messages_of(g, groups, messages)).collect();
            assert_eq!(
                shares.iter().sum::<u64>(),
                messages,
                "{groups} groups, {messages} messages"
            );
            let counted = |g: usize| (0..messages).filter(|s| *s as usize % groups == g).count() as u64;
            assert_eq!(shares, (0..groups).map(counted).collect::<Vec<_>>());
        }
    }
}
