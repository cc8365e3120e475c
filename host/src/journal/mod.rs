//! The journal: one compact record per handling of a message by a plugin,
//! the source of `switchyard why`.
//!
//! A record says what a route did with a message (handled, retried later,
//! dead-lettered, skipped as a duplicate, ignored for want of a saga
//! instance), with the plugin version that did it, the failed tries of that
//! handling, what it sent, and the ids that link it to the rest of its flow
//! (correlation, causation, trace). Payloads are kept only when the
//! pipeline asks (`[journal] payloads = true`), clipped.
//!
//! Where records go: on the embedded transport, into the transport's own
//! file in the settle transaction of the messages they describe, so the
//! journal says exactly what was settled. On a broker, into a store of
//! their own (a SQLite file, or PostgreSQL for hosts that share work) after
//! the settle, through a [`Writer`] that never makes a route wait: a
//! journal that is down or slow costs records (counted in
//! `switchyard.journal.dropped` and logged), never messages.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::{JournalConfig, StoreConfig};
use crate::envelope::Envelope;
use crate::recover::Then;

/// What a handling of a message came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The plugin handled it; its outputs went out with its settlement.
    Handled,
    /// It failed and waits to be tried again (`retry_at_ms`).
    RetriedLater,
    /// It failed for good; `dead_letter` is its record.
    DeadLettered,
    /// An exactly-once plugin had handled it before: not handled again,
    /// what it sent then went out again.
    Duplicate,
    /// A saga's message whose instance was not there, ignored as the
    /// pipeline says.
    SagaNotFound,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Handled => "handled",
            Outcome::RetriedLater => "retried-later",
            Outcome::DeadLettered => "dead-lettered",
            Outcome::Duplicate => "duplicate",
            Outcome::SagaNotFound => "saga-not-found",
        }
    }
}

/// A failed try within one handling.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Try {
    pub number: u32,
    pub started_at_ms: u64,
    pub duration_us: u64,
    pub error_kind: String,
    pub error: String,
    /// What the host did next: `retry-now`, `retry-later` or `dead-letter`.
    pub then: String,
}

/// A message a handling sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    pub id: String,
    pub message_type: String,
    /// `command` or `event`.
    pub kind: String,
}

/// The error a handling ended with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBrief {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    pub message: String,
}

/// The payload of a journaled message, when the pipeline keeps them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// The payload (its first `max_payload` bytes) when it is UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Otherwise those bytes in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hex: Option<String>,
    /// The whole payload's size in bytes.
    pub size: u64,
    pub truncated: bool,
}

/// One handling of one message by one plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When the host decided the outcome.
    pub at_ms: u64,
    pub message_id: String,
    pub message_type: String,
    /// `command` or `event`.
    pub kind: String,
    /// The route: the plugin's name. (This, the version, the digest and
    /// the host are left out of the JSON when empty: the SQLite journal
    /// says them once for a batch of records and leaves them out of each.)
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plugin: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plugin_version: String,
    /// The SHA-256 of the plugin's component.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plugin_digest: String,
    /// The attempt the handling ended on (1 for the first).
    pub attempt: u32,
    pub outcome: Outcome,
    /// How long the handling took, tries included.
    pub took_us: u64,
    /// The tries of this handling that failed, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<Try>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBrief>,
    /// When a message retried later is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<u64>,
    /// The dead-letter record of a message that failed for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
    /// The dead-letter record this message is a replay of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sent: Vec<Sent>,
    /// Whether a reply went back to the requester.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replied: bool,
    /// The saga instance the message drove, when the plugin is a saga.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saga_instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Payload>,
    /// The span attributes the plugin set (`order.id`, say): the journal
    /// finds messages by them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<(String, String)>,
}

