//! permessage-deflate by hand for the tests: compressed client frames,
//! server frames read and inflated, and a deflate bomb.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// What browsers and Node's `ws` offer.
pub const OFFER: (&str, &str) = ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits");

/// The server's answer to an accepted offer.
pub const ANSWER: &str =
    "sec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover";

const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Raw deflate of one message, its sync-flush tail removed (RFC 7692).
pub fn compress(data: &[u8]) -> Vec<u8> {
    let mut compressor = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    compressor
        .compress_vec(data, &mut out, FlushCompress::Sync)
        .expect("deflates");
    assert!(out.ends_with(&TAIL));
    out.truncate(out.len() - TAIL.len());
    out
}

/// The inverse of [`compress`].
pub fn inflate(data: &[u8]) -> Vec<u8> {
    let mut input = data.to_vec();
    input.extend_from_slice(&TAIL);
    let mut out = Vec::with_capacity(16 * data.len() + 1024);
    Decompress::new(false)
        .decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .expect("inflates");
    out
}

/// Zeros deflated with sync flushes: a first block, then `repeat` copies of
/// a second one, each inflating to `block` more zeros (the second block only
/// refers back into zeros, so its copies stay valid).
pub fn zero_bomb(block: usize, repeat: usize) -> Vec<u8> {
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

/// One server frame: its first byte (FIN, RSV, opcode) and payload.
#[derive(Debug)]
pub struct ServerFrame {
    pub first: u8,
    pub payload: Vec<u8>,
}

impl ServerFrame {
    /// RSV1: the payload is compressed.
    pub fn compressed(&self) -> bool {
        self.first & 0x40 != 0
    }

    /// A text frame's JSON, inflated first when compressed.
    pub fn json(&self) -> Value {
        assert_eq!(self.first & 0x0f, 0x1, "a text frame: {self:?}");
        let bytes = if self.compressed() {
            inflate(&self.payload)
        } else {
            self.payload.clone()
        };
        serde_json::from_slice(&bytes).expect("JSON")
    }

    /// A close frame's code.
    pub fn close_code(&self) -> Option<u16> {
        (self.first & 0x0f == 0x8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Reads server frames off a raw socket.
pub struct Reader {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Reader {
    pub fn new(s: TcpStream) -> Reader {
        Reader { s, buf: Vec::new() }
    }

    /// The next frame, or `None` when the connection ends (or 10 s pass).
    pub async fn next(&mut self) -> Option<ServerFrame> {
        let mut chunk = [0u8; 8192];
        loop {
            if self.buf.len() >= 2 {
                let len7 = usize::from(self.buf[1] & 0x7f);
                let (header, len) = match len7 {
                    126 if self.buf.len() >= 4 => (4, usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]]))),
                    127 if self.buf.len() >= 10 => (
                        10,
                        usize::try_from(u64::from_be_bytes(self.buf[2..10].try_into().expect("8"))).expect("fits"),
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (2, n),
                };
                if header != usize::MAX && self.buf.len() >= header + len {
                    let frame = ServerFrame {
                        first: self.buf[0],
                        payload: self.buf[header..header + len].to_vec(),
                    };
                    self.buf.drain(..header + len);
                    return Some(frame);
                }
            }
            match tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// The JSON of the next text frame of this `type`, skipping others.
    pub async fn next_type(&mut self, kind: &str) -> (Value, bool) {
        loop {
            let frame = self.next().await.unwrap_or_else(|| panic!("a {kind} frame"));
            if frame.first & 0x0f == 0x1 {
                let json = frame.json();
                if json["type"] == kind {
                    return (json, frame.compressed());
                }
            }
        }
    }

    /// Reads until the close frame; returns the `error` frames' codes seen
    /// on the way and the close code.
    pub async fn until_close(&mut self) -> (Vec<String>, Option<u16>) {
        let mut errors = Vec::new();
        while let Some(frame) = self.next().await {
            if let Some(code) = frame.close_code() {
                return (errors, Some(code));
            }
            if frame.first & 0x0f == 0x1 {
                let json = frame.json();
                if json["type"] == "error" {
                    errors.push(json["code"].as_str().unwrap_or_default().to_owned());
                }
            }
        }
        (errors, None)
    }
}
