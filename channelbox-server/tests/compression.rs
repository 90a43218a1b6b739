//! permessage-deflate (RFC 7692) against the real server: the negotiation,
//! compressed messages both ways next to an uncompressed client, and a
//! deflate bomb refused with `too_large` and 1009 (the hostile suite sends
//! a larger one and measures memory).

mod deflate;
mod support;

use deflate::{compress, masked_frame, zero_bomb, Reader, ANSWER, OFFER};
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
    // An offered server_max_window_bits=15 is answered (RFC 7692 §7.1.2.1).
    let window = (
        "Sec-WebSocket-Extensions",
        "permessage-deflate; server_max_window_bits=15",
    );
    let (_s, status, head) = upgrade_with_head(&server.addr, "/ws/chat", &[window]).await;
    assert_eq!(status, 101);
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("{ANSWER}; server_max_window_bits=15")),
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

/// A compressed message whose first fragment inflates to exactly 16 KiB and
/// whose second is a long run, masked with a non-zero key: the server's
/// inflater stops short of the end of its input there, and what it left
/// must be unmasked once (this message used to close the connection as
/// invalid data).
#[tokio::test]
async fn a_message_the_inflater_reads_in_several_calls_arrives_whole() {
    use flate2::{Compress, Compression, FlushCompress};
    let server = Server::memory();
    let (s, status, _) = upgrade_with_head(&server.addr, "/ws/chat", &[OFFER]).await;
    assert_eq!(status, 101);
    let mut reader = Reader::new(s);
    reader.next_type("welcome").await;

    let head = r#"{"type":"publish","ref":"long","data":""#;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let noise: String = (0..16_384 - head.len())
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'a' + (state % 26) as u8)
        })
        .collect();
    let first = format!("{head}{noise}");
    let second = format!("{}\"}}", "x".repeat(40_000));
    let mut compressor = Compress::new(Compression::default(), false);
    let mut a = Vec::with_capacity(2 * first.len());
    compressor
        .compress_vec(first.as_bytes(), &mut a, FlushCompress::Sync)
        .expect("deflates");
    let mut b = Vec::with_capacity(4096);
    compressor
        .compress_vec(second.as_bytes(), &mut b, FlushCompress::Sync)
        .expect("deflates");
    b.truncate(b.len() - 4);
    let mut wire = masked_frame(0x41, &a);
    wire.extend(masked_frame(0x80, &b));
    reader.s.write_all(&wire).await.expect("write");

    // `published` and the echoed `message` may come in either order.
    let (mut ack, mut message) = (None, None);
    while ack.is_none() || message.is_none() {
        let frame = reader.next().await.expect("a frame");
        if frame.first & 0x0f != 0x1 {
            continue;
        }
        let json = frame.json();
        match json["type"].as_str() {
            Some("published") => ack = Some(json["ref"].clone()),
            Some("message") => message = Some((json["data"].clone(), frame.compressed())),
            _ => {}
        }
    }
    assert_eq!(ack, Some(json!("long")));
    assert_eq!(message, Some((json!(format!("{noise}{}", "x".repeat(40_000))), true)));
}

/// A compressed frame on a connection that did not negotiate compression
/// (the server runs with `--compression off`, or the client offered
/// nothing) is a protocol error: the connection fails, nothing is
/// published, and the server goes on serving.
#[tokio::test]
async fn a_compressed_frame_without_the_extension_fails_the_connection() {
    let off = Server::start(&["--store", "memory", "--compression", "off"]);
    let on = Server::memory();
    for (server, offer) in [(&off, &[OFFER][..]), (&on, &[][..])] {
        let (s, status, head) = upgrade_with_head(&server.addr, "/ws/chat", offer).await;
        assert_eq!(status, 101);
        assert!(
            !head.to_ascii_lowercase().contains("sec-websocket-extensions"),
            "{head}"
        );
        let mut reader = Reader::new(s);
        reader.next_type("welcome").await;
        let publish = json!({"type": "publish", "data": chat_text(500), "ref": "p"});
        let _ = reader
            .s
            .write_all(&masked_frame(0xc1, &compress(publish.to_string().as_bytes())))
            .await;
        while let Some(frame) = reader.next().await {
            assert!(
                frame.first & 0x0f != 0x1 || frame.json()["type"] != "published",
                "{frame:?}"
            );
        }
        let (mut c, _) = Client::join(&server.ws_url("/ws/after")).await;
        let (p, _) = c.publish(json!({"data": "hello"}), "ok").await;
        assert_eq!(p["type"], "published");
    }
}
