//! The tokio-tungstenite transport over real sockets: the chat protocol served
//! without warp, and a plain ChannelBox broadcast through `attach`.

use std::sync::Arc;
use std::time::Duration;

use channelbox_core::Incoming;
use channelbox_core::{ChannelBox, ChannelConfig, CloseReason, HistoryStore, PayloadType};
use channelbox_protocol::{ChatService, ProtocolConfig};
use channelbox_store_memory::MemoryStore;
use futures_util::StreamExt;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

async fn next_json<S: futures_util::Stream<Item = Incoming> + Unpin>(s: &mut S) -> Value {
    loop {
        match tokio::time::timeout(WAIT, s.next()).await.expect("a frame in time") {
            Some(Incoming::Text(t)) => return serde_json::from_str(&t).unwrap(),
            Some(Incoming::Ping | Incoming::Pong) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

async fn chat_server(config: ProtocolConfig) -> String {
    let service = ChatService::new(Arc::new(MemoryStore::default()), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let service = service.clone();
            tokio::spawn(async move {
                let _ = channelbox_ws::serve_chat(&service, tcp).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_chat_protocol_runs_on_plain_tokio_tungstenite() {
    let addr = chat_server(ProtocolConfig::default()).await;
    let (a, mut a_in) = channelbox_ws::connect(&format!("ws://{addr}/ws/room"), ChannelConfig::default())
        .await
        .unwrap();
    let welcome = next_json(&mut a_in).await;
    assert_eq!(welcome["type"], "welcome");
    a.try_send(channelbox_core::Frame::text(
        json!({"type": "publish", "data": 42, "ref": 1}).to_string(),
    ))
    .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(next_json(&mut a_in).await["type"].as_str().unwrap().to_owned());
    }
    seen.sort();
    assert_eq!(seen, vec!["message", "published"]);
    let refused = channelbox_ws::connect(&format!("ws://{addr}/ws/a%20b"), ChannelConfig::default()).await;
    assert!(refused.is_err(), "an invalid group is refused before the upgrade");
    let refused = channelbox_ws::connect(&format!("ws://{addr}/elsewhere"), ChannelConfig::default()).await;
    assert!(refused.is_err());
}

#[tokio::test]
async fn oversized_messages_are_reported_and_closed_with_1009() {
    let addr = chat_server(ProtocolConfig {
        max_message_bytes: 100,
        ..ProtocolConfig::default()
    })
    .await;
    let (a, mut a_in) = channelbox_ws::connect(&format!("ws://{addr}/ws/room"), ChannelConfig::default())
        .await
        .unwrap();
    next_json(&mut a_in).await;
    a.try_send(channelbox_core::Frame::text("x".repeat(500))).unwrap();
    assert_eq!(next_json(&mut a_in).await["code"], "too_large");
    let end = tokio::time::timeout(WAIT, a_in.next()).await.unwrap();
    assert_eq!(end, Some(Incoming::Close));
}

#[tokio::test]
async fn a_plain_channel_box_broadcasts_through_attach() {
    let store: Arc<dyn HistoryStore> = Arc::new(MemoryStore::default());
    let channels = ChannelBox::new(store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_box = channels.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let channels = server_box.clone();
            tokio::spawn(async move {
                let ws = channelbox_ws::accept(tcp, channelbox_ws::websocket_config(1 << 16, 1 << 20), |_| Ok(()))
                    .await
                    .unwrap();
                let config = ChannelConfig {
                    payload_type: PayloadType::Text,
                    ..ChannelConfig::default()
                };
                let (channel, mut incoming) = channelbox_ws::attach(ws, config);
                channels.add_channel_to_group(&channel, "all").await.unwrap();
                while let Some(Incoming::Text(t)) = incoming.next().await {
                    channels.group_send("all", t, false).await.unwrap();
                }
                channel.close(CloseReason::NORMAL);
            });
        }
    });
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(
            channelbox_ws::connect(&format!("ws://{addr}/"), ChannelConfig::default())
                .await
                .unwrap(),
        );
    }
    while channels.show_groups().await.get("all") != Some(&3) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    clients[0]
        .0
        .try_send(channelbox_core::Frame::text("hello all"))
        .unwrap();
    for (_, incoming) in clients.iter_mut() {
        let got = tokio::time::timeout(WAIT, incoming.next()).await.unwrap();
        assert_eq!(got, Some(Incoming::Text("hello all".into())));
    }
    // A channel stays open until closed (its writer task holds it): close the
    // clients, and the server's channels follow.
    for (channel, _) in &clients {
        channel.close(CloseReason::NORMAL);
    }
    tokio::time::timeout(WAIT, async {
        while !channels.show_groups().await.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("closed connections leave the group by themselves");
}
