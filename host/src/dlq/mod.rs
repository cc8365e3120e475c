//! The dead-letter store: every message the host gave up on, with everything
//! needed to tell a bug from poison from a bad moment, and the operations to
//! act on it (list, group, show, replay, resolve, delete, export).
//!
//! Two stores implement [`DeadLetterStore`]: [`sqlite::SqliteStore`] (by
//! default inside the embedded transport's file) and
//! [`postgres::PostgresStore`], which several hosts can share. Records are
//! keyed by route and message id: a message that fails again, after a
//! redelivery or a replay, adds its attempts to its existing record instead
//! of creating a second one.

pub mod postgres;
mod query;
pub mod replay;
mod row;
pub mod sqlite;

use std::fmt;
use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::{DeadLetterConfig, StoreConfig, UrlSource};
use crate::envelope::{Attempt, Envelope};

/// Header a replayed message carries: the id of its dead-letter record.
pub const REPLAY_HEADER: &str = "switchyard-replay-of";

/// Where a record is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Failed; waiting for an operator.
    Dead,
    /// A replay started and may not have reached the transport.
    Replaying,
    /// Replayed; waiting for the outcome.
    Replayed,
    /// Replayed and handled successfully.
    Handled,
    /// Closed by an operator without replay.
    Resolved,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Dead,
        Status::Replaying,
        Status::Replayed,
        Status::Handled,
        Status::Resolved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Dead => "dead",
            Status::Replaying => "replaying",
            Status::Replayed => "replayed",
            Status::Handled => "handled",
            Status::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The failure that sent a message here (the last one, if it failed again).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// `transient`, `permanent`, `trap`, `timeout`, `out-of-memory`,
    /// `contract-violation` or `malformed`.
    pub kind: String,
    pub message: String,
    pub code: Option<String>,
    pub details: Vec<(String, String)>,
    /// The wasm backtrace of a trap, one frame per line, with function names.
    pub backtrace: Option<String>,
    /// What the plugin wrote to stdout/stderr during the failed attempt
    /// (the end of it), e.g. a panic message.
    pub output: Option<String>,
}

/// Where the message was consumed from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// `embedded`, `kafka` or `amqp`.
    pub transport: String,
    /// The store file, bootstrap servers or broker URL (without secrets).
    pub location: String,
    /// The route's queue (or topic).
    pub queue: String,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub consumer_group: Option<String>,
}

/// One dead-lettered message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// Record id (UUIDv7).
    pub id: String,
    pub pipeline: String,
    /// The route (plugin name in the pipeline) that failed it.
    pub route: String,
    pub plugin_version: String,
    pub plugin_digest: String,
    /// The message as it arrived: payload and headers untouched.
    pub message: Envelope,
    pub error: ErrorInfo,
    /// Every attempt, in order, across retries and replays.
    pub attempts: Vec<Attempt>,
    pub first_failed_at_ms: u64,
    pub last_failed_at_ms: u64,
    pub source: Source,
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
    /// The host that recorded the failure.
    pub host: String,
    /// Short hash of plugin, error kind and normalized cause, for grouping.
    pub fingerprint: String,
    /// The normalized cause the fingerprint was made from.
    pub cause: String,
    pub status: Status,
    pub replay_count: u32,
    pub replayed_at_ms: Option<u64>,
    pub resolved_at_ms: Option<u64>,
    pub note: Option<String>,
}

impl DeadLetter {
    /// The record id named by a replayed message's header, if any.
    pub fn replay_of(message: &Envelope) -> Option<&str> {
        message
            .headers
            .iter()
            .find(|(n, _)| n == REPLAY_HEADER)
            .map(|(_, v)| v.as_str())
    }

