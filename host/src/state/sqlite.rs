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
use crate::saga::{Conflict, Instance, Listed, Pending, Query, Status, Step, Timeout};

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

/// Saga instances and the steps that made them (see [`crate::saga`]).
pub const SAGA_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS saga_instances (
    plugin         TEXT NOT NULL,
    instance       TEXT NOT NULL,
    status         TEXT NOT NULL,
    version        INTEGER NOT NULL,
    plugin_version TEXT NOT NULL,
    started_at_ms  INTEGER NOT NULL,
    updated_at_ms  INTEGER NOT NULL,
    last_type      TEXT NOT NULL,
    PRIMARY KEY (plugin, instance)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS saga_instances_by_update ON saga_instances (updated_at_ms);
CREATE INDEX IF NOT EXISTS saga_instances_by_status ON saga_instances (plugin, status);
CREATE TABLE IF NOT EXISTS saga_steps (
    plugin   TEXT NOT NULL,
    instance TEXT NOT NULL,
    version  INTEGER NOT NULL,
    record   BLOB NOT NULL,
    PRIMARY KEY (plugin, instance, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS saga_timeouts (
    plugin       TEXT NOT NULL,
    id           TEXT NOT NULL,
    instance     TEXT NOT NULL,
    due_at_ms    INTEGER NOT NULL,
    message_type TEXT NOT NULL,
    command      INTEGER NOT NULL,
    payload      BLOB NOT NULL,
    fired_at_ms  INTEGER,
    sends        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (plugin, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS saga_timeouts_by_instance ON saga_timeouts (plugin, instance);
CREATE INDEX IF NOT EXISTS saga_timeouts_by_due ON saga_timeouts (due_at_ms);
";

const INSTANCE_COLUMNS: &str =
    "status, version, plugin_version, started_at_ms, updated_at_ms, last_type";

/// An instance row (its columns in [`INSTANCE_COLUMNS`] order from
/// `first`), or why it cannot be read.
fn instance_row(
    row: &rusqlite::Row<'_>,
    first: usize,
) -> rusqlite::Result<Result<Instance, String>> {
    let status: String = row.get(first)?;
    let version: i64 = row.get(first + 1)?;
    let instance = Status::parse(&status)
        .ok_or_else(|| format!("unknown status {status:?}"))
        .and_then(|status| {
            Ok(Instance {
                status,
                version: u64::try_from(version)
                    .map_err(|_| format!("negative version {version}"))?,
                plugin_version: String::new(),
                started_at_ms: 0,
                updated_at_ms: 0,
                last_type: String::new(),
            })
        });
    let Ok(mut instance) = instance else {
        return Ok(instance);
    };
    instance.plugin_version = row.get(first + 2)?;
    instance.started_at_ms = row.get::<_, i64>(first + 3)?.unsigned_abs();
    instance.updated_at_ms = row.get::<_, i64>(first + 4)?.unsigned_abs();
    instance.last_type = row.get(first + 5)?;
    Ok(Ok(instance))
}

fn instance(conn: &Connection, plugin: &str, id: &str) -> Result<Option<Instance>> {
    let row = conn
        .prepare_cached(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM saga_instances WHERE plugin = ?1 AND instance = ?2"
        ))?
        .query_row(params![plugin, id], |r| instance_row(r, 0))
        .optional()?;
    super::found_instance(plugin, id, row)
}

fn instances(conn: &Connection, q: &Query) -> Result<Vec<Listed>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT plugin, instance, {INSTANCE_COLUMNS} FROM saga_instances
         WHERE (?1 IS NULL OR plugin = ?1) AND (?2 IS NULL OR status = ?2)
           AND (?3 IS NULL OR updated_at_ms < ?3) AND (?4 IS NULL OR started_at_ms < ?4)
         ORDER BY updated_at_ms DESC LIMIT ?5"
    ))?;
    let ms = |t: Option<u64>| t.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
    let mut rows = stmt.query(params![
        q.plugin,
        q.status.map(Status::as_str),
        ms(q.updated_before_ms),
        ms(q.started_before_ms),
        i64::try_from(q.limit).unwrap_or(i64::MAX)
    ])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let plugin: String = row.get(0)?;
        let id: String = row.get(1)?;
        super::push_listed(&mut out, plugin, id, instance_row(row, 2)?);
    }
    Ok(out)
}

fn active(conn: &Connection, plugin: &str) -> Result<u64> {
    let n: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM saga_instances WHERE plugin = ?1 AND status IN ('running', 'failed')",
        )?
        .query_row(params![plugin], |r| r.get(0))?;
    Ok(n.unsigned_abs())
}

