//! Raw sockets for the hostile-client tests: a WebSocket handshake written by
//! hand, client frames built byte by byte, and reading what the server sends
//! until it closes — what an attacker's script would do.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a TCP connection and performs a WebSocket upgrade to `path` with
/// these extra headers; returns the socket and the HTTP status.
pub async fn upgrade(addr: &str, path: &str, headers: &[(&str, &str)]) -> (TcpStream, u16) {
    let (s, status, _) = upgrade_with_head(addr, path, headers).await;
    (s, status)
}

/// [`upgrade`], also returning the response head as text.
pub async fn upgrade_with_head(addr: &str, path: &str, headers: &[(&str, &str)]) -> (TcpStream, u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    // Read the response head byte by byte, so no frame after it is consumed.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("an answer to the upgrade")
            .expect("read");
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (s, status, text)
}

/// A masked client frame (clients must mask) with this opcode and payload.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    // A zero mask key: masking is then the identity.
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Reads server frames until a close frame arrives or the connection ends
/// (or `within` passes); returns the close code, if a close frame came.
pub async fn close_code(s: &mut TcpStream, within: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while buf.len() >= 2 {
            let len7 = (buf[1] & 0x7f) as usize;
            let (header, len) = match len7 {
                126 if buf.len() >= 4 => (4, u16::from_be_bytes([buf[2], buf[3]]) as usize),
                127 if buf.len() >= 10 => (10, u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize),
                126 | 127 => break,
                n => (2, n),
            };
            if buf.len() < header + len {
                break;
            }
            if buf[0] & 0x0f == 0x8 {
                let payload = &buf[header..header + len];
                return (len >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
            buf.drain(..header + len);
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// Whether the server closed the connection within `within` (EOF or reset);
/// what it sends before is skipped.
pub async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}
