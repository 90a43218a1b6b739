//! The order of one group's appends on a Redis Cluster: [`RetryOrder`]
//! hands each append a [`Ticket`], so that appends a node refused for their
//! slot are sent again in the order they were made.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The order in which one group's appends were made, so that appends a
/// Cluster node refused are sent again in that order: one connection's
/// publishes keep their order across a slot move. Each append takes a
/// ticket; one refused waits until every earlier one of its group is
/// settled (saved, failed, dropped, or itself sent again and answered)
/// before it is sent again, for at most [`super::REDIRECT_FOR`]; an append made
/// while one of its group is held so is itself held (sent when its turn
/// comes, once awaited), so that it cannot overtake.
#[derive(Debug, Default)]
pub(super) struct RetryOrder {
    groups: Mutex<HashMap<String, Tickets>>,
}

#[derive(Debug)]
struct Tickets {
    /// The next ticket to hand out.
    issued: u64,
    /// Every ticket below this one is settled.
    next: u64,
    /// Settled tickets above `next`.
    early: std::collections::BTreeSet<u64>,
    /// Unsettled tickets held back (refused once, or made while one was).
    held: u64,
    turn: Arc<tokio::sync::Notify>,
}

impl RetryOrder {
    pub(super) fn take(self: &Arc<Self>, group: &str) -> Ticket {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let t = groups.entry(group.to_owned()).or_insert_with(|| Tickets {
            issued: 0,
            next: 0,
            early: Default::default(),
            held: 0,
            turn: Arc::new(tokio::sync::Notify::new()),
        });
        t.issued += 1;
        let held = t.held > 0;
        if held {
            t.held += 1;
        }
        Ticket {
            order: self.clone(),
            group: group.to_owned(),
            number: t.issued - 1,
            held,
            settled: false,
        }
    }
}

/// One append's place in its group's order; settled when dropped.
pub(super) struct Ticket {
    order: Arc<RetryOrder>,
    group: String,
    number: u64,
    /// Counted in its group's `held`.
    pub(super) held: bool,
    settled: bool,
}

impl Ticket {
    /// Marks the append held back: later appends of the group wait for it.
    pub(super) fn hold(&mut self) {
        if std::mem::replace(&mut self.held, true) {
            return;
        }
        let mut groups = self.order.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = groups.get_mut(&self.group) {
            t.held += 1;
        }
    }

    /// Waits until every earlier append of the group is settled (at most
    /// until `deadline`).
    pub(super) async fn turn(&self, deadline: tokio::time::Instant) {
        loop {
            let turn = {
                let groups = self.order.groups.lock().unwrap_or_else(|p| p.into_inner());
                match groups.get(&self.group) {
                    Some(t) if t.next < self.number => t.turn.clone(),
                    _ => return,
                }
            };
            let notified = turn.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let groups = self.order.groups.lock().unwrap_or_else(|p| p.into_inner());
                if groups.get(&self.group).is_none_or(|t| t.next >= self.number) {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    pub(super) fn settle(&mut self) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let mut groups = self.order.groups.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = groups.get_mut(&self.group) else { return };
        if self.held {
            t.held = t.held.saturating_sub(1);
        }
        if self.number == t.next {
            t.next += 1;
            while t.early.remove(&t.next) {
                t.next += 1;
            }
            t.turn.notify_waiters();
        } else if self.number > t.next {
            t.early.insert(self.number);
        }
        if t.next == t.issued {
            groups.remove(&self.group);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn refused_appends_go_again_in_the_order_they_were_made() {
        let order = Arc::new(RetryOrder::default());
        let mut first = order.take("g");
        let mut second = order.take("g");
        let later = tokio::time::Instant::now() + Duration::from_secs(5);
        // The second is refused: it waits for the first.
        second.hold();
        let third = order.take("g");
        assert!(third.held, "an append made while one is held is held too");
        assert!(!first.held);
        let waiting = tokio::spawn(async move {
            second.turn(later).await;
            second
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the first is not settled yet");
        first.settle();
        let mut second = waiting.await.expect("turn");
        // The third waits for the second.
        let waiting = tokio::spawn(async move {
            third.turn(later).await;
            third
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        second.settle();
        drop(waiting.await.expect("turn"));
        assert!(
            order.groups.lock().expect("lock").is_empty(),
            "nothing kept once all settled"
        );
        // A dropped append settles too; settling out of order is kept.
        let a = order.take("h");
        let mut b = order.take("h");
        b.settle();
        drop(a);
        assert!(order.groups.lock().expect("lock").is_empty());
    }
}
