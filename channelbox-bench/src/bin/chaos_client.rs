//! The workload of `cargo xtask chaos`: many clients, each a
//! `channelbox_ws::client::ChatClient` (so the project's own client is under
//! test too), publish uniquely named payloads, join and leave a few groups and
//! let the client reconnect and recover by itself while the driver injects
//! faults. Every client writes a log of JSON lines — what it received, its
//! acknowledgements and refusals, recoveries and closes — for the checker.
//!
//! Everything random comes from `--seed`, so a run's choices replay exactly
//! (the timing of the network does not).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use channelbox_ws::client::{ChatClient, ClientConfig, ClientError, Event};
use clap::Parser;
use futures_util::FutureExt;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
struct Args {
    /// The servers (`ws://host:port`, comma-separated); each client picks one.
    #[arg(long, value_delimiter = ',')]
    servers: Vec<String>,
    /// How many clients.
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// How many groups they spread over.
    #[arg(long, default_value_t = 4)]
    groups: usize,
    /// How long the clients publish.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// How long they only listen afterwards, so that every recovery ends.
    #[arg(long, default_value_t = 8)]
    settle: u64,
    /// The seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The directory of the logs (one `client-N.jsonl` per client).
    #[arg(long)]
    logs: PathBuf,
}

/// SplitMix64: small, and the same sequence on every platform.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One client's log file, written line by line with a time stamp.
struct Log {
    out: std::io::BufWriter<std::fs::File>,
    start: Instant,
}

impl Log {
    fn write(&mut self, mut line: Value) {
        line["t"] = json!(self.start.elapsed().as_millis() as u64);
        let _ = writeln!(self.out, "{line}");
    }

    /// Logs every event already waiting, without blocking.
    fn drain(&mut self, client: &mut ChatClient) {
        while let Some(Some(event)) = client.next_event().now_or_never() {
            self.event(event);
        }
    }

    fn event(&mut self, event: Event) {
        let line = match event {
            Event::Message {
                group,
                epoch,
                offset,
                data,
                ..
            } => json!({"k": "msg", "g": group, "e": epoch, "o": offset, "id": data["id"]}),
            Event::Recovered {
                group,
                from,
                to,
                complete,
            } => json!({"k": "rec", "g": group, "from": from, "to": to, "complete": complete}),
            Event::Disconnected { code, reason } => json!({"k": "disc", "code": code, "reason": reason}),
            Event::Connected {
                channel_id,
                epoch,
                offset,
            } => json!({"k": "conn", "channel": channel_id, "e": epoch, "o": offset}),
            _ => return,
        };
        self.write(line);
    }
}

fn group_name(i: u64) -> String {
    format!("chaos-{i}")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(!args.servers.is_empty(), "--servers is empty");
    std::fs::create_dir_all(&args.logs)?;
    let mut tasks = Vec::new();
    for n in 0..args.clients {
        let rng = Rng(args.seed.wrapping_mul(1_000_003).wrapping_add(n as u64));
        let file = std::fs::File::create(args.logs.join(format!("client-{n}.jsonl")))?;
        let log = Log {
            out: std::io::BufWriter::new(file),
            start: Instant::now(),
        };
        let server = args.servers[n % args.servers.len()].clone();
        let (groups, seconds, settle) = (args.groups as u64, args.seconds, args.settle);
        tasks.push(tokio::spawn(async move {
            client(n, server, groups, seconds, settle, rng, log).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// One client's life: connect, then act until the deadline, then listen.
async fn client(
    n: usize,
    server: String,
    groups: u64,
    seconds: u64,
    settle: u64,
    mut rng: Rng,
    mut log: Log,
) -> anyhow::Result<()> {
    let url_group = group_name(rng.below(groups));
    let mut config = ClientConfig::new(server, url_group.clone());
    config.min_backoff = Duration::from_millis(50);
    config.max_backoff = Duration::from_millis(500);
    log.write(json!({"k": "join", "g": url_group}));
    let start = Instant::now();
    let mut client = loop {
        match tokio::time::timeout(Duration::from_secs(5), ChatClient::connect(config.clone())).await {
            Ok(Ok(c)) => break c,
            _ if start.elapsed() > Duration::from_secs(seconds) => anyhow::bail!("client {n} never connected"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    log.write(json!({"k": "joined", "g": url_group}));
    let mut member = vec![url_group];
    let mut sent = 0u64;
    let deadline = start + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        log.drain(&mut client);
        match rng.below(10) {
            0 => join(&mut client, &mut log, &mut member, group_name(rng.below(groups))).await,
            1 if member.len() > 1 => {
                let g = member.remove(rng.below(member.len() as u64) as usize);
                leave(&mut client, &mut log, g).await;
            }
            _ => {
                let g = member[rng.below(member.len() as u64) as usize].clone();
                sent += 1;
                publish(&mut client, &mut log, &g, format!("c{n}-{sent}")).await;
            }
        }
        log.drain(&mut client);
        tokio::time::sleep(Duration::from_millis(20 + rng.below(80))).await;
    }
    // Listen only, so that every reconnect and recovery can end.
    let quiet = Instant::now() + Duration::from_secs(settle);
    while let Ok(Some(event)) = tokio::time::timeout_at(quiet.into(), client.next_event()).await {
        log.event(event);
    }
    log.write(json!({"k": "end", "groups": member}));
    log.out.flush()?;
    Ok(())
}

async fn publish(client: &mut ChatClient, log: &mut Log, group: &str, id: String) {
    log.write(json!({"k": "send", "g": group, "id": id}));
    // A bounded wait: the events that arrive meanwhile wait in the client's
    // queue, which must not fill up.
    let reply = tokio::time::timeout(
        Duration::from_secs(3),
        client.publish(group, json!({"id": id, "pad": "x".repeat(32)})),
    )
    .await;
    let line = match reply {
        Ok(Ok(ack)) => json!({"k": "ack", "g": group, "id": id, "e": ack["epoch"], "o": ack["offset"]}),
        Ok(Err(ClientError::Rejected { code, message })) => {
            json!({"k": "refused", "g": group, "id": id, "code": code, "msg": message})
        }
        Ok(Err(e)) => json!({"k": "unknown", "g": group, "id": id, "why": e.to_string()}),
        Err(_) => json!({"k": "unknown", "g": group, "id": id, "why": "no reply in 3 s"}),
    };
    log.write(line);
}

async fn join(client: &mut ChatClient, log: &mut Log, member: &mut Vec<String>, group: String) {
    if member.contains(&group) {
        return;
    }
    // Logged before the request: messages of the group may come before `joined`.
    log.write(json!({"k": "join", "g": group}));
    match tokio::time::timeout(Duration::from_secs(3), client.join(&group)).await {
        Ok(Ok(_)) => {
            log.write(json!({"k": "joined", "g": group}));
            member.push(group);
        }
        other => log.write(json!({"k": "join_failed", "g": group, "why": format!("{other:?}")})),
    }
}

async fn leave(client: &mut ChatClient, log: &mut Log, group: String) {
    let reply = tokio::time::timeout(
        Duration::from_secs(3),
        client.request(json!({"type": "leave", "group": group})),
    )
    .await;
    // Logged after the reply and the events before it: nothing of the group
    // follows `left` (the client delivers nothing of a group it left, and
    // does not rejoin it after a reconnect).
    log.drain(client);
    log.write(json!({"k": "left", "g": group, "ok": matches!(reply, Ok(Ok(_)))}));
}
