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

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// How long the accept loop waits for a connection it asked to close before
/// it looks again: one that turns out to have a request waiting stays, and
/// the loop then asks the next idle one.
const ASKED_WAIT: Duration = Duration::from_millis(10);

/// What the accept loop knows of a pending connection's progress.
#[derive(Debug, Default)]
pub(super) struct Watch {
    /// The server's last read of it found nothing waiting. Until the server
    /// has read it, it cannot be blamed for sending nothing: a server behind
    /// on its work has not looked yet.
    polled: AtomicBool,
    /// A request of it is being answered (its head arrived whole): it is
    /// no idle socket, and its own deadlines bound it.
    busy: AtomicBool,
    /// The accept loop asked it to close if it is still idle. Its next read
    /// decides on the facts of that moment: bytes waiting in the kernel (a
    /// request that arrived while the server was too busy to read it) keep
    /// it, nothing waiting closes it.
    asked: AtomicBool,
    /// Wakes its reader for that decision.
    reader: AtomicWaker,
    /// It left the pending ones: its reads stop consulting the watch.
    left: AtomicBool,
}

impl Watch {
    /// Whether the connection may be asked to close to make room: read and
    /// found silent, not in the middle of a request, not asked already.
    fn idle(&self) -> bool {
        self.polled.load(Ordering::Acquire) && !self.busy.load(Ordering::Acquire) && !self.asked.load(Ordering::Acquire)
    }

    /// Asks the connection to close at its next read if nothing is waiting.
    fn ask_to_close(&self) {
        self.asked.store(true, Ordering::Release);
        self.reader.wake();
    }
}

/// One connection that has not upgraded.
#[derive(Debug)]
struct Waiting {
    id: u64,
    since: Instant,
    watch: Arc<Watch>,
}

