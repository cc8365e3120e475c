//! The per-route loop: receive a batch, run each message through the plugin
//! (retrying at once where the policy says so), write dead letters, settle
//! the batch.
//!
//! The plugin runs on a blocking thread (wasm calls are synchronous and may
//! take up to their deadline); the loop itself is async and owns the
//! subscription. The order of durable writes is the at-least-once argument:
//! a dead letter is written before the delivery it comes from is settled,
//! and a delayed retry is scheduled in the same transaction that removes
//! the delivery. A failed write leaves the delivery to be received again.

mod commit;
mod lanes;
mod plan;
pub mod saga;
mod version;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use opentelemetry::KeyValue;
use tokio::sync::watch;

use crate::dlq::{DeadLetterStore, Source};
use crate::plugin::{Failure, FailureKind, LoadedPlugin};
use crate::recover::RetryPolicy;
use crate::telemetry::Telemetry;
use crate::transport::{Delivery, Subscription, Topology};
use commit::commit;
use worker::final_attempt;

pub use commit::{record_saga_count, record_store_size};
pub use plan::dead_letter;
pub use version::{Origin, RouteStatus, Serving, Version};
pub use worker::{BatchOutcome, Processed, Verdict, Worker, outcome_of};

/// Longest pause between attempts after store or plugin errors.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Error text kept per attempt in the history: a message carries at most
/// 64 attempts, and on RabbitMQ its whole history travels in one header
/// frame (128 KiB by default). The dead letter keeps the full last error.
const MAX_ATTEMPT_ERROR: usize = 1024;

/// Bytes of outputs a batch may hold before it is settled early, so a
/// batch of large outputs does not hold `batch_size` times the per-call
/// limit in memory.
const BATCH_OUTPUT_BUDGET: usize = crate::plugin::MAX_OUTPUT_BYTES;

/// Everything a route needs besides its plugin and subscription.
#[derive(Clone)]
pub struct RouteContext {
    pub pipeline: String,
    pub policy: RetryPolicy,
    pub dead_letters: Arc<dyn DeadLetterStore>,
    pub topology: Arc<Topology>,
    /// Where this route consumes from, for dead-letter records.
    pub source: Source,
    pub host: String,
    /// Stop the route with an error when its plugin cannot start (drain
    /// mode: a batch run must not wait for ever), instead of retrying.
    pub fail_when_plugin_cannot_start: bool,
    pub telemetry: Telemetry,
    /// Publish a copy of each dead letter to the broker
    /// (`[dead_letters] broker = true`).
    pub broker_dead_letters: bool,
    /// The payload contracts outputs are checked against (`[schemas]`).
    pub schemas: Arc<crate::schemas::Schemas>,
    /// `[host] max_message_size`: larger messages are refused as malformed.
    pub max_message_size: u64,
    /// What this host remembers of crashes (`None`: no guard, as in tests
    /// that drive a route by hand).
    pub crash_guard: Option<Arc<crate::crash_loop::CrashGuard>>,
    /// Plugin state: where calls read it and, on a broker, the store the
    /// route commits it to before settling (`None`: no state kept).
    pub state: Option<crate::state::Access>,
    /// The plugin is `exactly_once` and the state store is the route's to
    /// commit (a broker): handled messages are recorded as done with their
    /// outputs, and a redelivery of one is not handed to the plugin again.
    pub exactly_once: bool,
    /// The plugin is a saga: how its messages find their instances.
    pub saga: Option<Arc<crate::saga::SagaSpec>>,
    /// Where the route's journal records go (`None`: no journal).
    pub journal: Option<crate::journal::Sink>,
}

/// What a route remembers between batches so that no dead-letter status is
/// left wrong after a store error.
#[derive(Default)]
struct RouteState {
    /// Replayed records whose message was handled but could not be marked
    /// `handled` yet; tried again after every batch.
    handled_replays: Vec<String>,
    /// Messages whose dead letter was written but whose delivery could not be
    /// settled (message id → record id). If the redelivery succeeds, the
    /// record is closed as handled.
    dead_but_unsettled: std::collections::HashMap<String, String>,
}

