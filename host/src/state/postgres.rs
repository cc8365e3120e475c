//! Plugin state in PostgreSQL, for hosts on RabbitMQ or Kafka that share a
//! pipeline's work: one table in the pipeline's schema, keyed by pipeline,
//! plugin and key. The connection is re-established when it drops.

use anyhow::{Context as _, Result, anyhow};
use async_trait::async_trait;
use tokio::runtime::Handle;
use tokio::sync::MutexGuard;
use tokio_postgres::Client;

use super::{Changes, Done, Reader, Store};
use crate::envelope::now_ms;
use crate::pg::{Reconnecting, connect};
use crate::saga::{Conflict, Instance, Listed, Pending, Query, Status, Step, Timeout};

/// The table, created if missing; `{schema}` is replaced. Keys compare byte
/// by byte (`C`), as in the SQLite store, so listing by prefix is a range.
const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.plugin_state (
    pipeline      TEXT NOT NULL,
    plugin        TEXT NOT NULL,
    key           TEXT COLLATE \"C\" NOT NULL,
    value         BYTEA NOT NULL,
    version       BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (pipeline, plugin, key)
);
CREATE TABLE IF NOT EXISTS {schema}.processed_messages (
    pipeline        TEXT NOT NULL,
    plugin          TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    processed_at_ms BIGINT NOT NULL,
    outcome         BYTEA NOT NULL,
    PRIMARY KEY (pipeline, plugin, message_id)
);
CREATE INDEX IF NOT EXISTS processed_messages_by_age ON {schema}.processed_messages (processed_at_ms);
CREATE TABLE IF NOT EXISTS {schema}.saga_instances (
    pipeline       TEXT NOT NULL,
    plugin         TEXT NOT NULL,
    instance       TEXT NOT NULL,
    status         TEXT NOT NULL,
    version        BIGINT NOT NULL,
    plugin_version TEXT NOT NULL,
    started_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL,
    last_type      TEXT NOT NULL,
    PRIMARY KEY (pipeline, plugin, instance)
);
CREATE INDEX IF NOT EXISTS saga_instances_by_update ON {schema}.saga_instances (updated_at_ms);
CREATE INDEX IF NOT EXISTS saga_instances_by_status ON {schema}.saga_instances (pipeline, plugin, status);
CREATE TABLE IF NOT EXISTS {schema}.saga_steps (
    pipeline TEXT NOT NULL,
    plugin   TEXT NOT NULL,
    instance TEXT NOT NULL,
    version  BIGINT NOT NULL,
    record   BYTEA NOT NULL,
    PRIMARY KEY (pipeline, plugin, instance, version)
);
CREATE TABLE IF NOT EXISTS {schema}.saga_timeouts (
    pipeline     TEXT NOT NULL,
    plugin       TEXT NOT NULL,
    id           TEXT NOT NULL,
    instance     TEXT NOT NULL,
    due_at_ms    BIGINT NOT NULL,
    message_type TEXT NOT NULL,
    command      BOOLEAN NOT NULL,
    payload      BYTEA NOT NULL,
    fired_at_ms  BIGINT,
    sends        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (pipeline, plugin, id)
);
CREATE INDEX IF NOT EXISTS saga_timeouts_by_instance ON {schema}.saga_timeouts (pipeline, plugin, instance);
CREATE INDEX IF NOT EXISTS saga_timeouts_by_due ON {schema}.saga_timeouts (due_at_ms);
";

const INSTANCE_COLUMNS: &str =
    "status, version, plugin_version, started_at_ms, updated_at_ms, last_type";

/// An instance row (its columns in [`INSTANCE_COLUMNS`] order from
/// `first`), or why it cannot be read.
fn instance_row(row: &tokio_postgres::Row, first: usize) -> Result<Result<Instance, String>> {
    let status: String = row.try_get(first)?;
    let version: i64 = row.try_get(first + 1)?;
    let Some(status) = Status::parse(&status) else {
        return Ok(Err(format!("unknown status {status:?}")));
    };
    let Ok(version) = u64::try_from(version) else {
        return Ok(Err(format!("negative version {version}")));
    };
    Ok(Ok(Instance {
        status,
        version,
        plugin_version: row.try_get(first + 2)?,
        started_at_ms: row.try_get::<_, i64>(first + 3)?.unsigned_abs(),
        updated_at_ms: row.try_get::<_, i64>(first + 4)?.unsigned_abs(),
        last_type: row.try_get(first + 5)?,
    }))
}

