//! Fuzzing the frame decoder and dispatcher with proptest: arbitrary bytes,
//! arbitrary JSON-ish text and mutated valid frames, fed to a real session. The
//! session must never panic, must answer every text frame that is not a valid
//! request object with `bad_request`, and must keep the connection open.
//! `cargo xtask fuzz` runs it with many more cases.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use channelbox_core::testkit::test_channel;
use channelbox_protocol::{ChatService, Incoming, ProtocolConfig};
use channelbox_store_memory::MemoryStore;
use futures_util::StreamExt;
use proptest::prelude::*;
use serde_json::Value;

fn frame() -> impl Strategy<Value = Incoming> {
    let valid = prop_oneof![
        Just(r#"{"type":"publish","data":{"t":1}}"#.to_owned()),
        Just(r#"{"type":"join","group":"other"}"#.to_owned()),
        Just(r#"{"type":"leave","group":"fuzz"}"#.to_owned()),
        Just(r#"{"type":"history","limit":3}"#.to_owned()),
        Just(r#"{"type":"groups","ref":1}"#.to_owned()),
        Just(r#"{"type":"direct","to":"00000000-0000-4000-8000-000000000000","data":1}"#.to_owned()),
        Just(r#"{"type":"ping","ref":"x"}"#.to_owned()),
    ];
    // Valid frames with a slice cut out or a character swapped in.
    let mutated = (valid.clone(), any::<prop::sample::Index>(), any::<char>()).prop_map(|(s, i, c)| {
        let mut chars: Vec<char> = s.chars().collect();
        let at = i.index(chars.len());
        chars[at] = c;
        chars.into_iter().collect::<String>()
    });
    prop_oneof![
        3 => valid.prop_map(Incoming::Text),
        4 => mutated.prop_map(Incoming::Text),
        2 => ".{0,64}".prop_map(Incoming::Text),
        2 => "[\\[\\]{}\":,a-z0-9 ]{0,64}".prop_map(Incoming::Text),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| Incoming::Binary(Bytes::from(b))),
        1 => Just(Incoming::Ping),
        1 => Just(Incoming::Pong),
    ]
}

async fn run(frames: Vec<Incoming>) {
    let service = ChatService::new(Arc::new(MemoryStore::default()), ProtocolConfig::default());
    let (channel, rec) = test_channel(service.channel_config());
    let admission = service.admit("fuzz", None).expect("admitted");
    let data_frames = frames
        .iter()
        .filter(|f| matches!(f, Incoming::Text(_) | Incoming::Binary(_)))
        .count();
    let malformed: usize = frames
        .iter()
        .filter(|f| match f {
            Incoming::Text(t) => !serde_json::from_str::<Value>(t).is_ok_and(|v| v.is_object()),
            Incoming::Binary(_) => true,
            _ => false,
        })
        .count();
    // The stream stays open after the frames (like a client that keeps the
    // socket), so the session cannot close the channel under the replies.
    let incoming = Box::pin(futures_util::stream::iter(frames).chain(futures_util::stream::pending()));
    let session = tokio::spawn({
        let service = service.clone();
        let channel = channel.clone();
        async move { service.run(admission, channel, incoming).await }
    });
    // Every data frame is answered by at least one frame (besides welcome).
    let got = rec.wait_for(1 + data_frames, Duration::from_secs(5)).await;
    assert!(
        got.len() > data_frames,
        "every frame was answered: {} of {data_frames}",
        got.len() - 1
    );
    let bad = got
        .iter()
        .filter_map(|f| serde_json::from_str::<Value>(f.as_text().expect("text")).ok())
        .filter(|v| v["code"] == "bad_request")
        .count();
    assert!(
        bad >= malformed,
        "{bad} bad_request answers for {malformed} malformed frames"
    );
    assert!(!channel.is_closed(), "bad input never closes the connection");
    channel.close(channelbox_core::CloseReason::NORMAL);
    session.await.expect("the session did not panic");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(128),
        ..ProptestConfig::default()
    })]
    #[test]
    fn fuzz_the_dispatcher_never_panics_and_answers_bad_input(frames in proptest::collection::vec(frame(), 1..24)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run(frames));
    }
}