/// Refuses, before any plugin sees it, a delivery that breaks one of the
/// host's limits or that its route does not take: it is dead-lettered as
/// malformed. A malformed delivery's id is made safe to log and index.
pub fn admit(ctx: &RouteContext, route: &str, d: &mut Delivery) {
    if d.malformed.is_none() {
        let takes = |t: &str| {
            ctx.topology
                .kind(t)
                .filter(|_| ctx.topology.destinations(t).iter().any(|r| r == route))
        };
        if let Err(reason) = crate::limits::check_inbound(&d.envelope, &takes, ctx.max_message_size)
        {
            d.malformed = Some(reason);
        }
    }
    if d.malformed.is_some() {
        crate::limits::sanitize(&mut d.envelope);
    }
}

/// Consumes one route until `shutdown` turns true. The message in hand when
/// shutdown arrives is finished; the rest of its batch is given back
/// unhandled, so shutdown waits for at most one message's deadline (times
/// its immediate retries).
pub async fn run_route(
    ctx: RouteContext,
    updates: RouteUpdates,
    subscription: Box<dyn Subscription>,
    batch_size: usize,
    shutdown: watch::Receiver<bool>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let mut route = Route::new(ctx, updates, subscription, batch_size, shutdown, stop);
    while let Some(batch) = route.next_batch().await? {
        route.run_batch(batch).await?;
    }
    Ok(())
}

/// One running route: what it keeps from one batch to the next.
struct Route {
    ctx: RouteContext,
    updates: RouteUpdates,
    subscription: Box<dyn Subscription>,
    batch_size: usize,
    shutdown: watch::Receiver<bool>,
    stop: Arc<AtomicBool>,
    plugin: LoadedPlugin,
    /// Run the plugin, one per lane (`concurrency`); on blocking threads
    /// while a batch is handled.
    workers: Vec<Worker>,
    /// Batches still to run on one lane because lanes read what other
    /// lanes wrote (see [`Route::handle`]).
    serial: Serial,
    in_flight_attrs: [KeyValue; 1],
    backoff: Backoff,
    state: RouteState,
    /// The next batch, taken in while the plugin handled the one before.
    ready: Vec<Delivery>,
    /// What the crash-loop guard knows of this route's messages.
    crashes: Option<Arc<crate::crash_loop::RouteGuard>>,
}

/// A batch as the plugin left it, with the messages the crash-loop guard
/// dead-lettered before it ran.
struct Handled {
    outcome: BatchOutcome,
    doomed: Vec<Processed>,
    received: i64,
}

impl Route {
    fn new(
        mut ctx: RouteContext,
        mut updates: RouteUpdates,
        subscription: Box<dyn Subscription>,
        batch_size: usize,
        shutdown: watch::Receiver<bool>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let first = updates.versions.borrow_and_update().clone();
        let plugin = first.plugin.clone();
        ctx.policy = first.policy.clone();
        let workers = workers_for(&ctx, &first);
        // A guard that cannot keep its record is a net missing, not a
        // reason to stop the route.
        let crashes =
            ctx.crash_guard
                .as_ref()
                .and_then(|g| match g.route(plugin.name().as_str()) {
                    Ok(r) => Some(Arc::new(r)),
                    Err(e) => {
                        tracing::warn!(plugin = %plugin.name(), error = %format!("{e:#}"), "The crash-loop guard cannot record this route's messages; running without it");
                        None
                    }
                });
        Route {
            in_flight_attrs: [KeyValue::new("plugin", plugin.name().to_string())],
            ctx,
            updates,
            subscription,
            batch_size,
            shutdown,
            stop,
            plugin,
            workers,
            serial: Serial::default(),
            backoff: Backoff::default(),
            state: RouteState::default(),
            ready: Vec::new(),
            crashes,
        }
    }

