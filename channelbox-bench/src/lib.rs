//! Shared pieces of the loopback benchmark: reading a process's CPU time and
//! resident memory from `/proc`, a compact latency histogram, and a cheap
//! receive-only WebSocket client ([`raw`]).
//!
//! ```
//! let mut h = channelbox_bench::Histogram::default();
//! h.record(1500);
//! assert!(h.quantile(0.5) >= 1500);
//! ```

pub mod raw;

/// The server a tool drives: where it listens and which process it is, for
/// its CPU time and memory. Flattened into each tool's flags.
#[derive(Clone, Debug, clap::Args)]
pub struct Target {
    /// Server address, host:port.
    #[arg(long)]
    pub addr: String,
    /// The server's pid.
    #[arg(long)]
    pub pid: u32,
}

/// The body of a `GET` to the server (HTTP/1.1, `Connection: close`).
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    http_request(addr, "GET", path, None).await
}

/// The body of a bodiless request to the server, with an optional bearer token.
pub async fn http_request(addr: &str, method: &str, path: &str, bearer: Option<&str>) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await?;
    Ok(raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

/// The value of a series in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?;
    line.split_whitespace().nth(1)?.parse::<f64>().ok().map(|v| v as u64)
}

/// The server's socket writes and frames delivered so far, from its
/// `/metrics` (`None` when it has no such counters, as the baseline).
pub async fn write_counters(addr: &str) -> Option<(u64, u64)> {
    let text = http_get(addr, "/metrics").await.ok()?;
    Some((
        metric(&text, "channelbox_socket_writes_total")?,
        metric(&text, "channelbox_messages_delivered_total")?,
    ))
}

/// CPU time (user + system) of a process, in seconds, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Linux reports clock ticks; USER_HZ is 100 on every architecture it runs on.
    Some((utime + stime) / 100.0)
}

/// Resident memory of a process in bytes, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A process's resident memory split as `/proc/PID/status` splits it:
/// anonymous (heap, stacks) and file-backed (the program's own code and
/// libraries, paged in as they are first used), in bytes.
pub fn rss_split(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    Some((field("RssAnon:")?, field("RssFile:")?))
}

/// A log-linear histogram of microsecond latencies: 16 sub-buckets per power
/// of two, so quantiles are within about 6 %.
#[derive(Clone, Debug)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; 64 * 16],
            count: 0,
            max: 0,
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < 16 {
        return v as usize;
    }
    let power = 63 - v.leading_zeros() as usize;
    let sub = ((v >> (power - 4)) & 15) as usize;
    (power - 3) * 16 + sub
}

fn bucket_floor(b: usize) -> u64 {
    if b < 16 {
        return b as u64;
    }
    let power = b / 16 + 3;
    let sub = (b % 16) as u64;
    (16 + sub) << (power - 4)
}

impl Histogram {
    /// Records one value.
    pub fn record(&mut self, v: u64) {
        self.buckets[bucket_of(v).min(64 * 16 - 1)] += 1;
        self.count += 1;
        self.max = self.max.max(v);
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest value recorded.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1), as the upper edge of its bucket.
    pub fn quantile(&self, q: f64) -> u64 {
        let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return bucket_floor(b + 1).min(self.max.max(1));
            }
        }
        self.max
    }
}

/// Microseconds since the Unix epoch, now: the send stamp in a payload.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Finds the unsigned integer after `key` in `text`.
pub fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits = text[at..].bytes().take_while(u8::is_ascii_digit).count();
    text[at..at + digits].parse().ok()
}

/// The sequence number and send time in a delivered message. `str::find` is
/// vectorized where a byte-window search is not: at a million frames a second
/// that difference was the load generator's bottleneck.
pub fn stamp(text: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(text).ok()?;
    // The stamps are in `data`, at the end of the frame.
    let data = &text[text.find("\"data\":")?..];
    Some((number_after(data, "\"seq\":")?, number_after(data, "\"t\":")?))
}

/// What one receiver got: a bit per sequence number (duplicates counted),
/// and the latency of each first arrival.
#[derive(Debug)]
pub struct Tally {
    seen: Vec<u64>,
    /// Distinct messages received.
    pub received: u64,
    /// Messages received again.
    pub duplicates: u64,
    /// Latency from the send stamp, in microseconds.
    pub latency: Histogram,
}

impl Tally {
    /// A tally for sequence numbers `0..messages`.
    pub fn new(messages: u64) -> Self {
        Tally {
            seen: vec![0; messages.div_ceil(64) as usize],
            received: 0,
            duplicates: 0,
            latency: Histogram::default(),
        }
    }

    /// Records `seq` sent at `sent_us`; whether it was new.
    pub fn record(&mut self, seq: u64, sent_us: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        let Some(w) = self.seen.get_mut(word) else { return false };
        if *w & (1 << bit) != 0 {
            self.duplicates += 1;
            return false;
        }
        *w |= 1 << bit;
        self.received += 1;
        self.latency.record(now_us().saturating_sub(sent_us));
        true
    }
}
