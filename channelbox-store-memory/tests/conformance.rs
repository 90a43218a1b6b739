//! The core HistoryStore conformance suite, run against the memory store.

use std::sync::Arc;

use channelbox_core::HistoryStore;
use channelbox_store_memory::{MemoryConfig, MemoryStore};

#[tokio::test]
async fn memory_store_passes_the_conformance_suite() {
    channelbox_core::testkit::conformance::run_all(|limits| async move {
        Arc::new(MemoryStore::new(MemoryConfig { limits })) as Arc<dyn HistoryStore>
    })
    .await;
}
