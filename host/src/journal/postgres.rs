//! The journal in PostgreSQL, for hosts that share work: each host's writer
//! adds its records in batches; `why` reads every host's.

use anyhow::{Context as _, Result};
use async_trait::async_trait;
use tokio_postgres::Client;

use super::{Record, Store};
use crate::pg::{Reconnecting, connect};

/// The table, created if missing; `{schema}` is replaced.
const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.journal (
    seq            BIGSERIAL PRIMARY KEY,
    pipeline       TEXT NOT NULL,
    at_ms          BIGINT NOT NULL,
    message_id     TEXT NOT NULL,
    correlation_id TEXT,
    causation_id   TEXT,
    record         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_by_message ON {schema}.journal (pipeline, message_id);
CREATE INDEX IF NOT EXISTS journal_by_cause ON {schema}.journal (pipeline, causation_id) WHERE causation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_by_flow ON {schema}.journal (pipeline, correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_by_time ON {schema}.journal (pipeline, at_ms);
ALTER TABLE {schema}.journal ADD COLUMN IF NOT EXISTS attributes TEXT[];
CREATE INDEX IF NOT EXISTS journal_by_attribute ON {schema}.journal USING GIN (attributes);
";

/// Joins a span attribute's name and value into one element of the
/// `attributes` array (plugins' attribute texts hold no control
/// characters: `plugin::Call` replaces them).
fn attribute(name: &str, value: &str) -> String {
    format!("{name}\u{1f}{value}")
}

/// Journal records in PostgreSQL.
pub struct PostgresJournal {
    conn: Reconnecting,
    schema: String,
    pipeline: String,
}

/// Rows removed per statement when pruning.
const PRUNE_CHUNK: i64 = 5000;

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Reads the records of rows whose first column is the record's JSON.
fn records(rows: &[tokio_postgres::Row]) -> Result<Vec<Record>> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let json: String = row.try_get(0)?;
        match serde_json::from_str(&json) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!(error = %e, "A journal record cannot be read; skipped"),
        }
    }
    Ok(out)
}

impl PostgresJournal {
    /// Connects and creates the table if needed.
    pub async fn connect(url: &str, schema: &str, pipeline: &str) -> Result<Self> {
        let shown = crate::config::redact(url);
        let mut client = connect(url, "journal")
            .await
            .with_context(|| format!("cannot connect to the journal {shown}"))?;
        let tx = client.transaction().await?;
        // Hosts starting at once take turns creating it.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('switchyard journal ' || $1))",
            &[&schema],
        )
        .await?;
        tx.batch_execute(&SCHEMA.replace("{schema}", schema))
            .await
            .with_context(|| format!("journal {shown}, schema {schema}"))?;
        tx.commit().await?;
        Ok(PostgresJournal {
            conn: Reconnecting::new(url, "journal", client),
            schema: schema.to_owned(),
            pipeline: pipeline.to_owned(),
        })
    }

    /// The connection, re-established if it dropped.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        self.conn.client().await
    }

    fn table(&self) -> String {
        format!("{}.journal", self.schema)
    }

    async fn select(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Record>> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no journal connection")?;
        let rows = client.query(sql, params).await?;
        records(&rows)
    }
}

#[async_trait]
impl Store for PostgresJournal {
    async fn write(&self, records: Vec<Record>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut at = Vec::with_capacity(records.len());
        let mut ids = Vec::with_capacity(records.len());
        let mut flows = Vec::with_capacity(records.len());
        let mut causes = Vec::with_capacity(records.len());
        let mut json = Vec::with_capacity(records.len());
        // Each record's attributes as one text, split into the array in
        // the statement (an array of arrays would need equal lengths).
        let mut attributes: Vec<Option<String>> = Vec::with_capacity(records.len());
        for r in &records {
            at.push(to_i64(r.at_ms));
            ids.push(r.message_id.as_str());
            flows.push(r.correlation_id.as_deref());
            causes.push(r.causation_id.as_deref());
            json.push(serde_json::to_string(r).unwrap_or_else(|_| "null".into()));
            attributes.push((!r.attributes.is_empty()).then(|| {
                r.attributes
                    .iter()
                    .map(|(n, v)| attribute(n, v))
                    .collect::<Vec<_>>()
                    .join("\u{1e}")
            }));
        }
        let guard = self.client().await?;
        let client = guard.as_ref().context("no journal connection")?;
        // One statement per batch: the arrays become rows.
        client
            .execute(
                &format!(
                    "INSERT INTO {} (pipeline, at_ms, message_id, correlation_id, causation_id, record, attributes)
                     SELECT $1, a, m, c, k, r, string_to_array(x, E'\\x1e')
                     FROM unnest($2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[])
                          AS u(a, m, c, k, r, x)",
                    self.table()
                ),
                &[&self.pipeline, &at, &ids, &flows, &causes, &json, &attributes],
            )
            .await?;
        Ok(())
    }

