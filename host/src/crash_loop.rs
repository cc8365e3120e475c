//! The crash-loop guard: a message whose handling takes the whole host down
//! (the kernel's OOM killer, an abort) would be redelivered by every broker
//! for ever, taking the host down each time.
//!
//! Each running host keeps, per route, a small file naming the messages it
//! has in hand (written before a batch goes to the plugin, emptied once it
//! is settled), in a directory of its own under the state directory that it
//! holds locked while it runs. A host that starts finds the directories of
//! hosts that died (their lock is free), counts one crash for each message
//! they had in hand in the dead-letter store (shared by hosts that share
//! PostgreSQL), and from then on:
//!
//! - a message in hand at `[host] crash_loop_limit` crashes in a row is
//!   dead-lettered as `crash-loop` when it comes again, and no plugin sees
//!   it;
//! - a message in hand at fewer crashes is handled alone, in a batch of its
//!   own, so that if it crashes the host again, it alone is counted and the
//!   messages that happened to share its batch are not;
//! - a message settled (handled, retried or dead-lettered) loses its count.
//!
//! A crash is the whole process's, so while any route has a suspect in hand
//! no other route hands a batch to its plugin: a message of another route
//! that happens to be slow is not blamed with it. A host that was stopping
//! (a second Ctrl-C, a SIGKILL after its grace period) did not crash, and
//! its messages are not counted. Counts older than a week are forgotten.
//!
//! Writing the file costs three system calls per batch, not per message; a
//! process that is killed leaves what it wrote in the page cache, which is
//! all a crash of the process (not of the machine) needs.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};

use crate::dlq::DeadLetterStore;
use crate::files::{create_private_dir, create_private_file};

/// The lock a running host holds in its own directory.
const LOCK_FILE: &str = "lock";
/// Written when a host begins to stop: what it then has in hand is not a
/// crash's doing.
const STOPPING_FILE: &str = "stopping";
/// Held while a host looks for dead ones or sets up its own directory, so
/// that two hosts starting at once never take each other for dead.
const SCAN_LOCK: &str = ".scan";
/// The directory of a host's per-route files, apart from its markers.
const ROUTES_DIR: &str = "routes";
/// Crash counts older than this are forgotten.
const COUNT_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// One host process's view of past crashes, shared by its routes.
pub struct CrashGuard {
    /// This process's directory: one file per route.
    dir: PathBuf,
    _lock: File,
    store: Arc<dyn DeadLetterStore>,
    limit: u32,
    /// Route → message id → crashes in a row with it in hand.
    suspects: Mutex<HashMap<String, HashMap<String, u32>>>,
    /// Taken for writing by a route handling a suspect, for reading by the
    /// others while there are suspects at all.
    gate: tokio::sync::RwLock<()>,
}

impl CrashGuard {
    /// Counts the crashes of hosts of this pipeline that died with messages
    /// in hand, and starts this host's own record.
    pub async fn start(
        state_dir: &Path,
        pipeline: &str,
        store: Arc<dyn DeadLetterStore>,
        limit: u32,
    ) -> Result<Arc<Self>> {
        let base = state_dir.join("in-flight").join(pipeline);
        create_private_dir(&base)?;
        let scan_path = base.join(SCAN_LOCK);
        create_private_file(&scan_path)?;
        let scan = std::fs::OpenOptions::new()
            .write(true)
            .open(&scan_path)
            .with_context(|| format!("cannot open {}", scan_path.display()))?;
        // Blocking, but only for as long as another starting host scans.
        scan.lock()
            .with_context(|| format!("cannot lock {}", scan_path.display()))?;
        for dead in dead_hosts(&base)? {
            note_crashes(&dead, store.as_ref()).await;
        }
        let dir = base.join(crate::envelope::new_id());
        create_private_dir(&dir)?;
        let lock_path = dir.join(LOCK_FILE);
        create_private_file(&lock_path)?;
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        lock.try_lock()
            .map_err(|e| anyhow::anyhow!("cannot lock {}: {e}", lock_path.display()))?;
        drop(scan);
        let mut suspects: HashMap<String, HashMap<String, u32>> = HashMap::new();
        let forget_before = crate::envelope::now_ms().saturating_sub(COUNT_TTL_MS);
        match store.crash_counts(forget_before).await {
            Ok(counts) => {
                for (route, id, n) in counts {
                    suspects.entry(route).or_default().insert(id, n);
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "Cannot read crash counts from the dead-letter store; the crash-loop guard starts empty");
            }
        }
        Ok(Arc::new(CrashGuard {
            dir,
            _lock: lock,
            store,
            limit,
            suspects: Mutex::new(suspects),
            gate: tokio::sync::RwLock::new(()),
        }))
    }