impl Record {
    /// The record of a handling of `message` (with its attempt and history
    /// as the handling left them), the rest to be filled in by the caller.
    pub fn of(
        message: &Envelope,
        plugin: &crate::plugin::LoadedPlugin,
        outcome: Outcome,
        took: Duration,
        host: &str,
        payloads: Option<usize>,
    ) -> Record {
        let failures = failures_of(message, outcome);
        // A failed handling ends on its last try; the envelope already
        // counts the attempt to come.
        let attempt = match outcome {
            Outcome::RetriedLater | Outcome::DeadLettered => {
                failures.last().map_or(message.attempt, |t| t.number)
            }
            _ => message.attempt,
        };
        Record {
            at_ms: crate::envelope::now_ms(),
            message_id: message.id.clone(),
            message_type: message.message_type.clone(),
            kind: message.kind.as_str().to_owned(),
            plugin: plugin.name().to_string(),
            plugin_version: plugin.info().version.clone(),
            plugin_digest: plugin.digest().to_owned(),
            attempt,
            outcome,
            took_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            failures,
            error: None,
            retry_at_ms: None,
            dead_letter: None,
            replay_of: None,
            sent: Vec::new(),
            replied: false,
            saga_instance: None,
            correlation_id: message.correlation_id.clone(),
            causation_id: message.causation_id.clone(),
            trace_id: None,
            host: host.to_owned(),
            payload: payloads.map(|max| payload(&message.payload, max)),
            attributes: Vec::new(),
        }
    }

    /// Notes the messages a handling sent.
    pub fn with_sent<'a>(mut self, outputs: impl IntoIterator<Item = &'a Envelope>) -> Self {
        self.sent = outputs
            .into_iter()
            .map(|o| Sent {
                id: o.id.clone(),
                message_type: o.message_type.clone(),
                kind: o.kind.as_str().to_owned(),
            })
            .collect();
        self
    }

    /// The message's flow: its correlation id, or its own id when it
    /// started the flow.
    pub fn flow_id(&self) -> &str {
        self.correlation_id.as_deref().unwrap_or(&self.message_id)
    }
}

/// The largest error text a record keeps of each failure.
pub const MAX_ERROR: usize = 1024;

/// The failed tries of the handling that left `message` with this outcome:
/// the tries retried at once at the end of its history, and for a message
/// that failed (retried later, dead-lettered) the try that ended it.
fn failures_of(message: &Envelope, outcome: Outcome) -> Vec<Try> {
    let history = &message.history;
    let mut start = history.len();
    let last_is_ours = matches!(outcome, Outcome::RetriedLater | Outcome::DeadLettered)
        && history
            .last()
            .is_some_and(|a| a.then() != Some(Then::RetryNow));
    if last_is_ours {
        start -= 1;
    }
    while start > 0 && history[start - 1].then() == Some(Then::RetryNow) {
        start -= 1;
    }
    history[start..]
        .iter()
        .map(|a| Try {
            number: a.number,
            started_at_ms: a.started_at_ms,
            duration_us: a.duration_us,
            error_kind: a.error_kind.clone(),
            error: crate::text::clip(&a.error, MAX_ERROR),
            then: a.then.clone(),
        })
        .collect()
}

/// The first `max` bytes of a payload, as text when they are UTF-8.
fn payload(bytes: &[u8], max: usize) -> Payload {
    let truncated = bytes.len() > max;
    let mut head = &bytes[..bytes.len().min(max)];
    // A cut in the middle of a character is not a reason to show hex.
    if truncated
        && let Err(e) = std::str::from_utf8(head)
        && e.error_len().is_none()
    {
        head = &head[..e.valid_up_to()];
    }
    match std::str::from_utf8(head) {
        Ok(text) => Payload {
            text: Some(text.to_owned()),
            hex: None,
            size: bytes.len() as u64,
            truncated,
        },
        Err(_) => Payload {
            text: None,
            hex: Some(hex::encode(head)),
            size: bytes.len() as u64,
            truncated,
        },
    }
}