    /// The message to enqueue for a replay: the original, untouched, plus a
    /// header linking it to this record. Its attempts continue the count.
    pub fn replay_message(&self) -> Envelope {
        let mut m = self.message.clone();
        let trace_header = crate::envelope::REPLAY_TRACE_HEADER;
        m.headers
            .retain(|(n, _)| n != REPLAY_HEADER && n != trace_header);
        m.headers.push((REPLAY_HEADER.to_owned(), self.id.clone()));
        if let (Some(t), Some(s)) = (&self.trace_id, &self.span_id) {
            m.headers
                .push((trace_header.to_owned(), format!("{t}-{s}")));
        }
        m.attempt = u32::try_from(self.attempts.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        m.history.clear();
        m
    }

    /// The copy published to the broker's dead-letter destination
    /// (`[dead_letters] broker = true`): the message as it arrived, with
    /// its attempt history, plus the error context as
    /// [`BROKER_COPY_HEADERS`].
    pub fn broker_copy(&self) -> Envelope {
        let mut m = self.message.clone();
        m.headers
            .retain(|(n, _)| !BROKER_COPY_HEADERS.contains(&n.as_str()));
        let time = crate::transport::cloudevents::rfc3339;
        let mut add = |name: &str, value: String| m.headers.push((name.to_owned(), value));
        add("switchyard-dead-letter-id", self.id.clone());
        add(
            "switchyard-plugin",
            format!("{}@{}", self.route, self.plugin_version),
        );
        add("switchyard-error-kind", self.error.kind.clone());
        if let Some(code) = &self.error.code {
            add("switchyard-error-code", code.clone());
        }
        add(
            "switchyard-error",
            crate::text::clip(&self.error.message, BROKER_COPY_MAX_ERROR),
        );
        add("switchyard-fingerprint", self.fingerprint.clone());
        add("switchyard-attempts", self.attempts.len().to_string());
        add("switchyard-first-failed-at", time(self.first_failed_at_ms));
        add("switchyard-last-failed-at", time(self.last_failed_at_ms));
        add("switchyard-host", self.host.clone());
        add("switchyard-source", self.source.queue.clone());
        if let Some(t) = &self.trace_id {
            add("switchyard-trace-id", t.clone());
        }
        m.history = self.attempts.clone();
        m
    }
}

/// The headers [`DeadLetter::broker_copy`] adds.
pub const BROKER_COPY_HEADERS: &[&str] = &[
    "switchyard-dead-letter-id",
    "switchyard-plugin",
    "switchyard-error-kind",
    "switchyard-error-code",
    "switchyard-error",
    "switchyard-fingerprint",
    "switchyard-attempts",
    "switchyard-first-failed-at",
    "switchyard-last-failed-at",
    "switchyard-host",
    "switchyard-source",
    "switchyard-trace-id",
];

/// The longest error text a broker copy carries (brokers limit header
/// sizes; the full text is in the store).
const BROKER_COPY_MAX_ERROR: usize = 2048;

/// Which records an operation applies to. Empty fields match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub ids: Vec<String>,
    pub route: Option<String>,
    pub message_type: Option<String>,
    pub error_kind: Option<String>,
    pub fingerprint: Option<String>,
    pub statuses: Vec<Status>,
    /// Last failure at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Last failure before this time.
    pub until_ms: Option<u64>,
    pub limit: Option<u64>,
}

/// Records that share a fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Group {
    pub fingerprint: String,
    pub count: u64,
    pub route: String,
    pub error_kind: String,
    pub cause: String,
    pub first_failed_at_ms: u64,
    pub last_failed_at_ms: u64,
}

/// A place dead letters are kept.
#[async_trait]
pub trait DeadLetterStore: Send + Sync {
    /// Records failures durably. A record for the same route and message id
    /// gets the new attempts appended, the new error, and status `dead`
    /// again. Returns the record ids, in order.
    async fn record(&self, letters: Vec<DeadLetter>) -> Result<Vec<String>>;

    /// Records matching the filter, newest failure first.
    async fn list(&self, filter: &Filter) -> Result<Vec<DeadLetter>>;

    /// Counts per fingerprint, newest failure first.
    async fn groups(&self, filter: &Filter) -> Result<Vec<Group>>;

    /// One record by id, or by a unique prefix of its id.
    async fn get(&self, id: &str) -> Result<Option<DeadLetter>>;

