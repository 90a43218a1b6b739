//! The directory contract: what the servers of a cluster share beyond the
//! group messages the [`Broker`](crate::Broker) carries — who is connected
//! where (for `direct`), member counts and presence, member events, and
//! admin close-all. A shared engine implements [`Directory`] (Redis:
//! `channelbox_redis::RedisDirectory`); the chat service
//! (`channelbox-protocol`) uses it. It lives here, beside the broker, so that
//! an engine implements it without depending on the protocol crate.

use std::collections::BTreeMap;

use async_trait::async_trait;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::error::StoreError;

/// One member of a group, on some server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The member's channel.
    pub channel_id: Uuid,
    /// Its user (`sub` of its token), when tokens are used.
    pub user: Option<String>,
}

/// A member joined or left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// It joined the group.
    Joined,
    /// It left the group, for any reason.
    Left,
}

/// What arrives from the other servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterEvent {
    /// A text frame for one of this server's channels (a `direct`).
    Direct {
        /// The channel.
        to: Uuid,
        /// The frame's text.
        frame: String,
    },
    /// Another server was asked to close every connection of the cluster.
    CloseAll,
    /// A member of a group joined or left on another server.
    Member {
        /// The group.
        group: String,
        /// Joined or left.
        change: Change,
        /// Who.
        member: Member,
    },
}

/// The cluster's shared records and control messages.
#[async_trait]
pub trait Directory: Send + Sync + std::fmt::Debug + 'static {
    /// A channel of this server joined or left a group: recorded (soon
    /// visible to every server) and announced to the group's other servers.
    fn changed(&self, group: &str, change: Change, member: Member);

    /// A channel of this server opened: recorded where `direct` finds it
    /// before this resolves (its `welcome` comes after).
    async fn connected(&self, channel: Uuid) -> Result<(), StoreError>;

    /// A channel of this server closed: forgotten in the background.
    fn disconnected(&self, channel: Uuid);

    /// Member counts of every group over every live server.
    async fn groups(&self) -> Result<BTreeMap<String, usize>, StoreError>;

    /// A group's members over every live server, at most `max`; whether the
    /// list was cut.
    async fn presence(&self, group: &str, max: usize) -> Result<(Vec<Member>, bool), StoreError>;

    /// Hands a text frame to a channel of another server; `false` when no
    /// live server has it.
    async fn direct(&self, to: Uuid, frame: String) -> Result<bool, StoreError>;

    /// Asks every other server to close its connections.
    async fn close_all(&self) -> Result<(), StoreError>;

    /// The events from other servers, handed out once.
    fn take_events(&self) -> Option<mpsc::Receiver<ClusterEvent>>;
}