    /// This host begins to stop: whatever it then has in hand when it dies
    /// was not the cause.
    pub fn stopping(&self) {
        if let Err(e) = create_private_file(&self.dir.join(STOPPING_FILE)) {
            tracing::debug!(error = %e, "Cannot mark this host as stopping (crash-loop guard)");
        }
    }

    /// The record of one route.
    pub fn route(self: &Arc<Self>, route: &str) -> Result<RouteGuard> {
        let path = self.dir.join(ROUTES_DIR).join(route);
        create_private_file(&path)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(RouteGuard {
            guard: self.clone(),
            route: route.to_owned(),
            file,
            empty: std::sync::atomic::AtomicBool::new(true),
        })
    }

    fn suspects(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, u32>>> {
        self.suspects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Counts the crash of a dead host, route by route, and removes its record
/// once every route is counted (a route counted is removed at once, so a
/// start that fails half-way never counts it twice).
async fn note_crashes(dead: &Dead, store: &dyn DeadLetterStore) {
    if dead.dir.join(STOPPING_FILE).exists() {
        tracing::info!(dir = %dead.dir.display(), "The host before this one was stopping when it ended; no crash counted");
    } else {
        for (route, path, ids) in read_in_hand(&dead.dir) {
            tracing::warn!(
                route = %route,
                messages = ids.len(),
                first = %ids.first().map(String::as_str).unwrap_or_default(),
                "The host before this one died with these messages in hand; counting a crash for each"
            );
            match store.note_crash(&route, &ids).await {
                Ok(()) => {
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => {
                    tracing::warn!(route = %route, error = %format!("{e:#}"), "Cannot count the crash in the dead-letter store; trying again at the next start");
                    return;
                }
            }
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&dead.dir) {
        tracing::warn!(dir = %dead.dir.display(), error = %e, "Cannot remove a dead host's in-flight record");
    }
}

/// A dead host's directory, locked by this host while it reads it.
struct Dead {
    dir: PathBuf,
    /// Held while the record is read and removed.
    _lock: File,
}

/// The directories under `base` whose host no longer holds their lock.
fn dead_hosts(base: &Path) -> Result<Vec<Dead>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(base).with_context(|| format!("cannot read {}", base.display()))?;
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() || entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Ok(lock) = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(LOCK_FILE))
        else {
            // No lock file: a host that died while starting; nothing in hand.
            let _ = std::fs::remove_dir_all(&dir);
            continue;
        };
        if lock.try_lock().is_ok() {
            out.push(Dead { dir, _lock: lock });
        }
    }
    Ok(out)
}

/// What a dead host had in hand, per route (with the route's file), each
/// id once.
fn read_in_hand(dir: &Path) -> Vec<(String, PathBuf, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join(ROUTES_DIR)) else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let ids: BTreeSet<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        if !ids.is_empty() {
            let ids = ids.into_iter().map(str::to_owned).collect();
            out.push((name, entry.path(), ids));
        }
    }
    out
}

/// What one route tells the guard, and asks it.
pub struct RouteGuard {
    guard: Arc<CrashGuard>,
    route: String,
    file: File,
    /// Whether the file is empty now.
    empty: std::sync::atomic::AtomicBool,
}

impl RouteGuard {
    /// Crashes in a row with this message in hand (0 for almost all).
    pub fn crashes(&self, message_id: &str) -> u32 {
        self.guard
            .suspects()
            .get(&self.route)
            .and_then(|ids| ids.get(message_id))
            .copied()
            .unwrap_or(0)
    }

