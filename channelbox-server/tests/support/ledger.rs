//! A ledger of what every client of a test saw, for checking whole histories:
//! each (group, epoch, offset) pair must name one message, whatever a client
//! received live, was told in `published`, or read from history. Fault tests
//! (Redis rolled back, servers killed) record everything here and check once
//! at the end; the ledger names the two sources that disagree.

use std::collections::BTreeMap;

use serde_json::Value;

/// Where one pair was seen first, and what it named there.
#[derive(Debug)]
struct Seen {
    data: Value,
    source: String,
}

/// Every (group, epoch, offset) pair seen, with its message's `data`.
#[derive(Debug, Default)]
pub struct Ledger {
    pairs: BTreeMap<(String, String, u64), Seen>,
    conflicts: Vec<String>,
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Records that `(group, epoch, offset)` named `data`, seen by `source`.
    pub fn record(&mut self, group: &str, epoch: &str, offset: u64, data: &Value, source: &str) {
        let key = (group.to_owned(), epoch.to_owned(), offset);
        match self.pairs.get(&key) {
            Some(seen) if seen.data != *data => self.conflicts.push(format!(
                "({group}, {epoch}, {offset}) names {} ({}) and {data} ({source})",
                seen.data, seen.source
            )),
            Some(_) => {}
            None => {
                self.pairs.insert(
                    key,
                    Seen {
                        data: data.clone(),
                        source: source.to_owned(),
                    },
                );
            }
        }
    }

    /// Records a `message` frame (a saved one: with an offset); ignores
    /// anything else. Returns whether it was recorded.
    pub fn record_frame(&mut self, frame: &Value, source: &str) -> bool {
        let (Some(group), Some(epoch), Some(offset)) = (
            frame["group"].as_str(),
            frame["epoch"].as_str(),
            frame["offset"].as_u64(),
        ) else {
            return false;
        };
        if frame["type"] != "message" {
            return false;
        }
        self.record(group, epoch, offset, &frame["data"], source);
        true
    }

    /// Records a `published` answer for a publish whose data was `data`.
    pub fn record_published(&mut self, published: &Value, data: &Value, source: &str) {
        if let (Some(group), Some(epoch), Some(offset)) = (
            published["group"].as_str(),
            published["epoch"].as_str(),
            published["offset"].as_u64(),
        ) {
            self.record(group, epoch, offset, data, source);
        }
    }

    /// Records a history answer (`{"group", "epoch", "messages": [...]}`, the
    /// WebSocket reply or the HTTP body).
    pub fn record_history(&mut self, history: &Value, source: &str) {
        let group = history["group"].as_str().unwrap_or_default();
        let epoch = history["epoch"].as_str().unwrap_or_default();
        for m in history["messages"].as_array().into_iter().flatten() {
            if let Some(offset) = m["offset"].as_u64() {
                self.record(group, epoch, offset, &m["data"], source);
            }
        }
    }

    /// How many distinct pairs were recorded.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// The newest offset recorded in `epoch` of `group`.
    pub fn last(&self, group: &str, epoch: &str) -> Option<u64> {
        self.pairs
            .keys()
            .filter(|(g, e, _)| g == group && e == epoch)
            .map(|(_, _, o)| *o)
            .max()
    }

    /// The epochs seen for `group`, in no particular order.
    pub fn epochs(&self, group: &str) -> Vec<String> {
        let mut epochs: Vec<String> = self
            .pairs
            .keys()
            .filter(|(g, _, _)| g == group)
            .map(|(_, e, _)| e.clone())
            .collect();
        epochs.dedup();
        epochs
    }

    /// Panics, listing them, if any pair named two messages.
    pub fn assert_unique(&self) {
        assert!(
            self.conflicts.is_empty(),
            "(epoch, offset) pairs naming two messages:\n{}",
            self.conflicts.join("\n")
        );
    }
}
