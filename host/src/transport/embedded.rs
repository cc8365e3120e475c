//! The embedded transport: durable queues in one SQLite file.
//!
//! Each route has a queue (rows of `queue` with its name). Enqueueing an
//! event writes one row per consuming route; a command, one row for its
//! handler. Settling a batch deletes the handled rows and inserts their
//! outputs, replies and failures in a single transaction, so a crash leaves
//! either the inputs or the outputs, never neither. Messages are removed only
//! then: a killed host redelivers whatever it had not settled.
//!
//! One host consumes a store at a time (it holds `<db>.lock`); other
//! processes, such as `switchyard send`, may enqueue concurrently, and an
//! idle consumer notices them within the configured poll interval.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::Notify;

use super::{Delivery, FailureRecord, Outcome, Settlement, Subscription, Topology, Transport};
use crate::config::EmbeddedConfig;
use crate::envelope::{Envelope, Kind, Reply, now_ms};

/// Version of the schema below, kept in SQLite's `user_version`.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queue (
    -- AUTOINCREMENT: a sequence number is never reused, so a consumer's
    -- in-memory cursor cannot skip a row that reuses a deleted number.
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    route          TEXT NOT NULL,
    id             TEXT NOT NULL,
    type           TEXT NOT NULL,
    kind           TEXT NOT NULL,
    payload        BLOB NOT NULL,
    content_type   TEXT NOT NULL,
    headers        TEXT NOT NULL,
    correlation_id TEXT,
    causation_id   TEXT,
    reply_to       TEXT,
    partition_key  TEXT,
    created_at_ms  INTEGER NOT NULL,
    attempt        INTEGER NOT NULL,
    enqueued_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_by_route ON queue (route, seq);

CREATE TABLE IF NOT EXISTS failed (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    route          TEXT NOT NULL,
    id             TEXT NOT NULL,
    type           TEXT NOT NULL,
    kind           TEXT NOT NULL,
    payload        BLOB NOT NULL,
    content_type   TEXT NOT NULL,
    headers        TEXT NOT NULL,
    correlation_id TEXT,
    causation_id   TEXT,
    reply_to       TEXT,
    partition_key  TEXT,
    created_at_ms  INTEGER NOT NULL,
    attempt        INTEGER NOT NULL,
    error_kind     TEXT NOT NULL,
    error_message  TEXT NOT NULL,
    error_code     TEXT,
    error_details  TEXT NOT NULL,
    backtrace      TEXT,
    plugin         TEXT NOT NULL,
    plugin_digest  TEXT NOT NULL,
    failed_at_ms   INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS replies (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    address        TEXT NOT NULL,
    in_reply_to    TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    payload        BLOB NOT NULL,
    content_type   TEXT NOT NULL,
    headers        TEXT NOT NULL,
    created_at_ms  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS replies_by_address ON replies (address);
";

const ENVELOPE_COLUMNS: &str = "id, type, kind, payload, content_type, headers, correlation_id, causation_id, reply_to, partition_key, created_at_ms, attempt";

/// The embedded transport over one SQLite file.
#[derive(Clone)]
pub struct EmbeddedTransport {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    config: EmbeddedConfig,
    topology: Topology,
    /// All writes go through this connection: SQLite has one writer anyway,
    /// and serializing here avoids busy-waiting inside SQLite.
    writer: Mutex<Connection>,
    /// Wakes an idle route when this process writes to its queue.
    wakers: HashMap<String, Arc<Notify>>,
}

/// The exclusive right to consume a store; released when dropped.
pub struct ConsumerLock {
    _file: File,
    path: PathBuf,
}

impl std::fmt::Debug for ConsumerLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerLock")
            .field("path", &self.path)
            .finish()
    }
}

fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic while holding the lock cannot leave the connection in a bad
    // state (transactions roll back on drop), so poisoning is ignored.
    conn.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn open_connection(path: &Path, fsync: bool) -> Result<Connection> {
    let conn = Connection::open(path)
        .with_context(|| format!("cannot open embedded store {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", if fsync { "FULL" } else { "NORMAL" })?;
    Ok(conn)
}

impl EmbeddedTransport {
    /// Opens (creating if needed) the store of a pipeline.
    pub fn open(config: &EmbeddedConfig, topology: Topology) -> Result<Self> {
        let path = config.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the store directory {}", dir.display()))?;
        }
        let conn = open_connection(&path, config.fsync)?;
        migrate(&conn).with_context(|| format!("embedded store {}", path.display()))?;
        let wakers = topology
            .route_names()
            .into_iter()
            .map(|r| (r.to_owned(), Arc::new(Notify::new())))
            .collect();
        Ok(EmbeddedTransport {
            shared: Arc::new(Shared {
                path,
                config: config.clone(),
                topology,
                writer: Mutex::new(conn),
                wakers,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Takes the exclusive consumer lock, so two hosts never consume (and
    /// double-deliver from) the same store.
    pub fn lock_consumer(&self) -> Result<ConsumerLock> {
        let path = lock_path(&self.shared.path);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "another switchyard host{} is already consuming from {}",
                    match holder.trim() {
                        "" => String::new(),
                        pid => format!(" (pid {pid})"),
                    },
                    self.shared.path.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        Ok(ConsumerLock { _file: file, path })
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| anyhow!("embedded store task failed: {e}"))?
    }

    /// Waiting messages per route.
    pub async fn depths(&self) -> Result<Vec<(String, u64)>> {
        self.blocking(|s| {
            let conn = lock(&s.writer);
            let mut stmt =
                conn.prepare("SELECT route, COUNT(*) FROM queue GROUP BY route ORDER BY route")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (route, n) = row?;
                out.push((route, n.unsigned_abs()));
            }
            Ok(out)
        })
        .await
    }

    /// Messages kept after a failure, oldest first.
    pub async fn failed(&self) -> Result<Vec<FailedMessage>> {
        self.blocking(|s| {
            let conn = lock(&s.writer);
            let mut stmt = conn.prepare(&format!(
                "SELECT route, {ENVELOPE_COLUMNS}, error_kind, error_message, error_code, error_details, backtrace, plugin, plugin_digest, failed_at_ms FROM failed ORDER BY seq"
            ))?;
            let mut rows = stmt.query([])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let route: String = row.get(0)?;
                let id = row
                    .get::<_, rusqlite::types::Value>(1)
                    .map(|v| match v {
                        rusqlite::types::Value::Text(t) => t,
                        other => format!("{other:?}"),
                    })?;
                let envelope = read_envelope(row, 1);
                let details: String = row.get(16)?;
                out.push(FailedMessage {
                    route,
                    id,
                    envelope,
                    failure: FailureRecord {
                        kind: row.get(13)?,
                        message: row.get(14)?,
                        code: row.get(15)?,
                        details: serde_json::from_str(&details).unwrap_or_default(),
                        backtrace: row.get(17)?,
                        plugin: row.get(18)?,
                        plugin_digest: row.get(19)?,
                        failed_at_ms: row.get::<_, i64>(20)?.unsigned_abs(),
                    },
                });
            }
            Ok(out)
        })
        .await
    }

    /// Removes and returns the reply sent to `address`, if one arrived.
    pub async fn take_reply(&self, address: &str) -> Result<Option<Reply>> {
        let address = address.to_owned();
        self.blocking(move |s| {
            let mut conn = lock(&s.writer);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let reply = tx
                .query_row(
                    "SELECT seq, in_reply_to, correlation_id, payload, content_type, headers, created_at_ms FROM replies WHERE address = ?1 ORDER BY seq LIMIT 1",
                    params![address],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            Reply {
                                address: address.clone(),
                                in_reply_to: r.get(1)?,
                                correlation_id: r.get(2)?,
                                payload: r.get(3)?,
                                content_type: r.get(4)?,
                                headers: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default(),
                                created_at_ms: r.get::<_, i64>(6)?.unsigned_abs(),
                            },
                        ))
                    },
                )
                .optional()?;
            if let Some((seq, _)) = &reply {
                tx.execute("DELETE FROM replies WHERE seq = ?1", params![seq])?;
            }
            tx.commit()?;
            Ok(reply.map(|(_, r)| r))
        })
        .await
    }

    fn wake(&self, routes: impl IntoIterator<Item = String>) {
        for r in routes {
            if let Some(n) = self.shared.wakers.get(&r) {
                n.notify_one();
            }
        }
    }
}

/// A message kept after its handler failed.
#[derive(Clone, Debug)]
pub struct FailedMessage {
    pub route: String,
    /// The message id as stored, even when the rest does not decode.
    pub id: String,
    /// The message, or why its stored row does not decode (it was moved here
    /// as `malformed`).
    pub envelope: Result<Envelope, String>,
    pub failure: FailureRecord,
}

fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    db.with_file_name(name)
}

fn migrate(conn: &Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        bail!(
            "the store has schema version {version}, but this switchyard understands up to {SCHEMA_VERSION}; upgrade switchyard"
        );
    }
    if version < SCHEMA_VERSION {
        conn.execute_batch(&format!(
            "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        ))?;
    }
    Ok(())
}

fn headers_json(headers: &[(String, String)]) -> String {
    // Serializing strings to JSON cannot fail.
    serde_json::to_string(headers).unwrap_or_else(|_| "[]".into())
}

/// Decodes the envelope columns starting at `first`. A row written by
/// something other than this host may not decode; the error says which
/// column is wrong.
fn read_envelope(row: &rusqlite::Row<'_>, first: usize) -> Result<Envelope, String> {
    fn col<T: rusqlite::types::FromSql>(
        row: &rusqlite::Row<'_>,
        i: usize,
        name: &str,
    ) -> Result<T, String> {
        row.get(i).map_err(|e| format!("column {name}: {e}"))
    }
    let kind: String = col(row, first + 2, "kind")?;
    let headers: String = col(row, first + 5, "headers")?;
    let attempt: i64 = col(row, first + 11, "attempt")?;
    Ok(Envelope {
        id: col(row, first, "id")?,
        message_type: col(row, first + 1, "type")?,
        kind: Kind::parse(&kind)
            .ok_or_else(|| format!("column kind: `{kind}` is neither command nor event"))?,
        payload: col(row, first + 3, "payload")?,
        content_type: col(row, first + 4, "content_type")?,
        headers: serde_json::from_str(&headers)
            .map_err(|e| format!("column headers: not a JSON array of [name, value] pairs: {e}"))?,
        correlation_id: col(row, first + 6, "correlation_id")?,
        causation_id: col(row, first + 7, "causation_id")?,
        reply_to: col(row, first + 8, "reply_to")?,
        partition_key: col(row, first + 9, "partition_key")?,
        created_at_ms: col::<i64>(row, first + 10, "created_at_ms")?.unsigned_abs(),
        attempt: u32::try_from(attempt)
            .map_err(|_| format!("column attempt: {attempt} is out of range"))?,
    })
}

/// Moves a row that does not decode from the queue to `failed`, untouched,
/// so one bad row neither stalls its route nor disappears.
fn quarantine(conn: &mut Connection, seq: i64, reason: &str) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        &format!(
            "INSERT INTO failed (route, {ENVELOPE_COLUMNS}, error_kind, error_message, error_code, error_details, backtrace, plugin, plugin_digest, failed_at_ms)
             SELECT route, {ENVELOPE_COLUMNS}, 'malformed', ?2, NULL, '[]', NULL, '', '', ?3 FROM queue WHERE seq = ?1"
        ),
        params![seq, reason, to_i64(now_ms())],
    )?;
    tx.execute("DELETE FROM queue WHERE seq = ?1", params![seq])?;
    tx.commit()
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Binds `route` and the envelope columns to parameters 1 to 13 of `stmt`;
/// the caller binds the rest and executes.
fn bind_envelope(
    stmt: &mut rusqlite::CachedStatement<'_>,
    route: &str,
    e: &Envelope,
) -> rusqlite::Result<()> {
    stmt.raw_bind_parameter(1, route)?;
    stmt.raw_bind_parameter(2, &e.id)?;
    stmt.raw_bind_parameter(3, &e.message_type)?;
    stmt.raw_bind_parameter(4, e.kind.as_str())?;
    stmt.raw_bind_parameter(5, &e.payload)?;
    stmt.raw_bind_parameter(6, &e.content_type)?;
    stmt.raw_bind_parameter(7, headers_json(&e.headers))?;
    stmt.raw_bind_parameter(8, &e.correlation_id)?;
    stmt.raw_bind_parameter(9, &e.causation_id)?;
    stmt.raw_bind_parameter(10, &e.reply_to)?;
    stmt.raw_bind_parameter(11, &e.partition_key)?;
    stmt.raw_bind_parameter(12, to_i64(e.created_at_ms))?;
    stmt.raw_bind_parameter(13, e.attempt)
}

