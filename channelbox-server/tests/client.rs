//! The Rust client (`channelbox_ws::client`) against the real server: a
//! server killed and restarted (sled) while the client is subscribed and the
//! backend keeps publishing over HTTP; the application receives every saved
//! message exactly once, in offset order, and is told the recovery was
//! complete.

mod support;

use std::time::Duration;

use channelbox_ws::client::{ChatClient, ClientConfig, Event};
use serde_json::json;
use support::Server;

/// A free port on 127.0.0.1 (bound, then released).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// One HTTP publish; its status, or `None` when the server is not there or
/// went away mid-request (it may be restarting).
async fn try_post(addr: &str, body: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let head = format!(
            "POST /api/groups/keep/messages HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(head.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.ok()?;
        let text = String::from_utf8_lossy(&answer);
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

/// Publishes `n` over HTTP until it is acknowledged.
async fn publish(addr: &str, n: u64) {
    let body = json!({"n": n}).to_string();
    for _ in 0..200 {
        if try_post(addr, &body).await == Some(200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("message {n} was never acknowledged");
}

#[tokio::test]
async fn the_rust_client_receives_every_message_once_across_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--data", data.to_str().unwrap()];
    let addr = free_addr();
    let mut server = Server::start_on(&addr, &args);
    let mut config = ClientConfig::new(format!("ws://{addr}"), "keep");
    config.max_backoff = Duration::from_millis(500);
    let mut client = ChatClient::connect(config).await.expect("connect");

    let publisher = {
        let addr = addr.clone();
        tokio::spawn(async move {
            for n in 1..=60 {
                publish(&addr, n).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let _ = server.child.kill();
    let _ = server.child.wait();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _server = Server::start_on(&addr, &args);
    publisher.await.unwrap();

    let mut got = Vec::new();
    let mut recovered = Vec::new();
    let mut disconnects = 0;
    while got.last().is_none_or(|(_, n)| *n != Some(60)) {
        let event = tokio::time::timeout(Duration::from_secs(15), client.next_event())
            .await
            .expect("events keep coming")
            .expect("the client runs");
        match event {
            Event::Message { offset, data, .. } => got.push((offset, data["n"].as_u64())),
            Event::Recovered { complete, .. } => recovered.push(complete),
            Event::Disconnected { .. } => disconnects += 1,
            _ => {}
        }
    }
    assert!(disconnects >= 1, "the restart was noticed");
    assert!(
        !recovered.is_empty() && recovered.iter().all(|c| *c),
        "it recovered, completely: {recovered:?}"
    );
    let offsets: Vec<u64> = got.iter().filter_map(|(o, _)| *o).collect();
    let saved = offsets.len() as u64;
    assert_eq!(
        offsets,
        (1..=saved).collect::<Vec<_>>(),
        "every saved message once, in offset order: {got:?}"
    );
    // This test's publisher retries a POST whose answer the kill cut off,
    // so the message in flight then may be saved twice (one after the
    // other); none is skipped or reordered.
    let mut published: Vec<u64> = got.iter().filter_map(|(_, n)| *n).collect();
    published.dedup();
    assert_eq!(published, (1..=60).collect::<Vec<_>>(), "{got:?}");
    assert!(
        saved <= 61,
        "at most the one message in flight at the kill saved twice: {got:?}"
    );
    let r = client
        .publish("keep", json!("from the client"))
        .await
        .expect("requests work after it");
    assert_eq!(r["offset"], saved + 1);
    let err = client.publish("a b", json!(1)).await.unwrap_err();
    assert!(
        matches!(err, channelbox_ws::client::ClientError::Rejected { ref code, .. } if code == "invalid_group"),
        "{err:?}"
    );
}
