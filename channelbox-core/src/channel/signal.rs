//! The writer's wake-up: many threads signal, one task waits.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use futures_util::task::AtomicWaker;

/// Wakes one waiting task, like [`tokio::sync::Notify::notify_one`], and
/// keeps a wake-up given while nobody waits for the next wait. For a single
/// waiter — a channel's writer — it costs two atomic operations a side,
/// where `Notify` takes a lock (a broadcast signals every idle member).
#[derive(Default)]
pub(super) struct Signal {
    pending: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    /// Wakes the waiting task, or the next one to wait.
    pub(super) fn notify(&self) {
        self.pending.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Completes once a wake-up was given (before or after the call).
    /// Only one task may wait at a time.
    pub(super) fn notified(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.pending.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A wake-up between the check and the registration found no
            // waker: look again.
            if self.pending.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_wake_up_given_before_the_wait_is_kept_once() {
        let signal = Signal::default();
        signal.notify();
        signal.notify();
        signal.notified().await;
        let second = tokio::time::timeout(Duration::from_millis(50), signal.notified()).await;
        assert!(second.is_err(), "two wake-ups before a wait make one");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_task_is_woken_from_another_thread() {
        let signal = Arc::new(Signal::default());
        for _ in 0..1000 {
            let waiter = tokio::spawn({
                let signal = signal.clone();
                async move { signal.notified().await }
            });
            tokio::task::yield_now().await;
            signal.notify();
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("the waiter was woken")
                .expect("the waiter ran");
        }
    }
}
