//! `cargo xtask bench --storm`: a recovery storm against the chat server
//! (sled). The server is filled, killed and restarted on the same data; then
//! 10,000 clients in 50 groups reconnect at once, each 200 messages behind
//! (`target/release/storm` drives them and checks every recovery is complete
//! and exact), and every group gets live messages. Reports the server's CPU
//! per replayed message against its CPU per live delivery, and its peak
//! resident memory; writes target/bench/storm.json.

use std::net::TcpListener;
use std::process::{Child, Stdio};

use serde_json::Value;

use crate::bench::{listening, pinned, Plan};

fn start(args: &[String]) -> Result<Child, String> {
    Ok(listening(pinned(Some(0), "target/release/examples/chat", args), "chat")?.0)
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn tool(pid: u32, addr: &str, phase: &str, sizes: &[(&str, usize)]) -> Result<String, String> {
    let mut args = vec![
        format!("--addr {addr}"),
        format!("--pid {pid}"),
        format!("--phase {phase}"),
    ];
    args.extend(sizes.iter().map(|(flag, n)| format!("--{flag} {n}")));
    let out = pinned(Some(1), "target/release/storm", &args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run the storm tool: {e}"))?;
    if !out.status.success() {
        return Err(format!("the storm tool failed in phase {phase} ({})", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub(crate) fn run(plan: &Plan) -> Result<(), String> {
    let sizes: [(&str, usize); 5] = if plan.quick {
        [
            ("groups", 5),
            ("clients", 200),
            ("history", 60),
            ("behind", 20),
            ("live", 5),
        ]
    } else {
        [
            ("groups", 50),
            ("clients", 10_000),
            ("history", 400),
            ("behind", 200),
            ("live", 20),
        ]
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let data = std::env::temp_dir().join(format!("channelbox-storm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let args: Vec<String> = [
        "--addr",
        &addr,
        "--store",
        "sled",
        "--data",
        &data.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let server = start(&args)?;
    let filled = tool(server.id(), &addr, "fill", &sizes);
    // The restart: killed, then started again on the same data.
    stop(server);
    filled?;
    let server = start(&args)?;
    let report = tool(server.id(), &addr, "storm", &sizes);
    stop(server);
    let _ = std::fs::remove_dir_all(&data);
    let report: Value = serde_json::from_str(&report?).map_err(|e| e.to_string())?;
    let f = |k: &str| report[k].as_f64().unwrap_or(0.0);
    eprintln!(
        "xtask bench --storm: {} clients in {} groups, {} behind: {} recovered complete and exact in {:.2} s; server CPU {:.2} µs per replayed message, {:.2} µs per live delivery ({:.2}x); peak RSS {:.0} MB",
        f("clients"),
        f("groups"),
        f("behind"),
        f("recovered_complete_and_exact"),
        f("storm_seconds"),
        f("server_cpu_us_per_replayed_message"),
        f("server_cpu_us_per_live_delivery"),
        f("ratio_replay_to_live"),
        f("peak_rss_bytes") / 1e6,
    );
    std::fs::create_dir_all("target/bench").map_err(|e| e.to_string())?;
    std::fs::write("target/bench/storm.json", report.to_string()).map_err(|e| e.to_string())?;
    if f("recovered_complete_and_exact") < f("clients") {
        return Err("some clients did not recover completely and exactly".into());
    }
    Ok(())
}
