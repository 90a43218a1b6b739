//! Helpers shared by the Redis store's integration tests.

use channelbox_core::{HistoryStore, NewMessage, PayloadKind, StreamPosition};
use channelbox_redis::RedisStore;

/// Saves one text message in `group` and waits until Redis has it.
pub(crate) async fn save(store: &RedisStore, group: &str, text: &str) -> StreamPosition {
    let message = NewMessage::new(PayloadKind::Text, text.to_owned().into());
    store
        .append(group, message)
        .expect("queued")
        .wait()
        .await
        .expect("saved")
}
