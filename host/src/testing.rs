//! Integration tests of whole pipelines, in-process, with no broker.
//!
//! [`TestPipeline::start`] reads a pipeline file, moves its state into a
//! temporary directory (the embedded transport, the dead-letter store and
//! the host's own state), loads its plugins and runs every route in this
//! process. A test then sends commands and publishes events, and waits for
//! what the pipeline did with them: the events and commands its handlers
//! emitted, the replies, the retries and the dead letters. Every wait has a
//! deadline and is woken by the host itself as it settles each message (or
//! stops), not by a timer, so a test neither sleeps nor races the host.
//! Only [`TestPipeline::idle`] also looks again every 50 ms, for retries
//! scheduled for later.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use serde_json::json;
//! use switchyard::testing::{Payload, TestPipeline};
//!
//! let pipeline = TestPipeline::start("pipelines/orders.toml").await?;
//! let order = json!({
//!     "order_id": "A-1",
//!     "customer": "ada",
//!     "items": [{ "sku": "book", "quantity": 2, "unit_price_cents": 1200 }],
//! });
//! // A command, and the reply its handler gave.
//! let reply = pipeline.request("PlaceOrder", order).await?;
//! assert_eq!(reply.json()?["total_cents"], 2400);
//! // An event some handler published along the way.
//! let placed = pipeline
//!     .published("OrderPlaced", json!({ "order_id": "A-1" }))
//!     .await?;
//! assert_eq!(placed.json()?["total_cents"], 2400);
//! // A message that fails for good ends in the dead-letter store.
//! let id = pipeline.send("PlaceOrder", json!({ "order_id": "A-2" })).await?;
//! let dead = pipeline.dead_letter(&id).await?;
//! assert_eq!(dead.error.kind, "permanent");
//! pipeline.stop().await?;
//! # Ok(())
//! # }
//! ```
//!
//! The pipeline runs with its own plugins, limits, grants, retry policies
//! and `[schemas]`; only where its state lives changes, and it always runs
//! on the embedded transport, whatever its `[transport]` says.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{oneshot, watch};

use crate::config::{EmbeddedConfig, Pipeline, StoreConfig, TransportConfig};
use crate::dlq::DeadLetter;
use crate::envelope::{Envelope, Kind, Reply};
use crate::runtime::{self, RunMode, RunOptions};
use crate::supervisor::Supervisor;
use crate::transport::{
    Delivery, Outcome, Refused, ReplyInbox, Settlement, Subscription, Transport,
};

/// How long a wait lasts unless [`TestPipeline::with_deadline`] says
/// otherwise: long enough for a cold compile of a large component.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// What the host did with one delivery, in the order routes settled them.
#[derive(Clone, Debug)]
pub enum Settled {
    /// The route's plugin handled the message: these are its outputs (the
    /// events it published and the commands it sent) and its reply.
    Handled {
        route: String,
        message: Envelope,
        outputs: Vec<Envelope>,
        reply: Option<Reply>,
    },
    /// The attempt failed and the message was scheduled again.
    Retried { route: String, message: Envelope },
    /// The message failed for good; its dead letter is stored.
    DeadLettered { route: String, message: Envelope },
}

impl Settled {
    /// The route (plugin) that settled the delivery.
    pub fn route(&self) -> &str {
        match self {
            Settled::Handled { route, .. }
            | Settled::Retried { route, .. }
            | Settled::DeadLettered { route, .. } => route,
        }
    }

    /// The message that was delivered.
    pub fn message(&self) -> &Envelope {
        match self {
            Settled::Handled { message, .. }
            | Settled::Retried { message, .. }
            | Settled::DeadLettered { message, .. } => message,
        }
    }
}

/// A message a handler emitted, or a reply: its payload read as JSON.
pub trait Payload {
    /// The payload parsed as JSON, or an error naming the message.
    fn json(&self) -> Result<Value>;
}

