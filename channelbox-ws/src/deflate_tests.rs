//! Tests of `deflate.rs`: negotiation answers, compression once per frame,
//! and the threshold below which frames go out plain.

use super::*;

fn offer(value: &str) -> Option<Agreed> {
    negotiate([value])
}

#[test]
fn what_browsers_and_node_offer_is_accepted() {
    // Chromium, Firefox, Safari and Node's `ws` send one of these.
    for value in [
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate",
        "permessage-deflate; client_max_window_bits=15",
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "PerMessage-Deflate ; Client_Max_Window_Bits = \"10\"",
        "permessage-deflate; server_max_window_bits=15",
    ] {
        assert!(offer(value).is_some(), "{value}");
    }
    assert_eq!(
        offer("permessage-deflate; client_max_window_bits=9"),
        Some(Agreed {
            client_max_window_bits: Some(9)
        })
    );
    assert_eq!(
        offer("permessage-deflate; client_max_window_bits"),
        Some(Agreed {
            client_max_window_bits: None
        })
    );
}

#[test]
fn bad_offers_are_passed_over_for_the_next_one() {
    for value in [
        "permessage-deflate; x_custom",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; client_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=010",
        "permessage-deflate; client_max_window_bits=+9",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=10",
        "permessage-deflate; client_no_context_takeover=1",
        "x-webkit-deflate-frame",
        "",
    ] {
        assert_eq!(offer(value), None, "{value}");
    }
    // The first acceptable offer wins, across headers too.
    let agreed = negotiate([
        "permessage-deflate; server_max_window_bits=10, permessage-deflate; client_max_window_bits=12",
        "permessage-deflate",
    ]);
    assert_eq!(agreed.and_then(|a| a.client_max_window_bits), Some(12));
    assert!(negotiate(["foo", "permessage-deflate"]).is_some());
}

#[test]
fn parameter_errors_are_typed() {
    let params = |s: &'static str| parse_offer(s.split(';'));
    assert_eq!(params("server_max_window_bits=9"), Err(OfferError::SmallServerWindow));
    assert_eq!(
        params("client_max_window_bits;client_max_window_bits"),
        Err(OfferError::Duplicate("client_max_window_bits"))
    );
    assert_eq!(params("nope"), Err(OfferError::Unknown("nope".into())));
}

/// Chat text that reads like chat: words drawn from a vocabulary by a
/// fixed pseudo-random sequence (repeats as real text has them, no cycle).
fn chat_text(len: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "hello",
        "there",
        "the",
        "meeting",
        "is",
        "at",
        "noon",
        "see",
        "you",
        "soon",
        "can",
        "we",
        "move",
        "it",
        "to",
        "tomorrow",
        "I",
        "think",
        "that",
        "works",
        "for",
        "me",
        "thanks",
        "a",
        "lot",
        "did",
        "anyone",
        "review",
        "pull",
        "request",
        "yet",
        "deploy",
        "failed",
        "again",
        "on",
        "staging",
        "logs",
        "show",
        "timeout",
        "database",
        "connection",
        "let's",
        "restart",
        "and",
        "check",
        "after",
        "lunch",
        "ok",
        "sure",
        "sounds",
        "good",
        "coffee",
        "anybody",
        "new",
        "build",
        "green",
        "now",
        "great",
        "work",
        "everyone",
    ];
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut text = String::new();
    while text.len() < len {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let word = WORDS[usize::try_from(state >> 33).expect("31 bits") % WORDS.len()];
        text.push_str(word);
        text.push(if state & 0xf == 0 { '.' } else { ' ' });
    }
    text.truncate(len);
    text
}

/// A chat `message` frame as the server sends it (docs/protocol.md), with
/// `len` bytes of text.
fn chat_frame(len: usize) -> Frame {
    let text = chat_text(len, len as u64);
    Frame::text(format!(
        r#"{{"type":"message","group":"chat","offset":4242,"epoch":"a1b2c3d4e5f6-0.0","from":"5d0c8f5e-3c1b-4b9a-9d7e-2f6a1c0b8e47","ts":1764282000123,"data":{{"user":"alice","text":"{text}"}}}}"#
    ))
}

