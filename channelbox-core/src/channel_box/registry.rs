//! The channel registry: every channel the box knows, by id, with the groups it
//! is in. Registering installs the close hook that makes a closed channel leave
//! every group by itself; `send_to` and `close_all` look channels up here.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use uuid::Uuid;

use super::membership::Group;
use super::{lock, ChannelBox, Inner, RemoveStatus};
use crate::channel::Channel;
use crate::error::BoxError;
use crate::transport::CloseReason;

/// A registered channel and the groups it is in.
pub(super) struct Registered {
    pub(super) channel: Channel,
    pub(super) groups: Vec<Arc<str>>,
}

/// Everything the box's `state` lock guards.
#[derive(Default)]
pub(super) struct State {
    pub(super) channels: HashMap<Uuid, Registered>,
    pub(super) groups: HashMap<Arc<str>, Arc<Group>>,
}

impl ChannelBox {
    /// Registers a channel so that `send_to` finds it, and so that it leaves every
    /// group by itself when it closes. Joining a group registers too.
    pub fn register(&self, channel: &Channel) -> Result<(), BoxError> {
        let mut state = lock(&self.inner.state);
        self.register_locked(&mut state, channel)
    }

    pub(super) fn register_locked(&self, state: &mut State, channel: &Channel) -> Result<(), BoxError> {
        if state.channels.contains_key(&channel.id()) {
            return Ok(());
        }
        if channel.is_closed() {
            return Err(BoxError::ChannelClosed(channel.id()));
        }
        state.channels.insert(
            channel.id(),
            Registered {
                channel: channel.clone(),
                groups: Vec::new(),
            },
        );
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        // The hook runs on the writer task when the channel has closed. It holds
        // only a weak reference, so a dropped box is not kept alive by channels.
        channel.on_close(move |ch| {
            if let Some(inner) = weak.upgrade() {
                ChannelBox { inner }.forget(ch.id());
            }
        });
        Ok(())
    }

    /// Removes a channel from every group and from the registry (it stays open).
    /// Returns whether it was registered.
    pub fn forget(&self, id: Uuid) -> bool {
        let mut state = lock(&self.inner.state);
        let Some(reg) = state.channels.remove(&id) else {
            return false;
        };
        let mut left = Vec::with_capacity(reg.groups.len());
        for name in reg.groups {
            if Self::leave_locked(&mut state, &name, id) != RemoveStatus::NotMember {
                left.push((name, id));
            }
        }
        drop(state);
        self.notify_left(&left);
        true
    }

    /// The registered channel with this id.
    pub fn channel(&self, id: Uuid) -> Option<Channel> {
        lock(&self.inner.state).channels.get(&id).map(|r| r.channel.clone())
    }

    /// Every registered channel, as they are now.
    pub fn channels(&self) -> Vec<Channel> {
        lock(&self.inner.state)
            .channels
            .values()
            .map(|r| r.channel.clone())
            .collect()
    }

    /// The groups a channel is in.
    pub fn groups_of(&self, id: Uuid) -> Result<Vec<String>, BoxError> {
        let state = lock(&self.inner.state);
        let reg = state.channels.get(&id).ok_or(BoxError::NoSuchChannel(id))?;
        Ok(reg.groups.iter().map(|g| g.to_string()).collect())
    }

    /// Removes every channel from every group (the channels stay open).
    pub async fn flush_groups(&self) {
        let mut state = lock(&self.inner.state);
        state.groups.clear();
        let mut left = Vec::new();
        for (id, reg) in state.channels.iter_mut() {
            left.extend(reg.groups.drain(..).map(|g| (g, *id)));
        }
        drop(state);
        self.notify_left(&left);
    }

    /// Closes every registered channel with code 1001; returns how many.
    pub async fn close_all_connections(&self) -> usize {
        self.close_all(CloseReason::GOING_AWAY)
    }

    /// Closes every registered channel with this reason; returns how many.
    pub fn close_all(&self, reason: CloseReason) -> usize {
        let channels = self.channels();
        for ch in &channels {
            ch.close(reason.clone());
        }
        channels.len()
    }
}
