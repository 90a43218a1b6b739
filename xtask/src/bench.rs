//! `cargo xtask bench`: criterion benchmarks, then the loopback server
//! benchmark — the chat server (memory store without and with history, sled
//! with history) against the tutorial-style warp baseline, each pinned to one
//! core with the load generator on the other — and a results table with ratios
//! to the baseline measured in the same run, printed and written to
//! target/bench/results.json.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

/// What to run.
pub(crate) struct Plan {
    pub(crate) quick: bool,
    /// Skip the criterion benchmarks (`--loopback-only`).
    pub(crate) loopback_only: bool,
    pub(crate) sizes: Vec<usize>,
    pub(crate) messages: u64,
    pub(crate) runs: usize,
    /// The cluster benchmark instead (`--cluster`).
    pub(crate) cluster: bool,
    /// The recovery storm instead (`--storm`).
    pub(crate) storm: bool,
}

impl Plan {
    pub(crate) fn parse(args: &[String]) -> Result<Plan, String> {
        let mut plan = Plan {
            quick: false,
            loopback_only: false,
            sizes: vec![100, 1000, 5000, 10000],
            messages: 20_000,
            runs: 3,
            cluster: false,
            storm: false,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--quick" => {
                    plan.quick = true;
                    plan.sizes = vec![20];
                    plan.messages = 200;
                    plan.runs = 1;
                }
                "--loopback-only" => plan.loopback_only = true,
                "--cluster" => plan.cluster = true,
                "--storm" => plan.storm = true,
                "--sizes" => {
                    plan.sizes = value()?
                        .split(',')
                        .map(|s| s.parse().map_err(|_| format!("bad size {s:?}")))
                        .collect::<Result<_, _>>()?
                }
                "--messages" => plan.messages = value()?.parse().map_err(|_| "bad --messages".to_owned())?,
                "--runs" => plan.runs = value()?.parse().map_err(|_| "bad --runs".to_owned())?,
                other => return Err(format!("unknown bench argument {other:?}")),
            }
        }
        Ok(plan)
    }
}

struct ServerKind {
    name: &'static str,
    program: &'static str,
    args: &'static [&'static str],
    history: bool,
    members: &'static str,
}

const SERVERS: &[ServerKind] = &[
    ServerKind {
        name: "baseline (warp tutorial)",
        program: "target/release/baseline",
        args: &[],
        history: false,
        members: "count",
    },
    ServerKind {
        name: "channelbox memory, history:false",
        program: "target/release/examples/chat",
        args: &["--store", "memory"],
        history: false,
        members: "api",
    },
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
];

pub(crate) fn pinned(core: Option<usize>, program: &str, args: &[String]) -> Command {
    // Raise the descriptor limit for 10,000 connections, and pin when taskset exists.
    let taskset = Path::new("/usr/bin/taskset").exists();
    let mut line = String::from("ulimit -n 65536 2>/dev/null || ulimit -n 16384 2>/dev/null; exec ");
    if let Some(core) = core.filter(|_| taskset) {
        line.push_str(&format!("taskset -c {core} "));
    }
    line.push_str(program);
    for a in args {
        line.push(' ');
        line.push_str(a);
    }
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &line]);
    cmd
}

fn start_server(kind: &ServerKind, data: &Path, extra: &[String]) -> Result<(Child, String), String> {
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

/// Starts a server and reads its `listening on http://ADDR` line.
pub(crate) fn listening(mut command: Command, program: &str) -> Result<(Child, String), String> {
    let mut child = command
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let mut line = String::new();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("reading the start-up line: {e}"))?;
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .ok_or_else(|| format!("unexpected start-up line {line:?}"))?
        .to_owned();
    Ok((child, addr))
}

