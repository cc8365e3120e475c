//! How a [`DeadLetter`] is kept in a row of the `dead_letters` table,
//! written once for both stores: [`COLUMNS`] lists the columns in order,
//! each with how a record's field is stored in it and read back. The
//! statements that write a record and the reading of one are made from that
//! list; each store binds [`Value`]s and reads rows ([`StoredRow`]) with its
//! own driver, and keeps its SQL dialect (placeholders, column types,
//! migrations) to itself.

use std::sync::LazyLock;

use anyhow::{Result, anyhow};
use serde::Deserialize;

use super::{
    DeadLetter, ErrorInfo, Source, Status, from_json, json, merge_attempts, opt_u64,
    payload_digest, to_i64,
};
use crate::envelope::{Envelope, Kind};
use OnRefail::{Keep, Rewrite};

/// A value as a column stores it, or as a query binds it, in terms both
/// drivers bind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Value {
    Text(String),
    Int(i64),
    Bytes(Vec<u8>),
    /// Text, or `NULL`.
    OptText(Option<String>),
    /// An integer, or `NULL`.
    OptInt(Option<i64>),
}

/// A row a store's driver returned, read by column index.
pub(crate) trait StoredRow {
    fn text(&self, index: usize) -> Result<String>;
    fn opt_text(&self, index: usize) -> Result<Option<String>>;
    fn int(&self, index: usize) -> Result<i64>;
    fn opt_int(&self, index: usize) -> Result<Option<i64>>;
    fn bytes(&self, index: usize) -> Result<Vec<u8>>;
}

/// One column of a row being read: where it is and what it is called.
#[derive(Clone, Copy)]
struct Cell<'a> {
    row: &'a dyn StoredRow,
    index: usize,
    column: &'static str,
}

impl Cell<'_> {
    fn text(self) -> Result<String> {
        self.row.text(self.index)
    }

    fn opt_text(self) -> Result<Option<String>> {
        self.row.opt_text(self.index)
    }

    fn int(self) -> Result<i64> {
        self.row.int(self.index)
    }

    /// A stored timestamp (non-negative by construction).
    fn ms(self) -> Result<u64> {
        Ok(self.int()?.unsigned_abs())
    }

    fn opt_ms(self) -> Result<Option<u64>> {
        Ok(opt_u64(self.row.opt_int(self.index)?))
    }

    fn count(self) -> Result<u32> {
        Ok(u32::try_from(self.int()?).unwrap_or(u32::MAX))
    }

    fn bytes(self) -> Result<Vec<u8>> {
        self.row.bytes(self.index)
    }

    /// A JSON column of the record `id`, named on failure.
    fn json<T: for<'de> Deserialize<'de>>(self, id: &str) -> Result<T> {
        from_json(&self.text()?, self.column, id)
    }
}

/// When a message fails again, whether its record's column takes the new
/// failure's value or keeps what it had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnRefail {
    Keep,
    Rewrite,
}

