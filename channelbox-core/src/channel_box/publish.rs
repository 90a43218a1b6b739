//! Publishing: a message gets its offset when the publish starts (in call
//! order, under the group's `order` lock, which also starts the group's
//! sequencer), waits for the store's durability, and is then completed in the
//! sequencer, which hands it to delivery in offset order. Unsaved messages skip
//! the sequencer and are delivered at once.
//!
//! With a shared engine the offset is assigned by the engine during `finish`;
//! the message then reaches the sequencer through the broker (or, without
//! one, through `ingest` right here), like any message of another server.
//!
//! Cancellation: a [`PendingPublish`] dropped before `finish` ends — its future
//! dropped mid-publish — completes its offset as abandoned, so later messages
//! of the group are never stalled behind it; the message itself stays in
//! history if the store already took it, and is not delivered live.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::oneshot;
use uuid::Uuid;

use super::membership::Group;
use super::sequencer::{Completion, Sequencer};
use super::{lock, ChannelBox, DeliveryReport, PublishReport};
use crate::envelope::MessageRef;
use crate::error::{BoxError, StoreError, StoreErrorKind};
use crate::history::{NewMessage, PendingAppend};
use crate::payload::Payload;
use crate::position::{Epoch, StreamPosition};

/// A saved message ready for delivery, and where its publisher waits for the
/// report (nobody waits for one that arrived from the broker).
pub(super) struct Ready {
    pub(super) message: NewMessage,
    pub(super) except: Option<Uuid>,
    pub(super) report: Option<oneshot::Sender<DeliveryReport>>,
}

/// How a message is published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// Save it to history first (it gets an offset).
    pub save_history: bool,
    /// A member that does not receive it: the sender, when it asked not to
    /// get its own message back.
    pub except: Option<Uuid>,
}

/// A publish whose append is under way and whose delivery is still to come;
/// see [`ChannelBox::start_publish`]. Dropping it unfinished skips its
/// delivery but never stalls later messages of the group.
#[must_use = "a publish is delivered only when `finish` is awaited"]
pub struct PendingPublish {
    inner: Option<PendingInner>,
}

struct PendingInner {
    channels: ChannelBox,
    group: Arc<Group>,
    message: NewMessage,
    except: Option<Uuid>,
    /// The append, when the message is saved.
    append: Option<PendingAppend>,
    /// Its position, when the store assigned it at once: then this box
    /// sequences it. A shared engine assigns it later.
    assigned: Option<StreamPosition>,
}

impl std::fmt::Debug for PendingPublish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("PendingPublish");
        if let Some(p) = &self.inner {
            d.field("group", &p.group.name).field("offset", &self.offset());
        }
        d.finish_non_exhaustive()
    }
}

impl PendingPublish {
    /// The offset assigned to the message, if it is saved and the store
    /// assigned it at once (a shared engine assigns it during `finish`).
    pub fn offset(&self) -> Option<u64> {
        self.inner
            .as_ref()
            .and_then(|p| p.assigned.as_ref())
            .map(|at| at.offset)
    }

    /// The group's epoch, if the message is saved and its offset assigned.
    pub fn epoch(&self) -> Option<&Epoch> {
        self.inner
            .as_ref()
            .and_then(|p| p.assigned.as_ref())
            .map(|at| &at.epoch)
    }

    /// Waits until the message is durable, then delivers it to the group's
    /// members in offset order. With a broker, delivery (on every server, this
    /// one included) follows from the broker's event, and the report counts
    /// no deliveries.
    pub async fn finish(mut self) -> Result<PublishReport, BoxError> {
        let Some(mut p) = self.inner.take() else {
            return Err(BoxError::Store(StoreError::new(
                StoreErrorKind::Closed,
                "publish already finished",
            )));
        };
        let Some(append) = p.append.take() else {
            let delivery = p.channels.finish_unsaved(&p.group, &p.message, p.except).await;
            p.channels.release_group(&p.group);
            return Ok(PublishReport {
                offset: None,
                epoch: None,
                delivery: delivery?,
            });
        };
        let result = append.wait().await;
        let (tx, rx) = oneshot::channel();
        let ready = Ready {
            message: p.message,
            except: p.except,
            report: Some(tx),
        };
        let at = match (p.assigned.take(), result) {
            (Some(at), Ok(_)) => {
                p.channels.complete(&p.group, &at.epoch, at.offset, Some(ready));
                at
            }
            (Some(at), Err(err)) => {
                p.channels.complete(&p.group, &at.epoch, at.offset, None);
                p.channels.release_group(&p.group);
                return Err(err.into());
            }
            (None, result) => {
                let at = match result {
                    Ok(at) if p.channels.broker().is_none() => at,
                    result => {
                        p.channels.release_group(&p.group);
                        let at = result?;
                        return Ok(PublishReport {
                            offset: Some(at.offset),
                            epoch: Some(at.epoch),
                            delivery: DeliveryReport::default(),
                        });
                    }
                };
                p.channels.ingest(&p.group.name, at.clone(), ready);
                at
            }
        };
        p.channels.release_group(&p.group);
        // The report was sent by whoever delivered the message: this task, or
        // the one that completed the offset just before it.
        let delivery = rx.await.unwrap_or_default();
        Ok(PublishReport {
            offset: Some(at.offset),
            epoch: Some(at.epoch),
            delivery,
        })
    }
}

impl Drop for PendingPublish {
    fn drop(&mut self) {
        if let Some(p) = self.inner.take() {
            if let Some(at) = &p.assigned {
                p.channels.complete(&p.group, &at.epoch, at.offset, None);
            }
            p.channels.release_group(&p.group);
        }
    }
}

