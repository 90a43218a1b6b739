//! The [`Broker`] contract as an executable suite, the way
//! [`conformance`](super::conformance) is the store's: every broker runs it
//! with its engine's form (one Redis, shards, Sentinel, the in-memory bus)
//! through a [`BrokerHarness`]. It drives the brokers directly, several
//! servers on one engine, and checks what each one's events say:
//!
//! - saved messages of a group reach every subscribed server (the
//!   publisher's own included) in offset order, each once, whoever saved them;
//! - a group not subscribed is not delivered;
//! - an unsubscribe followed at once by a subscribe ends subscribed;
//! - `except` travels with saved and unsaved messages, and an unsaved
//!   message reaches the other servers only;
//! - a flush arrives as `Reset`, a group moved after its engine went back
//!   as `Moved` (where the harness can make it go back);
//! - a lost connection arrives as `Lost` then `Back`, with every
//!   subscription restored (where the harness can cut one).
//!
//! Each check uses groups of its own; a failure panics naming the rule.
//! Deadlines (10 s) only bound a wait for an event that must come.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::broker::{Broker, BrokerEvent};
use crate::history::{HistoryStore, NewMessage, PendingAppend};
use crate::payload::PayloadKind;
use crate::position::StreamPosition;

/// How long an event that must come may take.
const WAIT: Duration = Duration::from_secs(10);

/// A boxed future, for the harness's methods.
pub type HarnessFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One server joined to the engine under test.
#[derive(Clone, Debug)]
pub struct Server {
    /// Its view of the shared history (saving a message publishes it).
    pub store: Arc<dyn HistoryStore>,
    /// Its broker.
    pub broker: Arc<dyn Broker>,
}

/// A form of a shared engine: it joins servers to it and, where it can,
/// breaks it the ways the suite checks.
pub trait BrokerHarness: Send + Sync {
    /// Joins one more server; the suite numbers them from 0 in this order.
    fn server(&self) -> HarnessFuture<'_, Server>;

    /// Cuts the connection on which server `index` receives `group`'s
    /// messages (other connections may go too, but no other of this
    /// server's), so that it must reconnect; `false` when this form cannot.
    fn interrupt<'a>(&'a self, index: usize, group: &'a str) -> HarnessFuture<'a, bool>;

    /// Makes the engine's copy of `group` disagree with what was handed out
    /// (as after a restart from an older snapshot), so that the next append
    /// moves the group to a new epoch; `false` when this form cannot.
    fn roll_back<'a>(&'a self, group: &'a str) -> HarnessFuture<'a, bool>;

    /// Whether the messages of groups `a` and `b` reach a server over one
    /// connection, so that they arrive in the order they were saved (the
    /// contract orders only one group's messages): always, but on an engine
    /// of several shards.
    fn same_connection(&self, a: &str, b: &str) -> bool {
        let _ = (a, b);
        true
    }
}

/// Runs every check of the contract against `harness`.
pub async fn run_all(harness: &dyn BrokerHarness) {
    let mut cluster = Cluster { harness, servers: 0 };
    saved_messages_arrive_in_order_once(&mut cluster).await;
    unsubscribed_groups_are_not_delivered(&mut cluster).await;
    unsubscribe_then_subscribe_ends_subscribed(&mut cluster).await;
    except_is_carried_and_unsaved_skips_its_sender(&mut cluster).await;
    resets_are_carried(&mut cluster).await;
    moves_are_carried(&mut cluster).await;
    lost_and_back_on_reconnect(&mut cluster).await;
}

struct Cluster<'a> {
    harness: &'a dyn BrokerHarness,
    servers: usize,
}

/// A server with its event queue.
struct Node {
    index: usize,
    server: Server,
    events: mpsc::Receiver<BrokerEvent>,
}

impl Cluster<'_> {
    async fn node(&mut self) -> Node {
        let server = self.harness.server().await;
        let events = server.broker.take_events().expect("a new broker hands out its events");
        let index = self.servers;
        self.servers += 1;
        Node { index, server, events }
    }
}

/// A group name of this check's own.
fn group(name: &str) -> String {
    format!("bc-{name}-{}", Uuid::new_v4().simple())
}

/// A group name of this check's own whose messages share `of`'s connection.
fn group_beside(harness: &dyn BrokerHarness, of: &str, name: &str) -> String {
    (0..10_000)
        .map(|_| group(name))
        .find(|g| harness.same_connection(of, g))
        .expect("a group name on the same connection")
}

fn msg(text: &str) -> NewMessage {
    NewMessage::new(PayloadKind::Text, Bytes::copy_from_slice(text.as_bytes()))
}

fn text(message: &NewMessage) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

impl Node {
    async fn subscribe(&self, group: &str) {
        self.server.broker.subscribe(group).await.expect("subscribe");
    }

    fn append(&self, group: &str, text: &str, except: Option<Uuid>) -> PendingAppend {
        self.server
            .store
            .append_except(group, msg(text), except)
            .expect("append queued")
    }