fn loadgen(
    kind: &ServerKind,
    pid: u32,
    addr: &str,
    subscribers: usize,
    messages: u64,
    rate: u64,
) -> Result<Value, String> {
    let args = vec![
        format!("--addr {addr}"),
        format!("--pid {pid}"),
        format!("--subscribers {subscribers}"),
        format!("--messages {messages}"),
        format!("--rate {rate}"),
        format!("--history {}", kind.history),
        format!("--members {}", kind.members),
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
fn measure(kind: &ServerKind, subscribers: usize, messages: u64, rate: u64) -> Result<Value, String> {
    let data = std::env::temp_dir().join(format!("channelbox-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let (mut child, addr) = start_server(kind, &data, &[])?;
    // `sh -c exec` keeps the pid: the server is the child itself.
    let result = loadgen(kind, child.id(), &addr, subscribers, messages, rate);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&data);
    result
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

pub(crate) fn f(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_f64().unwrap_or(0.0)
}

/// Measures every server `runs` times, taking turns (a run of each, then the
/// next round), so that a shared machine's slow minutes fall on all servers
/// alike instead of on whichever ran then. Returns the runs of each server,
/// in the order of `servers`.
pub(crate) fn interleaved<K>(
    servers: &[K],
    runs: usize,
    mut measure: impl FnMut(&K) -> Result<Value, String>,
) -> Result<Vec<Vec<Value>>, String> {
    let mut all: Vec<Vec<Value>> = servers.iter().map(|_| Vec::with_capacity(runs)).collect();
    for _ in 0..runs {
        for (kind, runs) in servers.iter().zip(&mut all) {
            runs.push(measure(kind)?);
        }
    }
    Ok(all)
}

/// Runs the loopback benchmark and writes the results.
pub(crate) fn loopback(plan: &Plan) -> Result<(), String> {
    let mut rows = Vec::new();
    for &n in &plan.sizes {
        let mut baseline: Option<(f64, f64)> = None;
        for (kind, runs) in SERVERS.iter().zip(interleaved(SERVERS, plan.runs, |kind| {
            measure(kind, n, plan.messages, 0)
        })?) {
            let dps = median(runs.iter().map(|r| f(r, &["deliveries_per_sec"])).collect());
            let dpc = median(runs.iter().map(|r| f(r, &["deliveries_per_cpu_sec"])).collect());
            let (base_dps, base_dpc) = *baseline.get_or_insert((dps, dpc));
            let row = json!({
                "server": kind.name,
                "subscribers": n,
                "deliveries_per_sec": dps,
                "deliveries_per_cpu_sec": dpc,
                "ratio_deliveries_per_sec": dps / base_dps.max(1.0),
                "ratio_deliveries_per_cpu_sec": dpc / base_dpc.max(1.0),
                "p50_us": median(runs.iter().map(|r| f(r, &["latency_us", "p50"])).collect()),
                "p99_us": median(runs.iter().map(|r| f(r, &["latency_us", "p99"])).collect()),
                "max_us": median(runs.iter().map(|r| f(r, &["latency_us", "max"])).collect()),
                "lost": runs.iter().map(|r| f(r, &["lost"])).sum::<f64>(),
                "duplicated": runs.iter().map(|r| f(r, &["duplicated"])).sum::<f64>(),
                "subscribers_ended_early": runs.iter().map(|r| f(r, &["subscribers_ended_early"])).sum::<f64>(),
                "rss_per_connection": median(runs.iter().map(|r| f(r, &["rss_per_connection"])).collect()),
                "loadgen_cpu_share": median(runs.iter().map(|r| f(r, &["loadgen_cpu_share"])).collect()),
                "runs": runs,
            });
            eprintln!(
                "xtask bench: {:<34} n={n:<6} {:>12.0} deliveries/s ({:.2}x)  {:>12.0} per cpu-s ({:.2}x)  p99 {:>8.0} µs  {:>8.0} B/conn  lost {} dup {}",
                kind.name,
                dps,
                row["ratio_deliveries_per_sec"].as_f64().unwrap_or(0.0),
                dpc,
                row["ratio_deliveries_per_cpu_sec"].as_f64().unwrap_or(0.0),
                row["p99_us"].as_f64().unwrap_or(0.0),
                row["rss_per_connection"].as_f64().unwrap_or(0.0),
                row["lost"],
                row["duplicated"],
            );
            rows.push(row);
        }
    }
    // Latency at a fixed offered load: 200 messages/s to 1,000 subscribers.
    let (n, messages) = if plan.quick { (20, 100) } else { (1000, 2000) };
    let mut fixed = Vec::new();
    let mut baseline_p99 = None;
    let servers = &SERVERS[..2];
    for (kind, runs) in servers
        .iter()
        .zip(interleaved(servers, plan.runs, |kind| measure(kind, n, messages, 200))?)
    {
        let q = |name: &str| median(runs.iter().map(|r| f(r, &["latency_us", name])).collect());
        let (p50, p99, max) = (q("p50"), q("p99"), q("max"));
        let base = *baseline_p99.get_or_insert(p99);
        let ratio = p99 / f64::max(base, 1.0);
        eprintln!(
            "xtask bench: fixed 200 msg/s, {n} subscribers, {:<34} p50 {p50:>6.0} µs  p99 {p99:>6.0} µs ({ratio:.2}x)  max {max:>6.0} µs",
            kind.name,
        );
        fixed.push(json!({
            "server": kind.name,
            "subscribers": n,
            "rate": 200,
            "p50_us": p50,
            "p99_us": p99,
            "max_us": max,
            "ratio_p99": ratio,
            "loadgen_cpu_share": median(runs.iter().map(|r| f(r, &["loadgen_cpu_share"])).collect()),
            "runs": runs,
        }));
    }
    let results = json!({"plan": {"sizes": plan.sizes, "messages": plan.messages, "runs": plan.runs}, "throughput": rows, "fixed_rate": fixed});
    std::fs::create_dir_all("target/bench").map_err(|e| e.to_string())?;
    let path = "target/bench/results.json";
    std::fs::write(path, serde_json::to_string_pretty(&results).unwrap_or_default()).map_err(|e| e.to_string())?;
    eprintln!("xtask bench: results written to {path}");
    Ok(())
}

/// `cargo xtask soak`: the chat server (sled store) under churn for a while;
/// fails when a group or channel leaked or memory did not come back down.
/// `server_args` go to the chat server (e.g. `--store memory`); the default
/// store is sled.
/// The soak run's server accepts this admin token, so that the driver can flush
/// history before its last memory check.
const SOAK_ADMIN_TOKEN: &str = "soak-admin";

/// The soak server's per-group history budget unless `-- --history-bytes N`.
const SOAK_HISTORY_BYTES: &str = "65536";

pub(crate) fn soak(connections: usize, seconds: u64, server_args: &[String]) -> Result<(), String> {
    // The chat server with its defaults (sled), plus `server_args`.
    let kind = &ServerKind {
        name: "channelbox",
        program: "target/release/examples/chat",
        args: &["--admin-token", SOAK_ADMIN_TOKEN],
        history: true,
        members: "api",
    };
    let data = std::env::temp_dir().join(format!("channelbox-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    // A small history budget fills within the first round, so the memory the
    // driver compares between rounds is not history still growing.
    let mut server_args = server_args.to_vec();
    if !server_args.iter().any(|a| a == "--history-bytes") {
        server_args.extend(["--history-bytes".to_owned(), SOAK_HISTORY_BYTES.to_owned()]);
    }
    let (mut child, addr) = start_server(kind, &data, &server_args)?;
    let args = vec![
        format!("--addr {addr}"),
        format!("--pid {}", child.id()),
        format!("--connections {connections}"),
        format!("--seconds {seconds}"),
        format!("--admin-token {SOAK_ADMIN_TOKEN}"),
    ];
    let out = pinned(Some(1), "target/release/soak", &args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run the soak driver: {e}"));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&data);
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    eprintln!("xtask soak: {text}");
    std::fs::create_dir_all("target/soak").map_err(|e| e.to_string())?;
    std::fs::write("target/soak/results.json", &text).map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("the soak run failed ({})", out.status));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_take_turns_and_runs_stay_with_their_server() {
        let mut order = Vec::new();
        let runs = interleaved(&["base", "ours"], 3, |kind| {
            order.push(*kind);
            Ok(json!({"server": kind, "run": order.len()}))
        })
        .unwrap();
        assert_eq!(order, ["base", "ours", "base", "ours", "base", "ours"]);
        let of = |i: usize| runs[i].iter().map(|r| r["run"].as_u64().unwrap()).collect::<Vec<_>>();
        assert_eq!((of(0), of(1)), (vec![1, 3, 5], vec![2, 4, 6]));
        assert!(interleaved(&["base"], 2, |_| Err::<Value, _>("down".to_owned())).is_err());
    }
}
