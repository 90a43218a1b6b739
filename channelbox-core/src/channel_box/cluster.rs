//! A box in a cluster: messages whose offsets a shared engine assigned reach
//! the group's sequencer through [`ChannelBox::ingest`], whoever published
//! them. The sequencer drops offsets it delivered already and holds back
//! offsets ahead of the next one; a gap that does not close by itself within
//! [`GAP_WAIT`] is filled from history. When history no longer has the
//! missing messages, or the group's epoch changed under this server, the
//! group's local members are closed with 4002 `insufficient state` so that
//! they recover instead of living with a gap.
//!
//! A message lost at the tail — nothing after it reveals the gap — is found by
//! the head check: every [`HEAD_CHECK`] for every group with a started
//! sequencer, and at once after the broker's connection comes back. One sweep
//! runs at a time, and it asks the store for all its heads together
//! ([`HistoryStore::check_heads`], one pipeline on Redis), passing what each
//! group delivered: an engine whose head went back below it moves the group
//! to a new epoch, and the members here are closed with 4002.
//!
//! A gap fill that fails (the engine away) is retried with backoff, at most
//! [`FILL_ATTEMPTS`] times; then the members are closed with 4002 rather
//! than waiting for ever behind the gap.
//!
//! [`HistoryStore::check_heads`]: crate::HistoryStore::check_heads

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::membership::Group;
use super::publish::Ready;
use super::sequencer::{Completion, Gap};
use super::{lock, ChannelBox, Inner};
use crate::broker::{Broker, BrokerEvent};
use crate::error::{BoxError, StoreErrorKind};
use crate::history::{Head, NewMessage, ReadQuery, StoredMessage};
use crate::position::StreamPosition;
use crate::transport::CloseReason;

/// How long a gap may stay open before it is filled from history: messages
/// of one group may arrive out of order for a moment.
pub const GAP_WAIT: Duration = Duration::from_millis(150);

/// How often every group with members checks the engine's head for a lost tail.
pub const HEAD_CHECK: Duration = Duration::from_secs(2);

/// How long the node stays subscribed to a group without local members, so
/// that churn on a group does not subscribe and unsubscribe it each time.
const IDLE_SUBSCRIPTION: Duration = Duration::from_secs(30);

/// Most messages read from history to fill a gap at a time.
const FILL_PAGE: usize = 256;

/// How many times a failing gap fill is tried before the members are closed
/// with 4002; the waits between tries double from [`GAP_WAIT`] up to
/// [`FILL_BACKOFF_MAX`] (about 13 s in all).
pub(super) const FILL_ATTEMPTS: u32 = 8;

/// The longest wait between two tries of a gap fill.
const FILL_BACKOFF_MAX: Duration = Duration::from_millis(3200);

/// How soon a full head check that could not read every head is tried again.
const FULL_SWEEP_RETRY: Duration = Duration::from_millis(250);

/// Most groups whose heads one store call checks.
const CHECK_BATCH: usize = 512;

impl ChannelBox {
    /// The broker, when this box is part of a cluster.
    pub fn broker(&self) -> Option<&Arc<dyn Broker>> {
        self.inner.broker.get()
    }

