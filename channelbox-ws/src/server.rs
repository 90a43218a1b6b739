//! The chat server's accept loop, as a library function shared by the web
//! framework adapters (feature `server`): every connection is served by
//! hyper with its header-read timeout on; WebSocket upgrades to
//! `/ws/{group}` are answered here (hyper's upgrade, then tokio-tungstenite
//! on the upgraded socket with the transport's small buffers), every other
//! request by the framework's routes — warp's or axum's, any tower service.
//! A route that answers with a stream of server-sent events (`/sse/{group}`,
//! built by [`events`] or [`event_response`]) is seen here by its
//! [`channelbox_protocol::EventsEnd`]: its connection leaves the pending
//! ones, and is dropped [`STREAM_GRACE`] after its channel closed.
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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use channelbox_protocol::{ChatService, GroupEndpoint, GroupPath, HttpAnswer};
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

mod events;
mod pending;
pub use events::{admit_events, event_response, events, PeerAddr, STREAM_GRACE};
use pending::{Busy, Pending, Watch, Watched};

/// An error of a response body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response [`serve`] writes: the framework's, boxed.
pub type HttpBody = UnsyncBoxBody<Bytes, BoxError>;

/// A response body of these bytes.
pub fn full(bytes: impl Into<Bytes>) -> HttpBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// A protocol answer as an HTTP response: its status, content type and body.
pub fn answer(a: HttpAnswer) -> Response<HttpBody> {
    let mut response = Response::new(full(a.body));
    *response.status_mut() = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(a.content_type));
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
    /// younger connections are never closed to make room. The default, 1 s,
    /// lets a request whose first segment was lost arrive by retransmission
    /// (TCP's retransmission timeout is about three round trips after the
    /// handshake: 1 s at 330 ms), and a client process briefly starved of
    /// CPU send its request late.
    pub pending_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_timeout: Duration::from_secs(10),
            backlog: 4096,
            max_pending: 1024,
            pending_grace: Duration::from_secs(1),
        }
    }
}

impl ServerConfig {
    /// The defaults, with `max_pending` a quarter of the process's
    /// open-file limit (at least 16, at most 16,384): pending connections
    /// always leave room for WebSocket clients and the store, and a crowd
    /// connecting at once (10,000 after a restart) fits when the limit
    /// allows it, instead of waiting on a bound of 1,024.
    pub fn for_open_files(limit: u64) -> Self {
        let quarter = usize::try_from(limit / 4).unwrap_or(usize::MAX);
        ServerConfig {
            max_pending: quarter.clamp(16, 16_384),
            ..ServerConfig::default()
        }
    }
}

