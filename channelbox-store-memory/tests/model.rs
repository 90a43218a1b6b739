//! Property test: the memory store against the reference model of the history
//! contract.

use std::sync::Arc;

use channelbox_core::testkit::model::{check_against_model, history_ops, small_limits};
use channelbox_core::HistoryStore;
use channelbox_store_memory::{MemoryConfig, MemoryStore};
use proptest::prelude::*;

proptest! {
    #[test]
    fn memory_store_matches_the_model(
        ops in history_ops(60, false),
        limits in small_limits(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(check_against_model(limits.clone(), &ops, || {
            Arc::new(MemoryStore::new(MemoryConfig { limits: limits.clone() })) as Arc<dyn HistoryStore>
        }));
    }
}
