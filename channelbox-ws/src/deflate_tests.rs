//! Tests of permessage-deflate's negotiation and of the compression of
//! outgoing frames.

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
            client_max_window_bits: Some(9),
            server_max_window_bits: false,
        })
    );
    assert_eq!(
        offer("permessage-deflate; client_max_window_bits"),
        Some(Agreed {
            client_max_window_bits: None,
            server_max_window_bits: false,
        })
    );
}

/// RFC 7692 §7.1.2.1: a server accepts an offer carrying
/// `server_max_window_bits` by answering the parameter with the same or a
/// smaller value; the server compresses with 15, so it answers 15, and only
/// when it was offered.
#[test]
fn an_offered_server_max_window_bits_is_answered() {
    let answer = |value: &str| offer(value).map(|agreed| agreed.response());
    for value in [
        "permessage-deflate; server_max_window_bits=15",
        "permessage-deflate; client_max_window_bits; server_max_window_bits=\"15\"",
    ] {
        assert_eq!(
            answer(value),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15"
            ),
            "{value}"
        );
    }
    for value in ["permessage-deflate", "permessage-deflate; client_max_window_bits=10"] {
        assert_eq!(answer(value), Some(ACCEPTED), "{value}");
    }
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
        let _another_member = frame.clone();
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

/// The size of a frame's raw deflate at `level`, framed (tail removed).
fn framed_deflate(frame: &Frame, level: u32) -> usize {
    let mut c = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(frame.len() + 64);
    c.compress_vec(frame.data(), &mut out, FlushCompress::Sync)
        .expect("compresses");
    let size = out.len() - TAIL.len();
    size + if size < 126 { 2 } else { 4 }
}

/// The frame's plain size on the wire.
fn framed_plain(frame: &Frame) -> usize {
    frame.len() + if frame.len() < 126 { 2 } else { 4 }
}

/// The measurement behind [`MIN_COMPRESSED_BYTES`] and [`LEVEL`], kept as
/// assertions: on the frames of a chat conversation compressing does not
/// pay up to 64 bytes and pays from 80 on, and level 6 makes 1 KB and 4 KB
/// messages shorter than level 1 does.
#[test]
fn the_threshold_and_the_level_are_where_compression_pays() {
    for len in [16, 24, 32, 40, 48, 56, 64] {
        let frame = prefix_frame(len);
        assert!(framed_deflate(&frame, LEVEL) >= framed_plain(&frame), "{len} bytes");
        assert!(compress_frame(&frame).is_none(), "{len} bytes");
    }
    for len in [MIN_COMPRESSED_BYTES, 96, 128, 160, 200] {
        let frame = prefix_frame(len);
        let _another_member = frame.clone();
        let framed = framed_deflate(&frame, LEVEL);
        assert!(framed < framed_plain(&frame), "{len} bytes");
        assert_eq!(compress_frame(&frame).map(|c| c.len()), Some(framed), "{len} bytes");
    }
    for len in [1000, 4000] {
        let frame = chat_frame(len);
        assert!(framed_deflate(&frame, 6) < framed_deflate(&frame, 1), "{len} bytes");
    }
}

/// A frame only one connection holds (a reply) is compressed only from
/// [`MIN_COMPRESSED_ONE_OFF_BYTES`] on: below, the compression would be
/// paid for one receiver.
#[test]
fn a_frame_for_one_connection_only_is_compressed_only_when_large() {
    let reply = prefix_frame(200);
    assert!(compress_frame(&reply).is_none(), "a 200-byte reply goes plain");
    let broadcast = prefix_frame(200);
    let _another_member = broadcast.clone();
    assert!(
        compress_frame(&broadcast).is_some(),
        "the same bytes to two members pay"
    );
    let page = chat_frame(MIN_COMPRESSED_ONE_OFF_BYTES);
    assert!(compress_frame(&page).is_some(), "a large reply is compressed");
}

/// `server_no_context_takeover` is what lets one compressed copy serve
/// every connection: a frame's compressed bytes do not depend on what the
/// writer thread compressed before (the same text just before, which a
/// compressor that kept its window would refer back to), and another
/// thread makes the same bytes.
#[test]
fn a_frames_compressed_bytes_do_not_depend_on_what_came_before() {
    let frame = chat_frame(1000);
    let alone = compress_frame(&frame).expect("compresses");
    compress_frame(&chat_frame(1000)).expect("compresses");
    assert_eq!(compress_frame(&frame), Some(alone.clone()));
    let elsewhere = std::thread::spawn(move || compress_frame(&frame))
        .join()
        .expect("the thread ends");
    assert_eq!(elsewhere, Some(alone));
}