    /// Joins this box to a cluster: from now on the broker's events deliver
    /// saved messages (this server's own too), subscriptions follow local
    /// membership, and groups check the engine's head in the background. Must
    /// be called within a tokio runtime, once, before the box is used.
    pub fn attach_broker(&self, broker: Arc<dyn Broker>) -> Result<(), BoxError> {
        let Some(mut events) = broker.take_events() else {
            return Err(BoxError::Setup("the broker's events were taken already".into()));
        };
        if self.inner.broker.set(broker).is_err() {
            return Err(BoxError::Setup("a broker is attached already".into()));
        }
        // A reconnect asks for a sweep of every group; the sweeper runs one
        // sweep at a time, and a request made during one is served after it.
        let full_sweep = Arc::new(Notify::new());
        let weak = Arc::downgrade(&self.inner);
        let wake = full_sweep.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let Some(channels) = upgrade(&weak) else { return };
                channels.on_broker_event(event, &wake);
            }
        });
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEAD_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // A full sweep whose heads could not all be read (the command
            // connection not back yet) is done again shortly.
            let mut all_pending = false;
            loop {
                let all = tokio::select! {
                    _ = tick.tick() => all_pending,
                    () = full_sweep.notified() => true,
                    () = tokio::time::sleep(FULL_SWEEP_RETRY), if all_pending => true,
                };
                let Some(channels) = upgrade(&weak) else { return };
                channels.sweep_subscriptions();
                all_pending = !channels.check_heads(all).await && all;
            }
        });
        Ok(())
    }

    fn on_broker_event(&self, event: BrokerEvent, full_sweep: &Notify) {
        match event {
            BrokerEvent::Saved {
                group,
                position,
                message,
                except,
            } => {
                let ready = Ready {
                    message,
                    except,
                    report: None,
                };
                self.ingest(&group, position, ready);
            }
            BrokerEvent::Unsaved { group, message, except } => {
                if let Some(g) = self.group(&group) {
                    self.deliver_unsaved(&g, &message, except);
                }
            }
            BrokerEvent::Reset { group, position } => self.reset_order(&group, Some(position.epoch)),
            BrokerEvent::Moved { group, position } => self.epoch_moved(&group, &position),
            BrokerEvent::Lost => {}
            BrokerEvent::Back => full_sweep.notify_one(),
        }
    }

    /// The group went on in a new epoch after its history went back: members
    /// still in the old one cannot be given its messages without a gap, and
    /// no page of the old epoch may be replayed from the cache.
    fn epoch_moved(&self, group: &str, to: &StreamPosition) {
        lock(&self.inner.replays).purge(group, Some(&to.epoch));
        let Some(g) = self.group(group) else { return };
        let moved = lock(&g.order).as_ref().is_some_and(|s| *s.epoch() != to.epoch);
        if moved {
            self.insufficient_state(&g);
        }
    }

    /// A saved message of `group` at `at`, from whichever server published
    /// it: delivered to this server's members in offset order, once.
    pub(super) fn ingest(&self, group: &str, at: StreamPosition, ready: Ready) {
        let Some(g) = self.group(group) else {
            // No member here (any more): nothing to deliver.
            return ready.answer(Default::default());
        };
        g.last_ingest.store(crate::history::now_ms(), Ordering::Relaxed);
        let mut order = lock(&g.order);
        let Some(seq) = order.as_mut() else {
            // Not started: a member's subscription is reading the head, and
            // its replay or the next head check covers this message.
            return ready.answer(Default::default());
        };
        if *seq.epoch() != at.epoch {
            drop(order);
            ready.answer(Default::default());
            return self.insufficient_state(&g);
        }
        let epoch = seq.epoch().clone();
        let completion = seq.complete(at.offset, Some(ready), |offset, r| {
            self.deliver_ready(&g, &epoch, offset, r)
        });
        match completion {
            Completion::Taken => {}
            Completion::Stale(r) => r.into_iter().for_each(|r| r.answer(Default::default())),
            Completion::Overflow(r) => {
                // More held back than the bound: the gap is not closing.
                drop(order);
                r.into_iter().for_each(|r| r.answer(Default::default()));
                return self.insufficient_state(&g);
            }
        }
        let gap = seq.gap().is_some();
        drop(order);
        if gap {
            self.fill_later(g);
        }
    }

    /// Closes the group's members here with 4002 and forgets its sequencer
    /// and its cached replay pages: they cannot be given its messages
    /// without a gap.
    pub(super) fn insufficient_state(&self, g: &Arc<Group>) {
        lock(&self.inner.replays).purge(&g.name, None);
        let mut order = lock(&g.order);
        *order = None;
        let members: Vec<_> = lock(&g.members).map.values().cloned().collect();
        drop(order);
        if !members.is_empty() {
            tracing::warn!(group = %g.name, members = members.len(), "closing members: insufficient state");
        }
        for ch in members {
            ch.close(CloseReason::INSUFFICIENT_STATE);
            self.forget(ch.id());
        }
    }

    /// Starts filling the group's gap from history after [`GAP_WAIT`], unless
    /// a filler runs already.
    fn fill_later(&self, g: Arc<Group>) {
        if g.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let channels = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(GAP_WAIT).await;
            channels.fill_gaps(&g).await;
            g.filling.store(false, Ordering::Release);
        });
    }

    /// Reads what the sequencer misses from history, a page at a time, until
    /// no gap is left; a gap history cannot fill closes the members, and so
    /// does a read that keeps failing ([`FILL_ATTEMPTS`]).
    async fn fill_gaps(&self, g: &Arc<Group>) {
        if crate::mutation::active("drop_gap_fill") {
            return;
        }
        let mut failures = 0;
        loop {
            let Some((epoch, gap)) = lock(&g.order)
                .as_ref()
                .and_then(|s| Some((s.epoch().clone(), s.gap()?)))
            else {
                return;
            };
            let wanted = ((gap.last - gap.after) as usize).min(FILL_PAGE);
            let query = ReadQuery::Since {
                offset: gap.after,
                limit: wanted,
            };
            let page = match self.inner.store.read(&g.name, query).await {
                Ok(page) => page,
                Err(err) if err.kind() == StoreErrorKind::Corrupt => {
                    tracing::warn!(group = %g.name, %err, "an unreadable gap");
                    return self.insufficient_state(g);
                }
                Err(err) => {
                    failures += 1;
                    if failures >= FILL_ATTEMPTS {
                        tracing::warn!(group = %g.name, %err, "a gap fill keeps failing");
                        return self.insufficient_state(g);
                    }
                    tracing::debug!(group = %g.name, %err, failures, "cannot fill a gap now");
                    tokio::time::sleep(fill_backoff(failures)).await;
                    continue;
                }
            };
            if page.head.epoch != epoch || !fills(&page.head, &page.messages, gap) {
                return self.insufficient_state(g);
            }
            let mut order = lock(&g.order);
            let Some(seq) = order.as_mut().filter(|s| *s.epoch() == epoch) else {
                return;
            };
            for m in page.messages.into_iter().filter(|m| m.offset <= gap.last) {
                let offset = m.offset;
                let ready = Ready {
                    message: stored_to_new(m),
                    except: None,
                    report: None,
                };
                let ep = epoch.clone();
                seq.complete(offset, Some(ready), |o, r| self.deliver_ready(g, &ep, o, r));
            }
        }
    }

    /// Compares started groups' sequencers with the engine's head — every
    /// group after a reconnect (`all`), else those that received nothing for
    /// a [`HEAD_CHECK`] (in a busy group the next message reveals a loss): a
    /// different epoch, or a head below what was delivered, closes the
    /// members with 4002; a head ahead of everything received is a lost tail,
    /// filled from history. The heads are asked for together, a batch at a
    /// time, each with what its group delivered (an engine that went back
    /// below it moves the group to a new epoch). Returns whether every head
    /// asked for was read.
    async fn check_heads(&self, all: bool) -> bool {
        let groups: Vec<Arc<Group>> = lock(&self.inner.state).groups.values().cloned().collect();
        let quiet_since = crate::history::now_ms().saturating_sub(HEAD_CHECK.as_millis() as u64);
        // What was delivered before the heads are read: the engine had
        // those offsets when it answered. Offsets delivered while the read
        // was on its way may be past its answer without any loss.
        let started: Vec<(Arc<Group>, StreamPosition)> = groups
            .into_iter()
            .filter(|g| all || g.last_ingest.load(Ordering::Relaxed) <= quiet_since)
            .filter_map(|g| {
                let at = lock(&g.order).as_ref().map(|s| s.released())?;
                Some((g, at))
            })
            .collect();
        let mut read_all = true;
        for batch in started.chunks(CHECK_BATCH) {
            let seen: Vec<(String, StreamPosition)> =
                batch.iter().map(|(g, at)| (g.name.to_string(), at.clone())).collect();
            let heads = self.inner.store.check_heads(&seen).await;
            read_all &= heads.len() == batch.len();
            for ((g, delivered), head) in batch.iter().zip(heads) {
                match head {
                    Ok(head) => self.compare_head(g, delivered, &head),
                    Err(_) => read_all = false,
                }
            }
        }
        read_all
    }

    /// One group's part of [`ChannelBox::check_heads`].
    fn compare_head(&self, g: &Arc<Group>, delivered: &StreamPosition, head: &Head) {
        let mut order = lock(&g.order);
        let Some(seq) = order.as_mut().filter(|s| *s.epoch() == delivered.epoch) else {
            return;
        };
        if head.epoch != delivered.epoch || head.last < delivered.offset {
            drop(order);
            return self.insufficient_state(g);
        }
        seq.note_known(head.last);
        let gap = seq.gap().is_some();
        drop(order);
        if gap {
            self.fill_later(g.clone());
        }
    }

    /// Subscribes this server to a group before a member joins it; resolves
    /// once the engine confirmed. Nothing to do without a broker.
    pub(super) async fn subscribe_node(&self, group: &str) -> Result<(), BoxError> {
        let Some(broker) = self.broker() else { return Ok(()) };
        let confirmed = {
            let mut subscribed = lock(&self.inner.subscribed);
            subscribed.insert(Arc::from(group), Instant::now());
            broker.subscribe(group)
        };
        Ok(confirmed.await?)
    }

    /// Unsubscribes from groups without local members for a while.
    fn sweep_subscriptions(&self) {
        let Some(broker) = self.broker() else { return };
        let mut subscribed = lock(&self.inner.subscribed);
        let idle: Vec<Arc<str>> = subscribed
            .iter()
            .filter(|(name, since)| since.elapsed() > IDLE_SUBSCRIPTION && self.group(name).is_none())
            .map(|(name, _)| name.clone())
            .collect();
        for name in idle {
            subscribed.remove(&name);
            // Placed now, under the lock, so a later subscribe comes after it.
            drop(broker.unsubscribe(&name));
        }
    }
}

