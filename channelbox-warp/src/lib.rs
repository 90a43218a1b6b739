//! # channelbox-warp
//!
//! The warp adapter: filters that upgrade `GET /ws/{group}` and attach the socket
//! to a [`ChatService`] (and so to its `ChannelBox`), the stream of
//! server-sent events `GET /sse/{group}`, the HTTP API of docs/protocol.md,
//! `/metrics`, `/healthz` and the browser page. The protocol logic itself lives in
//! `channelbox-protocol`, shared with the tokio-tungstenite transport; this crate
//! only routes and converts warp's types at the edge.
//!
//! ```no_run
//! use std::sync::Arc;
//! use channelbox_protocol::{ChatService, ProtocolConfig};
//! use channelbox_store_memory::MemoryStore;
//!
//! # async fn demo() -> std::io::Result<()> {
//! let service = ChatService::new(Arc::new(MemoryStore::default()), ProtocolConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! warp::serve(channelbox_warp::routes(service)).incoming(listener).run().await;
//! # Ok(()) }
//! ```
//!
//! The `chat` example is the runnable chat server of docs/protocol.md.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use std::convert::Infallible;
use std::error::Error as _;

use async_trait::async_trait;
use channelbox_core::{Channel, CloseReason, Frame, FrameKind, FrameSink, SinkError};
use channelbox_protocol::{ChatService, GroupEndpoint, HttpAnswer, Incoming, EVENT_STREAM_HEADERS};
use channelbox_ws::server::PeerAddr;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Error as WsError;
use warp::http::StatusCode;
use warp::ws::{Message, WebSocket};
use warp::{Filter, Rejection, Reply};

pub use channelbox_ws::server::{listen, raise_open_file_limit, ServerConfig};

/// Serves the chat server on `listener` until the future is dropped:
/// [`channelbox_ws::server::serve`] (hyper with deadlines, WebSocket upgrades
/// to `/ws/{group}`) with [`routes`] for everything else.
pub async fn serve(listener: tokio::net::TcpListener, service: ChatService, config: ServerConfig) {
    let web = warp::service(routes(service.clone()));
    channelbox_ws::server::serve(listener, service, config, web).await
}

/// The browser chat page, embedded in the binary.
pub use channelbox_protocol::page::CHAT_PAGE;

struct WarpSink {
    sink: SplitSink<WebSocket, Message>,
}

fn to_message(frame: &Frame) -> Message {
    match (frame.kind(), frame.as_text()) {
        (FrameKind::Text, Some(text)) => Message::text(text),
        (FrameKind::Ping, _) => Message::ping(frame.data().to_vec()),
        _ => Message::binary(frame.data().clone()),
    }
}

#[async_trait]
impl FrameSink for WarpSink {
    async fn send(&mut self, frames: &[Frame]) -> Result<(), SinkError> {
        for frame in frames {
            self.sink.feed(to_message(frame)).await.map_err(SinkError::new)?;
        }
        self.sink.flush().await.map_err(SinkError::new)
    }

    async fn close(&mut self, reason: &CloseReason) -> Result<(), SinkError> {
        let msg = Message::close_with(reason.code, reason.reason.clone());
        self.sink.send(msg).await.map_err(SinkError::new)?;
        self.sink.close().await.map_err(SinkError::new)
    }
}

/// What a warp read result means to the protocol.
fn incoming_from(item: Result<Message, warp::Error>) -> Incoming {
    match item {
        Ok(m) if m.is_text() => match m.to_str() {
            Ok(t) => Incoming::Text(t.to_owned()),
            Err(()) => Incoming::InvalidUtf8,
        },
        Ok(m) if m.is_binary() => Incoming::Binary(m.into_bytes()),
        Ok(m) if m.is_close() => Incoming::Close,
        Ok(m) if m.is_pong() => Incoming::Pong,
        Ok(_) => Incoming::Ping,
        Err(err) => match err.source().and_then(|s| s.downcast_ref::<WsError>()) {
            Some(WsError::Capacity(_)) => Incoming::TooLarge,
            Some(WsError::Utf8(_)) => Incoming::InvalidUtf8,
            _ => Incoming::Failed,
        },
    }
}

/// A client's frames, ending after the first close, failure or refusal.
fn incoming(stream: SplitStream<WebSocket>) -> impl Stream<Item = Incoming> + Unpin + Send {
    let mut done = false;
    Box::pin(stream.map(incoming_from).take_while(move |i| {
        let go = !done;
        done = i.is_final();
        std::future::ready(go)
    }))
}

/// A protocol answer as warp's response: its status, content type and body.
fn answer(a: HttpAnswer) -> warp::reply::Response {
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    warp::reply::with_status(warp::reply::with_header(a.body, "content-type", a.content_type), status).into_response()
}

fn with_service(service: ChatService) -> impl Filter<Extract = (ChatService,), Error = Infallible> + Clone {
    warp::any().map(move || service.clone())
}

