//! Property test: random appends, reads, flushes and reopens of the sled store
//! give the same reads as the reference model.

use std::sync::Arc;

use channelbox_core::testkit::model::{check_against_model, history_ops, small_limits, HistoryOp};
use channelbox_core::HistoryStore;
use channelbox_store_sled::{SledConfig, SledStore};
use proptest::prelude::*;

proptest! {
    // Each case opens real directories; the case count stays modest by default
    // and `cargo xtask proptest` raises it.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]
    #[test]
    fn sled_store_with_reopens_matches_the_model(
        ops in history_ops(50, true),
        limits in small_limits(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(check_against_model(limits.clone(), &ops, || {
            let config = SledConfig { limits: limits.clone(), cache_bytes: 1 << 20, ..SledConfig::new(&path) };
            Arc::new(SledStore::open(config).unwrap()) as Arc<dyn HistoryStore>
        }));
    }
}

/// One step of the model test with failures: a few ordinary operations, or a
/// batch of writes that the writer takes at once and fails after `applied`
/// of its sled operations (when the model can predict the outcome: see
/// `failures::applied`), then recovers by itself or, with `restart`, is
/// dropped while failing and opened again.
#[derive(Clone, Debug)]
enum Step {
    Ops(Vec<HistoryOp>),
    FailingBatch {
        writes: Vec<Write>,
        applied: usize,
        restart: bool,
    },
}

#[derive(Clone, Debug)]
enum Write {
    Append { group: u8, size: u16 },
    FlushGroup(u8),
    FlushAll,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let write = prop_oneof![
        4 => (0u8..3, 0u16..40).prop_map(|(group, size)| Write::Append { group, size }),
        1 => (0u8..3).prop_map(Write::FlushGroup),
        1 => Just(Write::FlushAll),
    ];
    let step = prop_oneof![
        4 => history_ops(4, true).prop_map(Step::Ops),
        1 => (
            proptest::collection::vec(write, 1..5),
            prop_oneof![Just(0usize), Just(1), Just(3), Just(usize::MAX)],
            proptest::bool::weighted(0.3),
        )
            .prop_map(|(writes, applied, restart)| Step::FailingBatch { writes, applied, restart }),
    ];
    proptest::collection::vec(step, 0..16)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(32),
        ..ProptestConfig::default()
    })]
    /// Failed writes have no effect on what is read, and every group they
    /// touched (every group, for a flush of all) is in a new epoch after.
    #[test]
    fn sled_store_with_failing_batches_matches_the_model(steps in steps(), limits in small_limits()) {
        let dir = tempfile::tempdir().unwrap();
        let config = SledConfig { limits: limits.clone(), cache_bytes: 1 << 20, ..SledConfig::new(dir.path().join("history")) };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(failures::check(config, &steps));
    }
}

