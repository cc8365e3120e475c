//! The journal in a SQLite file: the embedded transport's own (written in
//! its settle transaction), or a file of its own for a broker host.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_trait::async_trait;
use rusqlite::{Connection, params};

use super::{Record, Store};

/// The journal's table. Records are JSON (the fields `why` reads grow
/// without migrations); the ids that link records are columns of their own,
/// indexed, and the span attributes plugins set are rows of a table of
/// their own, indexed by name and value, under their record's `seq`.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS journal (
    seq            INTEGER PRIMARY KEY,
    at_ms          INTEGER NOT NULL,
    message_id     TEXT NOT NULL,
    correlation_id TEXT,
    causation_id   TEXT,
    record         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_by_message ON journal (message_id);
CREATE INDEX IF NOT EXISTS journal_by_cause ON journal (causation_id) WHERE causation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_by_flow ON journal (correlation_id) WHERE correlation_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS journal_attributes (
    seq   INTEGER NOT NULL,
    name  TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (seq, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS journal_by_attribute ON journal_attributes (name, value, seq);
";

/// Rows removed per transaction when pruning, so a settle sharing the file
/// never waits long.
const PRUNE_CHUNK: i64 = 5000;

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Adds records, in the caller's transaction.
pub fn insert<'a>(
    conn: &Connection,
    records: impl IntoIterator<Item = &'a Record>,
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO journal (at_ms, message_id, correlation_id, causation_id, record) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut attribute = conn.prepare_cached(
        "INSERT OR REPLACE INTO journal_attributes (seq, name, value) VALUES (?1, ?2, ?3)",
    )?;
    for r in records {
        // Plain data: serializing cannot fail.
        let json = serde_json::to_string(r).unwrap_or_else(|_| "null".into());
        stmt.execute(params![
            to_i64(r.at_ms),
            r.message_id,
            r.correlation_id,
            r.causation_id,
            json
        ])?;
        if !r.attributes.is_empty() {
            let seq = conn.last_insert_rowid();
            for (name, value) in &r.attributes {
                attribute.execute(params![seq, name, value])?;
            }
        }
    }
    Ok(())
}

/// How many records the journal holds, and the newest's sequence number,
/// read from the two ends of the table rather than by a scan: sequence
/// numbers have no gaps but those pruning left at the start.
fn count_and_newest(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    // Two subqueries: SQLite reads one end of the table for each (min and
    // max in one select scan it all).
    let (oldest, newest): (i64, i64) = conn.query_row(
        "SELECT coalesce((SELECT min(seq) FROM journal), 1), coalesce((SELECT max(seq) FROM journal), 0)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((
        newest.saturating_sub(oldest).saturating_add(1).max(0),
        newest,
    ))
}

/// Reads the records a query returns (its one column: `record`). A record
/// this version cannot read is skipped with a warning rather than hide the
/// rest.
fn read(stmt: &mut rusqlite::Statement<'_>, params: impl rusqlite::Params) -> Result<Vec<Record>> {
    let rows = stmt.query_map(params, |row| {
        Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
    })?;
    let mut records = Vec::new();
    for row in rows {
        let (seq, json) = row?;
        match serde_json::from_str(&json) {
            Ok(r) => records.push(r),
            Err(e) => {
                tracing::warn!(seq, error = %e, "A journal record cannot be read; skipped");
            }
        }
    }
    Ok(records)
}

/// A journal in a SQLite file.
pub struct SqliteJournal {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    conn.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SqliteJournal {
    /// Opens (creating if needed) the journal in `path`.
    pub fn open(path: &Path) -> Result<Self> {
        crate::files::create_private_file(path)
            .with_context(|| format!("cannot create the journal {}", path.display()))?;
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the journal {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Not the at-least-once boundary: a record lost to a power cut
        // costs a line of history, not a message.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("cannot create the journal's table in {}", path.display()))?;
        Ok(SqliteJournal {
            path: path.to_owned(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&conn)))
            .await
            .context("the journal's task failed")?
    }
}

#[async_trait]
impl Store for SqliteJournal {
    async fn write(&self, records: Vec<Record>) -> Result<()> {
        self.blocking(move |conn| {
            let tx = conn.transaction()?;
            insert(&tx, &records)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn of_message(&self, message_id: &str) -> Result<Vec<Record>> {
        let id = message_id.to_owned();
        self.blocking(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, record FROM journal WHERE message_id = ?1 ORDER BY seq",
            )?;
            read(&mut stmt, params![id])
        })
        .await
    }

    async fn caused_by(&self, message_ids: &[String], limit: usize) -> Result<Vec<Record>> {
        let ids = message_ids.to_vec();
        self.blocking(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, record FROM journal WHERE causation_id = ?1 ORDER BY seq LIMIT ?2",
            )?;
            let mut all = Vec::new();
            for id in &ids {
                let left = limit.saturating_sub(all.len());
                if left == 0 {
                    break;
                }
                all.extend(read(
                    &mut stmt,
                    params![id, i64::try_from(left).unwrap_or(i64::MAX)],
                )?);
            }
            all.sort_by_key(|r| r.at_ms);
            Ok(all)
        })
        .await
    }

