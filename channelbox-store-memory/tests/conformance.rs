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

/// Small messages live in their slot, larger ones in an allocation: either
/// way, at the boundary and around it, what is read back is what was saved.
#[tokio::test]
async fn messages_in_their_slot_and_beside_it_read_back_whole() {
    use bytes::Bytes;
    use channelbox_core::{NewMessage, PayloadKind, ReadQuery};

    let store = MemoryStore::default();
    let mut sent = Vec::new();
    for (meta, payload) in [
        (0, 0),
        (0, 20),
        (20, 0),
        (17, 3),
        (17, 4),
        (0, 21),
        (21, 0),
        (19, 1),
        (255, 300),
    ] {
        let message = NewMessage {
            kind: [PayloadKind::Json, PayloadKind::Text, PayloadKind::Binary][sent.len() % 3],
            payload: Bytes::from(vec![b'p'; payload]),
            meta: Bytes::from(vec![b'm'; meta]),
            timestamp_ms: 1_700_000_000_000 + sent.len() as u64,
        };
        store
            .append("g", message.clone())
            .expect("append")
            .wait()
            .await
            .expect("saved");
        sent.push(message);
    }
    let page = store.read("g", ReadQuery::Last(100)).await.expect("read");
    let got: Vec<NewMessage> = page
        .messages
        .into_iter()
        .map(|m| NewMessage {
            kind: m.kind,
            payload: m.payload,
            meta: m.meta,
            timestamp_ms: m.timestamp_ms,
        })
        .collect();
    assert_eq!(got, sent);
}
