//! The network the client tests need: a TCP proxy that cuts, refuses,
//! freezes or blackholes connections, and a scripted fake chat server.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// One forwarded connection's switches.
#[derive(Default)]
struct Link {
    frozen: AtomicBool,
    dead: AtomicBool,
}

/// A TCP proxy: `cut` drops every connection and refuses new ones until
/// `open`; `freeze` stops forwarding on the open connections without closing
/// them (half-open, as the client sees it); `blackhole` makes new connections
/// frozen from the start.
#[derive(Clone, Default)]
pub struct Proxy {
    refuse: Arc<AtomicBool>,
    blackhole: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<Arc<Link>>>>,
    accepted: Arc<AtomicUsize>,
}

impl Proxy {
    pub async fn start(target: String) -> (Proxy, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let proxy = Proxy::default();
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                p.accepted.fetch_add(1, Ordering::SeqCst);
                if p.refuse.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let link = Arc::new(Link::default());
                link.frozen.store(p.blackhole.load(Ordering::SeqCst), Ordering::SeqCst);
                p.links.lock().unwrap().push(link.clone());
                tokio::spawn(forward(client, target.clone(), link));
            }
        });
        (proxy, addr)
    }

    pub fn cut(&self) {
        self.refuse.store(true, Ordering::SeqCst);
        for l in self.links.lock().unwrap().drain(..) {
            l.dead.store(true, Ordering::SeqCst);
        }
    }

    pub fn freeze(&self) {
        for l in self.links.lock().unwrap().iter() {
            l.frozen.store(true, Ordering::SeqCst);
        }
    }

    pub fn blackhole(&self) {
        self.blackhole.store(true, Ordering::SeqCst);
    }

    pub fn open(&self) {
        self.refuse.store(false, Ordering::SeqCst);
        self.blackhole.store(false, Ordering::SeqCst);
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn forward(client: TcpStream, target: String, link: Arc<Link>) {
    let Ok(upstream) = TcpStream::connect(target).await else {
        return;
    };
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    tokio::select! {
        () = pump(cr, uw, &link) => {}
        () = pump(ur, cw, &link) => {}
    }
}

/// Copies one direction until either side closes or the link is cut; drops
/// what it reads while frozen.
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, link: &Link) {
    let mut buf = vec![0u8; 16384];
    loop {
        if link.dead.load(Ordering::SeqCst) {
            return;
        }
        let n = tokio::select! {
            n = from.read(&mut buf) => n.unwrap_or(0),
            () = tokio::time::sleep(Duration::from_millis(20)) => continue,
        };
        if n == 0 || link.dead.load(Ordering::SeqCst) {
            return;
        }
        if !link.frozen.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// What the fake server does.
pub enum Act {
    Send(Value),
    Wait(Duration),
    Close(u16),
}

/// A connection the fake server accepted: when, and what the client sent.
pub struct FakeConn {
    pub at: Instant,
    pub frames: Vec<Value>,
}

pub type Conns = Arc<Mutex<Vec<FakeConn>>>;

/// A scripted server: every connection gets a `welcome` (URL group `home`,
/// epoch `e1`, offset 0), then `on_open(n)`, then `on_frame(n, frame)` for
/// each frame; `n` counts connections from 1.
pub async fn fake<O, F>(on_open: O, on_frame: F) -> (String, Conns)
where
    O: Fn(usize) -> Vec<Act> + Send + Sync + 'static,
    F: Fn(usize, &Value) -> Vec<Act> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let conns: Conns = Arc::default();
    let (on_open, on_frame) = (Arc::new(on_open), Arc::new(on_frame));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let n = {
                let mut all = c.lock().unwrap();
                all.push(FakeConn {
                    at: Instant::now(),
                    frames: Vec::new(),
                });
                all.len()
            };
            let (c, on_open, on_frame) = (c.clone(), on_open.clone(), on_frame.clone());
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let welcome = json!({"type": "welcome", "channel_id": format!("c{n}"), "group": "home", "epoch": "e1", "offset": 0});
                let _ = ws.send(Message::text(welcome.to_string())).await;
                let mut acts = on_open(n);
                loop {
                    for act in acts.drain(..) {
                        match act {
                            Act::Send(v) => {
                                let _ = ws.send(Message::text(v.to_string())).await;
                            }
                            Act::Wait(d) => tokio::time::sleep(d).await,
                            Act::Close(code) => {
                                let frame = CloseFrame {
                                    code: CloseCode::from(code),
                                    reason: "scripted".into(),
                                };
                                let _ = ws.close(Some(frame)).await;
                                return;
                            }
                        }
                    }
                    let v: Value = match ws.next().await {
                        Some(Ok(Message::Text(text))) => serde_json::from_str(&text).unwrap(),
                        Some(Ok(_)) => continue,
                        _ => return,
                    };
                    acts = on_frame(n, &v);
                    c.lock().unwrap()[n - 1].frames.push(v);
                }
            });
        }
    });
    (addr, conns)
}

/// The waits between consecutive connections.
pub fn gaps(conns: &Conns) -> Vec<Duration> {
    let all = conns.lock().unwrap();
    all.windows(2).map(|w| w[1].at - w[0].at).collect()
}