fn optional_query() -> impl Filter<Extract = (Option<String>,), Error = Infallible> + Clone {
    warp::query::raw().map(Some).or(warp::any().map(|| None)).unify()
}

fn authorization() -> impl Filter<Extract = (Option<String>,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
}

/// The raw group segment after `/ws/` or `/sse/`, by the protocol's one
/// parser ([`channelbox_protocol::group_segment`]); anything else is not found.
fn group_segment() -> impl Filter<Extract = (String,), Error = Rejection> + Clone {
    warp::path::tail().and_then(|tail: warp::path::Tail| async move {
        channelbox_protocol::group_segment(tail.as_str())
            .map(str::to_owned)
            .ok_or_else(warp::reject::not_found)
    })
}

/// `GET /ws/{group}`: checks the group, origin, token and query, then asks
/// the connect hook (when there is one), before the upgrade; then runs the
/// protocol on the socket.
pub fn ws_route(service: ChatService) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    warp::path(GroupEndpoint::WebSocket.segment())
        .and(group_segment())
        .and(warp::get())
        .and(optional_query())
        .and(warp::header::headers_cloned())
        .and(warp::addr::remote())
        .and(warp::ws())
        .and(with_service(service))
        .then(
            |group: String,
             query: Option<String>,
             headers: warp::http::HeaderMap,
             peer: Option<std::net::SocketAddr>,
             ws: warp::ws::Ws,
             service: ChatService| async move {
                let admission = match admit(&service, &group, query.as_deref(), &headers, peer).await {
                    Ok(a) => a,
                    Err(refusal) => return answer(refusal),
                };
                limited(ws, &service)
                    .on_upgrade(move |socket| async move {
                        let (sink, stream) = socket.split();
                        let channel =
                            Channel::open_with_id(admission.channel_id(), service.channel_config(), WarpSink { sink });
                        service.run(admission, channel, incoming(stream)).await;
                    })
                    .into_response()
            },
        )
}

/// `GET /sse/{group}`: checks the group, origin, token, query and
/// `Last-Event-ID`, then asks the connect hook (when there is one), before
/// answering; then the stream of server-sent events.
pub fn sse_route(service: ChatService) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    warp::path(GroupEndpoint::Events.segment())
        .and(group_segment())
        .and(warp::get())
        .and(optional_query())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<PeerAddr>())
        .and(with_service(service))
        .then(
            |group: String,
             query: Option<String>,
             headers: warp::http::HeaderMap,
             peer: Option<PeerAddr>,
             service: ChatService| async move {
                let peer = peer.map(|p| p.0);
                match channelbox_ws::server::admit_events(&group, query.as_deref(), &headers, peer, &service).await {
                    Ok(admission) => {
                        let stream = service.events(admission);
                        let end = stream.end();
                        let mut response = warp::reply::stream(stream).into_response();
                        for (name, value) in EVENT_STREAM_HEADERS {
                            response
                                .headers_mut()
                                .insert(name, warp::http::HeaderValue::from_static(value));
                        }
                        response.extensions_mut().insert(end);
                        response
                    }
                    Err(refusal) => answer(refusal),
                }
            },
        )
}

/// The accept loop's WebSocket limits ([`channelbox_ws::service_websocket_config`])
/// on warp's upgrade. warp cannot set tungstenite's write buffer, which stays
/// at its default size, so the bound on that buffer keeps the same headroom
/// above it: a client that sends pings and never reads is closed once its
/// pongs fill the headroom, instead of piling them up without limit.
fn limited(ws: warp::ws::Ws, service: &ChatService) -> warp::ws::Ws {
    let shared = channelbox_ws::service_websocket_config(service);
    let headroom = shared.max_write_buffer_size.saturating_sub(shared.write_buffer_size);
    let buffer = WebSocketConfig::default().write_buffer_size;
    let mut ws = ws.max_write_buffer_size(buffer + headroom);
    if let Some(max) = shared.max_message_size {
        ws = ws.max_message_size(max);
    }
    if let Some(max) = shared.max_frame_size {
        ws = ws.max_frame_size(max);
    }
    ws
}

/// The upgrade's admission: the protocol's checks, then the connect hook.
async fn admit(
    service: &ChatService,
    group: &str,
    query: Option<&str>,
    headers: &warp::http::HeaderMap,
    peer: Option<std::net::SocketAddr>,
) -> Result<channelbox_protocol::Admission, HttpAnswer> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let admission = service.admit_from(group, query, text("origin"))?;
    let admission = match peer {
        Some(peer) => admission.with_peer(peer),
        None => admission,
    };
    let request = channelbox_protocol::UpgradeRequest {
        query,
        origin: text("origin"),
        user_agent: text("user-agent"),
        cookie: text("cookie"),
        authorization: text("authorization"),
    };
    service.connect_hook(admission, request).await
}

