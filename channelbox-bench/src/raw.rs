//! A receive-only WebSocket client cut down to what the load generator needs,
//! so that reading is cheap per frame: one `read` fills a 64 KiB buffer, frames
//! are parsed in place and text payloads handed out as byte slices (no
//! allocation, no UTF-8 check, no per-frame message object). Pings are answered;
//! nothing else is ever sent. With [`connect_with`] it offers permessage-deflate
//! and inflates compressed frames (as a browser would) before handing them out.

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
    /// Bytes read off the socket after the upgrade: what the wire carried.
    wire_bytes: u64,
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

    /// Hands every complete text frame's payload to `on_text`: those already
    /// buffered, or else those one more read brings in. Returns `false` once the
    /// server closed the connection.
    pub async fn read_frames(&mut self, mut on_text: impl FnMut(&[u8])) -> io::Result<bool> {
        loop {
            let mut parsed = false;
            let mut pong = None;
            while let Some((first, header, len)) = parse(&self.buf[self.start..self.end]) {
                let payload = &self.buf[self.start + header..self.start + header + len];
                match first & 0x0f {
                    0x1 if first & 0x40 != 0 => match self.inflater.as_mut() {
                        Some((inflater, out)) => on_text(inflate(inflater, out, payload)?),
                        None => return Err(io::Error::new(io::ErrorKind::InvalidData, "RSV1 not negotiated")),
                    },
                    0x1 => on_text(payload),
                    0x8 => {
                        self.close_code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                        return Ok(false);
                    }
                    0x9 => pong = Some(payload.to_vec()),
                    _ => {}
                }
                self.start += header + len;
                parsed = true;
            }
            if let Some(p) = pong {
                // A masked pong with a zero key: the payload goes as it is.
                let mut frame = vec![0x8a, 0x80 | p.len() as u8, 0, 0, 0, 0];
                frame.extend_from_slice(&p);
                self.stream.write_all(&frame).await?;
            }
            if parsed {
                return Ok(true);
            }
            // Keep the unparsed tail at the front, with room for a large frame.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.end == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = self.stream.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Ok(false);
            }
            self.end += n;
            self.wire_bytes += n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

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
}
