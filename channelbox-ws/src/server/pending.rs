//! The bound on connections not yet upgraded: which of them may be closed
//! to make room (idle sockets past a handshake's time), and when the accept
//! loop waits instead (a crowd of young ones).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// What the accept loop knows of a pending connection's progress.
#[derive(Debug, Default)]
pub(super) struct Watch {
    /// The server has tried to read it. Until then it cannot be blamed for
    /// sending nothing: a server behind on its work has not looked yet.
    polled: AtomicBool,
    /// A request of it is being answered (its head arrived whole): it is
    /// no idle socket, and its own deadlines bound it.
    busy: AtomicBool,
}

impl Watch {
    /// Whether the connection may be closed to make room: looked at, and
    /// not in the middle of a request.
    fn idle(&self) -> bool {
        self.polled.load(Ordering::Acquire) && !self.busy.load(Ordering::Acquire)
    }
}

/// One connection that has not upgraded.
#[derive(Debug)]
struct Waiting {
    id: u64,
    since: Instant,
    /// Tells the connection to close.
    evict: Arc<Notify>,
    watch: Arc<Watch>,
}

/// The connections that have not upgraded, oldest first.
///
/// Past the cap, the oldest one pending longer than a legitimate handshake
/// takes (`grace`) that the server has read and that is not in the middle
/// of a request is closed: that is an idle socket. One the server has not
/// read yet is never blamed: under load the server, not the client, is late. When every pending connection is younger, nobody is closed:
/// the accept loop stops accepting until one upgrades or ages, and the
/// kernel's backlog holds the crowd meanwhile. Closing the oldest at once,
/// as before, closed legitimate handshakes whenever clients connected
/// faster than the server upgraded them (10,000 clients after a restart).
#[derive(Debug, Default)]
pub(super) struct Pending {
    cap: usize,
    grace: Duration,
    next: AtomicU64,
    open: Mutex<VecDeque<Waiting>>,
    /// Woken when a connection leaves: room for the accept loop.
    freed: Notify,
}

impl Pending {
    /// At most `cap` pending connections; younger than `grace` none is closed.
    pub(super) fn new(cap: usize, grace: Duration) -> Self {
        Pending {
            cap,
            grace,
            ..Pending::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiting>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until there is room for one more connection: below the cap, or
    /// after closing the oldest idle one past its grace.
    pub(super) async fn room(&self) {
        loop {
            let wait = {
                let mut open = self.lock();
                if open.len() < self.cap {
                    return;
                }
                let now = Instant::now();
                let idle = open.iter().position(|w| w.watch.idle());
                match idle.map(|at| (at, open[at].since)) {
                    Some((at, since)) if now.duration_since(since) >= self.grace => {
                        if let Some(old) = open.remove(at) {
                            // A stored permit: the connection sees it at its next poll.
                            old.evict.notify_one();
                        }
                        return;
                    }
                    // The oldest idle one is old enough at this moment.
                    Some((_, since)) => (since + self.grace).saturating_duration_since(now),
                    // All in a request or not looked at yet: one finishes
                    // soon, or its deadline ends it.
                    None => self.grace,
                }
            };
            let _ = tokio::time::timeout(wait.max(Duration::from_millis(1)), self.freed.notified()).await;
        }
    }

    /// Registers a new connection; returns its id, its close signal and
    /// what records its progress.
    pub(super) fn enter(&self) -> (u64, Arc<Notify>, Arc<Watch>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (evict, watch) = (Arc::new(Notify::new()), Arc::new(Watch::default()));
        self.lock().push_back(Waiting {
            id,
            since: Instant::now(),
            evict: evict.clone(),
            watch: watch.clone(),
        });
        (id, evict, watch)
    }

    /// The connection ended or upgraded.
    pub(super) fn leave(&self, id: u64) {
        let mut open = self.lock();
        // Ids only grow, so the list is sorted by them.
        if let Ok(at) = open.binary_search_by_key(&id, |w| w.id) {
            open.remove(at);
        }
        drop(open);
        self.freed.notify_one();
    }
}

/// Marks a connection busy while one of its requests is answered.
pub(super) struct Busy(Option<Arc<Watch>>);

impl Busy {
    pub(super) fn start(watch: &Arc<Watch>) -> Busy {
        watch.busy.store(true, Ordering::Release);
        Busy(Some(watch.clone()))
    }

    /// The request was answered with an upgrade: the connection stays busy
    /// until it leaves the pending ones. Between the answer and hyper handing
    /// the socket over it is no idle socket, and a slow handshake (a slow
    /// connect hook) would otherwise make it look like one past its grace,
    /// to be closed right after it was let in.
    pub(super) fn upgraded(mut self) {
        self.0 = None;
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(watch) = &self.0 {
            watch.busy.store(false, Ordering::Release);
        }
    }
}

/// A connection's socket that records the first time the server reads it,
/// then forgets its watch: later reads cost nothing more.
pub(super) struct Watched {
    pub(super) stream: TcpStream,
    pub(super) watch: Option<Arc<Watch>>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(watch) = self.watch.take() {
            watch.polled.store(true, Ordering::Release);
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(cap: usize, grace: Duration) -> Pending {
        Pending::new(cap, grace)
    }

    /// Whether `evict` holds a close signal, without waiting.
    async fn told_to_close(evict: &Notify) -> bool {
        tokio::time::timeout(Duration::from_millis(1), evict.notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn young_connections_are_not_closed_to_make_room() {
        let p = Arc::new(pending(2, Duration::from_secs(60)));
        let (first, first_evict, _) = p.enter();
        let (_, second_evict, _) = p.enter();
        // Full of young connections: no room, and nobody is told to close.
        let waiting = tokio::time::timeout(Duration::from_millis(100), p.room()).await;
        assert!(
            waiting.is_err(),
            "room was made while every pending connection was young"
        );
        assert!(!told_to_close(&first_evict).await && !told_to_close(&second_evict).await);
        // One upgrades: room at once.
        let room = tokio::spawn({
            let p = p.clone();
            async move { p.room().await }
        });
        p.leave(first);
        tokio::time::timeout(Duration::from_secs(5), room)
            .await
            .expect("room once one left")
            .expect("ran");
    }

    #[tokio::test]
    async fn the_oldest_idle_connection_past_its_grace_is_closed_and_busy_ones_are_not() {
        let p = pending(3, Duration::from_millis(20));
        let (_, oldest_evict, oldest) = p.enter();
        let (_, unread_evict, _) = p.enter();
        let (_, idle_evict, idle) = p.enter();
        // The oldest is answering a request and the next was never read (the
        // server is behind): the third, read and found silent, goes.
        oldest.polled.store(true, Ordering::Release);
        oldest.busy.store(true, Ordering::Release);
        idle.polled.store(true, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(30)).await;
        tokio::time::timeout(Duration::from_secs(5), p.room())
            .await
            .expect("an idle socket past its grace makes room");
        assert!(told_to_close(&idle_evict).await, "the idle one is closed");
        assert!(!told_to_close(&oldest_evict).await, "the busy one is kept");
        assert!(!told_to_close(&unread_evict).await, "the unread one is kept");
        assert_eq!(p.lock().len(), 2);
    }
}
