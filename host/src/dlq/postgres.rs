//! The shared dead-letter store: a table in a PostgreSQL schema, for hosts
//! that run on several machines. The connection is re-established when it
//! drops; migrations run under an advisory lock so hosts starting together
//! do not race.

use anyhow::{Context as _, Result, bail};
use async_trait::async_trait;
use bytes::BytesMut;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::{Client, Row};

use super::query::{
    claim_sql, groups_query, id_prefix_pattern, list_query, only_match, read_group,
};
use super::row::{self, StoredRow, Value};
use super::{DeadLetter, DeadLetterStore, Filter, Group, Status, to_i64};
use crate::envelope::now_ms;
use crate::pg::{Reconnecting, connect};

/// Each entry upgrades the schema by one version; `{schema}` is replaced.
const MIGRATIONS: [&str; 3] = ["
CREATE TABLE {schema}.dead_letters (
    id                 TEXT PRIMARY KEY,
    pipeline           TEXT NOT NULL,
    route              TEXT NOT NULL,
    plugin_version     TEXT NOT NULL,
    plugin_digest      TEXT NOT NULL,
    message_id         TEXT NOT NULL,
    message_type       TEXT NOT NULL,
    kind               TEXT NOT NULL,
    payload            BYTEA NOT NULL,
    payload_sha256     TEXT NOT NULL,
    content_type       TEXT NOT NULL,
    headers            TEXT NOT NULL,
    correlation_id     TEXT,
    causation_id       TEXT,
    reply_to           TEXT,
    partition_key      TEXT,
    created_at_ms      BIGINT NOT NULL,
    attempt            BIGINT NOT NULL,
    error_kind         TEXT NOT NULL,
    error_message      TEXT NOT NULL,
    error_code         TEXT,
    error_details      TEXT NOT NULL,
    backtrace          TEXT,
    output             TEXT,
    attempts           TEXT NOT NULL,
    first_failed_at_ms BIGINT NOT NULL,
    last_failed_at_ms  BIGINT NOT NULL,
    source             TEXT NOT NULL,
    trace_id           TEXT,
    span_id            TEXT,
    host               TEXT NOT NULL,
    fingerprint        TEXT NOT NULL,
    cause              TEXT NOT NULL,
    status             TEXT NOT NULL,
    replay_count       BIGINT NOT NULL,
    replayed_at_ms     BIGINT,
    resolved_at_ms     BIGINT,
    note               TEXT
);
CREATE UNIQUE INDEX dead_letters_by_message ON {schema}.dead_letters (pipeline, route, message_id, payload_sha256);
CREATE INDEX dead_letters_by_fingerprint ON {schema}.dead_letters (pipeline, fingerprint);
CREATE INDEX dead_letters_by_time ON {schema}.dead_letters (pipeline, last_failed_at_ms);
", "
ALTER TABLE {schema}.dead_letters ADD COLUMN replay_claim TEXT;
", "
CREATE TABLE {schema}.crash_counts (
    pipeline         TEXT NOT NULL,
    route            TEXT NOT NULL,
    message_id       TEXT NOT NULL,
    crashes          BIGINT NOT NULL,
    last_crash_at_ms BIGINT NOT NULL,
    PRIMARY KEY (pipeline, route, message_id)
);
"];

/// Dead letters in PostgreSQL.
pub struct PostgresStore {
    conn: Reconnecting,
    schema: String,
    pipeline: String,
}

fn ph(i: usize) -> String {
    format!("${i}")
}

/// The error a driver's conversion returns.
type SqlError = Box<dyn std::error::Error + Sync + Send>;

impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, SqlError> {
        match self {
            Value::Text(s) => s.to_sql(ty, out),
            Value::Int(i) => i.to_sql(ty, out),
            Value::Bytes(b) => b.to_sql(ty, out),
            Value::OptText(s) => s.to_sql(ty, out),
            Value::OptInt(i) => i.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <String as ToSql>::accepts(ty)
            || <i64 as ToSql>::accepts(ty)
            || <Vec<u8> as ToSql>::accepts(ty)
    }

    // Checked against the type of the value it holds.
    fn to_sql_checked(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, SqlError> {
        match self {
            Value::Text(s) => s.to_sql_checked(ty, out),
            Value::Int(i) => i.to_sql_checked(ty, out),
            Value::Bytes(b) => b.to_sql_checked(ty, out),
            Value::OptText(s) => s.to_sql_checked(ty, out),
            Value::OptInt(i) => i.to_sql_checked(ty, out),
        }
    }
}

/// Values as a query's parameters.
fn params(values: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

impl StoredRow for Row {
    fn text(&self, index: usize) -> Result<String> {
        Ok(self.try_get(index)?)
    }

    fn opt_text(&self, index: usize) -> Result<Option<String>> {
        Ok(self.try_get(index)?)
    }

    fn int(&self, index: usize) -> Result<i64> {
        Ok(self.try_get(index)?)
    }

    fn opt_int(&self, index: usize) -> Result<Option<i64>> {
        Ok(self.try_get(index)?)
    }

    fn bytes(&self, index: usize) -> Result<Vec<u8>> {
        Ok(self.try_get(index)?)
    }
}

impl PostgresStore {
    /// Connects, creates the schema if needed and runs migrations.
    pub async fn connect(url: &str, schema: &str, pipeline: &str) -> Result<Self> {
        let shown = crate::config::redact(url);
        let mut client = connect(url, "dead-letter store")
            .await
            .with_context(|| format!("cannot connect to the dead-letter store {shown}"))?;
        migrate(&mut client, schema)
            .await
            .with_context(|| format!("dead-letter store {shown}, schema {schema}"))?;
        Ok(PostgresStore {
            conn: Reconnecting::new(url, "dead-letter store", client),
            schema: schema.to_owned(),
            pipeline: pipeline.to_owned(),
        })
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The connection, re-established if it dropped.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        self.conn.client().await
    }

    fn table(&self) -> String {
        format!("{}.dead_letters", self.schema)
    }

    /// Runs a query.
    async fn rows(&self, sql: &str, values: &[Value]) -> Result<Vec<Row>> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no dead-letter store connection")?;
        Ok(client.query(sql, &params(values)).await?)
    }

    /// Runs a query whose rows are read with `read`.
    async fn query<T>(
        &self,
        sql: &str,
        values: &[Value],
        read: impl Fn(&dyn StoredRow) -> Result<T>,
    ) -> Result<Vec<T>> {
        let rows = self.rows(sql, values).await?;
        rows.iter().map(|r| read(r)).collect()
    }

    async fn set_status(
        &self,
        ids: &[String],
        to: Status,
        from: &[Status],
        note: Option<&str>,
    ) -> Result<u64> {
        let from: Vec<String> = from.iter().map(|s| s.as_str().to_owned()).collect();
        let mut guard = self.client().await?;
        let client = guard.as_mut().context("no dead-letter store connection")?;
        let tx = client.transaction().await?;
        let stmt = tx
            .prepare(&format!(
                "UPDATE {} SET status = $1, note = COALESCE($2, note),
                     resolved_at_ms = CASE WHEN $1 = 'resolved' THEN $5 ELSE resolved_at_ms END
                 WHERE id = $3 AND pipeline = $4 AND status = ANY($6)",
                self.table()
            ))
            .await?;
        let now = to_i64(now_ms());
        let mut changed = 0;
        for id in ids {
            changed += tx
                .execute(
                    &stmt,
                    &[&to.as_str(), &note, id, &self.pipeline, &now, &from],
                )
                .await?;
        }
        tx.commit().await?;
        Ok(changed)
    }
}

async fn migrate(client: &mut Client, schema: &str) -> Result<()> {
    let tx = client.transaction().await?;
    // Hosts starting at once take turns.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('switchyard dead letters ' || $1))",
        &[&schema],
    )
    .await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.dead_letter_migrations (version BIGINT PRIMARY KEY, applied_at_ms BIGINT NOT NULL);"
    ))
    .await?;
    let current: i64 = tx
        .query_one(
            &format!("SELECT COALESCE(MAX(version), 0) FROM {schema}.dead_letter_migrations"),
            &[],
        )
        .await?
        .try_get(0)?;
    let known = MIGRATIONS.len() as i64;
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
        tx.batch_execute(&sql.replace("{schema}", schema)).await?;
        tx.execute(
            &format!("INSERT INTO {schema}.dead_letter_migrations (version, applied_at_ms) VALUES ($1, $2)"),
            &[&(i as i64 + 1), &to_i64(now_ms())],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[async_trait]
impl DeadLetterStore for PostgresStore {
    async fn record(&self, letters: Vec<DeadLetter>) -> Result<Vec<String>> {
        let table = self.table();
        let mut guard = self.client().await?;
        let client = guard.as_mut().context("no dead-letter store connection")?;
        let tx = client.transaction().await?;
        let find = tx
            .prepare(&format!("{} FOR UPDATE", row::find_sql(&table, ph)))
            .await?;
        let refail = tx.prepare(&row::refail_sql(&table, ph)).await?;
        let insert = tx.prepare(&row::insert_sql(&table, ph)).await?;
        let mut ids = Vec::with_capacity(letters.len());
        for d in letters {
            let existing = tx.query_opt(&find, &params(&row::key_values(&d))).await?;
            let id = match existing {
                Some(found) => {
                    let id: String = found.try_get(0)?;
                    let values = row::refail_values(&id, found.try_get(1)?, d)?;
                    tx.execute(&refail, &params(&values)).await?;
                    id
                }
                None => {
                    tx.execute(&insert, &params(&row::insert_values(&d)))
                        .await?;
                    d.id
                }
            };
            ids.push(id);
        }
        tx.commit().await?;
        Ok(ids)
    }

    async fn list(&self, filter: &Filter) -> Result<Vec<DeadLetter>> {
        let (sql, values) = list_query(&self.table(), &self.pipeline, filter, ph);
        self.query(&sql, &values, row::read_letter).await
    }

    async fn groups(&self, filter: &Filter) -> Result<Vec<Group>> {
        let (sql, values) = groups_query(&self.table(), &self.pipeline, filter, ph);
        self.query(&sql, &values, read_group).await
    }

    async fn get(&self, id: &str) -> Result<Option<DeadLetter>> {
        let columns = row::column_list();
        let sql = format!(
            "SELECT {columns} FROM {} WHERE pipeline = $1 AND id LIKE $2 LIMIT 2",
            self.table()
        );
        let values = [
            Value::Text(self.pipeline.clone()),
            Value::Text(id_prefix_pattern(id)),
        ];
        let rows = self.rows(&sql, &values).await?;
        only_match(rows, id)?
            .map(|r| row::read_letter(&r))
            .transpose()
    }

    async fn begin_replay(
        &self,
        ids: &[String],
        claim: &str,
        stale_before_ms: u64,
    ) -> Result<Vec<DeadLetter>> {
        let table = self.table();
        let mut guard = self.client().await?;
        let client = guard.as_mut().context("no dead-letter store connection")?;
        let tx = client.transaction().await?;
        let columns = row::column_list();
        let stmt = tx
            .prepare(&format!(
                "{} RETURNING {columns}",
                claim_sql(&table, ph, "IS NOT DISTINCT FROM")
            ))
            .await?;
        let now = to_i64(now_ms());
        let stale = to_i64(stale_before_ms);
        let mut out = Vec::new();
        for id in ids {
            if let Some(r) = tx
                .query_opt(&stmt, &[id, &self.pipeline, &now, &claim, &stale])
                .await?
            {
                out.push(row::read_letter(&r)?);
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn finish_replay(&self, ids: &[String]) -> Result<()> {
        self.set_status(ids, Status::Replayed, &[Status::Replaying], None)
            .await?;
        Ok(())
    }

    async fn abort_replay(&self, ids: &[String]) -> Result<()> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no dead-letter store connection")?;
        client
            .execute(
                &format!(
                    "UPDATE {} SET status = 'dead', replay_count = GREATEST(replay_count - 1, 0)
                     WHERE id = ANY($1) AND pipeline = $2 AND status = 'replaying'",
                    self.table()
                ),
                &[&ids, &self.pipeline],
            )
            .await?;
        Ok(())
    }

    async fn mark_handled(&self, ids: &[String]) -> Result<u64> {
        self.set_status(
            ids,
            Status::Handled,
            &[Status::Replaying, Status::Replayed],
            None,
        )
        .await
    }

    async fn resolve(&self, ids: &[String], note: Option<&str>) -> Result<u64> {
        self.set_status(
            ids,
            Status::Resolved,
            &[Status::Dead, Status::Replaying, Status::Replayed],
            note,
        )
        .await
    }

    async fn delete(&self, ids: &[String]) -> Result<u64> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no dead-letter store connection")?;
        let n = client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE id = ANY($1) AND pipeline = $2",
                    self.table()
                ),
                &[&ids, &self.pipeline],
            )
            .await?;
        Ok(n)
    }

    async fn ping(&self) -> Result<()> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no dead-letter store connection")?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    async fn counts(&self) -> Result<Vec<(Status, u64)>> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no dead-letter store connection")?;
        let rows = client
            .query(
                &format!(
                    "SELECT status, COUNT(*) FROM {} WHERE pipeline = $1 GROUP BY status",
                    self.table()
                ),
                &[&self.pipeline],
            )
            .await?;
        let mut out = Vec::new();
        for r in rows {
            let status: String = r.try_get(0)?;
            if let Some(status) = Status::parse(&status) {
                out.push((status, r.try_get::<_, i64>(1)?.unsigned_abs()));
            }
        }
        Ok(out)
    }

    async fn note_crash(&self, route: &str, message_ids: &[String]) -> Result<()> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no dead-letter store connection")?;
        client
            .execute(
                &format!(
                    "INSERT INTO {}.crash_counts (pipeline, route, message_id, crashes, last_crash_at_ms)
                     SELECT $1, $2, id, 1, $4 FROM UNNEST($3::TEXT[]) AS id
                     ON CONFLICT (pipeline, route, message_id)
                     DO UPDATE SET crashes = {}.crash_counts.crashes + 1, last_crash_at_ms = $4",
                    self.schema, self.schema
                ),
                &[&self.pipeline, &route, &message_ids, &to_i64(now_ms())],
            )
            .await?;
        Ok(())
    }

    async fn crash_counts(&self, forget_before_ms: u64) -> Result<Vec<(String, String, u32)>> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no dead-letter store connection")?;
        // Forgetting is tidying: a store that cannot be written still says
        // what it counted.
        let _ = client
            .execute(
                &format!(
                    "DELETE FROM {}.crash_counts WHERE pipeline = $1 AND last_crash_at_ms < $2",
                    self.schema
                ),
                &[&self.pipeline, &to_i64(forget_before_ms)],
            )
            .await;
        let rows = client
            .query(
                &format!(
                    "SELECT route, message_id, crashes FROM {}.crash_counts WHERE pipeline = $1 AND last_crash_at_ms >= $2",
                    self.schema
                ),
                &[&self.pipeline, &to_i64(forget_before_ms)],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let n: i64 = r.try_get(2)?;
            out.push((
                r.try_get(0)?,
                r.try_get(1)?,
                u32::try_from(n).unwrap_or(u32::MAX),
            ));
        }
        Ok(out)
    }

    async fn clear_crashes(&self, route: &str, message_ids: &[String]) -> Result<()> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no dead-letter store connection")?;
        client
            .execute(
                &format!(
                    "DELETE FROM {}.crash_counts WHERE pipeline = $1 AND route = $2 AND message_id = ANY($3)",
                    self.schema
                ),
                &[&self.pipeline, &route, &message_ids],
            )
            .await?;
        Ok(())
    }
}
