//! The embedded transport: durable queues in one SQLite file.
//!
//! Each route has a queue (rows of `queue` with its name). Enqueueing an
//! event writes one row per consuming route; a command, one row for its
//! handler. Settling a batch deletes the handled rows and inserts their
//! outputs, replies and scheduled retries in a single transaction, so a crash
//! leaves either the inputs or their outcome, never neither. Messages are
//! removed only then: a killed host redelivers whatever it had not settled.
//! A delayed retry waits in `scheduled` and moves back to `queue` (with a new
//! sequence number) when it is due.
//!
//! One host consumes a store at a time (it holds `<db>.lock`); other
//! processes, such as `switchyard send`, may enqueue concurrently, and an
//! idle consumer notices them within the configured poll interval.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::Notify;

use super::{Delivery, Outcome, Refused, Settlement, Subscription, Topology, Transport};
use crate::config::EmbeddedConfig;
use crate::envelope::{Envelope, Kind, Reply, now_ms};

/// Version of the schema below, kept in SQLite's `user_version`.
///
/// 1: `queue`, `replies`, and `failed` for failed messages.
/// 2: attempt history on `queue`, delayed retries in `scheduled`; failed
///    messages go to the dead-letter store and `failed` is no longer written.
/// 3: plugin state in `state` (see `crate::state::sqlite`).
/// 4: saga instances and their steps in `saga_instances`, `saga_steps`.
/// 5: saga instances may be `failed`, counted by `(plugin, status)`; a
///    switchyard that knows only 4 would take a failed instance for a
///    corrupt one.
/// 6: the journal keeps a batch of records to a row (`journal_batches`,
///    see `crate::journal::sqlite`); a switchyard that knows only 5 would
///    write its records where this one does not look for them.
const SCHEMA_VERSION: i64 = 6;

