//! A minimal client of server-sent events: one `GET /sse/…` on a socket of
//! its own, the chunked body decoded and split into events as a browser's
//! `EventSource` reads them.

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::WAIT;

/// One event, or a comment line (`: ping`).
#[derive(Clone, Debug, Default)]
pub struct SseEvent {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: String,
    /// The comment, for a comment block.
    pub comment: Option<String>,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|_| panic!("JSON data, got {self:?}"))
    }
}

/// An open stream of events.
pub struct Sse {
    stream: TcpStream,
    pub status: u16,
    pub head: String,
    /// Bytes read and not yet decoded from the chunked body.
    raw: Vec<u8>,
    /// Decoded body bytes not yet split into events.
    body: Vec<u8>,
    /// The body ended (the last chunk arrived, or the socket closed).
    ended: bool,
}

impl Sse {
    /// Opens `path` with these extra headers and reads the answer's head.
    pub async fn open(addr: &str, path: &str, headers: &[(&str, &str)]) -> Sse {
        Self::open_with_buffer(addr, path, headers, None).await
    }

    /// [`Sse::open`] with a small receive buffer (no autotuning), so that a
    /// client that stops reading fills the path quickly.
    pub async fn open_with_buffer(addr: &str, path: &str, headers: &[(&str, &str)], rcvbuf: Option<u32>) -> Sse {
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        let mut stream = socket.connect(addr.parse().expect("addr")).await.expect("connect");
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        let head_end = loop {
            if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
                .await
                .expect("an answer in time")
                .expect("read");
            assert!(n > 0, "closed before an answer: {:?}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code");
        raw.drain(..head_end + 4);
        Sse {
            stream,
            status,
            head,
            raw,
            body: Vec::new(),
            ended: false,
        }
    }

    /// A header of the answer, by name.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    /// Moves whole chunks from `raw` to `body`.
    fn dechunk(&mut self) {
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size = std::str::from_utf8(&self.raw[..line_end]).expect("chunk size");
            let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            if self.raw.len() < line_end + 2 + size + 2 {
                return;
            }
            self.body
                .extend_from_slice(&self.raw[line_end + 2..line_end + 2 + size]);
            self.raw.drain(..line_end + 2 + size + 2);
        }
    }

    /// The next event or comment; `None` once the stream ended.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            self.dechunk();
            if let Some(at) = self.body.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.body.drain(..at + 2).collect();
                return Some(parse_block(&String::from_utf8(block).expect("UTF-8 events")));
            }
            if self.ended {
                return None;
            }
            let mut buf = [0u8; 16 * 1024];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut buf))
                .await
                .expect("an event in time")
                .unwrap_or(0);
            if n == 0 {
                self.ended = true;
            }
            self.raw.extend_from_slice(&buf[..n]);
        }
    }

    /// The next event that is no comment.
    pub async fn event(&mut self) -> SseEvent {
        loop {
            let e = self.next().await.expect("the stream goes on");
            if e.comment.is_none() {
                return e;
            }
        }
    }

    /// Events until one of this type; returns it.
    pub async fn until(&mut self, kind: &str) -> SseEvent {
        loop {
            let e = self.event().await;
            if e.event.as_deref() == Some(kind) {
                return e;
            }
        }
    }
}

fn parse_block(block: &str) -> SseEvent {
    let mut e = SseEvent::default();
    let mut data = Vec::new();
    for line in block.lines() {
        if let Some(comment) = line.strip_prefix(':') {
            e.comment = Some(comment.trim().to_owned());
        } else if let Some((field, value)) = line.split_once(':') {
            let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
            match field {
                "event" => e.event = Some(value),
                "id" => e.id = Some(value),
                "data" => data.push(value),
                other => panic!("unknown field {other:?} in {block:?}"),
            }
        }
    }
    e.data = data.join("\n");
    e
}