/// The connections that have not upgraded, oldest first.
///
/// Past the cap, the oldest one pending longer than a legitimate handshake
/// takes (`grace`) that the server has read and found silent, and that is
/// not in the middle of a request, is asked to close: that is an idle
/// socket. It closes at its next read unless bytes are waiting by then — a
/// server starved of CPU may look at a connection only long after its
/// request arrived, and must not blame the client for its own delay. One the
/// server has not read yet is never blamed. When every pending connection is
/// younger, nobody is closed: the accept loop stops accepting until one
/// upgrades or ages, and the kernel's backlog holds the crowd meanwhile.
/// Closing the oldest at once, as before, closed legitimate handshakes
/// whenever clients connected faster than the server upgraded them (10,000
/// clients after a restart).
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

    /// Waits until there is room for one more connection: below the cap,
    /// asking the oldest idle one past its grace to close meanwhile.
    pub(super) async fn room(&self) {
        loop {
            let wait = {
                let open = self.lock();
                if open.len() < self.cap {
                    return;
                }
                let now = Instant::now();
                match open.iter().find(|w| w.watch.idle()) {
                    Some(old) if now.duration_since(old.since) >= self.grace => {
                        old.watch.ask_to_close();
                        ASKED_WAIT
                    }
                    // The oldest idle one is old enough at this moment.
                    Some(young) => (young.since + self.grace).saturating_duration_since(now),
                    // All in a request, asked already or not looked at yet:
                    // one finishes soon, or its deadline ends it.
                    None => self.grace,
                }
            };
            let _ = tokio::time::timeout(wait.max(Duration::from_millis(1)), self.freed.notified()).await;
        }
    }

    /// Registers a new connection; returns its id and what records its
    /// progress.
    pub(super) fn enter(&self) -> (u64, Arc<Watch>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let watch = Arc::new(Watch::default());
        self.lock().push_back(Waiting {
            id,
            since: Instant::now(),
            watch: watch.clone(),
        });
        (id, watch)
    }

    /// The connection ended, upgraded or streams events.
    pub(super) fn leave(&self, id: u64) {
        let mut open = self.lock();
        // Ids only grow, so the list is sorted by them.
        if let Ok(at) = open.binary_search_by_key(&id, |w| w.id) {
            if let Some(gone) = open.remove(at) {
                gone.watch.left.store(true, Ordering::Release);
            }
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

/// A connection's socket that reports its reads to its watch while it is
/// pending — whether the last one found anything, and the close it was
/// asked for — then forgets the watch: later reads cost nothing more.
pub(super) struct Watched {
    pub(super) stream: TcpStream,
    pub(super) watch: Option<Arc<Watch>>,
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.watch.as_ref().is_some_and(|w| w.left.load(Ordering::Acquire)) {
            this.watch = None;
        }
        let Some(watch) = &this.watch else {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        };
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending => {
                // Registered before `asked` is read: an ask after this
                // read wakes the reader, one before it is seen now.
                watch.reader.register(cx.waker());
                watch.polled.store(true, Ordering::Release);
                if watch.asked.load(Ordering::Acquire) {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "idle while pending past its grace",
                    )));
                }
                Poll::Pending
            }
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                // It sent something: not idle, whatever was asked.
                watch.polled.store(false, Ordering::Release);
                watch.asked.store(false, Ordering::Release);
                Poll::Ready(Ok(()))
            }
            done => done,
        }
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

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pending(cap: usize, grace: Duration) -> Pending {
        Pending::new(cap, grace)
    }

    fn asked(watch: &Watch) -> bool {
        watch.asked.load(Ordering::Acquire)
    }

    #[tokio::test]
    async fn young_connections_are_not_closed_to_make_room() {
        let p = Arc::new(pending(2, Duration::from_secs(60)));
        let (first, first_watch) = p.enter();
        let (_, second_watch) = p.enter();
        first_watch.polled.store(true, Ordering::Release);
        second_watch.polled.store(true, Ordering::Release);
        // Full of young connections: no room, and nobody is asked to close.
        let waiting = tokio::time::timeout(Duration::from_millis(100), p.room()).await;
        assert!(
            waiting.is_err(),
            "room was made while every pending connection was young"
        );
        assert!(!asked(&first_watch) && !asked(&second_watch));
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
    async fn the_oldest_idle_connection_past_its_grace_is_asked_to_close_and_busy_ones_are_not() {
        let p = Arc::new(pending(3, Duration::from_millis(20)));
        let (_, oldest) = p.enter();
        let (_, unread) = p.enter();
        let (idle_id, idle) = p.enter();
        // The oldest is answering a request and the next was never read (the
        // server is behind): the third, read and found silent, is asked.
        oldest.polled.store(true, Ordering::Release);
        oldest.busy.store(true, Ordering::Release);
        idle.polled.store(true, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let room = tokio::spawn({
            let p = p.clone();
            async move { p.room().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(asked(&idle), "the idle one is asked to close");
        assert!(!asked(&oldest), "the busy one is kept");
        assert!(!asked(&unread), "the unread one is kept");
        assert!(!room.is_finished(), "no room before the asked one left");
        // It closes (its read found nothing): room.
        p.leave(idle_id);
        tokio::time::timeout(Duration::from_secs(5), room)
            .await
            .expect("room once the idle one left")
            .expect("ran");
        assert_eq!(p.lock().len(), 2);
    }

    /// A socket pair on loopback: the server's end watched as pending.
    async fn watched_pair(p: &Pending) -> (Watched, u64, Arc<Watch>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (id, watch) = p.enter();
        let watched = Watched {
            stream: server,
            watch: Some(watch.clone()),
        };
        (watched, id, watch, client)
    }

    #[tokio::test]
    async fn an_asked_connection_closes_only_if_nothing_is_waiting() {
        let p = pending(8, Duration::ZERO);
        // Silent: its read, woken by the ask, ends it.
        let (mut silent, _, silent_watch, _silent_client) = watched_pair(&p).await;
        let mut buf = [0u8; 64];
        let read = tokio::spawn(async move { silent.read(&mut buf).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(silent_watch.idle(), "read and found silent");
        silent_watch.ask_to_close();
        let ended = tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("the ask woke the read")
            .expect("ran");
        assert_eq!(ended.expect_err("closed").kind(), io::ErrorKind::ConnectionAborted);

        // Its request arrived while the server was not reading (starved):
        // asked, it reads the request instead of closing.
        let (mut late, _, late_watch, mut late_client) = watched_pair(&p).await;
        let mut buf = [0u8; 64];
        let nothing = tokio::time::timeout(Duration::from_millis(20), late.read(&mut buf)).await;
        assert!(nothing.is_err(), "nothing was sent yet");
        assert!(late_watch.idle());
        late_client.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        tokio::time::sleep(Duration::from_millis(20)).await;
        late_watch.ask_to_close();
        let n = late.read(&mut buf).await.expect("the request is read");
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n");
        assert!(!late_watch.idle() && !asked(&late_watch), "it is no idle socket");
    }

    #[tokio::test]
    async fn a_connection_that_left_stops_consulting_its_watch() {
        let p = pending(8, Duration::ZERO);
        let (mut upgraded, id, watch, mut client) = watched_pair(&p).await;
        p.leave(id);
        // Asked after it left (a stale ask): reads go on as on any socket.
        watch.ask_to_close();
        client.write_all(b"x").await.expect("write");
        let mut buf = [0u8; 8];
        assert_eq!(upgraded.read(&mut buf).await.expect("read"), 1);
        assert!(upgraded.watch.is_none());
    }
}
