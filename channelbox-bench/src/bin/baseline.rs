//! The baseline for the loopback benchmark: a group chat written the way the
//! warp websocket tutorial writes it — a lock around a map of per-user unbounded
//! senders, and a `Message` cloned for every member. Every text frame a client
//! sends is forwarded to every connected client, the sender included.
//! `GET /count` answers the number of connected clients.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, RwLock};
use warp::ws::{Message, WebSocket};
use warp::Filter;

type Users = Arc<RwLock<HashMap<usize, mpsc::UnboundedSender<Message>>>>;

static NEXT_USER_ID: AtomicUsize = AtomicUsize::new(1);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    let users = Users::default();
    let users_filter = {
        let users = users.clone();
        warp::any().map(move || users.clone())
    };
    let chat = warp::path!("ws" / String)
        .and(warp::ws())
        .and(users_filter.clone())
        .map(|_group: String, ws: warp::ws::Ws, users: Users| {
            ws.on_upgrade(move |socket| user_connected(socket, users))
        });
    let count = warp::path!("count")
        .and(users_filter)
        .then(|users: Users| async move { users.read().await.len().to_string() });
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    warp::serve(chat.or(count)).incoming(listener).run().await;
    Ok(())
}

async fn user_connected(ws: WebSocket, users: Users) {
    let my_id = NEXT_USER_ID.fetch_add(1, Ordering::Relaxed);
    let (mut user_ws_tx, mut user_ws_rx) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if user_ws_tx.send(message).await.is_err() {
                break;
            }
        }
    });
    users.write().await.insert(my_id, tx);
    while let Some(Ok(msg)) = user_ws_rx.next().await {
        if let Ok(text) = msg.to_str() {
            for tx in users.read().await.values() {
                let _ = tx.send(Message::text(text));
            }
        }
    }
    users.write().await.remove(&my_id);
}
