//! The SQL both stores run alike, with placeholders written by the store
//! (`?1` for SQLite, `$1` for PostgreSQL): the filters of list and group
//! queries, lookups by id prefix, and replay claims.

use anyhow::{Result, bail};

use super::row::{self, StoredRow, Value};
use super::{Filter, Group, to_i64};

/// The `WHERE` clause (and its parameters) of a filter, with placeholders
/// written by `ph` (`?1` for SQLite, `$1` for PostgreSQL).
fn where_clause(filter: &Filter, ph: fn(usize) -> String) -> (String, Vec<Value>) {
    let mut clauses = Vec::new();
    let mut params = Vec::new();
    // Adds a parameter and returns its placeholder.
    let bind = |p: Value, params: &mut Vec<Value>| {
        params.push(p);
        ph(params.len())
    };
    if !filter.ids.is_empty() {
        let alts: Vec<String> = filter
            .ids
            .iter()
            .map(|id| bind(Value::Text(id.clone()), &mut params))
            .collect();
        clauses.push(format!("id IN ({})", alts.join(", ")));
    }
    let equal = [
        ("route", &filter.route),
        ("message_type", &filter.message_type),
        ("error_kind", &filter.error_kind),
        ("fingerprint", &filter.fingerprint),
    ];
    for (column, value) in equal {
        if let Some(v) = value {
            let p = bind(Value::Text(v.clone()), &mut params);
            clauses.push(format!("{column} = {p}"));
        }
    }
    if let Some(s) = filter.since_ms {
        let p = bind(Value::Int(to_i64(s)), &mut params);
        clauses.push(format!("last_failed_at_ms >= {p}"));
    }
    if let Some(u) = filter.until_ms {
        let p = bind(Value::Int(to_i64(u)), &mut params);
        clauses.push(format!("last_failed_at_ms < {p}"));
    }
    if !filter.statuses.is_empty() {
        let alts: Vec<String> = filter
            .statuses
            .iter()
            .map(|s| bind(Value::Text(s.as_str().to_owned()), &mut params))
            .collect();
        clauses.push(format!("status IN ({})", alts.join(", ")));
    }
    let sql = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    (sql, params)
}

/// [`where_clause`] scoped to one pipeline's records.
fn scoped_where_clause(
    filter: &Filter,
    pipeline: &str,
    ph: fn(usize) -> String,
) -> (String, Vec<Value>) {
    let (clause, mut params) = where_clause(filter, ph);
    params.push(Value::Text(pipeline.to_owned()));
    let scope = format!("pipeline = {}", ph(params.len()));
    let clause = if clause.is_empty() {
        format!("WHERE {scope}")
    } else {
        format!("{clause} AND {scope}")
    };
    (clause, params)
}

/// The `LIMIT` a filter asks for, if any.
fn limit(filter: &Filter) -> String {
    filter
        .limit
        .map(|l| format!(" LIMIT {}", to_i64(l)))
        .unwrap_or_default()
}

/// The query (and its parameters) of [`DeadLetterStore::list`] on `table`,
/// for one pipeline's records; rows are read with [`row::read_letter`].
pub(crate) fn list_query(
    table: &str,
    pipeline: &str,
    filter: &Filter,
    ph: fn(usize) -> String,
) -> (String, Vec<Value>) {
    let (clause, params) = scoped_where_clause(filter, pipeline, ph);
    let columns = row::column_list();
    let limit = limit(filter);
    (
        format!(
            "SELECT {columns} FROM {table} {clause} ORDER BY last_failed_at_ms DESC, id DESC{limit}"
        ),
        params,
    )
}

/// The query (and its parameters) of [`DeadLetterStore::groups`] on
/// `table`, for one pipeline's records; rows are read with [`read_group`].
pub(crate) fn groups_query(
    table: &str,
    pipeline: &str,
    filter: &Filter,
    ph: fn(usize) -> String,
) -> (String, Vec<Value>) {
    let (clause, params) = scoped_where_clause(filter, pipeline, ph);
    let limit = limit(filter);
    (
        format!(
            "SELECT fingerprint, COUNT(*), MIN(route), MIN(error_kind), MIN(cause), MIN(first_failed_at_ms), MAX(last_failed_at_ms)
             FROM {table} {clause} GROUP BY fingerprint ORDER BY MAX(last_failed_at_ms) DESC{limit}"
        ),
        params,
    )
}

/// A row of [`groups_query`].
pub(crate) fn read_group(r: &dyn StoredRow) -> Result<Group> {
    Ok(Group {
        fingerprint: r.text(0)?,
        count: r.int(1)?.unsigned_abs(),
        route: r.text(2)?,
        error_kind: r.text(3)?,
        cause: r.text(4)?,
        first_failed_at_ms: r.int(5)?.unsigned_abs(),
        last_failed_at_ms: r.int(6)?.unsigned_abs(),
    })
}

/// How the claim of an edit (`dlq::replay::edit`) starts.
pub const EDIT_CLAIM: &str = "edit:";

/// The statement that claims the record `ph(1)` of the pipeline `ph(2)` at
/// `ph(3)` for the replay `ph(4)` (see [`DeadLetterStore::begin_replay`]):
/// a record `dead` (counting the replay), one this claim already holds, or
/// one another claim left `replaying` before `ph(5)`, unless that claim is
/// an edit's ([`EDIT_CLAIM`]: its new message may be out already, so the
/// old one must never be sent after it). `is` is the dialect's null-safe
/// equality.
pub(crate) fn claim_sql(table: &str, ph: fn(usize) -> String, is: &str) -> String {
    let [id, pipeline, now, claim, stale] = [1, 2, 3, 4, 5].map(ph);
    format!(
        "UPDATE {table}
         SET replay_count = replay_count + CASE WHEN status = 'dead' THEN 1 ELSE 0 END,
             status = 'replaying', replayed_at_ms = {now}, replay_claim = {claim}
         WHERE id = {id} AND pipeline = {pipeline}
           AND (status = 'dead'
                OR (status = 'replaying'
                    AND (replay_claim {is} {claim}
                         OR (COALESCE(replayed_at_ms, 0) < {stale}
                             AND COALESCE(replay_claim, '') NOT LIKE '{EDIT_CLAIM}%'))))"
    )
}

/// The `LIKE` pattern (escaped with `\`) of ids that start with `id`.
pub(crate) fn id_prefix_pattern(id: &str) -> String {
    format!(
        "{}%",
        id.replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    )
}

/// The one record an id prefix matched (the query asks for two at most),
/// none, or an error if it matched several.
pub(crate) fn only_match<T>(mut found: Vec<T>, id: &str) -> Result<Option<T>> {
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => bail!("`{id}` matches several dead letters; give more of the id"),
    }
}
