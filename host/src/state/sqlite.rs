//! Plugin state in a SQLite file: the embedded transport's own store (whose
//! settle transaction writes it), or a file of its own for a single host on
//! a broker.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};

use super::{Changes, Done, Reader, Store};

/// The `state` table. `version` counts the commits that wrote a key (no
/// writer checks it yet: concurrent writers are last-writer-wins).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS state (
    plugin        TEXT NOT NULL,
    key           TEXT NOT NULL,
    value         BLOB NOT NULL,
    version       INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (plugin, key)
) WITHOUT ROWID;
";

/// The done records of exactly-once plugins (a host on a broker only: the
/// embedded transport settles a message and its effects in one commit).
const DONE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS processed (
    plugin          TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    processed_at_ms INTEGER NOT NULL,
    outcome         BLOB NOT NULL,
    PRIMARY KEY (plugin, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS processed_by_age ON processed (processed_at_ms);
";

/// Writes one message's changes to `plugin`'s state inside `tx`.
pub fn apply(tx: &Transaction<'_>, plugin: &str, changes: &Changes, now_ms: u64) -> Result<()> {
    let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
    for (key, value) in &changes.writes {
        match value {
            Some(v) => {
                tx.prepare_cached(
                    "INSERT INTO state (plugin, key, value, version, updated_at_ms) VALUES (?1, ?2, ?3, 1, ?4)
                     ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value, version = version + 1, updated_at_ms = excluded.updated_at_ms",
                )?
                .execute(params![plugin, key, v, now])?;
            }
            None => {
                tx.prepare_cached("DELETE FROM state WHERE plugin = ?1 AND key = ?2")?
                    .execute(params![plugin, key])?;
            }
        }
    }
    Ok(())
}

fn get(conn: &Connection, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
    Ok(conn
        .prepare_cached("SELECT value FROM state WHERE plugin = ?1 AND key = ?2")?
        .query_row(params![plugin, key], |r| r.get(0))
        .optional()?)
}

fn keys(
    conn: &Connection,
    plugin: &str,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>> {
    // Text compares byte by byte: the keys from `prefix` on come in order,
    // and the first one without it ends the range.
    let mut stmt = conn.prepare_cached(
        "SELECT key FROM state WHERE plugin = ?1 AND key >= ?2 AND (?3 IS NULL OR key > ?3) ORDER BY key",
    )?;
    let mut rows = stmt.query(params![plugin, prefix, after])?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(row) = rows.next()? else { break };
        let key: String = row.get(0)?;
        if !key.starts_with(prefix) {
            break;
        }
        out.push(key);
    }
    Ok(out)
}

/// Reads (and, for a broker host, commits) the state in one SQLite file.
/// Readers take a connection of their own, so a plugin's reads wait for
/// neither the writer nor each other (the file is in WAL mode).
pub struct SqliteState {
    path: PathBuf,
    readers: Mutex<Vec<Connection>>,
    /// `None` when the embedded transport writes the file.
    writer: Arc<Mutex<Option<Connection>>>,
}

impl SqliteState {
    /// Opens the state in `path`, creating the file and table if needed.
    pub fn open(path: &Path) -> Result<Self> {
        crate::files::create_private_file(path)
            .with_context(|| format!("cannot create the state store {}", path.display()))?;
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the state store {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(&format!("{SCHEMA}{DONE_SCHEMA}"))
            .with_context(|| format!("cannot create the state tables in {}", path.display()))?;
        Ok(SqliteState {
            path: path.to_owned(),
            readers: Mutex::new(Vec::new()),
            writer: Arc::new(Mutex::new(Some(conn))),
        })
    }

    /// A reader of a store the embedded transport writes (and created).
    pub fn reader(path: &Path) -> Arc<Self> {
        Arc::new(SqliteState {
            path: path.to_owned(),
            readers: Mutex::new(Vec::new()),
            writer: Arc::new(Mutex::new(None)),
        })
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let pooled = self
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match pooled {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .with_context(|| format!("cannot open the state store {}", self.path.display()))?;
                c.busy_timeout(Duration::from_secs(5))?;
                c
            }
        };
        let result = f(&conn);
        if result.is_ok() {
            self.readers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
        }
        result.with_context(|| format!("cannot read the state store {}", self.path.display()))
    }
}

impl SqliteState {
    /// Runs `f` on the writer connection, off the async threads.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
            let conn = writer
                .as_mut()
                .ok_or_else(|| anyhow!("this state is written by its transport"))?;
            f(conn)
        })
        .await
        .map_err(|e| anyhow!("state store task failed: {e}"))?
    }
}

