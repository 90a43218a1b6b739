//! What readers see: only what is durable. A head, and the messages a read
//! returns, are taken once every write that changed the group before the read
//! is on disk; while writes fail, they are the group as the disk holds it,
//! from the undo log (`undo.rs`). So nothing a reader sees — an offset named
//! in a `welcome`, a message in `history` — can be rolled back after disk
//! trouble: an append answered `unavailable` is never read.

use channelbox_core::{Epoch, Head, StoredMessage};

use crate::error::SledError;
use crate::group::State;
use crate::layout::{decode_message, message_key, u64_at};
use crate::store::Inner;
use crate::undo::View;

impl Inner {
    /// The head of `group` as readers may see it, and the flush count it was
    /// taken under (a read compares it to notice a flush meanwhile).
    pub(crate) async fn visible_head(&self, group: &str) -> Result<(Head, u64), SledError> {
        loop {
            let (head, flushes, seq) = {
                let mut state = self.state()?;
                self.trim_now(&mut state, group);
                if self.writer.failure().is_some() {
                    let head = self.durable_view(&mut state, group)?;
                    return Ok((head, state.flushes));
                }
                (Inner::head_of(&state, group), state.flushes, state.wait_seq(group))
            };
            match self.writer.durable_wait(seq, &self.path).await {
                Ok(()) => return Ok((head, flushes)),
                Err(err @ SledError::Closed(_)) => return Err(err),
                // A write failed before the head was durable: look again, at
                // the disk's state while failing, or at the store recovered.
                Err(_) => continue,
            }
        }
    }

    /// The group as the disk holds it while writes fail (`undo.rs`). Only a
    /// group whose generation a failed write changed cannot be read from sled,
    /// which may hold the new generation's messages under the old one's
    /// offsets: it answers an error until the store has recovered. Epochs use
    /// the counters as the disk holds them.
    pub(crate) fn durable_view(&self, state: &mut State, group: &str) -> Result<Head, SledError> {
        state.undo.forget_durable(self.writer.durable_mark());
        let (flushes, evictions) = state
            .undo
            .durable_counters()
            .unwrap_or((state.flushes, state.budget.evictions()));
        let epoch = |generation| Epoch::from_parts(&state.instance, flushes, generation);
        let absent = Head {
            epoch: epoch(evictions << 32),
            first: 1,
            last: 0,
        };
        let current = state.groups.get(group);
        match state.undo.durable_view(group, current.map(|g| g.generation)) {
            View::Memory => Ok(current.map_or(absent, |g| Head {
                epoch: epoch(g.generation),
                first: g.first(),
                last: g.last,
            })),
            View::Absent => Ok(absent),
            View::Was(before) => Ok(Head {
                epoch: epoch(before.generation),
                first: current.map_or(1, |g| g.first()).min(before.last + 1),
                last: before.last,
            }),
            View::Unsettled => Err(SledError::Flush(
                self.path.clone(),
                format!("group {group:?} changed in a write that failed; it can be read once the store recovers"),
            )),
        }
    }

    /// The epoch a reader of `group` would see now, without waiting (`None`
    /// if it could not read the group): a read compares it with the head it
    /// read under, to notice a flush meanwhile.
    pub(crate) fn epoch_now(&self, state: &mut State, group: &str) -> Option<Epoch> {
        if self.writer.failure().is_some() {
            self.durable_view(state, group).ok().map(|h| h.epoch)
        } else {
            Some(Inner::head_of(state, group).epoch)
        }
    }

    /// The messages `from..=to` of `group` as sled holds them, at most
    /// `limit`. `to` comes from a visible head, so everything up to it is
    /// durable.
    pub(crate) fn read_range(
        &self,
        group: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, SledError> {
        if limit == 0 || from > to {
            return Ok(Vec::new());
        }
        // A failing store reopening sled holds this lock for as long as
        // sled's recovery takes: a reader answers at once instead of blocking
        // its async worker, and is told to come back.
        let db = match self.db.try_read() {
            Ok(db) => db,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(SledError::Flush(self.path.clone(), "the store is reopening".into()))
            }
        };
        match db.as_ref() {
            Some(db) => self.scan(db, group, from, to, limit),
            None => Err(SledError::Closed(self.path.clone())),
        }
    }

    fn scan(
        &self,
        db: &sled::Db,
        group: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, SledError> {
        let mut messages = Vec::new();
        let range = message_key(group, from)..=message_key(group, to);
        for item in db.range(range).take(limit) {
            let (k, v) = item.map_err(|e| SledError::sled(&self.path, e))?;
            let corrupt = || SledError::Corrupt {
                path: self.path.clone(),
                group: group.to_owned(),
                what: "message",
            };
            let offset = u64_at(&k, k.len() - 8).ok_or_else(corrupt)?;
            let (kind, timestamp_ms, meta, payload) = decode_message(&v).ok_or_else(corrupt)?;
            messages.push(StoredMessage {
                offset,
                kind,
                payload,
                meta,
                timestamp_ms,
            });
        }
        Ok(messages)
    }
}
