//! Property test: random appends, reads, flushes and reopens of the sled store
//! give the same reads as the reference model.

use std::sync::Arc;

use channelbox_core::testkit::model::{check_against_model, history_ops, small_limits};
use channelbox_core::HistoryStore;
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
        limits in small_limits(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(check_against_model(limits.clone(), &ops, || {
            let config = SledConfig { limits: limits.clone(), cache_bytes: 1 << 20, ..SledConfig::new(&path) };
            Arc::new(SledStore::open(config).unwrap()) as Arc<dyn HistoryStore>
        }));
    }
}
