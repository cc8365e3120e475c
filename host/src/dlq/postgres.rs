//! The shared dead-letter store: a table in a PostgreSQL schema, for hosts
//! that run on several machines. The connection is re-established when it
//! drops; migrations run under an advisory lock so hosts starting together
//! do not race.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

use super::tls::{self, TlsMode};
use super::{
    COLUMNS, DeadLetter, DeadLetterStore, ErrorInfo, Filter, Group, Param, Status, from_json, json,
    merge_attempts, opt_u64, payload_digest, to_i64, where_clause,
};
use crate::envelope::{Attempt, Envelope, Kind, now_ms};

/// How long to wait for the server before giving up on a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    url: String,
    schema: String,
    pipeline: String,
    client: Mutex<Option<Client>>,
}

fn ph(i: usize) -> String {
    format!("${i}")
}

fn boxed(p: &Param) -> Box<dyn ToSql + Sync + Send> {
    match p {
        Param::Text(s) => Box::new(s.clone()),
        Param::Int(i) => Box::new(*i),
    }
}

/// Connects with the TLS the connection string's `sslmode` asks for (see
/// [`super::tls`]). `prefer` falls back to a plain connection when the TLS
/// one fails, as libpq does.
async fn connect(url: &str) -> Result<Client> {
    let target = tls::target(url)?;
    if target.tls == TlsMode::Disable {
        return open(target.config.connect(NoTls)).await;
    }
    let config = tls::client_config(target.tls, target.roots.as_ref())?;
    let connector = tokio_postgres_rustls::MakeRustlsConnect::new(config);
    match open(target.config.connect(connector)).await {
        Err(e) if target.tls == TlsMode::Prefer => {
            let mut plain = target.config.clone();
            plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
            open(plain.connect(NoTls))
                .await
                .map_err(|plain_error| anyhow!("{e:#}; without TLS: {plain_error:#}"))
        }
        other => other,
    }
}

/// Waits for a connection within [`CONNECT_TIMEOUT`] and drives it in the
/// background.
async fn open<S, T>(
    connecting: impl Future<
        Output = Result<(Client, tokio_postgres::Connection<S, T>), tokio_postgres::Error>,
    >,
) -> Result<Client>
where
    tokio_postgres::Connection<S, T>:
        Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("no answer within {}s", CONNECT_TIMEOUT.as_secs()))??;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "Dead-letter store connection closed");
        }
    });
    Ok(client)
}

impl PostgresStore {
    /// Connects, creates the schema if needed and runs migrations.
    pub async fn connect(url: &str, schema: &str, pipeline: &str) -> Result<Self> {
        let shown = crate::config::redact(url);
        let mut client = connect(url)
            .await
            .with_context(|| format!("cannot connect to the dead-letter store {shown}"))?;
        migrate(&mut client, schema)
            .await
            .with_context(|| format!("dead-letter store {shown}, schema {schema}"))?;
        Ok(PostgresStore {
            url: url.to_owned(),
            schema: schema.to_owned(),
            pipeline: pipeline.to_owned(),
            client: Mutex::new(Some(client)),
        })
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The connection, re-established if it dropped.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(connect(&self.url).await.with_context(|| {
                format!(
                    "cannot reconnect to the dead-letter store {}",
                    crate::config::redact(&self.url)
                )
            })?);
        }
        Ok(guard)
    }

    fn table(&self) -> String {
        format!("{}.dead_letters", self.schema)
    }

    fn select(&self, filter: &Filter) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
        let (mut clause, params) = where_clause(filter, ph);
        let mut values: Vec<Box<dyn ToSql + Sync + Send>> = params.iter().map(boxed).collect();
        values.push(Box::new(self.pipeline.clone()));
        let scope = format!("pipeline = ${}", values.len());
        clause = if clause.is_empty() {
            format!("WHERE {scope}")
        } else {
            format!("{clause} AND {scope}")
        };
        (clause, values)
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

