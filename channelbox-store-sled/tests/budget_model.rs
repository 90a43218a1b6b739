//! Property test with a total budget: random appends over seven groups under
//! a budget small enough that the least recently written groups are trimmed
//! and evicted all the time, reads, reopens, and batches of appends that
//! fail, against a model built on the same ledger (`TotalBudget`). Failed
//! appends must have no effect — not even the evictions they caused — and
//! every group they touched or evicted is in a new epoch after.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use channelbox_core::{BudgetedGroups, HistoryLimits, HistoryStore, NewMessage, PayloadKind, ReadQuery, TotalBudget};
use channelbox_store_sled::{SledConfig, SledStore, MESSAGE_OVERHEAD};
use proptest::prelude::*;

const GROUPS: u8 = 7;

#[derive(Clone, Debug)]
enum Step {
    Append {
        group: u8,
        size: u16,
    },
    Read(u8),
    Reopen,
    /// Appends that fail; with `true`, the store is then dropped while
    /// failing and opened again.
    FailingBatch(Vec<(u8, u16)>, bool),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let append = (0..GROUPS, 0u16..300);
    let step = prop_oneof![
        8 => append.clone().prop_map(|(group, size)| Step::Append { group, size }),
        2 => (0..GROUPS).prop_map(Step::Read),
        1 => Just(Step::Reopen),
        1 => (proptest::collection::vec(append, 1..4), proptest::bool::weighted(0.3))
            .prop_map(|(writes, restart)| Step::FailingBatch(writes, restart)),
    ];
    proptest::collection::vec(step, 0..40)
}

fn name(g: u8) -> String {
    format!("group-{g}")
}

/// The store's groups as the model keeps them: offset and payload of every
/// retained message, and the newest offset.
#[derive(Clone, Debug, Default)]
struct Group {
    last: u64,
    messages: VecDeque<(u64, Vec<u8>)>,
}

#[derive(Clone, Debug)]
struct Model {
    budget: TotalBudget,
    groups: BTreeMap<String, Group>,
    /// How often each group's epoch must have changed.
    epochs: BTreeMap<String, u64>,
}

struct Ledger<'a> {
    groups: &'a mut BTreeMap<String, Group>,
    evicted: Vec<String>,
}

fn cost(group: &str, payload: usize) -> u64 {
    payload as u64 + MESSAGE_OVERHEAD + group.len() as u64
}

impl BudgetedGroups for Ledger<'_> {
    fn retained(&self, group: &str) -> Option<usize> {
        self.groups.get(group).map(|g| g.messages.len())
    }

    fn remove_oldest(&mut self, group: &str) -> u64 {
        let removed = self.groups.get_mut(group).and_then(|g| g.messages.pop_front());
        removed.map_or(0, |(_, payload)| cost(group, payload.len()))
    }

    fn evict(&mut self, group: &str, _evictions: u64) {
        self.groups.remove(group);
        self.evicted.push(group.to_owned());
    }
}

impl Model {
    /// Appends; returns the offset and the groups it evicted.
    fn append(&mut self, group: &str, payload: Vec<u8>) -> (u64, Vec<String>) {
        let g = self.groups.entry(group.to_owned()).or_default();
        g.last += 1;
        let offset = g.last;
        let size = payload.len();
        g.messages.push_back((offset, payload));
        self.budget.charge(group, cost(group, size));
        let mut ledger = Ledger {
            groups: &mut self.groups,
            evicted: Vec::new(),
        };
        self.budget.enforce(group, &mut ledger);
        for evicted in &ledger.evicted {
            *self.epochs.entry(evicted.clone()).or_default() += 1;
        }
        (offset, ledger.evicted)
    }
}

struct Run {
    config: SledConfig,
    store: Option<SledStore>,
    model: Model,
    seen: BTreeMap<String, (u64, channelbox_core::Epoch)>,
    /// Timestamps rise with every message, so that a reopened store orders
    /// its groups by last write exactly as the model's ledger does.
    clock: u64,
}

impl Run {
    fn store(&self) -> &SledStore {
        self.store.as_ref().expect("open")
    }

    fn message(&mut self, step: usize, size: u16) -> NewMessage {
        self.clock += 1;
        NewMessage {
            kind: PayloadKind::Binary,
            payload: Bytes::from(vec![step as u8; size as usize]),
            meta: Bytes::new(),
            timestamp_ms: self.clock,
        }
    }

