//! Plugin state in PostgreSQL, for hosts on RabbitMQ or Kafka that share a
//! pipeline's work: one table in the pipeline's schema, keyed by pipeline,
//! plugin and key. The connection is re-established when it drops.

use anyhow::{Context as _, Result, anyhow};
use async_trait::async_trait;
use tokio::runtime::Handle;
use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::Client;

use super::{Changes, Reader, Store};
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
    async fn commit(&self, changes: Vec<(String, Changes)>) -> Result<()> {
        let result = async {
            let mut guard = self.client().await?;
            let client = guard.as_mut().ok_or_else(|| anyhow!("no state store connection"))?;
            let upsert = format!(
                "INSERT INTO {} AS s (pipeline, plugin, key, value, version, updated_at_ms) VALUES ($1, $2, $3, $4, 1, $5)
                 ON CONFLICT (pipeline, plugin, key) DO UPDATE SET value = excluded.value, version = s.version + 1, updated_at_ms = excluded.updated_at_ms",
                self.table()
            );
            let delete = format!(
                "DELETE FROM {} WHERE pipeline = $1 AND plugin = $2 AND key = $3",
                self.table()
            );
            let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
            let tx = client.transaction().await?;
            let upsert = tx.prepare(&upsert).await?;
            let delete = tx.prepare(&delete).await?;
            for (plugin, c) in &changes {
                for (key, value) in &c.writes {
                    match value {
                        Some(v) => {
                            tx.execute(&upsert, &[&self.pipeline, plugin, key, v, &now])
                                .await?;
                        }
                        None => {
                            tx.execute(&delete, &[&self.pipeline, plugin, key]).await?;
                        }
                    }
                }
            }
            tx.commit().await?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        result.with_context(|| format!("cannot commit to the state store {}", self.shown()))
    }

    fn location(&self) -> String {
        format!("{} (schema {})", self.shown(), self.schema)
    }
}
