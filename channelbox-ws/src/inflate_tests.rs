//! Tests of the inflate filter: what tungstenite reads through it from
//! compressed, plain, fragmented, hostile and broken client frames.

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

/// Text that does not compress well: letters drawn by a fixed
/// pseudo-random sequence.
fn noise(len: usize) -> String {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'a' + (state % 26) as u8)
        })
        .collect()
}

/// The inflater may stop before the end of what it was given (its output
/// fragment is full): the bytes it left must stay unmasked for the next
/// call. Here the first fragment inflates to exactly 16 KiB (the inflater's
/// 32 KiB window is then half full) and the second is a long run: the
/// inflater fills the window's second half, hands all of it out as one
/// full fragment and keeps the rest of the input for later, which it must
/// then read as the client sent it (non-zero mask key).
#[tokio::test]
async fn input_the_inflater_left_is_unmasked_once() {
    use flate2::{Compress, Compression, FlushCompress};
    for prefix in [16_384, 8_192, 1_000] {
        let (first, second) = (noise(prefix), "x".repeat(45_000));
        let mut compressor = Compress::new(Compression::new(6), false);
        let mut a = Vec::with_capacity(2 * prefix + 64);
        compressor
            .compress_vec(first.as_bytes(), &mut a, FlushCompress::Sync)
            .expect("deflates");
        let mut b = Vec::with_capacity(4096);
        compressor
            .compress_vec(second.as_bytes(), &mut b, FlushCompress::Sync)
            .expect("deflates");
        assert!(b.ends_with(&TAIL));
        b.truncate(b.len() - TAIL.len());
        let mut wire = client_frame(0x41, &a);
        wire.extend(client_frame(0x80, &b));
        let seen = read_messages(wire).await;
        assert!(
            seen.first() == Some(&text(&(first + &second))),
            "prefix {prefix}: {:?}",
            seen.iter().map(|r| r.as_ref().map(Message::len)).collect::<Vec<_>>()
        );
    }
}

/// RFC 7692 §7.2.3.3: a client may end a message with a DEFLATE block
/// whose BFINAL bit is set instead of a sync flush; the receiver still
/// appends the empty-block tail, which then comes after the end of the
/// stream and is ignored, not refused as corrupt. The connection goes on.
#[tokio::test]
async fn a_message_ending_with_a_final_block_is_read() {
    use flate2::{Compress, Compression, FlushCompress};
    let long = chat(20_000);
    let mut compressor = Compress::new(Compression::new(6), false);
    let mut finished = Vec::with_capacity(long.len());
    compressor
        .compress_vec(long.as_bytes(), &mut finished, FlushCompress::Finish)
        .expect("deflates");
    // "Hello" as one final fixed-Huffman block (RFC 7692 §7.2.3.3), then
    // the same with a byte after the end of the stream.
    let mut wire = client_frame(0xc1, &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
    wire.extend(client_frame(0xc1, &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00]));
    wire.extend(client_frame(0xc1, &finished));
    wire.extend(client_frame(0x81, b"plain"));
    let seen = read_messages(wire).await;
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(seen[..4], [text("Hello"), text("Hello"), text(&long), text("plain")]);
}

/// Data after the final block would be lost unread: refused, in the same
/// frame as the final block or in a frame after it.
#[tokio::test]
async fn data_after_a_final_block_is_refused() {
    let hello = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    let world = deflate(b"world").expect("deflates");
    let same_frame = client_frame(0xc1, &[&hello[..], &world].concat());
    let mut next_frame = client_frame(0x41, &hello);
    next_frame.extend(client_frame(0x80, &world));
    for wire in [same_frame, next_frame] {
        let seen = read_messages(wire).await;
        assert!(
            seen.last()
                .is_some_and(|r| r.as_ref().is_err_and(|e| e.contains("permessage-deflate"))),
            "{seen:?}"
        );
    }
}

/// DEFLATE makes data that does not compress a little longer (a few bytes
/// per stored block), and browsers compress every message: a message of
/// exactly the limit that does not compress is accepted compressed, as it
/// is plain.
#[tokio::test]
async fn a_message_at_the_limit_that_does_not_compress_is_accepted() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..MAX)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_be_bytes()[0]
        })
        .collect();
    let compressed = deflate(&bytes).expect("deflates");
    assert!(compressed.len() > MAX, "{} bytes compressed", compressed.len());
    let seen = read_messages(client_frame(0xc2, &compressed)).await;
    assert!(
        seen.first() == Some(&Ok(Message::Binary(bytes.into()))),
        "{:?}",
        seen.iter().map(|r| r.as_ref().map(Message::len)).collect::<Vec<_>>()
    );
}

/// Inflated fragments are cut every 16 KiB whatever the text: a character
/// of three bytes cut in two by a fragment boundary is still read as text.
#[tokio::test]
async fn text_cut_inside_a_character_between_fragments_is_read() {
    let message = "€uro ".repeat(8_000);
    assert!(message.len() > 3 * CHUNK);
    let seen = read_messages(client_frame(0xc1, &deflate(message.as_bytes()).expect("deflates"))).await;
    assert!(seen.first() == Some(&text(&message)), "{seen:?}");
}

/// Fragments cost their headers: a compressed message of endless empty
/// continuation frames (each inflating nothing, none counted by the size
/// limit, the message never ending) is refused as too large once its
/// frames pass the compressed bound, instead of keeping the filter busy
/// for as long as the client sends them.
#[tokio::test]
async fn endless_empty_fragments_are_too_large() {
    let mut wire = client_frame(0x41, &deflate(b"hello").expect("deflates"));
    let empty = client_frame(0x00, &[]);
    for _ in 0..(MAX / empty.len() + 1000) {
        wire.extend_from_slice(&empty);
    }
    wire.extend(client_frame(0x80, &[]));
    let seen = read_messages(wire).await;
    assert_eq!(seen, [Err("too large".to_owned())]);
}
