//! The embedded dead-letter store: a table in a SQLite file, by default the
//! embedded transport's own store.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use async_trait::async_trait;
use rusqlite::types::{ToSqlOutput, Value as SqlValue};
use rusqlite::{
    Connection, OptionalExtension, ToSql, Transaction, TransactionBehavior, params,
    params_from_iter,
};

use super::query::{
    claim_sql, groups_query, id_prefix_pattern, list_query, only_match, read_group,
};
use super::row::{self, StoredRow, Value};
use super::{DeadLetter, DeadLetterStore, Filter, Group, Status, to_i64};
use crate::envelope::now_ms;

/// Each entry upgrades the schema by one version; applied in order, once.
const MIGRATIONS: [&str; 3] = ["
CREATE TABLE dead_letters (
    id                 TEXT PRIMARY KEY,
    pipeline           TEXT NOT NULL,
    route              TEXT NOT NULL,
    plugin_version     TEXT NOT NULL,
    plugin_digest      TEXT NOT NULL,
    message_id         TEXT NOT NULL,
    message_type       TEXT NOT NULL,
    kind               TEXT NOT NULL,
    payload            BLOB NOT NULL,
    payload_sha256     TEXT NOT NULL,
    content_type       TEXT NOT NULL,
    headers            TEXT NOT NULL,
    correlation_id     TEXT,
    causation_id       TEXT,
    reply_to           TEXT,
    partition_key      TEXT,
    created_at_ms      INTEGER NOT NULL,
    attempt            INTEGER NOT NULL,
    error_kind         TEXT NOT NULL,
    error_message      TEXT NOT NULL,
    error_code         TEXT,
    error_details      TEXT NOT NULL,
    backtrace          TEXT,
    output             TEXT,
    attempts           TEXT NOT NULL,
    first_failed_at_ms INTEGER NOT NULL,
    last_failed_at_ms  INTEGER NOT NULL,
    source             TEXT NOT NULL,
    trace_id           TEXT,
    span_id            TEXT,
    host               TEXT NOT NULL,
    fingerprint        TEXT NOT NULL,
    cause              TEXT NOT NULL,
    status             TEXT NOT NULL,
    replay_count       INTEGER NOT NULL,
    replayed_at_ms     INTEGER,
    resolved_at_ms     INTEGER,
    note               TEXT
);
-- One record per failed message: a message that fails again (after a
-- redelivery or a replay) adds to its record. The payload digest keeps two
-- different messages that share an id apart.
CREATE UNIQUE INDEX dead_letters_by_message ON dead_letters (pipeline, route, message_id, payload_sha256);
CREATE INDEX dead_letters_by_fingerprint ON dead_letters (pipeline, fingerprint);
CREATE INDEX dead_letters_by_time ON dead_letters (pipeline, last_failed_at_ms);
", "
ALTER TABLE dead_letters ADD COLUMN replay_claim TEXT;
", "
CREATE TABLE crash_counts (
    pipeline         TEXT NOT NULL,
    route            TEXT NOT NULL,
    message_id       TEXT NOT NULL,
    crashes          INTEGER NOT NULL,
    last_crash_at_ms INTEGER NOT NULL,
    PRIMARY KEY (pipeline, route, message_id)
);
"];

/// Dead letters in a SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    pipeline: String,
    conn: Mutex<Connection>,
}

fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    conn.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn ph(i: usize) -> String {
    format!("?{i}")
}

/// The table, which the file has to itself.
const TABLE: &str = "dead_letters";

impl ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Text(s) => ToSqlOutput::from(s.as_str()),
            Value::Int(i) => ToSqlOutput::from(*i),
            Value::Bytes(b) => ToSqlOutput::from(b.as_slice()),
            Value::OptText(Some(s)) => ToSqlOutput::from(s.as_str()),
            Value::OptInt(Some(i)) => ToSqlOutput::from(*i),
            Value::OptText(None) | Value::OptInt(None) => ToSqlOutput::Owned(SqlValue::Null),
        })
    }
}

