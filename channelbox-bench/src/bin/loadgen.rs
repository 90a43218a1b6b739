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
//!
//! With `--sample N` only N subscribers, spread evenly over the connection
//! order, decode what they receive (inflate, find the stamps, check every
//! sequence number once, latency); the others only parse frame headers and
//! count messages and bytes. Inflating every delivery of 1,000 subscribers
//! took the one load-generator process 38-41 s of CPU against 3-4 s plain,
//! and it, not the server, set the pace. Then losses and duplicates are
//! exact for the sample and count-based for the rest (each delivery is one
//! text frame: fewer frames than messages is a loss), and the latency
//! percentiles are the sample's.

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
    /// With `--rate`: publish for this many seconds instead of `--messages`
    /// (rate × seconds messages), the fixed-rate mode of the light-load
    /// benchmark.
    #[arg(long, requires = "rate")]
    seconds: Option<u64>,
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
    /// Subscribers that decode every message (inflate, parse, check each
    /// sequence number, latency), spread evenly over the connection order;
    /// the others only count frames and bytes. All when absent.
    #[arg(long)]
    sample: Option<usize>,
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
    let mut args = Args::parse();
    if let Some(seconds) = args.seconds {
        anyhow::ensure!(args.rate > 0, "--seconds needs a --rate above 0");
        args.messages = args.rate * seconds;
    }
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
    let sample = args.sample.unwrap_or(readers_wanted).min(readers_wanted);
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
    // (the allocator returns freed pages after a delay — jemalloc's decay is
    // a second; read 300 ms after the last join, handshake leftovers counted
    // as idle memory: 8.2-8.4 KB against 7.8 KB settled, 10,000 subscribers).
    let rss_connected = {
        let mut lowest = u64::MAX;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = members(&args.server.addr, &args.members).await;
            lowest = lowest.min(rss_bytes(args.server.pid).unwrap_or(0));
        }
        lowest
    };

    // What arrived before the measurement (each subscriber's `welcome`) is
    // counted here and left out of it: an unsampled subscriber counts every
    // text frame after this as a delivery.
    let mut before_publish = 0;
    for ws in &mut sockets {
        before_publish += ws.settle().await?;
    }

    let done = Arc::new(AtomicU64::new(0));
    let echoed = Arc::new(AtomicU64::new(0));
    let totals = Arc::new(Mutex::new(Totals::default()));
    let (mut pub_tx, mut pub_rx) = publisher.split();
    let last_receive = Arc::new(AtomicU64::new(0));
    // Frames received by all subscribers together, for the in-flight window.
    let received_all = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    let readers_total = sockets.len();
    for (i, ws) in sockets.into_iter().enumerate() {
        let (done, totals, messages, last) = (done.clone(), totals.clone(), args.messages, last_receive.clone());
        let received_all = received_all.clone();
        let sampled = in_sample(i, sample, readers_total);
        readers.push(tokio::spawn(async move {
            let mut ws = ws;
            let mut tally = Tally::new(messages);
            let mut ended = None;
            // A sampled subscriber is done when it has every sequence number,
            // the others when they have counted as many frames.
            let got = |ws: &raw::RawSubscriber, tally: &Tally| if sampled { tally.received } else { ws.messages() };
            while got(&ws, &tally) < messages {
                let before = got(&ws, &tally);
                let open = if sampled {
                    ws.read_frames(|t| {
                        if let Some((seq, sent)) = stamp(t) {
                            tally.record(seq, sent);
                        }
                    })
                    .await
                } else {
                    ws.count_frames().await
                };
                received_all.fetch_add(got(&ws, &tally).saturating_sub(before), Ordering::Relaxed);
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
                received_all.fetch_add(messages.saturating_sub(got(&ws, &tally)), Ordering::Relaxed);
            }
            last.fetch_max(now_us(), Ordering::Relaxed);
            let mut t = totals.lock().expect("totals");
            t.wire_bytes += ws.wire_bytes();
            t.frames += ws.messages();
            t.compressed += ws.compressed();
            if sampled {
                t.sampled_received += tally.received;
                t.lost += messages - tally.received;
                t.duplicates += tally.duplicates;
                // Text frames without both stamps: not a delivery of ours.
                t.unreadable += ws.messages().saturating_sub(tally.received + tally.duplicates);
                t.latency.merge(&tally.latency);
            } else {
                t.lost += messages.saturating_sub(ws.messages());
                t.extra += ws.messages().saturating_sub(messages);
            }
            if let Some(why) = ended {
                t.ended_early += 1;
                t.first_end.get_or_insert(why);
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
    let t = std::mem::take(&mut *totals.lock().expect("totals"));
    let deliveries = t.frames;
    let wire_bytes = t.wire_bytes;
    let latency = &t.latency;
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
        "wall_sec": wall,
        "server_cores": if wall > 0.0 { cpu / wall } else { 0.0 },
        "loadgen_cpu_sec": own_cpu,
        "loadgen_cpu_share": if wall > 0.0 { own_cpu / wall } else { 0.0 },
        // Of the sampled subscribers only (all of them without --sample).
        "latency_us": {"p50": latency.quantile(0.5), "p99": latency.quantile(0.99), "max": latency.max(), "samples": latency.count()},
        "sampled_subscribers": sample,
        "sampled_deliveries": t.sampled_received,
        // Exact for the sample, fewer frames than messages for the rest.
        "lost": t.lost,
        // Exact for the sample; `extra` counts frames past the last message
        // that an unsampled subscriber read.
        "duplicated": t.duplicates,
        "extra": t.extra,
        "unreadable": t.unreadable,
        "compressed_deliveries": t.compressed,
        "frames_before_publish": before_publish,
        "subscribers_ended_early": t.ended_early,
        "first_early_end": t.first_end,
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

/// What the subscribers received, added up as each one finishes.
#[derive(Debug, Default)]
struct Totals {
    /// Text frames counted, by every subscriber: the deliveries.
    frames: u64,
    /// Of those, compressed ones (RSV1).
    compressed: u64,
    /// Bytes read off the wire during the measurement.
    wire_bytes: u64,
    /// Distinct messages the sampled subscribers decoded.
    sampled_received: u64,
    /// Messages missing: sequence numbers never seen in the sample, frames
    /// short of the message count elsewhere.
    lost: u64,
    /// Sequence numbers a sampled subscriber saw twice.
    duplicates: u64,
    /// Frames past the message count an unsampled subscriber read.
    extra: u64,
    /// Text frames in the sample without the stamps of a delivery.
    unreadable: u64,
    /// Latency of the sample's first arrivals.
    latency: Histogram,
    /// Subscribers that stopped before they had every message.
    ended_early: u64,
    /// Why the first of them stopped.
    first_end: Option<String>,
}

/// Whether subscriber `i` of `n` is one of the `sample` that decode, spread
/// evenly over the connection order (the server delivers in about that
/// order, so the sample's latencies span early and late deliveries).
fn in_sample(i: usize, sample: usize, n: usize) -> bool {
    (i + 1) * sample / n.max(1) > i * sample / n.max(1)
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

#[cfg(test)]
mod tests {
    use super::in_sample;

    #[test]
    fn the_sample_is_spread_evenly_and_has_its_size() {
        let picked: Vec<usize> = (0..999).filter(|&i| in_sample(i, 50, 999)).collect();
        assert_eq!(picked.len(), 50);
        // One in every 19 or 20, from the first twenty to the last.
        assert!(
            picked.windows(2).all(|w| (19..=20).contains(&(w[1] - w[0]))),
            "{picked:?}"
        );
        assert!(picked[0] < 20 && picked[49] >= 979, "{picked:?}");
        assert_eq!((0..10).filter(|&i| in_sample(i, 10, 10)).count(), 10);
        assert_eq!((0..10).filter(|&i| in_sample(i, 0, 10)).count(), 0);
    }
}
