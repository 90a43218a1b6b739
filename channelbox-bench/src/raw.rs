//! A receive-only WebSocket client cut down to what the load generator needs,
//! so that reading is cheap per frame: one `read` fills a 64 KiB buffer, frames
//! are parsed in place and text payloads handed out as byte slices (no
//! allocation, no UTF-8 check, no per-frame message object). Pings are answered;
//! nothing else is ever sent. With [`connect_with`] it offers permessage-deflate
//! and inflates compressed frames (as a browser would) before handing them out.
//!
//! A subscriber can also only count ([`RawSubscriber::count_frames`]): it
//! parses frame headers, counts text messages (compressed ones apart) and
//! the bytes the wire carried, and never inflates or looks into a payload.
//! That is how a benchmark with many subscribers keeps the load generator's
//! own work per delivery small enough not to be what it measures.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A subscriber connection after its upgrade.
#[derive(Debug)]
pub struct RawSubscriber {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Parsed up to here.
    start: usize,
    /// Filled up to here.
    end: usize,
    /// The code of the server's close frame, once one arrived.
    close_code: Option<u16>,
    /// The server accepted permessage-deflate: compressed frames are inflated.
    inflater: Option<(flate2::Decompress, Vec<u8>)>,
    /// Bytes read off the socket since the upgrade or [`RawSubscriber::settle`]:
    /// what the wire carried.
    wire_bytes: u64,
    /// Text messages (first frames, opcode 1) since the upgrade or `settle`.
    messages: u64,
    /// Of those, the ones that came compressed (RSV1 set).
    compressed: u64,
}

/// What one pass over the buffered frames found.
#[derive(Default)]
struct Buffered {
    /// At least one frame was consumed.
    parsed: bool,
    /// A close frame arrived.
    closed: bool,
    /// The payload of a ping to answer.
    ping: Option<Vec<u8>>,
}

const BUFFER: usize = 64 << 10;

/// Opens `ws://{addr}{path}`: a plain HTTP/1.1 upgrade, checked for `101`.
pub async fn connect(addr: &str, path: &str) -> io::Result<RawSubscriber> {
    connect_with(addr, path, false).await
}

/// [`connect`], offering permessage-deflate as browsers do when `deflate`.
pub async fn connect_with(addr: &str, path: &str, deflate: bool) -> io::Result<RawSubscriber> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let offer = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = vec![0; BUFFER];
    let mut end = 0;
    let head_end = loop {
        let n = stream.read(&mut buf[end..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the upgrade",
            ));
        }
        end += n;
        if let Some(at) = buf[..end].windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if end == buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "upgrade response too long"));
        }
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        let line = String::from_utf8_lossy(&buf[..head_end])
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("upgrade refused: {line}"),
        ));
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let inflater = head
        .contains("sec-websocket-extensions: permessage-deflate")
        .then(|| (flate2::Decompress::new(false), Vec::new()));
    Ok(RawSubscriber {
        stream,
        buf,
        start: head_end,
        end,
        close_code: None,
        inflater,
        wire_bytes: (end - head_end) as u64,
        messages: 0,
        compressed: 0,
    })
}

/// Inflates one compressed message (the server takes no context over from
/// one message to the next, so the inflater starts afresh each time).
fn inflate<'a>(inflater: &mut flate2::Decompress, out: &'a mut Vec<u8>, payload: &[u8]) -> io::Result<&'a [u8]> {
    let bad = |_| io::Error::new(io::ErrorKind::InvalidData, "bad deflate data");
    inflater.reset(false);
    out.clear();
    for part in [payload, &[0x00, 0x00, 0xff, 0xff][..]] {
        let mut used = 0;
        loop {
            if out.capacity() - out.len() < 1024 {
                out.reserve(out.capacity().max(4096));
            }
            let (in_before, out_before) = (inflater.total_in(), inflater.total_out());
            inflater
                .decompress_vec(&part[used..], out, flate2::FlushDecompress::Sync)
                .map_err(bad)?;
            used += (inflater.total_in() - in_before) as usize;
            if used == part.len() && out.len() < out.capacity() {
                break;
            }
            if inflater.total_in() == in_before && inflater.total_out() == out_before {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "deflate data stuck"));
            }
        }
    }
    Ok(out)
}

