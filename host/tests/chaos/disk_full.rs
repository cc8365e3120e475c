//! The embedded store's disk runs full: sends are refused with a clear
//! error, the host waits instead of losing or looping, and once there is
//! room again it finishes everything it accepted.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::envelope::Kind;
use switchyard::runtime;
use switchyard::transport::Transport as _;

use crate::brokers::embedded_pipeline;
use crate::common::message;
use crate::reliability::{check_all_handled, distinct, host, lines, tally, wait_until};

/// A small tmpfs, unmounted however the scenario ends.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs needs root: {status}");
        SmallDisk(at.to_owned())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes to `path` until the disk is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 16 << 10];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the chaos suite stops services and mounts a disk: cargo xtask chaos"]
async fn the_embedded_store_disk_fills_up() {
    let _one = crate::one_at_a_time().await;
    let messages = crate::messages();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    let disk = dir.path().join("disk");
    let _mounted = SmallDisk::mount(&disk, "16m");
    let (path, p) = embedded_pipeline(
        dir.path(),
        &format!(
            "path = \"{}\"\nbatch_size = 64\n[plugins.tally]\nwasm = \"{{dist}}/tally.wasm\"\nevents = [\"Tick\"]\ngrants = {{ dirs = [{{ host = \"out\", guest = \"/out\", writable = true }}] }}\n",
            disk.join("store.db").display()
        ),
    );
    let transport = runtime::open_transport(&p).unwrap();
    // A store a host has used before: its dead-letter tables exist.
    drop(
        switchyard::dlq::open(&p.dead_letters, &p.name)
            .await
            .unwrap(),
    );
    let ballast = disk.join("ballast");
    fill(&ballast);
    // Full: a send is refused, and says why.
    let refused = transport
        .enqueue(vec![message(Kind::Event, "Tick", json!(0))])
        .await
        .expect_err("nothing fits on a full disk");
    let why = format!("{refused:#}");
    assert!(why.contains("full"), "{why}");
    // Some room: take what fits, until the disk is full again.
    std::fs::remove_file(&ballast).unwrap();
    fill(&ballast);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&ballast)
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len.saturating_sub(1 << 20)).unwrap();
    drop(f);
    let mut accepted = Vec::new();
    let mut full_at = None;
    while accepted.len() < messages {
        let batch: Vec<_> = (0..50)
            .map(|i| {
                message(
                    Kind::Event,
                    "Tick",
                    json!({ "n": accepted.len() + i, "pad": "x".repeat(512) }),
                )
            })
            .collect();
        match transport.enqueue(batch.clone()).await {
            Ok(_) => accepted.extend(batch.iter().map(|m| m.id.clone())),
            Err(_) => {
                full_at = Some(accepted.len());
                break;
            }
        }
    }
    assert!(!accepted.is_empty(), "some messages fit");
    assert!(
        full_at.is_some(),
        "the disk filled up again ({} accepted): the scenario proves nothing",
        accepted.len()
    );
    // The host runs on the full disk: it may not settle, and must not lose
    // or loop.
    let log = tally(dir.path());
    let mut h = host(&path, &[]);
    std::thread::sleep(Duration::from_secs(3));
    let on_full_disk = lines(&log).len();
    let room = Instant::now();
    std::fs::remove_file(&ballast).unwrap();
    wait_until(
        "everything accepted to be handled",
        &mut [&mut h],
        Duration::from_secs(120),
        || distinct(&[&log]) >= accepted.len(),
    );
    let caught_up = room.elapsed();
    h.kill().unwrap();
    h.wait().unwrap();
    let duplicates = check_all_handled(&accepted, &lines(&log));
    crate::report(
        "embedded store's disk full (16 MiB tmpfs)",
        "embedded",
        &format!(
            "a send on a full disk is refused ({}); {} messages accepted (disk full again at {:?}); {on_full_disk} handled while full; all handled {} ms after room was made, 0 lost, {duplicates} duplicates",
            why.lines().last().unwrap_or_default(),
            accepted.len(),
            full_at,
            caught_up.as_millis()
        ),
    );
}
