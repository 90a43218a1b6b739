//! Streams of server-sent events (`GET /sse/{group}`) on hyper: the checks
//! and the `200` answer every adapter sends alike, and what the accept loop
//! does with a connection that streams — it no longer counts as pending
//! (it is as settled as an upgraded WebSocket), and once its channel has
//! closed it gets [`STREAM_GRACE`] to take the rest (the `close` event),
//! then it is dropped, so that a client that stopped reading cannot hold
//! its socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use channelbox_protocol::{Admission, ChatService, EventStream, EventsEnd, HttpAnswer, EVENT_STREAM_HEADERS};
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use tokio::sync::Notify;

use super::pending::Pending;
use super::{admit, answer, HttpBody, Shown};

/// How long a stream's connection stays once its channel closed: as long as
/// a WebSocket's TCP connection may outlive its close.
pub const STREAM_GRACE: Duration = Duration::from_secs(10);

/// The peer's address, which the accept loop puts in every request's
/// extensions for the framework's routes (an event stream's connect hook
/// names it as `remote_addr`).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// `GET /sse/{group}` on any framework whose requests are `http` requests:
/// refused as an upgrade would be (400, 401, 403, 503, with the connect
/// hook), or `200` and the stream of events. `group` is the raw segment.
pub async fn events<T>(req: Request<T>, group: &str, service: &ChatService) -> Response<HttpBody> {
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
    let shown = Shown::of(&req).for_events(req.headers());
    // Not held across the wait: some frameworks' bodies are not `Sync`.
    drop(req);
    match admit(shown, group, peer, service).await {
        Ok(admission) => event_response(service.events(admission)),
        Err(refusal) => answer(refusal),
    }
}

/// The admission of a stream of events from a request's parts, for adapters
/// that build the response themselves ([`ChatService::events`] then gives
/// its body).
pub async fn admit_events(
    group: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    service: &ChatService,
) -> Result<Admission, HttpAnswer> {
    admit(
        Shown::from_parts(query, headers).for_events(headers),
        group,
        peer,
        service,
    )
    .await
}

/// The `200` answer of an admitted stream: its headers, the events as the
/// body, and its [`EventsEnd`] in the extensions for the accept loop.
pub fn event_response(stream: EventStream) -> Response<HttpBody> {
    let end = stream.end();
    let body = StreamBody::new(stream.map(|chunk| chunk.map(hyper::body::Frame::data)));
    let mut response = Response::new(body.map_err(|never| match never {}).boxed_unsync());
    for (name, value) in EVENT_STREAM_HEADERS {
        response
            .headers_mut()
            .insert(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    response.extensions_mut().insert(end);
    response
}

/// A connection's place among the pending ones, so that a stream can leave
/// it and drop the connection later.
#[derive(Clone)]
pub(super) struct Entry {
    pub(super) pending: Arc<Pending>,
    pub(super) id: u64,
    /// Ends the connection once its stream is over.
    pub(super) evicted: Arc<Notify>,
}

impl Entry {
    /// The connection answered a request with a stream of events.
    pub(super) fn streaming(&self, end: EventsEnd) {
        self.pending.leave(self.id);
        let evicted = self.evicted.clone();
        tokio::spawn(async move {
            end.closed().await;
            tokio::time::sleep(STREAM_GRACE).await;
            evicted.notify_one();
        });
    }
}
