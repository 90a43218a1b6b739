//! Both stores side by side: appends and reads per second (criterion), and
//! what a retained message costs — process memory (resident set, with the
//! chat server's allocator) beyond its payload for the memory store, and
//! memory and disk bytes for sled. The byte figures are printed and written
//! to target/bench/store-bytes.json.

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use channelbox_core::{HistoryLimits, HistoryStore, NewMessage, PayloadKind, ReadQuery};
use channelbox_store_memory::{MemoryConfig, MemoryStore};
use channelbox_store_sled::{SledConfig, SledStore};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Limits that keep everything: the measurement is of what is kept.
fn keep_all() -> HistoryLimits {
    HistoryLimits {
        max_bytes: u64::MAX,
        max_total_bytes: None,
        ..HistoryLimits::default()
    }
}

fn message(payload: usize, meta: usize) -> NewMessage {
    NewMessage {
        meta: Bytes::from(vec![b'm'; meta]),
        ..NewMessage::new(PayloadKind::Json, Bytes::from(vec![b'1'; payload]))
    }
}

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Groups the measured messages are spread over: a server's history is many
/// groups' bounded queues, not one queue of a million.
const GROUPS: usize = 1000;

/// Appends `n` messages over [`GROUPS`] groups and returns the resident
/// memory they added, per message.
fn fill(rt: &tokio::runtime::Runtime, store: &dyn HistoryStore, n: usize, payload: usize, meta: usize) -> f64 {
    let names: Vec<String> = (0..GROUPS).map(|g| format!("group-{g}")).collect();
    let before = rss();
    rt.block_on(async {
        let mut pending = Vec::with_capacity(1024);
        for i in 0..n {
            let group = &names[i % GROUPS];
            pending.push(store.append(group, message(payload, meta)).expect("append"));
            if pending.len() == 1024 {
                for p in pending.drain(..) {
                    p.wait().await.expect("durable");
                }
            }
        }
        for p in pending {
            p.wait().await.expect("durable");
        }
    });
    // Buffers the queues outgrew are freed; the allocator returns them to
    // the system after a short delay (jemalloc's decay), then what is
    // resident is what the messages keep.
    std::thread::sleep(Duration::from_millis(1500));
    drop(vec![0u8; 1 << 20]);
    rss().saturating_sub(before) as f64 / n as f64
}

/// Set in a child process: measure one store and configuration, print it.
const CHILD: &str = "CHANNELBOX_STORE_BYTES";

/// In a fresh process (memory freed by an earlier measurement would be
/// reused and hide what a message costs): fills one store, prints
/// `memory_bytes_per_message disk_bytes_per_message`.
fn child(spec: &str) {
    let parts: Vec<&str> = spec.split(',').collect();
    let (store, payload, meta) = (parts[0], parts[1].parse().unwrap_or(1), parts[2].parse().unwrap_or(0));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let (per, disk) = if store == "memory" {
        let memory = MemoryStore::new(MemoryConfig { limits: keep_all() });
        (fill(&rt, &memory, 1_000_000, payload, meta), 0.0)
    } else {
        let n = 200_000;
        let sled = SledStore::open(SledConfig {
            limits: keep_all(),
            ..SledConfig::new(dir.path().join("s"))
        })
        .expect("open");
        let per = fill(&rt, &sled, n, payload, meta);
        rt.block_on(sled.sync()).expect("sync");
        (per, dir_bytes(dir.path()) as f64 / n as f64)
    };
    println!("{per} {disk}");
}

fn measure_bytes() -> serde_json::Value {
    let mut rows = Vec::new();
    for (payload, meta) in [(1, 0), (1, 48), (64, 48)] {
        for store in ["memory", "sled"] {
            let out = std::process::Command::new(std::env::current_exe().expect("bench binary"))
                .env(CHILD, format!("{store},{payload},{meta}"))
                .output()
                .expect("measure in a child process");
            let text = String::from_utf8_lossy(&out.stdout);
            let mut figures = text.split_whitespace().map(|v| v.parse::<f64>().unwrap_or(0.0));
            let (per, disk) = (figures.next().unwrap_or(0.0), figures.next().unwrap_or(0.0));
            let beyond = per - (payload + meta) as f64;
            println!(
                "{store:>6} store: {payload:>3} B payload, {meta:>2} B meta: {per:>6.1} B/message in memory ({beyond:>6.1} beyond payload and meta), {disk:>6.1} B/message on disk"
            );
            rows.push(serde_json::json!({"store": store, "payload": payload, "meta": meta,
                "memory_bytes_per_message": per, "memory_bytes_beyond_payload_and_meta": beyond,
                "disk_bytes_per_message": disk}));
        }
    }
    serde_json::json!({ "bytes_per_message": rows })
}

fn bench_stores(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let bytes = measure_bytes();
    let _ = std::fs::create_dir_all("../target/bench");
    let _ = std::fs::write("../target/bench/store-bytes.json", bytes.to_string());
    let dir = tempfile::tempdir().expect("temp dir");
    let stores: [(&str, Arc<dyn HistoryStore>); 2] = [
        ("memory", Arc::new(MemoryStore::default())),
        (
            "sled",
            Arc::new(SledStore::open(SledConfig::new(dir.path().join("b"))).expect("open")),
        ),
    ];
    let mut group = c.benchmark_group("stores");
    group.sample_size(10).measurement_time(Duration::from_secs(3));
    for (name, store) in &stores {
        group.throughput(Throughput::Elements(1024 * 256));
        group.bench_function(BenchmarkId::new("append_pipelined", name), |b| {
            b.iter(|| fill(&rt, &**store, 1024 * 256, 64, 48));
        });
        group.throughput(Throughput::Elements(256));
        group.bench_function(BenchmarkId::new("read_256_since", name), |b| {
            b.iter(|| {
                rt.block_on(store.read("group-0", ReadQuery::Since { offset: 1, limit: 256 }))
                    .expect("read")
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench_stores);

fn main() {
    if let Ok(spec) = std::env::var(CHILD) {
        return child(&spec);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
