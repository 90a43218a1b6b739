//! `cargo xtask`: the one entry point for everything beyond `cargo test`.
//!
//! - `cargo xtask ci`: formatting, clippy with warnings as errors, every test,
//!   and the property tests with a moderate number of cases.
//! - `cargo xtask proptest [--cases N]`: the property tests with many cases
//!   (default 10,000), in release mode.
//! - `cargo xtask bench [--quick]`: the criterion benchmarks, then the loopback
//!   server benchmark against a baseline server; `--quick` is CI's smoke run.
//!   `--compression`: permessage-deflate on against off, 1,000 subscribers,
//!   `--sample N` of them (default 50) decoding, the rest counting frames.
//!   `--light`: only the light-load part (200 messages/s to 1,000
//!   subscribers, CPU per delivery against the baseline; see `light`).
//! - `cargo xtask fuzz [--cases N]`: the frame decoder and dispatcher fuzzed
//!   with arbitrary input (default 50,000 cases; CI runs 128 with the tests).
//! - `cargo xtask soak [--connections N] [--seconds S]`: the chat server under
//!   connect/publish/recover/disconnect churn; checks nothing leaked and
//!   reports the server's RSS at start, after the load, at peak and once the
//!   clients are gone and history is flushed.
//! - `cargo xtask chaos [--seed S] [--minutes N] [--store memory|sled|redis]
//!   [--mutation NAME | --mutations] [--shrink] [--no-build]`: servers,
//!   Redis and clients under a seeded schedule of faults, then a check of
//!   every client's log and the final histories (see `chaos`).
//! - `cargo xtask e2e`: the browser tests of the chat page, the admin page
//!   and the client's fallback to Server-Sent Events in headless Chromium
//!   (needs Debian's `chromium` and Node.js; `.ci/run` installs them).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod bench;
mod chaos;
mod cluster_bench;
mod compression_bench;
mod light;
mod loopback;
mod redis_setups;
mod saved_bench;
mod storm_bench;
mod targets;
mod tidy;

/// channelbox-server's test suites that hold for every web framework adapter
/// (channelbox-warp's `filters` suite tests warp's own filters).
const TRANSPORT_SUITES: [&str; 11] = [
    "protocol",
    "http_api",
    "recovery",
    "presence",
    "deadlines",
    "server",
    "client",
    "cluster",
    "hooks",
    "namespaces",
    "sse",
];