impl Payload for Envelope {
    fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.payload).with_context(|| {
            format!(
                "the payload of {} {} is not JSON",
                self.message_type, self.id
            )
        })
    }
}

impl Payload for Reply {
    fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.payload)
            .with_context(|| format!("the reply to {} is not JSON", self.in_reply_to))
    }
}

/// A pipeline running in this process, for a test to drive.
pub struct TestPipeline {
    pipeline: Pipeline,
    transport: Arc<dyn Transport>,
    journal: Arc<Journal>,
    /// The pipeline's `[schemas]`, as its host compiled them.
    schemas: Arc<crate::schemas::Schemas>,
    control: Arc<Supervisor>,
    deadline: Duration,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
    // The store files live here; `Drop` stops the host first.
    _dir: tempfile::TempDir,
}

impl TestPipeline {
    /// Reads the pipeline file and starts it as [`TestPipeline::run`] does.
    pub async fn start(path: impl AsRef<Path>) -> Result<TestPipeline> {
        let path = path.as_ref();
        let loaded = crate::config::load(path).map_err(|e| anyhow!("{e}"))?;
        Self::run(loaded.pipeline).await
    }

    /// Starts a pipeline: its state moves to a new temporary directory, its
    /// plugins are loaded (a plugin that fails to load fails this call,
    /// naming it), and its routes run until [`TestPipeline::stop`].
    pub async fn run(mut pipeline: Pipeline) -> Result<TestPipeline> {
        let dir = tempfile::Builder::new()
            .prefix("switchyard-test-")
            .tempdir()
            .context("cannot create a temporary directory for the pipeline's state")?;
        relocate(&mut pipeline, dir.path());

        let deployed = runtime::deployed_versions(&pipeline)?;
        let plugins = runtime::load_plugins_from(&pipeline, &deployed).await?;
        let schemas = plugins.schemas.clone();
        let journal = Arc::new(Journal::new());
        let transport: Arc<dyn Transport> = Arc::new(Tap {
            inner: runtime::open(&pipeline).await?,
            journal: journal.clone(),
        });

        let (started_tx, started_rx) = oneshot::channel();
        let mut options = RunOptions::quiet(RunMode::Serve);
        options.on_started = Some(started_tx);
        options.transport = Some(transport.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let running = pipeline.clone();
        let ended = journal.clone();
        let task = tokio::spawn(async move {
            let result = runtime::run_with(&running, plugins, options, async move {
                let _ = stopped.await;
            })
            .await;
            ended.end(match &result {
                Ok(()) => "it was stopped".to_owned(),
                Err(e) => format!("{e:#}"),
            });
            result
        });
        let control = match started_rx.await {
            Ok(control) => control,
            // The host gave up before its routes ran: say why.
            Err(_) => {
                return Err(match task.await {
                    Ok(Err(e)) => e.context(format!("pipeline {} did not start", pipeline.name)),
                    Ok(Ok(())) => anyhow!("pipeline {} stopped as it started", pipeline.name),
                    Err(e) => anyhow!("pipeline {} did not start: {e}", pipeline.name),
                });
            }
        };
        Ok(TestPipeline {
            pipeline,
            transport,
            journal,
            schemas,
            control,
            deadline: DEFAULT_DEADLINE,
            stop: Some(stop),
            task,
            _dir: dir,
        })
    }

    /// Waits at most `deadline` in each wait from now on.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The pipeline as it runs (with its state in the temporary directory).
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// The running host's control: plugin versions, deploys, rollbacks.
    pub fn control(&self) -> &Arc<Supervisor> {
        &self.control
    }

    /// Sends a command with a JSON payload; returns its message id.
    pub async fn send(&self, message_type: &str, payload: Value) -> Result<String> {
        self.enqueue(json_message(message_type, Kind::Command, &payload)?)
            .await
    }

    /// Publishes an event with a JSON payload; returns its message id.
    pub async fn publish(&self, message_type: &str, payload: Value) -> Result<String> {
        self.enqueue(json_message(message_type, Kind::Event, &payload)?)
            .await
    }

    /// Puts any message on the pipeline (headers, other content types, a
    /// payload that is not JSON); returns its id. Like `switchyard send`,
    /// it refuses a type nobody takes or one of the other kind, and keeps
    /// the pipeline's `[schemas]`.
    pub async fn enqueue(&self, message: Envelope) -> Result<String> {
        let mut ids = self.enqueue_all(vec![message]).await?;
        ids.pop()
            .ok_or_else(|| anyhow!("the message was not enqueued"))
    }

    /// Puts several messages on the pipeline in one write, in order;
    /// returns their ids. Nothing is enqueued if one of them is refused.
    pub async fn enqueue_all(&self, messages: Vec<Envelope>) -> Result<Vec<String>> {
        for message in &messages {
            match self.pipeline.kind_of(&message.message_type) {
                Some(kind) if kind == message.kind => {}
                Some(kind) => bail!(
                    "{} is {} in pipeline {}, not {}",
                    message.message_type,
                    kind.with_article(),
                    self.pipeline.name,
                    message.kind.with_article()
                ),
                None => bail!(
                    "no plugin of pipeline {} takes {}",
                    self.pipeline.name,
                    message.message_type
                ),
            }
            if let Err(why) = self.schemas.check(&message.message_type, &message.payload) {
                bail!("{} {} not sent: {why}", message.message_type, message.id);
            }
        }
        let ids = messages.iter().map(|m| m.id.clone()).collect();
        self.transport.enqueue(messages).await?;
        Ok(ids)
    }

    /// Sends a command and waits for its handler's reply.
    pub async fn request(&self, message_type: &str, payload: Value) -> Result<Reply> {
        let mut inbox: Box<dyn ReplyInbox> = self.transport.reply_inbox().await?;
        let mut message = json_message(message_type, Kind::Command, &payload)?;
        message.reply_to = Some(inbox.address().to_owned());
        let id = self.enqueue(message).await?;
        let reply = tokio::select! {
            reply = inbox.wait(&id, self.deadline) => reply?,
            why = self.journal.ended() => bail!(
                "waiting for the reply to {message_type} {id}: the host stopped: {why}"
            ),
        };
        match reply {
            Some(reply) => Ok(reply),
            None => bail!(
                "no reply to {message_type} {id} within {:?}; what happened: {}",
                self.deadline,
                self.journal.summary()
            ),
        }
    }

    /// Waits for an event of this type, published by any handler, whose
    /// JSON payload holds every field of `fields` (a subset match: `{}`
    /// takes the first of its type). Events published before the call
    /// count too.
    pub async fn published(&self, message_type: &str, fields: Value) -> Result<Envelope> {
        self.output(Kind::Event, message_type, fields).await
    }

    /// Waits for a command of this type, sent by any handler, as
    /// [`TestPipeline::published`] does for events.
    pub async fn sent(&self, message_type: &str, fields: Value) -> Result<Envelope> {
        self.output(Kind::Command, message_type, fields).await
    }

    async fn output(&self, kind: Kind, message_type: &str, fields: Value) -> Result<Envelope> {
        let what = format!("{kind} {message_type} matching {fields}");
        self.wait_for(&what, |s| match s {
            Settled::Handled { outputs, .. } => outputs
                .iter()
                .find(|o| {
                    o.kind == kind
                        && o.message_type == message_type
                        && serde_json::from_slice::<Value>(&o.payload)
                            .is_ok_and(|got| subset_of(&fields, &got))
                })
                .cloned(),
            _ => None,
        })
        .await
    }

    /// Waits until `route` has handled the message `message_id`.
    pub async fn handled(&self, route: &str, message_id: &str) -> Result<()> {
        self.wait_for(&format!("{route} to handle {message_id}"), |s| match s {
            Settled::Handled {
                route: r, message, ..
            } if r == route && message.id == message_id => Some(()),
            _ => None,
        })
        .await
    }

    /// Waits until the message `message_id` has failed for good on some
    /// route, and returns its dead-letter record.
    pub async fn dead_letter(&self, message_id: &str) -> Result<DeadLetter> {
        let route = self
            .wait_for(&format!("{message_id} to be dead-lettered"), |s| match s {
                Settled::DeadLettered { route, message } if message.id == message_id => {
                    Some(route.clone())
                }
                _ => None,
            })
            .await?;
        // The record is durable before the delivery settles.
        let store = crate::dlq::open(&self.pipeline.dead_letters, &self.pipeline.name).await?;
        let filter = crate::dlq::Filter {
            route: Some(route.clone()),
            ..Default::default()
        };
        store
            .list(&filter)
            .await?
            .into_iter()
            .find(|d| d.message.id == message_id)
            .ok_or_else(|| {
                anyhow!("{route} dead-lettered {message_id} but the store has no record of it")
            })
    }

    /// Moves the pipeline's clock `by` forward for what it has scheduled:
    /// delayed retries and saga timeouts come due that much sooner, at
    /// once, so a test reaches a 30-minute timeout without waiting 30
    /// minutes.
    pub async fn advance_time(&self, by: Duration) -> Result<()> {
        self.transport.advance_time(by).await
    }

    /// Everything settled so far, in order.
    pub fn settled(&self) -> Vec<Settled> {
        self.journal.snapshot()
    }

    /// Waits until no message is waiting, scheduled or in flight on any
    /// route, and every settlement is in [`TestPipeline::settled`]; saga
    /// timeouts not due yet do not count (reach them with
    /// [`TestPipeline::advance_time`]). It is
    /// woken by each settlement; a retry scheduled for later comes due
    /// without one, so it also looks again every 50 ms.
    pub async fn idle(&self) -> Result<()> {
        let mut changes = self.journal.changes.subscribe();
        let deadline = self.deadline_from_now();
        loop {
            changes.borrow_and_update();
            if self.journal.settling() == 0 && self.transport.is_idle().await? {
                return Ok(());
            }
            if let Some(why) = self.journal.ended_because() {
                bail!(
                    "waiting for pipeline {} to be idle: the host stopped: {why}",
                    self.pipeline.name
                );
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                bail!(
                    "pipeline {} not idle within {:?}; what happened: {}",
                    self.pipeline.name,
                    self.deadline,
                    self.journal.summary()
                );
            }
            let slice = deadline.min(now + Duration::from_millis(50));
            let _ = tokio::time::timeout_at(slice, changes.changed()).await;
        }
    }

    /// Stops the host, letting the batches in hand finish.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| anyhow!("the host task failed: {e}"))?
    }