fn steps(conn: &Connection, plugin: &str, id: &str) -> Result<Vec<Step>> {
    let mut stmt = conn.prepare_cached(
        "SELECT version, record FROM saga_steps WHERE plugin = ?1 AND instance = ?2 ORDER BY version",
    )?;
    let mut rows = stmt.query(params![plugin, id])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let version: i64 = row.get(0)?;
        let record: Vec<u8> = row.get(1)?;
        out.push(
            Step::decode(&record)
                .with_context(|| format!("step {version} of saga instance {id} cannot be read"))?,
        );
    }
    Ok(out)
}

/// Applies one saga step of `plugin` inside `tx`: the instance must be at
/// the version the step read ([`Conflict`] otherwise).
pub fn apply_step(tx: &Transaction<'_>, plugin: &str, step: &Step) -> Result<()> {
    let before = instance(tx, plugin, &step.instance)?;
    if before.as_ref().map_or(0, |i| i.version) != step.read_version {
        return Err(Conflict {
            plugin: plugin.to_owned(),
            instance: step.instance.clone(),
            expected: step.read_version,
        }
        .into());
    }
    let after = step.instance();
    let ms = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
    let version = i64::try_from(after.version).unwrap_or(i64::MAX);
    tx.prepare_cached(&format!(
        "INSERT INTO saga_instances (plugin, instance, {INSTANCE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (plugin, instance) DO UPDATE SET status = excluded.status, version = excluded.version,
           plugin_version = excluded.plugin_version, updated_at_ms = excluded.updated_at_ms, last_type = excluded.last_type"
    ))?
    .execute(params![
        plugin,
        step.instance,
        after.status.as_str(),
        version,
        after.plugin_version,
        ms(after.started_at_ms),
        ms(after.updated_at_ms),
        after.last_type
    ])?;
    tx.prepare_cached(
        "INSERT OR REPLACE INTO saga_steps (plugin, instance, version, record) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![plugin, step.instance, version, step.encode()])?;
    if let Some(fired) = &step.fired {
        tx.prepare_cached("DELETE FROM saga_timeouts WHERE plugin = ?1 AND id = ?2")?
            .execute(params![plugin, fired])?;
    }
    if step.completed {
        tx.prepare_cached("DELETE FROM saga_timeouts WHERE plugin = ?1 AND instance = ?2")?
            .execute(params![plugin, step.instance])?;
    } else {
        for t in &step.timeouts {
            tx.prepare_cached(
                "INSERT INTO saga_timeouts (plugin, id, instance, due_at_ms, message_type, command, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                plugin,
                t.id,
                step.instance,
                ms(t.due_ms),
                t.message_type,
                t.command,
                t.payload
            ])?;
        }
    }
    Ok(())
}

fn timeout_instance(conn: &Connection, plugin: &str, id: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT instance FROM saga_timeouts WHERE plugin = ?1 AND id = ?2")?
        .query_row(params![plugin, id], |r| r.get(0))
        .optional()?)
}

/// Marks instance `instance` of `plugin` failed: a step that read it at
/// `version` was dead-lettered. Only while it is running at that version:
/// a later step (of this batch, or another host's) has moved it on, and a
/// completed or missing one stays as it is.
pub fn mark_failed(
    tx: &Transaction<'_>,
    plugin: &str,
    instance: &str,
    version: u64,
    now_ms: u64,
) -> Result<()> {
    tx.prepare_cached(
        "UPDATE saga_instances SET status = 'failed', updated_at_ms = ?4
         WHERE plugin = ?1 AND instance = ?2 AND version = ?3 AND status = 'running'",
    )?
    .execute(params![
        plugin,
        instance,
        i64::try_from(version).unwrap_or(i64::MAX),
        i64::try_from(now_ms).unwrap_or(i64::MAX)
    ])?;
    Ok(())
}

/// Forgets timeout `id` of `plugin` (its message was settled for good).
pub fn forget_timeout(tx: &Transaction<'_>, plugin: &str, id: &str) -> Result<()> {
    tx.prepare_cached("DELETE FROM saga_timeouts WHERE plugin = ?1 AND id = ?2")?
        .execute(params![plugin, id])?;
    Ok(())
}

