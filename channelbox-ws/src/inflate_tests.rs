//! Tests of `inflate.rs`: compressed client messages inflated under the
//! message limit, every other byte passed through.

use super::*;
use crate::deflate::deflate;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

const MAX: usize = 64 * 1024;

/// One client frame: `first` is FIN, RSV and opcode; masked as a client's.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = Vec::new();
    crate::deflate::header(&mut out, first, payload.len());
    out[1] |= 0x80;
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// What tungstenite, reading through the filter, makes of `wire`.
async fn read_messages(wire: Vec<u8>) -> Vec<Result<Message, String>> {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let writer = tokio::spawn(async move {
        // Fails once the server stopped reading (too large): that is fine.
        let _ = client.write_all(&wire).await;
        // The end of the stream; the server may still write (pongs).
        let _ = client.shutdown().await;
        client
    });
    let config = crate::websocket_config(MAX, 1 << 20);
    let mut ws = WebSocketStream::from_raw_socket(Inflating::new(server, Some(MAX)), Role::Server, Some(config)).await;
    let mut seen = Vec::new();
    while let Some(item) = ws.next().await {
        let failed = item.is_err();
        seen.push(item.map_err(|e| match e {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => "too large".to_owned(),
            other => other.to_string(),
        }));
        if failed || seen.len() > 16 {
            break;
        }
    }
    drop(ws);
    drop(writer.await);
    seen
}

fn text(s: &str) -> Result<Message, String> {
    Ok(Message::Text(s.into()))
}

fn chat(len: usize) -> String {
    let line = r#"{"user":"alice","text":"the deploy failed again on staging, logs show a timeout"}"#;
    line.repeat(len / line.len() + 1)[..len].to_owned()
}

#[tokio::test]
async fn compressed_and_plain_messages_read_alike() {
    let long = chat(40_000);
    let mut wire = client_frame(0xc1, &deflate(long.as_bytes()).expect("deflates"));
    wire.extend(client_frame(0x81, b"plain"));
    wire.extend(client_frame(0xc1, &deflate(b"hi").expect("deflates")));
    // An empty compressed message: the payload is the one empty block.
    wire.extend(client_frame(0xc1, &[0x00]));
    let seen = read_messages(wire).await;
    // Then the end of the stream, without a close.
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(seen[..4], [text(&long), text("plain"), text("hi"), text("")]);
}

#[tokio::test]
async fn fragments_with_a_ping_between_them_inflate_as_one_message() {
    let message = chat(3000);
    let compressed = deflate(message.as_bytes()).expect("deflates");
    let (a, rest) = compressed.split_at(compressed.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut wire = client_frame(0x41, a); // text, RSV1, not final
    wire.extend(client_frame(0x89, b"are you there")); // a ping in between
    wire.extend(client_frame(0x00, b));
    wire.extend(client_frame(0x80, c));
    // A fragmented plain message after it passes as it is.
    wire.extend(client_frame(0x01, b"one "));
    wire.extend(client_frame(0x80, b"two"));
    let seen = read_messages(wire).await;
    assert_eq!(seen[0], Ok(Message::Ping("are you there".into())));
    assert_eq!(seen[1], text(&message));
    assert_eq!(seen[2], text("one two"));
}

#[tokio::test]
async fn rsv1_where_rfc_7692_allows_none_still_fails() {
    // On a continuation frame of a compressed message.
    let compressed = deflate(b"hello hello hello").expect("deflates");
    let mut wire = client_frame(0x41, &compressed);
    wire.extend(client_frame(0xc0, &[0x00]));
    let seen = read_messages(wire).await;
    assert!(
        seen.last()
            .is_some_and(|r| r.as_ref().is_err_and(|e| e.contains("Reserved"))),
        "{seen:?}"
    );
    // On a ping.
    let seen = read_messages(client_frame(0xc9, b"")).await;
    assert!(
        seen.last()
            .is_some_and(|r| r.as_ref().is_err_and(|e| e.contains("Reserved"))),
        "{seen:?}"
    );
}

#[tokio::test]
async fn corrupt_deflate_data_fails_the_connection() {
    let seen = read_messages(client_frame(0xc1, &[0xff; 40])).await;
    assert!(
        seen.last()
            .is_some_and(|r| r.as_ref().is_err_and(|e| e.contains("permessage-deflate"))),
        "{seen:?}"
    );
}

/// Zeros deflated with a sync flush: `first` primes the window, each of
/// `repeat` copies of the next block inflates to another `block` zeros.
fn zero_bomb(block: usize, repeat: usize) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    let zeros = vec![0u8; block];
    let mut compressor = Compress::new(Compression::best(), false);
    let mut first = Vec::with_capacity(block);
    compressor
        .compress_vec(&zeros, &mut first, FlushCompress::Sync)
        .expect("deflates");
    let mut next = Vec::with_capacity(block);
    compressor
        .compress_vec(&zeros, &mut next, FlushCompress::Sync)
        .expect("deflates");
    let mut bomb = first;
    for _ in 0..repeat {
        bomb.extend_from_slice(&next);
    }
    bomb
}

#[test]
fn the_bomb_is_what_it_claims() {
    let bomb = zero_bomb(1 << 16, 3);
    let mut inflater = Decompress::new(false);
    let mut out = Vec::with_capacity(5 << 16);
    inflater
        .decompress_vec(&bomb, &mut out, FlushDecompress::Sync)
        .expect("inflates");
    assert_eq!(out.len(), 4 << 16);
    assert!(out.iter().all(|b| *b == 0));
    assert!(bomb.len() < 1024, "{} bytes", bomb.len());
}

/// A bomb within the compressed limit (a few KB inflating to 48 MB) is
/// refused as too large after at most one fragment past the limit: the
/// filter hands up no more than that whatever the bomb holds.
#[tokio::test]
async fn a_bomb_stops_inflating_at_the_limit() {
    let bomb = zero_bomb(1 << 20, 47);
    assert!(bomb.len() < MAX, "{} bytes", bomb.len());
    let wire = client_frame(0xc1, &bomb);
    let mut filter = Inflating::new(&wire[..], Some(MAX));
    let mut handed_up = Vec::new();
    filter.read_to_end(&mut handed_up).await.expect("reads");
    assert!(
        handed_up.len() <= MAX + CHUNK + 64,
        "{} bytes handed up",
        handed_up.len()
    );
    // The last thing handed up announces more than the limit.
    let tail = &handed_up[handed_up.len() - 14..];
    assert_eq!(tail[..2], [0x00, 0xff]);
    assert_eq!(u64::from_be_bytes(tail[2..10].try_into().expect("8")), MAX as u64 + 1);
    let seen = read_messages(wire).await;
    assert_eq!(seen, [Err("too large".to_owned())]);
}

/// A compressed message longer than the limit before inflating is refused
/// from its size alone.
#[tokio::test]
async fn a_compressed_message_over_the_limit_is_refused() {
    let bomb = zero_bomb(1 << 20, 1000);
    assert!(bomb.len() > MAX);
    let seen = read_messages(client_frame(0xc1, &bomb)).await;
    assert_eq!(seen, [Err("too large".to_owned())]);
}

#[tokio::test]
async fn without_the_extension_every_byte_passes() {
    let wire = client_frame(0xc1, b"anything");
    let mut filter = Inflating::new(&wire[..], None);
    let mut out = Vec::new();
    filter.read_to_end(&mut out).await.expect("reads");
    assert_eq!(out, wire);
}
