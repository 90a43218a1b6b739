//! The chat protocol of `channelbox-protocol` on a raw connection, with plain
//! tokio-tungstenite (feature `chat`, on by default).

use channelbox_protocol::{Admission, ChatService};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::{accept, attach, websocket_config, Error};

/// Serves the chat protocol on one raw connection: `GET /ws/{group}` upgrades,
/// anything else is refused with 404.
pub async fn serve_chat<S>(service: &ChatService, stream: S) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut admitted = None;
    let ws = accept(stream, config_for(service), |handshake| {
        let path = handshake.path();
        let Some(group) = path.strip_prefix("/ws/").filter(|g| !g.is_empty() && !g.contains('/')) else {
            return Err((404, r#"{"code":"not_found","message":"no such endpoint"}"#.to_owned()));
        };
        match service.admit_from(group, handshake.query(), handshake.origin()) {
            Ok(a) => {
                admitted = Some(a);
                Ok(())
            }
            Err(answer) => Err((answer.status, answer.body)),
        }
    })
    .await?;
    let Some(admission) = admitted else {
        return Err(Error::Handshake("the upgrade was not admitted".into()));
    };
    let (channel, incoming) = attach(ws, service.channel_config());
    service.run(admission, channel, incoming).await;
    Ok(())
}

/// Runs the chat protocol on a connection whose upgrade was already done by an
/// HTTP server (hyper's upgrade, for example) and admitted by
/// [`ChatService::admit`]: the socket speaks WebSocket from its first byte.
pub async fn serve_upgraded<S>(service: &ChatService, admission: Admission, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config_for(service))).await;
    let (channel, incoming) = attach(ws, service.channel_config());
    service.run(admission, channel, incoming).await;
}

/// The WebSocket settings for the service's limits.
fn config_for(service: &ChatService) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    let config = service.config();
    websocket_config(config.max_message_bytes, config.queue_bytes)
}
