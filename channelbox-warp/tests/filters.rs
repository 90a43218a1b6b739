//! The warp filters on their own, served in-process: the upgrade filter runs the
//! protocol (the chat example upgrades through tokio-tungstenite instead), and
//! oversized messages are recognised through warp's error type.

// The test support of channelbox-server's suites (a WebSocket client and an
// HTTP client), shared rather than copied.
#[path = "../../channelbox-server/tests/support/mod.rs"]
mod support;

use std::sync::Arc;

use channelbox_protocol::{ChatService, ProtocolConfig};
use channelbox_store_memory::MemoryStore;
use serde_json::json;
use support::{get, Client};

async fn serve(config: ProtocolConfig) -> String {
    let service = ChatService::new(Arc::new(MemoryStore::default()), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(warp::serve(channelbox_warp::routes(service)).incoming(listener).run());
    addr
}

#[tokio::test]
async fn the_warp_upgrade_filter_runs_the_protocol() {
    let addr = serve(ProtocolConfig {
        max_message_bytes: 1000,
        ..ProtocolConfig::default()
    })
    .await;
    let (mut a, welcome) = Client::join(&format!("ws://{addr}/ws/warp")).await;
    assert_eq!(welcome["group"], "warp");
    let (p, m) = a.publish(json!({"data": {"x": 1}}), "1").await;
    assert_eq!((p["offset"].as_u64(), m["data"]["x"].as_u64()), (Some(1), Some(1)));
    assert_eq!(get(&addr, "/api/groups").await.json(), json!({"warp": 1}));
    a.send(json!({"type": "publish", "data": "x".repeat(5000)})).await;
    assert_eq!(a.recv().await["code"], "too_large");
    assert_eq!(a.closed().await, Some(1009));
}