fn read_letter(row: &Row) -> Result<DeadLetter> {
    let id: String = row.try_get(0)?;
    let kind: String = row.try_get(7)?;
    let status: String = row.try_get(32)?;
    Ok(DeadLetter {
        pipeline: row.try_get(1)?,
        route: row.try_get(2)?,
        plugin_version: row.try_get(3)?,
        plugin_digest: row.try_get(4)?,
        message: Envelope {
            id: row.try_get(5)?,
            message_type: row.try_get(6)?,
            kind: Kind::parse(&kind).unwrap_or(Kind::Event),
            payload: row.try_get(8)?,
            content_type: row.try_get(9)?,
            headers: from_json(row.try_get(10)?, "headers", &id)?,
            correlation_id: row.try_get(11)?,
            causation_id: row.try_get(12)?,
            reply_to: row.try_get(13)?,
            partition_key: row.try_get(14)?,
            created_at_ms: row.try_get::<_, i64>(15)?.unsigned_abs(),
            attempt: u32::try_from(row.try_get::<_, i64>(16)?).unwrap_or(u32::MAX),
            history: Vec::new(),
        },
        error: ErrorInfo {
            kind: row.try_get(17)?,
            message: row.try_get(18)?,
            code: row.try_get(19)?,
            details: from_json(row.try_get(20)?, "error_details", &id)?,
            backtrace: row.try_get(21)?,
            output: row.try_get(22)?,
        },
        attempts: from_json(row.try_get(23)?, "attempts", &id)?,
        first_failed_at_ms: row.try_get::<_, i64>(24)?.unsigned_abs(),
        last_failed_at_ms: row.try_get::<_, i64>(25)?.unsigned_abs(),
        source: from_json(row.try_get(26)?, "source", &id)?,
        trace_id: row.try_get(27)?,
        span_id: row.try_get(28)?,
        host: row.try_get(29)?,
        fingerprint: row.try_get(30)?,
        cause: row.try_get(31)?,
        status: Status::parse(&status)
            .ok_or_else(|| anyhow!("dead letter {id}: unknown status `{status}`"))?,
        replay_count: u32::try_from(row.try_get::<_, i64>(33)?).unwrap_or(u32::MAX),
        replayed_at_ms: opt_u64(row.try_get(34)?),
        resolved_at_ms: opt_u64(row.try_get(35)?),
        note: row.try_get(36)?,
        id,
    })
}

#[async_trait]
impl DeadLetterStore for PostgresStore {
    async fn record(&self, letters: Vec<DeadLetter>) -> Result<Vec<String>> {
        let table = self.table();
        let mut guard = self.client().await?;
        let client = guard.as_mut().context("no dead-letter store connection")?;
        let tx = client.transaction().await?;
        let find = tx
            .prepare(&format!(
                "SELECT id, attempts FROM {table}
                 WHERE pipeline = $1 AND route = $2 AND message_id = $3 AND payload_sha256 = $4 FOR UPDATE"
            ))
            .await?;
        let update = tx
            .prepare(&format!(
                "UPDATE {table} SET plugin_version = $2, plugin_digest = $3, error_kind = $4, error_message = $5,
                     error_code = $6, error_details = $7, backtrace = $8, output = $9, attempts = $10,
                     last_failed_at_ms = $11, source = $12, trace_id = $13, span_id = $14, host = $15,
                     fingerprint = $16, cause = $17, status = 'dead'
                 WHERE id = $1"
            ))
            .await?;
        let placeholders: Vec<String> = (1..=38).map(ph).collect();
        let insert = tx
            .prepare(&format!(
                "INSERT INTO {table} ({COLUMNS}, payload_sha256) VALUES ({})",
                placeholders.join(", ")
            ))
            .await?;
        let mut ids = Vec::with_capacity(letters.len());
        for d in &letters {
            let digest = payload_digest(&d.message.payload);
            let existing = tx
                .query_opt(&find, &[&d.pipeline, &d.route, &d.message.id, &digest])
                .await?;
            match existing {
                Some(row) => {
                    let id: String = row.try_get(0)?;
                    let stored: Vec<Attempt> = from_json(row.try_get(1)?, "attempts", &id)?;
                    let all = merge_attempts(stored, &d.attempts);
                    tx.execute(
                        &update,
                        &[
                            &id,
                            &d.plugin_version,
                            &d.plugin_digest,
                            &d.error.kind,
                            &d.error.message,
                            &d.error.code,
                            &json(&d.error.details),
                            &d.error.backtrace,
                            &d.error.output,
                            &json(&all),
                            &to_i64(d.last_failed_at_ms),
                            &json(&d.source),
                            &d.trace_id,
                            &d.span_id,
                            &d.host,
                            &d.fingerprint,
                            &d.cause,
                        ],
                    )
                    .await?;
                    ids.push(id);
                }
                None => {
                    let m = &d.message;
                    tx.execute(
                        &insert,
                        &[
                            &d.id,
                            &d.pipeline,
                            &d.route,
                            &d.plugin_version,
                            &d.plugin_digest,
                            &m.id,
                            &m.message_type,
                            &m.kind.as_str(),
                            &m.payload,
                            &m.content_type,
                            &json(&m.headers),
                            &m.correlation_id,
                            &m.causation_id,
                            &m.reply_to,
                            &m.partition_key,
                            &to_i64(m.created_at_ms),
                            &i64::from(m.attempt),
                            &d.error.kind,
                            &d.error.message,
                            &d.error.code,
                            &json(&d.error.details),
                            &d.error.backtrace,
                            &d.error.output,
                            &json(&d.attempts),
                            &to_i64(d.first_failed_at_ms),
                            &to_i64(d.last_failed_at_ms),
                            &json(&d.source),
                            &d.trace_id,
                            &d.span_id,
                            &d.host,
                            &d.fingerprint,
                            &d.cause,
                            &d.status.as_str(),
                            &i64::from(d.replay_count),
                            &d.replayed_at_ms.map(to_i64),
                            &d.resolved_at_ms.map(to_i64),
                            &d.note,
                            &digest,
                        ],
                    )
                    .await?;
                    ids.push(d.id.clone());
                }
            }
        }
        tx.commit().await?;
        Ok(ids)
    }

