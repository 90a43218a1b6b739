//! Heartbeats (docs/protocol.md "Heartbeats"): every `ping_interval` each
//! connection is sent a WebSocket ping, and a connection from which nothing
//! has arrived — no frame of any kind, pongs included — for `ping_interval`
//! plus `pong_timeout` is closed with 4003 `no pong` and leaves its groups at
//! once. Browsers and WebSocket libraries answer pings by themselves.
//!
//! One task per service walks the connections it runs ([`super::peers`]) a
//! few times a second;
//! a connection costs no timer of its own, only the timestamp its session
//! updates ([`Channel::heard`](channelbox_core::Channel::heard)).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use channelbox_core::{Channel, CloseReason, Frame};
use tokio::time::Instant;

use super::{ChatService, Inner};

impl ChatService {
    /// Starts the heartbeat task, once per service, when heartbeats are on.
    pub(super) fn start_heartbeats(&self) {
        let Some(interval) = self.inner.config.ping_interval else {
            return;
        };
        if self.inner.heartbeats.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(beat(weak, interval, self.inner.config.pong_timeout));
    }
}

/// Pings every connection each `interval`; closes the silent ones. Ends when
/// the service is dropped.
async fn beat(service: Weak<Inner>, interval: Duration, timeout: Duration) {
    // Often enough that a silent connection is closed well within a second
    // of its deadline, rarely enough to cost nothing.
    let tick = interval.min(timeout).min(Duration::from_secs(1)) / 2;
    let allowed = interval + timeout;
    let mut next_ping = Instant::now() + interval;
    loop {
        tokio::time::sleep(tick).await;
        let Some(inner) = service.upgrade() else { return };
        let ping = Instant::now() >= next_ping;
        if ping {
            next_ping = Instant::now() + interval;
        }
        let channels = &inner.channels;
        let watched: Vec<Channel> = inner.peers.channels();
        for channel in watched {
            if channel.silence() > allowed {
                tracing::debug!(channel = %channel.id(), "no pong: closing with 4003");
                channel.close(CloseReason::NO_PONG);
                channels.forget(channel.id());
            } else if ping {
                channels.send_frame_to_channel(&channel, Frame::ping());
            }
        }
    }
}
