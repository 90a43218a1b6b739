//! The bare writer of `cargo xtask bench`: the ceiling of what any server can
//! deliver on this machine. It does nothing but write: every text frame a
//! client sends becomes one `message` frame in the chat server's own envelope,
//! encoded once, and a batch of them goes to every connected client (the
//! sender included) in one `send` each, batches sized so that the frames per
//! `send` reached (partial writes counted, as the chat server counts them)
//! come to `--frames-per-send`. Nothing is queued per client beyond what a
//! socket refuses, nothing is parsed per delivery, no task runs per client on
//! the write side.
//!
//! Run at the frames per `send` the chat server achieved in the same run, the
//! chat server's share of its deliveries per second is the share of the
//! machine's limit it reaches. `GET /count` answers the connected clients and
//! `GET /metrics` the same `channelbox_socket_writes_total` and
//! `channelbox_messages_delivered_total` the chat server reports.

use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::time::Duration;

use clap::Parser;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(default_value = "127.0.0.1:0")]
    addr: String,
    /// Frames per `send` to reach, counted as the chat server counts them:
    /// frames delivered over writes, where a socket that takes part of a
    /// batch costs another write. Batches (a batch waits for its messages, or
    /// for 20 ms without one at the end of a run) grow while the average is
    /// below this and shrink while it is above, up to `MAX_BATCH`.
    #[arg(long, default_value_t = 1)]
    frames_per_send: usize,
}

/// A client's write side: what its socket refused waits in `backlog`.
struct Client {
    socket: OwnedWriteHalf,
    backlog: RefCell<Vec<u8>>,
    closed: Cell<bool>,
}

/// The largest batch: the load generator keeps at most 100 messages in
/// flight, and a batch waiting for more would wait for its timeout.
const MAX_BATCH: usize = 90;

/// A client whose socket refuses more than this is dropped.
const MAX_BACKLOG: usize = 8 << 20;

#[derive(Default)]
struct Server {
    clients: RefCell<Vec<Rc<Client>>>,
    writes: Cell<u64>,
    frames: Cell<u64>,
}