impl Reader for SqliteState {
    fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.read(|c| get(c, plugin, key))
    }

    fn keys(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        self.read(|c| keys(c, plugin, prefix, after, limit))
    }
}

#[async_trait]
impl Store for SqliteState {
    async fn commit(&self, plugin: &str, changes: Changes, done: Vec<Done>) -> Result<()> {
        let plugin = plugin.to_owned();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let now = crate::envelope::now_ms();
            apply(&tx, &plugin, &changes, now)?;
            for d in &done {
                tx.prepare_cached(
                    "INSERT INTO processed (plugin, message_id, processed_at_ms, outcome) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![plugin, d.message_id, i64::try_from(now).unwrap_or(i64::MAX), d.encode()])
                .with_context(|| format!("message {} of plugin {plugin}", d.message_id))?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
        .with_context(|| format!("cannot commit to the state store {}", self.path.display()))
    }

    async fn done(&self, plugin: &str, ids: &[String]) -> Result<Vec<Done>> {
        let plugin = plugin.to_owned();
        let ids = ids.to_vec();
        self.write(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT outcome FROM processed WHERE plugin = ?1 AND message_id = ?2",
            )?;
            let mut found = Vec::new();
            for id in ids {
                let outcome: Option<Vec<u8>> = stmt
                    .query_row(params![plugin, id], |r| r.get(0))
                    .optional()?;
                if let Some(bytes) = outcome {
                    found.push(super::read_done(&plugin, id, &bytes));
                }
            }
            Ok(found)
        })
        .await
        .with_context(|| format!("cannot read the state store {}", self.path.display()))
    }

    async fn prune(&self, before_ms: u64) -> Result<u64> {
        self.write(move |conn| {
            let n = conn
                .prepare_cached("DELETE FROM processed WHERE processed_at_ms < ?1")?
                .execute(params![i64::try_from(before_ms).unwrap_or(i64::MAX)])?;
            Ok(n as u64)
        })
        .await
        .with_context(|| format!("cannot prune the state store {}", self.path.display()))
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_commit_and_read_back_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteState::open(&dir.path().join("state.db")).unwrap();
        let mut c = Changes::default();
        for k in ["b:1", "a:2", "a:1", "a:"] {
            c.writes.insert(k.into(), Some(k.as_bytes().to_vec()));
        }
        store.commit("p", c, Vec::new()).await.unwrap();
        assert_eq!(store.get("p", "a:1").unwrap(), Some(b"a:1".to_vec()));
        assert_eq!(store.get("q", "a:1").unwrap(), None);
        assert_eq!(
            store.keys("p", "a:", None, 10).unwrap(),
            ["a:", "a:1", "a:2"]
        );
        assert_eq!(store.keys("p", "a:", Some("a:1"), 10).unwrap(), ["a:2"]);
        assert_eq!(store.keys("p", "", None, 2).unwrap(), ["a:", "a:1"]);
        let mut d = Changes::default();
        d.writes.insert("a:1".into(), None);
        let done = Done {
            message_id: "m-1".into(),
            outputs: Vec::new(),
            reply: None,
        };
        store.commit("p", d, vec![done.clone()]).await.unwrap();
        assert_eq!(store.get("p", "a:1").unwrap(), None);
        let ids = ["m-1".to_owned(), "m-2".to_owned()];
        assert_eq!(
            store.done("p", &ids).await.unwrap(),
            std::slice::from_ref(&done)
        );
        assert!(store.done("q", &ids).await.unwrap().is_empty());
        // Done twice: the whole commit fails, its changes too.
        let mut again = Changes::default();
        again.writes.insert("a:9".into(), Some(b"9".to_vec()));
        assert!(store.commit("p", again, vec![done]).await.is_err());
        assert_eq!(store.get("p", "a:9").unwrap(), None);
        assert_eq!(store.prune(crate::envelope::now_ms() + 1).await.unwrap(), 1);
        assert!(store.done("p", &ids).await.unwrap().is_empty());
    }
}
