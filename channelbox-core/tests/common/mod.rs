//! Helpers shared by the ChannelBox integration tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use channelbox_core::testkit::Recorder;
use channelbox_core::{Channel, ChannelBox, HistoryLimits, HistoryStore};
use channelbox_store_memory::{MemoryConfig, MemoryStore};
use serde_json::Value;

pub mod broker;

pub const WAIT: Duration = Duration::from_secs(10);

pub fn new_box(limits: HistoryLimits) -> ChannelBox {
    let store: Arc<dyn HistoryStore> = Arc::new(MemoryStore::new(MemoryConfig { limits }));
    ChannelBox::new(store)
}

pub fn json_of(recorder: &Recorder) -> Vec<Value> {
    recorder
        .texts()
        .iter()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect()
}

pub async fn wait_closed(channel: &Channel) {
    tokio::time::timeout(WAIT, channel.closed())
        .await
        .expect("channel closes");
}
