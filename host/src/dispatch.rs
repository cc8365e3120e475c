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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::watch;

use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt as _};
use opentelemetry::{Context, KeyValue};

use crate::dlq::{DeadLetter, DeadLetterStore, ErrorInfo, Source, Status};
use crate::envelope::{Attempt, Envelope, Kind, Reply, new_id, now_ms};
use crate::plugin::{Failure, FailureKind, Instance, LoadedPlugin, Output, clip};
use crate::recover::{self, Decision, RetryPolicy};
use crate::telemetry::{self, Telemetry};
use crate::transport::{Delivery, Outcome, Refused, Settlement, Subscription, Topology};

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

/// Runs a plugin's messages; owns its warm instance.
pub struct Worker {
    plugin: LoadedPlugin,
    policy: RetryPolicy,
    instance: Option<Instance>,
    telemetry: Telemetry,
    schemas: Arc<crate::schemas::Schemas>,
    /// `plugin` and `plugin.version`, attached to every message metric.
    plugin_attrs: [KeyValue; 2],
    /// `message.type`, attached to every message metric.
    type_attr: TypeAttr,
    /// Span attributes shared by every message of the route, built once.
    plugin_span_attrs: [KeyValue; 5],
    /// `[host] max_message_size`: an output with a larger payload fails
    /// its call as a contract violation.
    max_message_size: u64,
}

/// The `message.type` metric attribute of the last type seen: a run of
/// messages of one type shares one value instead of copying the name for
/// every metric.
#[derive(Default)]
struct TypeAttr(Option<KeyValue>);

impl TypeAttr {
    fn of(&mut self, message_type: &str) -> KeyValue {
        if let Some(kv) = &self.0
            && kv.value.as_str() == message_type
        {
            return kv.clone();
        }
        let value: Arc<str> = message_type.into();
        let kv = KeyValue::new("message.type", opentelemetry::Value::String(value.into()));
        self.0 = Some(kv.clone());
        kv
    }
}

/// The fate of one delivery after all its immediate attempts.
#[derive(Debug)]
pub enum Verdict {
    Handled(Vec<Output>),
    /// Failed; to be tried again after this long.
    RetryLater(Duration, Failure),
    /// Failed for good.
    DeadLetter(Failure),
}

/// What handling one delivery produced. The delivery's envelope carries the
/// updated attempt number and history.
#[derive(Debug)]
pub struct Processed {
    pub delivery: Delivery,
    pub verdict: Verdict,
    pub took: Duration,
    /// The message's `process` span, ended when it is dropped.
    pub span: Option<Context>,
}

/// What became of a batch: messages processed (to settle), messages not
/// attempted (to give back), and why the batch stopped early.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub processed: Vec<Processed>,
    pub unhandled: Vec<Delivery>,
    /// The plugin could not run at all (it failed to instantiate): no
    /// message is at fault, so none is failed.
    pub route_error: Option<anyhow::Error>,
}

/// Fails a call one of whose outputs is larger than a message may be: the
/// consumer would refuse it.
fn check_output_sizes(
    plugin: &LoadedPlugin,
    outputs: Vec<Output>,
    max: u64,
) -> Result<Vec<Output>, Failure> {
    let too_big = outputs.iter().find_map(|o| {
        let (what, len) = match o {
            Output::Event(o) => (o.message_type.as_str(), o.payload.len()),
            Output::Command(o) => (o.message_type.as_str(), o.payload.len()),
            Output::Reply(r) => ("its reply", r.payload.len()),
        };
        (len as u64 > max).then(|| (what.to_owned(), len))
    });
    match too_big {
        None => Ok(outputs),
        Some((what, len)) => Err(Failure {
            kind: FailureKind::ContractViolation,
            message: format!(
                "plugin {} emitted {what} with a payload of {len} bytes, more than the {max} a message may have ([host] max_message_size)",
                plugin.name()
            ),
            code: None,
            details: Vec::new(),
            backtrace: None,
            output: None,
        }),
    }
}

fn output_bytes(outputs: &[Output]) -> usize {
    outputs
        .iter()
        .map(|o| match o {
            Output::Event(o) | Output::Command(o) => o.payload.len(),
            Output::Reply(r) => r.payload.len(),
        })
        .sum()
}

/// Metric attributes of a message: `plugin`, `plugin.version`,
/// `message.type`.
type MessageAttrs = [KeyValue; 3];

/// A message's attributes plus one more.
fn and(attrs: &MessageAttrs, extra: KeyValue) -> [KeyValue; 4] {
    let [a, b, c] = attrs.clone();
    [a, b, c, extra]
}

