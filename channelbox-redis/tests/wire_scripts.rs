//! The Lua scripts write saved messages, resets and moves by hand: this runs
//! the real scripts on a Redis of the test's own, listens on the group's
//! channel like any other client, and reads every payload with the codec
//! (`channelbox_redis::wire`), so the scripts and the codec cannot drift.

use std::time::Duration;

use bytes::Bytes;
use channelbox_core::{Broker, HistoryStore, NewMessage, PayloadKind, StreamPosition};
use channelbox_redis::testkit::RedisServer;
use channelbox_redis::wire::Wire;
use channelbox_redis::{RedisConfig, RedisEngine};
use futures_util::StreamExt;
use uuid::Uuid;

const GROUP: &str = "wire-scripts";
const WAIT: Duration = Duration::from_secs(10);

fn message(payload: &'static [u8]) -> NewMessage {
    NewMessage {
        kind: PayloadKind::Binary,
        payload: Bytes::from_static(payload),
        meta: Bytes::from_static(b"who\nme"),
        timestamp_ms: 1_234,
    }
}

/// The next payload on the channel, decoded.
async fn next(payloads: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin)) -> Wire {
    let msg = tokio::time::timeout(WAIT, payloads.next())
        .await
        .expect("a payload within the deadline")
        .expect("the subscription stays open");
    Wire::decode(msg.get_payload_bytes()).expect("the codec reads what was published")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_scripts_publish_is_what_the_codec_reads() {
    let server = RedisServer::start();
    let engine = RedisEngine::connect(RedisConfig::new(server.url()))
        .await
        .expect("connect");
    let store = engine.store();
    let client = redis::Client::open(server.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe(format!("cb:{{{GROUP}}}:c")).await.expect("subscribe");
    let mut payloads = pubsub.into_on_message();
    // The append script, with and without `except`; payloads with newlines.
    let except = Uuid::new_v4();
    let first = message(b"one\ntwo");
    let at = store
        .append_except(GROUP, first.clone(), Some(except))
        .expect("queued")
        .wait()
        .await
        .expect("saved");
    assert_eq!(
        next(&mut payloads).await,
        Wire::Saved {
            position: at.clone(),
            except: Some(except),
            message: first,
        }
    );
    let second = message(b"\n");
    let at2 = store
        .append(GROUP, second.clone())
        .expect("queued")
        .wait()
        .await
        .expect("saved");
    assert_eq!(at2, StreamPosition::new(at.epoch.clone(), at.offset + 1));
    assert_eq!(
        next(&mut payloads).await,
        Wire::Saved {
            position: at2,
            except: None,
            message: second,
        }
    );

    // The flush script.
    let epoch = store.flush_group(GROUP).await.expect("flushed");
    assert_ne!(epoch, at.epoch);
    assert_eq!(next(&mut payloads).await, Wire::Reset { epoch: epoch.clone() });

    // The rollback check: counters that disagree with the stream move the
    // group to a new epoch before the next append, which follows the move.
    let third = message(b"3");
    let at3 = store
        .append(GROUP, third.clone())
        .expect("queued")
        .wait()
        .await
        .expect("saved");
    assert_eq!(at3, StreamPosition::new(epoch.clone(), 1));
    assert_eq!(
        next(&mut payloads).await,
        Wire::Saved {
            position: at3,
            except: None,
            message: third,
        }
    );
    server
        .run(&["HSET", &format!("cb:{{{GROUP}}}:h"), "n", "99"])
        .expect("stale counters");
    let fourth = message(b"4");
    let at4 = store
        .append(GROUP, fourth.clone())
        .expect("queued")
        .wait()
        .await
        .expect("saved");
    assert_ne!(at4.epoch, epoch, "the append ran in a new epoch");
    assert_eq!(
        next(&mut payloads).await,
        Wire::Moved {
            position: StreamPosition::new(at4.epoch.clone(), 1),
        }
    );
    assert_eq!(
        next(&mut payloads).await,
        Wire::Saved {
            position: StreamPosition::new(at4.epoch.clone(), 2),
            except: None,
            message: fourth,
        }
    );

    // And what Rust publishes on the same channel.
    let unsaved = message(b"live");
    engine
        .broker()
        .publish_unsaved(GROUP, &unsaved, None)
        .await
        .expect("published");
    match next(&mut payloads).await {
        Wire::Unsaved { except, message, .. } => assert_eq!((except, message), (None, unsaved)),
        other => panic!("expected the unsaved message, got {other:?}"),
    }
}