    async fn save(&self, group: &str, text: &str) -> StreamPosition {
        self.append(group, text, None).wait().await.expect("append saved")
    }

    /// The next event, `Lost` and `Back` included.
    async fn next_any(&mut self, what: &str) -> BrokerEvent {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("server {}: {what}: no event within {WAIT:?}", self.index))
            .unwrap_or_else(|| panic!("server {}: {what}: the broker's events ended", self.index))
    }

    /// The next event that is not `Lost` or `Back` (a connection's
    /// comings and goings are not what these checks are about).
    async fn next(&mut self, what: &str) -> BrokerEvent {
        loop {
            match self.next_any(what).await {
                BrokerEvent::Lost | BrokerEvent::Back => continue,
                event => return event,
            }
        }
    }

    /// The next event, which must be a saved message of `group`.
    async fn next_saved(&mut self, group: &str, what: &str) -> (StreamPosition, String, Option<Uuid>) {
        match self.next(what).await {
            BrokerEvent::Saved {
                group: g,
                position,
                message,
                except,
            } if g == group => (position, text(&message), except),
            other => panic!(
                "server {}: {what}: expected a saved message of {group}, got {other:?}",
                self.index
            ),
        }
    }
}

/// Saved messages from two publishers reach every subscriber, the
/// publishers included, in offset order and once each.
async fn saved_messages_arrive_in_order_once(cluster: &mut Cluster<'_>) {
    let g = group("order");
    let mut nodes = vec![cluster.node().await, cluster.node().await, cluster.node().await];
    for n in &nodes {
        n.subscribe(&g).await;
    }
    // Appends queued back to back on two servers, then awaited.
    let mut pending = Vec::new();
    for i in 0..40 {
        let text = format!("m{i}");
        pending.push((text.clone(), nodes[i % 2].append(&g, &text, None)));
    }
    let mut saved = Vec::new();
    for (text, p) in pending {
        saved.push((p.wait().await.expect("saved"), text));
    }
    saved.sort_by_key(|(position, _)| position.offset);
    let epoch = saved[0].0.epoch.clone();
    for (i, (position, _)) in saved.iter().enumerate() {
        assert_eq!(position.epoch, epoch, "one epoch for the run");
        assert_eq!(position.offset, saved[0].0.offset + i as u64, "offsets without holes");
    }
    let at = nodes[2].save(&g, "end").await;
    for n in &mut nodes {
        for (position, text) in &saved {
            let what = format!("saved message at offset {}", position.offset);
            let (got, got_text, _) = n.next_saved(&g, &what).await;
            assert_eq!(
                (&got, &got_text),
                (position, text),
                "saved messages in offset order, once"
            );
        }
        // Nothing more of the group before the marker: no duplicates.
        let (got, got_text, _) = n.next_saved(&g, "the marker after the last message").await;
        assert_eq!(
            (got, got_text.as_str()),
            (at.clone(), "end"),
            "no duplicate before the marker"
        );
    }
}

/// A group nobody subscribed to is not delivered, nor one unsubscribed
/// (once a later subscription is confirmed).
async fn unsubscribed_groups_are_not_delivered(cluster: &mut Cluster<'_>) {
    let heard = group("heard");
    let quiet = group_beside(cluster.harness, &heard, "quiet");
    let dropped = group_beside(cluster.harness, &heard, "dropped");
    let publisher = cluster.node().await;
    let mut listener = cluster.node().await;
    listener.subscribe(&dropped).await;
    listener.server.broker.unsubscribe(&dropped).await.expect("unsubscribe");
    // Confirmed after the unsubscribe: the engine has taken both.
    listener.subscribe(&heard).await;
    publisher.save(&quiet, "no").await;
    publisher.save(&dropped, "no").await;
    publisher.save(&heard, "yes").await;
    let (_, got, _) = listener
        .next_saved(&heard, "only the subscribed group, not the others")
        .await;
    assert_eq!(got, "yes");
}

/// Unsubscribe then subscribe, the subscribe awaited first: the server ends
/// subscribed, every time (the calls' order, not the polls', decides).
async fn unsubscribe_then_subscribe_ends_subscribed(cluster: &mut Cluster<'_>) {
    let g = group("churn");
    let publisher = cluster.node().await;
    let mut listener = cluster.node().await;
    listener.subscribe(&g).await;
    for round in 0..20 {
        let unsubscribed = listener.server.broker.unsubscribe(&g);
        let subscribed = listener.server.broker.subscribe(&g);
        subscribed.await.expect("subscribe");
        unsubscribed.await.expect("unsubscribe");
        let text = format!("round {round}");
        publisher.save(&g, &text).await;
        let (_, got, _) = listener
            .next_saved(&g, "a message after unsubscribe and subscribe")
            .await;
        assert_eq!(got, text, "the subscribe placed after the unsubscribe wins");
    }
}