    /// When a wait that starts now gives up (far in the future for a
    /// deadline too long to represent).
    fn deadline_from_now(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        now.checked_add(self.deadline)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
    }

    /// Waits until some settlement gives `find` an answer.
    async fn wait_for<T>(&self, what: &str, find: impl Fn(&Settled) -> Option<T>) -> Result<T> {
        let mut changes = self.journal.changes.subscribe();
        let deadline = self.deadline_from_now();
        loop {
            changes.borrow_and_update();
            if let Some(found) = self.journal.find(&find) {
                return Ok(found);
            }
            if let Some(why) = self.journal.ended_because() {
                bail!("waiting for {what}: the host stopped: {why}");
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => bail!(
                    "no {what} within {:?}; what happened: {}",
                    self.deadline,
                    self.journal.summary()
                ),
            }
        }
    }
}

impl Drop for TestPipeline {
    fn drop(&mut self) {
        // A test that fails before `stop` still stops its host, before the
        // temporary directory with its store goes.
        if self.stop.take().is_some() {
            self.task.abort();
        }
    }
}

/// Points every piece of state the pipeline keeps at `dir`, on the
/// embedded transport.
fn relocate(pipeline: &mut Pipeline, dir: &Path) {
    let store: PathBuf = dir.join(format!("{}.db", pipeline.name));
    let embedded = match &pipeline.transport {
        TransportConfig::Embedded(e) => EmbeddedConfig {
            path: store.clone(),
            ..e.clone()
        },
        _ => EmbeddedConfig {
            path: store.clone(),
            fsync: false,
            batch_size: 64,
            poll_interval: Duration::from_millis(20),
        },
    };
    pipeline.transport = TransportConfig::Embedded(embedded);
    pipeline.dead_letters.store = StoreConfig::Embedded {
        path: store.clone(),
    };
    pipeline.journal.store = StoreConfig::Embedded { path: store };
    pipeline.dead_letters.broker = false;
    pipeline.state_dir = dir.join("state");
    pipeline.admin = None;
    pipeline.admin_token_env = None;
    pipeline.watch = false;
    pipeline.telemetry = crate::config::TelemetryConfig::default();
}