    async fn step(&mut self, step: usize, s: &Step) {
        match s {
            Step::Append { group, size } => {
                let m = self.message(step, *size);
                let payload = m.payload.to_vec();
                let at = self.store().append(&name(*group), m).expect("append");
                let offset = at.wait().await.expect("durable").offset;
                let (expected, _) = self.model.append(&name(*group), payload);
                assert_eq!(offset, expected, "step {step}: offset of {s:?}");
            }
            Step::Read(group) => {
                let g = name(*group);
                let page = self.store().read(&g, ReadQuery::Last(1000)).await.expect("read");
                let got: Vec<(u64, Vec<u8>)> = page.messages.iter().map(|m| (m.offset, m.payload.to_vec())).collect();
                let want: Vec<(u64, Vec<u8>)> = self
                    .model
                    .groups
                    .get(&g)
                    .map_or(Vec::new(), |g| g.messages.iter().cloned().collect());
                assert_eq!(got, want, "step {step}: history of {g}");
            }
            Step::Reopen => {
                drop(self.store.take());
                self.store = Some(SledStore::open(self.config.clone()).expect("reopen"));
            }
            Step::FailingBatch(writes, restart) => self.fail(step, writes, *restart).await,
        }
        for g in (0..GROUPS).map(name) {
            self.check_head(&g, step).await;
        }
    }

    /// A batch of appends that fails before reaching sled: each fails, the
    /// store recovers by itself, and the model is as before, with a new
    /// epoch for every group an append touched or would have evicted. With
    /// `restart`, the store is dropped while failing: then every group is in
    /// a new epoch.
    async fn fail(&mut self, step: usize, writes: &[(u8, u16)], restart: bool) {
        let mut after = self.model.clone();
        let mut touched = Vec::new();
        let messages: Vec<_> = writes
            .iter()
            .map(|(g, size)| (name(*g), self.message(step, *size)))
            .collect();
        for (g, m) in &messages {
            touched.push(g.clone());
            touched.extend(after.append(g, m.payload.to_vec()).1);
        }
        let s = self.store();
        s.pause_writer();
        s.hold_recovery(restart);
        s.fail_next_batch(0);
        let mut waiting = Vec::new();
        for (g, m) in messages {
            let mut f = Box::pin(s.append(&g, m).expect("append queues").wait());
            let _ = f.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            waiting.push(f);
        }
        s.resume_writer();
        for f in waiting {
            assert!(f.await.is_err(), "step {step}: an append of the failing batch fails");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !restart && !s.healthy() {
            assert!(Instant::now() < deadline, "step {step}: the store recovers");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if restart {
            drop(self.store.take());
            self.store = Some(SledStore::open(self.config.clone()).expect("reopen"));
            touched = self.model.groups.keys().cloned().collect();
        }
        for g in touched {
            *self.model.epochs.entry(g).or_default() += 1;
        }
    }

    /// The head's newest offset, and its epoch: the same as last seen unless
    /// the model says it changed. Groups without an entry are not compared:
    /// their epoch follows the store's eviction count.
    async fn check_head(&mut self, g: &str, step: usize) {
        let head = self.store().head(g).await.expect("head");
        let Some(group) = self.model.groups.get(g) else {
            assert_eq!(head.last, 0, "step {step}: {g} has no entry");
            return;
        };
        assert_eq!(head.last, group.last, "step {step}: newest offset of {g}");
        let epochs = self.model.epochs.get(g).copied().unwrap_or(0);
        match self.seen.get(g) {
            Some((n, epoch)) if *n == epochs => assert_eq!(&head.epoch, epoch, "step {step}: {g} changed epoch"),
            Some((_, epoch)) => assert_ne!(&head.epoch, epoch, "step {step}: {g} kept its epoch"),
            None => {}
        }
        self.seen.insert(g.to_owned(), (epochs, head.epoch));
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(32),
        ..ProptestConfig::default()
    })]
    #[test]
    fn sled_store_under_a_total_budget_matches_the_model(steps in steps(), budget in 1500u64..4000) {
        let dir = tempfile::tempdir().unwrap();
        let limits = HistoryLimits {
            max_bytes: u64::MAX,
            max_messages: None,
            max_age: None,
            max_total_bytes: Some(budget),
            ..HistoryLimits::default()
        };
        let config = SledConfig { limits, cache_bytes: 1 << 20, ..SledConfig::new(dir.path().join("history")) };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut run = Run {
                store: Some(SledStore::open(config.clone()).unwrap()),
                config,
                model: Model { budget: TotalBudget::new(Some(budget)), groups: BTreeMap::new(), epochs: BTreeMap::new() },
                seen: BTreeMap::new(),
                clock: 1_000_000,
            };
            for (i, s) in steps.iter().enumerate() {
                run.step(i, s).await;
            }
        });
    }
}