/// `except` arrives with saved and unsaved messages; an unsaved message
/// reaches the other servers and not its sender.
async fn except_is_carried_and_unsaved_skips_its_sender(cluster: &mut Cluster<'_>) {
    let g = group("except");
    let mut a = cluster.node().await;
    let mut b = cluster.node().await;
    a.subscribe(&g).await;
    b.subscribe(&g).await;
    let (x, y) = (Uuid::new_v4(), Uuid::new_v4());
    a.append(&g, "saved", Some(x)).wait().await.expect("saved");
    a.server
        .broker
        .publish_unsaved(&g, &msg("unsaved"), Some(y))
        .await
        .expect("published");
    a.save(&g, "marker").await;
    let (_, got, except) = b.next_saved(&g, "the saved message with except").await;
    assert_eq!(
        (got.as_str(), except),
        ("saved", Some(x)),
        "except carried with a saved message"
    );
    match b.next("the unsaved message").await {
        BrokerEvent::Unsaved {
            group: got_group,
            message,
            except,
        } => assert_eq!(
            (got_group, text(&message), except),
            (g.clone(), "unsaved".to_owned(), Some(y)),
            "except carried with an unsaved message"
        ),
        other => panic!("expected the unsaved message, got {other:?}"),
    }
    let (_, got, _) = b.next_saved(&g, "the marker").await;
    assert_eq!(got, "marker");
    let (_, got, except) = a.next_saved(&g, "the sender's own saved message").await;
    assert_eq!((got.as_str(), except), ("saved", Some(x)));
    let (_, got, _) = a
        .next_saved(&g, "the marker, with no unsaved message of its own before it")
        .await;
    assert_eq!(got, "marker", "an unsaved message does not come back to its sender");
}

/// A flush reaches every subscriber as `Reset` to the new epoch, offset 0,
/// after the messages before it and before those after it.
async fn resets_are_carried(cluster: &mut Cluster<'_>) {
    let g = group("reset");
    let a = cluster.node().await;
    let mut b = cluster.node().await;
    b.subscribe(&g).await;
    let before = a.save(&g, "before").await;
    let epoch = a.server.store.flush_group(&g).await.expect("flush");
    assert_ne!(epoch, before.epoch, "a flush starts a new epoch");
    let after = a.save(&g, "after").await;
    assert_eq!(after, StreamPosition::new(epoch.clone(), 1));
    let (got, _, _) = b.next_saved(&g, "the message before the flush").await;
    assert_eq!(got, before);
    match b.next("the reset").await {
        BrokerEvent::Reset { group: got, position } => {
            assert_eq!(
                (got, position),
                (g.clone(), StreamPosition::new(epoch, 0)),
                "Reset carried"
            )
        }
        other => panic!("expected the reset, got {other:?}"),
    }
    let (got, _, _) = b.next_saved(&g, "the message after the flush").await;
    assert_eq!(got, after);
}

/// A group whose engine went back moves to a new epoch: subscribers hear
/// `Moved`, with the newest surviving offset, before its next message.
async fn moves_are_carried(cluster: &mut Cluster<'_>) {
    let g = group("moved");
    let a = cluster.node().await;
    let mut b = cluster.node().await;
    b.subscribe(&g).await;
    a.save(&g, "one").await;
    let last = a.save(&g, "two").await;
    if !cluster.harness.roll_back(&g).await {
        return;
    }
    let next = a.save(&g, "three").await;
    assert_ne!(
        next.epoch, last.epoch,
        "the append after the rollback runs in a new epoch"
    );
    for _ in 0..2 {
        b.next_saved(&g, "the messages before the rollback").await;
    }
    match b.next("the move").await {
        BrokerEvent::Moved { group: got, position } => {
            assert_eq!(got, g);
            assert_eq!(position.epoch, next.epoch, "Moved names the new epoch");
            assert_eq!(
                position.offset + 1,
                next.offset,
                "Moved gives the newest offset before the next"
            );
        }
        other => panic!("expected the move, got {other:?}"),
    }
    let (got, text, _) = b.next_saved(&g, "the message after the move").await;
    assert_eq!((got, text.as_str()), (next, "three"));
}

/// A cut connection: `Lost`, then `Back` with the subscriptions restored.
async fn lost_and_back_on_reconnect(cluster: &mut Cluster<'_>) {
    let g = group("reconnect");
    let a = cluster.node().await;
    let mut b = cluster.node().await;
    b.subscribe(&g).await;
    if !cluster.harness.interrupt(b.index, &g).await {
        return;
    }
    // A broker may report its first connection as `Back` too.
    loop {
        match b.next_any("Lost after the cut").await {
            BrokerEvent::Lost => break,
            BrokerEvent::Back => continue,
            other => panic!("expected Lost, got {other:?}"),
        }
    }
    match b.next_any("Back after Lost").await {
        BrokerEvent::Back => {}
        other => panic!("expected Back after Lost, got {other:?}"),
    }
    let at = a.save(&g, "after").await;
    let (got, text, _) = b.next_saved(&g, "a message after Back").await;
    assert_eq!((got, text.as_str()), (at, "after"), "subscriptions restored on Back");
}
