//! A plain reference model of the history contract: a `VecDeque` per group.
//! Property tests run the same operations against a store and this model and
//! compare every read.

use std::collections::{BTreeMap, VecDeque};

use crate::history::{NewMessage, ReadQuery, StoredMessage};
use crate::limits::{messages_to_trim, GroupLimits, HistoryLimits};
use crate::position::Epoch;

#[derive(Debug, Default, Clone)]
struct ModelGroup {
    /// Bumped whenever the store must give the group a new epoch.
    generation: u64,
    last: u64,
    messages: VecDeque<StoredMessage>,
}

/// The history contract, written as plainly as possible.
#[derive(Debug, Clone)]
pub struct HistoryModel {
    limits: HistoryLimits,
    groups: BTreeMap<String, ModelGroup>,
    /// Bumped by `flush_all`: every group, seen or not, gets a new epoch.
    flushes: u64,
}

impl HistoryModel {
    /// An empty model applying these limits.
    pub fn new(limits: HistoryLimits) -> Self {
        HistoryModel {
            limits,
            groups: BTreeMap::new(),
            flushes: 0,
        }
    }

    fn group(&mut self, group: &str) -> &mut ModelGroup {
        self.groups.entry(group.to_owned()).or_default()
    }

    fn trim(&mut self, group: &str, now_ms: u64) {
        let limits = self.limits.limits_for(group);
        let g = self.group(group);
        let bytes: u64 = g.messages.iter().map(|m| m.payload.len() as u64).sum();
        let msgs = &g.messages;
        let n = messages_to_trim(&limits, now_ms, msgs.len() as u64, bytes, |i| {
            let m = &msgs[i as usize];
            (m.payload.len() as u64, m.timestamp_ms)
        });
        g.messages.drain(..n as usize);
    }

    /// Appends; returns the offset.
    pub fn append(&mut self, group: &str, message: NewMessage, now_ms: u64) -> u64 {
        let g = self.group(group);
        g.last += 1;
        let offset = g.last;
        g.messages.push_back(StoredMessage::from_new(offset, message));
        self.trim(group, now_ms);
        offset
    }

    /// Reads like a store.
    pub fn read(&mut self, group: &str, query: ReadQuery, now_ms: u64) -> Vec<StoredMessage> {
        self.trim(group, now_ms);
        let g = self.group(group);
        match query {
            ReadQuery::Last(n) => {
                let skip = g.messages.len().saturating_sub(n);
                g.messages.iter().skip(skip).cloned().collect()
            }
            ReadQuery::Since { offset, limit } => g
                .messages
                .iter()
                .filter(|m| m.offset > offset)
                .take(limit)
                .cloned()
                .collect(),
        }
    }

    /// The newest offset assigned in the current epoch.
    pub fn last(&self, group: &str) -> u64 {
        self.groups.get(group).map_or(0, |g| g.last)
    }

    /// How many times the group's epoch changed.
    pub fn generation(&self, group: &str) -> u64 {
        self.flushes + self.groups.get(group).map_or(0, |g| g.generation)
    }

    /// Flushes one group: new epoch, offsets restart.
    pub fn flush_group(&mut self, group: &str) {
        let g = self.group(group);
        g.generation += 1;
        g.last = 0;
        g.messages.clear();
    }

    /// Flushes every group.
    pub fn flush_all(&mut self) {
        self.flushes += 1;
        for g in self.groups.values_mut() {
            g.last = 0;
            g.messages.clear();
        }
    }
}

/// One operation of a history property test.
#[derive(Clone, Debug)]
pub enum HistoryOp {
    /// Append a message of `size` payload bytes; `old` stamps it two hours ago.
    Append {
        /// Which of a few groups.
        group: u8,
        /// Payload bytes.
        size: u16,
        /// Older than any age limit the tests use.
        old: bool,
    },
    /// Read the newest `n`.
    ReadLast {
        /// Which group.
        group: u8,
        /// How many.
        n: usize,
    },
    /// Read after an offset.
    ReadSince {
        /// Which group.
        group: u8,
        /// After this offset.
        offset: u64,
        /// How many.
        limit: usize,
    },
    /// Flush one group.
    FlushGroup(u8),
    /// Flush every group.
    FlushAll,
    /// Drop the store and open it again (persistent stores only).
    Reopen,
}

/// A strategy for operation sequences; `reopen` includes [`HistoryOp::Reopen`].
pub fn history_ops(max_len: usize, reopen: bool) -> impl proptest::strategy::Strategy<Value = Vec<HistoryOp>> {
    use proptest::prelude::*;
    let op = prop_oneof![
        10 => (0u8..3, 0u16..40, proptest::bool::weighted(0.1))
            .prop_map(|(group, size, old)| HistoryOp::Append { group, size, old }),
        3 => (0u8..3, 0usize..12).prop_map(|(group, n)| HistoryOp::ReadLast { group, n }),
        3 => (0u8..3, 0u64..40, 0usize..12)
            .prop_map(|(group, offset, limit)| HistoryOp::ReadSince { group, offset, limit }),
        1 => (0u8..3).prop_map(HistoryOp::FlushGroup),
        1 => Just(HistoryOp::FlushAll),
        if reopen { 2 } else { 0 } => Just(HistoryOp::Reopen),
    ];
    proptest::collection::vec(op, 0..max_len)
}

