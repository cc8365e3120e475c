//! The worker: one plugin's warm instance, running a batch on a blocking
//! thread, each message with the immediate retries its policy allows.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt as _};
use opentelemetry::{Context, KeyValue};

use super::saga::Prep as SagaPrep;
use super::{BATCH_OUTPUT_BUDGET, MAX_ATTEMPT_ERROR};
use crate::dlq::DeadLetter;
use crate::envelope::{Attempt, Envelope, Kind, REPLAY_TRACE_HEADER, Reply, new_id, now_ms};
use crate::plugin::{Failure, FailureKind, Instance, LoadedPlugin, Output};
use crate::recover::{Decision, RetryPolicy, Then};
use crate::telemetry::{self, Telemetry};
use crate::text::clip;
use crate::transport::{Delivery, Outcome};

/// Runs a plugin's messages; owns its warm instance.
pub struct Worker {
    plugin: LoadedPlugin,
    policy: RetryPolicy,
    instance: Option<Instance>,
    /// Where the plugin's calls read their state; `None`: no state store.
    state: Option<Arc<crate::state::Scope>>,
    /// The plugin is a saga: how its messages find their instances.
    saga: Option<Arc<crate::saga::SagaSpec>>,
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
    /// Whether what each message reads is recorded (see
    /// [`Worker::record_reads`]).
    recording: bool,
    /// The span attributes the plugin set while handling the message in
    /// hand, over its attempts.
    attributes: Vec<(String, String)>,
}

/// The `message.type` metric attribute of the last type seen: a run of
/// messages of one type shares one value instead of copying the name for
/// every metric.
#[derive(Default)]
pub(super) struct TypeAttr(Option<KeyValue>);

impl TypeAttr {
    pub(super) fn of(&mut self, message_type: &str) -> KeyValue {
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
    /// Handled before (an exactly-once plugin's record says so): not
    /// handled again; its recorded outputs go out again with their ids.
    Done(crate::state::Done),
    /// A saga's message whose instance is not there (`not_found =
    /// "ignore"`): settled without calling the plugin, and counted once it
    /// is settled.
    NotFound,
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
    /// The span attributes the plugin set while handling it (the last
    /// value of each), for the journal.
    pub attributes: Vec<(String, String)>,
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
    /// What each processed message read, in the order of `processed`,
    /// when the worker records reads (see [`Worker::record_reads`]).
    pub reads: Vec<crate::state::Reads>,
}

/// `name@version`, as attempts name the plugin that made them.
fn plugin_label(plugin: &LoadedPlugin) -> String {
    format!("{}@{}", plugin.name(), plugin.info().version)
}

/// The attempt the host records when it decides a message's fate without
/// its plugin (malformed, refused by the broker, a crash loop): it is
/// dead-lettered.
pub(super) fn final_attempt(
    plugin: &LoadedPlugin,
    number: u32,
    failure: &Failure,
    ids: Option<(String, String)>,
) -> Attempt {
    let (trace_id, span_id) = ids.unzip();
    Attempt {
        number,
        started_at_ms: now_ms(),
        duration_us: 0,
        error_kind: failure.kind.as_str().into(),
        error: clip(&failure.message, MAX_ATTEMPT_ERROR),
        plugin: plugin_label(plugin),
        then: Then::DeadLetter.as_str().into(),
        trace_id,
        span_id,
    }
}

/// When an attempt started: wall-clock for its history, monotonic for its
/// duration.
#[derive(Clone, Copy)]
struct Started {
    at_ms: u64,
    at: Instant,
}

impl Started {
    fn now() -> Self {
        Started {
            at_ms: now_ms(),
            at: Instant::now(),
        }
    }
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
            // Checked against `max_state_value` as it was written.
            Output::State(_) | Output::Saga(_) => return None,
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
            Output::State(c) => c.size(),
            Output::Saga(_) => 0,
        })
        .sum()
}

/// Metric attributes of a message: `plugin`, `plugin.version`,
/// `message.type`.
pub(super) type MessageAttrs = [KeyValue; 3];

/// A message's attributes plus one more.
pub(super) fn and(attrs: &MessageAttrs, extra: KeyValue) -> [KeyValue; 4] {
    let [a, b, c] = attrs.clone();
    [a, b, c, extra]
}