/// Whether a page read after `gap.after` holds every missing offset, as far as
/// history still has them: nothing trimmed past the gap's start, the head not
/// behind it, and the offsets continuous.
fn fills(head: &Head, messages: &[StoredMessage], gap: Gap) -> bool {
    if head.first > gap.after + 1 || head.last < gap.after {
        return false;
    }
    let continuous = (gap.after + 1..).zip(messages).all(|(next, m)| m.offset == next);
    // An empty page with offsets missing: expired by age, or lost.
    continuous && !messages.is_empty()
}

/// The wait after the `failures`th failed try of a gap fill.
fn fill_backoff(failures: u32) -> Duration {
    (GAP_WAIT * 2u32.saturating_pow(failures.saturating_sub(1))).min(FILL_BACKOFF_MAX)
}

fn stored_to_new(m: StoredMessage) -> NewMessage {
    NewMessage {
        kind: m.kind,
        payload: m.payload,
        meta: m.meta,
        timestamp_ms: m.timestamp_ms,
    }
}

fn upgrade(weak: &Weak<Inner>) -> Option<ChannelBox> {
    weak.upgrade().map(|inner| ChannelBox { inner })
}

/// The box's record of the groups this server subscribed to, and when each
/// was last asked for.
pub(super) type Subscriptions = std::sync::Mutex<HashMap<Arc<str>, Instant>>;
