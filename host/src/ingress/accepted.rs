//! The ids the ingress has made durable, so that a client that retries a
//! request under the same id (a CloudEvent's `id`, an `Idempotency-Key`)
//! does not send the message twice. Kept for `[ingress] dedupe_window` in a
//! SQLite file of the host's own, or, when the pipeline keeps its state in
//! PostgreSQL (hosts that share its work), in the same database, so that a
//! retry that reaches another host of the pipeline is known there too.
//!
//! An id is written after its message is durable, never before: a host
//! that dies in between has sent the message and not noted it, so a retry
//! sends it again (at least once), but no message is ever refused for a
//! send that did not happen. Requests under one id at the same moment are
//! kept apart in memory: the second is told to come back.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use rusqlite::{Connection, OptionalExtension as _, params};

/// Ids are a type's own: a client that may post one type cannot claim,
/// and so suppress, the ids of another. (`accepted`, keyed by id alone,
/// was this table's first form; it is left unread.)
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accepted_ids (
    message_type TEXT NOT NULL,
    id TEXT NOT NULL,
    accepted_at_ms INTEGER NOT NULL,
    PRIMARY KEY (message_type, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS accepted_ids_by_time ON accepted_ids (accepted_at_ms);
";

/// The same table in PostgreSQL, in the state's schema; `{schema}` is
/// replaced. Rows are a pipeline's own.
const PG_SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.ingress_ids (
    pipeline TEXT NOT NULL,
    message_type TEXT NOT NULL,
    id TEXT NOT NULL,
    accepted_at_ms BIGINT NOT NULL,
    PRIMARY KEY (pipeline, message_type, id)
);
CREATE INDEX IF NOT EXISTS ingress_ids_by_time ON {schema}.ingress_ids (accepted_at_ms);
";

/// The accepted ids of one host's ingress.
pub struct Accepted {
    store: Ids,
    window: Duration,
    in_progress: Mutex<HashSet<String>>,
}

/// Where the ids are kept.
enum Ids {
    Sqlite {
        path: PathBuf,
        conn: Arc<Mutex<Connection>>,
    },
    Postgres(Box<SharedIds>),
}

/// The ids in PostgreSQL. The connection is made again when it drops.
struct SharedIds {
    conn: crate::pg::Reconnecting,
    schema: String,
    pipeline: String,
}

impl SharedIds {
    /// Runs one statement; `sql`'s `{schema}` is replaced and its first
    /// parameter is the pipeline.
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let guard = self.conn.client().await?;
        let client = guard
            .as_ref()
            .context("no connection to the ingress's id store")?;
        let sql = sql.replace("{schema}", &self.schema);
        let mut all: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&self.pipeline];
        all.extend_from_slice(params);
        client.query(&sql, &all).await.map_err(|e| {
            anyhow!(
                "the ingress's ids in PostgreSQL (schema {}): {e}",
                self.schema
            )
        })
    }
}

/// What became of a claim on an id.
pub enum Claim<'a> {
    /// Nobody has it: the request goes on, and holds the id until the
    /// guard is dropped.
    New(Holding<'a>),
    /// A message with this id was made durable at this time (ms since the
    /// epoch).
    Done(u64),
    /// Another request is sending a message with this id right now.
    Busy,
}