fn json_message(message_type: &str, kind: Kind, payload: &Value) -> Result<Envelope> {
    Ok(Envelope::new(
        message_type,
        kind,
        serde_json::to_vec(payload)?,
        "application/json",
    ))
}

/// Whether every field of `want` is in `got` with that value.
fn subset_of(want: &Value, got: &Value) -> bool {
    let mut differences = Vec::new();
    crate::json_diff::json_diff("$", want, got, true, &mut differences);
    differences.is_empty()
}

/// The settlements seen so far, and a signal for each new one and for the
/// end of the host.
struct Journal {
    entries: Mutex<Vec<Settled>>,
    changes: watch::Sender<usize>,
    /// Batches being settled: made durable, not yet in `entries`.
    settling: std::sync::atomic::AtomicUsize,
    /// Why the host stopped, once it has.
    ended: Mutex<Option<String>>,
}

impl Journal {
    fn new() -> Self {
        Journal {
            entries: Mutex::new(Vec::new()),
            changes: watch::Sender::new(0),
            settling: std::sync::atomic::AtomicUsize::new(0),
            ended: Mutex::new(None),
        }
    }

    fn settling(&self) -> usize {
        self.settling.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn begin_settle(&self) {
        self.settling
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Ends a settle begun with `begin_settle`, recording what it settled
    /// (nothing if it failed).
    fn finish_settle(&self, settled: Vec<Settled>) {
        {
            let mut entries = self.lock();
            entries.extend(settled);
            self.settling
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.changes.send_modify(|n| *n += 1);
    }

    fn end(&self, why: String) {
        *self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
        self.changes.send_modify(|n| *n += 1);
    }

    fn ended_because(&self) -> Option<String> {
        self.ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Resolves with the reason once the host has stopped.
    async fn ended(&self) -> String {
        let mut changes = self.changes.subscribe();
        loop {
            changes.borrow_and_update();
            if let Some(why) = self.ended_because() {
                return why;
            }
            if changes.changed().await.is_err() {
                return "the journal was dropped".to_owned();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Settled>> {
        // Entries are only pushed: a panic cannot leave them half-written.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn find<T>(&self, find: impl Fn(&Settled) -> Option<T>) -> Option<T> {
        self.lock().iter().find_map(find)
    }

    fn snapshot(&self) -> Vec<Settled> {
        self.lock().clone()
    }

    /// One line per settlement, for a wait that timed out.
    fn summary(&self) -> String {
        let entries = self.lock();
        if entries.is_empty() {
            return "nothing was settled".into();
        }
        let lines: Vec<String> = entries
            .iter()
            .map(|s| {
                let m = s.message();
                let what = match s {
                    Settled::Handled { outputs, reply, .. } => {
                        let mut out: Vec<String> = outputs
                            .iter()
                            .map(|o| format!("{} {}", o.kind, o.message_type))
                            .collect();
                        if reply.is_some() {
                            out.push("a reply".into());
                        }
                        if out.is_empty() {
                            "handled".to_owned()
                        } else {
                            format!("handled → {}", out.join(", "))
                        }
                    }
                    Settled::Retried { .. } => "failed, retried".to_owned(),
                    Settled::DeadLettered { .. } => "dead-lettered".to_owned(),
                };
                format!(
                    "{} {} {} (attempt {}): {what}",
                    s.route(),
                    m.message_type,
                    m.id,
                    m.attempt
                )
            })
            .collect();
        format!("\n  {}", lines.join("\n  "))
    }
}

/// The pipeline's transport, with every settlement written to the journal
/// once it is durable.
struct Tap {
    inner: Arc<dyn Transport>,
    journal: Arc<Journal>,
}

#[async_trait]
impl Transport for Tap {
    async fn subscribe(&self, route: &str) -> Result<Box<dyn Subscription>> {
        Ok(Box::new(TapSubscription {
            route: route.to_owned(),
            inner: self.inner.subscribe(route).await?,
            journal: self.journal.clone(),
        }))
    }

    async fn enqueue(&self, messages: Vec<Envelope>) -> Result<usize> {
        self.inner.enqueue(messages).await
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }

    async fn enqueue_to(&self, route: &str, messages: Vec<Envelope>) -> Result<()> {
        self.inner.enqueue_to(route, messages).await
    }

    async fn is_idle(&self) -> Result<bool> {
        self.inner.is_idle().await
    }

    async fn set_routing(&self, pipeline: &Pipeline) -> Result<()> {
        self.inner.set_routing(pipeline).await
    }

    async fn advance_time(&self, by: Duration) -> Result<()> {
        self.inner.advance_time(by).await
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn state(&self) -> Option<Arc<dyn crate::state::Reader>> {
        self.inner.state()
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    fn queue(&self, route: &str) -> String {
        self.inner.queue(route)
    }

    fn consumer_group(&self, route: &str) -> Option<String> {
        self.inner.consumer_group(route)
    }

    async fn start_consuming(&self) -> Result<Box<dyn std::any::Any + Send + Sync>> {
        self.inner.start_consuming().await
    }

    async fn startup_warnings(&self) -> Result<Vec<String>> {
        self.inner.startup_warnings().await
    }

    async fn reply_inbox(&self) -> Result<Box<dyn ReplyInbox>> {
        self.inner.reply_inbox().await
    }
}

struct TapSubscription {
    route: String,
    inner: Box<dyn Subscription>,
    journal: Arc<Journal>,
}

#[async_trait]
impl Subscription for TapSubscription {
    async fn receive(&mut self, max: usize) -> Result<Vec<Delivery>> {
        self.inner.receive(max).await
    }

    async fn settle(&mut self, batch: Vec<Settlement>) -> Result<Vec<Refused>> {
        let seen: Vec<(u64, Settled)> = batch
            .iter()
            .map(|s| {
                let route = self.route.clone();
                let message = s.delivery.envelope.clone();
                let settled = match &s.outcome {
                    Outcome::Handled { outputs, reply, .. } => Settled::Handled {
                        route,
                        message,
                        outputs: outputs.clone(),
                        reply: reply.clone(),
                    },
                    Outcome::Retry { .. } => Settled::Retried { route, message },
                    Outcome::DeadLettered { .. } => Settled::DeadLettered { route, message },
                };
                (s.delivery.receipt, settled)
            })
            .collect();
        self.journal.begin_settle();
        let result = self.inner.settle(batch).await;
        let applied = match &result {
            Ok(refused) => seen
                .into_iter()
                .filter(|(receipt, _)| {
                    !refused
                        .iter()
                        .any(|r| r.settlement.delivery.receipt == *receipt)
                })
                .map(|(_, s)| s)
                .collect(),
            Err(_) => Vec::new(),
        };
        self.journal.finish_settle(applied);
        result
    }

    async fn release(&mut self, unsettled: Vec<Delivery>) -> Result<()> {
        self.inner.release(unsettled).await
    }
}
