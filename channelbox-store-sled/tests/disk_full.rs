//! Disk trouble for real: the store on a small tmpfs, filled until appends
//! fail, then space freed. Appends must resume by themselves; every append
//! acknowledged before, during and after must be in history under its
//! offset; an append that failed must have had no effect (no message kept,
//! no offset used). Mounting needs root, which the project's machines and CI
//! have.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use channelbox_core::{HistoryLimits, HistoryStore, NewMessage, PayloadKind, ReadQuery};
use channelbox_store_sled::{SledConfig, SledStore};

/// A tmpfs mounted for the test, unmounted when dropped.
struct SmallDisk {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("disk");
        std::fs::create_dir(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs needs root (CI runs as root)");
        SmallDisk { dir, _parent: parent }
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

fn message(n: u64) -> NewMessage {
    NewMessage::new(PayloadKind::Text, Bytes::from(format!("{n:04}{}", "x".repeat(2000))))
}

/// Appends message `n`; its offset when acknowledged.
async fn try_append(store: &SledStore, n: u64) -> Option<u64> {
    let pending = store.append("g", message(n)).ok()?;
    pending.wait().await.ok().map(|at| at.offset)
}

#[tokio::test]
async fn a_full_disk_refuses_appends_without_effect_and_they_resume_when_space_returns() {
    let disk = SmallDisk::mount("6m");
    let filler = disk.path().join("filler");
    let config = SledConfig {
        limits: HistoryLimits::default(),
        ..SledConfig::new(disk.path().join("data"))
    };
    let store = SledStore::open(config).unwrap();
    let mut acked: Vec<(u64, u64)> = Vec::new(); // (offset, n)
    for n in 0..20 {
        acked.push((try_append(&store, n).await.expect("room at first"), n));
    }
    // Fill the disk, then append until appends fail.
    let free = fs_free(disk.path());
    std::fs::write(&filler, vec![0u8; free.saturating_sub(256 << 10) as usize]).unwrap();
    let mut n = 20;
    let mut failures = 0;
    while failures < 5 && n < 5_000 {
        match try_append(&store, n).await {
            Some(offset) => acked.push((offset, n)),
            None => failures += 1,
        }
        n += 1;
    }
    assert_eq!(failures, 5, "the full disk made appends fail");
    let newest = acked.iter().map(|(offset, _)| *offset).max().unwrap_or(0);
    let during = store.read("g", ReadQuery::Last(5)).await;
    assert!(during.is_ok(), "acknowledged history stays readable: {during:?}");
    let during = during.unwrap();
    assert_eq!(
        during.messages.last().map(|m| m.offset),
        Some(newest),
        "history shows no offset of a failed append"
    );
    let before = store.head("g").await.unwrap();
    assert_eq!(before.last, newest, "nor does a head (a welcome's position)");

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let resumed = loop {
        if let Some(offset) = try_append(&store, n).await {
            break offset;
        }
        assert!(
            Instant::now() < deadline,
            "appends resume within 15 s of space returning"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    acked.push((resumed, n));
    assert_ne!(
        store.head("g").await.unwrap().epoch,
        before.epoch,
        "the failed offsets were handed out: the group is in a new epoch"
    );
    for m in n + 1..n + 20 {
        acked.push((try_append(&store, m).await.expect("room again"), m));
    }

    let page = store.read("g", ReadQuery::Last(100_000)).await.unwrap();
    let offsets: Vec<u64> = page.messages.iter().map(|m| m.offset).collect();
    let expected: Vec<u64> = (1..=offsets.len() as u64).collect();
    assert_eq!(
        offsets, expected,
        "offsets 1..n without holes: failed appends used none"
    );
    assert_eq!(
        page.messages.len(),
        acked.len(),
        "nothing but acknowledged messages is kept"
    );
    for (offset, n) in &acked {
        let m = &page.messages[(*offset - 1) as usize];
        assert!(
            m.payload.starts_with(format!("{n:04}").as_bytes()),
            "offset {offset} holds message {n}"
        );
    }
    drop(store);
}

/// Free bytes on the filesystem holding `path`, from `df`.
fn fs_free(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df output")
}