/// A frame of the first `len` bytes of a chat conversation's frames: the
/// short frames (`pong`, `published`, `sent`, short messages) in between.
fn prefix_frame(len: usize) -> Frame {
    let mut log = String::new();
    for i in 0..8 {
        log.push_str(chat_frame(20 + i * 13).as_text().expect("text"));
    }
    Frame::text(log[..len.min(log.len())].to_owned())
}

/// Inflates a compressed frame's payload as a client does.
fn inflate(compressed: &[u8]) -> Vec<u8> {
    let mut data = compressed.to_vec();
    data.extend_from_slice(&TAIL);
    let mut inflater = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(1 << 20);
    inflater
        .decompress_vec(&data, &mut out, flate2::FlushDecompress::Sync)
        .expect("inflates");
    out
}

#[test]
fn compressed_frames_inflate_to_the_original() {
    for len in [40, 200, 1000, 70_000] {
        let frame = chat_frame(len);
        let Some(bytes) = compress_frame(&frame) else {
            assert!(frame.len() < MIN_COMPRESSED_BYTES, "{len}");
            continue;
        };
        assert_eq!(bytes[0], 0xc1, "FIN, RSV1, text");
        let (payload_at, payload_len) = match bytes[1] {
            126 => (4, usize::from(u16::from_be_bytes([bytes[2], bytes[3]]))),
            127 => (
                10,
                usize::try_from(u64::from_be_bytes(bytes[2..10].try_into().expect("8"))).expect("fits"),
            ),
            n => (2, usize::from(n)),
        };
        assert_eq!(bytes.len(), payload_at + payload_len);
        assert_eq!(inflate(&bytes[payload_at..]), frame.data().to_vec(), "{len}");
    }
    assert!(compress_frame(&Frame::ping()).is_none());
    assert!(compress_frame(&Frame::text("short")).is_none());
}

#[test]
fn one_compression_per_frame_whoever_writes_it() {
    let frame = chat_frame(1000);
    let copy = frame.clone();
    let mut calls = 0;
    let first = frame
        .compressed(|f| {
            calls += 1;
            compress_frame(f)
        })
        .cloned();
    let second = copy.compressed(|_| unreachable!("compressed once")).cloned();
    assert_eq!(calls, 1);
    assert_eq!(first, second);
    assert!(first.expect("1 KB of chat text compresses").len() < 600);
}

/// The measurement behind [`MIN_COMPRESSED_BYTES`] and [`LEVEL`] (sizes at
/// levels 1 and 6 are printed with
/// `cargo test -p channelbox-ws --lib threshold -- --nocapture`): chat frames
/// of up to 64 bytes come out no shorter compressed, from the threshold on
/// they come out shorter.
#[test]
fn threshold_is_where_compression_starts_to_pay() {
    let frames = [16, 24, 32, 40, 48, 56, 64, 80, 96, 128, 160, 200]
        .map(prefix_frame)
        .into_iter()
        .chain([0, 100, 300, 1000, 4000].map(chat_frame));
    for frame in frames {
        let plain = frame.len() + if frame.len() < 126 { 2 } else { 4 };
        for level in [1, 6] {
            let mut c = Compress::new(Compression::new(level), false);
            let mut out = Vec::with_capacity(frame.len() + 64);
            c.compress_vec(frame.data(), &mut out, FlushCompress::Sync)
                .expect("compresses");
            let size = out.len() - TAIL.len();
            let framed = size + if size < 126 { 2 } else { 4 };
            println!(
                "level {level} message {:>5} B: plain frame {plain:>5} B, compressed {framed:>5} B ({:>3}%)",
                frame.len(),
                framed * 100 / plain
            );
            if level == LEVEL {
                if frame.len() <= 64 {
                    assert!(framed >= plain, "{} B: {framed} against {plain}", frame.len());
                }
                if frame.len() >= MIN_COMPRESSED_BYTES {
                    assert!(framed < plain, "{} B: {framed} against {plain}", frame.len());
                }
            }
        }
    }
}
