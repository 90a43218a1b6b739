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
use support::raw::client_frame;
use support::{get, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// warp's upgrade bounds tungstenite's write buffer as the accept loop does.
/// A client floods pings and never reads: past the bound tungstenite keeps
/// only the newest pong instead of piling every one up in the server's
/// memory, so once the client reads it gets far fewer pongs than it sent pings.
#[tokio::test]
async fn pongs_to_a_client_that_never_reads_are_bounded() {
    let addr = serve(ProtocolConfig {
        max_message_bytes: 1000,
        queue_bytes: 4096,
        ..ProtocolConfig::default()
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // A small, fixed receive buffer: what the kernel holds for the client
    // is then bounded by the server's send buffer (4 MiB at most) alone.
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let s = socket.connect(addr.parse().unwrap()).await.unwrap();
    let (mut s, status) = upgrade_on(s, &addr, "/ws/flood").await;
    assert_eq!(status, 101);
    // 100,000 pings ask for 12.7 MB of pongs.
    const PINGS: usize = 100_000;
    let batch: Vec<u8> = (0..10_000).flat_map(|_| client_frame(0x9, &[b'p'; 125])).collect();
    for _ in 0..PINGS / 10_000 {
        s.write_all(&batch).await.unwrap();
    }
    s.write_all(&client_frame(0x9, b"last")).await.unwrap();
    let mut pongs = 0;
    loop {
        let (opcode, payload) = server_frame(&mut s).await;
        if opcode == 0xA && payload == b"last" {
            break;
        }
        pongs += usize::from(opcode == 0xA);
    }
    assert!(
        pongs < PINGS / 2,
        "{pongs} pongs of {PINGS} were kept for a client that did not read"
    );
}

/// The upgrade of `support::raw::upgrade`, on a socket set up by the caller.
async fn upgrade_on(mut s: tokio::net::TcpStream, addr: &str, path: &str) -> (tokio::net::TcpStream, u16) {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    let text = String::from_utf8_lossy(&head);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (s, status)
}

/// One unmasked frame from the server: its opcode and payload.
async fn server_frame(s: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    let opcode = s.read_u8().await.unwrap() & 0x0f;
    let len = match s.read_u8().await.unwrap() & 0x7f {
        126 => u64::from(s.read_u16().await.unwrap()),
        127 => s.read_u64().await.unwrap(),
        n => u64::from(n),
    };
    let mut payload = vec![0; usize::try_from(len).unwrap()];
    s.read_exact(&mut payload).await.unwrap();
    (opcode, payload)
}

/// warp's own upgrade filter finds the group with the protocol's parser:
/// the raw segment, percent-decoded once, judged by the group rules.
#[tokio::test]
async fn the_warp_upgrade_filter_parses_groups_like_every_adapter() {
    let addr = serve(ProtocolConfig::default()).await;
    // warp keeps the connection open after a refusal: only the head is read.
    for (path, status) in [("/ws/a%20b", 400), ("/ws/a%zz", 400), ("/ws/", 404), ("/ws/a/b", 404)] {
        assert_eq!(support::raw::upgrade(&addr, path, &[]).await.1, status, "{path}");
    }
    let (_c, welcome) = Client::join(&format!("ws://{addr}/ws/a%2520b")).await;
    assert_eq!(welcome["group"], "a%20b", "decoded once");
    let (_c, welcome) = Client::join(&format!("ws://{addr}/ws/caf%C3%A9")).await;
    assert_eq!(welcome["group"], "café");
}

/// warp's own server (no accept loop): the event-stream filter streams the
/// protocol's events, and the channel leaves its group when the client goes.
#[tokio::test]
async fn the_warp_event_stream_filter_streams_the_protocol() {
    let addr = serve(ProtocolConfig::default()).await;
    let mut sse = support::sse::Sse::open(&addr, "/sse/warp", &[]).await;
    assert_eq!(sse.header("content-type").as_deref(), Some("text/event-stream"));
    let welcome = sse.event().await;
    assert_eq!(welcome.event.as_deref(), Some("welcome"));
    let epoch = welcome.json()["epoch"].as_str().unwrap().to_owned();
    let published = support::http(&addr, "POST", "/api/groups/warp/messages", &[], b"{\"n\":1}").await;
    assert_eq!(published.status, 200);
    let message = sse.event().await;
    assert_eq!(message.id, Some(format!("{epoch}:1")));
    assert_eq!(message.json()["data"], json!({"n": 1}));
    drop(sse);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while get(&addr, "/api/groups").await.json() != json!({}) {
        assert!(std::time::Instant::now() < deadline, "the stream's channel never left");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