/// A deadlock or serialization failure between two hosts' commits is a
/// conflict like any other: the batch runs again.
fn contention_as_conflict(plugin: &str, e: anyhow::Error) -> anyhow::Error {
    use tokio_postgres::error::SqlState;
    let contended = e
        .chain()
        .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .any(|pg| {
            pg.code().is_some_and(|c| {
                *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
            })
        });
    if contended {
        anyhow::Error::new(crate::saga::Contention {
            plugin: plugin.to_owned(),
            why: format!("{e:#}"),
        })
    } else {
        e
    }
}

pub struct PostgresState {
    conn: Reconnecting,
    schema: String,
    pipeline: String,
    /// Plugin calls read from blocking threads; the queries run here.
    runtime: Handle,
}

impl PostgresState {
    /// Connects and creates the table if needed. Must be called within the
    /// host's runtime.
    pub async fn connect(url: &str, schema: &str, pipeline: &str) -> Result<Self> {
        let shown = crate::config::redact(url);
        let mut client = connect(url, "state store")
            .await
            .with_context(|| format!("cannot connect to the state store {shown}"))?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('switchyard state ' || $1))",
            &[&schema],
        )
        .await?;
        tx.batch_execute(&SCHEMA.replace("{schema}", schema))
            .await
            .with_context(|| format!("state store {shown}, schema {schema}"))?;
        tx.commit().await?;
        Ok(PostgresState {
            conn: Reconnecting::new(url, "state store", client),
            schema: schema.to_owned(),
            pipeline: pipeline.to_owned(),
            runtime: Handle::current(),
        })
    }

    /// The connection, re-established if it dropped.
    async fn client(&self) -> Result<MutexGuard<'_, Option<Client>>> {
        self.conn.client().await
    }

    fn table(&self) -> String {
        format!("{}.plugin_state", self.schema)
    }

    async fn get_async(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no state store connection")?;
        let sql = format!(
            "SELECT value FROM {} WHERE pipeline = $1 AND plugin = $2 AND key = $3",
            self.table()
        );
        let row = client
            .query_opt(&sql, &[&self.pipeline, &plugin, &key])
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    async fn keys_async(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no state store connection")?;
        let sql = format!(
            "SELECT key FROM {} WHERE pipeline = $1 AND plugin = $2 AND key >= $3 AND ($4::text IS NULL OR key > $4) ORDER BY key LIMIT $5",
            self.table()
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(&sql, &[&self.pipeline, &plugin, &prefix, &after, &limit])
            .await?;
        // The keys with the prefix come first; the first without ends them.
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            let key: String = row.try_get(0)?;
            if !key.starts_with(prefix) {
                break;
            }
            keys.push(key);
        }
        Ok(keys)
    }

    fn shown(&self) -> String {
        crate::config::redact(self.conn.url())
    }

    async fn instance_async(
        &self,
        plugin: &str,
        id: &str,
    ) -> Result<Option<Result<Instance, String>>> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no state store connection")?;
        let sql = format!(
            "SELECT {INSTANCE_COLUMNS} FROM {}.saga_instances WHERE pipeline = $1 AND plugin = $2 AND instance = $3",
            self.schema
        );
        let row = client
            .query_opt(&sql, &[&self.pipeline, &plugin, &id])
            .await?;
        row.map(|r| instance_row(&r, 0)).transpose()
    }

    async fn instances_async(&self, q: &Query) -> Result<Vec<Listed>> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no state store connection")?;
        let sql = format!(
            "SELECT plugin, instance, {INSTANCE_COLUMNS} FROM {}.saga_instances
             WHERE pipeline = $1 AND ($2::text IS NULL OR plugin = $2) AND ($3::text IS NULL OR status = $3)
               AND ($4::bigint IS NULL OR updated_at_ms < $4) AND ($5::bigint IS NULL OR started_at_ms < $5)
             ORDER BY updated_at_ms DESC LIMIT $6",
            self.schema
        );
        let ms = |t: Option<u64>| t.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                &sql,
                &[
                    &self.pipeline,
                    &q.plugin,
                    &q.status.map(Status::as_str),
                    &ms(q.updated_before_ms),
                    &ms(q.started_before_ms),
                    &limit,
                ],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let plugin: String = row.try_get(0)?;
            let id: String = row.try_get(1)?;
            super::push_listed(&mut out, plugin, id, instance_row(&row, 2)?);
        }
        Ok(out)
    }

    async fn active_async(&self, plugin: &str) -> Result<u64> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no state store connection")?;
        let sql = format!(
            "SELECT COUNT(*) FROM {}.saga_instances WHERE pipeline = $1 AND plugin = $2 AND status IN ('running', 'failed')",
            self.schema
        );
        let row = client.query_one(&sql, &[&self.pipeline, &plugin]).await?;
        Ok(row.try_get::<_, i64>(0)?.unsigned_abs())
    }

    async fn steps_async(&self, plugin: &str, id: &str) -> Result<Vec<Step>> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no state store connection")?;
        let sql = format!(
            "SELECT version, record FROM {}.saga_steps WHERE pipeline = $1 AND plugin = $2 AND instance = $3 ORDER BY version",
            self.schema
        );
        let rows = client.query(&sql, &[&self.pipeline, &plugin, &id]).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let version: i64 = row.try_get(0)?;
            let record: Vec<u8> = row.try_get(1)?;
            out.push(
                Step::decode(&record).with_context(|| {
                    format!("step {version} of saga instance {id} cannot be read")
                })?,
            );
        }
        Ok(out)
    }

    /// Applies one saga step inside `tx`: the instance must be at the
    /// version the step read. The row update waits for a concurrent
    /// writer of the same instance and then finds its version moved on.
    async fn apply_step(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        plugin: &str,
        step: &Step,
    ) -> Result<()> {
        let after = step.instance();
        let ms = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
        let version = i64::try_from(after.version).unwrap_or(i64::MAX);
        let read = i64::try_from(step.read_version).unwrap_or(i64::MAX);
        let rows = if step.read_version == 0 {
            let sql = format!(
                "INSERT INTO {}.saga_instances (pipeline, plugin, instance, {INSTANCE_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                self.schema
            );
            tx.execute(
                &sql,
                &[
                    &self.pipeline,
                    &plugin,
                    &step.instance,
                    &after.status.as_str(),
                    &version,
                    &after.plugin_version,
                    &ms(after.started_at_ms),
                    &ms(after.updated_at_ms),
                    &after.last_type,
                ],
            )
            .await?
        } else {
            let sql = format!(
                "UPDATE {}.saga_instances SET status = $4, version = $5, plugin_version = $6, updated_at_ms = $7, last_type = $8
                 WHERE pipeline = $1 AND plugin = $2 AND instance = $3 AND version = $9",
                self.schema
            );
            tx.execute(
                &sql,
                &[
                    &self.pipeline,
                    &plugin,
                    &step.instance,
                    &after.status.as_str(),
                    &version,
                    &after.plugin_version,
                    &ms(after.updated_at_ms),
                    &after.last_type,
                    &read,
                ],
            )
            .await?
        };
        if rows == 0 {
            return Err(Conflict {
                plugin: plugin.to_owned(),
                instance: step.instance.clone(),
                expected: step.read_version,
            }
            .into());
        }
        let sql = format!(
            "INSERT INTO {}.saga_steps (pipeline, plugin, instance, version, record) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (pipeline, plugin, instance, version) DO UPDATE SET record = excluded.record",
            self.schema
        );
        tx.execute(
            &sql,
            &[
                &self.pipeline,
                &plugin,
                &step.instance,
                &version,
                &step.encode(),
            ],
        )
        .await?;
        let timeouts = format!("{}.saga_timeouts", self.schema);
        if let Some(fired) = &step.fired {
            let sql =
                format!("DELETE FROM {timeouts} WHERE pipeline = $1 AND plugin = $2 AND id = $3");
            tx.execute(&sql, &[&self.pipeline, &plugin, fired]).await?;
        }
        if step.completed {
            let sql = format!(
                "DELETE FROM {timeouts} WHERE pipeline = $1 AND plugin = $2 AND instance = $3"
            );
            tx.execute(&sql, &[&self.pipeline, &plugin, &step.instance])
                .await?;
        } else {
            let sql = format!(
                "INSERT INTO {timeouts} (pipeline, plugin, id, instance, due_at_ms, message_type, command, payload)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            );
            for t in &step.timeouts {
                tx.execute(
                    &sql,
                    &[
                        &self.pipeline,
                        &plugin,
                        &t.id,
                        &step.instance,
                        &ms(t.due_ms),
                        &t.message_type,
                        &t.command,
                        &t.payload,
                    ],
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn timeout_instance_async(&self, plugin: &str, id: &str) -> Result<Option<String>> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no state store connection")?;
        let sql = format!(
            "SELECT instance FROM {}.saga_timeouts WHERE pipeline = $1 AND plugin = $2 AND id = $3",
            self.schema
        );
        Ok(client
            .query_opt(&sql, &[&self.pipeline, &plugin, &id])
            .await?
            .map(|r| r.try_get(0))
            .transpose()?)
    }

    async fn timeouts_async(&self, plugin: &str, instance: &str) -> Result<Vec<Pending>> {
        let guard = self.client().await?;
        let client = guard.as_ref().context("no state store connection")?;
        let sql = format!(
            "SELECT id, due_at_ms, message_type, fired_at_ms, sends FROM {}.saga_timeouts
             WHERE pipeline = $1 AND plugin = $2 AND instance = $3 ORDER BY due_at_ms, id",
            self.schema
        );
        let rows = client
            .query(&sql, &[&self.pipeline, &plugin, &instance])
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(Pending {
                id: row.try_get(0)?,
                due_ms: row.try_get::<_, i64>(1)?.unsigned_abs(),
                message_type: row.try_get(2)?,
                fired_at_ms: row.try_get::<_, Option<i64>>(3)?.map(i64::unsigned_abs),
                sends: u32::try_from(row.try_get::<_, i32>(4)?).unwrap_or(0),
            });
        }
        Ok(out)
    }
}

impl Reader for PostgresState {
    fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.runtime
            .block_on(self.get_async(plugin, key))
            .with_context(|| format!("cannot read the state store {}", self.shown()))
    }

    fn keys(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        self.runtime
            .block_on(self.keys_async(plugin, prefix, after, limit))
            .with_context(|| format!("cannot read the state store {}", self.shown()))
    }

    fn instance(&self, plugin: &str, id: &str) -> Result<Option<Instance>> {
        let row = self
            .runtime
            .block_on(self.instance_async(plugin, id))
            .with_context(|| format!("cannot read the state store {}", self.shown()))?;
        super::found_instance(plugin, id, row)
    }

    fn instances(&self, query: &Query) -> Result<Vec<Listed>> {
        self.runtime
            .block_on(self.instances_async(query))
            .with_context(|| format!("cannot read the state store {}", self.shown()))
    }

    fn steps(&self, plugin: &str, id: &str) -> Result<Vec<Step>> {
        self.runtime
            .block_on(self.steps_async(plugin, id))
            .with_context(|| format!("cannot read the state store {}", self.shown()))
    }

    fn active(&self, plugin: &str) -> Result<u64> {
        self.runtime
            .block_on(self.active_async(plugin))
            .with_context(|| format!("cannot read the state store {}", self.shown()))
    }

    fn timeout_instance(&self, plugin: &str, id: &str) -> Result<Option<String>> {
        self.runtime
            .block_on(self.timeout_instance_async(plugin, id))
            .with_context(|| format!("cannot read the state store {}", self.shown()))
    }

    fn timeouts(&self, plugin: &str, instance: &str) -> Result<Vec<Pending>> {
        self.runtime
            .block_on(self.timeouts_async(plugin, instance))
            .with_context(|| format!("cannot read the state store {}", self.shown()))
    }
}

#[async_trait]
impl Store for PostgresState {
    async fn ping(&self) -> Result<()> {
        let guard = self.client().await?;
        let client = guard
            .as_ref()
            .ok_or_else(|| anyhow!("no state store connection"))?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    async fn commit(
        &self,
        plugin: &str,
        changes: Changes,
        steps: Vec<Step>,
        done: Vec<Done>,
    ) -> Result<()> {
        // One statement per kind of write, whatever the batch's size: the
        // rows travel as arrays.
        let (mut set_keys, mut set_values, mut deleted) = (Vec::new(), Vec::new(), Vec::new());
        for (key, value) in changes.writes {
            match value {
                Some(v) => {
                    set_keys.push(key);
                    set_values.push(v);
                }
                None => deleted.push(key),
            }
        }
        let done_ids: Vec<&str> = done.iter().map(|d| d.message_id.as_str()).collect();
        let done_outcomes: Vec<Vec<u8>> = done.iter().map(Done::encode).collect();
        let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
        let result = async {
            let mut guard = self.client().await?;
            let client = guard.as_mut().ok_or_else(|| anyhow!("no state store connection"))?;
            let tx = client.transaction().await?;
            if !done_ids.is_empty() {
                let sql = format!(
                    "INSERT INTO {}.processed_messages (pipeline, plugin, message_id, processed_at_ms, outcome)
                     SELECT $1, $2, m, $4, o FROM unnest($3::text[], $5::bytea[]) AS u(m, o)",
                    self.schema
                );
                tx.execute(&sql, &[&self.pipeline, &plugin, &done_ids, &now, &done_outcomes])
                    .await
                    .context("cannot record the batch's messages as handled (was one handled already?)")?;
            }
            if !set_keys.is_empty() {
                let sql = format!(
                    "INSERT INTO {} AS s (pipeline, plugin, key, value, version, updated_at_ms)
                     SELECT $1, $2, k, v, 1, $5 FROM unnest($3::text[], $4::bytea[]) AS u(k, v)
                     ON CONFLICT (pipeline, plugin, key) DO UPDATE SET value = excluded.value, version = s.version + 1, updated_at_ms = excluded.updated_at_ms",
                    self.table()
                );
                tx.execute(&sql, &[&self.pipeline, &plugin, &set_keys, &set_values, &now])
                    .await?;
            }
            if !deleted.is_empty() {
                let sql = format!(
                    "DELETE FROM {} WHERE pipeline = $1 AND plugin = $2 AND key = ANY($3)",
                    self.table()
                );
                tx.execute(&sql, &[&self.pipeline, &plugin, &deleted]).await?;
            }
            for step in &steps {
                self.apply_step(&tx, plugin, step).await?;
            }
            tx.commit().await?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        result
            .map_err(|e| contention_as_conflict(plugin, e))
            .with_context(|| format!("cannot commit to the state store {}", self.shown()))
    }

    async fn mark_failed(&self, plugin: &str, instances: Vec<(String, u64)>) -> Result<()> {
        let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
        let (ids, versions): (Vec<String>, Vec<i64>) = instances
            .into_iter()
            .map(|(id, v)| (id, i64::try_from(v).unwrap_or(i64::MAX)))
            .unzip();
        let result = async {
            let guard = self.client().await?;
            let client = guard.as_ref().context("no state store connection")?;
            let sql = format!(
                "UPDATE {s}.saga_instances AS i SET status = 'failed', updated_at_ms = $5
                 FROM unnest($3::text[], $4::bigint[]) AS f(instance, version)
                 WHERE i.pipeline = $1 AND i.plugin = $2 AND i.instance = f.instance
                   AND i.version = f.version AND i.status = 'running'",
                s = self.schema
            );
            client
                .execute(&sql, &[&self.pipeline, &plugin, &ids, &versions, &now])
                .await?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        result.with_context(|| format!("cannot write to the state store {}", self.shown()))
    }

    async fn done(&self, plugin: &str, ids: &[String]) -> Result<Vec<Done>> {
        let result = async {
            let guard = self.client().await?;
            let client = guard.as_ref().context("no state store connection")?;
            let sql = format!(
                "SELECT message_id, outcome FROM {}.processed_messages WHERE pipeline = $1 AND plugin = $2 AND message_id = ANY($3)",
                self.schema
            );
            let rows = client.query(&sql, &[&self.pipeline, &plugin, &ids]).await?;
            let mut found = Vec::with_capacity(rows.len());
            for row in rows {
                let id: String = row.try_get(0)?;
                let bytes: Vec<u8> = row.try_get(1)?;
                found.push(super::read_done(plugin, id, &bytes));
            }
            Ok::<_, anyhow::Error>(found)
        }
        .await;
        result.with_context(|| format!("cannot read the state store {}", self.shown()))
    }

    async fn claim_timeouts(
        &self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, String, Timeout)>> {
        let result = async {
            let guard = self.client().await?;
            let client = guard.as_ref().context("no state store connection")?;
            // Rows another host is claiming are skipped, not waited for.
            let sql = format!(
                "UPDATE {s}.saga_timeouts AS t SET fired_at_ms = $2, sends = t.sends + 1
                 FROM (SELECT plugin, id FROM {s}.saga_timeouts
                       WHERE pipeline = $1 AND due_at_ms <= $2 AND sends < $5
                         AND (fired_at_ms IS NULL OR fired_at_ms + $3 * (1::bigint << (sends - 1)) <= $2)
                       ORDER BY due_at_ms LIMIT $4 FOR UPDATE SKIP LOCKED) AS due
                 WHERE t.pipeline = $1 AND t.plugin = due.plugin AND t.id = due.id
                 RETURNING t.plugin, t.id, t.instance, t.due_at_ms, t.message_type, t.command, t.payload",
                s = self.schema
            );
            let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
            let lease = i64::try_from(lease_ms).unwrap_or(i64::MAX);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let max_sends = i32::try_from(super::MAX_TIMEOUT_SENDS).unwrap_or(i32::MAX);
            let rows = client
                .query(&sql, &[&self.pipeline, &now, &lease, &limit, &max_sends])
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                out.push((
                    row.try_get::<_, String>(0)?,
                    row.try_get::<_, String>(2)?,
                    Timeout {
                        id: row.try_get(1)?,
                        due_ms: row.try_get::<_, i64>(3)?.unsigned_abs(),
                        message_type: row.try_get(4)?,
                        command: row.try_get(5)?,
                        payload: row.try_get(6)?,
                    },
                ));
            }
            Ok::<_, anyhow::Error>(out)
        }
        .await;
        result.with_context(|| format!("cannot claim due timeouts in {}", self.shown()))
    }

    async fn forget_timeouts(&self, plugin: &str, ids: Vec<String>) -> Result<()> {
        let result = async {
            let guard = self.client().await?;
            let client = guard.as_ref().context("no state store connection")?;
            let sql = format!(
                "DELETE FROM {}.saga_timeouts WHERE pipeline = $1 AND plugin = $2 AND id = ANY($3)",
                self.schema
            );
            client
                .execute(&sql, &[&self.pipeline, &plugin, &ids])
                .await?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        result.with_context(|| format!("cannot forget timeouts in {}", self.shown()))
    }

    async fn prune(&self, before_ms: u64) -> Result<u64> {
        let result = async {
            let guard = self.client().await?;
            let client = guard.as_ref().context("no state store connection")?;
            let sql = format!(
                "DELETE FROM {}.processed_messages WHERE pipeline = $1 AND processed_at_ms < $2",
                self.schema
            );
            let before = i64::try_from(before_ms).unwrap_or(i64::MAX);
            Ok::<_, anyhow::Error>(client.execute(&sql, &[&self.pipeline, &before]).await?)
        }
        .await;
        result.with_context(|| format!("cannot prune the state store {}", self.shown()))
    }

    fn location(&self) -> String {
        format!("{} (schema {})", self.shown(), self.schema)
    }
}