impl StoredRow for rusqlite::Row<'_> {
    fn text(&self, index: usize) -> Result<String> {
        Ok(self.get(index)?)
    }

    fn opt_text(&self, index: usize) -> Result<Option<String>> {
        Ok(self.get(index)?)
    }

    fn int(&self, index: usize) -> Result<i64> {
        Ok(self.get(index)?)
    }

    fn opt_int(&self, index: usize) -> Result<Option<i64>> {
        Ok(self.get(index)?)
    }

    fn bytes(&self, index: usize) -> Result<Vec<u8>> {
        Ok(self.get(index)?)
    }
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the store in `path`, scoped
    /// to one pipeline's records.
    pub fn open(path: &Path, pipeline: &str) -> Result<Self> {
        crate::files::create_private_file(path)?;
        let mut conn = Connection::open(path)
            .with_context(|| format!("cannot open the dead-letter store {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn).with_context(|| format!("dead-letter store {}", path.display()))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                pipeline: pipeline.to_owned(),
                conn: Mutex::new(conn),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| anyhow!("dead-letter store task failed: {e}"))?
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    // A store already at this version is only read: a host can open it on
    // a full disk (and then wait for room to write).
    let known = MIGRATIONS.len() as i64;
    let table_exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dead_letter_migrations')",
        [],
        |r| r.get(0),
    )?;
    if table_exists {
        let current: i64 = conn.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM dead_letter_migrations",
            [],
            |r| r.get(0),
        )?;
        if current == known {
            return Ok(());
        }
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS dead_letter_migrations (version INTEGER PRIMARY KEY, applied_at_ms INTEGER NOT NULL)",
    )?;
    let current: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM dead_letter_migrations",
        [],
        |r| r.get(0),
    )?;
    if current > known {
        bail!(
            "the dead-letter schema is at version {current}, newer than this switchyard knows ({known}); upgrade switchyard"
        );
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(current).unwrap_or(0))
    {
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO dead_letter_migrations (version, applied_at_ms) VALUES (?1, ?2)",
            params![i as i64 + 1, to_i64(now_ms())],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// Records one failure; returns the id of its record (an existing one if
/// the message failed before).
fn record_one(tx: &Transaction<'_>, d: DeadLetter) -> Result<String> {
    static FIND: LazyLock<String> = LazyLock::new(|| row::find_sql(TABLE, ph));
    static REFAIL: LazyLock<String> = LazyLock::new(|| row::refail_sql(TABLE, ph));
    static INSERT: LazyLock<String> = LazyLock::new(|| row::insert_sql(TABLE, ph));
    let existing: Option<(String, String)> = tx
        .query_row(&FIND, params_from_iter(row::key_values(&d)), |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    match existing {
        Some((id, attempts)) => {
            tx.execute(
                &REFAIL,
                params_from_iter(row::refail_values(&id, &attempts, d)?),
            )?;
            Ok(id)
        }
        None => {
            tx.prepare_cached(&INSERT)?
                .execute(params_from_iter(row::insert_values(&d)))?;
            Ok(d.id)
        }
    }
}

/// Runs a query whose rows are read with `read`.
fn query<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    read: impl Fn(&dyn StoredRow) -> Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(read(r)?);
    }
    Ok(out)
}

impl Inner {
    /// Updates the status of the given records; returns how many changed.
    fn set_status(
        &self,
        ids: &[String],
        to: Status,
        from: &[Status],
        note: Option<&str>,
    ) -> Result<u64> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut changed = 0;
        {
            let from: Vec<String> = from.iter().map(|s| format!("'{}'", s.as_str())).collect();
            let mut stmt = tx.prepare_cached(&format!(
                "UPDATE dead_letters SET status = ?1, note = COALESCE(?2, note),
                     resolved_at_ms = CASE WHEN ?1 = 'resolved' THEN ?5 ELSE resolved_at_ms END
                 WHERE id = ?3 AND pipeline = ?4 AND status IN ({})",
                from.join(", ")
            ))?;
            for id in ids {
                changed += stmt.execute(params![
                    to.as_str(),
                    note,
                    id,
                    self.pipeline,
                    to_i64(now_ms())
                ])? as u64;
            }
        }
        tx.commit()?;
        Ok(changed)
    }
}

