//! The chat server mounted in an application's own axum `Router` and served
//! by `axum::serve` (not channelbox's accept loop): the WebSocket route, the
//! HTTP API and the application's routes side by side. The protocol itself
//! is tested over both adapters by channelbox-server's suites (run with
//! `CHANNELBOX_HTTP=axum`).

use std::sync::Arc;

use channelbox_protocol::{ChatService, ProtocolConfig};
use channelbox_store_memory::MemoryStore;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

async fn start() -> String {
    let service = ChatService::new(Arc::new(MemoryStore::default()), ProtocolConfig::default());
    let app = axum::Router::new()
        .route("/hello", axum::routing::get(|| async { "hello" }))
        .merge(channelbox_axum::routes(service));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let status = raw[9..12].parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn next_json(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Value {
    loop {
        if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

#[tokio::test]
async fn the_router_serves_websockets_the_api_and_the_application_side_by_side() {
    let addr = start().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/room"))
        .await
        .unwrap();
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    ws.send(Message::text(
        json!({"type": "publish", "data": "hi", "ref": 1}).to_string(),
    ))
    .await
    .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(next_json(&mut ws).await["type"].as_str().unwrap().to_owned());
    }
    seen.sort();
    assert_eq!(seen, ["message", "published"]);

    assert_eq!(get(&addr, "/api/groups").await, (200, r#"{"room":1}"#.to_owned()));
    assert_eq!(get(&addr, "/hello").await, (200, "hello".to_owned()));
    let (status, page) = get(&addr, "/").await;
    assert!(status == 200 && page.contains("/channelbox.js"));
    let (status, body) = get(&addr, "/nowhere").await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).unwrap()["code"].clone()),
        (404, json!("not_found"))
    );
    let (status, _) = get(&addr, "/ws/room").await;
    assert_eq!(status, 400, "a plain GET is not an upgrade");
    let (status, body) = get(&addr, "/ws/bad%20group").await;
    assert_eq!(status, 400, "{body}");
}

/// The routes find `{group}` as the client sent it and the protocol decodes
/// it once: `%2520` is the group `%20`, and a segment that does not decode
/// to UTF-8 is the protocol's `invalid_group`, not axum's own refusal.
#[tokio::test]
async fn groups_in_paths_are_decoded_once_by_the_protocol() {
    let addr = start().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/a%2520b"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["group"], "a%20b");
    let (status, body) = get(&addr, "/api/groups/a%2520b/presence").await;
    assert_eq!(status, 200, "{body}");
    let presence = serde_json::from_str::<Value>(&body).unwrap();
    assert_eq!(presence["group"], "a%20b", "{body}");
    assert_eq!(presence["members"].as_array().map(Vec::len), Some(1), "{body}");
    for path in ["/api/groups/%FF/history", "/api/groups/a%zz/presence"] {
        let (status, body) = get(&addr, path).await;
        let code = serde_json::from_str::<Value>(&body).map(|v| v["code"].clone());
        assert_eq!(
            (status, code.ok()),
            (400, Some(json!("invalid_group"))),
            "{path}: {body}"
        );
    }
}

/// `GET /sse/{group}` under `axum::serve`: the stream's head and its first
/// event, `welcome`, as the protocol renders it.
#[tokio::test]
async fn the_router_serves_event_streams() {
    let addr = start().await;
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!("GET /sse/axum HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the first event's end: its JSON line and the blank line.
    while !String::from_utf8_lossy(&raw).contains("}\n\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("content-type: text/event-stream"), "{text}");
    // `welcome` carries the group's position at join as its id.
    assert!(text.contains("event: welcome\nid: "), "{text}");
    assert!(text.contains("\ndata: {\"channel_id\""), "{text}");
}
