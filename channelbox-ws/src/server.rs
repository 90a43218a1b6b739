//! The chat server's accept loop, as a library function shared by the web
//! framework adapters (feature `server`): every connection is served by
//! hyper with its header-read timeout on; WebSocket upgrades to
//! `/ws/{group}` are answered here (hyper's upgrade, then tokio-tungstenite
//! on the upgraded socket with the transport's small buffers), every other
//! request by the framework's routes — warp's or axum's, any tower service.
//!
//! Nothing peeks at sockets or waits in a sleep loop: a connection costs
//! nothing until hyper has a complete request head, and one that does not
//! send it within the header timeout is closed. Connections that have not
//! upgraded count toward a bound of their own (`max_pending`); past it the
//! oldest of them that has been idle longer than a handshake takes is
//! closed, so idle sockets cannot take every descriptor and starve
//! WebSocket clients or `/healthz` — and when every pending connection is
//! young (a crowd connecting at once), the server stops accepting for a
//! moment instead, and the kernel's backlog holds the rest.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use channelbox_protocol::{ChatService, HttpAnswer};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming as Body;
use hyper::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::server::conn::http1;
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// An error of a response body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response [`serve`] writes: the framework's, boxed.
pub type HttpBody = UnsyncBoxBody<Bytes, BoxError>;

/// A response body of these bytes.
pub fn full(bytes: impl Into<Bytes>) -> HttpBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// A protocol answer as an HTTP response with a JSON body.
pub fn answer(a: HttpAnswer) -> Response<HttpBody> {
    let mut response = Response::new(full(a.body));
    *response.status_mut() = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn status(code: StatusCode) -> Response<HttpBody> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = code;
    response
}

/// How [`serve`] accepts connections.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerConfig {
    /// How long a connection may take to send a complete request head, the
    /// first one included; then it is closed (docs/protocol.md "Deadlines").
    pub header_timeout: Duration,
    /// Connections the kernel queues before they are accepted.
    pub backlog: u32,
    /// Connections that have not upgraded to WebSocket (plain HTTP, or not
    /// yet a complete request) the server keeps open at once. Past this the
    /// oldest of them idle for longer than `pending_grace` is closed; when
    /// none is, the server stops accepting until one upgrades or ages.
    pub max_pending: usize,
    /// How long a legitimate handshake may take from accept to upgrade:
    /// younger connections are never closed to make room.
    pub pending_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_timeout: Duration::from_secs(10),
            backlog: 4096,
            max_pending: 1024,
            pending_grace: Duration::from_millis(500),
        }
    }
}

impl ServerConfig {
    /// The defaults, with `max_pending` at most a quarter of the process's
    /// open-file limit, so that pending connections always leave room for
    /// WebSocket clients and the store.
    pub fn for_open_files(limit: u64) -> Self {
        let quarter = usize::try_from(limit / 4).unwrap_or(usize::MAX);
        let mut config = ServerConfig::default();
        config.max_pending = config.max_pending.min(quarter).max(16);
        config
    }
}

/// Raises the soft limit on open files to the hard limit; returns the limit
/// now in force. A server holds a descriptor per connection, and the soft
/// limit is often 1,024 where the hard one allows far more.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// One connection that has not upgraded.
#[derive(Debug)]
struct Waiting {
    id: u64,
    since: Instant,
    /// Tells the connection to close.
    evict: Arc<Notify>,
    /// A request of it is being answered (its head arrived whole): it is
    /// no idle socket, and its own deadlines bound it.
    busy: Arc<AtomicBool>,
}

/// The connections that have not upgraded, oldest first.
///
/// Past the cap, the oldest one pending longer than a legitimate handshake
/// takes (`grace`) and not in the middle of a request is closed: that is an
/// idle socket. When every pending connection is younger, nobody is closed:
/// the accept loop stops accepting until one upgrades or ages, and the
/// kernel's backlog holds the crowd meanwhile. Closing the oldest at once,
/// as before, closed legitimate handshakes whenever clients connected
/// faster than the server upgraded them (10,000 clients after a restart).
#[derive(Debug, Default)]
struct Pending {
    cap: usize,
    grace: Duration,
    next: AtomicU64,
    open: Mutex<VecDeque<Waiting>>,
    /// Woken when a connection leaves: room for the accept loop.
    freed: Notify,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiting>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until there is room for one more connection: below the cap, or
    /// after closing the oldest idle one past its grace.
    async fn room(&self) {
        loop {
            let wait = {
                let mut open = self.lock();
                if open.len() < self.cap {
                    return;
                }
                let now = Instant::now();
                let idle = open.iter().position(|w| !w.busy.load(Ordering::Acquire));
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
                    // All in a request: one finishes soon, or its deadline ends it.
                    None => self.grace,
                }
            };
            let _ = tokio::time::timeout(wait.max(Duration::from_millis(1)), self.freed.notified()).await;
        }
    }

    /// Registers a new connection; returns its id, its close signal and its
    /// busy flag.
    fn enter(&self) -> (u64, Arc<Notify>, Arc<AtomicBool>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (evict, busy) = (Arc::new(Notify::new()), Arc::new(AtomicBool::new(false)));
        self.lock().push_back(Waiting {
            id,
            since: Instant::now(),
            evict: evict.clone(),
            busy: busy.clone(),
        });
        (id, evict, busy)
    }

    /// The connection ended or upgraded.
    fn leave(&self, id: u64) {
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
struct Busy(Arc<AtomicBool>);

impl Busy {
    fn start(flag: &Arc<AtomicBool>) -> Busy {
        flag.store(true, Ordering::Release);
        Busy(flag.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Binds the listening socket, with `SO_REUSEADDR` and `backlog` connections
/// waiting to be accepted (the kernel caps it at `net.core.somaxconn`).
/// tokio's default of 1,024 overflowed when 10,000 clients reconnected at
/// once under load: the kernel then drops handshakes and clients see resets.
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Serves the chat server on `listener` until the future is dropped: the
/// WebSocket protocol on `/ws/{group}` and `web` (a framework's routes as a
/// tower service) for the rest.
pub async fn serve<W, B>(listener: TcpListener, service: ChatService, config: ServerConfig, web: W)
where
    W: tower_service::Service<Request<Body>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    W::Future: Send,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let web = TowerToHyperService::new(web);
    let pending = Arc::new(Pending {
        cap: config.max_pending.max(1),
        grace: config.pending_grace,
        ..Pending::default()
    });
    loop {
        // Not accepting while full of young connections: the kernel's
        // backlog holds the next ones.
        pending.room().await;
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                // Out of descriptors and similar: the error repeats until a
                // connection closes, so wait instead of spinning on it.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (id, evicted, busy) = pending.enter();
        let connection = serve_connection(
            stream,
            peer,
            (service.clone(), web.clone()),
            busy,
            config.header_timeout,
        );
        let pending = pending.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = connection => {}
                () = evicted.notified() => {
                    tracing::debug!(%peer, "closed: too many connections waiting to upgrade");
                }
            }
            pending.leave(id);
        });
    }
}