    async fn list(&self, filter: &Filter) -> Result<Vec<DeadLetter>> {
        let (clause, values) = self.select(filter);
        let limit = filter
            .limit
            .map(|l| format!(" LIMIT {}", to_i64(l)))
            .unwrap_or_default();
        let sql = format!(
            "SELECT {COLUMNS} FROM {} {clause} ORDER BY last_failed_at_ms DESC, id DESC{limit}",
            self.table()
        );
        let params: Vec<&(dyn ToSql + Sync)> = values
            .iter()
            .map(|v| v.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let guard = self.client().await?;
        let client = guard.as_ref().context("no dead-letter store connection")?;
        client
            .query(&sql, &params)
            .await?
            .iter()
            .map(read_letter)
            .collect()
    }

    async fn groups(&self, filter: &Filter) -> Result<Vec<Group>> {
        let (clause, values) = self.select(filter);
        let limit = filter
            .limit
            .map(|l| format!(" LIMIT {}", to_i64(l)))
            .unwrap_or_default();
        let sql = format!(
            "SELECT fingerprint, COUNT(*), MIN(route), MIN(error_kind), MIN(cause), MIN(first_failed_at_ms), MAX(last_failed_at_ms)
             FROM {} {clause} GROUP BY fingerprint ORDER BY MAX(last_failed_at_ms) DESC{limit}",
            self.table()
        );
        let params: Vec<&(dyn ToSql + Sync)> = values
            .iter()
            .map(|v| v.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let guard = self.client().await?;
        let client = guard.as_ref().context("no dead-letter store connection")?;
        let mut out = Vec::new();
        for r in client.query(&sql, &params).await? {
            out.push(Group {
                fingerprint: r.try_get(0)?,
                count: r.try_get::<_, i64>(1)?.unsigned_abs(),
                route: r.try_get(2)?,
                error_kind: r.try_get(3)?,
                cause: r.try_get(4)?,
                first_failed_at_ms: r.try_get::<_, i64>(5)?.unsigned_abs(),
                last_failed_at_ms: r.try_get::<_, i64>(6)?.unsigned_abs(),
            });
        }
        Ok(out)
    }

    async fn get(&self, id: &str) -> Result<Option<DeadLetter>> {
        let pattern = format!(
            "{}%",
            id.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE pipeline = $1 AND id LIKE $2 LIMIT 2",
            self.table()
        );
        let guard = self.client().await?;
        let client = guard.as_ref().context("no dead-letter store connection")?;
        let rows = client.query(&sql, &[&self.pipeline, &pattern]).await?;
        match rows.len() {
            0 => Ok(None),
            1 => Ok(Some(read_letter(&rows[0])?)),
            _ => bail!("`{id}` matches several dead letters; give more of the id"),
        }
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
        let stmt = tx
            .prepare(&format!(
                "UPDATE {table}
                 SET replay_count = replay_count + CASE WHEN status = 'dead' THEN 1 ELSE 0 END,
                     status = 'replaying', replayed_at_ms = $3, replay_claim = $4
                 WHERE id = $1 AND pipeline = $2
                   AND (status = 'dead'
                        OR (status = 'replaying'
                            AND (replay_claim IS NOT DISTINCT FROM $4
                                 OR COALESCE(replayed_at_ms, 0) < $5)))
                 RETURNING {COLUMNS}"
            ))
            .await?;
        let now = to_i64(now_ms());
        let stale = to_i64(stale_before_ms);
        let mut out = Vec::new();
        for id in ids {
            if let Some(row) = tx
                .query_opt(&stmt, &[id, &self.pipeline, &now, &claim, &stale])
                .await?
            {
                out.push(read_letter(&row)?);
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
