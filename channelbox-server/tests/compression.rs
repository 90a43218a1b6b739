//! permessage-deflate (RFC 7692) against the real server: the negotiation,
//! compressed messages both ways next to an uncompressed client, and a
//! deflate bomb refused with `too_large` and 1009 (the hostile suite sends
//! a larger one and measures memory).

mod deflate;
mod support;

use deflate::{compress, zero_bomb, Reader, ANSWER, OFFER};
use serde_json::json;
use support::raw::{client_frame, upgrade_with_head};
use support::{Client, Server};
use tokio::io::AsyncWriteExt;

/// Chat text of about `len` bytes.
fn chat_text(len: usize) -> String {
    let line = "did anyone review the pull request yet? the deploy failed again on staging, logs show a timeout. ";
    line.repeat(len / line.len() + 1)[..len].to_owned()
}

#[tokio::test]
async fn an_offer_is_answered_unless_compression_is_off() {
    let server = Server::memory();
    let (_s, status, head) = upgrade_with_head(&server.addr, "/ws/chat", &[OFFER]).await;
    assert_eq!(status, 101);
    assert!(head.to_ascii_lowercase().contains(ANSWER), "{head}");
    // No offer, no extension.
    let (_s, status, head) = upgrade_with_head(&server.addr, "/ws/chat", &[]).await;
    assert_eq!(status, 101);
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-extensions"),
        "{head}"
    );
    // An offer the server cannot take is declined, not refused.
    let small = (
        "Sec-WebSocket-Extensions",
        "permessage-deflate; server_max_window_bits=10",
    );
    let (_s, status, head) = upgrade_with_head(&server.addr, "/ws/chat", &[small]).await;
    assert_eq!(status, 101);
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-extensions"),
        "{head}"
    );

    let off = Server::start(&["--store", "memory", "--compression", "off"]);
    let (_s, status, head) = upgrade_with_head(&off.addr, "/ws/chat", &[OFFER]).await;
    assert_eq!(status, 101);
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-extensions"),
        "{head}"
    );
}

#[tokio::test]
async fn compressed_messages_go_both_ways_and_plain_clients_get_plain_frames() {
    let server = Server::memory();
    let (mut plain, _) = Client::join(&server.ws_url("/ws/chat")).await;
    let (s, status, _) = upgrade_with_head(&server.addr, "/ws/chat", &[OFFER]).await;
    assert_eq!(status, 101);
    let mut reader = Reader::new(s);
    reader.next_type("welcome").await;

    let text = chat_text(1000);
    let publish = json!({"type": "publish", "data": {"user": "alice", "text": text}, "ref": "p1"});
    let frame = client_frame(0x41, &compress(publish.to_string().as_bytes()));
    reader.s.write_all(&frame).await.expect("write");
    // Also fragmented: RSV1 on the first frame only, a ping in between.
    let second = json!({"type": "publish", "data": {"text": chat_text(3000)}, "ref": "p2"});
    let compressed = compress(second.to_string().as_bytes());
    let (a, b) = compressed.split_at(compressed.len() / 2);
    let mut fragments = client_frame(0x41, a);
    fragments[0] &= 0x7f; // not final
    fragments.extend(client_frame(0x9, b"still here"));
    fragments.extend(client_frame(0x0, b));
    reader.s.write_all(&fragments).await.expect("write");

    // `published` and the echoed `message` may come in either order.
    let (mut acks, mut messages) = (Vec::new(), Vec::new());
    while messages.len() < 2 || acks.len() < 2 {
        let frame = reader.next().await.expect("a frame");
        if frame.first & 0x0f != 0x1 {
            continue;
        }
        let json = frame.json();
        match json["type"].as_str() {
            Some("published") => acks.push(json["ref"].clone()),
            Some("message") => messages.push((json["data"]["text"].clone(), frame.compressed())),
            _ => {}
        }
    }
    assert_eq!(acks, ["p1", "p2"]);
    // Compressed: 1 KB and 3 KB messages pay.
    assert_eq!(messages, [(json!(text), true), (json!(chat_text(3000)), true)]);

    // The client that offered nothing gets the same messages, plain (its
    // tungstenite would refuse an RSV1 frame).
    let first = plain.recv_type("message").await;
    assert_eq!(first["data"]["text"], text);
    let second = plain.recv_type("message").await;
    assert_eq!(second["data"]["text"], chat_text(3000));
}

/// The non-gated twin of the hostile suite's bomb: 48 MB of zeros in
/// about 50 KB, under the default 64 KiB limit before inflating.
#[tokio::test]
async fn a_deflate_bomb_gets_too_large_and_1009() {
    let server = Server::memory();
    let (s, status, head) = upgrade_with_head(&server.addr, "/ws/bombed", &[OFFER]).await;
    assert_eq!(status, 101);
    assert!(head.to_ascii_lowercase().contains(ANSWER), "{head}");
    let bomb = zero_bomb(1 << 20, 47);
    assert!(bomb.len() < 60_000, "{} bytes", bomb.len());
    let mut reader = Reader::new(s);
    reader.next_type("welcome").await;
    // Written while the server may already close: a failed write is fine.
    let _ = reader.s.write_all(&client_frame(0x41, &bomb)).await;
    let (errors, code) = reader.until_close().await;
    assert_eq!(errors, ["too_large"]);
    assert_eq!(code, Some(1009));
    // The server goes on serving.
    let (mut c, _) = Client::join(&server.ws_url("/ws/after")).await;
    let (p, _) = c.publish(json!({"data": "hello"}), "ok").await;
    assert_eq!(p["type"], "published");
}