/// Inserts one delivery of `e` into `route`'s queue.
fn insert_queued(
    tx: &Transaction<'_>,
    route: &str,
    e: &Envelope,
    now: u64,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT INTO queue (route, {ENVELOPE_COLUMNS}, enqueued_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
    ))?;
    bind_envelope(&mut stmt, route, e)?;
    stmt.raw_bind_parameter(14, to_i64(now))?;
    stmt.raw_execute()?;
    Ok(())
}

/// Keeps a failed delivery with its failure.
fn insert_failed(
    tx: &Transaction<'_>,
    route: &str,
    e: &Envelope,
    f: &FailureRecord,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT INTO failed (route, {ENVELOPE_COLUMNS}, error_kind, error_message, error_code, error_details, backtrace, plugin, plugin_digest, failed_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)"
    ))?;
    bind_envelope(&mut stmt, route, e)?;
    stmt.raw_bind_parameter(14, &f.kind)?;
    stmt.raw_bind_parameter(15, &f.message)?;
    stmt.raw_bind_parameter(16, &f.code)?;
    stmt.raw_bind_parameter(17, headers_json(&f.details))?;
    stmt.raw_bind_parameter(18, &f.backtrace)?;
    stmt.raw_bind_parameter(19, &f.plugin)?;
    stmt.raw_bind_parameter(20, &f.plugin_digest)?;
    stmt.raw_bind_parameter(21, to_i64(f.failed_at_ms))?;
    stmt.raw_execute()?;
    Ok(())
}

impl Shared {
    /// Writes one delivery per destination route; returns the routes touched.
    /// A command with no handler is kept in `failed` as unroutable rather
    /// than dropped.
    fn route_into(
        &self,
        tx: &Transaction<'_>,
        e: &Envelope,
        now: u64,
        touched: &mut Vec<String>,
    ) -> rusqlite::Result<usize> {
        let destinations = self.topology.destinations(&e.message_type);
        if destinations.is_empty() {
            if e.kind == Kind::Command {
                insert_failed(
                    tx,
                    "",
                    e,
                    &FailureRecord {
                        kind: "unroutable".into(),
                        message: format!(
                            "no plugin in this pipeline handles command {}",
                            e.message_type
                        ),
                        code: None,
                        details: Vec::new(),
                        backtrace: None,
                        plugin: String::new(),
                        plugin_digest: String::new(),
                        failed_at_ms: now,
                    },
                )?;
                tracing::warn!(message.type = %e.message_type, message.id = %e.id, "Command has no handler; kept as unroutable");
            }
            return Ok(0);
        }
        for route in destinations {
            insert_queued(tx, route, e, now)?;
            touched.push(route.clone());
        }
        Ok(destinations.len())
    }
}

#[async_trait]
impl Transport for EmbeddedTransport {
    async fn subscribe(&self, route: &str) -> Result<Box<dyn Subscription>> {
        let waker = self
            .shared
            .wakers
            .get(route)
            .cloned()
            .with_context(|| format!("route {route} is not part of this pipeline"))?;
        let reader = open_connection(&self.shared.path, self.shared.config.fsync)?;
        Ok(Box::new(EmbeddedSubscription {
            transport: self.clone(),
            route: route.to_owned(),
            reader: Arc::new(Mutex::new(reader)),
            cursor: 0,
            waker,
        }))
    }

    async fn enqueue(&self, messages: Vec<Envelope>) -> Result<usize> {
        let (stored, touched) = self
            .blocking(move |s| {
                let mut conn = lock(&s.writer);
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let now = now_ms();
                let mut stored = 0;
                let mut touched = Vec::new();
                for e in &messages {
                    stored += s.route_into(&tx, e, now, &mut touched)?;
                }
                tx.commit()?;
                Ok((stored, touched))
            })
            .await?;
        self.wake(touched);
        Ok(stored)
    }