/// One column of a record.
struct Column {
    name: &'static str,
    on_refail: OnRefail,
    /// The value a letter stores in it.
    store: fn(&DeadLetter) -> Value,
    /// Reads it back into a letter (the id, read first, is already there).
    load: fn(&mut DeadLetter, Cell<'_>) -> Result<()>,
}

/// Sets a field to a value read from a column.
fn set<T>(field: &mut T, value: Result<T>) -> Result<()> {
    *field = value?;
    Ok(())
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn opt_text(s: &Option<String>) -> Value {
    Value::OptText(s.clone())
}

/// The columns of a record, in the order every `SELECT` uses, `INSERT`
/// writes and [`read_letter`] reads. `id` comes first: reading the others
/// names the record on failure. A new column is a new entry here (and a
/// migration in each store).
static COLUMNS: [Column; 37] = [
    Column {
        name: "id",
        on_refail: Keep,
        store: |d| text(&d.id),
        load: |d, c| set(&mut d.id, c.text()),
    },
    Column {
        name: "pipeline",
        on_refail: Keep,
        store: |d| text(&d.pipeline),
        load: |d, c| set(&mut d.pipeline, c.text()),
    },
    Column {
        name: "route",
        on_refail: Keep,
        store: |d| text(&d.route),
        load: |d, c| set(&mut d.route, c.text()),
    },
    Column {
        name: "plugin_version",
        on_refail: Rewrite,
        store: |d| text(&d.plugin_version),
        load: |d, c| set(&mut d.plugin_version, c.text()),
    },
    Column {
        name: "plugin_digest",
        on_refail: Rewrite,
        store: |d| text(&d.plugin_digest),
        load: |d, c| set(&mut d.plugin_digest, c.text()),
    },
    Column {
        name: "message_id",
        on_refail: Keep,
        store: |d| text(&d.message.id),
        load: |d, c| set(&mut d.message.id, c.text()),
    },
    Column {
        name: "message_type",
        on_refail: Keep,
        store: |d| text(&d.message.message_type),
        load: |d, c| set(&mut d.message.message_type, c.text()),
    },
    Column {
        name: "kind",
        on_refail: Keep,
        store: |d| text(d.message.kind.as_str()),
        load: |d, c| {
            d.message.kind = Kind::parse(&c.text()?).unwrap_or(Kind::Event);
            Ok(())
        },
    },
    Column {
        name: "payload",
        on_refail: Keep,
        store: |d| Value::Bytes(d.message.payload.clone()),
        load: |d, c| set(&mut d.message.payload, c.bytes()),
    },
    Column {
        name: "content_type",
        on_refail: Keep,
        store: |d| text(&d.message.content_type),
        load: |d, c| set(&mut d.message.content_type, c.text()),
    },
    Column {
        name: "headers",
        on_refail: Keep,
        store: |d| Value::Text(json(&d.message.headers)),
        load: |d, c| set(&mut d.message.headers, c.json(&d.id)),
    },
    Column {
        name: "correlation_id",
        on_refail: Keep,
        store: |d| opt_text(&d.message.correlation_id),
        load: |d, c| set(&mut d.message.correlation_id, c.opt_text()),
    },
    Column {
        name: "causation_id",
        on_refail: Keep,
        store: |d| opt_text(&d.message.causation_id),
        load: |d, c| set(&mut d.message.causation_id, c.opt_text()),
    },
    Column {
        name: "reply_to",
        on_refail: Keep,
        store: |d| opt_text(&d.message.reply_to),
        load: |d, c| set(&mut d.message.reply_to, c.opt_text()),
    },
    Column {
        name: "partition_key",
        on_refail: Keep,
        store: |d| opt_text(&d.message.partition_key),
        load: |d, c| set(&mut d.message.partition_key, c.opt_text()),
    },
    Column {
        name: "created_at_ms",
        on_refail: Keep,
        store: |d| Value::Int(to_i64(d.message.created_at_ms)),
        load: |d, c| set(&mut d.message.created_at_ms, c.ms()),
    },
    Column {
        name: "attempt",
        on_refail: Keep,
        store: |d| Value::Int(i64::from(d.message.attempt)),
        load: |d, c| set(&mut d.message.attempt, c.count()),
    },
    Column {
        name: "error_kind",
        on_refail: Rewrite,
        store: |d| text(&d.error.kind),
        load: |d, c| set(&mut d.error.kind, c.text()),
    },
    Column {
        name: "error_message",
        on_refail: Rewrite,
        store: |d| text(&d.error.message),
        load: |d, c| set(&mut d.error.message, c.text()),
    },
    Column {
        name: "error_code",
        on_refail: Rewrite,
        store: |d| opt_text(&d.error.code),
        load: |d, c| set(&mut d.error.code, c.opt_text()),
    },
    Column {
        name: "error_details",
        on_refail: Rewrite,
        store: |d| Value::Text(json(&d.error.details)),
        load: |d, c| set(&mut d.error.details, c.json(&d.id)),
    },
    Column {
        name: "backtrace",
        on_refail: Rewrite,
        store: |d| opt_text(&d.error.backtrace),
        load: |d, c| set(&mut d.error.backtrace, c.opt_text()),
    },
    Column {
        name: "output",
        on_refail: Rewrite,
        store: |d| opt_text(&d.error.output),
        load: |d, c| set(&mut d.error.output, c.opt_text()),
    },
    Column {
        name: "attempts",
        on_refail: Rewrite,
        store: |d| Value::Text(json(&d.attempts)),
        load: |d, c| set(&mut d.attempts, c.json(&d.id)),
    },
    Column {
        name: "first_failed_at_ms",
        on_refail: Keep,
        store: |d| Value::Int(to_i64(d.first_failed_at_ms)),
        load: |d, c| set(&mut d.first_failed_at_ms, c.ms()),
    },
    Column {
        name: "last_failed_at_ms",
        on_refail: Rewrite,
        store: |d| Value::Int(to_i64(d.last_failed_at_ms)),
        load: |d, c| set(&mut d.last_failed_at_ms, c.ms()),
    },
    Column {
        name: "source",
        on_refail: Rewrite,
        store: |d| Value::Text(json(&d.source)),
        load: |d, c| set(&mut d.source, c.json(&d.id)),
    },
    Column {
        name: "trace_id",
        on_refail: Rewrite,
        store: |d| opt_text(&d.trace_id),
        load: |d, c| set(&mut d.trace_id, c.opt_text()),
    },
    Column {
        name: "span_id",
        on_refail: Rewrite,
        store: |d| opt_text(&d.span_id),
        load: |d, c| set(&mut d.span_id, c.opt_text()),
    },
    Column {
        name: "host",
        on_refail: Rewrite,
        store: |d| text(&d.host),
        load: |d, c| set(&mut d.host, c.text()),
    },
    Column {
        name: "fingerprint",
        on_refail: Rewrite,
        store: |d| text(&d.fingerprint),
        load: |d, c| set(&mut d.fingerprint, c.text()),
    },
    Column {
        name: "cause",
        on_refail: Rewrite,
        store: |d| text(&d.cause),
        load: |d, c| set(&mut d.cause, c.text()),
    },
    // A failure sets `status` back to `dead` (see [`refail_sql`]).
    Column {
        name: "status",
        on_refail: Keep,
        store: |d| text(d.status.as_str()),
        load: |d, c| {
            let status = c.text()?;
            d.status = Status::parse(&status)
                .ok_or_else(|| anyhow!("dead letter {}: unknown status `{status}`", d.id))?;
            Ok(())
        },
    },
    Column {
        name: "replay_count",
        on_refail: Keep,
        store: |d| Value::Int(i64::from(d.replay_count)),
        load: |d, c| set(&mut d.replay_count, c.count()),
    },
    Column {
        name: "replayed_at_ms",
        on_refail: Keep,
        store: |d| Value::OptInt(d.replayed_at_ms.map(to_i64)),
        load: |d, c| set(&mut d.replayed_at_ms, c.opt_ms()),
    },
    Column {
        name: "resolved_at_ms",
        on_refail: Keep,
        store: |d| Value::OptInt(d.resolved_at_ms.map(to_i64)),
        load: |d, c| set(&mut d.resolved_at_ms, c.opt_ms()),
    },
    Column {
        name: "note",
        on_refail: Keep,
        store: |d| opt_text(&d.note),
        load: |d, c| set(&mut d.note, c.opt_text()),
    },
];

/// The names of [`COLUMNS`], comma-separated, for `SELECT` (and
/// `RETURNING`).
pub(crate) fn column_list() -> &'static str {
    static LIST: LazyLock<String> = LazyLock::new(|| {
        let names: Vec<&str> = COLUMNS.iter().map(|c| c.name).collect();
        names.join(", ")
    });
    &LIST
}

/// Reads a record from a row whose columns are [`COLUMNS`], in order.
pub(crate) fn read_letter(row: &dyn StoredRow) -> Result<DeadLetter> {
    let mut letter = empty();
    for (index, column) in COLUMNS.iter().enumerate() {
        let cell = Cell {
            row,
            index,
            column: column.name,
        };
        (column.load)(&mut letter, cell)?;
    }
    Ok(letter)
}

/// A record with nothing in it yet, for [`read_letter`] to fill.
fn empty() -> DeadLetter {
    DeadLetter {
        id: String::new(),
        pipeline: String::new(),
        route: String::new(),
        plugin_version: String::new(),
        plugin_digest: String::new(),
        message: Envelope {
            id: String::new(),
            message_type: String::new(),
            kind: Kind::Event,
            payload: Vec::new(),
            content_type: String::new(),
            headers: Vec::new(),
            correlation_id: None,
            causation_id: None,
            reply_to: None,
            partition_key: None,
            created_at_ms: 0,
            attempt: 0,
            history: Vec::new(),
        },
        error: ErrorInfo::default(),
        attempts: Vec::new(),
        first_failed_at_ms: 0,
        last_failed_at_ms: 0,
        source: Source::default(),
        trace_id: None,
        span_id: None,
        host: String::new(),
        fingerprint: String::new(),
        cause: String::new(),
        status: Status::Dead,
        replay_count: 0,
        replayed_at_ms: None,
        resolved_at_ms: None,
        note: None,
    }
}

/// The query that finds the record a letter belongs to (same pipeline,
/// route, message id and payload), returning its id and stored attempts;
/// bind [`key_values`]. Placeholders are written by `ph`.
pub(crate) fn find_sql(table: &str, ph: fn(usize) -> String) -> String {
    format!(
        "SELECT id, attempts FROM {table}
         WHERE pipeline = {} AND route = {} AND message_id = {} AND payload_sha256 = {}",
        ph(1),
        ph(2),
        ph(3),
        ph(4)
    )
}

/// What [`find_sql`] binds for a letter.
pub(crate) fn key_values(d: &DeadLetter) -> Vec<Value> {
    vec![
        text(&d.pipeline),
        text(&d.route),
        text(&d.message.id),
        Value::Text(payload_digest(&d.message.payload)),
    ]
}

/// The statement that adds a new record: [`COLUMNS`], then the payload's
/// digest (part of the key, never read back); bind [`insert_values`].
pub(crate) fn insert_sql(table: &str, ph: fn(usize) -> String) -> String {
    let placeholders: Vec<String> = (1..=COLUMNS.len() + 1).map(ph).collect();
    format!(
        "INSERT INTO {table} ({}, payload_sha256) VALUES ({})",
        column_list(),
        placeholders.join(", ")
    )
}

/// What [`insert_sql`] binds for a letter.
pub(crate) fn insert_values(d: &DeadLetter) -> Vec<Value> {
    let mut values: Vec<Value> = COLUMNS.iter().map(|c| (c.store)(d)).collect();
    values.push(Value::Text(payload_digest(&d.message.payload)));
    values
}

/// The columns a new failure of a recorded message rewrites.
fn rewritten() -> impl Iterator<Item = &'static Column> {
    COLUMNS.iter().filter(|c| c.on_refail == Rewrite)
}

