//! The nemesis of `cargo xtask chaos`: a schedule of faults drawn from a seed,
//! so that a seed names one schedule exactly and a failing run can be
//! replayed, printed and shrunk.

use std::fmt;

/// SplitMix64: small, and the same sequence on every platform.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi` (`lo` when the range is empty).
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi.saturating_sub(lo)).max(1)
    }
}

/// Which link a network fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Link {
    /// The clients' connections to server N.
    Clients(usize),
    /// Server N's connections to Redis.
    Redis(usize),
}

/// What a restarted Redis comes back with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RedisData {
    /// Nothing: every group's history is gone.
    Empty,
    /// The last snapshot taken by [`Fault::SnapshotRedis`] (older data).
    Snapshot,
    /// Everything up to the kill (a `SAVE` right before it).
    Current,
}

/// One fault; those with a duration heal themselves at its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// SIGKILL a server; restart it (same data dir) after `down_ms`.
    KillServer { server: usize, down_ms: u64 },
    /// SIGSTOP a server for `ms`, then SIGCONT.
    PauseServer { server: usize, ms: u64 },
    /// SIGKILL Redis; restart it with `data` after `down_ms`.
    KillRedis { data: RedisData, down_ms: u64 },
    /// `SAVE`, and keep the file as the older snapshot.
    SnapshotRedis,
    /// `CLIENT KILL TYPE pubsub`.
    KillPubsub,
    /// Hold every byte on the link for `ms`.
    Stall { link: Link, ms: u64 },
    /// Close the link and refuse it for `ms`.
    Partition { link: Link, ms: u64 },
    /// Delay every chunk by `delay_ms` for `ms`.
    Delay { link: Link, delay_ms: u64, ms: u64 },
    /// Lose every pub/sub message Redis sends to server N for `ms`, while
    /// its connections stay up: Redis pub/sub is at most once, and on a
    /// Cluster messages are lost across the cluster bus or while a slot
    /// moves without the subscriber being told. The server must notice the
    /// gap (from the next message's offset, or from its head check) and
    /// fill it from history.
    DropPubsub { server: usize, ms: u64 },
    /// Fill sled's disk (a small tmpfs) for `ms`, then free it.
    FillDisk { ms: u64 },
}

impl Fault {
    /// How long the fault lasts before it is healed.
    pub(crate) fn duration_ms(&self) -> u64 {
        match *self {
            Fault::KillServer { down_ms, .. } | Fault::KillRedis { down_ms, .. } => down_ms,
            Fault::PauseServer { ms, .. }
            | Fault::Stall { ms, .. }
            | Fault::Partition { ms, .. }
            | Fault::Delay { ms, .. }
            | Fault::DropPubsub { ms, .. }
            | Fault::FillDisk { ms } => ms,
            Fault::SnapshotRedis | Fault::KillPubsub => 0,
        }
    }
}

/// A fault and when it starts, in milliseconds after the workload started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) at_ms: u64,
    pub(crate) fault: Fault,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>7} ms  {:?}", self.at_ms, self.fault)
    }
}

/// The store under test, which decides the faults that make sense.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Store {
    Memory,
    Sled,
    Redis,
}

impl Store {
    pub(crate) fn parse(s: &str) -> Result<Store, String> {
        match s {
            "memory" => Ok(Store::Memory),
            "sled" => Ok(Store::Sled),
            "redis" => Ok(Store::Redis),
            other => Err(format!("unknown --store {other:?} (memory, sled or redis)")),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Sled => "sled",
            Store::Redis => "redis",
        }
    }

    /// How many servers run: three on Redis, one otherwise.
    pub(crate) fn servers(self) -> usize {
        if self == Store::Redis {
            3
        } else {
            1
        }
    }
}

/// Draws a schedule for `store` that fits in `0..span_ms`: faults one after
/// the other (each healed before the next starts), with quiet gaps between.
pub(crate) fn schedule(seed: u64, store: Store, span_ms: u64) -> Vec<Step> {
    let mut rng = Rng::new(seed ^ 0x006e_656d_6573_6973);
    let mut steps = Vec::new();
    let mut at = 1500;
    if store == Store::Redis {
        steps.push(Step {
            at_ms: at,
            fault: Fault::SnapshotRedis,
        });
        at += 1500;
    }
    loop {
        let fault = draw(&mut rng, store);
        if at + fault.duration_ms() > span_ms {
            return steps;
        }
        steps.push(Step { at_ms: at, fault });
        at += fault.duration_ms() + rng.range(500, 2500);
    }
}

fn draw(rng: &mut Rng, store: Store) -> Fault {
    let servers = store.servers() as u64;
    let server = rng.range(0, servers) as usize;
    let link = if store == Store::Redis && rng.range(0, 2) == 0 {
        Link::Redis(server)
    } else {
        Link::Clients(server)
    };
    // Kills are drawn twice as often as any other fault: they exercise
    // recovery, the heart of what is checked. So are lost pub/sub messages
    // on Redis: the only fault after which servers fill gaps in what Redis
    // delivered while their members stay (the other faults make a server
    // resubscribe, or restart it).
    let kinds = match store {
        Store::Redis => 12,
        Store::Sled => 7,
        Store::Memory => 6,
    };
    match rng.range(0, kinds) {
        0 | 9 => Fault::KillServer {
            server,
            down_ms: rng.range(200, 2000),
        },
        1 => Fault::PauseServer {
            server,
            ms: rng.range(300, 3000),
        },
        2 => Fault::Stall {
            link,
            ms: rng.range(300, 3000),
        },
        3 => Fault::Partition {
            link,
            ms: rng.range(300, 2500),
        },
        4 => Fault::Delay {
            link,
            delay_ms: rng.range(5, 200),
            ms: rng.range(500, 3000),
        },
        5 if store != Store::Redis => Fault::KillServer {
            server,
            down_ms: rng.range(200, 2000),
        },
        5 => Fault::KillPubsub,
        10 | 11 => Fault::DropPubsub {
            server,
            ms: rng.range(300, 3000),
        },
        6 if store == Store::Sled => Fault::FillDisk {
            ms: rng.range(500, 3000),
        },
        6 => Fault::SnapshotRedis,
        _ => Fault::KillRedis {
            data: match rng.range(0, 3) {
                0 => RedisData::Empty,
                1 => RedisData::Snapshot,
                _ => RedisData::Current,
            },
            down_ms: rng.range(200, 1500),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_names_one_schedule_and_it_fits() {
        let a = schedule(7, Store::Redis, 60_000);
        assert_eq!(a, schedule(7, Store::Redis, 60_000));
        assert_ne!(a, schedule(8, Store::Redis, 60_000));
        assert!(a.len() > 5, "{a:?}");
        assert!(a.iter().all(|s| s.at_ms + s.fault.duration_ms() <= 60_000));
        assert!(a.windows(2).all(|w| w[0].at_ms + w[0].fault.duration_ms() < w[1].at_ms));
        let memory = schedule(7, Store::Memory, 60_000);
        assert!(memory.iter().all(|s| match s.fault {
            Fault::KillServer { server, .. } | Fault::PauseServer { server, .. } => server == 0,
            Fault::FillDisk { .. } => false,
            Fault::Stall { link, .. } | Fault::Partition { link, .. } | Fault::Delay { link, .. } =>
                link == Link::Clients(0),
            _ => false,
        }));
    }
}
