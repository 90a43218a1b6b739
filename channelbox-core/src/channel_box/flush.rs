//! Reading and flushing history through the box. A flush gives the group a new
//! epoch; its sequencer is restarted in that epoch, so that messages of the old
//! epoch still on their way never hold up the new one.

use std::sync::Arc;

use super::sequencer::Sequencer;
use super::{lock, ChannelBox};
use crate::error::BoxError;
use crate::history::{Head, HistoryPage, ReadQuery};
use crate::position::Epoch;

impl ChannelBox {
    /// Reads a group's history.
    pub async fn show_history(&self, group: &str, query: ReadQuery) -> Result<HistoryPage, BoxError> {
        Ok(self.inner.store.read(group, query).await?)
    }

    /// The head of a group's history.
    pub async fn head(&self, group: &str) -> Result<Head, BoxError> {
        Ok(self.inner.store.head(group).await?)
    }

    /// Flushes history: one group's, or every group's when `group` is `None`.
    /// Each flushed group gets a new epoch and its offsets restart at 1.
    pub async fn flush_history(&self, group: Option<&str>) -> Result<(), BoxError> {
        // In a cluster the broker's reset events restart the sequencers, on
        // every server alike; a local `None` would stop the group here.
        let local = self.broker().is_none();
        match group {
            Some(name) => {
                let epoch = self.inner.store.flush_group(name).await?;
                self.reset_order(name, Some(epoch));
            }
            None if !local => self.inner.store.flush_all().await?,
            None => {
                self.inner.store.flush_all().await?;
                let names: Vec<Arc<str>> = lock(&self.inner.state).groups.keys().cloned().collect();
                for name in names {
                    self.reset_order(&name, None);
                }
            }
        }
        // Pages of the flushed epochs can never be replayed again.
        match group {
            Some(name) => lock(&self.inner.replays).purge(name, None),
            None => lock(&self.inner.replays).clear(),
        }
        Ok(())
    }

    /// Restarts a group's sequencer in `epoch` at offset 1 (`None`: forgets it;
    /// the next append or subscription starts it from the store).
    pub(super) fn reset_order(&self, group: &str, epoch: Option<Epoch>) {
        let Some(g) = self.group(group) else { return };
        let mut order = lock(&g.order);
        // Undelivered messages of the old epoch are gone with it. A publish
        // may already have started the new epoch; then it stands.
        let started = match (&*order, &epoch) {
            (Some(seq), Some(e)) => seq.epoch() == e,
            _ => false,
        };
        if !started {
            *order = epoch.map(|epoch| Sequencer::new(epoch, 1));
        }
    }
}
