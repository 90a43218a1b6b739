//! A crowd connecting at once, as after a server restart: `--clients`
//! WebSocket clients start their upgrades together, each waits for its
//! `welcome`, and all stay connected until the last one is through. Prints
//! one JSON line (upgraded, reset, refused, other failures, how long the
//! crowd took) and exits non-zero unless every client was upgraded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use channelbox_bench::raw;
use clap::Parser;
use serde_json::json;
use tokio::sync::Barrier;

#[derive(Debug, Parser)]
struct Args {
    /// Server address, host:port.
    #[arg(long)]
    addr: String,
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Groups the clients are spread over.
    #[arg(long, default_value_t = 100)]
    groups: usize,
    /// How long one client may take to be upgraded and welcomed.
    #[arg(long, default_value_t = 60)]
    timeout_seconds: u64,
}

/// What the welcome frame holds, wherever its fields are.
const WELCOME: &[u8] = br#""type":"welcome""#;

/// How one client fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Upgraded,
    Reset,
    Refused,
    Other,
}

async fn one(addr: &str, path: &str) -> (Outcome, Option<raw::RawSubscriber>, String) {
    let mut sub = match raw::connect(addr, path).await {
        Ok(s) => s,
        Err(e) => {
            let outcome = match e.kind() {
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe => Outcome::Reset,
                std::io::ErrorKind::InvalidData => Outcome::Refused,
                _ => Outcome::Other,
            };
            return (outcome, None, e.to_string());
        }
    };
    let mut welcomed = false;
    let is_welcome = |text: &[u8]| text.windows(WELCOME.len()).any(|w| w == WELCOME);
    while !welcomed {
        match sub.read_frames(|text| welcomed |= is_welcome(text)).await {
            Ok(true) => {}
            Ok(false) => return (Outcome::Reset, None, "closed before its welcome".to_owned()),
            Err(e) => return (Outcome::Reset, None, e.to_string()),
        }
    }
    (Outcome::Upgraded, Some(sub), String::new())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let barrier = Arc::new(Barrier::new(args.clients + 1));
    let done = Arc::new(Barrier::new(args.clients + 1));
    let mut tasks = Vec::with_capacity(args.clients);
    for c in 0..args.clients {
        let (addr, barrier, done) = (args.addr.clone(), barrier.clone(), done.clone());
        let path = format!("/ws/crowd-{}", c % args.groups.max(1));
        let limit = Duration::from_secs(args.timeout_seconds);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let result = tokio::time::timeout(limit, one(&addr, &path)).await;
            let (outcome, held, error) = result.unwrap_or((Outcome::Other, None, "timed out".to_owned()));
            // Connected until every client is through: the server holds
            // the whole crowd at once.
            done.wait().await;
            drop(held);
            (outcome, error)
        }));
    }
    let started = Instant::now();
    barrier.wait().await;
    done.wait().await;
    let took = started.elapsed();
    let mut counts = [0usize; 4];
    let mut first_error = None;
    for t in tasks {
        let (outcome, error) = t.await?;
        counts[outcome as usize] += 1;
        if outcome != Outcome::Upgraded && first_error.is_none() {
            first_error = Some(error);
        }
    }
    let report = json!({
        "clients": args.clients,
        "upgraded": counts[Outcome::Upgraded as usize],
        "reset": counts[Outcome::Reset as usize],
        "refused": counts[Outcome::Refused as usize],
        "other": counts[Outcome::Other as usize],
        "seconds": took.as_secs_f64(),
        "first_error": first_error,
    });
    println!("{report}");
    if counts[Outcome::Upgraded as usize] != args.clients {
        anyhow::bail!(
            "{} of {} clients were not upgraded",
            args.clients - counts[0],
            args.clients
        );
    }
    Ok(())
}
