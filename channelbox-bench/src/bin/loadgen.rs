//! The load generator of `cargo xtask bench`: opens N subscribers to one group
//! (the publisher is one of them), checks they are all members, then publishes
//! M messages with at most `--inflight` unconfirmed, and reports deliveries per
//! second, latency (from a timestamp in the payload), lost and duplicated
//! messages, and the server's CPU time and resident memory, as one JSON line.
//!
//! Per received frame it does as little as it can: subscribers read through
//! [`channelbox_bench::raw`] (one read fills 64 KiB, frames parsed in place),
//! and it finds `"seq":` and `"t":` in the bytes without parsing the JSON, and
//! marks a bit. Only the publisher uses tokio-tungstenite.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use channelbox_bench::{
    cpu_seconds, http_get, now_us, raw, rss_bytes, stamp, write_counters, Histogram, Tally, Target,
};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: Target,
    /// Subscribers, the publisher included.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Messages to publish.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// Most messages in flight: published and not yet received back by the
    /// publisher, nor by the subscribers on average.
    #[arg(long, default_value_t = 100)]
    inflight: u64,
    /// Fixed publish rate in messages per second (0: as fast as the window allows).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Whether publishes are saved to history (the chat protocol's `history`).
    #[arg(long, action = clap::ArgAction::Set, default_value_t = false)]
    history: bool,
    /// How to count members: `api` (chat server) or `count` (baseline).
    #[arg(long, default_value = "api")]
    members: String,
    /// Payload bytes (padding included).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// The payload is a chat message as an app would send it (user, text
    /// of chat sentences, mentions, reactions) of about `--payload` bytes,
    /// instead of padding: text that compresses like chat.
    #[arg(long)]
    chat: bool,
    /// Subscribers offer permessage-deflate, as browsers do, and inflate
    /// what comes compressed.
    #[arg(long)]
    deflate: bool,
    /// Gives up after this many seconds: a server that stalls fails its
    /// measurement instead of holding up the whole benchmark.
    #[arg(long, default_value_t = 300)]
    deadline: u64,
}

