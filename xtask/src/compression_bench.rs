//! `cargo xtask bench --compression`: the chat server (memory store) with
//! 1,000 subscribers that offer permessage-deflate, as browsers do, and
//! realistic 1 KB chat messages (JSON: a user, chat sentences, mentions,
//! reactions), once with `--compression off` and once on, taking turns
//! for `--runs` runs: bytes on the wire per delivery, server CPU per
//! delivery and p99 latency, medians with min-max. Writes
//! target/bench/compression.json.
//!
//! The load generator is one process on one core: inflating all 5 million
//! deliveries made it the bottleneck (38-41 s of its CPU, p99 over 0.9 s), so
//! only `--sample` subscribers (default 50, spread evenly) decode, in both
//! modes alike; the rest count frames and wire bytes. Loss is checked
//! exactly on the sample and by count on the rest; **latency percentiles
//! are the sample's**. The load generator's own CPU is reported beside the
//! server's so a reader can see which one set the pace.
//!
//! With `--rate R` the publisher sends R messages a second for `--seconds`
//! instead of as fast as it can: the server is not saturated, so its CPU
//! per delivery is what a deployment below capacity pays, and does not
//! follow the race between the server and the load generator.

use std::process::Stdio;

use serde_json::{json, Value};

use crate::bench::{f, listening, median, pinned, Plan};

const SUBSCRIBERS: usize = 1000;
const PAYLOAD: usize = 1024;

/// The 1, 5 and 15 minute load averages: the machine is shared, and a
/// figure means little without how busy it was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// How much one run publishes: `messages` as fast as it goes, or `rate`
/// messages a second for `seconds`.
#[derive(Clone, Copy)]
struct Load {
    messages: u64,
    rate: u64,
    seconds: u64,
}

