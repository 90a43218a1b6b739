//! `cargo xtask bench --compression`: the chat server (memory store) with
//! 1,000 subscribers that offer permessage-deflate, as browsers do, and
//! realistic 1 KB chat messages (JSON: a user, chat sentences, mentions,
//! reactions), once with `--compression off` and once on, taking turns
//! for `--runs` runs: bytes on the wire per delivery, server CPU per
//! delivery and p99 latency, medians with min-max. Writes
//! target/bench/compression.json.

use std::process::Stdio;

use serde_json::{json, Value};

use crate::bench::{f, listening, median, pinned, Plan};

const SUBSCRIBERS: usize = 1000;
const PAYLOAD: usize = 1024;

/// One run of one mode: a fresh server, the load generator, the report.
fn measure(compression: &str, messages: u64) -> Result<Value, String> {
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
    let deadline = 60 + SUBSCRIBERS as u64 * messages / 100_000;
    let loadgen_args = vec![
        format!("--addr {addr}"),
        format!("--pid {}", child.id()),
        format!("--subscribers {SUBSCRIBERS}"),
        format!("--messages {messages}"),
        format!("--payload {PAYLOAD}"),
        "--chat".to_owned(),
        "--deflate".to_owned(),
        format!("--deadline {deadline}"),
    ];
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
    let report: Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("load generator output {text:?}: {e}"))?;
    // Every subscriber offered; with compression on every one must have it.
    let negotiated = f(&report, &["deflate_negotiated"]) as usize;
    let wanted = if compression == "on" { SUBSCRIBERS - 1 } else { 0 };
    if negotiated != wanted {
        return Err(format!(
            "{negotiated} subscribers negotiated deflate, expected {wanted}"
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

pub(crate) fn run(plan: &Plan) -> Result<(), String> {
    let messages = if plan.quick { 100 } else { plan.messages.min(5000) };
    let modes = ["off", "on"];
    let mut results: Vec<Vec<Value>> = vec![Vec::new(); modes.len()];
    for run in 0..plan.runs {
        for (i, mode) in modes.iter().enumerate() {
            let report = measure(mode, messages)?;
            eprintln!(
                "xtask bench --compression: run {} compression {mode:<3}: {:>7.1} B/delivery on the wire, {:>6.3} µs server CPU/delivery, p99 {:>8.0} µs, lost {}",
                run + 1,
                f(&report, &["wire_bytes_per_delivery"]),
                f(&report, &["server_cpu_us_per_delivery"]),
                f(&report, &["latency_us", "p99"]),
                report["lost"],
            );
            if f(&report, &["lost"]) > 0.0 || f(&report, &["subscribers_ended_early"]) > 0.0 {
                return Err(format!(
                    "compression {mode}: messages lost or subscribers closed: {report}"
                ));
            }
            results[i].push(report);
        }
    }
    let rows: Vec<Value> = modes
        .iter()
        .zip(&results)
        .map(|(mode, runs)| {
            json!({
                "compression": mode,
                "wire_bytes_per_delivery": spread(runs, &["wire_bytes_per_delivery"]),
                "server_cpu_us_per_delivery": spread(runs, &["server_cpu_us_per_delivery"]),
                "p99_us": spread(runs, &["latency_us", "p99"]),
                "runs": runs,
            })
        })
        .collect();
    let ratio = |path: &str| f(&rows[1], &[path, "median"]) / f(&rows[0], &[path, "median"]).max(f64::MIN_POSITIVE);
    let summary = json!({
        "subscribers": SUBSCRIBERS,
        "messages": messages,
        "payload_bytes": PAYLOAD,
        "runs": plan.runs,
        "wire_bytes_ratio": ratio("wire_bytes_per_delivery"),
        "server_cpu_ratio": ratio("server_cpu_us_per_delivery"),
        "rows": rows,
    });
    for row in &rows {
        let show = |path: &str| {
            let s = &row[path];
            format!("{:.2} ({:.2}-{:.2})", f(s, &["median"]), f(s, &["min"]), f(s, &["max"]))
        };
        eprintln!(
            "xtask bench --compression: {:<3} wire B/delivery {}  server CPU µs/delivery {}  p99 µs {}",
            row["compression"].as_str().unwrap_or(""),
            show("wire_bytes_per_delivery"),
            show("server_cpu_us_per_delivery"),
            show("p99_us"),
        );
    }
    eprintln!(
        "xtask bench --compression: on/off: wire bytes {:.2}x, server CPU {:.2}x ({} runs, medians)",
        summary["wire_bytes_ratio"].as_f64().unwrap_or(0.0),
        summary["server_cpu_ratio"].as_f64().unwrap_or(0.0),
        plan.runs,
    );
    std::fs::create_dir_all("target/bench").map_err(|e| e.to_string())?;
    let text = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
    std::fs::write("target/bench/compression.json", text).map_err(|e| e.to_string())?;
    Ok(())
}