/// Serves one connection's requests until it closes or upgrades.
async fn serve_connection<W, B>(
    stream: TcpStream,
    peer: SocketAddr,
    (service, web): (ChatService, W),
    busy: Arc<AtomicBool>,
    header_timeout: Duration,
) where
    W: Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone + Send + Sync + 'static,
    W::Future: Send,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // A broadcast frame should leave at once, not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    let handler = service_fn(move |req: Request<Body>| {
        let (service, web) = (service.clone(), web.clone());
        let busy = Busy::start(&busy);
        async move {
            let _busy = busy;
            if let Some(group) = websocket_group(req.method(), req.uri().path(), req.headers()) {
                return Ok::<_, Infallible>(upgrade(req, &group, Some(peer), &service));
            }
            let wanted_upgrade = req.headers().contains_key(header::UPGRADE);
            let mut response = web.call(req).await?.map(|b| b.map_err(Into::into).boxed_unsync());
            if wanted_upgrade && response.status() != StatusCode::SWITCHING_PROTOCOLS {
                close_after(&mut response);
            }
            Ok(response)
        }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), handler)
        .with_upgrades()
        .await;
    if let Err(err) = served {
        tracing::debug!(%peer, error = %err, "connection ended with an error");
    }
}

/// The raw group of a well-formed WebSocket upgrade to `/ws/{group}`; `None`
/// sends the request to the framework's routes, which answer everything else
/// (including malformed upgrades).
pub fn websocket_group(method: &Method, path: &str, headers: &HeaderMap) -> Option<String> {
    let group = path
        .strip_prefix("/ws/")
        .filter(|g| !g.is_empty() && !g.contains('/'))?;
    is_websocket_upgrade(method, headers).then(|| group.to_owned())
}

/// Whether a request is a well-formed WebSocket upgrade (RFC 6455 §4.2.1).
pub fn is_websocket_upgrade(method: &Method, headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    method == Method::GET
        && has(header::CONNECTION, "upgrade")
        && has(header::UPGRADE, "websocket")
        && headers.get(header::SEC_WEBSOCKET_VERSION).is_some_and(|v| v == "13")
        && headers.contains_key(header::SEC_WEBSOCKET_KEY)
}

/// Answers an upgrade to `group` on a connection served by hyper with
/// upgrades on (its `OnUpgrade` in the request's extensions, as hyper and
/// `axum::serve` put it): refused before the upgrade as
/// [`ChatService::admit_from`] says, or 101 and the protocol on the
/// upgraded socket. The caller checked [`is_websocket_upgrade`].
pub fn upgrade<T>(
    mut req: Request<T>,
    group: &str,
    peer: Option<SocketAddr>,
    service: &ChatService,
) -> Response<HttpBody> {
    let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let admission = match service.admit_from(group, req.uri().query(), origin) {
        Ok(a) => match peer {
            Some(peer) => a.with_peer(peer),
            None => a,
        },
        Err(refusal) => {
            let mut response = answer(refusal);
            close_after(&mut response);
            return response;
        }
    };
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let service = service.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => crate::serve_upgraded(&service, admission, TokioIo::new(upgraded)).await,
            Err(err) => tracing::debug!(?peer, error = %err, "the upgrade did not complete"),
        }
    });
    let mut response = status(StatusCode::SWITCHING_PROTOCOLS);
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(value) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    response
}

/// Ends the connection after this response. A client that asked for another
/// protocol did not ask for keep-alive: a refused upgrade closes, as
/// tungstenite's handshake did.
fn close_after(response: &mut Response<HttpBody>) {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(cap: usize, grace: Duration) -> Pending {
        Pending {
            cap,
            grace,
            ..Pending::default()
        }
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
        let p = pending(2, Duration::from_millis(20));
        let (_, oldest_evict, oldest_busy) = p.enter();
        let (_, idle_evict, _) = p.enter();
        // The oldest is answering a request: the next oldest goes instead.
        oldest_busy.store(true, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(30)).await;
        tokio::time::timeout(Duration::from_secs(5), p.room())
            .await
            .expect("an idle socket past its grace makes room");
        assert!(told_to_close(&idle_evict).await, "the idle one is closed");
        assert!(!told_to_close(&oldest_evict).await, "the busy one is kept");
        assert_eq!(p.lock().len(), 1);
    }
}