    /// The next batch, admitted (see [`admit`]): what was taken in ahead,
    /// or what the subscription gives. `None` once the route is to stop.
    async fn next_batch(&mut self) -> Result<Option<Vec<Delivery>>> {
        loop {
            if *self.shutdown.borrow() {
                if !self.ready.is_empty() {
                    self.subscription
                        .release(std::mem::take(&mut self.ready))
                        .await?;
                }
                return Ok(None);
            }
            let batch = if self.ready.is_empty() {
                // An idle route takes a new version as it comes, rather
                // than with the next message. Every subscription's
                // `receive` gives up nothing when dropped while it waits.
                tokio::select! {
                    biased;
                    _ = self.shutdown.changed() => return Ok(None),
                    changed = self.updates.versions.changed() => {
                        // No sender: the supervisor let go of the route.
                        if changed.is_err() {
                            return Ok(None);
                        }
                        self.swap_version();
                        continue;
                    }
                    batch = self.subscription.receive(self.batch_size) => batch,
                }
            } else {
                Ok(std::mem::take(&mut self.ready))
            };
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(plugin = %self.plugin.name(), error = %format!("{e:#}"), "Cannot receive; retrying");
                    self.backoff.wait(&mut self.shutdown).await;
                    continue;
                }
            };
            if self.updates.topology.has_changed().unwrap_or(false) {
                self.ctx.topology = self.updates.topology.borrow_and_update().clone();
            }
            for d in &mut batch {
                admit(&self.ctx, self.plugin.name().as_str(), d);
            }
            return Ok(Some(batch));
        }
    }

    /// Handles one batch and settles it.
    async fn run_batch(&mut self, batch: Vec<Delivery>) -> Result<()> {
        let (batch, mut doomed) = self.screen_suspects(batch);
        let (batch, mut done) = self.screen_done(batch).await;
        doomed.append(&mut done);
        self.take_new_version();
        let workers = std::mem::take(&mut self.workers);
        if workers.is_empty() {
            anyhow::bail!("route {} lost its workers", self.plugin.name());
        }
        let received = i64::try_from(batch.len()).unwrap_or(i64::MAX);
        self.ctx
            .telemetry
            .metrics
            .in_flight
            .add(received, &self.in_flight_attrs);
        // While any route holds a suspect, that route runs alone.
        let crashes = self.crashes.clone();
        let holds_suspect = crashes.as_ref().is_some_and(|g| {
            g.any_suspects() && batch.first().is_some_and(|d| g.crashes(&d.envelope.id) > 0)
        });
        let gate = match &crashes {
            Some(g) => g.gate(holds_suspect).await,
            None => None,
        };
        if let Some(g) = &crashes {
            g.in_hand(batch.iter().map(|d| d.envelope.id.as_str()));
        }
        let outcome = self.handle(workers, batch, received).await?;
        let handled = Handled {
            outcome,
            doomed,
            received,
        };
        let (committed, route_error) = self.commit_and_release(handled, gate).await?;
        self.after_batch(committed, route_error).await
    }

    /// Messages that crashed the host before: dead-lettered (the second
    /// part) if they did so too often, otherwise handled alone.
    fn screen_suspects(&mut self, batch: Vec<Delivery>) -> (Vec<Delivery>, Vec<Processed>) {
        let Some(g) = self.crashes.as_ref().filter(|g| g.any_suspects()) else {
            return (batch, Vec::new());
        };
        let (keep, later, gone) = isolate_suspects(g, batch);
        let doomed = gone
            .into_iter()
            .map(|(d, n)| crash_looped(&self.plugin, d, n, g.limit()))
            .collect();
        if !later.is_empty() {
            self.ready = later.into_iter().chain(self.ready.drain(..)).collect();
        }
        (keep, doomed)
    }

    /// The deliveries an exactly-once plugin already handled (a host died
    /// between the commit and the broker's ack, a producer sent a message
    /// twice): not handled again, but settled with the outputs recorded
    /// when they were (the second part). A second copy of an id in the
    /// batch waits for the next batch, which finds the first copy's record.
    /// When the store cannot say, every delivery is handled; the commit
    /// then refuses any that was done, and the batch comes again.
    async fn screen_done(&mut self, batch: Vec<Delivery>) -> (Vec<Delivery>, Vec<Processed>) {
        let store = match &self.ctx.state {
            Some(crate::state::Access {
                store: Some(store), ..
            }) if self.ctx.exactly_once => store.clone(),
            _ => return (batch, Vec::new()),
        };
        let ids: Vec<String> = batch.iter().map(|d| d.envelope.id.clone()).collect();
        let done = match store.done(self.plugin.name().as_str(), &ids).await {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(
                    plugin = %self.plugin.name(),
                    error = %format!("{e:#}"),
                    "Cannot read which messages were handled already; handling the batch"
                );
                Vec::new()
            }
        };
        let done: std::collections::HashMap<String, crate::state::Done> = done
            .into_iter()
            .map(|d| (d.message_id.clone(), d))
            .collect();
        let mut keep = Vec::with_capacity(batch.len());
        let mut later = Vec::new();
        let mut settled = Vec::new();
        let mut seen = std::collections::HashSet::with_capacity(batch.len());
        for delivery in batch {
            if let Some(record) = done.get(&delivery.envelope.id) {
                settled.push(Processed {
                    delivery,
                    verdict: Verdict::Done(record.clone()),
                    took: Duration::ZERO,
                    span: None,
                    attributes: Vec::new(),
                });
            } else if seen.insert(delivery.envelope.id.clone()) {
                keep.push(delivery);
            } else {
                later.push(delivery);
            }
        }
        if !later.is_empty() {
            self.ready = later.into_iter().chain(self.ready.drain(..)).collect();
        }
        (keep, settled)
    }

    /// Takes a new version here, between batches: the batch before ran on
    /// the old one, the next runs on the new one, and the subscription
    /// never notices.
    fn take_new_version(&mut self) {
        if self.updates.versions.has_changed().unwrap_or(false) {
            self.swap_version();
        }
    }

    /// Runs the version last handed to the route from now on.
    fn swap_version(&mut self) {
        let started = Instant::now();
        let next = self.updates.versions.borrow_and_update().clone();
        let old = std::mem::replace(&mut self.workers, workers_for(&self.ctx, &next));
        self.plugin = next.plugin.clone();
        self.ctx.policy = next.policy.clone();
        let took = started.elapsed();
        self.updates.status.swapped(next, took);
        self.ctx
            .telemetry
            .metrics
            .swap_duration
            .record(took.as_secs_f64(), &self.in_flight_attrs);
        tracing::info!(
            plugin = %self.plugin.name(),
            version = %self.plugin.info().version,
            digest = %crate::plugin::short_digest(self.plugin.digest()),
            took = ?took,
            "Plugin version swapped"
        );
        // The old instances' memory is released off this task.
        if !old.is_empty() {
            tokio::task::spawn_blocking(move || drop(old));
        }
    }

    /// Runs the batch through the plugin on blocking threads, one per lane
    /// (see [`lanes`]), while this one takes in what the transport already
    /// holds (unless the route is stopping, when it would only go back).
    async fn handle(
        &mut self,
        workers: Vec<Worker>,
        batch: Vec<Delivery>,
        received: i64,
    ) -> Result<BatchOutcome> {
        let serial = self.serial.take();
        let (parts, split) = if workers.len() > 1 && batch.len() > 1 && !serial {
            let mut split = lanes::split(batch, workers.len(), self.ctx.saga.as_deref());
            (std::mem::take(&mut split.lanes), Some(split))
        } else {
            (vec![batch], None)
        };
        // The lanes share the batch's output budget.
        let budget = BATCH_OUTPUT_BUDGET / parts.len().max(1);
        let mut parts = parts.into_iter();
        let mut running = Vec::with_capacity(workers.len());
        for mut w in workers {
            let part = parts.next().unwrap_or_default();
            if part.is_empty() {
                running.push(Lane::Idle(Box::new(w)));
                continue;
            }
            w.record_reads(split.is_some());
            let stop_flag = self.stop.clone();
            running.push(Lane::Busy(tokio::task::spawn_blocking(move || {
                let outcome = w.handle_batch_within(part, &stop_flag, budget);
                (w, outcome)
            })));
        }
        if !self.stop.load(Ordering::Relaxed) && !*self.shutdown.borrow() {
            let room = self.batch_size.saturating_sub(self.ready.len());
            if room > 0 {
                self.ready.extend(self.subscription.take_ready(room));
            }
        }
        let mut outcomes = Vec::with_capacity(running.len());
        let mut panicked = false;
        for lane in running {
            match lane {
                Lane::Idle(w) => {
                    self.workers.push(*w);
                    outcomes.push(BatchOutcome::default());
                }
                Lane::Busy(task) => match task.await {
                    Ok((w, outcome)) => {
                        self.workers.push(w);
                        outcomes.push(outcome);
                    }
                    Err(_) => panicked = true,
                },
            }
        }
        if panicked {
            self.ctx
                .telemetry
                .metrics
                .in_flight
                .add(-received, &self.in_flight_attrs);
            if !self.ready.is_empty() {
                self.subscription
                    .release(std::mem::take(&mut self.ready))
                    .await?;
            }
            anyhow::bail!("route {} worker panicked", self.plugin.name());
        }
        let Some(split) = split else {
            return Ok(outcomes.into_iter().next().unwrap_or_default());
        };
        let merged = lanes::merge(split, outcomes);
        if merged.rerun == 0 {
            self.serial.clear();
        } else {
            self.serial.conflict();
            self.ctx
                .telemetry
                .metrics
                .rerun
                .add(merged.rerun as u64, &self.in_flight_attrs);
            tracing::debug!(
                plugin = %self.plugin.name(),
                rerun = merged.rerun,
                serial_batches = self.serial.span,
                "A message read what a message on another lane wrote; it and the rest of the batch go back, and the next batches run on one lane"
            );
        }
        Ok(merged.outcome)
    }

    /// Commits what was processed and gives back what was not (with what
    /// was taken ahead, so nothing overtakes), then lets other routes run
    /// (`gate`). Returns whether all was committed, and why the plugin
    /// could not run, if it could not.
    async fn commit_and_release<G>(
        &mut self,
        handled: Handled,
        gate: G,
    ) -> Result<(bool, Option<anyhow::Error>)> {
        let Handled {
            outcome:
                BatchOutcome {
                    mut processed,
                    mut unhandled,
                    route_error,
                    reads: _,
                },
            mut doomed,
            received,
        } = handled;
        processed.append(&mut doomed);
        let suspects_settled: Vec<String> = match &self.crashes {
            Some(g) if g.any_suspects() => processed
                .iter()
                .map(|p| p.delivery.envelope.id.clone())
                .collect(),
            _ => Vec::new(),
        };
        let committed = commit(
            &self.ctx,
            &self.plugin,
            &mut self.state,
            self.subscription.as_mut(),
            processed,
            &mut unhandled,
        )
        .await;
        self.ctx
            .telemetry
            .metrics
            .in_flight
            .add(-received, &self.in_flight_attrs);
        // What was taken ahead must not overtake what goes back: both are
        // given back together, to be received again in order.
        if !unhandled.is_empty() || !committed {
            unhandled.append(&mut self.ready);
        }
        if let Some(g) = &self.crashes {
            if !suspects_settled.is_empty() {
                let settled: Vec<String> = suspects_settled
                    .into_iter()
                    .filter(|id| !unhandled.iter().any(|d| &d.envelope.id == id))
                    .collect();
                g.settled(&settled).await;
            }
            g.none_in_hand();
        }
        drop(gate);
        if !unhandled.is_empty() {
            self.subscription.release(unhandled).await?;
        }
        Ok((committed, route_error))
    }

    /// A plugin that cannot start stops the route in drain mode; otherwise
    /// the route logs it. After any failure the route pauses, doubling the
    /// pause each time.
    async fn after_batch(
        &mut self,
        committed: bool,
        route_error: Option<anyhow::Error>,
    ) -> Result<()> {
        if let Some(e) = route_error.as_ref() {
            if self.ctx.fail_when_plugin_cannot_start {
                anyhow::bail!(
                    "plugin {} cannot start, so its messages stay queued: {e:#}",
                    self.plugin.name()
                );
            }
            tracing::error!(
                plugin = %self.plugin.name(),
                error = %format!("{e:#}"),
                "Plugin cannot start; its messages stay queued and the route retries"
            );
            self.updates.status.set_cannot_start(Some(format!("{e:#}")));
        }
        if committed && route_error.is_none() {
            self.updates.status.set_cannot_start(None);
            self.backoff.reset();
        } else {
            self.backoff.wait(&mut self.shutdown).await;
        }
        Ok(())
    }
}

