//! Property test: random appends, reads, flushes and reopens of the sled store
//! give the same reads as the reference model.

use std::sync::Arc;
use std::time::Duration;

use channelbox_core::testkit::model::{check_against_model, history_ops};
use channelbox_core::{HistoryLimits, HistoryStore};
use channelbox_store_sled::{SledConfig, SledStore};
use proptest::prelude::*;

proptest! {
    // Each case opens real directories; the case count stays modest by default
    // and `cargo xtask proptest` raises it.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]
    #[test]
    fn sled_store_with_reopens_matches_the_model(
        ops in history_ops(50, true),
        max_bytes in 20u64..200,
        max_messages in proptest::option::of(1u64..8),
        aged in any::<bool>(),
    ) {
        let limits = HistoryLimits {
            max_bytes,
            max_messages,
            max_age: aged.then(|| Duration::from_secs(3600)),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(check_against_model(limits.clone(), &ops, || {
            let config = SledConfig { limits: limits.clone(), cache_bytes: 1 << 20, ..SledConfig::new(&path) };
            Arc::new(SledStore::open(config).unwrap()) as Arc<dyn HistoryStore>
        }));
    }
}