fn timeouts(conn: &Connection, plugin: &str, instance: &str) -> Result<Vec<Pending>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, due_at_ms, message_type, fired_at_ms, sends FROM saga_timeouts
         WHERE plugin = ?1 AND instance = ?2 ORDER BY due_at_ms, id",
    )?;
    let mut rows = stmt.query(params![plugin, instance])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(Pending {
            id: row.get(0)?,
            due_ms: row.get::<_, i64>(1)?.unsigned_abs(),
            message_type: row.get(2)?,
            fired_at_ms: row.get::<_, Option<i64>>(3)?.map(i64::unsigned_abs),
            sends: u32::try_from(row.get::<_, i64>(4)?).unwrap_or(0),
        });
    }
    Ok(out)
}

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
        conn.execute_batch(&format!("{SCHEMA}{DONE_SCHEMA}{SAGA_SCHEMA}"))
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

    fn instance(&self, plugin: &str, id: &str) -> Result<Option<Instance>> {
        // A corrupt instance is its own error, not a store failure: the
        // connection goes back to the pool.
        self.read(|c| Ok(instance(c, plugin, id)))?
    }

    fn instances(&self, query: &Query) -> Result<Vec<Listed>> {
        self.read(|c| instances(c, query))
    }

    fn steps(&self, plugin: &str, id: &str) -> Result<Vec<Step>> {
        self.read(|c| steps(c, plugin, id))
    }

    fn active(&self, plugin: &str) -> Result<u64> {
        self.read(|c| active(c, plugin))
    }

    fn timeout_instance(&self, plugin: &str, id: &str) -> Result<Option<String>> {
        self.read(|c| timeout_instance(c, plugin, id))
    }

    fn timeouts(&self, plugin: &str, instance: &str) -> Result<Vec<Pending>> {
        self.read(|c| timeouts(c, plugin, instance))
    }
}

#[async_trait]
impl Store for SqliteState {
    async fn ping(&self) -> Result<()> {
        self.write(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    }

    async fn commit(
        &self,
        plugin: &str,
        changes: Changes,
        steps: Vec<Step>,
        done: Vec<Done>,
    ) -> Result<()> {
        let plugin = plugin.to_owned();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let now = crate::envelope::now_ms();
            apply(&tx, &plugin, &changes, now)?;
            for step in &steps {
                apply_step(&tx, &plugin, step)?;
            }
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

    async fn mark_failed(&self, plugin: &str, instances: Vec<(String, u64)>) -> Result<()> {
        let plugin = plugin.to_owned();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let now = crate::envelope::now_ms();
            for (instance, version) in &instances {
                mark_failed(&tx, &plugin, instance, *version, now)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
        .with_context(|| format!("cannot write to the state store {}", self.path.display()))
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

    async fn claim_timeouts(
        &self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, String, Timeout)>> {
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
            let lease = i64::try_from(lease_ms).unwrap_or(i64::MAX);
            let mut claimed = Vec::new();
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT plugin, id, instance, due_at_ms, message_type, command, payload FROM saga_timeouts
                     WHERE due_at_ms <= ?1 AND sends < ?4
                       AND (fired_at_ms IS NULL OR fired_at_ms + ?2 * (1 << (sends - 1)) <= ?1)
                     ORDER BY due_at_ms LIMIT ?3",
                )?;
                let mut rows = stmt.query(params![
                    now,
                    lease,
                    i64::try_from(limit).unwrap_or(i64::MAX),
                    super::MAX_TIMEOUT_SENDS
                ])?;
                while let Some(row) = rows.next()? {
                    claimed.push((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(2)?,
                        Timeout {
                            id: row.get(1)?,
                            due_ms: row.get::<_, i64>(3)?.unsigned_abs(),
                            message_type: row.get(4)?,
                            command: row.get(5)?,
                            payload: row.get(6)?,
                        },
                    ));
                }
            }
            for (plugin, _, t) in &claimed {
                tx.prepare_cached(
                    "UPDATE saga_timeouts SET fired_at_ms = ?3, sends = sends + 1 WHERE plugin = ?1 AND id = ?2",
                )?
                .execute(params![plugin, t.id, now])?;
            }
            tx.commit()?;
            Ok(claimed)
        })
        .await
        .with_context(|| format!("cannot claim due timeouts in {}", self.path.display()))
    }

    async fn forget_timeouts(&self, plugin: &str, ids: Vec<String>) -> Result<()> {
        let plugin = plugin.to_owned();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for id in &ids {
                forget_timeout(&tx, &plugin, id)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
        .with_context(|| format!("cannot forget timeouts in {}", self.path.display()))
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
        store.commit("p", c, Vec::new(), Vec::new()).await.unwrap();
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
        store
            .commit("p", d, Vec::new(), vec![done.clone()])
            .await
            .unwrap();
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
        assert!(
            store
                .commit("p", again, Vec::new(), vec![done])
                .await
                .is_err()
        );
        assert_eq!(store.get("p", "a:9").unwrap(), None);
        assert_eq!(store.prune(crate::envelope::now_ms() + 1).await.unwrap(), 1);
        assert!(store.done("p", &ids).await.unwrap().is_empty());
    }
}
