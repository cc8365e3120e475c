//! The embedded dead-letter store: a table in a SQLite file, by default the
//! embedded transport's own store.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params, params_from_iter};

use super::{
    COLUMNS, DeadLetter, DeadLetterStore, ErrorInfo, Filter, Group, Param, Status, from_json, json,
    merge_attempts, opt_u64, payload_digest, to_i64, where_clause,
};
use crate::envelope::{Envelope, Kind, now_ms};

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

fn to_sql(p: &Param) -> rusqlite::types::Value {
    match p {
        Param::Text(s) => rusqlite::types::Value::Text(s.clone()),
        Param::Int(i) => rusqlite::types::Value::Integer(*i),
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

fn read_letter(row: &rusqlite::Row<'_>) -> Result<DeadLetter> {
    let id: String = row.get(0)?;
    let kind: String = row.get(7)?;
    let status: String = row.get(32)?;
    Ok(DeadLetter {
        pipeline: row.get(1)?,
        route: row.get(2)?,
        plugin_version: row.get(3)?,
        plugin_digest: row.get(4)?,
        message: Envelope {
            id: row.get(5)?,
            message_type: row.get(6)?,
            kind: Kind::parse(&kind).unwrap_or(Kind::Event),
            payload: row.get(8)?,
            content_type: row.get(9)?,
            headers: from_json(&row.get::<_, String>(10)?, "headers", &id)?,
            correlation_id: row.get(11)?,
            causation_id: row.get(12)?,
            reply_to: row.get(13)?,
            partition_key: row.get(14)?,
            created_at_ms: row.get::<_, i64>(15)?.unsigned_abs(),
            attempt: u32::try_from(row.get::<_, i64>(16)?).unwrap_or(u32::MAX),
            history: Vec::new(),
        },
        error: ErrorInfo {
            kind: row.get(17)?,
            message: row.get(18)?,
            code: row.get(19)?,
            details: from_json(&row.get::<_, String>(20)?, "error_details", &id)?,
            backtrace: row.get(21)?,
            output: row.get(22)?,
        },
        attempts: from_json(&row.get::<_, String>(23)?, "attempts", &id)?,
        first_failed_at_ms: row.get::<_, i64>(24)?.unsigned_abs(),
        last_failed_at_ms: row.get::<_, i64>(25)?.unsigned_abs(),
        source: from_json(&row.get::<_, String>(26)?, "source", &id)?,
        trace_id: row.get(27)?,
        span_id: row.get(28)?,
        host: row.get(29)?,
        fingerprint: row.get(30)?,
        cause: row.get(31)?,
        status: Status::parse(&status)
            .ok_or_else(|| anyhow!("dead letter {id}: unknown status `{status}`"))?,
        replay_count: u32::try_from(row.get::<_, i64>(33)?).unwrap_or(u32::MAX),
        replayed_at_ms: opt_u64(row.get(34)?),
        resolved_at_ms: opt_u64(row.get(35)?),
        note: row.get(36)?,
        id,
    })
}

fn insert(tx: &rusqlite::Transaction<'_>, d: &DeadLetter) -> rusqlite::Result<()> {
    let placeholders: Vec<String> = (1..=38).map(ph).collect();
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT INTO dead_letters ({COLUMNS}, payload_sha256) VALUES ({})",
        placeholders.join(", ")
    ))?;
    let m = &d.message;
    stmt.execute(params![
        d.id,
        d.pipeline,
        d.route,
        d.plugin_version,
        d.plugin_digest,
        m.id,
        m.message_type,
        m.kind.as_str(),
        m.payload,
        m.content_type,
        json(&m.headers),
        m.correlation_id,
        m.causation_id,
        m.reply_to,
        m.partition_key,
        to_i64(m.created_at_ms),
        m.attempt,
        d.error.kind,
        d.error.message,
        d.error.code,
        json(&d.error.details),
        d.error.backtrace,
        d.error.output,
        json(&d.attempts),
        to_i64(d.first_failed_at_ms),
        to_i64(d.last_failed_at_ms),
        json(&d.source),
        d.trace_id,
        d.span_id,
        d.host,
        d.fingerprint,
        d.cause,
        d.status.as_str(),
        d.replay_count,
        d.replayed_at_ms.map(to_i64),
        d.resolved_at_ms.map(to_i64),
        d.note,
        payload_digest(&m.payload),
    ])?;
    Ok(())
}

