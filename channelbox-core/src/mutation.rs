//! Deliberately injected bugs for `cargo xtask chaos --mutation NAME`, which
//! must catch each of them: proof that the fault checker can fail. They exist
//! only in a build with the `chaos-mutations` feature, and even there only the
//! one named by the `CHANNELBOX_MUTATION` environment variable is active.
//! Without the feature [`active`] is a constant `false` and the seams compile
//! away.
//!
//! The seams, one line each:
//! - `drop_gap_fill` (core, `channel_box/cluster.rs`, `fill_gaps`): a server
//!   of a cluster never fills a gap in what Redis delivered;
//! - `recover_always_complete` (core, `channel_box/recovery.rs`,
//!   `is_complete` and `ReplayPlan::new`): every recovery claims to be
//!   complete, across a new epoch too;
//! - `ack_before_durable` (channelbox-store-sled, `writer.rs`, where a batch
//!   is flushed): a write counts as durable without sled's flush;
//! - `skip_epoch_change` (channelbox-redis, `scripts.rs`, `check`): a group
//!   whose head in Redis came back below the caller's floor (a restart from
//!   an older snapshot) keeps its epoch, and its offsets are handed out again.

/// Whether the injected bug `name` is active in this process.
#[cfg(feature = "chaos-mutations")]
pub fn active(name: &str) -> bool {
    static CHOSEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    CHOSEN
        .get_or_init(|| std::env::var("CHANNELBOX_MUTATION").ok())
        .as_deref()
        == Some(name)
}

/// Whether the injected bug `name` is active: never, without the
/// `chaos-mutations` feature.
#[cfg(not(feature = "chaos-mutations"))]
#[inline(always)]
pub fn active(_name: &str) -> bool {
    false
}