async fn members(addr: &str, how: &str) -> anyhow::Result<usize> {
    let body = http_get(addr, if how == "api" { "/api/groups" } else { "/count" }).await?;
    Ok(if how == "api" {
        serde_json::from_str::<serde_json::Value>(&body)?["bench"]
            .as_u64()
            .unwrap_or(0) as usize
    } else {
        body.trim().parse().unwrap_or(0)
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let deadline = Duration::from_secs(args.deadline);
    match tokio::time::timeout(deadline, run(args)).await {
        Ok(result) => result,
        Err(_) => anyhow::bail!("gave up after {deadline:?}"),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let url = format!("ws://{}/ws/bench", args.server.addr);
    let rss_before = rss_bytes(args.server.pid).unwrap_or(0);

    // Connect everyone, a few hundred at a time; the publisher last.
    let mut sockets = Vec::with_capacity(args.subscribers);
    let readers_wanted = args.subscribers.saturating_sub(1);
    for chunk in (0..readers_wanted).collect::<Vec<_>>().chunks(200) {
        let batch = futures_util::future::join_all(
            chunk
                .iter()
                .map(|_| raw::connect_with(&args.server.addr, "/ws/bench", args.deflate)),
        )
        .await;
        for r in batch {
            sockets.push(r?);
        }
    }
    let negotiated = sockets.iter().filter(|s| s.deflate()).count();
    let (publisher, _) = tokio_tungstenite::connect_async(url.clone()).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = members(&args.server.addr, &args.members).await?;
        if n == args.subscribers {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {n} of {} subscribers are members",
            args.subscribers
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Idle memory: the lowest of five readings over 2.5 s, each after a request
    // (mimalloc returns freed pages only when the server's thread runs again;
    // read 300 ms after the last join, handshake leftovers counted as idle
    // memory: 8.2-8.4 KB against 7.8 KB settled, 10,000 subscribers).
    let rss_connected = {
        let mut lowest = u64::MAX;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = members(&args.server.addr, &args.members).await;
            lowest = lowest.min(rss_bytes(args.server.pid).unwrap_or(0));
        }
        lowest
    };

    let done = Arc::new(AtomicU64::new(0));
    let echoed = Arc::new(AtomicU64::new(0));
    // received, duplicates, latency, subscribers that ended early, the first
    // reason, bytes read off the wire
    let totals = Arc::new(Mutex::new((
        0u64,
        0u64,
        Histogram::default(),
        0u64,
        None::<String>,
        0u64,
    )));
    let (mut pub_tx, mut pub_rx) = publisher.split();
    let last_receive = Arc::new(AtomicU64::new(0));
    // Frames received by all subscribers together, for the in-flight window.
    let received_all = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for ws in sockets {
        let (done, totals, messages, last) = (done.clone(), totals.clone(), args.messages, last_receive.clone());
        let received_all = received_all.clone();
        readers.push(tokio::spawn(async move {
            let mut ws = ws;
            let mut tally = Tally::new(messages);
            let mut ended = None;
            while tally.received < messages {
                let before = tally.received;
                let open = ws.read_frames(|t| {
                    if let Some((seq, sent)) = stamp(t) {
                        tally.record(seq, sent);
                    }
                });
                let open = open.await;
                received_all.fetch_add(tally.received - before, Ordering::Relaxed);
                match open {
                    Ok(true) => {}
                    Ok(false) => {
                        ended = Some(format!("closed by the server, code {:?}", ws.close_code()));
                        break;
                    }
                    Err(e) => {
                        ended = Some(format!("read failed: {e}"));
                        break;
                    }
                }
            }
            if ended.is_some() {
                // What it will never receive no longer holds the window.
                received_all.fetch_add(messages - tally.received, Ordering::Relaxed);
            }
            last.fetch_max(now_us(), Ordering::Relaxed);
            let mut t = totals.lock().expect("totals");
            t.5 += ws.wire_bytes();
            t.0 += tally.received;
            t.1 += tally.duplicates;
            t.2.merge(&tally.latency);
            if let Some(why) = ended {
                t.3 += 1;
                t.4.get_or_insert(why);
            }
            done.fetch_add(1, Ordering::Relaxed);
        }));
    }
    // The publisher's own copies confirm its messages (the in-flight window).
    let pub_tally = {
        let (echoed, messages, last) = (echoed.clone(), args.messages, last_receive.clone());
        tokio::spawn(async move {
            let mut tally = Tally::new(messages);
            while tally.received < messages {
                let Some(Ok(msg)) = pub_rx.next().await else { break };
                if let Message::Text(t) = msg {
                    if let Some((seq, sent)) = stamp(t.as_bytes()) {
                        if tally.record(seq, sent) {
                            echoed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            last.fetch_max(now_us(), Ordering::Relaxed);
            tally
        })
    };

    let writes_before = write_counters(&args.server.addr).await;
    let cpu_before = cpu_seconds(args.server.pid).unwrap_or(0.0);
    let own_cpu_before = cpu_seconds(std::process::id()).unwrap_or(0.0);
    let started = Instant::now();
    let start_us = now_us();
    let pad = "x".repeat(args.payload.saturating_sub(40));
    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
    // The window holds on the publisher's own copies and on the subscribers'
    // average: a publisher paced by its own copies alone outruns subscribers
    // that the load generator reads later, their queues in the server fill,
    // and the server rightly closes them as slow consumers (4,431 of 5,000 in
    // one run) - a measurement of the load generator, not of the server.
    let readers_n = readers.len() as u64;
    for seq in 0..args.messages {
        while seq - echoed.load(Ordering::Relaxed) >= args.inflight
            || (readers_n > 0 && seq * readers_n >= args.inflight * readers_n + received_all.load(Ordering::Relaxed))
        {
            tokio::task::yield_now().await;
        }
        if let Some(every) = interval {
            let due = started + every.mul_f64(seq as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let data = if args.chat {
            chat_message(seq, now_us(), args.payload)
        } else {
            json!({"seq": seq, "t": now_us(), "p": pad})
        };
        let frame = json!({"type": "publish", "data": data, "history": args.history});
        pub_tx.send(Message::text(frame.to_string())).await?;
    }
    let wait_all = async {
        while done.load(Ordering::Relaxed) < readers.len() as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let timed_out = tokio::time::timeout(Duration::from_secs(30), wait_all).await.is_err();
    let elapsed_us = last_receive.load(Ordering::Relaxed).saturating_sub(start_us).max(1);
    let cpu = cpu_seconds(args.server.pid).unwrap_or(0.0) - cpu_before;
    let own_cpu = cpu_seconds(std::process::id()).unwrap_or(0.0) - own_cpu_before;
    let wall = started.elapsed().as_secs_f64();
    // Frames per `send` over the run, from the server's own counters.
    let per_send = match (writes_before, write_counters(&args.server.addr).await) {
        (Some((w0, f0)), Some((w1, f1))) if w1 > w0 => Some(json!({
            "socket_writes": w1 - w0,
            "frames": f1 - f0,
            "frames_per_send": (f1 - f0) as f64 / (w1 - w0) as f64,
        })),
        _ => None,
    };
    for r in &readers {
        r.abort();
    }
    pub_tally.abort();
    let (received, duplicates, latency, ended_early, first_end, wire_bytes) = {
        let t = totals.lock().expect("totals");
        (t.0, t.1, t.2.clone(), t.3, t.4.clone(), t.5)
    };
    let expected = args.messages * readers.len() as u64;
    let deliveries = received;
    let secs = elapsed_us as f64 / 1e6;
    let report = json!({
        "subscribers": args.subscribers,
        "messages": args.messages,
        "history": args.history,
        "rate": args.rate,
        "deliveries": deliveries,
        "deliveries_per_sec": deliveries as f64 / secs,
        "deliveries_per_cpu_sec": if cpu > 0.0 { deliveries as f64 / cpu } else { 0.0 },
        "server_cpu_sec": cpu,
        "loadgen_cpu_sec": own_cpu,
        "loadgen_cpu_share": if wall > 0.0 { own_cpu / wall } else { 0.0 },
        "latency_us": {"p50": latency.quantile(0.5), "p99": latency.quantile(0.99), "max": latency.max()},
        "lost": expected.saturating_sub(received),
        "duplicated": duplicates,
        "subscribers_ended_early": ended_early,
        "first_early_end": first_end,
        "timed_out": timed_out,
        "writes": per_send,
        "deflate_negotiated": negotiated,
        "wire_bytes": wire_bytes,
        "wire_bytes_per_delivery": wire_bytes as f64 / deliveries.max(1) as f64,
        "server_cpu_us_per_delivery": cpu * 1e6 / deliveries.max(1) as f64,
        "rss_before": rss_before,
        "rss_connected": rss_connected,
        "rss_per_connection": (rss_connected.saturating_sub(rss_before)) as f64 / args.subscribers as f64,
    });
    println!("{report}");
    Ok(())
}

/// A chat message as an app sends it, of about `size` bytes of JSON: the
/// stamps first, then a user, text made of chat sentences (picked by a
/// fixed pseudo-random sequence from `seq`, so every message differs),
/// mentions and reactions.
fn chat_message(seq: u64, t: u64, size: usize) -> serde_json::Value {
    const SENTENCES: &[&str] = &[
        "Did anyone get a chance to look at the pull request for the billing service?",
        "The deploy to staging failed again, the logs show a timeout talking to the database.",
        "I think we should move the retro to Thursday afternoon, half the team is out tomorrow.",
        "Thanks, that fixed it for me!",
        "Can you share the link to the dashboard? I can't find it in the wiki.",
        "Heads up: the CI runners are being upgraded tonight between 10 and 11 pm.",
        "Looks good to me, just left two small comments about naming.",
        "Is the customer call still at 3? I have a conflict and might join ten minutes late.",
        "We hit the rate limit on the email provider again, I opened a ticket with them.",
        "Lunch order is going out in 15 minutes, reply here if you want something.",
        "The new onboarding flow is live for 10% of users, conversion looks slightly better so far.",
        "Who owns the search indexer these days? It has been lagging since yesterday.",
        "I'm rolling back the release, error rates doubled after the last deploy.",
        "Reminder: please update your tickets before the sprint review on Friday.",
        "Great work everyone, the launch went smoothly!",
        "Could someone review the migration script? It touches the users table.",
    ];
    let mut state = seq
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    let mut text = String::new();
    let mut message = serde_json::Value::Null;
    for _ in 0..64 {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(SENTENCES[(state >> 33) as usize % SENTENCES.len()]);
        message = json!({
            "seq": seq,
            "t": t,
            "id": format!("msg-{seq:08}"),
            "user": {"id": 4821 + seq % 7, "name": "Alice Martin", "avatar": format!("https://cdn.example.com/avatars/{}-64.png", 4821 + seq % 7)},
            "text": text,
            "mentions": [{"id": 1177, "name": "Bob Chen"}],
            "reactions": {"thumbsup": seq % 5, "tada": seq % 3},
            "client": "web/2.14.1",
        });
        if message.to_string().len() >= size {
            break;
        }
    }
    message
}
