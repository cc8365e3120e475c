//! Plugin versions deployed to a running host, kept on disk so a restart
//! runs them again and `switchyard plugins rollback` can step back.
//!
//! Layout, per pipeline: `<state_dir>/deployments/<pipeline>/<plugin>/`
//! holds one `<sha256 hex>.wasm` per deployed build and `history.json`, the
//! deployments in order (the last one is live). Every file is written to a
//! temporary name, synced and renamed, so a crash leaves either the old or
//! the new state, never half of one.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// One deployment of a plugin build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployed {
    /// `sha256:<hex>` of the component.
    pub digest: String,
    /// The version its `describe()` reported.
    pub version: String,
    pub deployed_at_ms: u64,
    pub size: u64,
}

/// The deployments of one pipeline.
#[derive(Clone, Debug)]
pub struct Deployments {
    dir: PathBuf,
}

impl Deployments {
    pub fn new(state_dir: &Path, pipeline: &str) -> Self {
        Deployments {
            dir: state_dir.join("deployments").join(pipeline),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn plugin_dir(&self, plugin: &str) -> PathBuf {
        self.dir.join(plugin)
    }

    /// Where a deployed build is kept.
    pub fn wasm_path(&self, plugin: &str, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.plugin_dir(plugin).join(format!("{hex}.wasm"))
    }

    /// A plugin's deployments, oldest first; empty when it runs the file
    /// its pipeline names.
    pub fn history(&self, plugin: &str) -> Result<Vec<Deployed>> {
        let path = self.plugin_dir(plugin).join("history.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a deployment history; move it away to run the pipeline's own files",
                path.display()
            )
        })
    }

    /// The live deployment of a plugin and the file that holds it.
    pub fn current(&self, plugin: &str) -> Result<Option<(Deployed, PathBuf)>> {
        Ok(self.history(plugin)?.pop().map(|d| {
            let path = self.wasm_path(plugin, &d.digest);
            (d, path)
        }))
    }

    /// Stores a build and makes it the live deployment.
    pub fn push(&self, plugin: &str, bytes: &[u8], entry: Deployed) -> Result<PathBuf> {
        let dir = self.plugin_dir(plugin);
        crate::files::create_private_dir(&dir)?;
        let wasm = self.wasm_path(plugin, &entry.digest);
        if !wasm.exists() {
            write_atomically(&wasm, bytes)?;
        }
        let mut history = self.history(plugin)?;
        history.push(entry);
        self.write_history(plugin, &history)?;
        Ok(wasm)
    }

    /// Ends the live deployment; the one before it (or the pipeline's file)
    /// is live again. Returns what was ended.
    pub fn pop(&self, plugin: &str) -> Result<Option<Deployed>> {
        let mut history = self.history(plugin)?;
        let Some(ended) = history.pop() else {
            return Ok(None);
        };
        self.write_history(plugin, &history)?;
        // The build stays on disk while an older entry still names it.
        if !history.iter().any(|d| d.digest == ended.digest) {
            let _ = std::fs::remove_file(self.wasm_path(plugin, &ended.digest));
        }
        Ok(Some(ended))
    }

    fn write_history(&self, plugin: &str, history: &[Deployed]) -> Result<()> {
        let path = self.plugin_dir(plugin).join("history.json");
        let text = serde_json::to_vec_pretty(history).context("cannot encode the history")?;
        write_atomically(&path, &text)
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("a file without a directory")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(digest: &str) -> Deployed {
        Deployed {
            digest: digest.into(),
            version: "1.0.0".into(),
            deployed_at_ms: 1,
            size: 3,
        }
    }

    #[test]
    fn push_and_pop_walk_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let d = Deployments::new(dir.path(), "orders");
        assert!(d.current("p").unwrap().is_none());
        let a = d.push("p", b"aaa", entry("sha256:aa")).unwrap();
        d.push("p", b"bbb", entry("sha256:bb")).unwrap();
        d.push("p", b"aaa", entry("sha256:aa")).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"aaa");
        assert_eq!(d.current("p").unwrap().unwrap().0.digest, "sha256:aa");
        // Popping the last `aa` keeps its file: the first entry names it.
        assert_eq!(d.pop("p").unwrap().unwrap().digest, "sha256:aa");
        assert!(a.exists());
        assert_eq!(d.current("p").unwrap().unwrap().0.digest, "sha256:bb");
        d.pop("p").unwrap();
        d.pop("p").unwrap();
        assert!(!a.exists());
        assert!(d.current("p").unwrap().is_none());
        assert!(d.pop("p").unwrap().is_none());
    }

    #[test]
    fn a_corrupt_history_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = Deployments::new(dir.path(), "orders");
        std::fs::create_dir_all(d.dir().join("p")).unwrap();
        std::fs::write(d.dir().join("p").join("history.json"), "{").unwrap();
        let e = format!("{:#}", d.history("p").unwrap_err());
        assert!(
            e.contains("history.json is not a deployment history"),
            "{e}"
        );
    }
}
