//! The checker of `cargo xtask chaos`: reads every client's log and the final
//! histories and lists every broken promise of the protocol:
//!
//! 1. no (epoch, offset) of a group names two different payloads, and a
//!    payload is delivered under the offset it was saved at;
//! 2. per client and group, delivered offsets go up by one — a gap, a repeat
//!    or an epoch change is allowed only after a `recovered` with
//!    `complete:false`, a close 4002, or a leave/join;
//! 3. every acknowledged message is in the final history, unless its epoch
//!    ended; a client still in a group at the end holds the final epoch or
//!    was told, and received every saved message after its first one;
//! 4. no publish refused `unavailable` is ever delivered or saved, except
//!    on Redis when the server said the outcome is unknown (Redis did not
//!    answer: a timeout, a connection broken with the command in flight).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

/// A group's final history: its epoch and its (offset, payload id) pairs.
pub(crate) type History = (String, Vec<(u64, String)>);

/// Where each payload was saved, as far as acknowledgements and the final
/// histories tell.
#[derive(Default)]
struct Known {
    by_id: HashMap<String, (String, String, u64)>,
    by_pos: HashMap<(String, String, u64), String>,
}

impl Known {
    fn record(&mut self, g: &str, e: &str, o: u64, id: &str, out: &mut Vec<String>) {
        let pos = (g.to_owned(), e.to_owned(), o);
        if let Some(other) = self.by_pos.get(&pos).filter(|other| *other != id) {
            out.push(format!(
                "(1) {g} epoch {e} offset {o} names two payloads: {other} and {id}"
            ));
        }
        // The same payload under the same offset in another epoch is a
        // survivor of an epoch move (PROTOCOL.md: "the new epoch keeps the
        // messages that survived, under their offsets"), not a second save.
        let carried = |was: &(String, String, u64)| was.0 == pos.0 && was.2 == pos.2;
        if let Some(was) = self.by_id.get(id).filter(|was| **was != pos && !carried(was)) {
            out.push(format!("(1) payload {id} saved twice: at {was:?} and at {pos:?}"));
        }
        self.by_pos.entry(pos.clone()).or_insert_with(|| id.to_owned());
        self.by_id.entry(id.to_owned()).or_insert(pos);
    }

    /// The epoch a payload of `g` was saved under, when known.
    fn epoch(&self, g: &str, id: &str) -> Option<&(String, String, u64)> {
        self.by_id.get(id).filter(|(group, _, _)| group == g)
    }
}

/// One client's unbroken run of deliveries in one group.
struct Run {
    epoch: Option<String>,
    first: u64,
    last: u64,
    delivered: BTreeSet<u64>,
}

fn s<'a>(line: &'a Value, key: &str) -> &'a str {
    line[key].as_str().unwrap_or("")
}

/// Every violation found; empty when the run kept every promise. `redis`:
/// the store is Redis, where a refusal may declare its outcome unknown.
pub(crate) fn check(logs: &[Vec<Value>], histories: &BTreeMap<String, History>, redis: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut known = Known::default();
    for line in logs.iter().flatten().filter(|l| s(l, "k") == "ack") {
        if let (Some(e), Some(o)) = (line["e"].as_str(), line["o"].as_u64()) {
            known.record(s(line, "g"), e, o, s(line, "id"), &mut out);
        }
    }
    for (g, (e, messages)) in histories {
        for (o, id) in messages {
            known.record(g, e, *o, id, &mut out);
        }
    }
    let sent: HashMap<&str, u64> = logs
        .iter()
        .flatten()
        .filter(|l| s(l, "k") == "send")
        .map(|l| (s(l, "id"), l["t"].as_u64().unwrap_or(0)))
        .collect();
    refused_never_seen(logs, histories, redis, &mut out);
    acked_survive(logs, histories, &mut out);
    for (n, log) in logs.iter().enumerate() {
        client_order(n, log, &known, histories, &mut out);
        membership(n, log, &sent, histories, &mut out);
    }
    out
}

/// How long after a member's `joined` (or a notice of loss) a publish must
/// have been sent for the member to be owed it: the clients' clocks start
/// within a millisecond of each other, and this covers that with room.
const SLACK_MS: u64 = 100;

