//! How long a `head` of one group (just written, its write durable)
//! takes while other groups' appends keep the total budget evicting: prints the median and 99th percentile. Run with
//! `cargo run --release -p channelbox-store-sled --example read_wait`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use channelbox_core::{HistoryLimits, HistoryStore, NewMessage, PayloadKind};
use channelbox_store_sled::{SledConfig, SledStore};

/// Publishers to fresh group names: once a 4 MiB budget is full (some
/// 7,000 groups), nearly every append evicts the least recently written
/// group. Returns how many appends it made.
async fn publish(store: Arc<SledStore>, task: usize, until: Instant) -> u64 {
    let mut i = 0u64;
    while Instant::now() < until {
        // 100 appends queued at once, then awaited: the writer has a backlog,
        // as under a burst of publishes.
        let mut waiting = Vec::new();
        for _ in 0..100 {
            let message = NewMessage::new(PayloadKind::Text, Bytes::from(vec![b'x'; 200]));
            if let Ok(pending) = store.append(&format!("spam-{task}-{i}"), message) {
                waiting.push(pending.wait());
            }
            i += 1;
        }
        for w in waiting {
            let _ = w.await;
        }
    }
    i
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let limits = HistoryLimits {
        max_total_bytes: Some(4 << 20),
        ..HistoryLimits::default()
    };
    let config = SledConfig {
        limits,
        ..SledConfig::new(dir.path().join("history"))
    };
    let store = Arc::new(SledStore::open(config).expect("the store opens"));
    let hot = NewMessage::new(PayloadKind::Text, Bytes::from_static(b"hot"));
    store.append("hot", hot).expect("append").wait().await.expect("durable");
    let until = Instant::now() + Duration::from_secs(10);
    let publishers: Vec<_> = (0..16)
        .map(|t| tokio::spawn(publish(store.clone(), t, until)))
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut took = Vec::new();
    while Instant::now() + Duration::from_millis(500) < until {
        // Written before each head, so that it is not the group the budget
        // evicts; awaited, so its own write is durable.
        let hot = NewMessage::new(PayloadKind::Text, Bytes::from_static(b"hot"));
        store.append("hot", hot).expect("append").wait().await.expect("durable");
        let start = Instant::now();
        store.head("hot").await.expect("head");
        took.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut appends = 0;
    for p in publishers {
        appends += p.await.unwrap_or(0);
    }
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q) as usize];
    println!(
        "head of a hot group while others evict: {appends} appends to fresh groups, {} heads, median {:?}, p99 {:?}",
        took.len(),
        at(0.5),
        at(0.99)
    );
}