/// The HTTP API: `/api/groups`, history, backend publish and the admin endpoints.
pub fn api_routes(service: ChatService) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    let groups = warp::path!("api" / "groups")
        .and(warp::get())
        .and(authorization())
        .and(with_service(service.clone()))
        .then(|auth: Option<String>, s: ChatService| async move { answer(s.api_groups(auth.as_deref()).await) });
    let history = warp::path!("api" / "groups" / String / "history")
        .and(warp::get())
        .and(optional_query())
        .and(authorization())
        .and(with_service(service.clone()))
        .then(
            |g: String, q: Option<String>, auth: Option<String>, s: ChatService| async move {
                answer(s.api_history(&g, q.as_deref(), auth.as_deref()).await)
            },
        );
    let presence = warp::path!("api" / "groups" / String / "presence")
        .and(warp::get())
        .and(authorization())
        .and(with_service(service.clone()))
        .then(|g: String, auth: Option<String>, s: ChatService| async move {
            answer(s.api_presence(&g, auth.as_deref()).await)
        });
    let publish = warp::path!("api" / "groups" / String / "messages")
        .and(warp::post())
        .and(authorization())
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::header::optional::<u64>("content-length"))
        .and(with_service(service.clone()))
        .and(warp::body::stream())
        .then(
            |g: String, auth: Option<String>, kind: Option<String>, length: Option<u64>, s: ChatService, body| async move {
                // Checked before a byte of the body is read.
                match s.api_publish_check(&g, auth.as_deref(), kind.as_deref(), length) {
                    Ok(ticket) => answer(s.api_publish_stream(ticket, body).await),
                    Err(refusal) => answer(refusal),
                }
            },
        );
    let close_all = warp::path!("api" / "admin" / "close-all")
        .and(warp::post())
        .and(authorization())
        .and(with_service(service.clone()))
        .then(|auth: Option<String>, s: ChatService| async move { answer(s.api_close_all(auth.as_deref()).await) });
    let flush = warp::path!("api" / "admin" / "history")
        .and(warp::delete())
        .and(optional_query())
        .and(authorization())
        .and(with_service(service.clone()))
        .then(|q: Option<String>, auth: Option<String>, s: ChatService| async move {
            answer(s.api_flush_history(q.as_deref(), auth.as_deref()).await)
        });
    let namespaces = warp::path!("api" / "namespaces")
        .and(warp::get())
        .and(authorization())
        .and(with_service(service))
        .map(|auth: Option<String>, s: ChatService| answer(s.api_namespaces(auth.as_deref())));
    groups
        .or(namespaces)
        .unify()
        .or(history)
        .unify()
        .or(presence)
        .unify()
        .or(publish)
        .unify()
        .or(close_all)
        .unify()
        .or(flush)
        .unify()
}

/// `GET /healthz`, `GET /metrics`, the page at `GET /` and the admin page at
/// `GET /admin`.
pub fn site_routes(service: ChatService) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    let page = warp::path::end()
        .and(warp::get())
        .map(|| warp::reply::html(CHAT_PAGE).into_response())
        .or(warp::path!("channelbox.js").and(warp::get()).map(|| {
            let js = channelbox_protocol::page::CLIENT_JS;
            warp::reply::with_header(js, "content-type", "text/javascript; charset=utf-8").into_response()
        }))
        .unify();
    let admin = warp::path!("admin")
        .and(warp::get())
        .and(with_service(service.clone()))
        .and_then(|s: ChatService| async move {
            match channelbox_protocol::page::admin_page(s.config()) {
                Some(page) => Ok(warp::reply::html(page).into_response()),
                None => Err(warp::reject::not_found()),
            }
        });
    let page = page.or(admin).unify();
    let health = warp::path!("healthz")
        .and(warp::get())
        .and(with_service(service.clone()))
        .map(|s: ChatService| answer(s.health()));
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_service(service))
        .then(|s: ChatService| async move { answer(s.metrics().await) });
    page.or(health).unify().or(metrics).unify()
}

/// Every route of the chat server, with JSON answers for unknown paths and
/// methods.
pub fn routes(service: ChatService) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone {
    ws_route(service.clone())
        .or(sse_route(service.clone()))
        .unify()
        .or(api_routes(service.clone()))
        .unify()
        .or(site_routes(service))
        .unify()
        .recover(|rejection: Rejection| async move { Ok::<_, Infallible>(answer(rejected(&rejection))) })
        .unify()
}

fn rejected(r: &Rejection) -> HttpAnswer {
    if r.is_not_found() {
        HttpAnswer::not_found()
    } else if r.find::<warp::reject::MethodNotAllowed>().is_some() {
        HttpAnswer::method_not_allowed()
    } else if r.find::<warp::reject::PayloadTooLarge>().is_some() {
        HttpAnswer::error(413, "too_large", "the body is too large")
    } else {
        // warp's rejection text is Rust `Debug` output: logged, not sent.
        tracing::debug!(rejection = ?r, "request rejected");
        HttpAnswer::error(400, "bad_request", "the request is malformed")
    }
}
