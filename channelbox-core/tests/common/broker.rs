//! An in-process broker whose events the test writes by hand, for the
//! cluster tests: it never fails and forwards nothing, so the test alone
//! decides what the box hears from "other nodes".

use std::sync::{Arc, Mutex};

use channelbox_core::{Broker, BrokerEvent, BrokerFuture, ChannelBox, NewMessage};
use tokio::sync::mpsc;

#[derive(Debug)]
struct HandBroker {
    events: Mutex<Option<mpsc::Receiver<BrokerEvent>>>,
}

impl Broker for HandBroker {
    fn subscribe(&self, _group: &str) -> BrokerFuture {
        Box::pin(async { Ok(()) })
    }
    fn unsubscribe(&self, _group: &str) -> BrokerFuture {
        Box::pin(async { Ok(()) })
    }
    fn publish_unsaved(&self, _: &str, _: &NewMessage, _: Option<uuid::Uuid>) -> BrokerFuture {
        Box::pin(async { Ok(()) })
    }
    fn take_events(&self) -> Option<mpsc::Receiver<BrokerEvent>> {
        self.events.lock().unwrap().take()
    }
    fn connected(&self) -> bool {
        true
    }
}

/// Attaches a hand-driven broker to `channels` and returns the sender of its
/// events, whose queue holds at most `capacity` events.
pub fn attach_hand_broker(channels: &ChannelBox, capacity: usize) -> mpsc::Sender<BrokerEvent> {
    let (tx, rx) = mpsc::channel(capacity);
    let broker = HandBroker {
        events: Mutex::new(Some(rx)),
    };
    channels.attach_broker(Arc::new(broker)).unwrap();
    tx
}
