//! `cargo xtask chaos`: a fault checker in the Jepsen/FoundationDB tradition.
//! Real processes — chat servers on one store (memory, sled, or three servers
//! on a Redis of the run's own), clients built on the project's Rust client
//! (`chaos_client`) — while a nemesis drawn from a seed kills, pauses and
//! restarts them and stalls, delays and cuts the links between them through
//! proxies. Afterwards [`checker`] reads every client's log and the final
//! histories. A failure prints the seed and the schedule; `--seed S` replays
//! the same schedule, `--shrink` drops faults while the run still fails.
//!
//! `--mutation NAME` runs servers built with the `chaos-mutations` feature
//! and `CHANNELBOX_MUTATION=NAME`: a deliberately injected bug the run must
//! catch (see `channelbox-core`'s `mutation` module). `--mutations` runs
//! every one of [`MUTATIONS`] on the seed that catches it and fails if any
//! run passes.

mod checker;
mod cluster;
mod nemesis;
mod proxy;
mod resp;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use cluster::Cluster;
use nemesis::{Step, Store};

/// Clients and groups of every run: enough for cross traffic, few enough
/// for two shared cores.
const CLIENTS: usize = 6;
const GROUPS: usize = 4;
/// Seconds the clients only listen after publishing, so recoveries end.
const SETTLE: u64 = 8;

/// What to run.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub(crate) seed: u64,
    pub(crate) seconds: u64,
    pub(crate) store: Store,
    pub(crate) mutation: Option<String>,
    pub(crate) shrink: bool,
    /// Print the seed's schedule and stop (`--print-schedule`).
    pub(crate) print_only: bool,
    /// Use the binaries already built (`--no-build`): a sweep of many seeds
    /// on one build, while the sources change.
    pub(crate) no_build: bool,
    /// Run every injected bug of [`MUTATIONS`] and require each to be
    /// caught (`--mutations`).
    pub(crate) all_mutations: bool,
}

impl Options {
    pub(crate) fn parse(args: &[String]) -> Result<Options, String> {
        let mut o = Options {
            seed: 1,
            seconds: 60,
            store: Store::Memory,
            mutation: None,
            shrink: false,
            print_only: false,
            no_build: false,
            all_mutations: false,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if matches!(
                flag.as_str(),
                "--shrink" | "--print-schedule" | "--no-build" | "--mutations"
            ) {
                o.shrink |= flag == "--shrink";
                o.print_only |= flag == "--print-schedule";
                o.no_build |= flag == "--no-build";
                o.all_mutations |= flag == "--mutations";
                continue;
            }
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let number = || value.parse::<u64>().map_err(|_| format!("bad {flag} {value:?}"));
            match flag.as_str() {
                "--seed" => o.seed = number()?,
                "--minutes" => o.seconds = number()? * 60,
                "--seconds" => o.seconds = number()?,
                "--store" => o.store = Store::parse(value)?,
                "--mutation" => o.mutation = Some(value.clone()),
                other => return Err(format!("unknown chaos argument {other:?}\n{USAGE}")),
            }
        }
        Ok(o)
    }
}

/// The flags of `cargo xtask chaos`.
pub(crate) const USAGE: &str = "usage: cargo xtask chaos [--seed S] [--minutes N | --seconds N] [--store memory|sled|redis] [--mutation NAME | --mutations] [--shrink] [--print-schedule] [--no-build]";

/// Builds what a run needs, runs the schedule of the seed, and fails with a
/// report when the checker finds a violation.
pub(crate) fn chaos(o: &Options) -> Result<(), String> {
    if o.all_mutations {
        return mutations(o.no_build);
    }
    let schedule = nemesis::schedule(o.seed, o.store, o.seconds.saturating_sub(3) * 1000);
    if o.print_only {
        schedule.iter().for_each(|step| println!("{step}"));
        return Ok(());
    }
    std::env::set_current_dir(crate::root()).map_err(|e| e.to_string())?;
    if !o.no_build {
        build(o.mutation.is_some())?;
    }
    let violations = run(o, &schedule)?;
    if violations.is_empty() {
        eprintln!(
            "xtask chaos: seed {} store {} ({} s, {} faults): every check passed",
            o.seed,
            o.store.name(),
            o.seconds,
            schedule.len()
        );
        return Ok(());
    }
    report(o, &schedule, &violations);
    if o.shrink {
        let smallest = shrink(o, schedule)?;
        eprintln!(
            "xtask chaos: a smallest failing schedule found ({} faults):",
            smallest.len()
        );
        for step in &smallest {
            eprintln!("  {step}");
        }
    }
    Err(format!(
        "chaos seed {} store {}: {} violations (replay: cargo xtask chaos --seed {} --seconds {} --store {}{})",
        o.seed,
        o.store.name(),
        violations.len(),
        o.seed,
        o.seconds,
        o.store.name(),
        o.mutation
            .as_ref()
            .map(|m| format!(" --mutation {m}"))
            .unwrap_or_default()
    ))
}