    async fn of_message(&self, message_id: &str) -> Result<Vec<Record>> {
        self.select(
            &format!(
                "SELECT record FROM {} WHERE pipeline = $1 AND message_id = $2 ORDER BY at_ms, seq",
                self.table()
            ),
            &[&self.pipeline, &message_id],
        )
        .await
    }

    async fn caused_by(&self, message_ids: &[String], limit: usize) -> Result<Vec<Record>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.select(
            &format!(
                "SELECT record FROM {} WHERE pipeline = $1 AND causation_id = ANY($2) ORDER BY at_ms, seq LIMIT $3",
                self.table()
            ),
            &[&self.pipeline, &message_ids, &limit],
        )
        .await
    }

    async fn of_flow(&self, correlation_id: &str, limit: usize) -> Result<Vec<Record>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.select(
            &format!(
                "SELECT record FROM {} WHERE pipeline = $1 AND (correlation_id = $2 OR message_id = $2)
                 ORDER BY at_ms, seq LIMIT $3",
                self.table()
            ),
            &[&self.pipeline, &correlation_id, &limit],
        )
        .await
    }

    async fn ids_like(&self, prefix: &str, limit: usize) -> Result<Vec<String>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let pattern = format!(
            "{}%",
            prefix
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        let guard = self.client().await?;
        let client = guard.as_ref().context("no journal connection")?;
        let rows = client
            .query(
                &format!(
                    "SELECT DISTINCT message_id FROM {} WHERE pipeline = $1 AND message_id LIKE $2 LIMIT $3",
                    self.table()
                ),
                &[&self.pipeline, &pattern, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(Into::into))
            .collect()
    }

    async fn with_attribute(&self, name: &str, value: &str, limit: usize) -> Result<Vec<Record>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let element = vec![attribute(name, value)];
        self.select(
            &format!(
                "SELECT record FROM {} WHERE attributes @> $2::TEXT[] AND pipeline = $1
                 ORDER BY seq DESC LIMIT $3",
                self.table()
            ),
            &[&self.pipeline, &element, &limit],
        )
        .await
    }

    async fn prune(&self, before_ms: u64, max_records: u64) -> Result<u64> {
        // Everything below the cut goes: the records older than the
        // retention, and the oldest beyond `max_records`.
        let cut: Option<i64> = {
            let guard = self.client().await?;
            let client = guard.as_ref().context("no journal connection")?;
            let row = client
                .query_one(
                    &format!(
                        "SELECT greatest(
                             (SELECT max(seq) + 1 FROM {t} WHERE pipeline = $1 AND at_ms < $2),
                             (SELECT min(seq) FROM (SELECT seq FROM {t} WHERE pipeline = $1 ORDER BY seq DESC LIMIT $3) AS newest))",
                        t = self.table()
                    ),
                    &[&self.pipeline, &to_i64(before_ms), &to_i64(max_records)],
                )
                .await?;
            row.try_get(0)?
        };
        let Some(cut) = cut else {
            return Ok(0);
        };
        let mut removed = 0;
        // A chunk per statement, the connection free between chunks for
        // the writer.
        loop {
            let n = {
                let guard = self.client().await?;
                let client = guard.as_ref().context("no journal connection")?;
                client
                    .execute(
                        &format!(
                            "DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t} WHERE pipeline = $1 AND seq < $2 ORDER BY seq LIMIT $3)",
                            t = self.table()
                        ),
                        &[&self.pipeline, &cut, &PRUNE_CHUNK],
                    )
                    .await?
            };
            removed += n;
            if n < PRUNE_CHUNK.unsigned_abs() {
                return Ok(removed);
            }
        }
    }

    async fn count(&self) -> Result<u64> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no journal connection")?;
        let row = client
            .query_one(
                &format!("SELECT count(*) FROM {} WHERE pipeline = $1", self.table()),
                &[&self.pipeline],
            )
            .await?;
        let n: i64 = row.try_get(0)?;
        Ok(n.unsigned_abs())
    }

    fn location(&self) -> String {
        format!(
            "journal in PostgreSQL {} (schema {})",
            crate::config::redact(self.conn.url()),
            self.schema
        )
    }
}
