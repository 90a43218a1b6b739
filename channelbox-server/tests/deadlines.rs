//! Deadlines before the upgrade, over real sockets against the chat server:
//! connections that send a partial request head, or nothing at all, cost the
//! server no CPU while they wait, do not keep a well-behaved client out, and
//! are closed once the 10-second header timeout has passed.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{cpu_seconds, Client, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// docs/protocol.md's deadline for a complete request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn stalled_request_heads_cost_nothing_and_are_closed_after_the_header_timeout() {
    let server = Server::start(&["--store", "memory"]);
    let pid = server.child.id();
    let started = Instant::now();
    let mut stalled = Vec::new();
    for i in 0..400 {
        let mut s = TcpStream::connect(&server.addr).await.expect("connect");
        // Half send the start of an upgrade's head, half send nothing.
        if i % 2 == 0 {
            s.write_all(b"GET /ws/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: webs")
                .await
                .expect("write");
        }
        stalled.push(s);
    }
    let cpu_before = cpu_seconds(pid);

    let (mut a, _) = Client::join(&server.ws_url("/ws/chat")).await;
    let (p, m) = a.publish(json!({"data": "still served"}), "p").await;
    assert_eq!(
        (p["offset"].as_u64(), m["data"].as_str()),
        (Some(1), Some("still served"))
    );

    tokio::time::sleep(Duration::from_secs(3)).await;
    let spent = cpu_seconds(pid) - cpu_before;
    assert!(
        spent < 0.5,
        "400 stalled connections and one client used {spent:.2} CPU-seconds in 3 s"
    );

    let mut buf = [0u8; 256];
    for (i, s) in stalled.iter_mut().enumerate() {
        let left = (started + HEADER_TIMEOUT + Duration::from_secs(8)).saturating_duration_since(Instant::now());
        let read = tokio::time::timeout(left, s.read(&mut buf)).await;
        // A close is EOF, or a reset; either way the read ends. A 408 answer
        // before the close is fine too: the connection ends after it.
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(_)) => {
                let rest = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut Vec::new())).await;
                assert!(rest.is_ok(), "connection {i} stays open after its answer");
            }
            Err(_) => panic!("connection {i} is still open after the header timeout"),
        }
    }
    assert!(
        started.elapsed() >= HEADER_TIMEOUT - Duration::from_secs(1),
        "closed by the deadline, not at once"
    );
    let (p, _) = a.publish(json!({"data": "after"}), "q").await;
    assert_eq!(p["offset"], 2, "the upgraded client is not touched by the deadline");
}
