//! A service in a cluster: what it shares with the other servers beyond the
//! group messages the box's broker carries — who is connected where (for
//! `direct`), member counts and presence, member events, admin close-all.
//!
//! A [`Directory`] keeps this server's records in the shared engine and reads
//! the others'; no request waits on every server answering. The contract
//! (`Directory`, [`ClusterEvent`], [`Member`], [`Change`]) lives in
//! `channelbox-core`, so that an engine implements it without depending on
//! the protocol; this file wires it into the service: local joins and leaves
//! go out, [`ClusterEvent`]s from other servers come in.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

pub use channelbox_core::{Change, ClusterEvent, Directory, Member};
use channelbox_core::{CloseReason, Frame};
use serde_json::json;

use super::peers::MAX_PRESENCE;
use super::session::store_error;
use super::{ChatService, Inner};
use crate::fields::GroupName;
use crate::frames::ProtocolError;

/// The member event's `type`.
pub(super) fn event_type(change: Change) -> &'static str {
    match change {
        Change::Joined => "member_joined",
        Change::Left => "member_left",
    }
}

/// Applies other servers' events to this service until the directory stops.
pub(super) fn follow(inner: &Arc<Inner>, directory: &Arc<dyn Directory>) {
    let Some(mut events) = directory.take_events() else {
        tracing::warn!("the directory's events were taken already: no cross-server events");
        return;
    };
    let weak: Weak<Inner> = Arc::downgrade(inner);
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let Some(inner) = weak.upgrade() else { return };
            match event {
                ClusterEvent::Direct { to, frame } => {
                    // Gone meanwhile: as for a `direct` to a channel that just
                    // closed. A queue half full drops it: directs never make
                    // their target a slow consumer (the sender got `sent`).
                    if let Some(target) = inner.channels.channel(to) {
                        let _ = target.try_send_polite(Frame::text(frame));
                    }
                }
                ClusterEvent::CloseAll => {
                    inner.channels.close_all(CloseReason::GOING_AWAY);
                }
                ClusterEvent::Member { group, change, member } => {
                    inner.peers.tell_remote(&group, change, &member);
                }
            }
        }
    });
}

/// The JSON of a member as `presence` and member events show it.
pub(super) fn describe(member: &Member) -> serde_json::Value {
    match &member.user {
        Some(user) => json!({"channel_id": member.channel_id, "user": user}),
        None => json!({"channel_id": member.channel_id}),
    }
}

impl ChatService {
    /// Member counts by group: every server's in a cluster (the last known
    /// ones while the engine is away), this server's otherwise.
    pub(super) async fn member_counts(&self) -> BTreeMap<String, usize> {
        match self.inner.directory.get() {
            Some(directory) => directory.groups().await.unwrap_or_else(|err| {
                tracing::debug!(%err, "member counts from this server only");
                self.inner.channels.groups()
            }),
            None => self.inner.channels.groups(),
        }
    }

    /// `{"group","members":[…]}` (with `"truncated":true` past the cap), over
    /// every server of a cluster.
    pub(super) async fn presence_of(&self, group: &GroupName) -> Result<serde_json::Value, ProtocolError> {
        let (listed, truncated) = match self.inner.directory.get() {
            Some(directory) => {
                let (members, truncated) = directory
                    .presence(group.as_str(), MAX_PRESENCE)
                    .await
                    .map_err(|e| store_error(None, &e.into()))?;
                (members.iter().map(describe).collect(), truncated)
            }
            None => {
                let members = self.inner.channels.members(group.as_str()).unwrap_or_default();
                self.inner.peers.presence(&members)
            }
        };
        let mut body = json!({"group": group.as_str(), "members": listed});
        if truncated {
            body["truncated"] = json!(true);
        }
        Ok(body)
    }

    /// Closes this server's connections, and asks the other servers of a
    /// cluster to close theirs; how many closed here.
    pub(super) async fn close_everywhere(&self) -> Result<usize, ProtocolError> {
        if let Some(directory) = self.inner.directory.get() {
            directory.close_all().await.map_err(|e| store_error(None, &e.into()))?;
        }
        Ok(self.inner.channels.close_all(CloseReason::GOING_AWAY))
    }
}