/// The type a delivery is labelled with in metrics and span names: its own,
/// unless it is malformed, when its type could be anything at all.
fn type_label(d: &Delivery) -> &str {
    if d.malformed.is_some() {
        crate::limits::MALFORMED_TYPE_LABEL
    } else {
        &d.envelope.message_type
    }
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

/// Header a replayed message carries: the `trace-span` ids of its dead
/// letter's last span, which the replay's span links to.
pub const REPLAY_TRACE_HEADER: &str = "switchyard-replay-trace";

impl Worker {
    pub fn new(plugin: LoadedPlugin, policy: RetryPolicy) -> Self {
        let name: std::sync::Arc<str> = plugin.name().as_str().into();
        let version: std::sync::Arc<str> = plugin.info().version.as_str().into();
        let digest: std::sync::Arc<str> = plugin.digest().into();
        let s = |v: &std::sync::Arc<str>| opentelemetry::Value::String(v.clone().into());
        Worker {
            plugin_attrs: [
                KeyValue::new("plugin", s(&name)),
                KeyValue::new("plugin.version", s(&version)),
            ],
            plugin_span_attrs: [
                KeyValue::new("messaging.system", "switchyard"),
                KeyValue::new("messaging.consumer.group.name", s(&name)),
                KeyValue::new("switchyard.plugin.name", s(&name)),
                KeyValue::new("switchyard.plugin.version", s(&version)),
                KeyValue::new("switchyard.plugin.digest", s(&digest)),
            ],
            type_attr: TypeAttr::default(),
            plugin,
            policy,
            instance: None,
            telemetry: Telemetry::off(),
            schemas: Arc::default(),
            max_message_size: crate::limits::DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    /// Fails calls whose outputs have payloads larger than this.
    pub fn with_max_message_size(mut self, bytes: u64) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Starts with an instance made in advance (by a hot swap).
    pub fn with_instance(mut self, instance: Option<Instance>) -> Self {
        if instance.is_some() {
            self.instance = instance;
        }
        self
    }

    /// Checks outputs against these payload contracts.
    pub fn with_schemas(mut self, schemas: Arc<crate::schemas::Schemas>) -> Self {
        self.schemas = schemas;
        self
    }

    /// Traces and measures what this worker handles.
    pub fn with_telemetry(mut self, telemetry: Telemetry) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// The metric attributes of a message whose type label is `label`
    /// (see [`type_label`]).
    fn attrs(&mut self, label: &str) -> MessageAttrs {
        let [plugin, version] = self.plugin_attrs.clone();
        [plugin, version, self.type_attr.of(label)]
    }

    /// The `process {type}` span of a delivery: a child of the context in
    /// its headers, or, for a replay, the root of a new trace linked to the
    /// dead letter's; linked to the span of the attempt before it.
    fn start_span(&self, d: &Delivery) -> Option<Context> {
        if !self.telemetry.tracing() {
            return None;
        }
        let e = &d.envelope;
        let mut links: Vec<SpanContext> = Vec::new();
        let replay_trace = e.headers.iter().find(|(n, _)| n == REPLAY_TRACE_HEADER);
        let parent = if let Some((_, original)) = replay_trace {
            // The first attempt of a replay: a new trace, linked to the
            // dead letter's span when its ids were recorded.
            links.extend(
                original
                    .split_once('-')
                    .and_then(|(t, s)| telemetry::span_context(t, s)),
            );
            Context::new()
        } else {
            self.telemetry.extract(&e.headers, &e.id)
        };
        if let Some(prev) = e.history.last()
            && let (Some(t), Some(s)) = (&prev.trace_id, &prev.span_id)
            && let Some(sc) = telemetry::span_context(t, s)
        {
            links.push(sc);
        }
        let mut attributes = Vec::with_capacity(10);
        attributes.extend(self.plugin_span_attrs.iter().cloned());
        attributes.extend([
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", type_label(d).to_owned()),
            KeyValue::new("messaging.message.id", e.id.clone()),
            KeyValue::new("switchyard.attempt", i64::from(e.attempt)),
        ]);
        if let Some(c) = &e.correlation_id {
            attributes.push(KeyValue::new(
                "messaging.message.conversation_id",
                c.clone(),
            ));
        }
        if let Some(record) = DeadLetter::replay_of(e) {
            attributes.push(KeyValue::new("switchyard.replay_of", record.to_owned()));
        }
        self.telemetry.start_span(
            format!("process {}", type_label(d)),
            SpanKind::Consumer,
            &parent,
            attributes,
            links,
        )
    }

    pub fn plugin(&self) -> &LoadedPlugin {
        &self.plugin
    }

    /// Handles one message once on the warm instance, creating a fresh one
    /// first if the last trapped or is due for recycling. The outer error
    /// means the plugin could not be instantiated: the message was not
    /// attempted.
    pub fn handle(&mut self, envelope: &mut Envelope) -> Result<Result<Vec<Output>, Failure>> {
        self.handle_in(envelope, None, &mut 0)
    }

    /// A warm instance, created if there is none (or the last one is spent).
    fn ensure_instance(&mut self) -> Result<&mut Instance> {
        if self.instance.as_ref().is_none_or(Instance::is_spent) {
            self.instance = Some(self.plugin.instantiate()?);
        }
        self.instance
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no instance of plugin {}", self.plugin.name()))
    }

    fn handle_in(
        &mut self,
        envelope: &mut Envelope,
        span: Option<&Context>,
        span_budget: &mut u32,
    ) -> Result<Result<Vec<Output>, Failure>> {
        let instance = self.ensure_instance()?;
        let result = instance.handle_traced(envelope, span, span_budget);
        if instance.is_spent() {
            // Drop now, not at the next message: a trapped store may hold a
            // lot of memory.
            self.instance = None;
        }
        Ok(result)
    }

    fn plugin_label(&self) -> String {
        format!("{}@{}", self.plugin.name(), self.plugin.info().version)
    }

    /// Handles one delivery, with the immediate retries its policy allows,
    /// recording each failed attempt in the envelope's history.
    pub fn process(&mut self, delivery: &mut Delivery) -> Result<Verdict> {
        self.process_traced(delivery).map(|(v, _)| v)
    }

    /// [`Worker::process`], returning the delivery's `process` span (when
    /// tracing is on) to record the outcome on.
    pub fn process_traced(
        &mut self,
        delivery: &mut Delivery,
    ) -> Result<(Verdict, Option<Context>)> {
        // A plugin that cannot start attempts nothing: no span for it.
        if delivery.malformed.is_none() {
            self.ensure_instance()?;
        }
        let span = self.start_span(delivery);
        let verdict = self.attempt_all(delivery, span.as_ref())?;
        Ok((verdict, span))
    }

    fn attempt_all(&mut self, delivery: &mut Delivery, span: Option<&Context>) -> Result<Verdict> {
        let ids = span.and_then(telemetry::ids);
        if let Some(reason) = &delivery.malformed {
            let failure = Failure {
                kind: FailureKind::Malformed,
                message: format!("the message cannot be decoded: {reason}"),
                code: None,
                details: Vec::new(),
                backtrace: None,
                output: None,
            };
            let attempt = Attempt {
                number: delivery.envelope.attempt,
                started_at_ms: now_ms(),
                duration_us: 0,
                error_kind: failure.kind.as_str().into(),
                error: clip(&failure.message, MAX_ATTEMPT_ERROR),
                plugin: self.plugin_label(),
                then: Decision::DeadLetter.as_str().into(),
                trace_id: ids.as_ref().map(|(t, _)| t.clone()),
                span_id: ids.as_ref().map(|(_, s)| s.clone()),
            };
            delivery.envelope.history.push(attempt);
            let attrs = self.attrs(type_label(delivery));
            self.telemetry.metrics.failed.add(
                1,
                &and(&attrs, KeyValue::new("error.type", failure.kind.as_str())),
            );
            return Ok(Verdict::DeadLetter(failure));
        }
        let envelope = &mut delivery.envelope;
        let delayed_used = u32::try_from(
            envelope
                .history
                .iter()
                .filter(|a| a.then == Decision::RetryLater(Duration::ZERO).as_str())
                .count(),
        )
        .unwrap_or(u32::MAX);
        let mut immediate_used = 0;
        let mut span_budget = crate::plugin::MAX_PLUGIN_SPAN_EVENTS;
        loop {
            let started_at_ms = now_ms();
            let started = Instant::now();
            let result = self
                .handle_in(envelope, span, &mut span_budget)?
                .and_then(|outputs| {
                    check_output_sizes(&self.plugin, outputs, self.max_message_size)
                })
                .and_then(|outputs| crate::schemas::check_outputs(&self.schemas, outputs));
            let attrs = self.attrs(&envelope.message_type);
            self.telemetry
                .metrics
                .handler_duration
                .record(started.elapsed().as_secs_f64(), &attrs);
            let failure = match result {
                Ok(outputs) => return Ok(Verdict::Handled(outputs)),
                Err(f) => f,
            };
            let decision = self
                .policy
                .decide(failure.kind, immediate_used, delayed_used);
            self.telemetry.metrics.failed.add(
                1,
                &and(&attrs, KeyValue::new("error.type", failure.kind.as_str())),
            );
            if let Some(cx) = span {
                cx.span().add_event(
                    "attempt failed",
                    vec![
                        KeyValue::new("switchyard.attempt", i64::from(envelope.attempt)),
                        KeyValue::new("error.type", failure.kind.as_str()),
                        KeyValue::new(
                            "exception.message",
                            clip(&failure.message, MAX_ATTEMPT_ERROR),
                        ),
                        KeyValue::new("switchyard.then", decision.as_str()),
                    ],
                );
            }
            envelope.history.push(Attempt {
                number: envelope.attempt,
                started_at_ms,
                duration_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                error_kind: failure.kind.as_str().into(),
                error: clip(&failure.message, MAX_ATTEMPT_ERROR),
                plugin: self.plugin_label(),
                then: decision.as_str().into(),
                trace_id: ids.as_ref().map(|(t, _)| t.clone()),
                span_id: ids.as_ref().map(|(_, s)| s.clone()),
            });
            match decision {
                Decision::RetryNow => {
                    self.telemetry
                        .metrics
                        .retried
                        .add(1, &and(&attrs, KeyValue::new("retry", "now")));
                    tracing::info!(
                        plugin = %self.plugin.name(),
                        message.r#type = %envelope.message_type,
                        message.id = %envelope.id,
                        attempt = envelope.attempt,
                        error.kind = %failure.kind,
                        error = %failure.message,
                        "Attempt failed; retrying now"
                    );
                    immediate_used += 1;
                    envelope.attempt = envelope.attempt.saturating_add(1);
                }
                Decision::RetryLater(delay) => {
                    envelope.attempt = envelope.attempt.saturating_add(1);
                    return Ok(Verdict::RetryLater(delay, failure));
                }
                Decision::DeadLetter => return Ok(Verdict::DeadLetter(failure)),
            }
        }
    }

    /// Handles a batch in order, stopping early (and leaving the rest
    /// unhandled) when `stop` is set, when the batch's outputs reach their
    /// memory budget, or when the plugin cannot be instantiated.
    pub fn handle_batch(&mut self, batch: Vec<Delivery>, stop: &AtomicBool) -> BatchOutcome {
        let mut out = BatchOutcome::default();
        let mut bytes = 0usize;
        let mut rest = batch.into_iter();
        for mut delivery in rest.by_ref() {
            if stop.load(Ordering::Relaxed) || bytes >= BATCH_OUTPUT_BUDGET {
                out.unhandled.push(delivery);
                break;
            }
            let started = Instant::now();
            // A failed instantiation leaves the history as it was: nothing
            // was attempted.
            let history_len = delivery.envelope.history.len();
            let attempt = delivery.envelope.attempt;
            match self.process_traced(&mut delivery) {
                Ok((verdict, span)) => {
                    if let Verdict::Handled(outputs) = &verdict {
                        bytes += output_bytes(outputs);
                    }
                    out.processed.push(Processed {
                        delivery,
                        verdict,
                        took: started.elapsed(),
                        span,
                    });
                }
                Err(e) => {
                    delivery.envelope.history.truncate(history_len);
                    delivery.envelope.attempt = attempt;
                    out.unhandled.push(delivery);
                    out.route_error = Some(e);
                    break;
                }
            }
        }
        out.unhandled.extend(rest);
        out
    }
}

/// Turns a handler's outputs into envelopes linked to the input.
pub fn outcome_of(input: &Envelope, outputs: Vec<Output>) -> Outcome {
    let mut envelopes = Vec::new();
    let mut reply = None;
    let now = now_ms();
    for output in outputs {
        let (kind, o) = match output {
            Output::Event(o) => (Kind::Event, o),
            Output::Command(o) => (Kind::Command, o),
            Output::Reply(r) => {
                match &input.reply_to {
                    Some(address) => {
                        reply = Some(Reply {
                            address: address.clone(),
                            in_reply_to: input.id.clone(),
                            correlation_id: input.flow_id().to_owned(),
                            payload: r.payload,
                            content_type: r.content_type,
                            headers: r.headers,
                            created_at_ms: now,
                        });
                    }
                    None => tracing::debug!(
                        message.id = %input.id,
                        "Reply discarded: the command has no reply-to address"
                    ),
                }
                continue;
            }
        };
        envelopes.push(Envelope {
            id: new_id(),
            message_type: o.message_type,
            kind,
            payload: o.payload,
            content_type: o.content_type,
            headers: o.headers,
            correlation_id: Some(input.flow_id().to_owned()),
            causation_id: Some(input.id.clone()),
            reply_to: None,
            partition_key: o.partition_key,
            created_at_ms: now,
            attempt: 1,
            history: Vec::new(),
        });
    }
    Outcome::Handled {
        outputs: envelopes,
        reply,
    }
}

fn summarize(outputs: &[Envelope], reply: bool) -> String {
    let mut parts: Vec<String> = outputs
        .iter()
        .map(|o| match o.kind {
            Kind::Event => o.message_type.clone(),
            Kind::Command => format!("{} (command)", o.message_type),
        })
        .collect();
    if reply {
        parts.push("reply".into());
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}

/// The dead letter of a message that failed for good. `span` is the
/// message's last `process` span, if traced.
pub fn dead_letter(
    ctx: &RouteContext,
    plugin: &LoadedPlugin,
    message: &Envelope,
    origin: Option<&crate::transport::Origin>,
    failure: &Failure,
    span: Option<&Context>,
) -> DeadLetter {
    let route = plugin.name().as_str();
    let (fingerprint, cause) = recover::fingerprint(
        route,
        failure.kind.as_str(),
        &failure.message,
        failure.backtrace.as_deref(),
    );
    let now = now_ms();
    let mut stored = message.clone();
    let attempts = std::mem::take(&mut stored.history);
    let ids = span.and_then(telemetry::ids);
    DeadLetter {
        id: new_id(),
        pipeline: ctx.pipeline.clone(),
        route: route.to_owned(),
        plugin_version: plugin.info().version.clone(),
        plugin_digest: plugin.digest().to_owned(),
        first_failed_at_ms: attempts.first().map_or(now, |a| a.started_at_ms),
        last_failed_at_ms: now,
        message: stored,
        error: ErrorInfo {
            kind: failure.kind.as_str().to_owned(),
            message: failure.message.clone(),
            code: failure.code.clone(),
            details: failure.details.clone(),
            backtrace: failure.backtrace.clone(),
            output: failure.output.clone(),
        },
        attempts,
        source: match origin {
            Some(o) => Source {
                queue: o.topic.clone(),
                partition: Some(o.partition),
                offset: Some(o.offset),
                ..ctx.source.clone()
            },
            None => ctx.source.clone(),
        },
        trace_id: ids.as_ref().map(|(t, _)| t.clone()),
        span_id: ids.map(|(_, s)| s),
        host: ctx.host.clone(),
        fingerprint,
        cause,
        status: Status::Dead,
        replay_count: 0,
        replayed_at_ms: None,
        resolved_at_ms: None,
        note: None,
    }
}

/// A batch turned into durable steps: dead letters to write first, then
/// settlements (the dead-lettered ones flagged), then replays to mark. The
/// spans end when the plan is dropped, after the batch is settled.
struct Plan {
    letters: Vec<DeadLetter>,
    settlements: Vec<Planned>,
    replays_handled: Vec<String>,
    spans: Vec<Context>,
}

/// One settlement, whether it is a dead letter, and the metric it moves
/// once it is durable.
struct Planned {
    settlement: Settlement,
    dead: bool,
    metric: Metric,
}

/// A metric update applied only after its settlement succeeded, so a batch
/// handled again after a store error is not counted twice.
enum Metric {
    Handled {
        attrs: MessageAttrs,
        age_s: f64,
    },
    RetriedLater {
        attrs: MessageAttrs,
    },
    DeadLettered {
        attrs: MessageAttrs,
        kind: FailureKind,
    },
}

impl Metric {
    /// Applies a settled batch's updates. Consecutive messages handled with
    /// the same attributes are counted in one step: each step looks its
    /// attributes up in the instrument, which costs more than the count.
    fn apply_all(updates: Vec<Metric>, metrics: &crate::telemetry::Metrics) {
        let mut handled: Option<(MessageAttrs, u64)> = None;
        for update in updates {
            match update {
                Metric::Handled { attrs, age_s } => {
                    metrics.latency.record(age_s, &attrs);
                    match &mut handled {
                        Some((last, n)) if *last == attrs => *n += 1,
                        _ => {
                            if let Some((last, n)) = handled.replace((attrs, 1)) {
                                metrics.handled.add(n, &last);
                            }
                        }
                    }
                }
                Metric::RetriedLater { attrs } => {
                    metrics
                        .retried
                        .add(1, &and(&attrs, KeyValue::new("retry", "later")));
                }
                Metric::DeadLettered { attrs, kind } => {
                    metrics
                        .dead_lettered
                        .add(1, &and(&attrs, KeyValue::new("error.type", kind.as_str())));
                }
            }
        }
        if let Some((last, n)) = handled {
            metrics.handled.add(n, &last);
        }
    }
}

/// A `send {type}` PRODUCER span for an output, its context written into
/// the output's headers. It ends when the batch is settled.
fn send_span(telemetry: &Telemetry, parent: &Context, output: &mut Envelope) -> Option<Context> {
    let attributes = vec![
        KeyValue::new("messaging.system", "switchyard"),
        KeyValue::new("messaging.operation.type", "send"),
        KeyValue::new("messaging.operation.name", "send"),
        KeyValue::new("messaging.destination.name", output.message_type.clone()),
        KeyValue::new("messaging.message.id", output.id.clone()),
        KeyValue::new("switchyard.message.kind", output.kind.as_str()),
    ];
    if let Some(cx) = telemetry.start_span(
        format!("send {}", output.message_type),
        SpanKind::Producer,
        parent,
        attributes,
        Vec::new(),
    ) {
        telemetry.inject(&cx, &mut output.headers);
        return Some(cx);
    }
    None
}

fn plan(ctx: &RouteContext, plugin: &LoadedPlugin, processed: Vec<Processed>) -> Plan {
    let name = plugin.name().as_str();
    let mut plan = Plan {
        letters: Vec::new(),
        settlements: Vec::new(),
        replays_handled: Vec::new(),
        spans: Vec::new(),
    };
    // Shared by every message of the batch: cloned, not copied.
    let shared = |v: &str| opentelemetry::Value::String(Arc::<str>::from(v).into());
    let plugin_kv = KeyValue::new("plugin", shared(name));
    let version_kv = KeyValue::new("plugin.version", shared(&plugin.info().version));
    let mut type_attr = TypeAttr::default();
    for p in processed {
        let e = &p.delivery.envelope;
        let attrs = [
            plugin_kv.clone(),
            version_kv.clone(),
            type_attr.of(type_label(&p.delivery)),
        ];
        let (trace_id, span_id) = p.span.as_ref().and_then(telemetry::ids).unwrap_or_default();
        let verdict = match p.verdict {
            Verdict::Handled(outputs) => {
                let Outcome::Handled { mut outputs, reply } = outcome_of(e, outputs) else {
                    continue;
                };
                // Validation makes this impossible for declared outputs; a
                // command without a handler must not vanish.
                let lost = outputs
                    .iter()
                    .find(|o| {
                        o.kind == Kind::Command
                            && ctx.topology.destinations(&o.message_type).is_empty()
                    })
                    .map(|o| o.message_type.clone());
                match lost {
                    Some(lost) => Verdict::DeadLetter(Failure {
                        kind: FailureKind::ContractViolation,
                        message: format!(
                            "plugin {name} sent command {lost}, which no plugin in this pipeline handles"
                        ),
                        code: None,
                        details: Vec::new(),
                        backtrace: None,
                        output: None,
                    }),
                    None => {
                        if let Some(cx) = &p.span {
                            for o in &mut outputs {
                                plan.spans.extend(send_span(&ctx.telemetry, cx, o));
                            }
                        }
                        tracing::info!(
                            plugin = %name,
                            message.r#type = %e.message_type,
                            message.id = %e.id,
                            attempt = e.attempt,
                            took = ?p.took,
                            emitted = %summarize(&outputs, reply.is_some()),
                            trace_id = %trace_id,
                            span_id = %span_id,
                            "Handled"
                        );
                        let age_ms = now_ms().saturating_sub(e.created_at_ms);
                        if let Some(record) = DeadLetter::replay_of(e) {
                            plan.replays_handled.push(record.to_owned());
                        }
                        plan.spans.extend(p.span);
                        plan.settlements.push(Planned {
                            settlement: Settlement {
                                delivery: p.delivery,
                                outcome: Outcome::Handled { outputs, reply },
                            },
                            dead: false,
                            metric: Metric::Handled {
                                attrs,
                                age_s: age_ms as f64 / 1000.0,
                            },
                        });
                        continue;
                    }
                }
            }
            v => v,
        };
        match verdict {
            Verdict::RetryLater(delay, f) => {
                tracing::warn!(
                    plugin = %name,
                    message.r#type = %e.message_type,
                    message.id = %e.id,
                    attempt = e.attempt.saturating_sub(1),
                    error.kind = %f.kind,
                    error = %f.message,
                    retry_in = ?delay,
                    trace_id = %trace_id,
                    span_id = %span_id,
                    "Attempt failed; retry scheduled"
                );
                let mut message = e.clone();
                if let Some(cx) = &p.span {
                    cx.span().add_event(
                        "retry scheduled",
                        vec![KeyValue::new(
                            "switchyard.retry_in_ms",
                            i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
                        )],
                    );
                    telemetry::set_error(cx, &clip(&f.message, MAX_ATTEMPT_ERROR));
                    // A replay's first attempt opened a new trace: its
                    // retries continue that trace, not the original one.
                    if message
                        .headers
                        .iter()
                        .any(|(n, _)| n == REPLAY_TRACE_HEADER)
                    {
                        message.headers.retain(|(n, _)| n != REPLAY_TRACE_HEADER);
                        ctx.telemetry.inject(cx, &mut message.headers);
                    }
                }
                let not_before_ms =
                    now_ms().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
                plan.spans.extend(p.span);
                plan.settlements.push(Planned {
                    settlement: Settlement {
                        delivery: p.delivery,
                        outcome: Outcome::Retry {
                            message,
                            not_before_ms,
                        },
                    },
                    dead: false,
                    metric: Metric::RetriedLater { attrs },
                });
            }
            Verdict::DeadLetter(f) => {
                let letter = dead_letter(
                    ctx,
                    plugin,
                    e,
                    p.delivery.origin.as_ref(),
                    &f,
                    p.span.as_ref(),
                );
                tracing::warn!(
                    plugin = %name,
                    message.r#type = %e.message_type,
                    message.id = %e.id,
                    attempts = letter.attempts.len(),
                    error.kind = %f.kind,
                    error = %f.message,
                    fingerprint = %letter.fingerprint,
                    trace_id = %trace_id,
                    span_id = %span_id,
                    "Dead-lettered"
                );
                if let Some(bt) = &f.backtrace {
                    tracing::debug!(plugin = %name, message.id = %e.id, "wasm backtrace:\n{bt}");
                }
                if let Some(cx) = &p.span {
                    cx.span().add_event(
                        "dead-lettered",
                        vec![
                            KeyValue::new("error.type", f.kind.as_str()),
                            KeyValue::new(
                                "switchyard.dead_letter.fingerprint",
                                letter.fingerprint.clone(),
                            ),
                        ],
                    );
                    telemetry::set_error(cx, &clip(&f.message, MAX_ATTEMPT_ERROR));
                }
                let copy = ctx.broker_dead_letters.then(|| letter.broker_copy());
                plan.letters.push(letter);
                plan.spans.extend(p.span);
                plan.settlements.push(Planned {
                    settlement: Settlement {
                        delivery: p.delivery,
                        outcome: Outcome::DeadLettered { copy },
                    },
                    dead: true,
                    metric: Metric::DeadLettered {
                        attrs,
                        kind: f.kind,
                    },
                });
            }
            Verdict::Handled(_) => {}
        }
    }
    plan
}

/// Makes a processed batch durable in the right order. Returns whether
/// everything was applied; deliveries that were not are given back.
async fn commit(
    ctx: &RouteContext,
    plugin: &LoadedPlugin,
    state: &mut RouteState,
    subscription: &mut dyn Subscription,
    processed: Vec<Processed>,
    unhandled: &mut Vec<Delivery>,
) -> bool {
    let Plan {
        letters,
        settlements,
        replays_handled,
        spans,
    } = plan(ctx, plugin, processed);
    let mut ok = true;
    let mut to_settle = Vec::with_capacity(settlements.len());
    let mut metrics = Vec::with_capacity(settlements.len());
    let mut written: Vec<(String, String)> = Vec::new();
    let letters_written = if letters.is_empty() {
        true
    } else {
        let message_ids: Vec<String> = letters.iter().map(|l| l.message.id.clone()).collect();
        match ctx.dead_letters.record(letters).await {
            Ok(record_ids) => {
                written = message_ids.into_iter().zip(record_ids).collect();
                true
            }
            Err(e) => {
                tracing::error!(
                    plugin = %plugin.name(),
                    error = %format!("{e:#}"),
                    "Cannot write dead letters; those messages stay queued and will be handled again"
                );
                ok = false;
                false
            }
        }
    };
    for p in settlements {
        if p.dead && !letters_written {
            unhandled.push(p.settlement.delivery);
        } else {
            to_settle.push(p.settlement);
            metrics.push(p.metric);
        }
    }
    // Messages handled now that were dead-lettered before a failed settle.
    let recovered: Vec<String> = to_settle
        .iter()
        .filter(|s| matches!(s.outcome, Outcome::Handled { .. }))
        .filter_map(|s| {
            state
                .dead_but_unsettled
                .get(&s.delivery.envelope.id)
                .cloned()
        })
        .collect();
    let receipts: Vec<u64> = to_settle.iter().map(|s| s.delivery.receipt).collect();
    let refused = match subscription.settle(to_settle).await {
        Ok(refused) => refused,
        Err(e) => {
            tracing::error!(
                plugin = %plugin.name(),
                error = %format!("{e:#}"),
                "Cannot settle a batch; its messages stay queued and will be handled again"
            );
            state.dead_but_unsettled.extend(written);
            // Their outputs were never stored: the spans say so.
            for cx in &spans {
                telemetry::set_error(
                    cx,
                    "the batch could not be settled; it will be handled again",
                );
            }
            return false;
        }
    };
    let metrics: Vec<Metric> = receipts
        .into_iter()
        .zip(metrics)
        .filter(|(receipt, _)| {
            !refused
                .iter()
                .any(|r| r.settlement.delivery.receipt == *receipt)
        })
        .map(|(_, m)| m)
        .collect();
    let recovered: Vec<String> = if refused.is_empty() {
        recovered
    } else {
        recovered
            .into_iter()
            .filter(|record| {
                !refused.iter().any(|r| {
                    state
                        .dead_but_unsettled
                        .get(&r.settlement.delivery.envelope.id)
                        == Some(record)
                })
            })
            .collect()
    };
    if !refused.is_empty()
        && !dead_letter_refused(ctx, plugin, state, subscription, refused, unhandled).await
    {
        ok = false;
    }
    Metric::apply_all(metrics, &ctx.telemetry.metrics);
    if !written.is_empty() {
        record_store_size(ctx).await;
    }
    for (message_id, _) in &written {
        state.dead_but_unsettled.remove(message_id);
    }
    state.handled_replays.extend(replays_handled);
    state.handled_replays.extend(recovered);
    if !state.handled_replays.is_empty() {
        match ctx.dead_letters.mark_handled(&state.handled_replays).await {
            Ok(_) => {
                state
                    .dead_but_unsettled
                    .retain(|_, record| !state.handled_replays.contains(record));
                state.handled_replays.clear();
                record_store_size(ctx).await;
            }
            Err(e) => tracing::warn!(
                plugin = %plugin.name(),
                error = %format!("{e:#}"),
                pending = state.handled_replays.len(),
                "Handled messages' dead letters could not be marked handled yet; trying again after the next batch"
            ),
        }
    }
    ok
}

/// Dead-letters the settlements the broker refused for good, then settles
/// them as dead letters. Returns whether that worked; what did not is given
/// back, to be handled again (and refused again) later.
async fn dead_letter_refused(
    ctx: &RouteContext,
    plugin: &LoadedPlugin,
    state: &mut RouteState,
    subscription: &mut dyn Subscription,
    refused: Vec<Refused>,
    unhandled: &mut Vec<Delivery>,
) -> bool {
    let mut letters = Vec::with_capacity(refused.len());
    let mut settlements = Vec::with_capacity(refused.len());
    let label = format!("{}@{}", plugin.name(), plugin.info().version);
    for Refused { settlement, reason } in refused {
        // A refused retry's message carries the attempt that failed.
        let mut message = match settlement.outcome {
            Outcome::Retry { message, .. } => message,
            _ => settlement.delivery.envelope.clone(),
        };
        let failure = Failure {
            kind: FailureKind::Undeliverable,
            message: reason,
            code: None,
            details: Vec::new(),
            backtrace: None,
            output: None,
        };
        message.history.push(Attempt {
            number: message.attempt,
            started_at_ms: now_ms(),
            duration_us: 0,
            error_kind: failure.kind.as_str().into(),
            error: clip(&failure.message, MAX_ATTEMPT_ERROR),
            plugin: label.clone(),
            then: Decision::DeadLetter.as_str().into(),
            trace_id: None,
            span_id: None,
        });
        let letter = dead_letter(
            ctx,
            plugin,
            &message,
            settlement.delivery.origin.as_ref(),
            &failure,
            None,
        );
        tracing::warn!(
            plugin = %plugin.name(),
            message.r#type = %message.message_type,
            message.id = %message.id,
            error.kind = %failure.kind,
            error = %failure.message,
            fingerprint = %letter.fingerprint,
            "Outcome refused by the broker; dead-lettered"
        );
        letters.push(letter);
        settlements.push(Settlement {
            delivery: settlement.delivery,
            outcome: Outcome::DeadLettered { copy: None },
        });
    }
    let types: Vec<String> = settlements
        .iter()
        .map(|s| s.delivery.envelope.message_type.clone())
        .collect();
    let message_ids: Vec<String> = letters.iter().map(|l| l.message.id.clone()).collect();
    let written = match ctx.dead_letters.record(letters).await {
        Ok(record_ids) => message_ids.into_iter().zip(record_ids),
        Err(e) => {
            tracing::error!(
                plugin = %plugin.name(),
                error = %format!("{e:#}"),
                "Cannot write dead letters; those messages stay queued and will be handled again"
            );
            unhandled.extend(settlements.into_iter().map(|s| s.delivery));
            return false;
        }
    };
    match subscription.settle(settlements).await {
        Ok(again) => {
            let ok = again.is_empty();
            unhandled.extend(again.into_iter().map(|r| r.settlement.delivery));
            let metrics = &ctx.telemetry.metrics;
            for t in types {
                metrics.dead_lettered.add(
                    1,
                    &[
                        KeyValue::new("plugin", plugin.name().to_string()),
                        KeyValue::new("plugin.version", plugin.info().version.clone()),
                        KeyValue::new("message.type", t),
                        KeyValue::new("error.type", FailureKind::Undeliverable.as_str()),
                    ],
                );
            }
            record_store_size(ctx).await;
            ok
        }
        Err(e) => {
            tracing::error!(
                plugin = %plugin.name(),
                error = %format!("{e:#}"),
                "Cannot settle dead-lettered messages; they stay queued and will be handled again"
            );
            // If one is handled when it comes again, its record is closed.
            state.dead_but_unsettled.extend(written);
            false
        }
    }
}

/// Updates the dead-letter store size gauge.
pub async fn record_store_size(ctx: &RouteContext) {
    if let Ok(counts) = ctx.dead_letters.counts().await {
        for status in Status::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| *s == status)
                .map_or(0, |(_, n)| *n);
            ctx.telemetry
                .metrics
                .dead_letters
                .record(n, &[KeyValue::new("status", status.as_str())]);
        }
    }
}

/// Consumes one route until `shutdown` turns true. The message in hand when
/// shutdown arrives is finished; the rest of its batch is given back
/// unhandled, so shutdown waits for at most one message's deadline (times
/// its immediate retries).
pub async fn run_route(
    mut ctx: RouteContext,
    mut control: RouteControl,
    mut subscription: Box<dyn Subscription>,
    batch_size: usize,
    mut shutdown: watch::Receiver<bool>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let first = control.versions.borrow_and_update().clone();
    let mut plugin = first.plugin.clone();
    ctx.policy = first.policy.clone();
    let mut worker = Some(
        Worker::new(plugin.clone(), ctx.policy.clone())
            .with_telemetry(ctx.telemetry.clone())
            .with_schemas(ctx.schemas.clone())
            .with_max_message_size(ctx.max_message_size)
            .with_instance(first.take_instance()),
    );
    drop(first);
    let in_flight_attrs = [KeyValue::new("plugin", plugin.name().to_string())];
    let mut backoff = Backoff::default();
    let mut state = RouteState::default();
    // The next batch, taken in while the plugin handled the one before.
    let mut ready: Vec<Delivery> = Vec::new();
    // A guard that cannot keep its record is a net missing, not a reason
    // to stop the route.
    let crashes = ctx
        .crash_guard
        .as_ref()
        .and_then(|g| match g.route(plugin.name().as_str()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(plugin = %plugin.name(), error = %format!("{e:#}"), "The crash-loop guard cannot record this route's messages; running without it");
                None
            }
        });
    loop {
        if *shutdown.borrow() {
            if !ready.is_empty() {
                subscription.release(ready).await?;
            }
            return Ok(());
        }
        let batch = if ready.is_empty() {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                batch = subscription.receive(batch_size) => batch,
            }
        } else {
            Ok(std::mem::take(&mut ready))
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(plugin = %plugin.name(), error = %format!("{e:#}"), "Cannot receive; retrying");
                backoff.wait(&mut shutdown).await;
                continue;
            }
        };
        if control.topology.has_changed().unwrap_or(false) {
            ctx.topology = control.topology.borrow_and_update().clone();
        }
        let mut batch = batch;
        for d in &mut batch {
            admit(&ctx, plugin.name().as_str(), d);
        }
        // Messages that crashed the host before: dead-lettered if they did
        // so too often, otherwise handled alone.
        let mut doomed = Vec::new();
        if let Some(g) = crashes.as_ref().filter(|g| g.any_suspects()) {
            let (keep, later, gone) = isolate_suspects(g, batch);
            batch = keep;
            doomed = gone
                .into_iter()
                .map(|(d, n)| crash_looped(&plugin, d, n, g.limit()))
                .collect();
            if !later.is_empty() {
                ready = later.into_iter().chain(ready).collect();
            }
        }
        // A new version is taken here, between batches: the batch before
        // ran on the old one, this one runs on the new one, and the
        // subscription never notices.
        if control.versions.has_changed().unwrap_or(false) {
            let started = Instant::now();
            let next = control.versions.borrow_and_update().clone();
            let fresh = Worker::new(next.plugin.clone(), next.policy.clone())
                .with_telemetry(ctx.telemetry.clone())
                .with_schemas(ctx.schemas.clone())
                .with_max_message_size(ctx.max_message_size)
                .with_instance(next.take_instance());
            let old = worker.replace(fresh);
            plugin = next.plugin.clone();
            ctx.policy = next.policy.clone();
            let took = started.elapsed();
            control.status.swapped(next, took);
            ctx.telemetry
                .metrics
                .swap_duration
                .record(took.as_secs_f64(), &[in_flight_attrs[0].clone()]);
            tracing::info!(
                plugin = %plugin.name(),
                version = %plugin.info().version,
                digest = %crate::runtime::short_digest(plugin.digest()),
                took = ?took,
                "Plugin version swapped"
            );
            // The old instance's memory is released off this task.
            if let Some(old) = old {
                tokio::task::spawn_blocking(move || drop(old));
            }
        }
        let Some(mut w) = worker.take() else {
            anyhow::bail!("route {} lost its worker", plugin.name());
        };
        let received = i64::try_from(batch.len()).unwrap_or(i64::MAX);
        ctx.telemetry
            .metrics
            .in_flight
            .add(received, &in_flight_attrs);
        // While any route holds a suspect, that route runs alone.
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
        let stop_flag = stop.clone();
        let handling = tokio::task::spawn_blocking(move || {
            let outcome = w.handle_batch(batch, &stop_flag);
            (w, outcome)
        });
        // Meanwhile, on this thread: what the transport already holds
        // (unless the route is stopping, when it would only go back).
        if !stop.load(Ordering::Relaxed) && !*shutdown.borrow() {
            let room = batch_size.saturating_sub(ready.len());
            if room > 0 {
                ready.extend(subscription.take_ready(room));
            }
        }
        let joined = handling.await;
        let Ok((w, outcome)) = joined else {
            ctx.telemetry
                .metrics
                .in_flight
                .add(-received, &in_flight_attrs);
            if !ready.is_empty() {
                subscription.release(ready).await?;
            }
            anyhow::bail!("route {} worker panicked", plugin.name());
        };
        worker = Some(w);
        let BatchOutcome {
            mut processed,
            mut unhandled,
            route_error,
        } = outcome;
        processed.append(&mut doomed);
        let suspects_settled: Vec<String> = match &crashes {
            Some(g) if g.any_suspects() => processed
                .iter()
                .map(|p| p.delivery.envelope.id.clone())
                .collect(),
            _ => Vec::new(),
        };
        let committed = commit(
            &ctx,
            &plugin,
            &mut state,
            subscription.as_mut(),
            processed,
            &mut unhandled,
        )
        .await;
        ctx.telemetry
            .metrics
            .in_flight
            .add(-received, &in_flight_attrs);
        // What was taken ahead must not overtake what goes back: both are
        // given back together, to be received again in order.
        if !unhandled.is_empty() || !committed {
            unhandled.append(&mut ready);
        }
        if let Some(g) = &crashes {
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
            subscription.release(unhandled).await?;
        }
        if let Some(e) = route_error.as_ref() {
            if ctx.fail_when_plugin_cannot_start {
                anyhow::bail!(
                    "plugin {} cannot start, so its messages stay queued: {e:#}",
                    plugin.name()
                );
            }
            tracing::error!(
                plugin = %plugin.name(),
                error = %format!("{e:#}"),
                "Plugin cannot start; its messages stay queued and the route retries"
            );
        }
        if committed && route_error.is_none() {
            backoff.reset();
        } else {
            backoff.wait(&mut shutdown).await;
        }
    }
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
    delivery.envelope.history.push(Attempt {
        number: delivery.envelope.attempt,
        started_at_ms: now_ms(),
        duration_us: 0,
        error_kind: failure.kind.as_str().into(),
        error: failure.message.clone(),
        plugin: format!("{}@{}", plugin.name(), plugin.info().version),
        then: Decision::DeadLetter.as_str().into(),
        trace_id: None,
        span_id: None,
    });
    Processed {
        delivery,
        verdict: Verdict::DeadLetter(failure),
        took: Duration::ZERO,
        span: None,
    }
}

/// How a route learns of changes made while it runs.
pub struct RouteControl {
    /// The version the route should run; it takes a new one between
    /// batches.
    pub versions: watch::Receiver<Arc<crate::reload::Version>>,
    /// Who receives which message type.
    pub topology: watch::Receiver<Arc<Topology>>,
    /// Where the route reports what it runs.
    pub status: Arc<crate::reload::RouteStatus>,
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
