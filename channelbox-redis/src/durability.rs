//! `--redis-replicas N`: an append is acknowledged only once N replicas have
//! it. The append task ends each pipeline of appends with one `WAIT N ms`,
//! which covers every write the connection made before it, so appends stay
//! pipelined and in order and a batch waits once, not once per message. A
//! `WAIT` that returns fewer than N replicas fails the whole batch with
//! `unavailable`: the appends ran (and may have been delivered), but whether
//! they survive a failover is unknown.
//!
//! `WAIT` blocks the connection it runs on, so appends then get a command
//! connection of their own: reads and head checks never queue behind a
//! `WAIT`. Its pings may, which is why the wait is at most [`MAX_WAIT`]
//! (less than a command's timeout).

use std::sync::Arc;
use std::time::Duration;

use channelbox_core::StoreError;
use redis::{Pipeline, Value};

use crate::link::{unanswered, Link};

/// The longest `--redis-wait-ms` taken.
pub const MAX_WAIT: Duration = Duration::from_millis(1000);

/// How many replicas must have an append, how long to wait for them, and
/// the connection the appends (and their `WAIT`s) go through.
#[derive(Clone, Debug)]
pub(crate) struct ReplicaWait {
    replicas: u32,
    wait: Duration,
    link: Option<Arc<Link>>,
}

impl ReplicaWait {
    /// `None` for `replicas == 0`: nothing to wait for.
    pub(crate) fn new(replicas: u32, wait: Duration, link: Option<Arc<Link>>) -> Option<ReplicaWait> {
        (replicas > 0).then_some(ReplicaWait { replicas, wait, link })
    }

    /// The connection of the appends, when they have one of their own.
    pub(crate) fn link(&self) -> Option<Arc<Link>> {
        self.link.clone()
    }

    /// Checks the `WAIT` answer at the end of `values` and removes it.
    fn settle(&self, mut values: Vec<Value>) -> Result<Vec<Value>, StoreError> {
        match values.pop() {
            Some(Value::Int(n)) if n >= i64::from(self.replicas) => Ok(values),
            Some(Value::Int(n)) => Err(unanswered(format!(
                "durability unknown: {n} of {} replicas acknowledged within {:?}",
                self.replicas, self.wait
            ))),
            // The appends before it ran either way.
            Some(Value::ServerError(e)) => Err(unanswered(format!("WAIT failed: {}", e.code()))),
            _ => Err(unanswered("WAIT gave no answer")),
        }
    }
}

/// Sends a pipeline of appends, followed by `WAIT` when `wait` is set.
pub(crate) async fn send(
    link: &Link,
    mut pipe: Pipeline,
    wait: &Option<ReplicaWait>,
) -> Result<Vec<Value>, StoreError> {
    let Some(w) = wait else {
        return link.pipeline(&pipe).await;
    };
    let ms = u64::try_from(w.wait.as_millis()).unwrap_or(u64::MAX);
    pipe.cmd("WAIT").arg(w.replicas).arg(ms);
    let link = w.link.as_deref().unwrap_or(link);
    let values = link.pipeline_within(&pipe, w.wait).await?;
    w.settle(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_wait_fails_the_batch_and_a_full_one_passes_it_on() {
        let w = ReplicaWait::new(2, Duration::from_millis(100), None).expect("two replicas");
        let ok = w.settle(vec![Value::Okay, Value::Int(2)]).expect("enough replicas");
        assert_eq!(ok, vec![Value::Okay]);
        let err = w
            .settle(vec![Value::Okay, Value::Int(1)])
            .expect_err("one replica is short");
        assert!(err.to_string().contains("durability unknown"), "{err}");
        assert_eq!(err.kind(), channelbox_core::StoreErrorKind::Unanswered);
        assert!(w.settle(vec![]).is_err());
        assert!(ReplicaWait::new(0, Duration::from_millis(5), None).is_none());
    }
}
