//! # channelbox-axum
//!
//! The axum adapter: [`routes`] is an axum [`Router`] with the whole chat
//! server of docs/protocol.md — the WebSocket route `GET /ws/{group}`, the
//! stream of server-sent events `GET /sse/{group}`, the HTTP API, `/healthz`, `/metrics` and the browser page — over a
//! [`ChatService`]. Merge it into your application's router, or run it alone
//! with [`serve`] (the shared accept loop: request-head deadline, bounded
//! pending connections). The protocol lives in `channelbox-protocol` and the
//! WebSocket transport in `channelbox-ws`; this crate only routes.
//!
//! ```no_run
//! use std::sync::Arc;
//! use channelbox_protocol::{ChatService, ProtocolConfig};
//! use channelbox_store_memory::MemoryStore;
//!
//! # async fn demo() -> std::io::Result<()> {
//! let service = ChatService::new(Arc::new(MemoryStore::default()), ProtocolConfig::default());
//! let app = axum::Router::new()
//!     .route("/hello", axum::routing::get(|| async { "hello" }))
//!     .merge(channelbox_axum::routes(service));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use axum::body::Body;
use axum::extract::{FromRequestParts, MatchedPath, OriginalUri, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use channelbox_protocol::page::{ADMIN_PATH, CHAT_PAGE, CLIENT_JS, CLIENT_JS_PATH};
use channelbox_protocol::{group_segment, ChatService, HttpAnswer};
use channelbox_ws::server::{self as shared, ServerConfig};

/// Serves the chat server on `listener` until the future is dropped:
/// [`channelbox_ws::server::serve`] with [`routes`] for everything but the
/// WebSocket upgrades it answers itself.
pub async fn serve(listener: tokio::net::TcpListener, service: ChatService, config: ServerConfig) {
    shared::serve(listener, service.clone(), config, routes(service)).await
}

/// Every route of the chat server, with JSON answers for unknown paths and
/// methods.
pub fn routes(service: ChatService) -> Router {
    Router::new()
        .route("/ws/{group}", get(websocket))
        .route("/sse/{group}", get(events))
        .route("/api/groups", get(groups))
        .route("/api/namespaces", get(namespaces))
        .route("/api/groups/{group}/history", get(history))
        .route("/api/groups/{group}/presence", get(presence))
        .route("/api/groups/{group}/messages", post(publish))
        .route("/api/admin/close-all", post(close_all))
        .route("/api/admin/history", delete(flush))
        .route("/", get(|| async { axum::response::Html(CHAT_PAGE) }))
        .route(CLIENT_JS_PATH, get(client_js))
        .route(ADMIN_PATH, get(admin_page))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { answer(HttpAnswer::not_found()) })
        .method_not_allowed_fallback(|| async { answer(HttpAnswer::method_not_allowed()) })
        .with_state(service)
}

fn answer(a: HttpAnswer) -> Response {
    shared::answer(a).map(Body::new)
}

/// The `{group}` segment of the matched route, as the client sent it (still
/// percent-encoded): the protocol's group rules judge the raw segment, on
/// every adapter alike. axum's `Path` would decode it first, so `%2520` would
/// be decoded twice and a malformed escape or bytes that are not UTF-8 would
/// get axum's own answer rather than `invalid_group`; this extractor finds
/// the segment by the route's `{group}` instead.
struct RawGroup(String);

impl<S: Send + Sync> FromRequestParts<S> for RawGroup {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        let uri = parts.extensions.get::<OriginalUri>().map_or(&parts.uri, |o| &o.0);
        let route = parts.extensions.get::<MatchedPath>().map_or("", MatchedPath::as_str);
        route
            .split('/')
            .position(|s| s == "{group}")
            .and_then(|n| uri.path().split('/').nth(n))
            .and_then(group_segment)
            .map(|g| RawGroup(g.to_owned()))
            .ok_or_else(|| answer(HttpAnswer::not_found()))
    }
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

/// `GET /ws/{group}`: checked before the upgrade, then the protocol on the
/// upgraded socket.
async fn websocket(State(service): State<ChatService>, RawGroup(group): RawGroup, req: Request) -> Response {
    if !shared::is_websocket_upgrade(req.method(), req.headers()) {
        return answer(HttpAnswer::error(400, "bad_request", "expected a WebSocket upgrade"));
    }
    shared::upgrade(req, &group, None, &service).await.map(Body::new)
}

/// `GET /sse/{group}`: checked as an upgrade, then the stream of events.
async fn events(State(service): State<ChatService>, RawGroup(group): RawGroup, req: Request) -> Response {
    shared::events(req, &group, &service).await.map(Body::new)
}

/// `GET /admin`: the admin page, or 404 without an admin token.
async fn admin_page(State(s): State<ChatService>) -> Response {
    match channelbox_protocol::page::admin_page(s.config()) {
        Some(page) => axum::response::Html(page).into_response(),
        None => answer(HttpAnswer::not_found()),
    }
}

async fn namespaces(State(s): State<ChatService>, headers: HeaderMap) -> Response {
    answer(s.api_namespaces(authorization(&headers)))
}

async fn groups(State(s): State<ChatService>, headers: HeaderMap) -> Response {
    answer(s.api_groups(authorization(&headers)).await)
}

async fn history(
    State(s): State<ChatService>,
    RawGroup(group): RawGroup,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    answer(s.api_history(&group, query.as_deref(), authorization(&headers)).await)
}

async fn presence(State(s): State<ChatService>, RawGroup(group): RawGroup, headers: HeaderMap) -> Response {
    answer(s.api_presence(&group, authorization(&headers)).await)
}

async fn publish(State(s): State<ChatService>, RawGroup(group): RawGroup, headers: HeaderMap, body: Body) -> Response {
    let kind = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    // Checked before a byte of the body is read.
    match s.api_publish_check(&group, authorization(&headers), kind, length) {
        Ok(ticket) => answer(s.api_publish_stream(ticket, body.into_data_stream()).await),
        Err(refusal) => answer(refusal),
    }
}

async fn close_all(State(s): State<ChatService>, headers: HeaderMap) -> Response {
    answer(s.api_close_all(authorization(&headers)).await)
}

async fn flush(State(s): State<ChatService>, RawQuery(query): RawQuery, headers: HeaderMap) -> Response {
    answer(s.api_flush_history(query.as_deref(), authorization(&headers)).await)
}

async fn client_js() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], CLIENT_JS).into_response()
}

async fn health(State(s): State<ChatService>) -> Response {
    answer(s.health())
}

async fn metrics(State(s): State<ChatService>) -> Response {
    answer(s.metrics().await)
}