/// (2), by time: a client that was in a group from `joined` to the end
/// received every saved message sent after it joined — or after the last
/// `recovered complete:false` or 4002 it was given. This catches losses
/// before a client's first message in a group, which the order check cannot
/// see.
fn membership(
    n: usize,
    log: &[Value],
    sent: &HashMap<&str, u64>,
    histories: &BTreeMap<String, History>,
    out: &mut Vec<String>,
) {
    let mut owed_after: HashMap<&str, u64> = HashMap::new();
    let mut got: BTreeSet<&str> = BTreeSet::new();
    for line in log {
        let (g, t) = (s(line, "g"), line["t"].as_u64().unwrap_or(0));
        match s(line, "k") {
            "joined" => {
                owed_after.insert(g, t);
            }
            "left" => {
                owed_after.remove(g);
            }
            "rec" if line["complete"] == Value::Bool(false) => {
                owed_after.entry(g).and_modify(|after| *after = t);
            }
            "disc" if line["code"].as_u64() == Some(4002) => {
                owed_after.values_mut().for_each(|after| *after = t);
            }
            "msg" => {
                got.insert(s(line, "id"));
            }
            "end" => {
                for (g, after) in &owed_after {
                    let Some((epoch, messages)) = histories.get(*g) else {
                        continue;
                    };
                    let missing: Vec<String> = messages
                        .iter()
                        .filter(|(_, id)| sent.get(id.as_str()).is_some_and(|t| *t > after + SLACK_MS))
                        .filter(|(_, id)| !got.contains(id.as_str()))
                        .map(|(o, id)| format!("{o} ({id}, sent at {} ms)", sent[id.as_str()]))
                        .collect();
                    if !missing.is_empty() {
                        out.push(format!(
                            "(2) client {n} was in {g} from {after} ms on and was never told of a loss, but never received epoch {epoch} offsets {}",
                            missing.join(", ")
                        ));
                    }
                }
            }
            _ => {}
        }
    }
}

/// Counts of what a run's logs hold, for the report.
pub(crate) fn summary(logs: &[Vec<Value>]) -> String {
    let count = |kind: &str| logs.iter().flatten().filter(|l| s(l, "k") == kind).count();
    let incomplete = logs
        .iter()
        .flatten()
        .filter(|l| s(l, "k") == "rec" && l["complete"] == Value::Bool(false))
        .count();
    format!(
        "{} deliveries, {} acks, {} refusals, {} unknown outcomes, {} disconnects, {} recoveries ({incomplete} incomplete)",
        count("msg"),
        count("ack"),
        count("refused"),
        count("unknown"),
        count("disc"),
        count("rec")
    )
}

/// What the message of an `unavailable` says when the server never had an
/// answer from Redis (`UNANSWERED` in channelbox-protocol): the publish may
/// still appear. Any other refusal promises it had no effect — a fast
/// refusal included: guessing by how long it took (as this checker did)
/// missed a connection cut between the command and its answer.
const UNKNOWN_OUTCOME: &str = "outcome is unknown";

/// (4): refused publishes had no effect.
fn refused_never_seen(logs: &[Vec<Value>], histories: &BTreeMap<String, History>, redis: bool, out: &mut Vec<String>) {
    let unknown_outcome = |l: &Value| redis && s(l, "msg").contains(UNKNOWN_OUTCOME);
    let refused: HashMap<&str, &str> = logs
        .iter()
        .flatten()
        .filter(|l| s(l, "k") == "refused" && !unknown_outcome(l))
        .map(|l| (s(l, "id"), s(l, "code")))
        .collect();
    for (g, (e, messages)) in histories {
        for (o, id) in messages.iter().filter(|(_, id)| refused.contains_key(id.as_str())) {
            out.push(format!(
                "(4) payload {id} was refused `{}` but is saved in {g} at epoch {e} offset {o}",
                refused[id.as_str()]
            ));
        }
    }
    for (n, log) in logs.iter().enumerate() {
        for l in log
            .iter()
            .filter(|l| s(l, "k") == "msg" && refused.contains_key(s(l, "id")))
        {
            out.push(format!(
                "(4) client {n} received payload {} ({} offset {}) that was refused `{}`",
                s(l, "id"),
                s(l, "g"),
                l["o"],
                refused[s(l, "id")]
            ));
        }
    }
}

/// (3): acknowledged messages of a group's final epoch are in its history.
fn acked_survive(logs: &[Vec<Value>], histories: &BTreeMap<String, History>, out: &mut Vec<String>) {
    let saved: BTreeSet<(&str, u64, &str)> = histories
        .iter()
        .flat_map(|(g, (_, m))| m.iter().map(move |(o, id)| (g.as_str(), *o, id.as_str())))
        .collect();
    for l in logs.iter().flatten().filter(|l| s(l, "k") == "ack") {
        let (g, id) = (s(l, "g"), s(l, "id"));
        let (Some(e), Some(o)) = (l["e"].as_str(), l["o"].as_u64()) else {
            out.push(format!("(3) payload {id} acknowledged without a position: {l}"));
            continue;
        };
        match histories.get(g) {
            Some((final_epoch, _)) if final_epoch == e && !saved.contains(&(g, o, id)) => out.push(format!(
                "(3) payload {id} acknowledged at {g} epoch {e} offset {o} is not in the final history of that epoch"
            )),
            _ => {}
        }
    }
}