/// The name of group `g` of a property test: group 0 is in no namespace,
/// group 1 in namespace `ns1` and group 2 in `ns2`, which [`small_limits`]
/// may give limits of their own.
pub fn group_name(g: u8) -> String {
    match g {
        0 => "group-0".to_owned(),
        g => format!("ns{g}:group-{g}"),
    }
}

/// A strategy for small per-group limits: a byte budget of 20 to 200,
/// sometimes a message count, sometimes a one-hour age limit (which removes
/// exactly the messages [`HistoryOp::Append`] stamps as old).
fn small_group_limits() -> impl proptest::strategy::Strategy<Value = GroupLimits> {
    use proptest::prelude::*;
    (20u64..200, proptest::option::of(1u64..8), any::<bool>()).prop_map(|(max_bytes, max_messages, aged)| GroupLimits {
        max_bytes,
        max_messages,
        max_age: aged.then(|| std::time::Duration::from_secs(3600)),
    })
}

/// A strategy for small limits that make trims happen often (see
/// `small_group_limits`), and for each of the namespaces `ns1` and `ns2` of
/// [`group_name`] sometimes small limits of its own, so that groups in
/// different namespaces trim differently.
pub fn small_limits() -> impl proptest::strategy::Strategy<Value = HistoryLimits> {
    use proptest::option::of;
    use proptest::strategy::Strategy;
    (small_group_limits(), of(small_group_limits()), of(small_group_limits())).prop_map(|(top, ns1, ns2)| {
        let mut limits = HistoryLimits {
            max_bytes: top.max_bytes,
            max_messages: top.max_messages,
            max_age: top.max_age,
            max_total_bytes: None,
            namespaces: BTreeMap::new(),
        };
        for (name, own) in [("ns1", ns1), ("ns2", ns2)] {
            if let Some(own) = own {
                limits = limits.with_namespace(name, own);
            }
        }
        limits
    })
}

/// Runs `ops` against a store opened by `open` and against the model, and
/// panics at the first difference: offsets, reads, heads and epoch changes.
/// `open` is called again for every [`HistoryOp::Reopen`], after the previous
/// store was dropped.
pub async fn check_against_model<F>(limits: HistoryLimits, ops: &[HistoryOp], mut open: F)
where
    F: FnMut() -> std::sync::Arc<dyn crate::HistoryStore>,
{
    use crate::payload::PayloadKind;
    use bytes::Bytes;

    let mut model = HistoryModel::new(limits);
    let mut store = Some(open());
    let mut epochs: BTreeMap<String, (u64, Epoch)> = BTreeMap::new();
    let name = group_name;
    for (step, op) in ops.iter().enumerate() {
        let now = crate::now_ms();
        let s = store.as_ref().expect("store is open").clone();
        let touched = match op {
            HistoryOp::Append { group, size, old } => {
                let g = name(*group);
                let message = NewMessage {
                    kind: PayloadKind::Binary,
                    payload: Bytes::from(vec![step as u8; *size as usize]),
                    meta: Bytes::from(step.to_string()),
                    timestamp_ms: if *old { now - 7_200_000 } else { now },
                };
                let pending = s.append(&g, message.clone()).expect("append");
                let offset = pending.wait().await.expect("durable").offset;
                assert_eq!(offset, model.append(&g, message, now), "step {step}: offset of {op:?}");
                vec![g]
            }
            HistoryOp::ReadLast { group, n } => {
                let g = name(*group);
                let got = s.read(&g, ReadQuery::Last(*n)).await.expect("read").messages;
                assert_eq!(got, model.read(&g, ReadQuery::Last(*n), now), "step {step}: {op:?}");
                vec![g]
            }
            HistoryOp::ReadSince { group, offset, limit } => {
                let g = name(*group);
                let q = ReadQuery::Since {
                    offset: *offset,
                    limit: *limit,
                };
                let got = s.read(&g, q).await.expect("read").messages;
                assert_eq!(got, model.read(&g, q, now), "step {step}: {op:?}");
                vec![g]
            }
            HistoryOp::FlushGroup(group) => {
                let g = name(*group);
                s.flush_group(&g).await.expect("flush");
                model.flush_group(&g);
                vec![g]
            }
            HistoryOp::FlushAll => {
                s.flush_all().await.expect("flush all");
                model.flush_all();
                (0..3).map(name).collect()
            }
            HistoryOp::Reopen => {
                // The old store must be gone before the same storage is opened again.
                drop(s);
                drop(store.take());
                store = Some(open());
                (0..3).map(name).collect()
            }
        };
        let s = store.as_ref().expect("store is open");
        for g in touched {
            check_head(&**s, &model, &mut epochs, &g, step).await;
        }
    }
}

/// Compares a group's head with the model: its newest offset, and that its
/// epoch changed exactly when the model reset the group.
async fn check_head(
    store: &dyn crate::HistoryStore,
    model: &HistoryModel,
    epochs: &mut BTreeMap<String, (u64, Epoch)>,
    g: &str,
    step: usize,
) {
    let head = store.head(g).await.expect("head");
    assert_eq!(head.last, model.last(g), "step {step}: last offset of {g}");
    let generation = model.generation(g);
    match epochs.get(g) {
        Some((gen, epoch)) if *gen == generation => {
            assert_eq!(
                &head.epoch, epoch,
                "step {step}: the epoch of {g} changed without a reset"
            )
        }
        Some((_, epoch)) => assert_ne!(&head.epoch, epoch, "step {step}: {g} was reset but kept its epoch"),
        None => {}
    }
    epochs.insert(g.to_owned(), (generation, head.epoch));
}
