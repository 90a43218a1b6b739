//! The push's cache line: what the compile-time check of `mod.rs` assumes
//! about std's mutex, checked where it can be, at run time.

use super::*;
use crate::testkit::test_channel;

#[tokio::test]
async fn a_push_touches_only_the_first_cache_line_of_a_channel() {
    let (channel, _recorder) = test_channel(ChannelConfig::default());
    let shared = &*channel.shared;
    let base = shared as *const Shared as usize;
    assert_eq!(base % 64, 0, "the channel's state starts a cache line");
    let q = channel.lock();
    let queue = &*q as *const Queue as usize;
    let phase = &q.phase as *const Phase as usize;
    assert_eq!(
        queue - base,
        std::mem::offset_of!(Shared, queue) + 8,
        "the lock's header is 8 bytes"
    );
    assert!(phase - base < 64, "the queue's hot fields end inside the first line");
    let wake = &q.wake as *const Wake as usize;
    assert!(wake > phase && wake - base < 64, "the last of them, `wake`, too");
    let written = &shared.written as *const AtomicU64 as usize;
    assert!(written - base < 64, "what `warm` loads is on that line");
}
