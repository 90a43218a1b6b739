//! A group-broadcast server on plain tokio-tungstenite, no web framework: each
//! connection to `ws://ADDR/{group}` joins that group, and every text frame a
//! member sends is broadcast to the whole group (saved in an in-memory history).
//! It shows that channelbox-core needs nothing but a `FrameSink`.
//!
//! ```sh
//! cargo run -p channelbox-ws --example broadcast -- 127.0.0.1:9000
//! ```

use std::sync::Arc;

use channelbox_core::Incoming;
use channelbox_core::{ChannelBox, ChannelConfig, HistoryStore, PayloadType};
use channelbox_store_memory::MemoryStore;
use futures_util::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9000".into());
    let store: Arc<dyn HistoryStore> = Arc::new(MemoryStore::default());
    let channels = ChannelBox::new(store);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on ws://{}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let channels = channels.clone();
        tokio::spawn(async move {
            let mut group = String::new();
            let config = channelbox_ws::websocket_config(64 * 1024, 1 << 20);
            let accepted = channelbox_ws::accept(tcp, config, |handshake| {
                let path = handshake.path();
                group = path.trim_start_matches('/').to_owned();
                if group.is_empty() {
                    Err((404, r#"{"code":"not_found","message":"connect to /{group}"}"#.into()))
                } else {
                    Ok(())
                }
            })
            .await;
            let Ok(ws) = accepted else { return };
            let config = ChannelConfig {
                payload_type: PayloadType::Text,
                ..ChannelConfig::default()
            };
            let (channel, mut incoming) = channelbox_ws::attach(ws, config);
            if channels.add_channel_to_group(&channel, &group).await.is_err() {
                return;
            }
            while let Some(frame) = incoming.next().await {
                if let Incoming::Text(text) = frame {
                    let _ = channels.group_send(&group, text, true).await;
                }
            }
            // The channel leaves its group by itself once it is closed.
            channel.close(channelbox_core::CloseReason::NORMAL);
        });
    }
}