/// Property tests are named `*_matches_the_model`; this filter selects them.
const PROPTEST_FILTER: &str = "matches_the_model";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("proptest") => proptest(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("e2e") => e2e(),
        Some("fuzz") => fuzz(&args[1..]),
        Some("soak") => soak(&args[1..]),
        Some("chaos") => chaos::Options::parse(&args[1..]).and_then(|o| chaos::chaos(&o)),
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("xtask: {msg}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask <ci | proptest [--cases N] | bench [--quick] [--loopback-only] [--sizes a,b] [--messages N] [--runs R] [--cluster | --storm | --compression [--sample N] [--rate R [--seconds S]] | --light [--seconds S] [--write-delays a,b]] | e2e | fuzz [--cases N] | soak [--connections N] [--seconds S] [-- server flags] | chaos [--seed S] [--minutes N] [--store memory|sled|redis] [--mutation NAME | --mutations] [--shrink] [--no-build]>";

/// Runs `cargo` with these arguments and environment, failing on a non-zero exit.
fn cargo(args: &[&str], env: &[(&str, &str)]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !status.success() {
        return Err(format!("cargo {} failed ({status})", args.join(" ")));
    }
    Ok(())
}

/// Debian packages the tests need, by the program each provides: the browser
/// test's Chromium and Node.js, `redis-server` for the cluster tests (each
/// starts its own on a free port), `redis-cli` to create their Redis
/// Clusters, `prlimit`/`mount` for the hostile suite, and `make` for
/// jemalloc's build (the servers' allocator).
const SYSTEM_PACKAGES: [(&str, &str); 8] = [
    ("make", "make"),
    ("chromium", "chromium"),
    ("redis-server", "redis-server"),
    ("redis-cli", "redis-tools"),
    ("node", "nodejs"),
    ("npm", "npm"),
    ("prlimit", "util-linux"),
    ("mount", "mount"),
];

/// Whether `program` is on the `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Installs the missing Debian packages when running as root; otherwise
/// stops at once with the command to run.
fn system_packages() -> Result<(), String> {
    let mut missing: Vec<&str> = SYSTEM_PACKAGES
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!("apt-get update && apt-get install -y {}", missing.join(" "));
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Err(format!(
            "the tests need {}; run: sudo sh -c '{install}'",
            missing.join(", ")
        ));
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(
        "sh",
        &["-c", &install],
        &[("DEBIAN_FRONTEND", "noninteractive")],
        &self::root(),
    )
}

fn ci() -> Result<(), String> {
    system_packages()?;
    cargo(&["fmt", "--all", "--", "--check"], &[])?;
    cargo(
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "-j2",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    // The socket adapter alone, without the chat protocol (channelbox-ws's
    // default feature), must keep building.
    cargo(&["check", "-p", "channelbox-ws", "--no-default-features", "-j2"], &[])?;
    // Every test, property tests included with proptest's default case count.
    cargo(&["test", "--workspace", "-j2"], &[("RUSTDOCFLAGS", "-D warnings")])?;
    // The suites that hold for every transport, once more through axum: the
    // same tests against the same binary, `--http axum`.
    let mut suites = vec!["test", "-j2", "-p", "channelbox-server"];
    for suite in TRANSPORT_SUITES {
        suites.extend(["--test", suite]);
    }
    cargo(&suites, &[("CHANNELBOX_HTTP", "axum")])?;
    // The hostile-client suite against the release server, which cargo
    // builds for it (the suite is `test = false`, so named explicitly, and
    // refuses to run without CHANNELBOX_HOSTILE=1).
    build_server_tools()?;
    cargo(
        &[
            "test",
            "--release",
            "-j2",
            "-p",
            "channelbox-server",
            "--test",
            "hostile",
        ],
        &[("CHANNELBOX_HOSTILE", "1")],
    )?;
    // The property tests once more, with a moderate case count.
    cargo(
        &["test", "--workspace", "-j2", "--", PROPTEST_FILTER],
        &[("PROPTEST_CASES", "2000")],
    )?;
    e2e()?;
    // Short runs of the benchmarks and of the soak, so that they cannot rot.
    bench(&["--quick".to_owned()])?;
    bench(&["--cluster".to_owned(), "--quick".to_owned()])?;
    bench(&["--storm".to_owned(), "--quick".to_owned()])?;
    bench(&["--compression".to_owned(), "--quick".to_owned()])?;
    soak(&[
        "--connections".to_owned(),
        "50".to_owned(),
        "--seconds".to_owned(),
        "5".to_owned(),
    ])?;
    chaos_smoke()
}

/// Short chaos runs on fixed seeds, one per store (about 30 s each), so that
/// the checker and its workload cannot rot. Seeds whose schedules include
/// server kills; `cargo xtask chaos --minutes N` runs longer ones.
fn chaos_smoke() -> Result<(), String> {
    // Redis seed 1 rolls Redis back to a snapshot (at 23.8 s) and sled seed 5
    // fills the disk while publishing: such runs failed before rollback-safe
    // epochs. Redis seed 2 loses pub/sub messages twice (`DropPubsub`), so
    // the servers fill gaps from history.
    let runs = [
        ("memory", "4", "20"),
        ("sled", "1", "20"),
        ("redis", "1", "30"),
        ("redis", "2", "30"),
        ("sled", "5", "30"),
    ];
    for (store, seed, seconds) in runs {
        let args = ["--seed", seed, "--seconds", seconds, "--store", store].map(String::from);
        chaos::chaos(&chaos::Options::parse(&args)?)?;
    }
    Ok(())
}

/// The chat server and the benchmark tools, in release mode.
fn build_server_tools() -> Result<(), String> {
    build_chat_server(&[])?;
    cargo(&["build", "--release", "-j2", "-p", "channelbox-bench", "--bins"], &[])
}

/// The chat server example in release mode, with `extra` cargo arguments
/// (features, another target directory) after the usual ones.
fn build_chat_server(extra: &[&str]) -> Result<(), String> {
    let mut args = vec![
        "build",
        "--release",
        "-j2",
        "-p",
        "channelbox-warp",
        "--example",
        "chat",
    ];
    args.extend_from_slice(extra);
    cargo(&args, &[])
}

fn soak(args: &[String]) -> Result<(), String> {
    let (mut connections, mut seconds) = (1000usize, 60u64);
    // Anything after `--` goes to the chat server, e.g. `-- --store memory`.
    let (ours, server_args) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let mut it = ours.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--connections" => connections = value.parse().map_err(|_| "bad --connections".to_owned())?,
            "--seconds" => seconds = value.parse().map_err(|_| "bad --seconds".to_owned())?,
            other => return Err(format!("unknown soak argument {other:?}")),
        }
    }
    std::env::set_current_dir(root()).map_err(|e| e.to_string())?;
    build_server_tools()?;
    bench::soak(connections, seconds, server_args)
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(program: &str, args: &[&str], env: &[(&str, &str)], dir: &Path) -> Result<(), String> {
    eprintln!("xtask: {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .status()
        .map_err(|e| format!("cannot run {program}: {e} (is it installed? .ci/run installs it)"))?;
    if !status.success() {
        return Err(format!("{program} {} failed ({status})", args.join(" ")));
    }
    Ok(())
}

/// The TypeScript client: built with its lockfile's compiler, its bundle
/// checked against the copy the server embeds, its tests run against the
/// chat server `bin`.
fn typescript_client(root: &Path, bin: &str) -> Result<(), String> {
    let client = root.join("clients").join("typescript");
    if !client.join("node_modules").join("typescript").exists() {
        run("npm", &["ci", "--no-audit", "--no-fund"], &[], &client)?;
    }
    run("npm", &["run", "build"], &[], &client)?;
    let built = std::fs::read(client.join("dist").join("channelbox.min.js")).map_err(|e| e.to_string())?;
    let embedded = root
        .join("channelbox-protocol")
        .join("assets")
        .join("channelbox.min.js");
    if std::fs::read(&embedded).map_err(|e| e.to_string())? != built {
        return Err(format!(
            "{} is not the client's build: run `npm run build` in clients/typescript and copy dist/channelbox.min.js there",
            embedded.display()
        ));
    }
    run("npm", &["test"], &[("CHAT_BIN", bin)], &client)
}

/// The browser tests: the chat example in debug mode, driven in headless
/// Chromium by `e2e/browser.mjs` (the chat page), `e2e/admin.mjs` (the admin
/// page) and `e2e/fallback.mjs` (the client bundle's fallback to Server-Sent
/// Events); the screenshots go to target/browser/.
fn e2e() -> Result<(), String> {
    system_packages()?;
    let root = root();
    cargo(&["build", "-j2", "-p", "channelbox-warp", "--example", "chat"], &[])?;
    let e2e = root.join("e2e");
    if !e2e.join("node_modules").join("playwright-core").exists() {
        run("npm", &["ci", "--no-audit", "--no-fund"], &[], &e2e)?;
    }
    let bin = root.join("target").join("debug").join("examples").join("chat");
    let bin = bin.to_string_lossy();
    typescript_client(&root, &bin)?;
    run(
        "node",
        &["e2e/browser.mjs", "target/browser/chat.png"],
        &[("CHAT_BIN", &bin)],
        &root,
    )?;
    run(
        "node",
        &["e2e/admin.mjs", "target/browser/admin.png"],
        &[("CHAT_BIN", &bin)],
        &root,
    )?;
    // The client bundle's fallback to Server-Sent Events, in Chromium,
    // behind a proxy that refuses WebSocket upgrades.
    run("node", &["e2e/fallback.mjs"], &[("CHAT_BIN", &bin)], &root)
}

/// `--cases N`, or the default.
fn cases(args: &[String], default: &str, usage: &str) -> Result<String, String> {
    match args {
        [] => Ok(default.to_owned()),
        [flag, n] if flag == "--cases" && n.parse::<u64>().is_ok() => Ok(n.clone()),
        _ => Err(usage.to_owned()),
    }
}

fn fuzz(args: &[String]) -> Result<(), String> {
    let cases = cases(args, "50000", "usage: cargo xtask fuzz [--cases N]")?;
    cargo(
        &[
            "test",
            "--release",
            "-j2",
            "-p",
            "channelbox-protocol",
            "--test",
            "fuzz",
        ],
        &[("FUZZ_CASES", &cases)],
    )
}

fn proptest(args: &[String]) -> Result<(), String> {
    let cases = cases(args, "10000", "usage: cargo xtask proptest [--cases N]")?;
    cargo(
        &["test", "--workspace", "--release", "-j2", "--", PROPTEST_FILTER],
        &[("PROPTEST_CASES", &cases)],
    )
}

fn bench(args: &[String]) -> Result<(), String> {
    let plan = bench::Plan::parse(args)?;
    std::env::set_current_dir(root()).map_err(|e| e.to_string())?;
    if plan.cluster {
        build_server_tools()?;
        return cluster_bench::run(&plan);
    }
    if plan.storm {
        build_server_tools()?;
        return storm_bench::run(&plan);
    }
    if plan.compression {
        build_server_tools()?;
        return compression_bench::run(&plan);
    }
    if plan.light {
        build_server_tools()?;
        return light::alone(&plan);
    }
    // 1. Criterion: core fan-out and sled appends (`--test` runs each once).
    let mut criterion = vec!["bench", "--workspace", "-j2"];
    if plan.quick {
        criterion.extend(["--", "--test"]);
    }
    if !plan.loopback_only {
        cargo(&criterion, &[])?;
    }
    // 2. The loopback server benchmark, in release mode.
    build_server_tools()?;
    loopback::loopback(&plan)
}
