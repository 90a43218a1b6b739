//! A [`Broker`] for several boxes in one process: a [`MemoryBus`] stands for
//! the shared engine, each box gets its own [`MemoryBroker`] from it, and the
//! boxes share one history store wrapped by [`MemoryBus::store`], which
//! carries every saved message, with its position, to every box subscribed
//! to its group (the publishing box's own included) — as the Redis append
//! script does. It keeps the broker contract the way a network engine does,
//! and runs the broker conformance suite (`testkit::broker_conformance`):
//!
//! - saved messages of a group reach each subscriber in offset order, once:
//!   the position is taken and the message handed to every subscriber's
//!   queue under one lock;
//! - subscription changes take effect when called, so a subscribe that
//!   follows an unsubscribe always wins;
//! - unsaved messages reach the *other* subscribed boxes;
//! - every box's queue is bounded ([`MemoryBus::new`]). A box that does not
//!   keep up loses what does not fit, like a slow Redis subscriber whose
//!   connection is dropped: it hears [`BrokerEvent::Lost`] right after the
//!   last event it got, and [`BrokerEvent::Back`] once its queue has room
//!   again, so it looks up what it missed in history.
//!
//! ```
//! use std::sync::Arc;
//! use channelbox_core::{ChannelBox, HistoryStore, MemoryBus};
//! use channelbox_store_memory::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = MemoryBus::new(1024);
//! let history = bus.store(Arc::new(MemoryStore::default()));
//! let (a, b) = (ChannelBox::new(history.clone()), ChannelBox::new(history));
//! a.attach_broker(bus.broker())?;
//! b.attach_broker(bus.broker())?;
//! # Ok(()) }
//! ```

mod store;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::broker::{Broker, BrokerEvent, BrokerFuture};
use crate::history::{HistoryStore, NewMessage};

pub use store::BusStore;

/// Events one box's queue holds by default ([`MemoryBus::default`]).
pub const DEFAULT_BUS_QUEUE: usize = 4096;

/// One box as the bus knows it.
#[derive(Debug)]
struct Node {
    /// Its groups.
    groups: HashSet<String>,
    /// Its queue.
    events: mpsc::Sender<BrokerEvent>,
    /// Cut off (its queue overflowed, or [`MemoryBus::interrupt`]): it gets
    /// nothing until `Lost` and `Back` are in its queue.
    cut: bool,
}

#[derive(Debug, Default)]
struct State {
    nodes: HashMap<Uuid, Node>,
}

#[derive(Debug)]
struct Bus {
    state: Mutex<State>,
    queue: usize,
    /// How many times a box was cut off.
    cut_offs: AtomicU64,
}

impl Bus {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    /// Hands `event` to every box subscribed to `group` (but `skip`); a box
    /// whose queue is full is cut off.
    fn deliver(&mut self, bus: &Arc<Bus>, group: &str, skip: Option<Uuid>, event: &BrokerEvent) {
        let mut overflowed = Vec::new();
        for (id, node) in &mut self.nodes {
            if Some(*id) == skip || node.cut || !node.groups.contains(group) {
                continue;
            }
            match node.events.try_send(event.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => overflowed.push(*id),
                // Its box is gone; the broker leaves the bus when dropped.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        for id in overflowed {
            self.cut_off(bus, id);
        }
    }

    /// Cuts a box off: it gets nothing until its queue has room for `Lost`
    /// and `Back`, which are queued together, under the lock, right before
    /// it takes events again.
    fn cut_off(&mut self, bus: &Arc<Bus>, id: Uuid) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        if node.cut {
            return;
        }
        node.cut = true;
        bus.cut_offs.fetch_add(1, Ordering::Relaxed);
        let events = node.events.clone();
        let bus = Arc::downgrade(bus);
        tracing::warn!(node = %id, "in-memory broker: a box is cut off, it recovers from history");
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let Ok(permits) = events.reserve_many(2).await else {
                return;
            };
            let Some(bus) = bus.upgrade() else { return };
            let mut state = bus.lock();
            let mut permits = permits.into_iter();
            if let (Some(lost), Some(back), Some(node)) = (permits.next(), permits.next(), state.nodes.get_mut(&id)) {
                lost.send(BrokerEvent::Lost);
                back.send(BrokerEvent::Back);
                node.cut = false;
            }
        });
    }
}