/// How many batches run on one lane after lanes collided: one after a
/// conflict, twice as many after each further conflict of the batch that
/// follows them (up to [`Serial::MAX`]), none once a batch on lanes has
/// none. A route whose messages keep colliding thus runs mostly as one
/// lane, and tries its lanes again now and then.
#[derive(Default)]
struct Serial {
    /// Batches left to run on one lane.
    left: u32,
    /// The length of the last run on one lane.
    span: u32,
}

impl Serial {
    const MAX: u32 = 64;

    /// Whether the next batch runs on one lane.
    fn take(&mut self) -> bool {
        let serial = self.left > 0;
        self.left = self.left.saturating_sub(1);
        serial
    }

    fn conflict(&mut self) {
        self.span = (self.span.saturating_mul(2)).clamp(1, Self::MAX);
        self.left = self.span;
    }

    fn clear(&mut self) {
        self.span = 0;
    }
}

/// A lane of a batch being handled: its worker waiting, or running it.
enum Lane {
    Idle(Box<Worker>),
    Busy(tokio::task::JoinHandle<(Worker, BatchOutcome)>),
}

/// The workers of a version of the route's plugin, one per lane
/// (`concurrency`); the first takes the instance made in advance.
fn workers_for(ctx: &RouteContext, version: &Version) -> Vec<Worker> {
    (0..version.plugin.limits().concurrency.max(1))
        .map(|_| worker_for(ctx, version))
        .collect()
}