impl Inner {
    /// The filter scoped to this store's pipeline.
    fn select(&self, filter: &Filter) -> (String, Vec<rusqlite::types::Value>) {
        let (mut clause, params) = where_clause(filter, ph);
        let mut values: Vec<rusqlite::types::Value> = params.iter().map(to_sql).collect();
        values.push(rusqlite::types::Value::Text(self.pipeline.clone()));
        let scope = format!("pipeline = ?{}", values.len());
        clause = if clause.is_empty() {
            format!("WHERE {scope}")
        } else {
            format!("{clause} AND {scope}")
        };
        (clause, values)
    }

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
            let mut ids = Vec::with_capacity(letters.len());
            for d in &letters {
                let existing: Option<(String, String)> = tx
                    .query_row(
                        "SELECT id, attempts FROM dead_letters
                         WHERE pipeline = ?1 AND route = ?2 AND message_id = ?3 AND payload_sha256 = ?4",
                        params![d.pipeline, d.route, d.message.id, payload_digest(&d.message.payload)],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                match existing {
                    Some((id, attempts)) => {
                        let all = merge_attempts(from_json(&attempts, "attempts", &id)?, &d.attempts);
                        tx.execute(
                            "UPDATE dead_letters SET plugin_version = ?2, plugin_digest = ?3, error_kind = ?4, error_message = ?5,
                                 error_code = ?6, error_details = ?7, backtrace = ?8, output = ?9, attempts = ?10,
                                 last_failed_at_ms = ?11, source = ?12, trace_id = ?13, span_id = ?14, host = ?15,
                                 fingerprint = ?16, cause = ?17, status = 'dead'
                             WHERE id = ?1",
                            params![
                                id,
                                d.plugin_version,
                                d.plugin_digest,
                                d.error.kind,
                                d.error.message,
                                d.error.code,
                                json(&d.error.details),
                                d.error.backtrace,
                                d.error.output,
                                json(&all),
                                to_i64(d.last_failed_at_ms),
                                json(&d.source),
                                d.trace_id,
                                d.span_id,
                                d.host,
                                d.fingerprint,
                                d.cause,
                            ],
                        )?;
                        ids.push(id);
                    }
                    None => {
                        insert(&tx, d)?;
                        ids.push(d.id.clone());
                    }
                }
            }
            tx.commit()?;
            Ok(ids)
        })
        .await
    }

    async fn list(&self, filter: &Filter) -> Result<Vec<DeadLetter>> {
        let filter = filter.clone();
        self.blocking(move |s| {
            let (clause, values) = s.select(&filter);
            let limit = filter
                .limit
                .map(|l| format!(" LIMIT {}", to_i64(l)))
                .unwrap_or_default();
            let conn = lock(&s.conn);
            let mut stmt = conn.prepare(&format!(
                "SELECT {COLUMNS} FROM dead_letters {clause} ORDER BY last_failed_at_ms DESC, id DESC{limit}"
            ))?;
            let mut rows = stmt.query(params_from_iter(values))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(read_letter(row)?);
            }
            Ok(out)
        })
        .await
    }

    async fn groups(&self, filter: &Filter) -> Result<Vec<Group>> {
        let filter = filter.clone();
        self.blocking(move |s| {
            let (clause, values) = s.select(&filter);
            let limit = filter
                .limit
                .map(|l| format!(" LIMIT {}", to_i64(l)))
                .unwrap_or_default();
            let conn = lock(&s.conn);
            let mut stmt = conn.prepare(&format!(
                "SELECT fingerprint, COUNT(*), MIN(route), MIN(error_kind), MIN(cause), MIN(first_failed_at_ms), MAX(last_failed_at_ms)
                 FROM dead_letters {clause} GROUP BY fingerprint ORDER BY MAX(last_failed_at_ms) DESC{limit}"
            ))?;
            let rows = stmt.query_map(params_from_iter(values), |r| {
                Ok(Group {
                    fingerprint: r.get(0)?,
                    count: r.get::<_, i64>(1)?.unsigned_abs(),
                    route: r.get(2)?,
                    error_kind: r.get(3)?,
                    cause: r.get(4)?,
                    first_failed_at_ms: r.get::<_, i64>(5)?.unsigned_abs(),
                    last_failed_at_ms: r.get::<_, i64>(6)?.unsigned_abs(),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<DeadLetter>> {
        let id = id.to_owned();
        self.blocking(move |s| {
            let conn = lock(&s.conn);
            let mut stmt = conn.prepare(&format!(
                "SELECT {COLUMNS} FROM dead_letters WHERE pipeline = ?1 AND id LIKE ?2 ESCAPE '\\' LIMIT 2"
            ))?;
            let pattern = format!("{}%", id.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
            let mut rows = stmt.query(params![s.pipeline, pattern])?;
            let mut found = Vec::new();
            while let Some(row) = rows.next()? {
                found.push(read_letter(row)?);
            }
            match found.len() {
                0 | 1 => Ok(found.pop()),
                _ => bail!("`{id}` matches several dead letters; give more of the id"),
            }
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
                let mut update = tx.prepare_cached(
                    "UPDATE dead_letters
                     SET replay_count = replay_count + CASE WHEN status = 'dead' THEN 1 ELSE 0 END,
                         status = 'replaying', replayed_at_ms = ?3, replay_claim = ?4
                     WHERE id = ?1 AND pipeline = ?2
                       AND (status = 'dead'
                            OR (status = 'replaying'
                                AND (replay_claim IS ?4 OR COALESCE(replayed_at_ms, 0) < ?5)))",
                )?;
                let mut select = tx
                    .prepare_cached(&format!("SELECT {COLUMNS} FROM dead_letters WHERE id = ?1"))?;
                for id in &ids {
                    if update.execute(params![id, s.pipeline, now, claim, stale])? == 1 {
                        let mut rows = select.query(params![id])?;
                        if let Some(row) = rows.next()? {
                            out.push(read_letter(row)?);
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