/// The shared engine of several boxes in one process.
#[derive(Clone, Debug)]
pub struct MemoryBus {
    bus: Arc<Bus>,
}

impl Default for MemoryBus {
    fn default() -> Self {
        MemoryBus::new(DEFAULT_BUS_QUEUE)
    }
}

impl MemoryBus {
    /// A bus whose boxes each queue at most `queue` events (at least 2).
    pub fn new(queue: usize) -> Self {
        MemoryBus {
            bus: Arc::new(Bus {
                state: Mutex::new(State::default()),
                queue: queue.max(2),
                cut_offs: AtomicU64::new(0),
            }),
        }
    }

    /// How many times a box was cut off (its queue full, or
    /// [`MemoryBus::interrupt`]) since the bus started.
    pub fn cut_offs(&self) -> u64 {
        self.bus.cut_offs.load(Ordering::Relaxed)
    }

    /// A broker for one more box.
    pub fn broker(&self) -> Arc<MemoryBroker> {
        let (tx, rx) = mpsc::channel(self.bus.queue);
        let id = Uuid::new_v4();
        self.bus.lock().nodes.insert(
            id,
            Node {
                groups: HashSet::new(),
                events: tx,
                cut: false,
            },
        );
        Arc::new(MemoryBroker {
            id,
            bus: self.bus.clone(),
            events: Mutex::new(Some(rx)),
        })
    }

    /// The history every box of the bus shares, carrying its saved messages
    /// and resets to the subscribed boxes.
    pub fn store(&self, history: Arc<dyn HistoryStore>) -> Arc<BusStore> {
        Arc::new(BusStore::new(history, self.bus.clone()))
    }

    /// Cuts `broker` off as a lost connection would: it hears `Lost`, then
    /// `Back` once its queue has room for both; whatever was carried in
    /// between is missed and must be looked up in history.
    pub fn interrupt(&self, broker: &MemoryBroker) {
        self.bus.lock().cut_off(&self.bus, broker.id);
    }
}

/// One box's broker on a [`MemoryBus`].
#[derive(Debug)]
pub struct MemoryBroker {
    id: Uuid,
    bus: Arc<Bus>,
    events: Mutex<Option<mpsc::Receiver<BrokerEvent>>>,
}

impl MemoryBroker {
    /// This box's id on the bus.
    pub fn id(&self) -> Uuid {
        self.id
    }
}

impl Drop for MemoryBroker {
    fn drop(&mut self) {
        self.bus.lock().nodes.remove(&self.id);
    }
}

impl Broker for MemoryBroker {
    fn subscribe(&self, group: &str) -> BrokerFuture {
        if let Some(node) = self.bus.lock().nodes.get_mut(&self.id) {
            node.groups.insert(group.to_owned());
        }
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe(&self, group: &str) -> BrokerFuture {
        if let Some(node) = self.bus.lock().nodes.get_mut(&self.id) {
            node.groups.remove(group);
        }
        Box::pin(async { Ok(()) })
    }

    fn publish_unsaved(&self, group: &str, message: &NewMessage, except: Option<Uuid>) -> BrokerFuture {
        let event = BrokerEvent::Unsaved {
            group: group.to_owned(),
            message: message.clone(),
            except,
        };
        self.bus.lock().deliver(&self.bus, group, Some(self.id), &event);
        Box::pin(async { Ok(()) })
    }

    fn take_events(&self) -> Option<mpsc::Receiver<BrokerEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn connected(&self) -> bool {
        self.bus.lock().nodes.get(&self.id).is_some_and(|n| !n.cut)
    }
}