/// A worker for a version of the route's plugin.
fn worker_for(ctx: &RouteContext, version: &Version) -> Worker {
    let worker = Worker::new(version.plugin.clone(), version.policy.clone())
        .with_telemetry(ctx.telemetry.clone())
        .with_schemas(ctx.schemas.clone())
        .with_max_message_size(ctx.max_message_size)
        .with_instance(version.take_instance());
    let worker = match &ctx.state {
        Some(access) => worker.with_state(access.reader.clone()),
        None => worker,
    };
    worker.with_saga(ctx.saga.clone())
}

/// Splits a batch by what earlier crashes say of its messages: the part to
/// handle now (up to the first suspect, or that suspect alone), the part to
/// handle after it, and the messages at the crash-loop limit (with their
/// crash counts).
fn isolate_suspects(
    guard: &crate::crash_loop::RouteGuard,
    batch: Vec<Delivery>,
) -> (Vec<Delivery>, Vec<Delivery>, Vec<(Delivery, u32)>) {
    let mut now: Vec<Delivery> = Vec::new();
    let mut later = Vec::new();
    let mut doomed = Vec::new();
    let mut leader_suspect = false;
    for d in batch {
        let n = guard.crashes(&d.envelope.id);
        if n >= guard.limit() {
            doomed.push((d, n));
        } else if !later.is_empty() || leader_suspect || (n > 0 && !now.is_empty()) {
            // After a suspect, or a suspect after others: the next batch.
            later.push(d);
        } else {
            leader_suspect = n > 0;
            now.push(d);
        }
    }
    (now, later, doomed)
}