/// The type a delivery is labelled with in metrics and span names: its own,
/// unless it is malformed, when its type could be anything at all.
pub(super) fn type_label(d: &Delivery) -> &str {
    if d.malformed.is_some() {
        crate::limits::MALFORMED_TYPE_LABEL
    } else {
        &d.envelope.message_type
    }
}

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
            state: None,
            saga: None,
            telemetry: Telemetry::off(),
            schemas: Arc::default(),
            max_message_size: crate::limits::DEFAULT_MAX_MESSAGE_SIZE,
            recording: false,
            attributes: Vec::new(),
        }
    }

    /// Fails calls whose outputs have payloads larger than this.
    pub fn with_max_message_size(mut self, bytes: u64) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Starts with an instance made in advance (by a hot swap).
    pub fn with_instance(mut self, instance: Option<Instance>) -> Self {
        if let Some(mut instance) = instance {
            if let Some(scope) = &self.state {
                instance.set_state(scope.clone());
            }
            self.instance = Some(instance);
        }
        self
    }

    /// Gives the plugin's calls its state, read through `reader`.
    pub fn with_state(mut self, reader: Arc<dyn crate::state::Reader>) -> Self {
        self.state = Some(crate::state::Scope::new(
            self.plugin.name().as_str(),
            reader,
        ));
        if let (Some(instance), Some(scope)) = (&mut self.instance, &self.state) {
            instance.set_state(scope.clone());
        }
        self
    }

    /// Runs the plugin as a saga (`None`: as a plain plugin).
    pub fn with_saga(mut self, saga: Option<Arc<crate::saga::SagaSpec>>) -> Self {
        self.saga = saga;
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
            let mut instance = self.plugin.instantiate()?;
            if let Some(scope) = &self.state {
                instance.set_state(scope.clone());
            }
            self.instance = Some(instance);
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
        let attributes = instance.take_attributes();
        if instance.is_spent() {
            // Drop now, not at the next message: a trapped store may hold a
            // lot of memory.
            self.instance = None;
        }
        self.keep_attributes(attributes);
        Ok(result)
    }

    fn plugin_label(&self) -> String {
        plugin_label(&self.plugin)
    }

    /// Adds what an attempt set to the message's attributes: a later
    /// attempt's value of a name replaces an earlier one's.
    fn keep_attributes(&mut self, attributes: Vec<(String, String)>) {
        for (k, v) in attributes {
            if let Some(kept) = self.attributes.iter_mut().find(|(name, _)| *name == k) {
                kept.1 = v;
            } else if self.attributes.len() < crate::plugin::MAX_JOURNAL_ATTRIBUTES {
                self.attributes.push((k, v));
            }
        }
    }

    /// For a saga plugin, what `envelope` runs on (see
    /// [`super::saga::prepare`]).
    fn saga_call(&self, envelope: &Envelope) -> Result<SagaPrep, Failure> {
        match &self.saga {
            None => Ok(SagaPrep::NotSaga),
            Some(spec) => super::saga::prepare(
                spec,
                self.state.as_deref(),
                self.plugin.name().as_str(),
                envelope,
            ),
        }
    }

    /// A saga message whose instance is not there, settled without the
    /// plugin (`not_found = "ignore"`).
    fn skip_not_found(&mut self, envelope: &Envelope, why: &str) {
        tracing::info!(
            plugin = %self.plugin.name(),
            message.r#type = %envelope.message_type,
            message.id = %envelope.id,
            "{why}; the message is ignored (not_found = \"ignore\")"
        );
    }

    /// [`Worker::handle_in`] on saga instance `saga` when there is one:
    /// the call reads and writes that instance's state, and on success
    /// leaves a step as its last output. A failure names the instance.
    fn handle_saga_in(
        &mut self,
        envelope: &mut Envelope,
        saga: Option<crate::plugin::SagaCall>,
        span: Option<&Context>,
        span_budget: &mut u32,
    ) -> Result<Result<Vec<Output>, Failure>> {
        let Some(call) = saga else {
            return self.handle_in(envelope, span, span_budget);
        };
        if let Some(cx) = span {
            cx.span()
                .set_attribute(KeyValue::new("switchyard.saga.instance", call.id.clone()));
        }
        let plugin_version = self.plugin.info().version.clone();
        let instance = self.ensure_instance()?;
        instance.set_saga(Some(call.clone()));
        let result = instance.handle_traced(envelope, span, span_budget);
        let completed = instance.saga_completed();
        let timeouts = instance.take_timeouts();
        let attributes = instance.take_attributes();
        instance.set_saga(None);
        if instance.is_spent() {
            self.instance = None;
        }
        self.keep_attributes(attributes);
        Ok(match result {
            Ok(mut outputs) => {
                // A command the step sends names its saga and instance, so
                // its fault can find the way back.
                for o in &mut outputs {
                    if let Output::Command(c) = o {
                        c.headers.push((
                            crate::saga::SAGA_HEADER.to_owned(),
                            self.plugin.name().to_string(),
                        ));
                        c.headers
                            .push((crate::saga::INSTANCE_HEADER.to_owned(), call.id.clone()));
                    }
                }
                let step = super::saga::step_of(
                    &call,
                    envelope,
                    &outputs,
                    plugin_version,
                    completed,
                    timeouts,
                );
                outputs.push(Output::Saga(step));
                Ok(outputs)
            }
            Err(f) => Err(f),
        })
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
        if let Some(reason) = &delivery.malformed {
            return Ok(self.refuse_malformed(
                format!("the message cannot be decoded: {reason}"),
                delivery,
                span,
            ));
        }
        let envelope = &mut delivery.envelope;
        let delayed_used = envelope.delayed_retries();
        let mut immediate_used = 0;
        let mut span_budget = crate::plugin::MAX_PLUGIN_SPAN_EVENTS;
        loop {
            let started = Started::now();
            let saga = match self.saga_call(envelope) {
                Ok(SagaPrep::NotSaga) => Ok(None),
                Ok(SagaPrep::Run(call)) => Ok(Some(call)),
                Ok(SagaPrep::Skip(why)) => {
                    self.skip_not_found(envelope, &why);
                    return Ok(Verdict::NotFound);
                }
                Ok(SagaPrep::Drop(why)) => {
                    tracing::info!(
                        plugin = %self.plugin.name(),
                        message.id = %envelope.id,
                        "{why}; dropped"
                    );
                    return Ok(Verdict::Handled(Vec::new()));
                }
                Err(failure) => Err(failure),
            };
            let instance = saga
                .as_ref()
                .ok()
                .and_then(|s| s.as_ref().map(|c| (c.id.clone(), c.version)));
            let result = match saga {
                Err(failure) => Err(failure),
                Ok(saga) => self
                    .handle_saga_in(envelope, saga, span, &mut span_budget)?
                    .and_then(|outputs| {
                        check_output_sizes(&self.plugin, outputs, self.max_message_size)
                    })
                    .and_then(|outputs| crate::schemas::check_outputs(&self.schemas, outputs)),
            };
            // A failed saga step's dead letter names its instance and the
            // version the step read.
            let result = result.map_err(|mut f| {
                if let Some((id, version)) = instance {
                    f.details.push(("saga.instance".into(), id));
                    f.details.push(("saga.version".into(), version.to_string()));
                }
                f
            });
            let attrs = self.attrs(&envelope.message_type);
            self.telemetry
                .metrics
                .handler_duration
                .record(started.at.elapsed().as_secs_f64(), &attrs);
            let failure = match result {
                Ok(outputs) => {
                    // The rest of the batch reads what this message wrote.
                    if let Some(scope) = &self.state {
                        for o in outputs.iter().rev().take(2) {
                            match o {
                                Output::State(changes) => scope.handled(changes),
                                Output::Saga(step) => scope.stepped(step),
                                _ => {}
                            }
                        }
                    }
                    return Ok(Verdict::Handled(outputs));
                }
                Err(f) => f,
            };
            let decision = self
                .policy
                .decide(failure.kind, immediate_used, delayed_used);
            self.record_failure(envelope, &failure, decision, &attrs, span, started);
            match decision {
                Decision::RetryNow => {
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

    /// The verdict on a message that never reaches the plugin: one attempt
    /// in its history, dead-lettered as malformed.
    fn refuse_malformed(
        &mut self,
        message: String,
        delivery: &mut Delivery,
        span: Option<&Context>,
    ) -> Verdict {
        let ids = span.and_then(telemetry::ids);
        let failure = Failure::new(FailureKind::Malformed, message);
        let attempt = final_attempt(&self.plugin, delivery.envelope.attempt, &failure, ids);
        delivery.envelope.history.push(attempt);
        let attrs = self.attrs(type_label(delivery));
        self.telemetry.metrics.failed.add(
            1,
            &and(&attrs, KeyValue::new("error.type", failure.kind.as_str())),
        );
        Verdict::DeadLetter(failure)
    }

    /// Records a failed attempt and what comes next: in the message's
    /// history, its span, the metrics and (for an immediate retry) the log.
    fn record_failure(
        &self,
        envelope: &mut Envelope,
        failure: &Failure,
        decision: Decision,
        attrs: &MessageAttrs,
        span: Option<&Context>,
        started: Started,
    ) {
        self.telemetry.metrics.failed.add(
            1,
            &and(attrs, KeyValue::new("error.type", failure.kind.as_str())),
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
        let (trace_id, span_id) = span.and_then(telemetry::ids).unzip();
        envelope.history.push(Attempt {
            number: envelope.attempt,
            started_at_ms: started.at_ms,
            duration_us: u64::try_from(started.at.elapsed().as_micros()).unwrap_or(u64::MAX),
            error_kind: failure.kind.as_str().into(),
            error: clip(&failure.message, MAX_ATTEMPT_ERROR),
            plugin: self.plugin_label(),
            then: decision.as_str().into(),
            trace_id,
            span_id,
        });
        if decision == Decision::RetryNow {
            self.telemetry
                .metrics
                .retried
                .add(1, &and(attrs, KeyValue::new("retry", "now")));
            tracing::info!(
                plugin = %self.plugin.name(),
                message.r#type = %envelope.message_type,
                message.id = %envelope.id,
                attempt = envelope.attempt,
                error.kind = %failure.kind,
                error = %failure.message,
                "Attempt failed; retrying now"
            );
        }
    }

    /// Records what each message of a batch reads from its state (for a
    /// route whose lanes run side by side), in [`BatchOutcome::reads`].
    pub fn record_reads(&mut self, on: bool) {
        self.recording = on && self.state.is_some();
        if let Some(scope) = &self.state {
            scope.record_reads(self.recording);
        }
    }

    /// Handles a batch in order, stopping early (and leaving the rest
    /// unhandled) when `stop` is set, when the batch's outputs reach their
    /// memory budget, or when the plugin cannot be instantiated.
    pub fn handle_batch(&mut self, batch: Vec<Delivery>, stop: &AtomicBool) -> BatchOutcome {
        self.handle_batch_within(batch, stop, BATCH_OUTPUT_BUDGET)
    }

    /// [`Worker::handle_batch`] with a budget of `budget` bytes of outputs.
    pub fn handle_batch_within(
        &mut self,
        batch: Vec<Delivery>,
        stop: &AtomicBool,
        budget: usize,
    ) -> BatchOutcome {
        let mut out = BatchOutcome::default();
        let mut bytes = 0usize;
        if let Some(scope) = &self.state {
            scope.begin_batch();
            if self.recording {
                scope.take_reads();
            }
        }
        let mut rest = batch.into_iter();
        for mut delivery in rest.by_ref() {
            if stop.load(Ordering::Relaxed) || bytes >= budget {
                out.unhandled.push(delivery);
                break;
            }
            let started = Instant::now();
            self.attributes.clear();
            // A failed instantiation leaves the history as it was: nothing
            // was attempted.
            let history_len = delivery.envelope.history.len();
            let attempt = delivery.envelope.attempt;
            match self.process_traced(&mut delivery) {
                Ok((verdict, span)) => {
                    if let Verdict::Handled(outputs) = &verdict {
                        bytes += output_bytes(outputs);
                    }
                    if let Some(scope) = self.state.as_ref().filter(|_| self.recording) {
                        out.reads.push(scope.take_reads());
                    }
                    out.processed.push(Processed {
                        delivery,
                        verdict,
                        took: started.elapsed(),
                        span,
                        attributes: std::mem::take(&mut self.attributes),
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
    let mut state = crate::state::Changes::default();
    let mut saga = None;
    let now = now_ms();
    for output in outputs {
        let (kind, o) = match output {
            Output::Event(o) => (Kind::Event, o),
            Output::Command(o) => (Kind::Command, o),
            Output::State(c) => {
                state = c;
                continue;
            }
            Output::Saga(step) => {
                saga = Some(step);
                continue;
            }
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
    if let Some(step) = &mut saga {
        step.outputs = envelopes
            .iter()
            .map(|e| crate::saga::StepOutput {
                message_type: e.message_type.clone(),
                id: e.id.clone(),
                command: e.kind == Kind::Command,
            })
            .collect();
    }
    Outcome::Handled {
        outputs: envelopes,
        reply,
        state,
        saga,
    }
}
