//! Replay pages shared between subscribers: clients recovering the same range
//! of a group at once — the reconnect storm after a restart — share one read
//! of history and one rendering of each message per payload type, instead of
//! one of each per client.
//!
//! Only pages that hold every offset of their range are kept. A message at an
//! offset of an epoch never changes, so such a page stays true for that
//! epoch even after trimming or new messages; a page is served for any read of
//! the same group, epoch and start that wants no more than it holds. The cache
//! is bounded by pages and by payload bytes, oldest out first.
//!
//! A page stays true only while its epoch is not rolled back: when a group's
//! history went back under its epoch and the group moved to a new one, the
//! pages of the group are purged (`purge`), so that a recovery from the old
//! epoch reads the store and is told `complete:false`.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use crate::envelope::{Envelope, MessageRef};
use crate::history::StoredMessage;
use crate::payload::{Frame, PayloadType};
use crate::position::Epoch;

/// Most pages kept.
const MAX_PAGES: usize = 64;
/// Most payload bytes kept over all pages.
const MAX_BYTES: usize = 8 << 20;

/// A page of history read for a replay, with its frames rendered on first use.
#[derive(Debug)]
pub(super) struct ReplayPage {
    /// Consecutive offsets, oldest first.
    pub(super) messages: Vec<StoredMessage>,
    frames: [OnceLock<Vec<Frame>>; 3],
    bytes: usize,
}

impl ReplayPage {
    pub(super) fn new(messages: Vec<StoredMessage>) -> Self {
        let bytes = messages.iter().map(|m| m.payload.len() + m.meta.len()).sum();
        ReplayPage {
            messages,
            frames: Default::default(),
            bytes,
        }
    }

    /// The page's frames for channels of payload type `to`, rendered once.
    pub(super) fn frames(&self, envelope: &dyn Envelope, group: &str, epoch: &Epoch, to: PayloadType) -> &[Frame] {
        self.frames[to.index()].get_or_init(|| {
            self.messages
                .iter()
                .map(|m| envelope.render(&MessageRef::stored(group, epoch.as_str(), m), to))
                .collect()
        })
    }
}

#[derive(Debug)]
struct Entry {
    group: Arc<str>,
    epoch: Epoch,
    after: u64,
    page: Arc<ReplayPage>,
}

/// The shared pages, oldest first.
#[derive(Debug, Default)]
pub(super) struct ReplayCache {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl ReplayCache {
    /// A page of `group` in `epoch` starting after `after` with at least
    /// `wanted` messages.
    pub(super) fn get(&self, group: &str, epoch: &Epoch, after: u64, wanted: usize) -> Option<Arc<ReplayPage>> {
        self.entries
            .iter()
            .find(|e| e.after == after && e.page.messages.len() >= wanted && *e.group == *group && e.epoch == *epoch)
            .map(|e| e.page.clone())
    }

    /// Drops the group's pages of every epoch but `keep` (all of them for
    /// `None`): after the group's epoch changed, no page of the old one may
    /// be replayed.
    pub(super) fn purge(&mut self, group: &str, keep: Option<&Epoch>) {
        let mut freed = 0;
        self.entries.retain(|e| {
            let stays = *e.group != *group || keep == Some(&e.epoch);
            if !stays {
                freed += e.page.bytes;
            }
            stays
        });
        self.bytes -= freed;
    }

    /// Drops every page (every group's history was flushed).
    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Keeps a complete page (every offset after `after`, consecutively).
    pub(super) fn put(&mut self, group: &str, epoch: &Epoch, after: u64, page: Arc<ReplayPage>) {
        if page.bytes > MAX_BYTES / 4 {
            return;
        }
        self.bytes += page.bytes;
        self.entries.push_back(Entry {
            group: Arc::from(group),
            epoch: epoch.clone(),
            after,
            page,
        });
        while self.entries.len() > MAX_PAGES || self.bytes > MAX_BYTES {
            let Some(old) = self.entries.pop_front() else { break };
            self.bytes -= old.page.bytes;
        }
    }
}