/// Raises the soft limit on open files to the hard limit; returns the limit
/// now in force. A server holds a descriptor per connection, and the soft
/// limit is often 1,024 where the hard one allows far more.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
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
    let pending = Arc::new(Pending::new(config.max_pending.max(1), config.pending_grace));
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
        let (id, watch) = pending.enter();
        // Ends the connection once its stream of events is over.
        let evicted = Arc::new(Notify::new());
        let entry = events::Entry {
            pending: pending.clone(),
            id,
            evicted: evicted.clone(),
        };
        let connection = serve_connection(
            stream,
            peer,
            (service.clone(), web.clone()),
            (watch, entry),
            config.header_timeout,
        );
        let pending = pending.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = connection => {}
                () = evicted.notified() => {
                    tracing::debug!(%peer, "closed: an event stream past its end");
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
    (watch, entry): (Arc<Watch>, events::Entry),
    header_timeout: Duration,
) where
    W: Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone + Send + Sync + 'static,
    W::Future: Send,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // A broadcast frame should leave at once, not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    let stream = Watched {
        stream,
        watch: Some(watch.clone()),
    };
    let handler = service_fn(move |mut req: Request<Body>| {
        let (service, web, entry) = (service.clone(), web.clone(), entry.clone());
        let busy = Busy::start(&watch);
        async move {
            if let Some(group) = websocket_group(req.method(), req.uri().path(), req.headers()) {
                let response = upgrade(req, &group, Some(peer), &service).await;
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    busy.upgraded();
                }
                return Ok::<_, Infallible>(response);
            }
            let _busy = busy;
            req.extensions_mut().insert(PeerAddr(peer));
            let wanted_upgrade = req.headers().contains_key(header::UPGRADE);
            let mut response = web.call(req).await?.map(|b| b.map_err(Into::into).boxed_unsync());
            if wanted_upgrade && response.status() != StatusCode::SWITCHING_PROTOCOLS {
                close_after(&mut response);
            }
            if let Some(end) = response.extensions_mut().remove::<channelbox_protocol::EventsEnd>() {
                entry.streaming(end);
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
    let group = GroupPath::parse(path).filter(|p| p.endpoint == GroupEndpoint::WebSocket)?;
    is_websocket_upgrade(method, headers).then(|| group.raw_group.to_owned())
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
pub async fn upgrade<T>(
    mut req: Request<T>,
    group: &str,
    peer: Option<SocketAddr>,
    service: &ChatService,
) -> Response<HttpBody> {
    let admission = match admit(Shown::of(&req), group, peer, service).await {
        Ok(a) => a,
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
    let deflate = if service.config().compression {
        let offers = req.headers().get_all(header::SEC_WEBSOCKET_EXTENSIONS);
        crate::deflate::negotiate(offers.iter().filter_map(|v| v.to_str().ok()))
    } else {
        None
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let service = service.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => crate::serve_upgraded_with(&service, admission, TokioIo::new(upgraded), deflate).await,
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
    if let Some(agreed) = deflate {
        headers.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static(agreed.response()),
        );
    }
    response
}

/// What an upgrade request shows the admission and the connect hook, copied
/// out of the request so that no borrow of it is held across the hook's wait
/// (some frameworks' bodies are not `Sync`).
#[derive(Default)]
struct Shown {
    query: Option<String>,
    origin: Option<String>,
    user_agent: Option<String>,
    cookie: Option<String>,
    authorization: Option<String>,
    /// `Some` for a stream of events, with its `Last-Event-ID` header.
    events: Option<Option<String>>,
}

impl Shown {
    fn of<T>(req: &Request<T>) -> Shown {
        Shown::from_parts(req.uri().query(), req.headers())
    }

    fn from_parts(query: Option<&str>, headers: &HeaderMap) -> Shown {
        let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        Shown {
            query: query.map(str::to_owned),
            origin: text(header::ORIGIN),
            user_agent: text(header::USER_AGENT),
            cookie: text(header::COOKIE),
            authorization: text(header::AUTHORIZATION),
            events: None,
        }
    }

    /// The same, for a stream of events.
    fn for_events(mut self, headers: &HeaderMap) -> Shown {
        let id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
        self.events = Some(id.map(str::to_owned));
        self
    }
}

/// The upgrade's (or event stream's) admission: [`ChatService::admit_from`]
/// (or [`ChatService::admit_events`]), then the connect hook (when there is
/// one) with the request's query and headers.
async fn admit(
    shown: Shown,
    group: &str,
    peer: Option<SocketAddr>,
    service: &ChatService,
) -> Result<channelbox_protocol::Admission, HttpAnswer> {
    let (query, origin) = (shown.query.as_deref(), shown.origin.as_deref());
    let admission = match &shown.events {
        Some(id) => service.admit_events(group, query, origin, id.as_deref())?,
        None => service.admit_from(group, query, origin)?,
    };
    let admission = match peer {
        Some(peer) => admission.with_peer(peer),
        None => admission,
    };
    let request = channelbox_protocol::UpgradeRequest {
        query: shown.query.as_deref(),
        origin: shown.origin.as_deref(),
        user_agent: shown.user_agent.as_deref(),
        cookie: shown.cookie.as_deref(),
        authorization: shown.authorization.as_deref(),
    };
    service.connect_hook(admission, request).await
}

/// Ends the connection after this response. A client that asked for another
/// protocol did not ask for keep-alive: a refused upgrade closes, as
/// tungstenite's handshake did.
fn close_after(response: &mut Response<HttpBody>) {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}
