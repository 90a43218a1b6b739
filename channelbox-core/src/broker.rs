//! The broker contract: how the messages of a group reach every server of a
//! cluster. A shared engine (Redis) is both the [`HistoryStore`] that assigns
//! offsets and the [`Broker`] that carries each saved message, with its
//! position, to every server with members of its group. A box in one process
//! needs no broker.
//!
//! [`HistoryStore`]: crate::HistoryStore

use std::future::Future;
use std::pin::Pin;

use uuid::Uuid;

use crate::error::StoreError;
use crate::history::NewMessage;
use crate::position::StreamPosition;

/// A future that resolves once the engine confirmed a subscription change.
pub type BrokerFuture = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'static>>;

/// What arrives from the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerEvent {
    /// A saved message of a subscribed group, with its position.
    Saved {
        /// The group.
        group: String,
        /// Its epoch and offset, assigned by the engine.
        position: StreamPosition,
        /// The message.
        message: NewMessage,
        /// A channel that must not receive it (its sender, with `echo` off).
        except: Option<Uuid>,
    },
    /// An unsaved message published by another server.
    Unsaved {
        /// The group.
        group: String,
        /// The message.
        message: NewMessage,
        /// A channel that must not receive it.
        except: Option<Uuid>,
    },
    /// The group's history was flushed: it continues in this epoch from offset 1.
    Reset {
        /// The group.
        group: String,
        /// Its new position (offset 0).
        position: StreamPosition,
    },
    /// The group's history in the engine went back below offsets it had
    /// handed out (a restart from an older snapshot, a promoted replica that
    /// lacked the newest writes, a partial eviction), and the server that
    /// noticed moved it to this new epoch; its surviving messages keep their
    /// offsets, up to `position.offset`. Members still in the old epoch are
    /// closed with 4002, and nothing of the old epoch is replayed from a cache.
    Moved {
        /// The group.
        group: String,
        /// The new epoch and its newest offset.
        position: StreamPosition,
    },
    /// The connection to the engine was lost: events may be missing from here.
    Lost,
    /// The connection is back and every subscription restored; what was
    /// missed meanwhile must be looked up in history.
    Back,
}

/// Carries a group's messages between the servers of a cluster.
///
/// Subscription changes are placed in the order the calls are made (not the
/// order their futures are first polled), so that a subscribe following an
/// unsubscribe of the same group always wins.
pub trait Broker: Send + Sync + std::fmt::Debug + 'static {
    /// Subscribes this server to a group's messages; resolves once the engine
    /// confirmed (at once when subscribed already).
    fn subscribe(&self, group: &str) -> BrokerFuture;

    /// Stops receiving a group's messages.
    fn unsubscribe(&self, group: &str) -> BrokerFuture;

    /// Sends an unsaved message to the group's members on the other servers.
    fn publish_unsaved(&self, group: &str, message: &NewMessage, except: Option<Uuid>) -> BrokerFuture;

    /// The events, handed out once: `None` on later calls.
    fn take_events(&self) -> Option<tokio::sync::mpsc::Receiver<BrokerEvent>>;

    /// Whether the engine is reachable now.
    fn connected(&self) -> bool;
}
