//! Plugin state in PostgreSQL, for hosts on RabbitMQ or Kafka that share a
//! pipeline's work: one table in the pipeline's schema, keyed by pipeline,
//! plugin and key. The connection is re-established when it drops.

use anyhow::{Context as _, Result, anyhow};
use async_trait::async_trait;
use tokio::runtime::Handle;
use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::Client;

use super::{Changes, Done, Reader, Store};
use crate::envelope::now_ms;
use crate::pg::connect;

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
";

pub struct PostgresState {
    url: String,
    schema: String,
    pipeline: String,
    client: Mutex<Option<Client>>,
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
            url: url.to_owned(),
            schema: schema.to_owned(),
            pipeline: pipeline.to_owned(),
            client: Mutex::new(Some(client)),
            runtime: Handle::current(),
        })
    }

    /// The connection, re-established if it dropped.
    async fn client(&self) -> Result<MutexGuard<'_, Option<Client>>> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(connect(&self.url, "state store").await.with_context(|| {
                format!(
                    "cannot reconnect to the state store {}",
                    crate::config::redact(&self.url)
                )
            })?);
        }
        Ok(guard)
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
        crate::config::redact(&self.url)
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
}

#[async_trait]
impl Store for PostgresState {
    async fn commit(&self, plugin: &str, changes: Changes, done: Vec<Done>) -> Result<()> {
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
            tx.commit().await?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        result.with_context(|| format!("cannot commit to the state store {}", self.shown()))
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
