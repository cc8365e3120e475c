//! `--watch`: notices a changed pipeline file or plugin component and
//! applies it.
//!
//! The files are polled (size, modification time, inode) rather than
//! watched through inotify: polling a handful of files costs nothing,
//! works on every file system (network mounts and container volumes
//! included), and sees a file replaced by a rename as readily as one
//! rewritten in place. A change is acted on once the file has looked the
//! same for one whole interval, so a component still being written is not
//! picked up half-written; if it is anyway (a writer slower than the
//! interval), it fails to load, is refused, and is picked up again when it
//! changes once more.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::Supervisor;

/// What is looked at to tell that a file changed.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Stamp {
    Missing,
    Present {
        len: u64,
        modified: Option<SystemTime>,
        inode: u64,
    },
}

fn stamp(path: &PathBuf) -> Stamp {
    match std::fs::metadata(path) {
        Ok(m) => Stamp::Present {
            len: m.len(),
            modified: m.modified().ok(),
            inode: inode(&m),
        },
        Err(_) => Stamp::Missing,
    }
}

#[cfg(unix)]
fn inode(m: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(m)
}

#[cfg(not(unix))]
fn inode(_: &std::fs::Metadata) -> u64 {
    0
}

/// Watches until `stop` turns true.
pub async fn run(control: Arc<Supervisor>, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut seen: BTreeMap<PathBuf, Stamp> = BTreeMap::new();
    for f in control.watched_files() {
        let s = stamp(&f);
        seen.insert(f, s);
    }
    tracing::info!(
        files = seen.len(),
        interval = %humantime::format_duration(interval),
        "Watching the pipeline file and its plugins for changes"
    );
    // Files that changed and have not yet held still for an interval.
    let mut settling: BTreeMap<PathBuf, Stamp> = BTreeMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if *stop.borrow() {
            return;
        }
        let files = control.watched_files();
        let mut ready = false;
        for f in &files {
            let now = stamp(f);
            match settling.get(f) {
                // Held still for a whole interval: ready.
                Some(before) if *before == now => {
                    settling.remove(f);
                    seen.insert(f.clone(), now);
                    ready = true;
                }
                // Still changing.
                Some(_) => {
                    settling.insert(f.clone(), now);
                }
                None if seen.get(f) != Some(&now) => {
                    tracing::debug!(file = %f.display(), "Changed; waiting for it to settle");
                    settling.insert(f.clone(), now);
                }
                None => {}
            }
        }
        // Forget files the pipeline no longer names.
        seen.retain(|f, _| files.contains(f));
        settling.retain(|f, _| files.contains(f));
        for f in &files {
            if !seen.contains_key(f) && !settling.contains_key(f) {
                seen.insert(f.clone(), stamp(f));
            }
        }
        if ready && settling.is_empty() {
            // Errors are logged by the control; the old versions keep
            // serving and the next change is tried again.
            let _ = control.reload_from_disk().await;
        }
    }
}