    /// Claims records for the replay `claim` (counting the replay) and
    /// returns those it got: records `dead`, records this claim already
    /// holds, and records another replay left `replaying` before
    /// `stale_before_ms` (it was interrupted). A record another replay is
    /// working on is not returned, so two replays never send one record
    /// twice.
    async fn begin_replay(
        &self,
        ids: &[String],
        claim: &str,
        stale_before_ms: u64,
    ) -> Result<Vec<DeadLetter>>;

    /// Marks records whose replay reached the transport.
    async fn finish_replay(&self, ids: &[String]) -> Result<()>;

    /// Puts records whose replay could not be enqueued back to `dead`,
    /// taking back the replay they were counted for.
    async fn abort_replay(&self, ids: &[String]) -> Result<()>;

    /// Marks replayed records whose message was handled.
    async fn mark_handled(&self, ids: &[String]) -> Result<u64>;

    /// Closes records without replay, with an optional note.
    async fn resolve(&self, ids: &[String], note: Option<&str>) -> Result<u64>;

    /// Removes records.
    async fn delete(&self, ids: &[String]) -> Result<u64>;

    /// Records per status.
    async fn counts(&self) -> Result<Vec<(Status, u64)>>;

    /// Answers when the store does: one round trip, for `/readyz`.
    async fn ping(&self) -> Result<()>;

    /// Counts one crash of a host that had these messages of `route` in
    /// hand (the crash-loop guard).
    async fn note_crash(&self, route: &str, message_ids: &[String]) -> Result<()>;

    /// Every message in hand at recent crashes: (route, message id, crashes
    /// in a row). Counts whose last crash was before `forget_before_ms` are
    /// removed first.
    async fn crash_counts(&self, forget_before_ms: u64) -> Result<Vec<(String, String, u32)>>;

    /// Forgets the crashes of messages that were settled since.
    async fn clear_crashes(&self, route: &str, message_ids: &[String]) -> Result<()>;
}

/// Opens the dead-letter store a pipeline names.
pub async fn open(config: &DeadLetterConfig, pipeline: &str) -> Result<Arc<dyn DeadLetterStore>> {
    match &config.store {
        StoreConfig::Embedded { path } => Ok(Arc::new(sqlite::SqliteStore::open(path, pipeline)?)),
        StoreConfig::Postgres { url, schema } => {
            let url = url.resolve("dead-letter store")?;
            Ok(Arc::new(
                postgres::PostgresStore::connect(&url, schema, pipeline).await?,
            ))
        }
    }
}

/// A describable name of the store for messages, without secrets.
pub fn describe(config: &DeadLetterConfig) -> String {
    match &config.store {
        StoreConfig::Embedded { path } => format!("embedded store {}", path.display()),
        StoreConfig::Postgres { url, schema } => match url {
            UrlSource::Literal(u) => {
                format!("PostgreSQL {} (schema {schema})", crate::config::redact(u))
            }
            UrlSource::Env(name) => format!("PostgreSQL from ${name} (schema {schema})"),
        },
    }
}

pub(crate) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored timestamp column (non-negative by construction).
pub(crate) fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(i64::unsigned_abs)
}

/// Serializes one of a record's JSON columns (plain data: cannot fail).
pub(crate) fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// Parses one of a record's JSON columns, naming it on failure.
pub(crate) fn from_json<T: for<'de> Deserialize<'de>>(
    text: &str,
    column: &str,
    id: &str,
) -> Result<T> {
    serde_json::from_str(text)
        .map_err(|e| anyhow::anyhow!("dead letter {id}: column {column} is not valid JSON: {e}"))
}

/// SHA-256 of a payload, part of a record's key.
pub(crate) fn payload_digest(payload: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(payload))
}

/// The stored attempts plus the new ones, without repeating an attempt
/// recorded before (a redelivered message carries its earlier history).
pub(crate) fn merge_attempts(mut stored: Vec<Attempt>, new: &[Attempt]) -> Vec<Attempt> {
    for a in new {
        if !stored
            .iter()
            .any(|s| s.number == a.number && s.started_at_ms == a.started_at_ms)
        {
            stored.push(a.clone());
        }
    }
    stored
}

/// The host's name, for the record.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}