    async fn is_idle(&self) -> Result<bool> {
        self.blocking(|s| {
            let conn = lock(&s.writer);
            let mut stmt =
                conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM queue WHERE route = ?1)")?;
            for route in s.topology.route_names() {
                let busy: bool = stmt.query_row(params![route], |r| r.get(0))?;
                if busy {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await
    }
}

impl EmbeddedTransport {
    /// Messages queued for routes this pipeline does not have (a plugin was
    /// removed from the pipeline, or another tool wrote them). They are kept,
    /// never consumed by this pipeline.
    pub async fn orphans(&self) -> Result<Vec<(String, u64)>> {
        let routes: Vec<String> = self
            .shared
            .topology
            .route_names()
            .into_iter()
            .map(str::to_owned)
            .collect();
        Ok(self
            .depths()
            .await?
            .into_iter()
            .filter(|(route, _)| !routes.contains(route))
            .collect())
    }
}

/// The consuming side of one route of the embedded store.
pub struct EmbeddedSubscription {
    transport: EmbeddedTransport,
    route: String,
    reader: Arc<Mutex<Connection>>,
    /// Highest sequence number handed out. Rows at or below it are in flight
    /// until settled; a restart begins again from zero.
    cursor: i64,
    waker: Arc<Notify>,
}

#[async_trait]
impl Subscription for EmbeddedSubscription {
    async fn receive(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let poll = self.transport.shared.config.poll_interval;
        loop {
            let reader = self.reader.clone();
            let writer = self.transport.shared.clone();
            let route = self.route.clone();
            let cursor = self.cursor;
            let limit = i64::try_from(max).unwrap_or(i64::MAX);
            let batch = tokio::task::spawn_blocking(move || -> Result<Vec<Delivery>> {
                let conn = lock(&reader);
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT seq, {ENVELOPE_COLUMNS} FROM queue WHERE route = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
                ))?;
                let mut rows = stmt.query(params![route, cursor, limit])?;
                let mut out = Vec::new();
                let mut malformed = Vec::new();
                while let Some(row) = rows.next()? {
                    let seq: i64 = row.get(0)?;
                    match read_envelope(row, 1) {
                        Ok(envelope) => out.push(Delivery {
                            envelope,
                            receipt: seq.unsigned_abs(),
                        }),
                        Err(reason) => malformed.push((seq, reason)),
                    }
                }
                drop(rows);
                drop(stmt);
                drop(conn);
                for (seq, reason) in malformed {
                    tracing::error!(route = %route, seq, error = %reason, "Malformed message in the queue; moved to the failed table");
                    quarantine(&mut lock(&writer.writer), seq, &reason)?;
                }
                Ok(out)
            })
            .await
            .map_err(|e| anyhow!("embedded store task failed: {e}"))??;
            if let Some(last) = batch.last() {
                self.cursor = to_i64(last.receipt);
                return Ok(batch);
            }
            tokio::select! {
                _ = self.waker.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    async fn release(&mut self, unsettled: Vec<Delivery>) -> Result<()> {
        if let Some(first) = unsettled.iter().map(|d| d.receipt).min() {
            self.cursor = self.cursor.min(to_i64(first).saturating_sub(1));
        }
        Ok(())
    }

    async fn settle(&mut self, batch: Vec<Settlement>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let route = self.route.clone();
        let first = batch.iter().map(|s| s.delivery.receipt).min().unwrap_or(0);
        let result = self
            .transport
            .blocking(move |s| {
                let mut conn = lock(&s.writer);
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let now = now_ms();
                let mut touched = Vec::new();
                for settlement in &batch {
                    {
                        let mut del = tx.prepare_cached("DELETE FROM queue WHERE seq = ?1")?;
                        del.execute(params![to_i64(settlement.delivery.receipt)])?;
                    }
                    match &settlement.outcome {
                        Outcome::Handled { outputs, reply } => {
                            for out in outputs {
                                s.route_into(&tx, out, now, &mut touched)?;
                            }
                            if let Some(r) = reply {
                                tx.prepare_cached(
                                    "INSERT INTO replies (address, in_reply_to, correlation_id, payload, content_type, headers, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                                )?
                                .execute(params![
                                    r.address,
                                    r.in_reply_to,
                                    r.correlation_id,
                                    r.payload,
                                    r.content_type,
                                    headers_json(&r.headers),
                                    to_i64(r.created_at_ms),
                                ])?;
                            }
                        }
                        Outcome::Failed(f) => insert_failed(&tx, &route, &settlement.delivery.envelope, f)?,
                    }
                }
                tx.commit()?;
                Ok(touched)
            })
            .await;
        match result {
            Ok(touched) => {
                self.transport.wake(touched);
                Ok(())
            }
            Err(e) => {
                // Nothing was applied: hand the batch out again.
                self.cursor = to_i64(first).saturating_sub(1).min(self.cursor);
                Err(e.context(format!("cannot settle a batch of route {}", self.route)))
            }
        }
    }
}
