//! The journal in a SQLite file: the embedded transport's own (written in
//! its settle transaction), or a file of its own for a broker host.
//!
//! Records are stored a batch to a row: the records one settle (or one
//! write of a broker host's writer) keeps, at most [`BATCH`] to a row, as
//! lines of JSON under a header line that holds what they share (the
//! plugin, its version and digest, the host), which their lines leave out.
//! A record is numbered (`seq`) without gaps across batches; a batch row's
//! key is its first record's number. The ids that find records (message,
//! causation, correlation, and the span attributes plugins set) are rows
//! of tables of their own keyed by id and record number, so a reader finds
//! the numbers through an index and reads only the lines it needs. One row
//! and a few index entries per batch, instead of a row and three index
//! entries per record, is what keeps the journal's cost on the embedded
//! transport's settle small (`docs/benchmarks.md`). Adding records is two
//! steps: [`encode`] writes the rows' bodies and needs no connection, so
//! it can run beside the transaction; [`Encoded::insert`] numbers and adds
//! them in it.

use std::borrow::Cow;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use super::{Record, Store};

/// The journal's tables. Each index table is keyed by its id and the
/// record's number, so finding a message's records reads one range of it.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS journal_batches (
    -- The number of the batch's first record; the others follow it.
    seq         INTEGER PRIMARY KEY,
    records     INTEGER NOT NULL,
    first_at_ms INTEGER NOT NULL,
    last_at_ms  INTEGER NOT NULL,
    -- A header line of what the records share, then a line per record.
    body        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS journal_messages (
    message_id TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    PRIMARY KEY (message_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_causes (
    causation_id TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    PRIMARY KEY (causation_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_flows (
    correlation_id TEXT NOT NULL,
    seq            INTEGER NOT NULL,
    PRIMARY KEY (correlation_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_attributes (
    seq   INTEGER NOT NULL,
    name  TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (seq, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS journal_by_attribute ON journal_attributes (name, value, seq);
CREATE TABLE IF NOT EXISTS journal_floor (
    -- One row: the end of the newest batch pruning read (past every
    -- record it removed), so a journal pruned empty does not number its
    -- next records from 1 again.
    id   INTEGER PRIMARY KEY CHECK (id = 0),
    next INTEGER NOT NULL
);
";

/// Where numbering has reached: past the newest batch, or where pruning
/// left it (NULL in a journal that never numbered a record).
macro_rules! numbered {
    () => {
        "(SELECT seq + records FROM journal_batches ORDER BY seq DESC LIMIT 1),
    (SELECT next FROM journal_floor WHERE id = 0)"
    };
}

/// The number the next record gets.
const NEXT: &str = concat!("coalesce(", numbered!(), ", 1)");

/// [`NEXT`] as a statement of its own, prepared once per connection.
const SELECT_NEXT: &str = concat!("SELECT coalesce(", numbered!(), ", 1)");

/// The table an earlier version kept a row per record in. It stays, so
/// that a host of that version still running on the file (or, for a
/// broker host's own file, started on it again) goes on settling; this
/// version moves what it finds there the next time it opens the file.
const LEGACY: &str = "
CREATE TABLE IF NOT EXISTS journal (
    seq            INTEGER PRIMARY KEY,
    at_ms          INTEGER NOT NULL,
    message_id     TEXT NOT NULL,
    correlation_id TEXT,
    causation_id   TEXT,
    record         TEXT NOT NULL
);
";

/// A row that holds the earlier version's numbering far below this
/// version's: SQLite numbers a new row one past the highest, so what an
/// earlier version writes (its attributes included) lands on negative
/// numbers, clear of this version's records. Its time keeps an earlier
/// version's pruning by age from removing it.
const MARK: i64 = -(1 << 62);

/// Numbers below this are the earlier version's.
const BELOW: i64 = -(1 << 61);

/// An earlier version's records become batches of one (their header says
/// nothing, their line is the whole record), numbered after this
/// version's newest record, or under their own numbers in a file this
/// version has not numbered anything in yet.
const FROM_ROWS: [&str; 4] = [
    "INSERT INTO journal_batches (seq, records, first_at_ms, last_at_ms, body)
        SELECT seq + ?1, 1, at_ms, at_ms, '{}' || char(10) || record FROM journal WHERE seq <> ?2",
    "INSERT OR IGNORE INTO journal_messages (message_id, seq)
        SELECT message_id, seq + ?1 FROM journal WHERE seq <> ?2",
    "INSERT OR IGNORE INTO journal_causes (causation_id, seq)
        SELECT causation_id, seq + ?1 FROM journal WHERE seq <> ?2 AND causation_id IS NOT NULL",
    "INSERT OR IGNORE INTO journal_flows (correlation_id, seq)
        SELECT correlation_id, seq + ?1 FROM journal WHERE seq <> ?2 AND correlation_id IS NOT NULL",
];

/// Their attributes move with them, in two steps through negative
/// numbers above [`BELOW`], so that no move lands on an attribute not
/// moved yet; what is left below [`BELOW`] belonged to records the
/// earlier version pruned itself.
const MOVE_ATTRIBUTES: [&str; 3] = [
    "UPDATE journal_attributes SET seq = -(seq + ?1) WHERE seq IN (SELECT seq FROM journal WHERE seq <> ?2)",
    "UPDATE OR REPLACE journal_attributes SET seq = -seq WHERE seq < 0 AND seq >= ?1",
    "DELETE FROM journal_attributes WHERE seq < ?1",
];

/// Whether the earlier version's table holds records.
fn holds_rows(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM journal WHERE seq <> ?1)",
        params![MARK],
        |r| r.get(0),
    )
}

/// Creates the journal's tables where missing, and moves the records of a
/// file an earlier version wrote into them.
pub fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    conn.execute_batch(LEGACY)?;
    let marked = |c: &Connection| {
        c.query_row(
            "SELECT EXISTS (SELECT 1 FROM journal WHERE seq = ?1)",
            params![MARK],
            |r| r.get::<_, bool>(0),
        )
    };
    if marked(conn)? && !holds_rows(conn)? {
        return Ok(());
    }
    // Checked again inside the write lock: another process may have moved
    // them meanwhile.
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    if holds_rows(&tx)? {
        let numbered: Option<i64> =
            tx.query_row(concat!("SELECT coalesce(", numbered!(), ")"), [], |r| {
                r.get(0)
            })?;
        let oldest: i64 = tx.query_row(
            "SELECT min(seq) FROM journal WHERE seq <> ?1",
            params![MARK],
            |r| r.get(0),
        )?;
        let offset = match numbered {
            Some(next) => next.saturating_sub(oldest),
            // Nothing numbered yet, and the earlier version's own numbers.
            None if oldest > 0 => 0,
            None => 1i64.saturating_sub(oldest),
        };
        for statement in FROM_ROWS {
            tx.execute(statement, params![offset, MARK])?;
        }
        if offset != 0 {
            let [down, up, left] = MOVE_ATTRIBUTES;
            tx.execute(down, params![offset, MARK])?;
            tx.execute(up, params![BELOW])?;
            tx.execute(left, params![BELOW])?;
        }
        tx.execute("DELETE FROM journal WHERE seq <> ?1", params![MARK])?;
    }
    if !marked(&tx)? {
        tx.execute(
            "INSERT INTO journal (seq, at_ms, message_id, record) VALUES (?1, ?2, '', 'null')",
            params![MARK, i64::MAX],
        )?;
    }
    tx.commit()
}

/// Prepared statements a connection to a file the journal is written in
/// keeps (its own, and the embedded transport's, which settles into it).
pub const STATEMENTS_KEPT: usize = 64;

/// Records to a batch row, at most: a reader of one record reads its row.
const BATCH: usize = 256;

/// Payload bytes to a batch row, about: records with large payloads get
/// rows of fewer records, so that reading one stays cheap.
const ROW_PAYLOAD_BYTES: usize = 256 * 1024;

/// The payload bytes a record's line holds.
fn payload_bytes(r: &Record) -> usize {
    r.payload.as_ref().map_or(0, |p| {
        p.text.as_ref().map_or(0, String::len) + p.hex.as_ref().map_or(0, String::len)
    })
}

/// Records removed per transaction when pruning, so a settle sharing the
/// file never waits long.
const PRUNE_CHUNK: i64 = 5000;

/// One row of records: its first number, how many, their times, the body.
const INSERT_BATCH: &str = "INSERT INTO journal_batches (seq, records, first_at_ms, last_at_ms, body) VALUES (?1, ?2, ?3, ?4, ?5)";

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn count_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// What the records of a batch share, said once in its header line and
/// left out of their own lines.
#[derive(Default, Serialize, Deserialize)]
struct Header {
    #[serde(default)]
    plugin: String,
    #[serde(default)]
    plugin_version: String,
    #[serde(default)]
    plugin_digest: String,
    #[serde(default)]
    host: String,
}

impl Header {
    fn of(r: &Record) -> Header {
        Header {
            plugin: r.plugin.clone(),
            plugin_version: r.plugin_version.clone(),
            plugin_digest: r.plugin_digest.clone(),
            host: r.host.clone(),
        }
    }

    /// Whether a row whose header is made of `head` can hold `r`: its
    /// lines can leave out no empty field the header has a value for.
    fn fits(head: &Record, r: &Record) -> bool {
        [
            (&head.plugin, &r.plugin),
            (&head.plugin_version, &r.plugin_version),
            (&head.plugin_digest, &r.plugin_digest),
            (&head.host, &r.host),
        ]
        .iter()
        .all(|(shared, own)| !own.is_empty() || shared.is_empty())
    }

    /// Each field of `r` the header says, beside the header's value.
    fn pairs<'a>(&'a self, r: &'a mut Record) -> [(&'a mut String, &'a String); 4] {
        [
            (&mut r.plugin, &self.plugin),
            (&mut r.plugin_version, &self.plugin_version),
            (&mut r.plugin_digest, &self.plugin_digest),
            (&mut r.host, &self.host),
        ]
    }

    /// Takes out of `r` the fields this header holds (a record's line
    /// leaves out the empty ones).
    fn take_shared(&self, r: &mut Record) {
        for (field, shared) in self.pairs(r) {
            if field == shared {
                field.clear();
            }
        }
    }

    /// Fills in what a record's line left out.
    fn fill(&self, r: &mut Record) {
        for (field, shared) in self.pairs(r) {
            if field.is_empty() {
                field.clone_from(shared);
            }
        }
    }
}

/// Records made ready to be added: their rows' bodies written, which
/// needs no connection, so that the embedded transport writes them while
/// its settle transaction does the rest of its work ([`encode`], then
/// [`Encoded::insert`] in the transaction).
pub struct Encoded {
    rows: Vec<Row>,
}

/// One batch row to be: its body, and its records for their ids and
/// attributes (without what the header holds, and without their payloads,
/// which the body has).
struct Row {
    body: String,
    records: Vec<Record>,
    first_at: u64,
    last_at: u64,
}

/// Writes the rows the records go into: a batch row per [`BATCH`] records
/// at most, fewer when their payloads are large or a record does not fit
/// the row's header.
pub fn encode(records: impl IntoIterator<Item = Record>) -> serde_json::Result<Encoded> {
    let mut rows = Vec::new();
    let mut chunk: Vec<Record> = Vec::new();
    let mut payloads = 0;
    for r in records {
        let size = payload_bytes(&r);
        let full = chunk.len() == BATCH || payloads + size > ROW_PAYLOAD_BYTES;
        // A line leaves out an empty field too, so a record with one where
        // the header has a value starts a row of its own.
        if !chunk.is_empty() && (full || chunk.first().is_some_and(|head| !Header::fits(head, &r)))
        {
            rows.push(Row::of(std::mem::take(&mut chunk))?);
            payloads = 0;
        }
        payloads += size;
        chunk.push(r);
    }
    if !chunk.is_empty() {
        rows.push(Row::of(chunk)?);
    }
    Ok(Encoded { rows })
}

impl Row {
    fn of(mut records: Vec<Record>) -> serde_json::Result<Row> {
        let header = records.first().map(Header::of).unwrap_or_default();
        let mut body = Vec::with_capacity(records.len() * 320);
        serde_json::to_writer(&mut body, &header)?;
        let (mut first_at, mut last_at) = (u64::MAX, 0);
        for r in &mut records {
            first_at = first_at.min(r.at_ms);
            last_at = last_at.max(r.at_ms);
            body.push(b'\n');
            header.take_shared(r);
            serde_json::to_writer(&mut body, &*r)?;
            // The line has it; the row keeps the rest for the indexes.
            r.payload = None;
        }
        // serde_json writes UTF-8; this only checks it.
        let body = String::from_utf8(body).map_err(|e| {
            serde_json::Error::io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })?;
        Ok(Row {
            body,
            records,
            first_at,
            last_at,
        })
    }

    /// Adds the row, its first record numbered `first`.
    fn insert(&self, conn: &Connection, first: i64) -> rusqlite::Result<()> {
        let mut attribute = conn.prepare_cached(
            "INSERT OR REPLACE INTO journal_attributes (seq, name, value) VALUES (?1, ?2, ?3)",
        )?;
        let numbered = || (first..).zip(self.records.iter());
        for (seq, r) in numbered() {
            for (name, value) in &r.attributes {
                attribute.execute(params![seq, name, value])?;
            }
        }
        let [messages, causes, flows] = &*INDEXES;
        messages.add(
            conn,
            numbered().map(|(seq, r)| (r.message_id.as_str(), seq)),
        )?;
        causes.add(
            conn,
            numbered().filter_map(|(seq, r)| Some((r.causation_id.as_deref()?, seq))),
        )?;
        flows.add(
            conn,
            numbered().filter_map(|(seq, r)| Some((r.correlation_id.as_deref()?, seq))),
        )?;
        conn.prepare_cached(INSERT_BATCH)?.execute(params![
            first,
            count_i64(self.records.len()),
            to_i64(self.first_at),
            to_i64(self.last_at),
            self.body
        ])?;
        Ok(())
    }
}

impl Encoded {
    /// Adds the rows, in the caller's transaction, numbering their records
    /// after the newest, and their ids to the index tables.
    pub fn insert(&self, conn: &Connection) -> rusqlite::Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut next: i64 = conn
            .prepare_cached(SELECT_NEXT)?
            .query_row([], |r| r.get(0))?;
        for row in &self.rows {
            row.insert(conn, next)?;
            next = next.saturating_add(count_i64(row.records.len()));
        }
        Ok(())
    }
}

/// Id-index entries a statement adds at most: one statement for many
/// entries spares SQLite opening the index and starting a statement for
/// each record, the larger part of an entry's cost in the settle.
const INDEX_ROWS: usize = 64;

/// The statements that add entries to one id index: for a full chunk of
/// [`INDEX_ROWS`] entries, and for one.
struct Index {
    chunk: String,
    one: String,
}

impl Index {
    fn new(table: &str, column: &str) -> Index {
        let insert = format!("INSERT OR IGNORE INTO {table} ({column}, seq) VALUES ");
        let rows = vec!["(?, ?)"; INDEX_ROWS].join(", ");
        Index {
            chunk: format!("{insert}{rows}"),
            one: format!("{insert}(?, ?)"),
        }
    }

    /// Adds `(id, seq)` entries, in the caller's transaction.
    fn add<'a>(
        &self,
        conn: &Connection,
        entries: impl Iterator<Item = (&'a str, i64)>,
    ) -> rusqlite::Result<()> {
        let mut entries = entries.peekable();
        let mut pending: Vec<(&str, i64)> = Vec::with_capacity(INDEX_ROWS);
        while entries.peek().is_some() {
            pending.clear();
            pending.extend(entries.by_ref().take(INDEX_ROWS));
            if pending.len() == INDEX_ROWS {
                let mut stmt = conn.prepare_cached(&self.chunk)?;
                for (i, (id, seq)) in pending.iter().enumerate() {
                    stmt.raw_bind_parameter(2 * i + 1, id)?;
                    stmt.raw_bind_parameter(2 * i + 2, seq)?;
                }
                stmt.raw_execute()?;
            } else {
                let mut stmt = conn.prepare_cached(&self.one)?;
                for (id, seq) in &pending {
                    stmt.execute(params![id, seq])?;
                }
            }
        }
        Ok(())
    }
}

/// The three id indexes: by message, by cause, by flow.
static INDEXES: std::sync::LazyLock<[Index; 3]> = std::sync::LazyLock::new(|| {
    [
        Index::new("journal_messages", "message_id"),
        Index::new("journal_causes", "causation_id"),
        Index::new("journal_flows", "correlation_id"),
    ]
});

/// A batch row read back: its header, and where each record's line is.
struct Batch {
    first: i64,
    header: Header,
    body: String,
    /// The header line, kept as written: a row pruning writes again keeps
    /// it whole, read or not.
    head: Range<usize>,
    lines: Vec<Range<usize>>,
}

impl Batch {
    fn read(first: i64, body: String) -> Batch {
        let mut lines = Vec::new();
        let mut start = 0;
        for (i, b) in body.bytes().enumerate() {
            if b == b'\n' {
                lines.push(start..i);
                start = i + 1;
            }
        }
        lines.push(start..body.len());
        let head = lines.remove(0);
        let header = serde_json::from_str(&body[head.clone()]).unwrap_or_else(|e| {
            tracing::warn!(seq = first, error = %e, "A journal batch's header cannot be read; its records lack the plugin and host");
            Header::default()
        });
        Batch {
            first,
            header,
            body,
            head,
            lines,
        }
    }

    /// The line of record `seq`, when this batch holds it.
    fn line(&self, seq: i64) -> Option<&str> {
        let i = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.lines.get(i).map(|r| &self.body[r.clone()])
    }

    fn record(&self, seq: i64) -> Option<Record> {
        let line = self.line(seq)?;
        match serde_json::from_str::<Record>(line) {
            Ok(mut r) => {
                self.header.fill(&mut r);
                Some(r)
            }
            Err(e) => {
                tracing::warn!(seq, error = %e, "A journal record cannot be read; skipped");
                None
            }
        }
    }

    fn end(&self) -> i64 {
        self.first.saturating_add(count_i64(self.lines.len()))
    }
}

/// The records numbered `seqs`, in that order. A number no batch holds
/// (pruned meanwhile) and a record this version cannot read are skipped
/// rather than hide the rest.
fn records_at(conn: &Connection, seqs: &[i64]) -> Result<Vec<Record>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, body FROM journal_batches WHERE seq <= ?1 ORDER BY seq DESC LIMIT 1",
    )?;
    let mut batch: Option<Batch> = None;
    let mut records = Vec::with_capacity(seqs.len());
    for &seq in seqs {
        let held = batch
            .as_ref()
            .is_some_and(|b| b.first <= seq && seq < b.end());
        if !held {
            batch = stmt
                .query_row(params![seq], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
                .map(|(first, body)| Batch::read(first, body));
        }
        if let Some(r) = batch.as_ref().and_then(|b| b.record(seq)) {
            records.push(r);
        }
    }
    Ok(records)
}

/// The record numbers a query returns (its one column).
fn seqs(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<Vec<i64>> {
    conn.prepare_cached(sql)?
        .query_map(params, |r| r.get(0))?
        .collect()
}

/// How many records the journal holds, and the newest's number, read from
/// the two ends of the batches rather than by a scan: numbers have no gaps
/// but those pruning left at the start.
fn count_and_newest(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    let (oldest, newest): (i64, i64) = conn.query_row(
        &format!("SELECT coalesce((SELECT min(seq) FROM journal_batches), {NEXT}), {NEXT} - 1"),
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((
        newest.saturating_sub(oldest).saturating_add(1).max(0),
        newest,
    ))
}

/// What pruning reads of a record's line: its time and the ids its index
/// entries are under.
#[derive(Deserialize)]
struct Keys<'a> {
    #[serde(default)]
    at_ms: u64,
    #[serde(borrow, default)]
    message_id: Cow<'a, str>,
    #[serde(borrow, default)]
    causation_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    correlation_id: Option<Cow<'a, str>>,
}

/// The number of the first record at or after `before_ms`, or one past
/// the newest. Records come in time order, near enough: everything before
/// it is older.
fn first_since(conn: &Connection, before_ms: i64) -> Result<i64> {
    let found: Option<(i64, String)> = conn
        .query_row(
            "SELECT seq, body FROM journal_batches WHERE last_at_ms >= ?1 ORDER BY seq LIMIT 1",
            params![before_ms],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((first, body)) = found else {
        return Ok(count_and_newest(conn)?.1.saturating_add(1));
    };
    let batch = Batch::read(first, body);
    let inside = (first..batch.end()).find(|&seq| {
        batch
            .line(seq)
            .and_then(|l| serde_json::from_str::<Keys<'_>>(l).ok())
            .is_some_and(|k| to_i64(k.at_ms) >= before_ms)
    });
    Ok(inside.unwrap_or(first))
}

/// Removes the records numbered below `cut` from the oldest batches, about
/// [`PRUNE_CHUNK`] of them, in the caller's transaction; a batch the cut
/// falls inside keeps its newer records, under the cut's number. Returns
/// how many records went, and whether rows below the cut are left for
/// another chunk.
fn prune_chunk(conn: &Connection, cut: i64) -> Result<(i64, bool)> {
    let mut oldest =
        conn.prepare_cached("SELECT seq, body FROM journal_batches WHERE seq < ?1 ORDER BY seq")?;
    let mut rows = oldest.query(params![cut])?;
    let mut batches = Vec::new();
    let mut records = 0i64;
    let mut more = true;
    while records < PRUNE_CHUNK {
        let Some(row) = rows.next()? else {
            more = false;
            break;
        };
        let batch = Batch::read(row.get(0)?, row.get(1)?);
        records = records.saturating_add(count_i64(batch.lines.len()));
        batches.push(batch);
    }
    if more {
        more = rows.next()?.is_some();
    }
    drop(rows);
    let mut removed = 0i64;
    let mut up_to = i64::MIN;
    for batch in &batches {
        let mut kept: Vec<&str> = Vec::new();
        let (mut first_at, mut last_at) = (i64::MAX, 0);
        for seq in batch.first..batch.end() {
            let line = batch.line(seq).unwrap_or_default();
            let keys = serde_json::from_str::<Keys<'_>>(line).ok();
            if seq >= cut {
                if let Some(k) = &keys {
                    first_at = first_at.min(to_i64(k.at_ms));
                    last_at = last_at.max(to_i64(k.at_ms));
                }
                kept.push(line);
                continue;
            }
            removed += 1;
            // An unreadable line leaves index entries that find nothing.
            let Some(k) = keys else { continue };
            conn.prepare_cached("DELETE FROM journal_messages WHERE message_id = ?1 AND seq = ?2")?
                .execute(params![k.message_id, seq])?;
            if let Some(id) = &k.causation_id {
                conn.prepare_cached(
                    "DELETE FROM journal_causes WHERE causation_id = ?1 AND seq = ?2",
                )?
                .execute(params![id, seq])?;
            }
            if let Some(id) = &k.correlation_id {
                conn.prepare_cached(
                    "DELETE FROM journal_flows WHERE correlation_id = ?1 AND seq = ?2",
                )?
                .execute(params![id, seq])?;
            }
        }
        conn.prepare_cached("DELETE FROM journal_batches WHERE seq = ?1")?
            .execute(params![batch.first])?;
        if !kept.is_empty() {
            let head = &batch.body[batch.head.clone()];
            let body = std::iter::once(head)
                .chain(kept.iter().copied())
                .collect::<Vec<_>>()
                .join("\n");
            conn.prepare_cached(INSERT_BATCH)?.execute(params![
                cut,
                count_i64(kept.len()),
                first_at.min(last_at),
                last_at,
                body
            ])?;
        }
        up_to = up_to.max(batch.end().min(cut));
    }
    // The attributes of what went, in one range.
    conn.prepare_cached("DELETE FROM journal_attributes WHERE seq < ?1")?
        .execute(params![up_to])?;
    if let Some(end) = batches.iter().map(Batch::end).max() {
        conn.prepare_cached(
            "INSERT INTO journal_floor (id, next) VALUES (0, ?1)
             ON CONFLICT (id) DO UPDATE SET next = max(next, excluded.next)",
        )?
        .execute(params![end])?;
    }
    Ok((removed, more))
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
        conn.set_prepared_statement_cache_capacity(STATEMENTS_KEPT);
        create(&conn)
            .with_context(|| format!("cannot create the journal's tables in {}", path.display()))?;
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
        let conn = self.conn.clone();
        // A write holds thousands of records at most: their rows are
        // written on the blocking thread too, but before it takes the
        // connection, which readers share.
        tokio::task::spawn_blocking(move || {
            let encoded = encode(records).context("cannot write journal records as JSON")?;
            let mut conn = lock(&conn);
            // The write lock first: a deferred transaction that reads the
            // next number and then writes fails at once (the busy handler
            // does not wait) when another writer came between.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            encoded.insert(&tx)?;
            tx.commit()?;
            Ok(())
        })
        .await
        .context("the journal's task failed")?
    }

    async fn of_message(&self, message_id: &str) -> Result<Vec<Record>> {
        let id = message_id.to_owned();
        self.blocking(move |conn| {
            let found = seqs(
                conn,
                "SELECT seq FROM journal_messages WHERE message_id = ?1 ORDER BY seq",
                params![id],
            )?;
            records_at(conn, &found)
        })
        .await
    }

    async fn caused_by(&self, message_ids: &[String], limit: usize) -> Result<Vec<Record>> {
        let ids = message_ids.to_vec();
        self.blocking(move |conn| {
            let mut all = Vec::new();
            for id in &ids {
                let left = limit.saturating_sub(all.len());
                if left == 0 {
                    break;
                }
                let found = seqs(
                    conn,
                    "SELECT seq FROM journal_causes WHERE causation_id = ?1 ORDER BY seq LIMIT ?2",
                    params![id, count_i64(left)],
                )?;
                all.extend(records_at(conn, &found)?);
            }
            all.sort_by_key(|r| r.at_ms);
            Ok(all)
        })
        .await
    }

    async fn of_flow(&self, correlation_id: &str, limit: usize) -> Result<Vec<Record>> {
        let id = correlation_id.to_owned();
        let limit = count_i64(limit);
        self.blocking(move |conn| {
            let found = seqs(
                conn,
                "SELECT seq FROM journal_flows WHERE correlation_id = ?1
                 UNION SELECT seq FROM journal_messages WHERE message_id = ?1
                 ORDER BY seq LIMIT ?2",
                params![id, limit],
            )?;
            records_at(conn, &found)
        })
        .await
    }

    async fn ids_like(&self, prefix: &str, limit: usize) -> Result<Vec<String>> {
        // An id prefix range, not LIKE: ids hold no wildcards to escape,
        // and the index serves a range.
        let low = prefix.to_owned();
        let high = format!("{prefix}\u{10ffff}");
        let limit = count_i64(limit);
        self.blocking(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT DISTINCT message_id FROM journal_messages WHERE message_id >= ?1 AND message_id < ?2 LIMIT ?3",
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
        let limit = count_i64(limit);
        self.blocking(move |conn| {
            let found = seqs(
                conn,
                "SELECT seq FROM journal_attributes WHERE name = ?1 AND value = ?2 ORDER BY seq DESC LIMIT ?3",
                params![name, value, limit],
            )?;
            records_at(conn, &found)
        })
        .await
    }

    async fn prune(&self, before_ms: u64, max_records: u64) -> Result<u64> {
        let before = to_i64(before_ms);
        let max = to_i64(max_records);
        let cut = self
            .blocking(move |conn| {
                let by_age = first_since(conn, before)?;
                let (total, newest) = count_and_newest(conn)?;
                // Every record below the cut goes: the old ones, and the
                // oldest beyond the size limit.
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
            let (n, more) = self
                .blocking(move |conn| {
                    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    let done = prune_chunk(&tx, cut)?;
                    tx.commit()?;
                    Ok(done)
                })
                .await?;
            removed += n.unsigned_abs();
            if !more {
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