    async fn of_flow(&self, correlation_id: &str, limit: usize) -> Result<Vec<Record>> {
        let id = correlation_id.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.blocking(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, record FROM journal WHERE correlation_id = ?1
                 UNION SELECT seq, record FROM journal WHERE message_id = ?1
                 ORDER BY seq LIMIT ?2",
            )?;
            read(&mut stmt, params![id, limit])
        })
        .await
    }

    async fn ids_like(&self, prefix: &str, limit: usize) -> Result<Vec<String>> {
        // An id prefix range, not LIKE: ids hold no wildcards to escape,
        // and the index serves a range.
        let low = prefix.to_owned();
        let high = format!("{prefix}\u{10ffff}");
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.blocking(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT DISTINCT message_id FROM journal WHERE message_id >= ?1 AND message_id < ?2 LIMIT ?3",
            )?;
            let ids = stmt
                .query_map(params![low, high, limit], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(ids)
        })
        .await
    }

    async fn with_attribute(&self, name: &str, value: &str, limit: usize) -> Result<Vec<Record>> {
        let (name, value) = (name.to_owned(), value.to_owned());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.blocking(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT j.seq, j.record FROM journal_attributes a JOIN journal j ON j.seq = a.seq
                 WHERE a.name = ?1 AND a.value = ?2 ORDER BY a.seq DESC LIMIT ?3",
            )?;
            read(&mut stmt, params![name, value, limit])
        })
        .await
    }

    async fn prune(&self, before_ms: u64, max_records: u64) -> Result<u64> {
        let before = to_i64(before_ms);
        let max = to_i64(max_records);
        let cut = self
            .blocking(move |conn| {
                // Records come in time order, near enough: everything
                // before the first record inside the retention is older.
                let keep_from: Option<i64> = conn
                    .query_row(
                        "SELECT seq FROM journal WHERE at_ms >= ?1 ORDER BY seq LIMIT 1",
                        params![before],
                        |r| r.get(0),
                    )
                    .or_else(|e| match e {
                        rusqlite::Error::QueryReturnedNoRows => Ok(None),
                        e => Err(e),
                    })?;
                let (total, newest) = count_and_newest(conn)?;
                // Every record below the cut goes: the old ones, and the
                // oldest beyond the size limit.
                let by_age = keep_from.unwrap_or(newest.saturating_add(1));
                let by_size = if total > max {
                    newest.saturating_sub(max).saturating_add(1)
                } else {
                    0
                };
                Ok(by_age.max(by_size))
            })
            .await?;
        let mut removed = 0u64;
        // One chunk per lock and transaction: the writer (and, in the
        // embedded transport's file, the settle) gets its turn between.
        loop {
            let n = self
                .blocking(move |conn| {
                    let tx = conn.transaction()?;
                    let n = tx.execute(
                        "DELETE FROM journal WHERE seq IN (SELECT seq FROM journal WHERE seq < ?1 ORDER BY seq LIMIT ?2)",
                        params![cut, PRUNE_CHUNK],
                    )?;
                    // The attributes of what went: every one below the
                    // oldest record left, in the same step.
                    tx.execute(
                        "DELETE FROM journal_attributes WHERE seq < coalesce((SELECT min(seq) FROM journal), ?1)",
                        params![cut],
                    )?;
                    tx.commit()?;
                    Ok(n)
                })
                .await?;
            removed += n as u64;
            if i64::try_from(n).unwrap_or(0) < PRUNE_CHUNK {
                return Ok(removed);
            }
        }
    }

    async fn count(&self) -> Result<u64> {
        self.blocking(|conn| Ok(count_and_newest(conn)?.0.unsigned_abs()))
            .await
    }

    fn location(&self) -> String {
        format!("journal in {}", self.path.display())
    }
}