/// An id a request is sending; let go when dropped.
pub struct Holding<'a> {
    accepted: &'a Accepted,
    id: String,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        lock(&self.accepted.in_progress).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Accepted {
    /// The ids of `pipeline`'s ingress: in PostgreSQL when its state is
    /// there, else in a file of the host's own in its state directory.
    pub async fn open_for(pipeline: &crate::config::Pipeline, window: Duration) -> Result<Self> {
        match &pipeline.state.store {
            crate::config::StoreConfig::Postgres { url, schema } => {
                let url = url.resolve("state store")?;
                let client = crate::pg::connect(&url, "ingress ids")
                    .await
                    .context("cannot reach the ingress's id store in PostgreSQL")?;
                crate::pg::create_tables(&client, &PG_SCHEMA.replace("{schema}", schema))
                    .await
                    .with_context(|| {
                        format!(
                            "cannot create the ingress's id table in PostgreSQL (schema {schema})"
                        )
                    })?;
                let ids = SharedIds {
                    conn: crate::pg::Reconnecting::new(&url, "ingress ids", client),
                    schema: schema.clone(),
                    pipeline: pipeline.name.clone(),
                };
                Ok(Accepted {
                    store: Ids::Postgres(Box::new(ids)),
                    window,
                    in_progress: Mutex::new(HashSet::new()),
                })
            }
            crate::config::StoreConfig::Embedded { .. } => {
                let path = pipeline
                    .state_dir
                    .join(format!("{}-ingress.db", pipeline.name));
                tokio::task::spawn_blocking(move || Accepted::open(&path, window))
                    .await
                    .context("opening the ingress's ids stopped")?
            }
        }
    }

    /// Opens (creating if needed) the file at `path`.
    pub fn open(path: &Path, window: Duration) -> Result<Self> {
        crate::files::create_private_file(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the ingress's ids {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // An id noted is an id a retry will not send again: it must
        // survive what the message survived.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("cannot create the table in {}", path.display()))?;
        Ok(Accepted {
            store: Ids::Sqlite {
                path: path.to_owned(),
                conn: Arc::new(Mutex::new(conn)),
            },
            window,
            in_progress: Mutex::new(HashSet::new()),
        })
    }

    async fn blocking<T: Send + 'static>(
        path: &Path,
        conn: &Arc<Mutex<Connection>>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = conn.clone();
        tokio::task::spawn_blocking(move || f(&lock(&conn)))
            .await
            .context("the ingress's id store stopped")?
            .with_context(|| format!("the ingress's ids {}", path.display()))
    }

    /// Claims `id` of `message_type` for a request that is about to send
    /// it.
    pub async fn claim(&self, message_type: &str, id: &str) -> Result<Claim<'_>> {
        // A type name has no NUL: the pair is one key.
        let held = format!("{message_type}\0{id}");
        if !lock(&self.in_progress).insert(held.clone()) {
            return Ok(Claim::Busy);
        }
        let holding = Holding {
            accepted: self,
            id: held,
        };
        let since = ms(Duration::from_millis(crate::envelope::now_ms())) - ms(self.window);
        let found: Option<i64> = match &self.store {
            Ids::Sqlite { path, conn } => {
                let (t, key) = (message_type.to_owned(), id.to_owned());
                Self::blocking(path, conn, move |c| {
                    c.query_row(
                        "SELECT accepted_at_ms FROM accepted_ids
                         WHERE message_type = ?1 AND id = ?2 AND accepted_at_ms >= ?3",
                        params![t, key, since],
                        |r| r.get(0),
                    )
                    .optional()
                })
                .await?
            }
            Ids::Postgres(pg) => pg
                .rows(
                    "SELECT accepted_at_ms FROM {schema}.ingress_ids
                     WHERE pipeline = $1 AND message_type = $2 AND id = $3 AND accepted_at_ms >= $4",
                    &[&message_type, &id, &since],
                )
                .await?
                .first()
                .map(|r| r.try_get(0))
                .transpose()?,
        };
        Ok(match found {
            Some(at) => Claim::Done(at.unsigned_abs()),
            None => Claim::New(holding),
        })
    }

    /// Notes that the message of `message_type` with `id` is durable.
    pub async fn done(&self, message_type: &str, id: &str) -> Result<()> {
        let now = i64::try_from(crate::envelope::now_ms()).unwrap_or(i64::MAX);
        match &self.store {
            Ids::Sqlite { path, conn } => {
                let (id, t) = (id.to_owned(), message_type.to_owned());
                Self::blocking(path, conn, move |c| {
                    c.execute(
                        "INSERT INTO accepted_ids (message_type, id, accepted_at_ms) VALUES (?1, ?2, ?3)
                         ON CONFLICT (message_type, id) DO UPDATE SET accepted_at_ms = ?3",
                        params![t, id, now],
                    )
                })
                .await?;
            }
            Ids::Postgres(pg) => {
                pg.rows(
                    "INSERT INTO {schema}.ingress_ids (pipeline, message_type, id, accepted_at_ms)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (pipeline, message_type, id) DO UPDATE SET accepted_at_ms = $4",
                    &[&message_type, &id, &now],
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Forgets the ids older than the window; how many.
    pub async fn prune(&self) -> Result<usize> {
        let before = i64::try_from(crate::envelope::now_ms()).unwrap_or(i64::MAX) - ms(self.window);
        match &self.store {
            Ids::Sqlite { path, conn } => {
                Self::blocking(path, conn, move |c| {
                    c.execute(
                        "DELETE FROM accepted_ids WHERE accepted_at_ms < ?1",
                        params![before],
                    )
                })
                .await
            }
            Ids::Postgres(pg) => Ok(pg
                .rows(
                    "WITH gone AS (DELETE FROM {schema}.ingress_ids
                     WHERE pipeline = $1 AND accepted_at_ms < $2 RETURNING 1)
                     SELECT count(*) FROM gone",
                    &[&before],
                )
                .await?
                .first()
                .map(|r| r.try_get::<_, i64>(0))
                .transpose()?
                .map_or(0, |n| usize::try_from(n).unwrap_or(0))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_id_is_new_busy_while_held_and_done_once_noted() {
        let dir = tempfile::tempdir().unwrap();
        let a = Accepted::open(&dir.path().join("ids.db"), Duration::from_secs(3600)).unwrap();
        let Claim::New(held) = a.claim("PlaceOrder", "k-1").await.unwrap() else {
            panic!("a first claim is new");
        };
        assert!(matches!(
            a.claim("PlaceOrder", "k-1").await.unwrap(),
            Claim::Busy
        ));
        // Not noted (the send failed): free again once let go.
        drop(held);
        let Claim::New(held) = a.claim("PlaceOrder", "k-1").await.unwrap() else {
            panic!("an id never noted is new again");
        };
        a.done("PlaceOrder", "k-1").await.unwrap();
        drop(held);
        assert!(matches!(
            a.claim("PlaceOrder", "k-1").await.unwrap(),
            Claim::Done(_)
        ));
        assert!(matches!(
            a.claim("PlaceOrder", "k-2").await.unwrap(),
            Claim::New(_)
        ));
        // Another type's id of the same spelling is its own.
        assert!(matches!(
            a.claim("PaymentReceived", "k-1").await.unwrap(),
            Claim::New(_)
        ));
        // Reopened: still known.
        drop(a);
        let a = Accepted::open(&dir.path().join("ids.db"), Duration::from_secs(3600)).unwrap();
        assert!(matches!(
            a.claim("PlaceOrder", "k-1").await.unwrap(),
            Claim::Done(_)
        ));
        assert_eq!(a.prune().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn ids_past_the_window_are_new_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let a = Accepted::open(&dir.path().join("ids.db"), Duration::from_millis(1)).unwrap();
        a.done("PlaceOrder", "old").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(
            a.claim("PlaceOrder", "old").await.unwrap(),
            Claim::New(_)
        ));
        assert_eq!(a.prune().await.unwrap(), 1);
    }
}
