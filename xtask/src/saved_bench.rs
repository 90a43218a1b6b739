//! What a saved message costs, part of `cargo xtask bench` (issue 24, item
//! 5): the chat server with the memory store, each run a fresh process,
//! 200,000 one-byte messages (`"data":1`) published from WebSockets over
//! 1,000 groups and saved, after a warm-up round; the growth of the
//! server's RSS, read from outside, per message (`channelbox-bench`'s
//! `saved`). Its bound: 65 bytes.

use std::process::Stdio;

use serde_json::{json, Value};

use crate::bench::{f, median, pinned, Plan};
use crate::loopback::{start_server, CHAT_KIND};

/// Server RSS per saved one-byte message, at most (bytes).
const BOUND: f64 = 65.0;

/// One run against a fresh server.
fn once(messages: u64, groups: usize) -> Result<Value, String> {
    let data = std::env::temp_dir().join(format!("channelbox-saved-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    // Room for every message: nothing is trimmed while it is measured.
    let extra = ["--history-total-bytes", "4294967296"].map(str::to_owned);
    let (mut child, addr) = start_server(&CHAT_KIND, &data, &extra)?;
    let args = vec![
        format!("--addr {addr}"),
        format!("--pid {}", child.id()),
        format!("--messages {messages}"),
        format!("--groups {groups}"),
    ];
    let out = pinned(Some(1), "target/release/saved", &args)
        .stderr(Stdio::inherit())
        .output();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&data);
    let out = out.map_err(|e| format!("cannot run `saved`: {e}"))?;
    if !out.status.success() {
        return Err(format!("`saved` failed ({})", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).map_err(|e| format!("`saved` output {text:?}: {e}"))
}

/// Every run, their median and range, the verdict; printed.
pub(crate) fn run(plan: &Plan) -> Result<Value, String> {
    let (messages, groups) = if plan.quick { (20_000, 100) } else { (200_000, 1000) };
    let runs = (0..plan.runs.max(1))
        .map(|_| once(messages, groups))
        .collect::<Result<Vec<_>, _>>()?;
    let per: Vec<f64> = runs.iter().map(|r| f(r, &["rss_bytes_per_message"])).collect();
    let (lo, hi) = per.iter().fold((f64::MAX, 0.0f64), |(l, h), &x| (l.min(x), h.max(x)));
    let med = median(per);
    let anon = median(runs.iter().map(|r| f(r, &["anon_bytes_per_message"])).collect());
    let met = med <= BOUND;
    eprintln!(
        "xtask bench: target saved messages: {med:.1} B of server RSS per saved 1-byte message, {anon:.1} B anonymous ({} runs, {lo:.1}-{hi:.1}; {messages} messages, {groups} groups; bound {BOUND:.0}: {})",
        runs.len(),
        crate::targets::verdict(met),
    );
    Ok(json!({
        "messages": messages,
        "groups": groups,
        "rss_bytes_per_message": med,
        "anon_bytes_per_message": anon,
        "min": lo,
        "max": hi,
        "bound": BOUND,
        "met": met,
        "runs": runs,
    }))
}
