//! The loopback server benchmark of `cargo xtask bench`: the chat server
//! (memory store without and with history, sled with history) against the
//! tutorial-style warp baseline and the bare writer, each pinned to one core
//! with the load generator on the other, and the results table with ratios
//! measured in the same run, printed and written to target/bench/results.json.
//!
//! The bare writer (`channelbox-bench`'s `bare`) writes pre-encoded frames in
//! the chat server's envelope, as many per `send` as the chat server wrote in
//! the same round: the share of its deliveries per CPU-second that the chat
//! server reaches is how close it comes to the kernel's limit.

use std::path::Path;
use std::process::{Child, Stdio};

use serde_json::{json, Value};

use crate::bench::{f, interleaved, listening, median, pinned, Plan};

pub(crate) struct ServerKind {
    pub(crate) name: &'static str,
    pub(crate) program: &'static str,
    pub(crate) args: &'static [&'static str],
    pub(crate) history: bool,
    pub(crate) members: &'static str,
}

/// The chat server whose frames per `send` the bare writer copies, and whose
/// deliveries per CPU-second the targets compare.
pub(crate) const CHAT: &str = "channelbox memory, history:false";
pub(crate) const BARE: &str = "bare writer (same frames per send)";

/// The warp tutorial's chat, what every ratio is against.
pub(crate) const BASELINE_KIND: ServerKind = ServerKind {
    name: "baseline (warp tutorial)",
    program: "target/release/baseline",
    args: &[],
    history: false,
    members: "count",
};

/// The chat server, memory store, messages not saved.
pub(crate) const CHAT_KIND: ServerKind = ServerKind {
    name: CHAT,
    program: "target/release/examples/chat",
    args: &["--store", "memory"],
    history: false,
    members: "api",
};

const SERVERS: &[ServerKind] = &[
    BASELINE_KIND,
    CHAT_KIND,
    ServerKind {
        name: "channelbox memory, history saved",
        program: "target/release/examples/chat",
        args: &["--store", "memory"],
        history: true,
        members: "api",
    },
    ServerKind {
        name: "channelbox sled, history saved",
        program: "target/release/examples/chat",
        args: &["--store", "sled"],
        history: true,
        members: "api",
    },
    ServerKind {
        name: BARE,
        program: "target/release/bare",
        args: &[],
        history: false,
        members: "count",
    },
];

pub(crate) fn start_server(kind: &ServerKind, data: &Path, extra: &[String]) -> Result<(Child, String), String> {
    let mut args: Vec<String> = kind.args.iter().map(|s| s.to_string()).collect();
    args.extend(extra.iter().cloned());
    if kind.program.ends_with("chat") {
        args.extend([
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--data".into(),
            data.display().to_string(),
        ]);
    } else {
        args.push("127.0.0.1:0".into());
    }
    listening(pinned(Some(0), kind.program, &args), kind.program)
}

