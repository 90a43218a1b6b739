//! Per-connection pacing: the `--rate-limit` token bucket, and the pace of a
//! connection's joins and leaves.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket: `rate` frames per second, burst `rate`.
pub(super) struct RateLimiter {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub(super) fn new(rate: u32) -> Self {
        RateLimiter {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: Instant::now(),
        }
    }

    pub(super) fn allow(&mut self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Joins and leaves one connection may make at once (a reconnect rejoining
/// every group it may be in), and per second after that.
pub(super) const MEMBERSHIP_BURST: f64 = 256.0;
/// See [`MEMBERSHIP_BURST`].
pub(super) const MEMBERSHIP_PER_SECOND: f64 = 100.0;

/// Paces a connection's joins and leaves: past a burst of
/// [`MEMBERSHIP_BURST`], at most [`MEMBERSHIP_PER_SECOND`]. A join or leave
/// over the pace waits, and the connection is not read meanwhile
/// (back-pressure, no error): every change costs every server of a cluster
/// work (records, member events, the group's subscription), and one client
/// toggling join/leave as fast as it can used to slow everyone down.
#[derive(Debug)]
pub(super) struct MembershipPacer(Mutex<(f64, Instant)>);

impl Default for MembershipPacer {
    fn default() -> Self {
        MembershipPacer(Mutex::new((MEMBERSHIP_BURST, Instant::now())))
    }
}

impl MembershipPacer {
    /// Takes one change; how long it must wait for its turn.
    pub(super) fn take(&self) -> Duration {
        let mut state = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * MEMBERSHIP_PER_SECOND).min(MEMBERSHIP_BURST);
        *last = now;
        // In debt below zero: each change waits for the ones before it.
        *tokens -= 1.0;
        if *tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*tokens / MEMBERSHIP_PER_SECOND)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_and_then_changes_wait_their_turn() {
        let pacer = MembershipPacer::default();
        for _ in 0..256 {
            assert_eq!(pacer.take(), Duration::ZERO);
        }
        let first = pacer.take();
        let second = pacer.take();
        assert!(
            first > Duration::ZERO && first <= Duration::from_millis(10),
            "{first:?}"
        );
        assert!(second > first, "{second:?} after {first:?}");
    }
}
