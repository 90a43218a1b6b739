//! Test support: the real chat server binary on 127.0.0.1:0, a WebSocket
//! client, and a minimal HTTP/1.1 client.
#![allow(dead_code, unreachable_pub)]

pub mod ledger;
pub mod raw;
pub mod sse;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

pub const WAIT: Duration = Duration::from_secs(10);

/// The headers of a well-formed WebSocket upgrade request.
pub const UPGRADE: [(&str, &str); 4] = [
    ("Connection", "Upgrade"),
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

/// The `channelbox` binary of this crate (or the one named by
/// `CHANNELBOX_CHAT_BIN`, to measure another build with the same tests).
/// Suites of other crates that share this module (channelbox-warp's
/// `filters`) get the chat example built next to their test binary.
pub fn chat_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("CHANNELBOX_CHAT_BIN") {
        return PathBuf::from(bin);
    }
    if let Some(bin) = option_env!("CARGO_BIN_EXE_channelbox") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("examples").join("chat")
}

/// The hostile suite runs only when asked (`CHANNELBOX_HOSTILE=1`, set by
/// `cargo xtask ci` for a release build): its attacks take seconds each and
/// its memory bounds are the release server's. Without the variable the test
/// fails with the command to run, rather than passing without testing.
pub fn hostile_suite_requested() {
    assert!(
        std::env::var_os("CHANNELBOX_HOSTILE").is_some_and(|v| v == "1"),
        "the hostile suite runs with CHANNELBOX_HOSTILE=1 in release: \
         CHANNELBOX_HOSTILE=1 cargo test --release -p channelbox-server --test hostile"
    );
}

/// Resident memory of a process, from /proc.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU time a process has used (user and system), from /proc, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after it do not.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Parses a server frame. The protocol allows 128 levels of nesting, one more
/// than serde_json's default recursion limit.
pub fn parse_json(text: &str) -> Value {
    use serde::Deserialize;
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    Value::deserialize(&mut de).expect("JSON")
}

/// A running chat server; killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    /// A server with the in-memory store.
    pub fn memory() -> Server {
        Self::start(&["--store", "memory"])
    }

    pub fn start(args: &[&str]) -> Server {
        Self::start_env(args, &[])
    }

    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_under(&[], args, env)
    }

    /// Starts the server through a wrapper that execs it (`prlimit …`), so
    /// that the child's pid is the server's.
    pub fn start_under(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::launch(wrapper, "127.0.0.1:0", args, env)
    }

    /// Starts the server on a given address (to restart it where clients
    /// reconnect).
    pub fn start_on(addr: &str, args: &[&str]) -> Server {
        Self::launch(&[], addr, args, &[])
    }

    fn launch(wrapper: &[&str], addr: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(chat_binary());
                c
            }
            None => Command::new(chat_binary()),
        };
        let mut child = command
            .args(["--addr", addr])
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the chat server");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the start-up line");
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected start-up line {line:?}"))
            .to_owned();
        Server { child, addr }
    }

    /// The server's resident memory now.
    pub fn rss(&self) -> u64 {
        rss_bytes(self.child.id())
    }

    /// A value of the server's `/metrics`, by series name.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = get(&self.addr, "/metrics").await.body;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in {text}"))
    }

    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{path_and_query}", self.addr)
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(&mut self) -> i32 {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not exit within 15 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client speaking JSON.
pub struct Client {
    pub ws: Ws,
}

/// What the server did next.
#[derive(Debug, PartialEq)]
pub enum Event {
    Json(Value),
    Closed(Option<u16>),
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("websocket connect");
        Client { ws }
    }

    /// Connects and reads the welcome frame.
    pub async fn join(url: &str) -> (Client, Value) {
        let mut c = Client::connect(url).await;
        let welcome = c.recv().await;
        assert_eq!(welcome["type"], "welcome", "the first frame is welcome: {welcome}");
        (c, welcome)
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.expect("send");
    }

    /// Sends a text frame, reporting failure instead of panicking.
    pub async fn ws_send_raw(&mut self, s: String) -> Result<(), ()> {
        self.ws.send(Message::text(s)).await.map_err(|_| ())
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s.to_owned())).await.expect("send");
    }

    pub async fn send_binary(&mut self, b: &[u8]) {
        self.ws.send(Message::binary(b.to_vec())).await.expect("send");
    }

    /// A text frame whose payload is not UTF-8, written as a raw frame.
    pub async fn send_invalid_utf8(&mut self) {
        let frame = Frame::message(vec![0xff, 0xfe, 0xfd], OpCode::Data(Data::Text), true);
        self.ws.send(Message::Frame(frame)).await.expect("send");
    }

    pub async fn next_event(&mut self) -> Event {
        loop {
            let item = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame within 10 s");
            match item {
                Some(Ok(Message::Text(t))) => return Event::Json(parse_json(&t)),
                Some(Ok(Message::Close(f))) => return Event::Closed(f.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Event::Closed(None),
            }
        }
    }

    pub async fn recv(&mut self) -> Value {
        match self.next_event().await {
            Event::Json(v) => v,
            Event::Closed(code) => panic!("closed ({code:?}) while a frame was expected"),
        }
    }

    /// The next frame of this type, skipping others.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// Reads until the server closes; returns the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            if let Event::Closed(code) = self.next_event().await {
                return code;
            }
        }
    }

    /// Publishes and reads both the `published` reply and the sender's own
    /// `message`, which may come in either order.
    pub async fn publish(&mut self, mut v: Value, reference: &str) -> (Value, Value) {
        v["type"] = Value::from("publish");
        v["ref"] = Value::from(reference);
        self.send(v).await;
        let (mut published, mut message) = (None, None);
        while published.is_none() || message.is_none() {
            let r = self.recv().await;
            match r["type"].as_str() {
                Some("published") if r["ref"] == reference => published = Some(r),
                Some("message") if message.is_none() => message = Some(r),
                _ => {}
            }
        }
        (published.unwrap_or_default(), message.unwrap_or_default())
    }

    /// Sends a request with a ref and returns the reply carrying it.
    pub async fn request(&mut self, mut v: Value, reference: &str) -> Value {
        v["ref"] = Value::from(reference);
        self.send(v).await;
        loop {
            let r = self.recv().await;
            if r["ref"] == reference {
                return r;
            }
        }
    }
}

/// An HTTP answer: status, content type and body.
#[derive(Debug)]
pub struct Http {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
}

impl Http {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("JSON body, got {:?}", self.body))
    }
}

/// One HTTP/1.1 request with `Connection: close`.
pub async fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Http {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("connection")) {
        req.push_str("Connection: close\r\n");
    }
    // Publishes need a JSON content type; tests of its absence set their own.
    if method == "POST" && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("answer")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {text:?} for {method} {path}"));
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    let content_type = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-type")
            .then(|| value.trim().to_owned())
    });
    Http {
        status,
        content_type,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n.min(rest.len())]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

pub async fn get(addr: &str, path: &str) -> Http {
    http(addr, "GET", path, &[], b"").await
}