/// A place journal records are kept and read.
#[async_trait]
pub trait Store: Send + Sync {
    /// Keeps records (a broker host's writer calls this after settling).
    async fn write(&self, records: Vec<Record>) -> Result<()>;
    /// Every record of one message, oldest first.
    async fn of_message(&self, message_id: &str) -> Result<Vec<Record>>;
    /// The records of the messages these caused, oldest first, at most
    /// `limit`.
    async fn caused_by(&self, message_ids: &[String], limit: usize) -> Result<Vec<Record>>;
    /// Records of a flow (messages with this correlation id, and the one
    /// that started it), oldest first, at most `limit`.
    async fn of_flow(&self, correlation_id: &str, limit: usize) -> Result<Vec<Record>>;
    /// Records whose message id starts with `prefix` (at most `limit`
    /// distinct message ids), for ids typed short.
    async fn ids_like(&self, prefix: &str, limit: usize) -> Result<Vec<String>>;

    /// The records of handlings in which the plugin set the span attribute
    /// `name` to `value`, the newest first, at most `limit`.
    async fn with_attribute(&self, name: &str, value: &str, limit: usize) -> Result<Vec<Record>>;
    /// Removes records older than `before_ms`, then the oldest beyond
    /// `max_records`. Returns how many went.
    async fn prune(&self, before_ms: u64, max_records: u64) -> Result<u64>;
    /// How many records there are.
    async fn count(&self) -> Result<u64>;
    /// Where the records are, without secrets.
    fn location(&self) -> String;
}

/// Opens the journal store a pipeline names (the embedded transport's own
/// file on the embedded transport).
pub async fn open(config: &JournalConfig, pipeline: &str) -> Result<Arc<dyn Store>> {
    match &config.store {
        StoreConfig::Embedded { path } => Ok(Arc::new(sqlite::SqliteJournal::open(path)?)),
        StoreConfig::Postgres { url, schema } => {
            let url = url.resolve("journal")?;
            Ok(Arc::new(
                postgres::PostgresJournal::connect(&url, schema, pipeline).await?,
            ))
        }
    }
}

/// How a route keeps its journal records.
#[derive(Clone)]
pub enum Sink {
    /// The transport writes them in its settle transaction (the embedded
    /// transport).
    InSettle { payloads: Option<usize> },
    /// A writer keeps them after the settle (brokers).
    Writer(Writer),
}

impl Sink {
    /// The payload cap when payloads are kept.
    pub fn payloads(&self) -> Option<usize> {
        match self {
            Sink::InSettle { payloads } => *payloads,
            Sink::Writer(w) => w.payloads,
        }
    }
}

/// Batches of records waiting for the writer, at most: past that, records
/// are dropped (and counted) rather than make a route wait.
const WRITER_QUEUE: usize = 256;

/// Hands records to a background task that writes them, never waiting.
#[derive(Clone)]
pub struct Writer {
    queue: tokio::sync::mpsc::Sender<Vec<Record>>,
    dropped: opentelemetry::metrics::Counter<u64>,
    payloads: Option<usize>,
    /// Records are being dropped for a full queue (warned once until the
    /// writer catches up).
    behind: Arc<std::sync::atomic::AtomicBool>,
}