/// The statement that adds a new failure to the record with id `ph(1)`:
/// the columns the failure rewrites, and status `dead` again; bind
/// [`refail_values`].
pub(crate) fn refail_sql(table: &str, ph: fn(usize) -> String) -> String {
    let set: Vec<String> = rewritten()
        .enumerate()
        .map(|(i, c)| format!("{} = {}", c.name, ph(i + 2)))
        .collect();
    format!(
        "UPDATE {table} SET {}, status = 'dead' WHERE id = {}",
        set.join(", "),
        ph(1)
    )
}

/// What [`refail_sql`] binds when `d` fails again into the record `id`,
/// whose stored attempts (JSON) are `attempts`: its attempts are added to
/// those, without repeating any.
pub(crate) fn refail_values(id: &str, attempts: &str, mut d: DeadLetter) -> Result<Vec<Value>> {
    d.attempts = merge_attempts(from_json(attempts, "attempts", id)?, &d.attempts);
    let mut values = vec![text(id)];
    values.extend(rewritten().map(|c| (c.store)(&d)));
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_columns_are_the_ones_every_select_names() {
        assert_eq!(
            column_list(),
            "id, pipeline, route, plugin_version, plugin_digest, \
message_id, message_type, kind, payload, content_type, headers, correlation_id, causation_id, \
reply_to, partition_key, created_at_ms, attempt, \
error_kind, error_message, error_code, error_details, backtrace, output, \
attempts, first_failed_at_ms, last_failed_at_ms, source, trace_id, span_id, host, \
fingerprint, cause, status, replay_count, replayed_at_ms, resolved_at_ms, note"
        );
    }

    #[test]
    fn a_new_failure_rewrites_what_it_changes() {
        assert_eq!(
            refail_sql("dead_letters", |i| format!("?{i}")),
            "UPDATE dead_letters SET plugin_version = ?2, plugin_digest = ?3, error_kind = ?4, \
error_message = ?5, error_code = ?6, error_details = ?7, backtrace = ?8, output = ?9, \
attempts = ?10, last_failed_at_ms = ?11, source = ?12, trace_id = ?13, span_id = ?14, \
host = ?15, fingerprint = ?16, cause = ?17, status = 'dead' WHERE id = ?1"
        );
    }
}
