//! Files the host creates for itself (stores, state, locks) are its user's
//! alone: a store holds every payload and dead letter, and nobody else on
//! the machine should read them.

use std::path::Path;

use anyhow::{Context as _, Result};

/// Creates `dir` and its missing parents, each new one readable by the
/// host's user only. Directories that exist are left as they are.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Creates `path` empty, readable and writable by the host's user only, if
/// it does not exist. SQLite gives its journal and WAL files the database
/// file's permissions, so a store created this way stays private.
pub fn create_private_file(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .map(drop)
        .with_context(|| format!("cannot create {}", path.display()))
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn what_is_created_is_private_and_what_exists_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a").join("b").join("store.db");
        create_private_file(&file).unwrap();
        for p in [dir.path().join("a"), dir.path().join("a/b"), file.clone()] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
        }
        std::fs::write(&file, b"kept").unwrap();
        create_private_file(&file).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"kept");
    }
}