/// One load generator run; it gives up (and the measurement fails) when the
/// server stalls, instead of holding up the whole benchmark.
fn loadgen(
    kind: &ServerKind,
    pid: u32,
    addr: &str,
    subscribers: usize,
    messages: u64,
    rate: u64,
) -> Result<Value, String> {
    let deadline = 60 + subscribers as u64 * messages / 200_000;
    let args = vec![
        format!("--addr {addr}"),
        format!("--pid {pid}"),
        format!("--subscribers {subscribers}"),
        format!("--messages {messages}"),
        format!("--rate {rate}"),
        format!("--history {}", kind.history),
        format!("--members {}", kind.members),
        format!("--deadline {deadline}"),
    ];
    let out = pinned(Some(1), "target/release/loadgen", &args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run the load generator: {e}"))?;
    if !out.status.success() {
        return Err(format!("the load generator failed ({})", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).map_err(|e| format!("load generator output {text:?}: {e}"))
}

/// One server, one size, one run: a fresh server process each time.
pub(crate) fn measure(
    kind: &ServerKind,
    extra: &[String],
    subscribers: usize,
    messages: u64,
    rate: u64,
) -> Result<Value, String> {
    let data = std::env::temp_dir().join(format!("channelbox-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let (mut child, addr) = start_server(kind, &data, extra)?;
    // `sh -c exec` keeps the pid: the server is the child itself.
    let result = loadgen(kind, child.id(), &addr, subscribers, messages, rate);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&data);
    result
}

/// Every server at one size, the bare writer at the frames per `send` the
/// chat server reached in the same round. A failed measurement becomes an
/// `error` entry rather than ending the benchmark.
fn size_runs(plan: &Plan, n: usize) -> Result<Vec<Vec<Value>>, String> {
    let mut per_send: Option<f64> = None;
    interleaved(SERVERS, plan.runs, |kind| {
        let extra = match (kind.name, per_send) {
            (BARE, Some(k)) => vec!["--frames-per-send".to_owned(), format!("{}", k.round().max(1.0))],
            (BARE, None) => return Ok(json!({"error": "no frames-per-send figure from the chat server"})),
            _ => Vec::new(),
        };
        let run = measure(kind, &extra, n, plan.messages, 0).unwrap_or_else(|e| json!({ "error": e }));
        if kind.name == CHAT {
            per_send = run["writes"]["frames_per_send"].as_f64();
        }
        Ok(run)
    })
}

/// A server's row at one size: medians of its runs, ratios to the baseline.
fn row(kind: &ServerKind, n: usize, runs: Vec<Value>, baseline: Option<(f64, f64)>) -> Value {
    let ok: Vec<&Value> = runs.iter().filter(|r| r.get("error").is_none()).collect();
    if ok.is_empty() {
        let error = runs.first().map(|r| r["error"].clone()).unwrap_or(Value::Null);
        eprintln!("xtask bench: {:<36} n={n:<6} not measured: {error}", kind.name);
        return json!({"server": kind.name, "subscribers": n, "error": error, "runs": runs});
    }
    let med = |path: &[&str]| median(ok.iter().map(|r| f(r, path)).collect());
    let sum = |key: &str| ok.iter().map(|r| f(r, &[key])).sum::<f64>();
    let (dps, dpc) = (med(&["deliveries_per_sec"]), med(&["deliveries_per_cpu_sec"]));
    let ratio = |ours: f64, base: Option<f64>| base.map(|b| ours / b.max(1.0));
    let per_send = ok
        .iter()
        .any(|r| r["writes"].is_object())
        .then(|| med(&["writes", "frames_per_send"]));
    let row = json!({
        "server": kind.name,
        "subscribers": n,
        "deliveries_per_sec": dps,
        "deliveries_per_cpu_sec": dpc,
        "ratio_deliveries_per_sec": ratio(dps, baseline.map(|b| b.0)),
        "ratio_deliveries_per_cpu_sec": ratio(dpc, baseline.map(|b| b.1)),
        "frames_per_send": per_send,
        "p50_us": med(&["latency_us", "p50"]),
        "p99_us": med(&["latency_us", "p99"]),
        "max_us": med(&["latency_us", "max"]),
        "lost": sum("lost"),
        "duplicated": sum("duplicated"),
        "subscribers_ended_early": sum("subscribers_ended_early"),
        "rss_per_connection": med(&["rss_per_connection"]),
        "loadgen_cpu_share": med(&["loadgen_cpu_share"]),
        "runs": runs,
    });
    let shown = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.2}x"));
    eprintln!(
        "xtask bench: {:<36} n={n:<6} {dps:>10.0} deliveries/s ({})  {dpc:>10.0} per cpu-s ({})  {:>5.1} frames/send  p99 {:>8.0} µs  {:>6.0} B/conn  lost {} dup {}",
        kind.name,
        shown(&row["ratio_deliveries_per_sec"]),
        shown(&row["ratio_deliveries_per_cpu_sec"]),
        per_send.unwrap_or(0.0),
        row["p99_us"].as_f64().unwrap_or(0.0),
        row["rss_per_connection"].as_f64().unwrap_or(0.0),
        row["lost"],
        row["duplicated"],
    );
    row
}

/// Runs the loopback benchmark and writes the results. Fails when one of
/// the chat server's measurements failed or lost messages (after writing them).
pub(crate) fn loopback(plan: &Plan) -> Result<(), String> {
    let mut rows = Vec::new();
    for &n in &plan.sizes {
        let runs = size_runs(plan, n)?;
        let mut baseline = None;
        for (kind, runs) in SERVERS.iter().zip(runs) {
            let row = row(kind, n, runs, baseline);
            if kind.program.ends_with("baseline") && row.get("error").is_none() {
                baseline = Some((f(&row, &["deliveries_per_sec"]), f(&row, &["deliveries_per_cpu_sec"])));
            }
            rows.push(row);
        }
    }
    let light = crate::light::run(plan)?;
    let saved = crate::saved_bench::run(plan).unwrap_or_else(|e| json!({ "error": e }));
    let targets = crate::targets::summary(&rows);
    let results = json!({
        "plan": {"sizes": plan.sizes, "messages": plan.messages, "runs": plan.runs, "light_seconds": plan.seconds},
        "targets": targets,
        "throughput": rows,
        "light": light,
        "saved_messages": saved,
    });
    std::fs::create_dir_all("target/bench").map_err(|e| e.to_string())?;
    let path = "target/bench/results.json";
    std::fs::write(path, serde_json::to_string_pretty(&results).unwrap_or_default()).map_err(|e| e.to_string())?;
    eprintln!("xtask bench: results written to {path}");
    let mut failed: Vec<String> = rows
        .iter()
        .filter(|r| r["server"].as_str().is_some_and(|s| s.starts_with("channelbox")))
        .filter(|r| r.get("error").is_some() || f(r, &["lost"]) > 0.0 || f(r, &["duplicated"]) > 0.0)
        .map(|r| format!("{} at {}", r["server"], r["subscribers"]))
        .collect();
    failed.extend(crate::light::failures(&results["light"]));
    if let Some(e) = results["saved_messages"].get("error") {
        failed.push(format!("the saved-message measurement ({e})"));
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("failed, lost or duplicated: {}", failed.join(", ")))
    }
}