/// Upgrades a version-1 store to version 2.
const MIGRATE_1_TO_2: &str = "
ALTER TABLE queue ADD COLUMN history TEXT NOT NULL DEFAULT '[]';
CREATE TABLE IF NOT EXISTS scheduled (
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
    history        TEXT NOT NULL,
    due_at_ms      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS scheduled_by_route ON scheduled (route, due_at_ms);
";

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
    history        TEXT NOT NULL,
    enqueued_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_by_route ON queue (route, seq);

-- Delayed retries: moved to `queue` when due.
CREATE TABLE IF NOT EXISTS scheduled (
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
    history        TEXT NOT NULL,
    due_at_ms      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS scheduled_by_route ON scheduled (route, due_at_ms);

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

/// How long a reply waits in the store for its requester. A requester
/// waits seconds; a reply nobody took in an hour never will be, and is
/// removed (at most once a minute, when another reply is stored).
pub const REPLY_TTL: Duration = Duration::from_secs(3600);
const REPLY_PRUNE_EVERY_MS: u64 = 60_000;

const ENVELOPE_COLUMNS: &str = "id, type, kind, payload, content_type, headers, correlation_id, causation_id, reply_to, partition_key, created_at_ms, attempt, history";

/// The embedded transport over one SQLite file.
#[derive(Clone)]
pub struct EmbeddedTransport {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    config: EmbeddedConfig,
    /// Who receives what; replaced when a running host's pipeline changes.
    routing: RwLock<Routing>,
    /// All writes go through this connection: SQLite has one writer anyway,
    /// and serializing here avoids busy-waiting inside SQLite.
    writer: Mutex<Connection>,
    /// Plugin calls read their state here; `settle` writes it.
    state: Arc<crate::state::sqlite::SqliteState>,
    /// When replies nobody took were last removed (ms since the epoch).
    replies_pruned_at_ms: std::sync::atomic::AtomicU64,
    /// Bumped when scheduled rows are made due sooner
    /// ([`Transport::advance_time`]): subscriptions then look again.
    rescheduled: std::sync::atomic::AtomicU64,
    /// Wakes this process's reply inboxes when a settle wrote a reply.
    replied: Notify,
}

/// How often an idle route asks SQLite whether another process wrote to
/// the store (`PRAGMA data_version`), and how often a reply inbox looks for
/// a reply another process wrote: what a message from `switchyard send`
/// waits, at most, before a running host sees it, and its reply before
/// `send --wait-reply` does.
const WATCH_INTERVAL: Duration = Duration::from_millis(2);

struct Routing {
    topology: Topology,
    /// Wakes an idle route when this process writes to its queue.
    wakers: HashMap<String, Arc<Notify>>,
}

impl Routing {
    fn new(topology: Topology, mut old: HashMap<String, Arc<Notify>>) -> Self {
        // A route that stays keeps its waker: its subscription holds it.
        let wakers = topology
            .route_names()
            .into_iter()
            .map(|r| {
                let waker = old.remove(r).unwrap_or_else(|| Arc::new(Notify::new()));
                (r.to_owned(), waker)
            })
            .collect();
        Routing { topology, wakers }
    }
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

/// What a task [`EmbeddedTransport::spawn_blocking`] started came to.
async fn joined<T>(task: tokio::task::JoinHandle<Result<T>>) -> Result<T> {
    task.await
        .map_err(|e| anyhow!("embedded store task failed: {e}"))?
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
    // A settle uses more statements than rusqlite's default of 16 keeps
    // prepared (the journal's alone are nine).
    conn.set_prepared_statement_cache_capacity(crate::journal::sqlite::STATEMENTS_KEPT);
    Ok(conn)
}

impl EmbeddedTransport {
    /// Opens (creating if needed) the store of a pipeline.
    pub fn open(config: &EmbeddedConfig, topology: Topology) -> Result<Self> {
        let path = config.path.clone();
        crate::files::create_private_file(&path)
            .with_context(|| format!("cannot create the embedded store {}", path.display()))?;
        let conn = open_connection(&path, config.fsync)?;
        migrate(&conn).with_context(|| format!("embedded store {}", path.display()))?;
        let legacy = legacy_failed(&conn)?;
        if legacy > 0 {
            tracing::warn!(
                store = %path.display(),
                messages = legacy,
                "Messages that failed under an older switchyard are kept in the store's `failed` table; they are not retried or replayed"
            );
        }
        Ok(EmbeddedTransport {
            shared: Arc::new(Shared {
                path: path.clone(),
                config: config.clone(),
                routing: RwLock::new(Routing::new(topology, HashMap::new())),
                writer: Mutex::new(conn),
                state: crate::state::sqlite::SqliteState::reader(&path),
                replies_pruned_at_ms: std::sync::atomic::AtomicU64::new(0),
                rescheduled: std::sync::atomic::AtomicU64::new(0),
                replied: Notify::new(),
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
        crate::files::create_private_file(&path)?;
        let mut file = std::fs::OpenOptions::new()
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
        // The pid only tells a second host who holds the lock: a full disk
        // must not keep this one from starting.
        if let Err(e) = file
            .set_len(0)
            .and_then(|()| write!(file, "{}", std::process::id()))
        {
            tracing::warn!(lock = %path.display(), error = %e, "Cannot write this host's pid into the consumer lock");
        }
        Ok(ConsumerLock { _file: file, path })
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T> + Send + 'static,
    {
        joined(self.spawn_blocking(f)).await
    }

    /// Starts `f` on a blocking thread at once, for the caller to do other
    /// work before it waits for it (with [`joined`]).
    fn spawn_blocking<T, F>(&self, f: F) -> tokio::task::JoinHandle<Result<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
    }

    /// Waiting messages per route (queued and scheduled for a retry).
    pub async fn pending(&self) -> Result<Vec<(String, u64)>> {
        self.blocking(|s| {
            let conn = lock(&s.writer);
            let mut stmt = conn.prepare(
                "SELECT route, COUNT(*) FROM (SELECT route FROM queue UNION ALL SELECT route FROM scheduled)
                 GROUP BY route ORDER BY route",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.unsigned_abs())))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
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

    /// Delayed retries waiting per route, with the earliest due time.
    pub async fn scheduled(&self) -> Result<Vec<(String, u64, u64)>> {
        self.blocking(|s| {
            let conn = lock(&s.writer);
            let mut stmt = conn.prepare(
                "SELECT route, COUNT(*), MIN(due_at_ms) FROM scheduled GROUP BY route ORDER BY route",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.unsigned_abs(), r.get::<_, i64>(2)?.unsigned_abs()))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Removes and returns the reply sent to `address`, if one arrived.
    pub async fn take_reply(&self, address: &str) -> Result<Option<Reply>> {
        let address = address.to_owned();
        self.blocking(move |s| {
            let mut conn = lock(&s.writer);
            // Looked for first without taking the write lock: inboxes look
            // often, and most looks find nothing.
            let waiting: bool = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM replies WHERE address = ?1)")?
                .query_row(params![address], |r| r.get(0))?;
            if !waiting {
                return Ok(None);
            }
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
        let routing = self.shared.routing();
        for r in routes {
            if let Some(n) = routing.wakers.get(&r) {
                n.notify_one();
            }
        }
    }
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
    // The journal's tables are its own, created where missing (they need
    // no schema version: records are JSON; the journal moves a file's
    // records from the layout of earlier versions itself).
    crate::journal::sqlite::create(conn)?;
    if version == 0 {
        conn.execute_batch(&format!(
            "BEGIN; {SCHEMA} {STATE} {SAGAS} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;",
            STATE = crate::state::sqlite::SCHEMA,
            SAGAS = crate::state::sqlite::SAGA_SCHEMA
        ))?;
        return Ok(());
    }
    if version == 1 {
        conn.execute_batch(&format!(
            "BEGIN; {MIGRATE_1_TO_2} PRAGMA user_version = 2; COMMIT;"
        ))?;
    }
    if version <= 2 {
        conn.execute_batch(&format!(
            "BEGIN; {STATE} PRAGMA user_version = 3; COMMIT;",
            STATE = crate::state::sqlite::SCHEMA
        ))?;
    }
    if version <= 3 {
        conn.execute_batch(&format!(
            "BEGIN; {SAGAS} PRAGMA user_version = 4; COMMIT;",
            SAGAS = crate::state::sqlite::SAGA_SCHEMA
        ))?;
    }
    if version <= 4 {
        // The saga schema's new index (its other statements find their
        // tables there already).
        conn.execute_batch(&format!(
            "BEGIN; {SAGAS} PRAGMA user_version = 5; COMMIT;",
            SAGAS = crate::state::sqlite::SAGA_SCHEMA
        ))?;
    }
    if version <= 5 {
        // The journal's tables, and its records moved into them, are
        // `journal::sqlite::create`'s work above.
        conn.execute_batch("BEGIN; PRAGMA user_version = 6; COMMIT;")?;
    }
    Ok(())
}

/// Messages that failed under schema version 1 and sit in its `failed`
/// table, which nothing reads any more.
fn legacy_failed(conn: &Connection) -> rusqlite::Result<u64> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'failed')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(0);
    }
    conn.query_row("SELECT COUNT(*) FROM failed", [], |r| r.get::<_, i64>(0))
        .map(i64::unsigned_abs)
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
    let history: String = col(row, first + 12, "history")?;
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
        history: serde_json::from_str(&history).map_err(|e| format!("column history: {e}"))?,
    })
}

/// What can be read of a row that does not decode: every column that is
/// readable as its type, the rest empty, so the dead letter keeps it.
fn salvage_envelope(row: &rusqlite::Row<'_>, first: usize) -> Envelope {
    use rusqlite::types::Value;
    let text = |i: usize| match row.get::<_, Value>(i) {
        Ok(Value::Text(t)) => t,
        Ok(Value::Blob(b)) => String::from_utf8_lossy(&b).into_owned(),
        Ok(Value::Integer(n)) => n.to_string(),
        Ok(Value::Real(f)) => f.to_string(),
        _ => String::new(),
    };
    let opt = |i: usize| row.get::<_, Option<String>>(i).ok().flatten();
    let raw_headers = text(first + 5);
    Envelope {
        id: text(first),
        message_type: text(first + 1),
        kind: Kind::parse(&text(first + 2)).unwrap_or(Kind::Event),
        payload: match row.get::<_, Value>(first + 3) {
            Ok(Value::Blob(b)) => b,
            Ok(Value::Text(t)) => t.into_bytes(),
            _ => Vec::new(),
        },
        content_type: text(first + 4),
        headers: serde_json::from_str(&raw_headers)
            .unwrap_or_else(|_| vec![("switchyard-unreadable-headers".to_owned(), raw_headers)]),
        correlation_id: opt(first + 6),
        causation_id: opt(first + 7),
        reply_to: opt(first + 8),
        partition_key: opt(first + 9),
        created_at_ms: row.get::<_, i64>(first + 10).map_or(0, i64::unsigned_abs),
        attempt: row
            .get::<_, i64>(first + 11)
            .ok()
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(1),
        history: Vec::new(),
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Binds `route` and the envelope columns to parameters 1 to 14 of `stmt`;
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
    stmt.raw_bind_parameter(13, e.attempt)?;
    // Attempt records are plain data: serializing cannot fail.
    stmt.raw_bind_parameter(
        14,
        serde_json::to_string(&e.history).unwrap_or_else(|_| "[]".into()),
    )
}

/// Inserts one delivery of `e` into `route`'s queue.
fn insert_queued(
    tx: &Transaction<'_>,
    route: &str,
    e: &Envelope,
    now: u64,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT INTO queue (route, {ENVELOPE_COLUMNS}, enqueued_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
    ))?;
    bind_envelope(&mut stmt, route, e)?;
    stmt.raw_bind_parameter(15, to_i64(now))?;
    stmt.raw_execute()?;
    Ok(())
}

/// Schedules a delayed retry of `e` on `route`.
fn insert_scheduled(
    tx: &Transaction<'_>,
    route: &str,
    e: &Envelope,
    due_at_ms: u64,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT INTO scheduled (route, {ENVELOPE_COLUMNS}, due_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
    ))?;
    bind_envelope(&mut stmt, route, e)?;
    stmt.raw_bind_parameter(15, to_i64(due_at_ms))?;
    stmt.raw_execute()?;
    Ok(())
}

/// Moves the due retries of `route` back into its queue; returns how many.
fn promote_due(conn: &mut Connection, route: &str, now: u64) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let moved = tx.execute(
        &format!(
            "INSERT INTO queue (route, {ENVELOPE_COLUMNS}, enqueued_at_ms)
             SELECT route, {ENVELOPE_COLUMNS}, ?2 FROM scheduled WHERE route = ?1 AND due_at_ms <= ?2 ORDER BY due_at_ms, seq"
        ),
        params![route, to_i64(now)],
    )?;
    tx.execute(
        "DELETE FROM scheduled WHERE route = ?1 AND due_at_ms <= ?2",
        params![route, to_i64(now)],
    )?;
    tx.commit()?;
    Ok(moved)
}

/// When the next retry of `route` is due.
fn next_due(conn: &Connection, route: &str) -> rusqlite::Result<Option<u64>> {
    conn.query_row(
        "SELECT MIN(due_at_ms) FROM scheduled WHERE route = ?1",
        params![route],
        |r| r.get::<_, Option<i64>>(0),
    )
    .map(|v| v.map(i64::unsigned_abs))
}

impl Shared {
    /// Removes replies older than [`REPLY_TTL`], at most once a minute.
    fn prune_replies(&self, tx: &rusqlite::Transaction<'_>, now: u64) -> rusqlite::Result<()> {
        use std::sync::atomic::Ordering;
        let last = self.replies_pruned_at_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < REPLY_PRUNE_EVERY_MS {
            return Ok(());
        }
        self.replies_pruned_at_ms.store(now, Ordering::Relaxed);
        let ttl = u64::try_from(REPLY_TTL.as_millis()).unwrap_or(u64::MAX);
        tx.prepare_cached("DELETE FROM replies WHERE created_at_ms < ?1")?
            .execute(params![to_i64(now.saturating_sub(ttl))])?;
        Ok(())
    }

    fn routing(&self) -> std::sync::RwLockReadGuard<'_, Routing> {
        // Routing is replaced whole under the lock; a panic cannot leave it
        // half-written.
        self.routing
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The routes of the pipeline as it is now.
    fn route_names(&self) -> Vec<String> {
        self.routing()
            .topology
            .route_names()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// Writes one delivery per destination route; records the routes
    /// touched. An event nobody consumes is dropped (events may have zero
    /// consumers); a command with no handler is refused, never dropped.
    fn route_into(
        &self,
        tx: &Transaction<'_>,
        e: &Envelope,
        now: u64,
        touched: &mut Vec<String>,
    ) -> Result<usize> {
        let routing = self.routing();
        let destinations = routing.topology.destinations(&e.message_type);
        if destinations.is_empty() && e.kind == Kind::Command {
            bail!(
                "no plugin in this pipeline handles command {} (message {})",
                e.message_type,
                e.id
            );
        }
        for route in destinations {
            insert_queued(tx, route, e, now)?;
            touched.push(route.clone());
        }
        Ok(destinations.len())
    }
}

/// Waits for a reply in the store's `replies` table.
struct EmbeddedInbox {
    transport: EmbeddedTransport,
    address: String,
}

#[async_trait]
impl super::ReplyInbox for EmbeddedInbox {
    fn address(&self) -> &str {
        &self.address
    }

    async fn next_reply(&mut self, deadline: tokio::time::Instant) -> Result<Option<Reply>> {
        let shared = self.transport.shared.clone();
        loop {
            // Armed before looking, so a reply settled in between still
            // wakes this wait.
            let replied = shared.replied.notified();
            tokio::pin!(replied);
            replied.as_mut().enable();
            if let Some(reply) = self.transport.take_reply(&self.address).await? {
                return Ok(Some(reply));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            // A host in this process wakes the wait; one in another
            // process is seen at the next look.
            tokio::select! {
                () = &mut replied => {}
                () = tokio::time::sleep_until(deadline.min(now + WATCH_INTERVAL)) => {}
            }
        }
    }
}

#[async_trait]
impl Transport for EmbeddedTransport {
    async fn set_routing(&self, pipeline: &crate::config::Pipeline) -> Result<()> {
        let topology = Topology::of(pipeline);
        let mut routing = self
            .shared
            .routing
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = std::mem::take(&mut routing.wakers);
        *routing = Routing::new(topology, old);
        Ok(())
    }

    async fn advance_time(&self, by: Duration) -> Result<()> {
        let by = to_i64(u64::try_from(by.as_millis()).unwrap_or(u64::MAX));
        self.blocking(move |s| {
            let mut conn = lock(&s.writer);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "UPDATE scheduled SET due_at_ms = max(due_at_ms - ?1, 0)",
                params![by],
            )?;
            tx.execute(
                "UPDATE saga_timeouts SET due_at_ms = max(due_at_ms - ?1, 0)",
                params![by],
            )?;
            tx.commit()?;
            s.rescheduled
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        })
        .await?;
        let routes: Vec<String> = self.shared.routing().wakers.keys().cloned().collect();
        self.wake(routes);
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn state(&self) -> Option<Arc<dyn crate::state::Reader>> {
        Some(self.shared.state.clone())
    }

    fn location(&self) -> String {
        self.shared.path.display().to_string()
    }

    async fn start_consuming(&self) -> Result<Box<dyn std::any::Any + Send + Sync>> {
        Ok(Box::new(self.lock_consumer()?))
    }

    async fn startup_warnings(&self) -> Result<Vec<String>> {
        Ok(self
            .orphans()
            .await?
            .into_iter()
            .map(|(route, n)| {
                format!("{n} messages are queued for route {route}, which this pipeline does not have; they stay in the store")
            })
            .collect())
    }

    async fn reply_inbox(&self) -> Result<Box<dyn super::ReplyInbox>> {
        Ok(Box::new(EmbeddedInbox {
            transport: self.clone(),
            address: format!("cli:{}", crate::envelope::new_id()),
        }))
    }

    async fn subscribe(&self, route: &str) -> Result<Box<dyn Subscription>> {
        let waker = self
            .shared
            .routing()
            .wakers
            .get(route)
            .cloned()
            .with_context(|| format!("route {route} is not part of this pipeline"))?;
        let reader = open_connection(&self.shared.path, self.shared.config.fsync)?;
        let next_due = next_due(&reader, route)?;
        Ok(Box::new(EmbeddedSubscription {
            transport: self.clone(),
            route: route.to_owned(),
            reader: Arc::new(Mutex::new(reader)),
            cursor: 0,
            next_due,
            rescheduled: self
                .shared
                .rescheduled
                .load(std::sync::atomic::Ordering::Relaxed),
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

    async fn enqueue_to(&self, route: &str, messages: Vec<Envelope>) -> Result<()> {
        if !self.shared.routing().wakers.contains_key(route) {
            bail!("route {route} is not part of this pipeline");
        }
        let route = route.to_owned();
        let woken = route.clone();
        self.blocking(move |s| {
            let mut conn = lock(&s.writer);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = now_ms();
            for e in &messages {
                insert_queued(&tx, &route, e, now)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await?;
        self.wake([woken]);
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        self.blocking(|s| {
            lock(&s.writer).query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    }

    async fn is_idle(&self) -> Result<bool> {
        self.blocking(|s| {
            let conn = lock(&s.writer);
            // A saga timeout that is not due yet is not work waiting: it
            // fires when it is due, whoever runs then (a retry of its
            // message, attempt 2 on, is).
            let mut stmt = conn.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM queue WHERE route = ?1)
                     OR EXISTS (SELECT 1 FROM scheduled s WHERE s.route = ?1
                                AND (s.due_at_ms <= ?2 OR s.attempt > 1
                                     OR NOT EXISTS (SELECT 1 FROM saga_timeouts t
                                                    WHERE t.plugin = s.route AND t.id = s.id)))",
            )?;
            let now = to_i64(now_ms());
            for route in s.route_names() {
                let busy: bool = stmt.query_row(params![route, now], |r| r.get(0))?;
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
        let routes = self.shared.route_names();
        Ok(self
            .pending()
            .await?
            .into_iter()
            .filter(|(route, _)| !routes.contains(route))
            .collect())
    }
}

impl EmbeddedSubscription {
    /// Waits up to `wait` for something to read: a write to this route by
    /// this process (its waker), or a commit by another process (`PRAGMA
    /// data_version` changes; asked every [`WATCH_INTERVAL`]).
    async fn wait_for_work(&mut self, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        let seen = self.data_version();
        loop {
            let now = tokio::time::Instant::now();
            if now >= until {
                return;
            }
            tokio::select! {
                () = self.waker.notified() => return,
                () = tokio::time::sleep_until(until.min(now + WATCH_INTERVAL)) => {}
            }
            if self.data_version() != seen {
                return;
            }
        }
    }

    /// The reader's `PRAGMA data_version`: it changes when a connection
    /// other than the reader commits. `None` when it cannot be read (the
    /// route then waits out its poll interval).
    fn data_version(&self) -> Option<i64> {
        lock(&self.reader)
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .ok()
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
    /// When this route's earliest delayed retry is due. Only this route
    /// schedules its retries, so it always knows.
    next_due: Option<u64>,
    /// The store's `rescheduled` count this subscription last saw.
    rescheduled: u64,
    waker: Arc<Notify>,
}

#[async_trait]
impl Subscription for EmbeddedSubscription {
    async fn receive(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let poll = self.transport.shared.config.poll_interval;
        loop {
            let rescheduled = self
                .transport
                .shared
                .rescheduled
                .load(std::sync::atomic::Ordering::Relaxed);
            if rescheduled != self.rescheduled {
                self.rescheduled = rescheduled;
                self.next_due = Some(0);
            }
            if self.next_due.is_some_and(|due| due <= now_ms()) {
                let route = self.route.clone();
                self.next_due = self
                    .transport
                    .blocking(move |s| {
                        let mut conn = lock(&s.writer);
                        let moved = promote_due(&mut conn, &route, now_ms())?;
                        tracing::debug!(route = %route, moved, "Delayed retries are due");
                        Ok(next_due(&conn, &route)?)
                    })
                    .await?;
            }
            let reader = self.reader.clone();
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
                while let Some(row) = rows.next()? {
                    let seq: i64 = row.get(0)?;
                    let (envelope, malformed) = match read_envelope(row, 1) {
                        Ok(envelope) => (envelope, None),
                        Err(reason) => (salvage_envelope(row, 1), Some(reason)),
                    };
                    out.push(Delivery {
                        envelope,
                        receipt: seq.unsigned_abs(),
                        malformed,
                        origin: None,
                    });
                }
                Ok(out)
            })
            .await
            .map_err(|e| anyhow!("embedded store task failed: {e}"))??;
            if let Some(last) = batch.last() {
                self.cursor = to_i64(last.receipt);
                return Ok(batch);
            }
            let wait = match self.next_due {
                Some(due) => poll.min(Duration::from_millis(due.saturating_sub(now_ms()))),
                None => poll,
            };
            self.wait_for_work(wait).await;
        }
    }

    async fn release(&mut self, unsettled: Vec<Delivery>) -> Result<()> {
        if let Some(first) = unsettled.iter().map(|d| d.receipt).min() {
            self.cursor = self.cursor.min(to_i64(first).saturating_sub(1));
        }
        Ok(())
    }

    async fn settle(&mut self, mut batch: Vec<Settlement>) -> Result<Vec<Refused>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let route = self.route.clone();
        let first = batch.iter().map(|s| s.delivery.receipt).min().unwrap_or(0);
        // Delayed retries and saga timeouts both wait in `scheduled`.
        let earliest_retry = batch
            .iter()
            .flat_map(|s| match &s.outcome {
                Outcome::Retry { not_before_ms, .. } => vec![*not_before_ms],
                Outcome::Handled {
                    saga: Some(step), ..
                } if !step.completed => step.timeouts.iter().map(|t| t.due_ms).collect(),
                _ => Vec::new(),
            })
            .min();
        let replies = batch
            .iter()
            .any(|s| matches!(&s.outcome, Outcome::Handled { reply: Some(_), .. }));
        // The journal's records are written as rows here, on this thread,
        // while the settle transaction deletes, applies and routes on its
        // own; it adds the rows last.
        let records: Vec<crate::journal::Record> = batch
            .iter_mut()
            .filter_map(|s| s.journal.take())
            .map(|r| *r)
            .collect();
        let journaled = !records.is_empty();
        let (rows_in, rows) = std::sync::mpsc::sync_channel(1);
        let task = self
            .transport
            .spawn_blocking(move |s| {
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
                        Outcome::Handled {
                            outputs,
                            reply,
                            state,
                            saga,
                        } => {
                            crate::state::sqlite::apply(&tx, &route, state, now)?;
                            if let Some(step) = saga {
                                if step.completed {
                                    // Its pending timeouts will not fire:
                                    // they wait no longer.
                                    tx.prepare_cached(
                                        "DELETE FROM scheduled WHERE route = ?1 AND attempt <= 1 AND id IN
                                           (SELECT id FROM saga_timeouts WHERE plugin = ?1 AND instance = ?2)",
                                    )?
                                    .execute(params![route, step.instance])?;
                                }
                                crate::state::sqlite::apply_step(&tx, &route, step)?;
                                // A timeout fires as a delayed message to
                                // this route; one whose instance completed
                                // before it came due is taken out above,
                                // or dropped when it arrives.
                                if !step.completed {
                                    for t in &step.timeouts {
                                        insert_scheduled(
                                            &tx,
                                            &route,
                                            &t.message(&step.instance),
                                            t.due_ms,
                                        )?;
                                    }
                                }
                            }
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
                                s.prune_replies(&tx, now)?;
                            }
                        }
                        Outcome::Retry { message, not_before_ms } => {
                            insert_scheduled(&tx, &route, message, *not_before_ms)?;
                        }
                        Outcome::DeadLettered {
                            fault, saga_failed, ..
                        } => {
                            if let Some(f) = fault {
                                s.route_into(&tx, f, now, &mut touched)?;
                            }
                            if let Some((instance, version)) = saga_failed {
                                crate::state::sqlite::mark_failed(
                                    &tx, &route, instance, *version, now,
                                )?;
                            }
                        }
                    }
                    // A timeout whose message is settled for good is no
                    // longer pending (a step that handled it deleted it
                    // already).
                    if !matches!(settlement.outcome, Outcome::Retry { .. })
                        && let Some(id) = crate::saga::fired_timeout(&settlement.delivery.envelope)
                    {
                        crate::state::sqlite::forget_timeout(&tx, &route, id)?;
                    }
                }
                if journaled {
                    let encoded: serde_json::Result<crate::journal::sqlite::Encoded> = rows
                        .recv()
                        .map_err(|_| anyhow!("the journal's rows were not written"))?;
                    encoded
                        .map_err(|e| anyhow!("cannot write the journal's records: {e}"))?
                        .insert(&tx)?;
                }
                tx.commit()?;
                Ok(touched)
            });
        if journaled {
            // The channel holds one: this never waits, and nothing awaits
            // between the start of the transaction and this.
            let encoded = crate::journal::sqlite::encode(records);
            // It fails only when the transaction failed before it took
            // them: its error says why.
            let _ = rows_in.send(encoded);
        }
        let result = joined(task).await;
        match result {
            Ok(touched) => {
                self.transport.wake(touched);
                if replies {
                    self.transport.shared.replied.notify_waiters();
                }
                if let Some(due) = earliest_retry {
                    self.next_due = Some(self.next_due.map_or(due, |d| d.min(due)));
                }
                // The store takes whatever the limits let through.
                Ok(Vec::new())
            }
            Err(e) => {
                // Nothing was applied: hand the batch out again.
                self.cursor = to_i64(first).saturating_sub(1).min(self.cursor);
                Err(e.context(format!("cannot settle a batch of route {}", self.route)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_nobody_took_are_removed_after_an_hour() {
        let dir = tempfile::tempdir().unwrap();
        let config = EmbeddedConfig {
            path: dir.path().join("store.db"),
            fsync: false,
            batch_size: 16,
            poll_interval: Duration::from_millis(10),
        };
        let t = EmbeddedTransport::open(&config, Topology::default()).unwrap();
        let now = now_ms();
        let hour = u64::try_from(REPLY_TTL.as_millis()).unwrap();
        let mut conn = lock(&t.shared.writer);
        let tx = conn.transaction().unwrap();
        for (address, at) in [("old", now - hour - 1_000), ("new", now - 1_000)] {
            tx.execute(
                "INSERT INTO replies (address, in_reply_to, correlation_id, payload, content_type, headers, created_at_ms) VALUES (?1, 'c', 'k', x'', 'application/json', '[]', ?2)",
                params![address, to_i64(at)],
            )
            .unwrap();
        }
        t.shared.prune_replies(&tx, now).unwrap();
        let left: Vec<String> = tx
            .prepare("SELECT address FROM replies")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(left, ["new"]);
        // At most once a minute.
        tx.execute(
            "INSERT INTO replies (address, in_reply_to, correlation_id, payload, content_type, headers, created_at_ms) VALUES ('older', 'c', 'k', x'', 'application/json', '[]', 0)",
            [],
        )
        .unwrap();
        t.shared.prune_replies(&tx, now + 1).unwrap();
        let n: i64 = tx
            .query_row("SELECT COUNT(*) FROM replies", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
    }
}
