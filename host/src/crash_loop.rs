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
//! Writing the file costs three system calls per batch, not per message; a
//! process that is killed leaves what it wrote in the page cache, which is
//! all a crash of the process (not of the machine) needs.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};

use crate::dlq::DeadLetterStore;
use crate::files::{create_private_dir, create_private_file};

/// The lock a running host holds in its own directory.
const LOCK_FILE: &str = "lock";

/// One host process's view of past crashes, shared by its routes.
pub struct CrashGuard {
    /// This process's directory: one file per route.
    dir: PathBuf,
    _lock: File,
    store: Arc<dyn DeadLetterStore>,
    limit: u32,
    /// (route, message id) → crashes in a row with it in hand.
    suspects: Mutex<HashMap<(String, String), u32>>,
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
        for dead in dead_hosts(&base)? {
            let in_hand = read_in_hand(&dead.dir);
            let mut noted = true;
            for (route, ids) in &in_hand {
                tracing::warn!(
                    route = %route,
                    messages = ids.len(),
                    first = %ids.first().map(String::as_str).unwrap_or_default(),
                    "The host before this one died with these messages in hand; counting a crash for each"
                );
                if let Err(e) = store.note_crash(route, ids).await {
                    tracing::warn!(route = %route, error = %format!("{e:#}"), "Cannot count the crash in the dead-letter store; trying again at the next start");
                    noted = false;
                }
            }
            if noted {
                drop(dead.lock);
                if let Err(e) = std::fs::remove_dir_all(&dead.dir) {
                    tracing::warn!(dir = %dead.dir.display(), error = %e, "Cannot remove a dead host's in-flight record");
                }
            }
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
        let suspects = match store.crash_counts().await {
            Ok(counts) => counts
                .into_iter()
                .map(|(route, id, n)| ((route, id), n))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "Cannot read crash counts from the dead-letter store; the crash-loop guard starts empty");
                HashMap::new()
            }
        };
        Ok(Arc::new(CrashGuard {
            dir,
            _lock: lock,
            store,
            limit,
            suspects: Mutex::new(suspects),
        }))
    }

    /// The record of one route.
    pub fn route(self: &Arc<Self>, route: &str) -> Result<RouteGuard> {
        let path = self.dir.join(route);
        create_private_file(&path)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(RouteGuard {
            guard: self.clone(),
            route: route.to_owned(),
            file,
            empty: true,
        })
    }

    fn suspects(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), u32>> {
        self.suspects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A dead host's directory, locked by this host while it reads it.
struct Dead {
    dir: PathBuf,
    lock: File,
}

/// The directories under `base` whose host no longer holds their lock.
fn dead_hosts(base: &Path) -> Result<Vec<Dead>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(base).with_context(|| format!("cannot read {}", base.display()))?;
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
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
            out.push(Dead { dir, lock });
        }
    }
    Ok(out)
}

/// What a dead host had in hand, per route.
fn read_in_hand(dir: &Path) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == LOCK_FILE {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let ids: Vec<String> = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        if !ids.is_empty() {
            out.push((name, ids));
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
    empty: bool,
}

impl RouteGuard {
    /// Crashes in a row with this message in hand (0 for almost all).
    pub fn crashes(&self, message_id: &str) -> u32 {
        let suspects = self.guard.suspects();
        if suspects.is_empty() {
            return 0;
        }
        suspects
            .get(&(self.route.clone(), message_id.to_owned()))
            .copied()
            .unwrap_or(0)
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
    pub fn in_hand<'a>(&mut self, ids: impl IntoIterator<Item = &'a str>) {
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
        self.empty = text.is_empty();
    }

    /// Nothing in hand any more.
    pub fn none_in_hand(&mut self) {
        if self.empty {
            return;
        }
        if let Err(e) = self.file.set_len(0).and_then(|()| self.file.flush()) {
            tracing::warn!(route = %self.route, error = %e, "Cannot clear the messages in hand (crash-loop guard)");
        }
        self.empty = true;
    }

    /// Settled messages lose their crash counts.
    pub async fn settled(&self, message_ids: &[String]) {
        let known: Vec<String> = {
            let mut suspects = self.guard.suspects();
            if suspects.is_empty() {
                return;
            }
            message_ids
                .iter()
                .filter(|id| {
                    suspects
                        .remove(&(self.route.clone(), (*id).clone()))
                        .is_some()
                })
                .cloned()
                .collect()
        };
        if known.is_empty() {
            return;
        }
        if let Err(e) = self.guard.store.clear_crashes(&self.route, &known).await {
            tracing::warn!(route = %self.route, error = %format!("{e:#}"), "Cannot clear crash counts in the dead-letter store");
        }
    }
}
