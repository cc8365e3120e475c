//! On-disk cache of compiled components, so a restart does not recompile.
//!
//! An entry is keyed by the engine's compatibility hash (wasmtime version,
//! compiler settings, CPU features) and the SHA-256 of the `.wasm` bytes: a
//! changed plugin or an upgraded host never picks up a stale entry.
//!
//! Entries are native code the host will run, so they are only trusted when
//! the cache directory belongs to the host's user and nobody else can write
//! to it, and when the entry's bytes match the SHA-256 written beside it.

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Whether a component came from the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    /// Compiled now (and stored, if the cache is writable).
    Compiled,
}

/// A directory of precompiled components.
#[derive(Clone, Debug)]
pub struct ComponentCache {
    dir: Option<PathBuf>,
}

/// Feeds `Hash` output into SHA-256, to turn the engine's compatibility hash
/// into stable bytes.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl ComponentCache {
    /// A cache in `dir`; `None` disables caching.
    pub fn new(dir: Option<PathBuf>) -> Self {
        ComponentCache { dir }
    }

    /// The default cache directory: `$XDG_CACHE_HOME/switchyard` or
    /// `~/.cache/switchyard`.
    pub fn default_dir() -> Option<PathBuf> {
        std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("switchyard"))
    }

    fn entry_path(&self, engine: &Engine, digest: &[u8; 32]) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let mut hasher = ShaHasher(Sha256::new());
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        hasher.0.update(digest);
        let key = hex::encode(hasher.0.finalize());
        Some(dir.join("components").join(format!("{key}.cwasm")))
    }

    /// Returns the compiled component for `bytes`, from the cache when
    /// possible. A corrupt, unverifiable or unreadable entry is recompiled,
    /// never fatal.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
        digest: &[u8; 32],
    ) -> Result<(Component, CacheOutcome)> {
        let entry = self.entry_path(engine, digest);
        if let Some(path) = &entry
            && path.exists()
        {
            match load_verified(engine, path) {
                Ok(c) => {
                    // Recently used entries are the last to be pruned.
                    touch(path);
                    return Ok((c, CacheOutcome::Hit));
                }
                // Written by an older switchyard: expected after an upgrade.
                Err(e) if !checksum_path(path).exists() => tracing::debug!(
                    path = %path.display(),
                    error = %format!("{e:#}"),
                    "Compiled-component cache entry has no checksum; recompiling"
                ),
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = %format!("{e:#}"),
                    "Ignoring compiled-component cache entry; recompiling"
                ),
            }
        }
        let compiled = engine.precompile_component(bytes)?;
        // Loading from the fresh artifact keeps one code path for both cases.
        let component = deserialize(engine, &compiled)?;
        if let Some(path) = &entry {
            match store(path, &compiled) {
                Ok(()) => prune(path, MAX_CACHE_BYTES),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "Cannot write compiled-component cache entry")
                }
            }
        }
        Ok((component, CacheOutcome::Compiled))
    }
}

/// How large the cache may grow. Every new build of a plugin is a new
/// entry (compiled, the Python and JavaScript examples take 35–37 MB
/// each); past this, the least recently used entries go.
pub const MAX_CACHE_BYTES: u64 = 1 << 30;

fn touch(path: &Path) {
    let _ = std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
}

/// Removes the least recently used entries (and their checksums) until the
/// cache holds at most `limit` bytes, never `keep`. Best effort: an entry
/// another host is using stays readable to it (unlinked files live on).
fn prune(keep: &Path, limit: u64) {
    let Some(dir) = keep.parent() else { return };
    let Ok(listing) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<(std::time::SystemTime, u64, PathBuf)> = listing
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .filter_map(|p| {
            let meta = std::fs::metadata(&p).ok()?;
            Some((meta.modified().ok()?, meta.len(), p))
        })
        .collect();
    let mut total: u64 = entries.iter().map(|(_, size, _)| size).sum();
    if total <= limit {
        return;
    }
    entries.sort();
    for (_, size, path) in entries {
        if total <= limit {
            break;
        }
        if path == keep {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            let _ = std::fs::remove_file(checksum_path(&path));
            total = total.saturating_sub(size);
            tracing::debug!(path = %path.display(), "Pruned compiled-component cache entry");
        }
    }
}

fn checksum_path(entry: &Path) -> PathBuf {
    entry.with_extension("sha256")
}

/// Loads an entry only if its directory is private and its checksum matches.
fn load_verified(engine: &Engine, path: &Path) -> Result<Component> {
    let dir = path.parent().context("cache entry has no directory")?;
    check_private(dir)?;
    let compiled = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let expected =
        std::fs::read_to_string(checksum_path(path)).context("its checksum file is missing")?;
    if hex::encode(Sha256::digest(&compiled)) != expected.trim() {
        anyhow::bail!("its contents do not match its checksum");
    }
    deserialize(engine, &compiled)
}

/// Refuses a directory another user owns or can write to.
#[cfg(unix)]
fn check_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        anyhow::bail!(
            "{} belongs to another user (uid {})",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        anyhow::bail!(
            "{} can be written by other users (mode {:o})",
            dir.display(),
            meta.mode() & 0o777
        );
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_dir: &Path) -> Result<()> {
    Ok(())
}

/// Writes an entry and its checksum atomically: a half-written file is
/// never visible, and the checksum is written last.
fn store(path: &Path, compiled: &[u8]) -> Result<()> {
    let dir = path.parent().context("cache entry has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    restrict(dir)?;
    write_atomically(dir, path, compiled)?;
    write_atomically(
        dir,
        &checksum_path(path),
        hex::encode(Sha256::digest(compiled)).as_bytes(),
    )
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = tempfile_in(dir)?;
    tmp.1.write_all(bytes)?;
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

fn tempfile_in(dir: &Path) -> Result<(PathBuf, std::fs::File)> {
    let name = format!(
        ".tmp-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    );
    let path = dir.join(name);
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok((path, file))
}

/// Cache entries are native code the host will run: only the owner may write
/// them.
#[cfg(unix)]
fn restrict(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))
}

#[cfg(not(unix))]
fn restrict(_dir: &Path) -> Result<()> {
    Ok(())
}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, compiled: &[u8]) -> Result<Component> {
    // SAFETY: `compiled` is either the output of `precompile_component` on
    // this engine a moment ago, or a cache entry whose directory is private
    // to this user and whose bytes match the checksum written with it.
    // wasmtime also checks that it was compiled by a compatible engine.
    let component = unsafe { Component::deserialize(engine, compiled)? };
    Ok(component)
}

/// SHA-256 of a plugin's bytes.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn pruning_removes_the_least_recently_used_entries_first() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |name: &str, age_secs: u64| {
            let path = dir.path().join(format!("{name}.cwasm"));
            std::fs::write(&path, vec![0u8; 100]).unwrap();
            std::fs::write(checksum_path(&path), "x").unwrap();
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(SystemTime::now() - Duration::from_secs(age_secs))
                .unwrap();
            path
        };
        let oldest = entry("a", 300);
        let older = entry("b", 200);
        let recent = entry("c", 100);
        // The new entry is the oldest on disk, and still kept.
        let new = entry("d", 400);
        prune(&new, 250);
        assert!(!oldest.exists() && !checksum_path(&oldest).exists());
        assert!(!older.exists());
        assert!(recent.exists() && checksum_path(&recent).exists());
        assert!(new.exists());
        // Under the limit, nothing goes.
        prune(&new, 250);
        assert!(recent.exists() && new.exists());
    }
}