/// Every injected bug, with a run that catches it: the store, the seed and
/// the seconds. Each of these passes without the bug (the seeds of CI's
/// smoke runs, or of the sweep that found them).
pub(crate) const MUTATIONS: [(&str, Store, u64, u64); 4] = [
    // Redis comes back at 23.8 s from the snapshot taken at 1.5 s, and the
    // groups keep their epochs: offsets named twice (1,010-1,805
    // violations in three runs).
    ("skip_epoch_change", Store::Redis, 1, 30),
    ("recover_always_complete", Store::Memory, 4, 20),
    ("ack_before_durable", Store::Sled, 1, 20),
    // Server 0 loses every pub/sub message for 2.9 s from 23.9 s on
    // (`DropPubsub`, 157-268 messages), with no fault after it: members
    // that stay in a group to the end miss what followed the gap (caught in
    // 8 of 8 runs, 1-3 violations each). The mutation shows only when a member
    // holds the stuck group to the end of the run: the clients leave and
    // join groups about once a second, and a group without members here is
    // forgotten, gap and all; a 4002 or a restart heals it too. So the gap
    // must come late and nothing may follow it; earlier drops (seed 18, a
    // drop at 22.8 s) were caught in 1 of 2 runs, seed 4 at 60 s (last drop
    // at 47 s, a rollback after it) in 0 of 2.
    ("drop_gap_fill", Store::Redis, 16, 30),
];
/// Runs every one of [`MUTATIONS`]; fails unless each was caught.
fn mutations(no_build: bool) -> Result<(), String> {
    std::env::set_current_dir(crate::root()).map_err(|e| e.to_string())?;
    if !no_build {
        build(true)?;
    }
    let mut results = Vec::new();
    for (name, store, seed, seconds) in MUTATIONS {
        let o = Options {
            seed,
            seconds,
            store,
            mutation: Some(name.to_owned()),
            shrink: false,
            print_only: false,
            no_build: true,
            all_mutations: false,
        };
        let schedule = nemesis::schedule(seed, store, seconds.saturating_sub(3) * 1000);
        // A run that could not finish (a client failed) caught nothing: it is
        // reported, and the other mutations still run.
        let outcome = match run(&o, &schedule) {
            Ok(violations) if violations.is_empty() => Err("every check passed".to_owned()),
            Ok(violations) => {
                let path = run_dir(&o).join("violations.txt");
                let _ = std::fs::write(&path, violations.join("\n") + "\n");
                eprintln!("xtask chaos: mutation {name}: the first violation: {}", violations[0]);
                Ok(violations.len())
            }
            Err(err) => Err(format!("the run failed: {err}")),
        };
        results.push((name, store, seed, seconds, outcome));
    }
    eprintln!("xtask chaos: the mutations:");
    let mut escaped = Vec::new();
    for (name, store, seed, seconds, outcome) in &results {
        let what = match outcome {
            Ok(n) => format!("caught, {n} violations"),
            Err(why) => {
                escaped.push(*name);
                format!("NOT caught: {why}")
            }
        };
        eprintln!(
            "  {name:<24} store {:<6} seed {seed:<3} {seconds:>3} s  {what}",
            store.name()
        );
    }
    if escaped.is_empty() {
        return Ok(());
    }
    Err(format!("the checker missed the injected bugs {escaped:?}"))
}