    /// Waits until this route may hand a batch to its plugin: alone while
    /// it holds a suspect, beside the others otherwise. `None` (no wait at
    /// all) when there are no suspects.
    pub async fn gate(&self, holds_suspect: bool) -> Option<Gate<'_>> {
        if !self.any_suspects() {
            return None;
        }
        Some(if holds_suspect {
            Gate::Alone(self.guard.gate.write().await)
        } else {
            Gate::Shared(self.guard.gate.read().await)
        })
    }

    /// Whether any message of this host is a suspect at all: the common
    /// answer is no, and then nothing else is asked.
    pub fn any_suspects(&self) -> bool {
        !self.guard.suspects().is_empty()
    }

    /// At this many crashes a message is dead-lettered.
    pub fn limit(&self) -> u32 {
        self.guard.limit
    }

    /// Records the messages about to be handled. A failure to write is
    /// logged, not fatal: the guard is a safety net, not the message path.
    pub fn in_hand<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut text = Vec::with_capacity(64 * 40);
        for id in ids {
            text.extend_from_slice(id.as_bytes());
            text.push(b'\n');
        }
        let written = self
            .file
            .set_len(0)
            .and_then(|()| self.file.write_all_at(&text, 0));
        if let Err(e) = written {
            tracing::warn!(route = %self.route, error = %e, "Cannot record the messages in hand (crash-loop guard)");
        }
        self.empty
            .store(text.is_empty(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Nothing in hand any more.
    pub fn none_in_hand(&self) {
        if self.empty.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.file.set_len(0) {
            tracing::warn!(route = %self.route, error = %e, "Cannot clear the messages in hand (crash-loop guard)");
        }
    }

    /// Settled messages lose their crash counts.
    pub async fn settled(&self, message_ids: &[String]) {
        let known: Vec<String> = {
            let mut suspects = self.guard.suspects();
            let Some(ids) = suspects.get_mut(&self.route) else {
                return;
            };
            let known = message_ids
                .iter()
                .filter(|id| ids.remove(id.as_str()).is_some())
                .cloned()
                .collect();
            if ids.is_empty() {
                suspects.remove(&self.route);
            }
            known
        };
        if known.is_empty() {
            return;
        }
        if let Err(e) = self.guard.store.clear_crashes(&self.route, &known).await {
            tracing::warn!(route = %self.route, error = %format!("{e:#}"), "Cannot clear crash counts in the dead-letter store");
        }
    }
}

/// A route's turn to hand a batch to its plugin while there are suspects.
pub enum Gate<'a> {
    /// A suspect in hand: no other route runs.
    Alone(tokio::sync::RwLockWriteGuard<'a, ()>),
    /// No suspect in hand: other such routes run too.
    Shared(tokio::sync::RwLockReadGuard<'a, ()>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlq::sqlite::SqliteStore;

    fn dead_host(base: &Path, name: &str, files: &[(&str, &str)]) {
        let dir = base.join(name);
        std::fs::create_dir_all(dir.join(ROUTES_DIR)).unwrap();
        std::fs::write(dir.join(LOCK_FILE), "").unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
    }

    #[tokio::test]
    async fn crashes_are_counted_once_per_message_and_not_for_a_stopping_host() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn DeadLetterStore> =
            Arc::new(SqliteStore::open(&dir.path().join("dlq.db"), "shop").unwrap());
        let base = dir.path().join("in-flight").join("shop");
        // The same id twice (a redelivery in one batch) counts once.
        dead_host(&base, "crashed", &[("routes/orders", "a\na\nb\n")]);
        dead_host(
            &base,
            "stopped",
            &[("routes/orders", "c\n"), (STOPPING_FILE, "")],
        );
        let first = CrashGuard::start(dir.path(), "shop", store.clone(), 3)
            .await
            .unwrap();
        let mut counts = store.crash_counts(0).await.unwrap();
        counts.sort();
        assert_eq!(
            counts,
            [
                ("orders".to_owned(), "a".to_owned(), 1),
                ("orders".to_owned(), "b".to_owned(), 1)
            ]
        );
        let route = first.route("orders").unwrap();
        assert_eq!((route.crashes("a"), route.crashes("c")), (1, 0));
        // A second host starting beside a live one leaves it alone.
        route.in_hand(["a"]);
        let second = CrashGuard::start(dir.path(), "shop", store.clone(), 3)
            .await
            .unwrap();
        assert!(first.dir.exists(), "a live host is not taken for dead");
        let mut again = store.crash_counts(0).await.unwrap();
        again.sort();
        assert_eq!(again, counts, "nothing counted twice");
        // Settled: the count goes.
        route.settled(&["a".to_owned()]).await;
        assert_eq!(route.crashes("a"), 0);
        assert_eq!(store.crash_counts(0).await.unwrap().len(), 1);
        drop(second);
        // Counts whose last crash is older than the cut-off are forgotten;
        // newer ones stay.
        let now = crate::envelope::now_ms();
        assert_eq!(store.crash_counts(now - 60_000).await.unwrap().len(), 1);
        assert!(store.crash_counts(now + 1).await.unwrap().is_empty());
    }
}