impl Ready {
    /// Tells the publisher, if one waits, what the delivery did.
    pub(super) fn answer(self, report: DeliveryReport) {
        if let Some(tx) = self.report {
            let _ = tx.send(report);
        }
    }
}

impl ChannelBox {
    /// Broadcasts a payload to every member of a group, saving it to history
    /// first when `save_history` is set (Nexios's `group_send`).
    pub async fn group_send(
        &self,
        group: &str,
        payload: impl Into<Payload>,
        save_history: bool,
    ) -> Result<PublishReport, BoxError> {
        let (kind, bytes) = payload.into().encode();
        self.publish(group, NewMessage::new(kind, bytes), save_history).await
    }

    /// Broadcasts a message (with metadata and timestamp) to a group.
    pub async fn publish(
        &self,
        group: &str,
        message: NewMessage,
        save_history: bool,
    ) -> Result<PublishReport, BoxError> {
        self.start_publish(group, message, save_history)?.finish().await
    }

    /// Assigns the message its offset now (when saved), in call order, and
    /// returns the rest of the publish: awaiting durability and delivering. A
    /// connection that calls this for each of its publishes in turn gets offsets
    /// in its order while many of its publishes wait for the disk together.
    pub fn start_publish(
        &self,
        group: &str,
        message: NewMessage,
        save_history: bool,
    ) -> Result<PendingPublish, BoxError> {
        let options = PublishOptions {
            save_history,
            except: None,
        };
        self.start_publish_with(group, message, options)
    }

    /// [`ChannelBox::start_publish`] with options.
    pub fn start_publish_with(
        &self,
        group: &str,
        message: NewMessage,
        options: PublishOptions,
    ) -> Result<PendingPublish, BoxError> {
        let save_history = options.save_history;
        if group.is_empty() {
            return Err(BoxError::InvalidGroup(group.to_owned()));
        }
        let g = self.acquire_group(group);
        let append = if save_history {
            match self.append(&g, &message, options.except) {
                Ok(append) => Some(append),
                Err(err) => {
                    self.release_group(&g);
                    return Err(err.into());
                }
            }
        } else {
            None
        };
        let assigned = append.as_ref().and_then(|a| a.position().cloned());
        self.inner.counters.published.fetch_add(1, Ordering::Relaxed);
        Ok(PendingPublish {
            inner: Some(PendingInner {
                channels: self.clone(),
                group: g,
                message,
                except: options.except,
                append,
                assigned,
            }),
        })
    }

    /// Appends under the group's order lock, which ties offset assignment to
    /// the sequencer: the first append through this group object (or the first
    /// of a new epoch) starts it at the assigned offset. An offset the engine
    /// assigns later is sequenced when it arrives (see `cluster`).
    fn append(&self, g: &Group, message: &NewMessage, except: Option<Uuid>) -> Result<PendingAppend, StoreError> {
        let mut order = lock(&g.order);
        let pending = self.inner.store.append_except(&g.name, message.clone(), except)?;
        if let Some(at) = pending.position() {
            if order.as_ref().is_none_or(|s| *s.epoch() != at.epoch) {
                *order = Some(Sequencer::new(at.epoch.clone(), at.offset));
            }
        }
        Ok(pending)
    }

    /// Marks `offset` of `group` complete and delivers every message that is now
    /// in order. `ready` is `None` when the append failed or was abandoned.
    fn complete(&self, g: &Group, epoch: &Epoch, offset: u64, ready: Option<Ready>) {
        let mut order = lock(&g.order);
        let Some(seq) = order.as_mut().filter(|s| s.epoch() == epoch) else {
            // A message of an epoch that was flushed meanwhile: deliver it
            // without holding up the new epoch.
            if let Some(r) = ready {
                self.deliver_ready(g, epoch, offset, r);
            }
            return;
        };
        let epoch = seq.epoch().clone();
        let completion = seq.complete(offset, ready, |offset, r| self.deliver_ready(g, &epoch, offset, r));
        match completion {
            Completion::Taken => {}
            // Already covered: a subscriber that arrived since read it from history.
            Completion::Stale(r) => r.into_iter().for_each(|r| r.answer(DeliveryReport::default())),
            Completion::Overflow(r) => {
                // Too much held back behind one offset: the members cannot
                // be given the group's messages in order any more.
                drop(order);
                r.into_iter().for_each(|r| r.answer(DeliveryReport::default()));
                if let Some(g) = self.group(&g.name) {
                    self.insufficient_state(&g);
                }
            }
        }
    }

    pub(super) fn deliver_ready(&self, g: &Group, epoch: &Epoch, offset: u64, r: Ready) {
        let msg = MessageRef::live(&g.name, epoch.as_str(), Some(offset), &r.message);
        let report = self.deliver(g, msg, r.except);
        r.answer(report);
    }

    /// An unsaved message: to the other servers first (with a broker), then
    /// to this server's members.
    async fn finish_unsaved(
        &self,
        g: &Group,
        message: &NewMessage,
        except: Option<Uuid>,
    ) -> Result<DeliveryReport, BoxError> {
        if let Some(broker) = self.broker() {
            broker.publish_unsaved(&g.name, message, except).await?;
        }
        Ok(self.deliver_unsaved(g, message, except))
    }

    pub(super) fn deliver_unsaved(&self, g: &Group, message: &NewMessage, except: Option<Uuid>) -> DeliveryReport {
        // Taken so that a subscriber's gate opens either before or after this
        // message, never halfway through it.
        let order = lock(&g.order);
        let epoch = order.as_ref().map(|s| s.epoch().clone()).unwrap_or_default();
        let report = self.deliver(g, MessageRef::live(&g.name, epoch.as_str(), None, message), except);
        drop(order);
        report
    }
}
