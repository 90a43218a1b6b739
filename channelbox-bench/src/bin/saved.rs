//! What a saved message costs the chat server, seen from outside: its
//! resident memory per saved message, as a user sizing a server would read
//! it. Clients (each a member of up to 250 groups) publish `--messages`
//! messages of `--payload` bytes spread over `--groups` groups, each saved
//! and acknowledged (`published`), then the server's RSS is read again.
//! Prints one JSON line.
//!
//! Run it against a server with room for all of it (`--history-bytes`,
//! `--history-total-bytes`); the difference in RSS before and after,
//! divided by the messages, is the store's slot, the message's bytes and
//! the allocator's rounding, as in production. A warm-up round to other
//! groups comes first, so that the code publishing and saving runs (and
//! is paged in: file-backed RSS) before the first reading.

use std::time::Duration;

use anyhow::Context as _;
use channelbox_bench::{rss_bytes, rss_split, Target};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: Target,
    /// Messages to save.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Groups they are spread over, evenly.
    #[arg(long, default_value_t = 1000)]
    groups: usize,
    /// Each message's `data`: a JSON number of this many digits.
    #[arg(long, default_value_t = 1)]
    payload: usize,
    /// Publishes awaiting their `published`, per client.
    #[arg(long, default_value_t = 200)]
    inflight: u64,
    /// Gives up after this many seconds: a server that stalls fails the
    /// measurement instead of holding up the benchmark.
    #[arg(long, default_value_t = 300)]
    deadline: u64,
}

/// Warm-up messages, over as many groups of their own.
const WARM_UP: (u64, usize) = (2_000, 10);

/// Groups per client: the server's default allows 256 per connection.
const GROUPS_PER_CLIENT: usize = 250;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The server's RSS at rest, and its anonymous part: the lowest of five
/// readings half a second apart (the allocator returns freed pages after a
/// delay).
async fn settled_rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let (mut rss, mut anon) = (u64::MAX, u64::MAX);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss = rss.min(rss_bytes(pid).context("cannot read the server's RSS")?);
        anon = anon.min(rss_split(pid).context("cannot read the server's RSS")?.0);
    }
    Ok((rss, anon))
}

/// The next text frame's JSON, skipping pings.
async fn next_json(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        match ws.next().await.context("the server closed")?? {
            Message::Text(t) => return Ok(serde_json::from_str(&t)?),
            Message::Close(c) => anyhow::bail!("the server closed: {c:?}"),
            _ => {}
        }
    }
}

/// Waits for a reply of type `kind`; an `error` fails.
async fn reply(ws: &mut Ws, kind: &str) -> anyhow::Result<Value> {
    loop {
        let v = next_json(ws).await?;
        match v["type"].as_str() {
            Some(t) if t == kind => return Ok(v),
            Some("error") => anyhow::bail!("the server refused: {v}"),
            _ => {}
        }
    }
}

/// A client that is a member of `groups`.
async fn member_of(addr: &str, groups: &[String]) -> anyhow::Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/{}", groups[0])).await?;
    reply(&mut ws, "welcome").await?;
    for g in &groups[1..] {
        ws.send(Message::text(json!({"type": "join", "group": g}).to_string()))
            .await?;
        reply(&mut ws, "joined").await?;
    }
    Ok(ws)
}

/// Publishes `messages` to `groups` in turn, at most `inflight` unconfirmed.
/// Returns the client, still open: its leaving would change what is measured.
async fn publish(mut ws: Ws, groups: Vec<String>, messages: u64, data: String, inflight: u64) -> anyhow::Result<Ws> {
    let (mut sent, mut confirmed) = (0u64, 0u64);
    while confirmed < messages {
        while sent < messages && sent - confirmed < inflight {
            let group = &groups[sent as usize % groups.len()];
            let frame = format!(r#"{{"type":"publish","group":"{group}","data":{data},"echo":false}}"#);
            ws.feed(Message::text(frame)).await?;
            sent += 1;
        }
        ws.flush().await?;
        let v = reply(&mut ws, "published").await?;
        anyhow::ensure!(v["offset"].is_u64(), "a publish was not saved: {v}");
        confirmed += 1;
    }
    Ok(ws)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.groups > 0 && args.payload > 0,
        "--groups and --payload must be positive"
    );
    anyhow::ensure!(
        args.payload <= 15,
        "--payload above 15 digits would not stay an integer"
    );
    let deadline = Duration::from_secs(args.deadline);
    let report = tokio::time::timeout(deadline, measure(&args))
        .await
        .map_err(|_| anyhow::anyhow!("no result within {} s", args.deadline))??;
    println!("{report}");
    Ok(())
}

/// Clients that are members of `names`, each of up to [`GROUPS_PER_CLIENT`].
async fn clients(addr: &str, names: &[String]) -> anyhow::Result<Vec<(Ws, Vec<String>)>> {
    let mut clients = Vec::new();
    for chunk in names.chunks(GROUPS_PER_CLIENT) {
        clients.push((member_of(addr, chunk).await?, chunk.to_vec()));
    }
    Ok(clients)
}

/// `messages` publishes from `clients` together, each to its own groups;
/// the clients, still open.
async fn publish_all(
    clients: Vec<(Ws, Vec<String>)>,
    messages: u64,
    data: &str,
    inflight: u64,
) -> anyhow::Result<Vec<Ws>> {
    let n = clients.len() as u64;
    let mut tasks = Vec::new();
    for (i, (ws, groups)) in clients.into_iter().enumerate() {
        let share = messages / n + u64::from((i as u64) < messages % n);
        tasks.push(tokio::spawn(publish(ws, groups, share, data.to_owned(), inflight)));
    }
    let mut open = Vec::new();
    for t in tasks {
        open.push(t.await??);
    }
    Ok(open)
}

async fn measure(args: &Args) -> anyhow::Result<Value> {
    let data = "1".repeat(args.payload);
    let warm: Vec<String> = (0..WARM_UP.1).map(|g| format!("saved-warm-{g}")).collect();
    let warm = publish_all(
        clients(&args.server.addr, &warm).await?,
        WARM_UP.0,
        &data,
        args.inflight,
    )
    .await?;
    let names: Vec<String> = (0..args.groups).map(|g| format!("saved-{g}")).collect();
    let measured = clients(&args.server.addr, &names).await?;
    let (before, anon_before) = settled_rss(args.server.pid).await?;
    let open = publish_all(measured, args.messages, &data, args.inflight).await?;
    let (after, anon_after) = settled_rss(args.server.pid).await?;
    for mut ws in open.into_iter().chain(warm) {
        ws.close(None).await.ok();
    }
    let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / args.messages.max(1) as f64;
    Ok(json!({
        "messages": args.messages,
        "groups": args.groups,
        "payload": args.payload,
        "rss_before": before,
        "rss_after": after,
        "rss_bytes_per_message": per(after, before),
        "anon_bytes_per_message": per(anon_after, anon_before),
    }))
}
