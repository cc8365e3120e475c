//! On-disk cache of compiled components, so a restart does not recompile.
//!
//! An entry is keyed by the engine's compatibility hash (wasmtime version,
//! compiler settings, CPU features) and the SHA-256 of the `.wasm` bytes: a
//! changed plugin or an upgraded host never picks up a stale entry.

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
    /// possible. A corrupt or unreadable entry is recompiled, never fatal.
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
            match deserialize(engine, path) {
                Ok(c) => return Ok((c, CacheOutcome::Hit)),
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "Ignoring unusable compiled-component cache entry"
                ),
            }
        }
        let compiled = engine.precompile_component(bytes)?;
        // Loading from the fresh artifact keeps one code path for both cases.
        let component = deserialize_bytes(engine, &compiled)?;
        if let Some(path) = &entry
            && let Err(e) = store(path, &compiled)
        {
            tracing::warn!(path = %path.display(), error = %e, "Cannot write compiled-component cache entry");
        }
        Ok((component, CacheOutcome::Compiled))
    }
}

/// Writes an entry atomically: a half-written file is never visible.
fn store(path: &Path, compiled: &[u8]) -> Result<()> {
    let dir = path.parent().context("cache entry has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    restrict(dir);
    let mut tmp = tempfile_in(dir)?;
    tmp.1.write_all(compiled)?;
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
fn restrict(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}

#[cfg(not(unix))]
fn restrict(_dir: &Path) {}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, path: &Path) -> Result<Component> {
    // SAFETY: the file is a precompiled artifact this host wrote into its own
    // cache directory (created with owner-only permissions). wasmtime checks
    // that it was compiled by a compatible engine before using it.
    let component = unsafe { Component::deserialize_file(engine, path)? };
    Ok(component)
}

#[allow(unsafe_code)]
fn deserialize_bytes(engine: &Engine, compiled: &[u8]) -> Result<Component> {
    // SAFETY: `compiled` was produced by `precompile_component` on this very
    // engine a moment ago.
    let component = unsafe { Component::deserialize(engine, compiled)? };
    Ok(component)
}

/// SHA-256 of a plugin's bytes.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}
