//! The performance targets of the loopback benchmark, read off its rows and
//! printed as ratios and bounds (issue "Performance, round two"):
//!
//! - close to the kernel: the chat server's deliveries per CPU-second as a
//!   share of the bare writer's at the same frames per `send` (at least 0.60),
//!   the median of the rounds' shares;
//! - flat up to the connection limit: deliveries per CPU-second at the largest
//!   size over those at 1,000 (at least 0.80), and idle memory per connection
//!   there (at most 5,000 bytes).
//!
//! Deliveries per CPU-second rather than per second: on two cores the load
//! generator has one core and is the limit of deliveries per second for a
//! server as fast as the bare writer, while a server's CPU per delivery is
//! what the kernel's limit bounds.

use serde_json::{json, Value};

use crate::bench::{f, median};
use crate::loopback::{BARE, CHAT};

const SHARE_OF_BARE: f64 = 0.60;
const FLAT: f64 = 0.80;
const IDLE_BYTES: f64 = 5000.0;

fn find<'a>(rows: &'a [Value], server: &str, n: u64) -> Option<&'a Value> {
    rows.iter()
        .find(|r| r["server"] == server && r["subscribers"] == n && r.get("error").is_none())
}

pub(crate) fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// The targets as JSON, printed as they are computed.
pub(crate) fn summary(rows: &[Value]) -> Value {
    let mut sizes: Vec<u64> = rows.iter().filter_map(|r| r["subscribers"].as_u64()).collect();
    sizes.dedup();
    let mut kernel = Vec::new();
    for &n in &sizes {
        let (Some(chat), Some(bare)) = (find(rows, CHAT, n), find(rows, BARE, n)) else {
            continue;
        };
        // Round by round: the bare writer of a round copies that round's
        // frames per send, so the pairs are the comparison; their median is
        // the figure.
        let rounds = |key: &str| {
            let pairs = chat["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .zip(bare["runs"].as_array().into_iter().flatten());
            median(
                pairs
                    .filter(|(c, b)| c.get("error").is_none() && b.get("error").is_none())
                    .map(|(c, b)| f(c, &[key]) / f(b, &[key]).max(1.0))
                    .collect(),
            )
        };
        let share = rounds("deliveries_per_cpu_sec");
        let share_per_sec = rounds("deliveries_per_sec");
        let share_of_medians = f(chat, &["deliveries_per_cpu_sec"]) / f(bare, &["deliveries_per_cpu_sec"]).max(1.0);
        eprintln!(
            "xtask bench: target close to the kernel, n={n}: {:.1} frames/send (bare {:.1}); medians {:.0} vs {:.0} deliveries per cpu-s; median share of the rounds {share:.2} of the bare writer (target {SHARE_OF_BARE:.2}: {}); per second {share_per_sec:.2}",
            f(chat, &["frames_per_send"]),
            f(bare, &["frames_per_send"]),
            f(chat, &["deliveries_per_cpu_sec"]),
            f(bare, &["deliveries_per_cpu_sec"]),
            verdict(share >= SHARE_OF_BARE),
        );
        kernel.push(json!({
            "subscribers": n,
            "frames_per_send": chat["frames_per_send"],
            "bare_frames_per_send": bare["frames_per_send"],
            "share_of_bare_per_cpu_sec": share,
            "share_of_medians_per_cpu_sec": share_of_medians,
            "share_of_bare_per_sec": share_per_sec,
            "target": SHARE_OF_BARE,
            "met": share >= SHARE_OF_BARE,
        }));
    }
    let flat = match (
        find(rows, CHAT, 1000),
        sizes.iter().max().and_then(|&n| find(rows, CHAT, n)),
    ) {
        (Some(small), Some(large)) if large["subscribers"].as_u64() > Some(1000) => {
            let n = large["subscribers"].as_u64().unwrap_or(0);
            let ratio = f(large, &["deliveries_per_cpu_sec"]) / f(small, &["deliveries_per_cpu_sec"]).max(1.0);
            let idle = f(large, &["rss_per_connection"]);
            eprintln!(
                "xtask bench: target flat, n={n}: {ratio:.2} of the deliveries per cpu-s at 1,000 (target {FLAT:.2}: {}); idle {idle:.0} B per connection (target {IDLE_BYTES:.0}: {})",
                verdict(ratio >= FLAT),
                verdict(idle <= IDLE_BYTES),
            );
            json!({
                "subscribers": n,
                "ratio_to_1000_per_cpu_sec": ratio,
                "target_ratio": FLAT,
                "idle_bytes_per_connection": idle,
                "target_idle_bytes": IDLE_BYTES,
                "met": ratio >= FLAT && idle <= IDLE_BYTES,
            })
        }
        _ => Value::Null,
    };
    json!({"close_to_kernel": kernel, "flat": flat})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(server: &str, n: u64, per_cpu: &[f64], idle: f64) -> Value {
        let runs: Vec<Value> = per_cpu
            .iter()
            .map(|d| json!({"deliveries_per_cpu_sec": d, "deliveries_per_sec": d / 2.0}))
            .collect();
        json!({
            "server": server,
            "subscribers": n,
            "deliveries_per_cpu_sec": median(per_cpu.to_vec()),
            "rss_per_connection": idle,
            "runs": runs,
        })
    }

    #[test]
    fn the_kernel_share_is_the_median_of_the_rounds_and_flatness_compares_sizes() {
        let rows = [
            row(CHAT, 1000, &[3.0, 4.0, 2.0], 9000.0),
            row(BARE, 1000, &[5.0, 5.0, 5.0], 6000.0),
            row(CHAT, 19000, &[2.7, 2.7, 2.7], 4500.0),
        ];
        let t = summary(&rows);
        let kernel = &t["close_to_kernel"][0];
        assert_eq!(kernel["subscribers"], 1000);
        assert!((f(kernel, &["share_of_bare_per_cpu_sec"]) - 0.6).abs() < 1e-9);
        assert_eq!(kernel["met"], true);
        // No bare writer at 19,000: no kernel row there.
        assert_eq!(t["close_to_kernel"].as_array().map(Vec::len), Some(1));
        assert!((f(&t["flat"], &["ratio_to_1000_per_cpu_sec"]) - 0.9).abs() < 1e-9);
        assert_eq!(t["flat"]["idle_bytes_per_connection"], 4500.0);
        assert_eq!(t["flat"]["met"], true);
    }
}