#[async_trait]
impl DeadLetterStore for SqliteStore {
    async fn record(&self, letters: Vec<DeadLetter>) -> Result<Vec<String>> {
        self.blocking(move |s| {
            let mut conn = lock(&s.conn);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let ids = letters
                .into_iter()
                .map(|d| record_one(&tx, d))
                .collect::<Result<Vec<_>>>()?;
            tx.commit()?;
            Ok(ids)
        })
        .await
    }

    async fn list(&self, filter: &Filter) -> Result<Vec<DeadLetter>> {
        let (sql, params) = list_query(TABLE, &self.inner.pipeline, filter, ph);
        self.blocking(move |s| {
            let conn = lock(&s.conn);
            query(&conn, &sql, params_from_iter(params), row::read_letter)
        })
        .await
    }

    async fn groups(&self, filter: &Filter) -> Result<Vec<Group>> {
        let (sql, params) = groups_query(TABLE, &self.inner.pipeline, filter, ph);
        self.blocking(move |s| {
            let conn = lock(&s.conn);
            query(&conn, &sql, params_from_iter(params), read_group)
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<DeadLetter>> {
        let id = id.to_owned();
        self.blocking(move |s| {
            let conn = lock(&s.conn);
            let columns = row::column_list();
            let sql = format!(
                "SELECT {columns} FROM {TABLE} WHERE pipeline = ?1 AND id LIKE ?2 ESCAPE '\\' LIMIT 2"
            );
            let pattern = id_prefix_pattern(&id);
            let found = query(&conn, &sql, params![s.pipeline, pattern], row::read_letter)?;
            only_match(found, &id)
        })
        .await
    }

    async fn begin_replay(
        &self,
        ids: &[String],
        claim: &str,
        stale_before_ms: u64,
    ) -> Result<Vec<DeadLetter>> {
        let ids = ids.to_vec();
        let claim = claim.to_owned();
        let stale = to_i64(stale_before_ms);
        self.blocking(move |s| {
            let mut conn = lock(&s.conn);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = to_i64(now_ms());
            let mut out = Vec::new();
            {
                let mut update = tx.prepare_cached(&claim_sql(TABLE, ph, "IS"))?;
                let columns = row::column_list();
                let mut select =
                    tx.prepare_cached(&format!("SELECT {columns} FROM {TABLE} WHERE id = ?1"))?;
                for id in &ids {
                    if update.execute(params![id, s.pipeline, now, claim, stale])? == 1 {
                        let mut rows = select.query(params![id])?;
                        if let Some(r) = rows.next()? {
                            out.push(row::read_letter(r)?);
                        }
                    }
                }
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn finish_replay(&self, ids: &[String]) -> Result<()> {
        let ids = ids.to_vec();
        self.blocking(move |s| {
            s.set_status(&ids, Status::Replayed, &[Status::Replaying], None)?;
            Ok(())
        })
        .await
    }

    async fn abort_replay(&self, ids: &[String]) -> Result<()> {
        let ids = ids.to_vec();
        self.blocking(move |s| {
            let mut conn = lock(&s.conn);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for id in &ids {
                tx.execute(
                    "UPDATE dead_letters SET status = 'dead', replay_count = MAX(replay_count - 1, 0)
                     WHERE id = ?1 AND pipeline = ?2 AND status = 'replaying'",
                    params![id, s.pipeline],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn mark_handled(&self, ids: &[String]) -> Result<u64> {
        let ids = ids.to_vec();
        self.blocking(move |s| {
            s.set_status(
                &ids,
                Status::Handled,
                &[Status::Replaying, Status::Replayed],
                None,
            )
        })
        .await
    }

    async fn resolve(&self, ids: &[String], note: Option<&str>) -> Result<u64> {
        let ids = ids.to_vec();
        let note = note.map(str::to_owned);
        self.blocking(move |s| {
            s.set_status(
                &ids,
                Status::Resolved,
                &[Status::Dead, Status::Replaying, Status::Replayed],
                note.as_deref(),
            )
        })
        .await
    }

    async fn delete(&self, ids: &[String]) -> Result<u64> {
        let ids = ids.to_vec();
        self.blocking(move |s| {
            let mut conn = lock(&s.conn);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut n = 0;
            for id in &ids {
                n += tx.execute(
                    "DELETE FROM dead_letters WHERE id = ?1 AND pipeline = ?2",
                    params![id, s.pipeline],
                )? as u64;
            }
            tx.commit()?;
            Ok(n)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.blocking(|s| {
            lock(&s.conn).query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    }

    async fn counts(&self) -> Result<Vec<(Status, u64)>> {
        self.blocking(|s| {
            let conn = lock(&s.conn);
            let mut stmt = conn.prepare(
                "SELECT status, COUNT(*) FROM dead_letters WHERE pipeline = ?1 GROUP BY status",
            )?;
            let rows = stmt.query_map(params![s.pipeline], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (status, n) = row?;
                if let Some(status) = Status::parse(&status) {
                    out.push((status, n.unsigned_abs()));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn note_crash(&self, route: &str, message_ids: &[String]) -> Result<()> {
        let (route, ids) = (route.to_owned(), message_ids.to_vec());
        self.blocking(move |s| {
            let mut conn = lock(&s.conn);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut upsert = tx.prepare_cached(
                    "INSERT INTO crash_counts (pipeline, route, message_id, crashes, last_crash_at_ms)
                     VALUES (?1, ?2, ?3, 1, ?4)
                     ON CONFLICT (pipeline, route, message_id)
                     DO UPDATE SET crashes = crashes + 1, last_crash_at_ms = ?4",
                )?;
                let now = to_i64(now_ms());
                for id in &ids {
                    upsert.execute(params![s.pipeline, route, id, now])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn crash_counts(&self, forget_before_ms: u64) -> Result<Vec<(String, String, u32)>> {
        self.blocking(move |s| {
            let conn = lock(&s.conn);
            // Forgetting is tidying: a store that cannot be written (a full
            // disk) still says what it counted.
            let _ = conn
                .prepare_cached(
                    "DELETE FROM crash_counts WHERE pipeline = ?1 AND last_crash_at_ms < ?2",
                )
                .and_then(|mut d| d.execute(params![s.pipeline, to_i64(forget_before_ms)]));
            let mut stmt = conn.prepare_cached(
                "SELECT route, message_id, crashes FROM crash_counts WHERE pipeline = ?1 AND last_crash_at_ms >= ?2",
            )?;
            let rows = stmt.query_map(params![s.pipeline, to_i64(forget_before_ms)], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (route, id, n) = row?;
                out.push((route, id, u32::try_from(n).unwrap_or(u32::MAX)));
            }
            Ok(out)
        })
        .await
    }

    async fn clear_crashes(&self, route: &str, message_ids: &[String]) -> Result<()> {
        let (route, ids) = (route.to_owned(), message_ids.to_vec());
        self.blocking(move |s| {
            let conn = lock(&s.conn);
            let mut del = conn.prepare_cached(
                "DELETE FROM crash_counts WHERE pipeline = ?1 AND route = ?2 AND message_id = ?3",
            )?;
            for id in &ids {
                del.execute(params![s.pipeline, route, id])?;
            }
            Ok(())
        })
        .await
    }
}