/// (2) and the end of (3): one client's deliveries, group by group.
fn client_order(n: usize, log: &[Value], known: &Known, histories: &BTreeMap<String, History>, out: &mut Vec<String>) {
    let mut runs: HashMap<String, Run> = HashMap::new();
    for line in log {
        let g = s(line, "g");
        match s(line, "k") {
            "join" | "left" => {
                runs.remove(g);
            }
            "rec" if line["complete"] == Value::Bool(false) => {
                runs.remove(g);
            }
            "disc" if line["code"].as_u64() == Some(4002) => runs.clear(),
            "msg" => {
                let Some(o) = line["o"].as_u64() else { continue };
                let delivered = Delivered {
                    g,
                    o,
                    id: s(line, "id"),
                    epoch: line["e"].as_str(),
                };
                deliver(n, &delivered, known, &mut runs, out);
            }
            "end" => {
                let groups = line["groups"].as_array().cloned().unwrap_or_default();
                for g in groups.iter().filter_map(Value::as_str) {
                    if let (Some(run), Some(history)) = (runs.get(g), histories.get(g)) {
                        at_end(n, g, run, history, out);
                    }
                }
            }
            _ => {}
        }
    }
}

/// One `message` a client received, as its log line says.
struct Delivered<'a> {
    g: &'a str,
    o: u64,
    id: &'a str,
    /// The epoch the frame carried; older logs have none, and then the
    /// epoch its acknowledgement or the final history gave is used.
    epoch: Option<&'a str>,
}

fn deliver(n: usize, d: &Delivered<'_>, known: &Known, runs: &mut HashMap<String, Run>, out: &mut Vec<String>) {
    let (g, o, id) = (d.g, d.o, d.id);
    let saved = known.epoch(g, id);
    if let Some((_, e, at)) = saved.filter(|(_, _, at)| *at != o) {
        out.push(format!(
            "(1) client {n} received {id} in {g} at offset {o}, but it was saved at epoch {e} offset {at}"
        ));
    }
    let epoch = d.epoch.map(str::to_owned).or_else(|| saved.map(|(_, e, _)| e.clone()));
    let Some(run) = runs.get_mut(g) else {
        runs.insert(
            g.to_owned(),
            Run {
                epoch,
                first: o,
                last: o,
                delivered: BTreeSet::from([o]),
            },
        );
        return;
    };
    // A new epoch that continues at the next offset is an epoch move that
    // kept every message this client had (PROTOCOL.md: the new epoch keeps
    // the survivors under their offsets): nothing was lost or reused for it.
    // Anything else across epochs needs a notice.
    let continues = o == run.last + 1;
    match (&run.epoch, &epoch) {
        (Some(a), Some(b)) if a != b && continues => {}
        (Some(a), Some(b)) if a != b => out.push(format!(
            "(2) client {n}: {g} went from epoch {a} (offset {}) to epoch {b} (offset {o}, {id}) without recovered complete:false or 4002",
            run.last
        )),
        _ if o <= run.last => out.push(format!(
            "(2) client {n}: {g} offset {o} ({id}) after offset {}, without being told of a new epoch",
            run.last
        )),
        _ if o > run.last + 1 => out.push(format!(
            "(2) client {n}: {g} gap: offsets {}..={} never delivered (next was {o}, {id}), no recovered complete:false or 4002",
            run.last + 1,
            o - 1
        )),
        _ => {}
    }
    match (&run.epoch, &epoch) {
        (Some(a), Some(b)) if a != b => {
            *run = Run {
                epoch,
                first: o,
                last: o,
                delivered: BTreeSet::new(),
            }
        }
        (None, Some(_)) => run.epoch = epoch,
        _ => {}
    }
    run.last = o;
    run.delivered.insert(o);
}

/// A client still in a group at the end holds its final epoch and got every
/// saved message from its first one on.
fn at_end(n: usize, g: &str, run: &Run, (epoch, messages): &History, out: &mut Vec<String>) {
    match &run.epoch {
        Some(e) if e != epoch => out.push(format!(
            "(3) client {n} ends in {g} at epoch {e} offset {} but the group is at epoch {epoch}, and it was never told",
            run.last
        )),
        Some(_) => {
            let missing: Vec<String> = messages
                .iter()
                .filter(|(o, _)| *o >= run.first && !run.delivered.contains(o))
                .map(|(o, id)| format!("{o} ({id})"))
                .collect();
            if !missing.is_empty() {
                out.push(format!(
                    "(3) client {n} stayed in {g} from offset {} but never received {}",
                    run.first,
                    missing.join(", ")
                ));
            }
        }
        None => {}
    }
}

#[cfg(test)]
#[path = "checker_tests.rs"]
mod tests;
