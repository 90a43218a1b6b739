//! Floors: per group, the newest (epoch, offset) this server knows Redis
//! handed out — from append answers, reads, heads and the messages the broker
//! received. Every group script is given the group's floor, so that a head
//! that came back below it (Redis restarted from an older snapshot, a
//! promoted replica that lacked the newest writes) moves the group to a new
//! epoch instead of handing those offsets out again (see `scripts`).
//!
//! The map is bounded: past [`MAX_FLOORS`] groups an arbitrary entry makes
//! room. A forgotten floor only means this server can no longer notice a
//! rollback of that group by itself; the box still passes what it delivered
//! (`HistoryStore::check_heads`) for every group with local members.

use std::collections::HashMap;
use std::sync::Mutex;

use channelbox_core::{Epoch, StreamPosition};

/// Most groups whose floor is kept.
pub(crate) const MAX_FLOORS: usize = 100_000;

/// The floors of the groups this server has seen.
#[derive(Debug, Default)]
pub(crate) struct Floors {
    map: Mutex<HashMap<String, (Epoch, u64)>>,
}

impl Floors {
    /// Records that `at` exists: raises the floor within its epoch, replaces
    /// it with a newer epoch's.
    pub(crate) fn note(&self, group: &str, at: &StreamPosition) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((epoch, offset)) = map.get_mut(group) {
            if *epoch == at.epoch {
                *offset = (*offset).max(at.offset);
            } else {
                *epoch = at.epoch.clone();
                *offset = at.offset;
            }
            return;
        }
        if map.len() >= MAX_FLOORS {
            if let Some(victim) = map.keys().next().cloned() {
                map.remove(&victim);
            }
        }
        map.insert(group.to_owned(), (at.epoch.clone(), at.offset));
    }

    /// The group's floor, raised to `seen` when that is of the same epoch
    /// (or taken from `seen` when this server knows none).
    pub(crate) fn get(&self, group: &str, seen: Option<&StreamPosition>) -> Option<StreamPosition> {
        let known = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(group)
            .map(|(e, o)| StreamPosition::new(e.clone(), *o));
        match (known, seen) {
            (Some(k), Some(s)) if k.epoch == s.epoch => Some(StreamPosition::new(k.epoch, k.offset.max(s.offset))),
            (_, Some(s)) => Some(s.clone()),
            (k, None) => k,
        }
    }

    /// Every group with a floor (for the check after a reconnect).
    pub(crate) fn all(&self) -> Vec<(String, StreamPosition)> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(g, (e, o))| (g.clone(), StreamPosition::new(e.clone(), *o)))
            .collect()
    }

    /// How many groups have a floor.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(e: &str, o: u64) -> StreamPosition {
        StreamPosition::new(Epoch::new(e), o)
    }

    #[test]
    fn a_floor_only_rises_within_an_epoch_and_follows_a_new_one() {
        let f = Floors::default();
        f.note("g", &at("a", 5));
        f.note("g", &at("a", 3));
        assert_eq!(f.get("g", None), Some(at("a", 5)));
        assert_eq!(f.get("g", Some(&at("a", 9))), Some(at("a", 9)));
        assert_eq!(f.get("g", Some(&at("b", 2))), Some(at("b", 2)));
        f.note("g", &at("b", 1));
        assert_eq!(f.get("g", None), Some(at("b", 1)));
        assert_eq!(f.get("other", None), None);
    }

    #[test]
    fn the_map_is_bounded() {
        let f = Floors::default();
        for i in 0..MAX_FLOORS + 10 {
            f.note(&i.to_string(), &at("e", 1));
        }
        assert_eq!(f.len(), MAX_FLOORS);
    }
}