impl Writer {
    /// Starts the task that writes to `store`. It ends when every writer
    /// is dropped, or once `stop` turns true and what was queued before is
    /// written.
    pub fn start(
        store: Arc<dyn Store>,
        dropped: opentelemetry::metrics::Counter<u64>,
        payloads: Option<usize>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> (Writer, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Record>>(WRITER_QUEUE);
        let counter = dropped.clone();
        let task = tokio::spawn(async move {
            let mut failing = false;
            let mut stopping = false;
            loop {
                let mut batch = if stopping {
                    match rx.try_recv() {
                        Ok(b) => b,
                        Err(_) => break,
                    }
                } else {
                    tokio::select! {
                        b = rx.recv() => match b {
                            Some(b) => b,
                            None => break,
                        },
                        _ = stop.wait_for(|s| *s) => {
                            stopping = true;
                            continue;
                        }
                    }
                };
                // Whatever else is waiting goes in the same write.
                while let Ok(more) = rx.try_recv() {
                    batch.extend(more);
                    if batch.len() >= 4096 {
                        break;
                    }
                }
                let n = batch.len() as u64;
                match store.write(batch).await {
                    Ok(()) => {
                        if failing {
                            tracing::info!(store = %store.location(), "The journal is written again");
                            failing = false;
                        }
                    }
                    Err(e) => {
                        counter.add(n, &[]);
                        if !failing {
                            tracing::warn!(
                                store = %store.location(),
                                records = n,
                                error = %format!("{e:#}"),
                                "Cannot write journal records; they are dropped (counted in switchyard.journal.dropped) and messages go on"
                            );
                            failing = true;
                        }
                    }
                }
            }
        });
        (
            Writer {
                queue: tx,
                dropped,
                payloads,
                behind: Arc::default(),
            },
            task,
        )
    }

    /// Queues records for writing; drops them (counted) when the writer is
    /// behind.
    pub fn send(&self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        use std::sync::atomic::Ordering;
        let n = records.len() as u64;
        if self.queue.try_send(records).is_err() {
            self.dropped.add(n, &[]);
            if !self.behind.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    records = n,
                    "The journal's writer is behind; records are dropped (counted in switchyard.journal.dropped) until it catches up, and messages go on"
                );
            }
        } else if self.behind.swap(false, Ordering::Relaxed) {
            tracing::info!("The journal's writer caught up");
        }
    }
}

/// Prunes a journal store every `every`, as its retention says.
pub async fn prune_every(store: Arc<dyn Store>, config: JournalConfig, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let before = crate::envelope::now_ms()
            .saturating_sub(u64::try_from(config.retention.as_millis()).unwrap_or(u64::MAX));
        match store.prune(before, config.max_records).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(records = n, "Journal records past the retention removed"),
            Err(e) => tracing::warn!(
                store = %store.location(),
                error = %format!("{e:#}"),
                "Cannot prune the journal; trying again later"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Attempt, Kind};

    fn attempt(number: u32, then: Then) -> Attempt {
        Attempt {
            number,
            started_at_ms: 1,
            duration_us: 2,
            error_kind: "handler-error".into(),
            error: "boom".into(),
            plugin: "p@1".into(),
            then: then.as_str().into(),
            trace_id: None,
            span_id: None,
        }
    }

    fn message(history: Vec<Attempt>) -> Envelope {
        let mut e = Envelope::new("T", Kind::Event, b"{}".to_vec(), "application/json");
        e.attempt = u32::try_from(history.len()).unwrap_or(0) + 1;
        e.history = history;
        e
    }

    #[test]
    fn a_handling_owns_the_tries_retried_at_once_and_the_one_that_ended_it() {
        // Retried later once, then twice at once, then handled.
        let m = message(vec![
            attempt(1, Then::RetryLater),
            attempt(2, Then::RetryNow),
            attempt(3, Then::RetryNow),
        ]);
        let tries = failures_of(&m, Outcome::Handled);
        assert_eq!(tries.iter().map(|t| t.number).collect::<Vec<_>>(), [2, 3]);
        // The earlier handling that was retried later owns only its try.
        let m = message(vec![attempt(1, Then::RetryLater)]);
        assert_eq!(failures_of(&m, Outcome::RetriedLater).len(), 1);
        assert!(failures_of(&m, Outcome::Handled).is_empty());
        // Dead-lettered after two tries at once.
        let m = message(vec![
            attempt(1, Then::RetryLater),
            attempt(2, Then::RetryNow),
            attempt(3, Then::DeadLetter),
        ]);
        let tries = failures_of(&m, Outcome::DeadLettered);
        assert_eq!(tries.iter().map(|t| t.number).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn payloads_are_clipped_as_text_or_shown_in_hex() {
        let p = payload("héllo".as_bytes(), 2);
        // "h" and half of "é": the half is left out, not shown as hex.
        assert_eq!(p.text.as_deref(), Some("h"));
        assert!(p.truncated);
        assert_eq!(p.size, 6);
        let p = payload(&[0xff, 0xfe, 0x00], 16);
        assert_eq!(p.hex.as_deref(), Some("fffe00"));
        assert!(!p.truncated);
    }
}