impl Server {
    /// Writes `batch` to `client` at once, or keeps what the socket refused
    /// for a task that waits until it can take more.
    fn offer(self: &Rc<Self>, client: &Rc<Client>, batch: &[u8]) {
        let mut backlog = client.backlog.borrow_mut();
        if !backlog.is_empty() {
            if backlog.len() + batch.len() > MAX_BACKLOG {
                client.closed.set(true);
            } else {
                backlog.extend_from_slice(batch);
            }
            return;
        }
        let written = match client.socket.try_write(batch) {
            Ok(n) => {
                self.writes.set(self.writes.get() + 1);
                n
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => {
                client.closed.set(true);
                return;
            }
        };
        if written < batch.len() {
            backlog.extend_from_slice(&batch[written..]);
            tokio::task::spawn_local(drain(self.clone(), client.clone()));
        }
    }
}

/// Writes a client's backlog as its socket takes it.
async fn drain(server: Rc<Server>, client: Rc<Client>) {
    while !client.closed.get() {
        if client.socket.writable().await.is_err() {
            break;
        }
        let mut backlog = client.backlog.borrow_mut();
        match client.socket.try_write(&backlog) {
            Ok(n) => {
                server.writes.set(server.writes.get() + 1);
                backlog.drain(..n);
                if backlog.is_empty() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    client.closed.set(true);
}

/// Appends a `message` frame in the chat server's envelope for a `publish`.
fn encode(publish: &[u8], batch: &mut Vec<u8>) {
    let data = serde_json::from_slice::<Value>(publish)
        .map(|v| v["data"].to_string())
        .unwrap_or_else(|_| "null".into());
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let text = format!(
        r#"{{"type":"message","group":"bench","offset":null,"epoch":"0f1e2d3c4b5a6978-0.0","from":"67e55044-10b1-426f-9247-bb680e5fe0c8","ts":{ts},"data":{data}}}"#
    );
    batch.push(0x81);
    match text.len() {
        n if n < 126 => batch.push(n as u8),
        n if n < 1 << 16 => {
            batch.push(126);
            batch.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            batch.push(127);
            batch.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    batch.extend_from_slice(text.as_bytes());
}

/// Gathers batches of publishes and writes each to every client.
async fn write_batches(server: Rc<Server>, mut publishes: mpsc::Receiver<Vec<u8>>, target: usize) {
    let mut batch = Vec::new();
    let mut per_send = target.clamp(1, MAX_BATCH);
    while let Some(first) = publishes.recv().await {
        batch.clear();
        encode(&first, &mut batch);
        let mut frames = 1;
        while frames < per_send {
            let next = match publishes.try_recv() {
                Ok(p) => Some(p),
                Err(_) => tokio::time::timeout(Duration::from_millis(20), publishes.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            let Some(p) = next else { break };
            encode(&p, &mut batch);
            frames += 1;
        }
        server.clients.borrow_mut().retain(|c| !c.closed.get());
        let clients = server.clients.borrow().clone();
        server.frames.set(server.frames.get() + (frames * clients.len()) as u64);
        for client in &clients {
            server.offer(client, &batch);
        }
        // Steer the average actually reached toward the target.
        let reached = server.frames.get() as f64 / server.writes.get().max(1) as f64;
        if reached < target as f64 {
            per_send = (per_send + 1).min(MAX_BATCH);
        } else if reached > target as f64 * 1.02 {
            per_send = per_send.saturating_sub(1).max(1);
        }
    }
}

/// Reads a client's frames (masked, as clients send them) and hands each text
/// payload to the writer.
async fn read_frames(mut socket: OwnedReadHalf, mut buf: Vec<u8>, publishes: mpsc::Sender<Vec<u8>>) -> io::Result<()> {
    loop {
        while let Some((opcode, header, len)) = frame_at(&buf) {
            let mut payload = buf[header..header + len].to_vec();
            let mask: [u8; 4] = buf[header - 4..header].try_into().unwrap_or([0; 4]);
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
            buf.drain(..header + len);
            match opcode {
                0x1 if publishes.send(payload).await.is_err() => return Ok(()),
                0x8 => return Ok(()),
                _ => {}
            }
        }
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A complete masked frame at the start of `b`: opcode, header length
/// (mask key included), payload length.
fn frame_at(b: &[u8]) -> Option<(u8, usize, usize)> {
    let (b0, b1) = (*b.first()?, *b.get(1)?);
    let (header, len) = match b1 & 0x7f {
        126 => (8, u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize),
        127 => (14, u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize),
        n => (6, n as usize),
    };
    (b1 & 0x80 != 0 && b.len() >= header + len).then_some((b0 & 0x0f, header, len))
}

/// One accepted connection: a WebSocket upgrade, `/count`, `/metrics` or 404.
async fn connection(server: Rc<Server>, mut tcp: TcpStream, publishes: mpsc::Sender<Vec<u8>>) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut head = Vec::new();
    let end = loop {
        let mut chunk = [0u8; 1024];
        let n = tcp.read(&mut chunk).await?;
        if n == 0 || head.len() > 16 << 10 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    let path = text.split_whitespace().nth(1).unwrap_or("/");
    let key = text.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_owned())
    });
    let body = match (path, key) {
        (p, Some(key)) if p.starts_with("/ws/") => {
            let accept = derive_accept_key(key.as_bytes());
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            tcp.write_all(answer.as_bytes()).await?;
            let (read, write) = tcp.into_split();
            let client = Rc::new(Client {
                socket: write,
                backlog: RefCell::default(),
                closed: Cell::new(false),
            });
            server.clients.borrow_mut().push(client.clone());
            let result = read_frames(read, head[end..].to_vec(), publishes).await;
            client.closed.set(true);
            return result;
        }
        ("/count", _) => server
            .clients
            .borrow()
            .iter()
            .filter(|c| !c.closed.get())
            .count()
            .to_string(),
        ("/metrics", _) => format!(
            "channelbox_socket_writes_total {}\nchannelbox_messages_delivered_total {}\n",
            server.writes.get(),
            server.frames.get()
        ),
        _ => String::new(),
    };
    let status = if body.is_empty() { "404 Not Found" } else { "200 OK" };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(answer.as_bytes()).await?;
    tcp.shutdown().await
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(&args.addr).await?;
        println!("listening on http://{}", listener.local_addr()?);
        let server = Rc::new(Server::default());
        let (publishes, incoming) = mpsc::channel(1024);
        tokio::task::spawn_local(write_batches(server.clone(), incoming, args.frames_per_send.max(1)));
        loop {
            let (tcp, _) = listener.accept().await?;
            tokio::task::spawn_local(connection(server.clone(), tcp, publishes.clone()));
        }
    })
}