/// One run of one mode: a fresh server, the load generator, the report.
fn measure(compression: &str, load: Load, sample: usize) -> Result<Value, String> {
    let args: Vec<String> = [
        "--store",
        "memory",
        "--addr",
        "127.0.0.1:0",
        "--compression",
        compression,
    ]
    .map(String::from)
    .to_vec();
    let (mut child, addr) = listening(
        pinned(Some(0), "target/release/examples/chat", &args),
        "target/release/examples/chat",
    )?;
    let (deadline, amount) = match load.rate {
        0 => (
            60 + SUBSCRIBERS as u64 * load.messages / 100_000,
            format!("--messages {}", load.messages),
        ),
        rate => (
            60 + 2 * load.seconds,
            format!("--rate {rate} --seconds {}", load.seconds),
        ),
    };
    let loadgen_args = vec![
        format!("--addr {addr}"),
        format!("--pid {}", child.id()),
        format!("--subscribers {SUBSCRIBERS}"),
        amount,
        format!("--payload {PAYLOAD}"),
        "--chat".to_owned(),
        "--deflate".to_owned(),
        format!("--sample {sample}"),
        format!("--deadline {deadline}"),
    ];
    let load_before = load_average();
    let out = pinned(Some(1), "target/release/loadgen", &loadgen_args)
        .stderr(Stdio::inherit())
        .output();
    let _ = child.kill();
    let _ = child.wait();
    let out = out.map_err(|e| format!("cannot run the load generator: {e}"))?;
    if !out.status.success() {
        return Err(format!("the load generator failed ({})", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut report: Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("load generator output {text:?}: {e}"))?;
    report["load_average_before"] = json!(load_before);
    report["load_average_after"] = json!(load_average());
    // Every subscriber offered; with compression on every one must have it.
    let negotiated = f(&report, &["deflate_negotiated"]) as usize;
    let wanted = if compression == "on" { SUBSCRIBERS - 1 } else { 0 };
    if negotiated != wanted {
        return Err(format!(
            "{negotiated} subscribers negotiated deflate, expected {wanted}"
        ));
    }
    // Every 1 KB chat frame compresses: with compression on each delivery
    // must come compressed, with it off none.
    let (deliveries, compressed) = (f(&report, &["deliveries"]), f(&report, &["compressed_deliveries"]));
    let wanted = if compression == "on" { deliveries } else { 0.0 };
    if compressed != wanted {
        return Err(format!(
            "compression {compression}: {compressed} of {deliveries} deliveries came compressed, expected {wanted}"
        ));
    }
    Ok(report)
}

/// Median and range of one figure over the runs.
fn spread(runs: &[Value], path: &[&str]) -> Value {
    let values: Vec<f64> = runs.iter().map(|r| f(r, path)).collect();
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({"median": median(values), "min": min, "max": max})
}

/// `runs` rounds, each measuring every mode once; the reports per mode.
/// A lost, duplicated or unreadable delivery fails the bench.
fn measure_rounds(runs: usize, load: Load, sample: usize) -> Result<Vec<Vec<Value>>, String> {
    let modes = MODES;
    let mut results: Vec<Vec<Value>> = vec![Vec::new(); modes.len()];
    for run in 0..runs {
        for (i, mode) in modes.iter().enumerate() {
            let report = measure(mode, load, sample)?;
            eprintln!(
                "xtask bench --compression: run {} compression {mode:<3}: {:>7.1} B/delivery on the wire, {:>6.3} µs server CPU/delivery, {:>5.2} M deliveries/s, server {:.2} cores, load generator {:.2} s CPU ({:.2} of a core), p99 {:>8.0} µs (sample of {sample}), lost {}, load average {}",
                run + 1,
                f(&report, &["wire_bytes_per_delivery"]),
                f(&report, &["server_cpu_us_per_delivery"]),
                f(&report, &["deliveries_per_sec"]) / 1e6,
                f(&report, &["server_cores"]),
                f(&report, &["loadgen_cpu_sec"]),
                f(&report, &["loadgen_cpu_share"]),
                f(&report, &["latency_us", "p99"]),
                report["lost"],
                report["load_average_before"].as_str().unwrap_or(""),
            );
            let bad = ["lost", "duplicated", "extra", "unreadable", "subscribers_ended_early"];
            if bad.iter().any(|k| f(&report, &[k]) > 0.0) {
                return Err(format!(
                    "compression {mode}: messages lost or subscribers closed: {report}"
                ));
            }
            results[i].push(report);
        }
    }
    Ok(results)
}

/// One line per mode: each figure's median and range over the runs.
fn print_rows(rows: &[Value]) {
    for row in rows {
        let show = |path: &str| {
            let s = &row[path];
            format!("{:.2} ({:.2}-{:.2})", f(s, &["median"]), f(s, &["min"]), f(s, &["max"]))
        };
        eprintln!(
            "xtask bench --compression: {:<3} wire B/delivery {}  server CPU µs/delivery {}  p99 µs (sample) {}  M deliveries/s {}  server cores {}  load generator CPU s {}",
            row["compression"].as_str().unwrap_or(""),
            show("wire_bytes_per_delivery"),
            show("server_cpu_us_per_delivery"),
            show("p99_us"),
            {
                let s = &row["deliveries_per_sec"];
                format!("{:.2} ({:.2}-{:.2})", f(s, &["median"]) / 1e6, f(s, &["min"]) / 1e6, f(s, &["max"]) / 1e6)
            },
            show("server_cores"),
            show("loadgen_cpu_sec"),
        );
    }
}

/// The two modes, in the order each round runs them.
const MODES: [&str; 2] = ["off", "on"];

pub(crate) fn run(plan: &Plan) -> Result<(), String> {
    let messages = if plan.quick { 100 } else { plan.messages.min(5000) };
    let sample = plan.sample.min(SUBSCRIBERS - 1);
    let load = Load {
        messages,
        rate: plan.rate,
        seconds: if plan.quick { 2 } else { plan.seconds },
    };
    let results = measure_rounds(plan.runs, load, sample)?;
    let modes = MODES;
    let rows: Vec<Value> = modes
        .iter()
        .zip(&results)
        .map(|(mode, runs)| {
            json!({
                "compression": mode,
                "wire_bytes_per_delivery": spread(runs, &["wire_bytes_per_delivery"]),
                "server_cpu_us_per_delivery": spread(runs, &["server_cpu_us_per_delivery"]),
                "p99_us": spread(runs, &["latency_us", "p99"]),
                "deliveries_per_sec": spread(runs, &["deliveries_per_sec"]),
                "server_cores": spread(runs, &["server_cores"]),
                "loadgen_cpu_sec": spread(runs, &["loadgen_cpu_sec"]),
                "runs": runs,
            })
        })
        .collect();
    let ratio = |path: &str| f(&rows[1], &[path, "median"]) / f(&rows[0], &[path, "median"]).max(f64::MIN_POSITIVE);
    // The CPU ratio of each round (on against the off run just before it):
    // its spread says how far one round's answer can be trusted.
    let round_ratios: Vec<f64> = results[1]
        .iter()
        .zip(&results[0])
        .map(|(on, off)| {
            f(on, &["server_cpu_us_per_delivery"]) / f(off, &["server_cpu_us_per_delivery"]).max(f64::MIN_POSITIVE)
        })
        .collect();
    let round_min = round_ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let round_max = round_ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let summary = json!({
        "subscribers": SUBSCRIBERS,
        "messages": messages,
        "rate": plan.rate,
        "seconds": load.seconds,
        "payload_bytes": PAYLOAD,
        "sampled_subscribers": sample,
        "latency_from": "the sampled subscribers only",
        "runs": plan.runs,
        "server_cpu_ratio_per_round": round_ratios,
        "wire_bytes_ratio": ratio("wire_bytes_per_delivery"),
        "server_cpu_ratio": ratio("server_cpu_us_per_delivery"),
        "rows": rows,
    });
    print_rows(&rows);
    eprintln!(
        "xtask bench --compression: on/off: wire bytes {:.2}x, server CPU {:.2}x (medians; per round {:.2}-{:.2}), {} runs, latency from {sample} sampled subscribers of {}",
        summary["wire_bytes_ratio"].as_f64().unwrap_or(0.0),
        summary["server_cpu_ratio"].as_f64().unwrap_or(0.0),
        round_min,
        round_max,
        plan.runs,
        SUBSCRIBERS - 1,
    );
    std::fs::create_dir_all("target/bench").map_err(|e| e.to_string())?;
    let text = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
    std::fs::write("target/bench/compression.json", text).map_err(|e| e.to_string())?;
    Ok(())
}