mod failures {
    use std::collections::BTreeMap;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Waker};
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use channelbox_core::testkit::model::{HistoryModel, HistoryOp};
    use channelbox_core::{Epoch, HistoryStore, NewMessage, PayloadKind, ReadQuery, StoreError};
    use channelbox_store_sled::{SledConfig, SledStore};

    use super::{Step, Write};

    type Waiting<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + 'a>>;

    // The property tests' group names: some in namespaces with limits of their own.
    use channelbox_core::testkit::model::group_name as name;

    /// The model, and how often each group's epoch must have changed besides
    /// the model's own resets.
    struct Expected {
        model: HistoryModel,
        bumps: BTreeMap<String, u64>,
        bumps_all: u64,
        epochs: BTreeMap<String, (u64, Epoch)>,
    }

    impl Expected {
        fn generation(&self, g: &str) -> u64 {
            self.model.generation(g) + self.bumps.get(g).copied().unwrap_or(0) + self.bumps_all
        }

        async fn check_head(&mut self, store: &SledStore, g: &str, step: usize) {
            let head = store.head(g).await.expect("head");
            assert_eq!(head.last, self.model.last(g), "step {step}: last offset of {g}");
            let generation = self.generation(g);
            match self.epochs.get(g) {
                Some((gen, epoch)) if *gen == generation => {
                    assert_eq!(
                        &head.epoch, epoch,
                        "step {step}: the epoch of {g} changed without a reset"
                    )
                }
                Some((_, epoch)) => assert_ne!(&head.epoch, epoch, "step {step}: {g} kept its epoch"),
                None => {}
            }
            self.epochs.insert(g.to_owned(), (generation, head.epoch));
        }
    }

    fn message(step: usize, size: u16, old: bool) -> NewMessage {
        let now = channelbox_core::now_ms();
        NewMessage {
            kind: PayloadKind::Binary,
            payload: Bytes::from(vec![step as u8; size as usize]),
            meta: Bytes::from(step.to_string()),
            timestamp_ms: if old { now - 7_200_000 } else { now },
        }
    }

    pub(super) async fn check(config: SledConfig, steps: &[Step]) {
        let mut store = Some(SledStore::open(config.clone()).unwrap());
        let mut expected = Expected {
            model: HistoryModel::new(config.limits.clone()),
            bumps: BTreeMap::new(),
            bumps_all: 0,
            epochs: BTreeMap::new(),
        };
        for (step, s) in steps.iter().enumerate() {
            match s {
                Step::Ops(ops) => {
                    for op in ops {
                        if let HistoryOp::Reopen = op {
                            drop(store.take());
                            store = Some(SledStore::open(config.clone()).unwrap());
                        } else {
                            run(store.as_ref().unwrap(), &mut expected.model, op, step).await;
                        }
                    }
                }
                Step::FailingBatch {
                    writes,
                    applied,
                    restart,
                } => {
                    let s = store.as_ref().unwrap();
                    let applied = self::applied(&expected.model, writes, *applied);
                    fail(s, &mut expected, writes, applied, *restart, step).await;
                    if *restart {
                        // Dropped while failing: the next opening rolls back,
                        // and every group is in a new epoch.
                        drop(store.take());
                        store = Some(SledStore::open(config.clone()).unwrap());
                        expected.bumps_all += 1;
                    }
                }
            }
            for g in (0..3).map(name) {
                expected.check_head(store.as_ref().unwrap(), &g, step).await;
            }
        }
    }

    /// One ordinary operation against the store and the model.
    async fn run(s: &SledStore, model: &mut HistoryModel, op: &HistoryOp, step: usize) {
        let now = channelbox_core::now_ms();
        match op {
            HistoryOp::Append { group, size, old } => {
                let g = name(*group);
                let m = message(step, *size, *old);
                let offset = s
                    .append(&g, m.clone())
                    .expect("append")
                    .wait()
                    .await
                    .expect("durable")
                    .offset;
                assert_eq!(offset, model.append(&g, m, now), "step {step}: offset of {op:?}");
            }
            HistoryOp::ReadLast { group, n } => read(s, model, *group, ReadQuery::Last(*n), step).await,
            HistoryOp::ReadSince { group, offset, limit } => {
                let q = ReadQuery::Since {
                    offset: *offset,
                    limit: *limit,
                };
                read(s, model, *group, q, step).await;
            }
            HistoryOp::FlushGroup(group) => {
                s.flush_group(&name(*group)).await.expect("flush");
                model.flush_group(&name(*group));
            }
            HistoryOp::FlushAll => {
                s.flush_all().await.expect("flush all");
                model.flush_all();
            }
            HistoryOp::Reopen => unreachable!("handled by the caller"),
        }
    }

    async fn read(s: &SledStore, model: &mut HistoryModel, group: u8, q: ReadQuery, step: usize) {
        let g = name(group);
        let got = s.read(&g, q).await.expect("read").messages;
        assert_eq!(
            got,
            model.read(&g, q, channelbox_core::now_ms()),
            "step {step}: {q:?} of {g}"
        );
    }

    /// How many operations of a failing batch may reach sled with an outcome
    /// the model predicts: any number when the batch only appends and its
    /// appends trim nothing that was there before (a failed write's trims
    /// that reach the disk stay, as trims may), else none.
    pub(super) fn applied(model: &HistoryModel, writes: &[Write], wanted: usize) -> usize {
        let now = channelbox_core::now_ms();
        let mut after = model.clone();
        let mut before = model.clone();
        for w in writes {
            let Write::Append { group, size } = w else {
                return 0;
            };
            after.append(&name(*group), message(0, *size, false), now);
        }
        let kept = (0..3).map(name).all(|g| {
            let old = before.read(&g, ReadQuery::Last(usize::MAX), now);
            let new = after.read(&g, ReadQuery::Last(usize::MAX), now);
            old.first()
                .is_none_or(|m| new.first().is_some_and(|n| n.offset <= m.offset))
        });
        if kept {
            wanted
        } else {
            0
        }
    }

    /// Queues `writes` into one batch that fails after `applied` of its
    /// operations; every one of them must fail, and the store recover by
    /// itself (unless it is to be `restarted` while failing).
    async fn fail(
        s: &SledStore,
        expected: &mut Expected,
        writes: &[Write],
        applied: usize,
        restart: bool,
        step: usize,
    ) {
        s.pause_writer();
        s.hold_recovery(restart);
        s.fail_next_batch(applied);
        let mut waiting: Vec<Waiting<'_>> = Vec::new();
        for w in writes {
            let mut f: Waiting<'_> = match w {
                Write::Append { group, size } => {
                    let pending = s
                        .append(&name(*group), message(step, *size, false))
                        .expect("append queues");
                    Box::pin(async move { pending.wait().await.map(drop) })
                }
                Write::FlushGroup(group) => {
                    let g = name(*group);
                    Box::pin(async move { s.flush_group(&g).await.map(drop) })
                }
                Write::FlushAll => Box::pin(s.flush_all()),
            };
            // Polled once, it queues its write behind the held writer.
            let _ = f.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            waiting.push(f);
        }
        s.resume_writer();
        for (w, f) in writes.iter().zip(waiting) {
            assert!(f.await.is_err(), "step {step}: {w:?} in a failing batch fails");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !restart && !s.healthy() {
            assert!(Instant::now() < deadline, "step {step}: the store recovers");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for w in writes {
            match w {
                Write::Append { group, .. } | Write::FlushGroup(group) => {
                    *expected.bumps.entry(name(*group)).or_default() += 1;
                }
                Write::FlushAll => expected.bumps_all += 1,
            }
        }
    }
}