fn report(o: &Options, schedule: &[Step], violations: &[String]) {
    eprintln!(
        "xtask chaos: FAILED — seed {} store {} seconds {}{}",
        o.seed,
        o.store.name(),
        o.seconds,
        o.mutation
            .as_ref()
            .map(|m| format!(" mutation {m}"))
            .unwrap_or_default()
    );
    eprintln!("xtask chaos: the schedule:");
    for step in schedule {
        eprintln!("  {step}");
    }
    eprintln!("xtask chaos: {} violations (at most 40 shown):", violations.len());
    for v in violations.iter().take(40) {
        eprintln!("  {v}");
    }
    // All of them, with the schedule, beside the run's logs.
    let mut text: Vec<String> = schedule.iter().map(Step::to_string).collect();
    text.extend(violations.iter().cloned());
    let path = run_dir(o).join("violations.txt");
    if std::fs::write(&path, text.join("\n") + "\n").is_ok() {
        eprintln!("xtask chaos: every violation is in {}", path.display());
    }
}

/// Where a run keeps its logs (a mutation's runs apart from the plain ones,
/// so that both can run at once).
fn run_dir(o: &Options) -> PathBuf {
    let mutation = o.mutation.as_ref().map(|m| format!("-{m}")).unwrap_or_default();
    PathBuf::from("target/chaos").join(format!("{}-{}{mutation}", o.store.name(), o.seed))
}

/// Drops faults one by one while the run still fails.
fn shrink(o: &Options, mut schedule: Vec<Step>) -> Result<Vec<Step>, String> {
    let mut i = 0;
    while i < schedule.len() {
        let mut fewer = schedule.clone();
        let dropped = fewer.remove(i);
        eprintln!("xtask chaos: shrinking, without {dropped}");
        if run(o, &fewer)?.is_empty() {
            i += 1;
        } else {
            schedule = fewer;
        }
    }
    Ok(schedule)
}

/// The chat server and the chaos workload, in release mode; with mutations,
/// a server of their own in target/chaos-mutations.
fn build(mutations: bool) -> Result<(), String> {
    crate::build_server_tools()?;
    if mutations {
        crate::build_chat_server(&["--features", MUTATION_FEATURES, "--target-dir", MUTATION_TARGET])?;
    }
    Ok(())
}

/// The features that compile the injected bugs in (each stays off unless
/// `CHANNELBOX_MUTATION` names it).
const MUTATION_FEATURES: &str = "channelbox-core/chaos-mutations";
/// Where the server with mutations is built, apart from the normal one.
const MUTATION_TARGET: &str = "target/chaos-mutations";

/// One run of `schedule`; the violations found.
fn run(o: &Options, schedule: &[Step]) -> Result<Vec<String>, String> {
    let dir = run_dir(o);
    let _ = std::fs::remove_dir_all(&dir);
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
    let server = match &o.mutation {
        Some(_) => format!("{MUTATION_TARGET}/release/examples/chat"),
        None => "target/release/examples/chat".to_owned(),
    };
    let mut cluster = Cluster::start(o.store, &dir, &server, o.mutation.clone())?;
    let mut clients = Command::new("target/release/chaos_client")
        .arg("--servers")
        .arg(cluster.client_urls().join(","))
        .args(["--clients", &CLIENTS.to_string(), "--groups", &GROUPS.to_string()])
        .args(["--seconds", &o.seconds.to_string(), "--settle", &SETTLE.to_string()])
        .args(["--seed", &o.seed.to_string()])
        .arg("--logs")
        .arg(&logs)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start chaos_client: {e}"))?;
    let start = Instant::now();
    for step in schedule {
        let at = Duration::from_millis(step.at_ms);
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        eprintln!("xtask chaos: {step}");
        cluster.apply(step.fault)?;
    }
    let deadline = start + Duration::from_secs(o.seconds + SETTLE + 60);
    let status = loop {
        if let Some(status) = clients.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = clients.kill();
            return Err("the chaos clients did not finish in time".to_owned());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        return Err(format!("chaos_client failed ({status})"));
    }
    let mut histories = BTreeMap::new();
    for g in 0..GROUPS {
        let name = format!("chaos-{g}");
        histories.insert(name.clone(), cluster.history(&name)?);
    }
    drop(cluster);
    let logs = read_logs(&logs)?;
    eprintln!("xtask chaos: checked {}", checker::summary(&logs));
    Ok(checker::check(&logs, &histories, o.store == Store::Redis))
}

fn read_logs(dir: &Path) -> Result<Vec<Vec<Value>>, String> {
    (0..CLIENTS)
        .map(|n| {
            let path = dir.join(format!("client-{n}.jsonl"));
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            text.lines()
                .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: {e}", path.display())))
                .collect()
        })
        .collect()
}
