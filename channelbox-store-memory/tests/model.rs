//! Property test: the memory store against the reference model of the history
//! contract.

use std::sync::Arc;
use std::time::Duration;

use channelbox_core::testkit::model::{check_against_model, history_ops};
use channelbox_core::{HistoryLimits, HistoryStore};
use channelbox_store_memory::{MemoryConfig, MemoryStore};
use proptest::prelude::*;

proptest! {
    #[test]
    fn memory_store_matches_the_model(
        ops in history_ops(60, false),
        max_bytes in 20u64..200,
        max_messages in proptest::option::of(1u64..8),
        aged in any::<bool>(),
    ) {
        let limits = HistoryLimits {
            max_bytes,
            max_messages,
            max_age: aged.then(|| Duration::from_secs(3600)),
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(check_against_model(limits.clone(), &ops, || {
            Arc::new(MemoryStore::new(MemoryConfig { limits: limits.clone() })) as Arc<dyn HistoryStore>
        }));
    }
}
