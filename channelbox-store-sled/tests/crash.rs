//! A crash test that really kills: a child process appends from several tasks
//! and prints every acknowledged (durable) append; the parent SIGKILLs it
//! mid-stream, reopens the directory, and checks that every acknowledged
//! message is there with identical data, offset and epoch, and that each
//! group's offsets are first..=last without holes. Three rounds on the same
//! directory; once with room for everything, once with a limit of 40 messages
//! per group, so that every append also trims.
//!
//! The child is this same test binary, started with `CHANNELBOX_CRASH_DIR` set
//! (and `CHANNELBOX_CRASH_LIMIT` for the trimming run).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use bytes::Bytes;
use channelbox_core::{HistoryStore, NewMessage, PayloadKind, ReadQuery};
use channelbox_store_sled::{SledConfig, SledStore};

const CHILD_ENV: &str = "CHANNELBOX_CRASH_DIR";
const LIMIT_ENV: &str = "CHANNELBOX_CRASH_LIMIT";

fn config(dir: &std::path::Path, limit: Option<u64>) -> SledConfig {
    let mut config = SledConfig::new(dir);
    config.limits.max_messages = limit;
    config
}

/// The child: append forever from 8 tasks over 3 groups, printing each ack.
async fn child(dir: &str, limit: Option<u64>) {
    let store: Arc<dyn HistoryStore> =
        Arc::new(SledStore::open(config(dir.as_ref(), limit)).expect("child opens the store"));
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0u64.. {
                    let group = format!("g{}", (t + i) % 3);
                    let payload = format!(
                        "pid{}-task{t}-n{i}-{}",
                        std::process::id(),
                        "x".repeat((i % 50) as usize)
                    );
                    let m = NewMessage::new(PayloadKind::Text, Bytes::from(payload.clone()));
                    let pending = store.append(&group, m).expect("append");
                    let at = pending.wait().await.expect("durable");
                    let (offset, epoch) = (at.offset, at.epoch);
                    // One line per ack; stdout is line-buffered by the lock.
                    println!("ACK {group} {offset} {epoch} {payload}");
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_sigkill() {
    crash_rounds("acknowledged_appends_survive_sigkill", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_sigkill_while_trimming() {
    crash_rounds("acknowledged_appends_survive_sigkill_while_trimming", Some(40)).await;
}

/// In the child, appends; in the parent, kills and checks three times.
async fn crash_rounds(test_name: &str, limit: Option<u64>) {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let limit = std::env::var(LIMIT_ENV).ok().and_then(|l| l.parse().ok());
        child(&dir, limit).await;
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history");
    let mut acked: BTreeMap<(String, u64), (String, String)> = BTreeMap::new();
    for round in 0..3 {
        let mut proc = Command::new(std::env::current_exe().unwrap())
            .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .env(LIMIT_ENV, limit.map(|l| l.to_string()).unwrap_or_default())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = proc.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut this_round = 0;
        // Kill after a few thousand acknowledgements, mid-stream.
        while this_round < 1500 + round * 700 {
            let Some(Ok(line)) = lines.next() else { break };
            let Some(rest) = line.strip_prefix("ACK ") else {
                continue;
            };
            let mut parts = rest.splitn(4, ' ');
            let (g, o, e, p) = (
                parts.next().unwrap().to_owned(),
                parts.next().unwrap().parse::<u64>().unwrap(),
                parts.next().unwrap().to_owned(),
                parts.next().unwrap().to_owned(),
            );
            assert!(
                acked.insert((g, o), (e, p)).is_none(),
                "an offset was acknowledged twice"
            );
            this_round += 1;
        }
        proc.kill().unwrap(); // SIGKILL
        proc.wait().unwrap();
        assert!(
            this_round > 100,
            "round {round}: the child acknowledged appends before it was killed"
        );

        let store = SledStore::open(config(&path, limit)).unwrap();
        for g in ["g0", "g1", "g2"] {
            let page = store
                .read(
                    g,
                    ReadQuery::Since {
                        offset: 0,
                        limit: usize::MAX,
                    },
                )
                .await
                .unwrap();
            let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset).collect();
            assert_eq!(
                offsets,
                (page.head.first..=page.head.last).collect::<Vec<_>>(),
                "round {round}: {g} is first..=last without holes"
            );
            if let Some(limit) = limit {
                assert!(offsets.len() as u64 <= limit, "round {round}: {g} is trimmed");
            } else {
                assert_eq!(page.head.first, 1, "round {round}: nothing of {g} trimmed");
            }
            for m in &page.messages {
                if let Some((epoch, payload)) = acked.get(&(g.to_owned(), m.offset)) {
                    assert_eq!(&page.head.epoch, epoch, "round {round}: same epoch");
                    assert_eq!(
                        &m.payload[..],
                        payload.as_bytes(),
                        "round {round}: same data at {g}/{}",
                        m.offset
                    );
                }
            }
            let acked_here = acked.keys().filter(|(ag, _)| ag == g).count() as u64;
            assert!(
                page.head.last >= acked_here,
                "round {round}: every acknowledged message of {g} is there"
            );
        }
        for (g, o) in acked.keys() {
            let head = store.head(g).await.unwrap();
            assert!(*o <= head.last, "round {round}: acknowledged {g}/{o} survived");
        }
        drop(store);
    }
}
