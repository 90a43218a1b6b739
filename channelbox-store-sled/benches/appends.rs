//! Durable appends per second with 1, 16 and 256 concurrent writers: group
//! commit against flush-per-append, in the same run. Each writer appends and
//! waits for its append to be durable before the next, as a publisher waiting
//! for its acknowledgement would.

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use channelbox_core::{HistoryStore, NewMessage, PayloadKind};
use channelbox_store_sled::{CommitMode, SledConfig, SledStore};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn bench_appends(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut group = c.benchmark_group("durable_appends");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(1));
    for (mode, name) in [
        (CommitMode::Group, "group_commit"),
        (CommitMode::PerAppend, "flush_per_append"),
    ] {
        let store: Arc<dyn HistoryStore> = Arc::new(
            SledStore::open(SledConfig {
                commit: mode,
                ..SledConfig::new(dir.path().join(name))
            })
            .expect("open"),
        );
        for writers in [1u64, 16, 256] {
            group.bench_with_input(BenchmarkId::new(name, writers), &writers, |b, &writers| {
                b.iter_custom(|iters| {
                    let store = store.clone();
                    rt.block_on(async move {
                        let per_writer = iters.div_ceil(writers);
                        let start = Instant::now();
                        let tasks: Vec<_> = (0..writers)
                            .map(|w| {
                                let store = store.clone();
                                tokio::spawn(async move {
                                    let group = format!("g{}", w % 8);
                                    for _ in 0..per_writer {
                                        let m = NewMessage::new(PayloadKind::Json, Bytes::from_static(&[b'7'; 64]));
                                        let pending = store.append(&group, m).expect("append");
                                        pending.wait().await.expect("durable");
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.expect("writer");
                        }
                        // Report the time per requested iteration.
                        start.elapsed().mul_f64(iters as f64 / (per_writer * writers) as f64)
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_appends);
criterion_main!(benches);