/// One parsed frame: first byte (FIN, RSV, opcode), header length, payload length.
fn parse(b: &[u8]) -> Option<(u8, usize, usize)> {
    let (b0, b1) = (*b.first()?, *b.get(1)?);
    let (mut header, len) = match b1 & 0x7f {
        126 => (4, u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize),
        127 => (10, u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize),
        n => (2, n as usize),
    };
    if b1 & 0x80 != 0 {
        header += 4; // servers do not mask, but a mask key would sit here
    }
    (b.len() >= header + len).then_some((b0, header, len))
}

impl RawSubscriber {
    /// The code of the server's close frame, if it sent one.
    pub fn close_code(&self) -> Option<u16> {
        self.close_code
    }

    /// Whether the server accepted permessage-deflate.
    pub fn deflate(&self) -> bool {
        self.inflater.is_some()
    }

    /// Bytes read off the socket after the upgrade.
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes
    }

    /// Text messages received since the upgrade or [`RawSubscriber::settle`],
    /// whether or not they were decoded: a delivery is one text frame.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Of [`RawSubscriber::messages`], those that came compressed (RSV1).
    pub fn compressed(&self) -> u64 {
        self.compressed
    }

    /// Hands every complete text frame's payload to `on_text` (inflated when
    /// it came compressed): those already buffered, or else those one more
    /// read brings in. Returns `false` once the server closed the connection.
    pub async fn read_frames(&mut self, on_text: impl FnMut(&[u8])) -> io::Result<bool> {
        self.read(true, on_text).await
    }

    /// [`RawSubscriber::read_frames`] without decoding: only frame headers
    /// are parsed, messages and bytes counted, nothing inflated. A compressed
    /// frame on a connection that did not negotiate deflate is still an error.
    pub async fn count_frames(&mut self) -> io::Result<bool> {
        self.read(false, |_| {}).await
    }

    /// Counts what has already arrived (without waiting for more, and
    /// without decoding it), then zeroes the counters: what the server sent
    /// before a measurement (a `welcome`) is not counted in it. Returns the
    /// text messages it found. An error if the server closed the connection.
    pub async fn settle(&mut self) -> io::Result<u64> {
        loop {
            let found = self.parse_buffered(false, &mut |_| {})?;
            if found.closed {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!(
                        "closed by the server before the measurement, code {:?}",
                        self.close_code
                    ),
                ));
            }
            if let Some(p) = found.ping {
                self.pong(&p).await?;
            }
            self.compact();
            match self.stream.try_read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed before the measurement",
                    ))
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let before = self.messages;
        self.messages = 0;
        self.compressed = 0;
        // Whatever sits unparsed in the buffer is part of the measurement.
        self.wire_bytes = (self.end - self.start) as u64;
        Ok(before)
    }

    async fn read(&mut self, decode: bool, mut on_text: impl FnMut(&[u8])) -> io::Result<bool> {
        loop {
            let found = self.parse_buffered(decode, &mut on_text)?;
            if found.closed {
                return Ok(false);
            }
            if let Some(p) = found.ping {
                self.pong(&p).await?;
            }
            if found.parsed {
                return Ok(true);
            }
            self.compact();
            let n = self.stream.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Ok(false);
            }
            self.end += n;
            self.wire_bytes += n as u64;
        }
    }

    /// Consumes every complete frame in the buffer: counts text messages,
    /// and with `decode` hands their payloads (inflated) to `on_text`.
    fn parse_buffered(&mut self, decode: bool, on_text: &mut impl FnMut(&[u8])) -> io::Result<Buffered> {
        let mut found = Buffered::default();
        while let Some((first, header, len)) = parse(&self.buf[self.start..self.end]) {
            let payload = &self.buf[self.start + header..self.start + header + len];
            match first & 0x0f {
                0x1 => {
                    self.messages += 1;
                    let compressed = first & 0x40 != 0;
                    if compressed {
                        self.compressed += 1;
                    }
                    match (compressed, self.inflater.as_mut()) {
                        (true, None) => return Err(io::Error::new(io::ErrorKind::InvalidData, "RSV1 not negotiated")),
                        (true, Some((inflater, out))) if decode => on_text(inflate(inflater, out, payload)?),
                        (false, _) if decode => on_text(payload),
                        _ => {}
                    }
                }
                0x8 => {
                    self.close_code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                    found.closed = true;
                    return Ok(found);
                }
                0x9 => found.ping = Some(payload.to_vec()),
                _ => {}
            }
            self.start += header + len;
            found.parsed = true;
        }
        Ok(found)
    }

    /// Answers a ping: a masked pong with a zero key, the payload as it is.
    async fn pong(&mut self, payload: &[u8]) -> io::Result<()> {
        let mut frame = vec![0x8a, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).await
    }

    /// Keeps the unparsed tail at the front, with room for a large frame.
    fn compact(&mut self) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{connect_with, parse};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    #[test]
    fn frames_parse_only_when_complete() {
        assert_eq!(parse(&[0x81, 2, b'h', b'i']), Some((0x81, 2, 2)));
        assert_eq!(parse(&[0x81, 2, b'h']), None);
        let mut long = vec![0x81, 126, 0x01, 0x00];
        long.extend(std::iter::repeat_n(b'x', 256));
        assert_eq!(parse(&long), Some((0x81, 4, 256)));
        assert_eq!(parse(&long[..200]), None);
        assert_eq!(parse(&[0x88, 0]), Some((0x88, 2, 0)));
    }

    /// A server frame: FIN, RSV1 when `compressed`, text or close.
    fn frame(opcode: u8, compressed: bool, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut f = vec![0x80 | opcode | if compressed { 0x40 } else { 0 }, payload.len() as u8];
        f.extend_from_slice(payload);
        f
    }

    /// `text` compressed on its own, the sync-flush tail removed (RFC 7692).
    fn deflated(text: &str) -> Vec<u8> {
        let mut c = flate2::Compress::new(flate2::Compression::new(6), false);
        let mut out = Vec::with_capacity(256);
        c.compress_vec(text.as_bytes(), &mut out, flate2::FlushCompress::Sync)
            .expect("compresses");
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        out
    }

    /// A server that answers the upgrade (accepting deflate when `accept`)
    /// and then writes each batch it is sent, in order.
    async fn server(accept: bool) -> (String, mpsc::UnboundedSender<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("address").to_string();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accepts");
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                let mut byte = [0];
                socket.read_exact(&mut byte).await.expect("request");
                request.push(byte[0]);
            }
            let extension = if accept {
                "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n"
            } else {
                ""
            };
            let head = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n{extension}\r\n");
            socket.write_all(head.as_bytes()).await.expect("head");
            while let Some(batch) = rx.recv().await {
                socket.write_all(&batch).await.expect("batch");
            }
        });
        (addr, tx)
    }

    #[tokio::test]
    async fn counting_sees_every_message_and_its_bytes_without_decoding() {
        let (addr, tx) = server(true).await;
        let mut sub = connect_with(&addr, "/ws/g", true).await.expect("upgrade");
        assert!(sub.deflate());
        tx.send(frame(1, false, br#"{"type":"welcome"}"#)).expect("sent");
        let mut seen = Vec::new();
        while seen.is_empty() {
            assert!(sub.read_frames(|t| seen.push(t.to_vec())).await.expect("reads"));
        }
        // The welcome came before the measurement: counted, then forgotten.
        assert_eq!(sub.settle().await.expect("settles"), 1);
        assert_eq!((sub.messages(), sub.compressed(), sub.wire_bytes()), (0, 0, 0));

        // Decoded: a compressed frame comes out inflated.
        let first = frame(1, true, &deflated(r#"{"data":{"seq":0,"t":5}}"#));
        tx.send(first.clone()).expect("sent");
        seen.clear();
        while seen.is_empty() {
            assert!(sub.read_frames(|t| seen.push(t.to_vec())).await.expect("reads"));
        }
        assert_eq!(seen, [br#"{"data":{"seq":0,"t":5}}"#.to_vec()]);

        // Counted only: two more messages, one compressed, then a close.
        let rest = [
            frame(1, true, &deflated(r#"{"data":{"seq":1,"t":6}}"#)),
            frame(1, false, br#"{"data":{"seq":2,"t":7}}"#),
            frame(8, false, &1000u16.to_be_bytes()),
        ]
        .concat();
        tx.send(rest.clone()).expect("sent");
        while sub.count_frames().await.expect("counts") {}
        assert_eq!((sub.messages(), sub.compressed()), (3, 2));
        assert_eq!(sub.wire_bytes(), (first.len() + rest.len()) as u64);
        assert_eq!(sub.close_code(), Some(1000));
    }

    #[tokio::test]
    async fn a_compressed_frame_without_deflate_is_an_error_even_when_only_counting() {
        let (addr, tx) = server(false).await;
        let mut sub = connect_with(&addr, "/ws/g", true).await.expect("upgrade");
        assert!(!sub.deflate());
        tx.send(frame(1, true, &deflated("hello"))).expect("sent");
        let err = sub.count_frames().await.expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }
}
