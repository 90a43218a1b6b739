//! The core HistoryStore conformance suite, run against the sled store.

use std::sync::Arc;

use channelbox_core::HistoryStore;
use channelbox_store_sled::{SledConfig, SledStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    channelbox_core::testkit::conformance::run_all(|limits| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.path().join(format!("store-{i}"));
        async move {
            Arc::new(
                SledStore::open(SledConfig {
                    limits,
                    ..SledConfig::new(path)
                })
                .unwrap(),
            ) as Arc<dyn HistoryStore>
        }
    })
    .await;
}