/// The verdict on a message that crashed the host `crashes` times in a row.
fn crash_looped(
    plugin: &LoadedPlugin,
    mut delivery: Delivery,
    crashes: u32,
    limit: u32,
) -> Processed {
    let failure = Failure {
        kind: FailureKind::CrashLoop,
        message: format!(
            "the host died {crashes} times in a row while this message was in hand ([host] crash_loop_limit is {limit}); it is not handled again"
        ),
        code: None,
        details: Vec::new(),
        backtrace: None,
        output: None,
    };
    tracing::error!(
        plugin = %plugin.name(),
        message.r#type = %delivery.envelope.message_type,
        message.id = %delivery.envelope.id,
        crashes,
        "Message crashed the host again and again; dead-lettering it"
    );
    let attempt = final_attempt(plugin, delivery.envelope.attempt, &failure, None);
    delivery.envelope.history.push(attempt);
    Processed {
        delivery,
        verdict: Verdict::DeadLetter(failure),
        took: Duration::ZERO,
        span: None,
        attributes: Vec::new(),
    }
}

/// How a route learns of changes made while it runs.
pub struct RouteUpdates {
    /// The version the route should run; it takes a new one between
    /// batches.
    pub versions: watch::Receiver<Arc<Version>>,
    /// Who receives which message type.
    pub topology: watch::Receiver<Arc<Topology>>,
    /// Where the route reports what it runs.
    pub status: Arc<RouteStatus>,
}

/// Doubling pause after store or plugin errors, cut short by shutdown.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(50),
        }
    }
}

impl Backoff {
    fn reset(&mut self) {
        *self = Backoff::default();
    }

    async fn wait(&mut self, shutdown: &mut watch::Receiver<bool>) {
        tokio::select! {
            _ = tokio::time::sleep(self.next) => {}
            _ = shutdown.changed() => {}
        }
        self.next = (self.next * 2).min(MAX_BACKOFF);
    }
}
