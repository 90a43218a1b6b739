//! `group_send` fan-out to 1,000 and 10,000 in-process channels, against a naive
//! baseline in the same run: the payload serialized once per member and pushed
//! into an unbounded channel per member, members behind one lock.
//!
//! Both sides are measured end to end on one core (a current-thread runtime):
//! a batch of broadcasts, then until every member's writer has taken every frame.
//! Criterion's throughput is in deliveries (members × messages) per second.

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use channelbox_core::{Channel, ChannelBox, ChannelConfig, CloseReason, Frame, FrameSink, HistoryStore, SinkError};
use channelbox_store_memory::MemoryStore;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Messages per drained batch; below the default queue size of 1,024.
const BATCH: u64 = 64;

struct CountingSink(Arc<AtomicU64>);

#[async_trait]
impl FrameSink for CountingSink {
    async fn send(&mut self, frames: &[Frame]) -> Result<(), SinkError> {
        self.0.fetch_add(frames.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    async fn close(&mut self, _: &CloseReason) -> Result<(), SinkError> {
        Ok(())
    }
}

async fn drained(counter: &AtomicU64, expected: u64) {
    while counter.load(Ordering::Relaxed) < expected {
        tokio::task::yield_now().await;
    }
}

fn payload() -> serde_json::Value {
    json!({"user": "bench", "text": "0123456789abcdef0123456789abcdef"})
}

fn bench_fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("group_send");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    for members in [1_000usize, 10_000] {
        group.throughput(Throughput::Elements(members as u64));

        // channelbox: one encoding shared by every member, no lock while delivering.
        let counter = Arc::new(AtomicU64::new(0));
        let cb = rt.block_on(async {
            let store: Arc<dyn HistoryStore> = Arc::new(MemoryStore::default());
            let cb = ChannelBox::new(store);
            for _ in 0..members {
                let ch = Channel::open(ChannelConfig::default(), CountingSink(counter.clone()));
                cb.add_channel_to_group(&ch, "bench").await.expect("join");
            }
            cb
        });
        for save in [false, true] {
            let name = if save { "channelbox+history" } else { "channelbox" };
            group.bench_with_input(BenchmarkId::new(name, members), &members, |b, &members| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        let mut expected = counter.load(Ordering::Relaxed);
                        for i in 0..iters {
                            cb.group_send("bench", payload(), save).await.expect("send");
                            expected += members as u64;
                            if (i + 1) % BATCH == 0 {
                                drained(&counter, expected).await;
                            }
                        }
                        drained(&counter, expected).await;
                        start.elapsed()
                    })
                })
            });
        }

        // The naive baseline.
        let received = Arc::new(AtomicU64::new(0));
        let peers: Arc<Mutex<HashMap<Uuid, mpsc::UnboundedSender<String>>>> = Arc::default();
        rt.block_on(async {
            for _ in 0..members {
                let (tx, mut rx) = mpsc::unbounded_channel::<String>();
                peers.lock().expect("lock").insert(Uuid::new_v4(), tx);
                let received = received.clone();
                tokio::spawn(async move {
                    while let Some(msg) = rx.recv().await {
                        std::hint::black_box(msg);
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        group.bench_with_input(BenchmarkId::new("naive", members), &members, |b, &members| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    let mut expected = received.load(Ordering::Relaxed);
                    for i in 0..iters {
                        let value = payload();
                        {
                            let peers = peers.lock().expect("lock");
                            for tx in peers.values() {
                                let _ = tx.send(serde_json::to_string(&value).expect("json"));
                            }
                        }
                        expected += members as u64;
                        if (i + 1) % BATCH == 0 {
                            drained(&received, expected).await;
                        }
                    }
                    drained(&received, expected).await;
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_fanout);
criterion_main!(benches);
