//! From verdicts to durable steps: what each processed message means for
//! the dead-letter store, the broker, the logs, its span and the metrics.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{SpanKind, TraceContextExt as _};
use opentelemetry::{Context, KeyValue};

use super::worker::{MessageAttrs, TypeAttr, and, outcome_of, type_label};
use super::{MAX_ATTEMPT_ERROR, Processed, RouteContext, Verdict};
use crate::dlq::{DeadLetter, ErrorInfo, Source, Status};
use crate::envelope::{Envelope, Kind, REPLAY_TRACE_HEADER, new_id, now_ms};
use crate::journal;
use crate::plugin::{Failure, FailureKind, LoadedPlugin, Output};
use crate::recover;
use crate::telemetry::{self, Telemetry};
use crate::text::clip;
use crate::transport::{Delivery, Outcome, Settlement};

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

/// What a journal record keeps of the error a handling ended with.
fn brief(f: &Failure) -> journal::ErrorBrief {
    journal::ErrorBrief {
        kind: f.kind.as_str().to_owned(),
        code: f.code.clone(),
        message: clip(&f.message, journal::MAX_ERROR),
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
pub(super) struct Plan {
    pub(super) letters: Vec<DeadLetter>,
    pub(super) settlements: Vec<Planned>,
    pub(super) replays_handled: Vec<String>,
    pub(super) spans: Vec<Context>,
    /// Handled messages of saga instances whose earlier step in this batch
    /// was dead-lettered here after all: they read a version that will not
    /// be committed, so they go back to run again on the instance as it is.
    pub(super) give_back: Vec<Delivery>,
}

/// One settlement, whether it is a dead letter, and the metric it moves
/// once it is durable.
pub(super) struct Planned {
    pub(super) settlement: Settlement,
    pub(super) dead: bool,
    pub(super) metric: Metric,
}

/// What a saga step did, for the saga metrics.
#[derive(Clone, Copy, Debug)]
pub(super) struct SagaMarks {
    /// It started its instance.
    pub(super) started: bool,
    /// It completed its instance.
    pub(super) completed: bool,
    /// Its message was a timeout of the instance firing.
    pub(super) timed_out: bool,
}

/// A metric update applied only after its settlement succeeded, so a batch
/// handled again after a store error is not counted twice.
pub(super) enum Metric {
    Handled {
        attrs: MessageAttrs,
        age_s: f64,
        /// The saga step made.
        saga: Option<SagaMarks>,
    },
    RetriedLater {
        attrs: MessageAttrs,
    },
    DeadLettered {
        attrs: MessageAttrs,
        kind: FailureKind,
    },
    /// A redelivery of a done message: nothing to count as handled.
    Redelivered,
    /// A saga's message whose instance was not there, ignored.
    SagaNotFound {
        attrs: MessageAttrs,
    },
}

impl Metric {
    /// Whether the update started or completed a saga instance.
    pub(super) fn moves_saga_count(&self) -> bool {
        matches!(self, Metric::Handled { saga: Some(m), .. } if m.started || m.completed)
    }

    /// Applies a settled batch's updates. Consecutive messages handled with
    /// the same attributes are counted in one step: each step looks its
    /// attributes up in the instrument, which costs more than the count.
    pub(super) fn apply_all(updates: Vec<Metric>, metrics: &crate::telemetry::Metrics) {
        let mut handled: Option<(MessageAttrs, u64)> = None;
        for update in updates {
            match update {
                Metric::Handled { attrs, age_s, saga } => {
                    metrics.latency.record(age_s, &attrs);
                    if let Some(marks) = saga {
                        let plugin = [attrs[0].clone()];
                        if marks.started {
                            metrics.saga_started.add(1, &plugin);
                        }
                        if marks.completed {
                            metrics.saga_completed.add(1, &plugin);
                        }
                        if marks.timed_out {
                            metrics.saga_timed_out.add(1, &plugin);
                        }
                    }
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
                Metric::Redelivered => {}
                Metric::SagaNotFound { attrs } => {
                    metrics.saga_not_found.add(1, &[attrs[0].clone()]);
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

/// Turns a processed batch into durable steps, each verdict into its
/// settlement, dead letter, log line, span events and metric.
pub(super) fn plan(ctx: &RouteContext, plugin: &LoadedPlugin, processed: Vec<Processed>) -> Plan {
    let mut planner = Planner::new(ctx, plugin);
    for p in processed {
        planner.add(p);
    }
    planner.plan
}

/// What planning a batch keeps from one message to the next.
struct Planner<'a> {
    ctx: &'a RouteContext,
    plugin: &'a LoadedPlugin,
    /// `plugin` and `plugin.version`, shared by every message of the
    /// batch: cloned, not copied.
    plugin_kv: KeyValue,
    version_kv: KeyValue,
    type_attr: TypeAttr,
    plan: Plan,
    /// Saga instances a step of which was dead-lettered in planning.
    dropped_instances: std::collections::HashSet<String>,
    /// The span attributes the plugin set for the message being planned.
    attributes: Vec<(String, String)>,
}

/// The trace and span ids of a message's span, for its log lines: none
/// when tracing is off, and the lines then carry no trace fields at all.
fn log_ids(span: Option<&Context>) -> (Option<String>, Option<String>) {
    span.and_then(telemetry::ids).unzip()
}

impl<'a> Planner<'a> {
    fn new(ctx: &'a RouteContext, plugin: &'a LoadedPlugin) -> Self {
        let shared = |v: &str| opentelemetry::Value::String(Arc::<str>::from(v).into());
        Planner {
            ctx,
            plugin,
            plugin_kv: KeyValue::new("plugin", shared(plugin.name().as_str())),
            version_kv: KeyValue::new("plugin.version", shared(&plugin.info().version)),
            type_attr: TypeAttr::default(),
            plan: Plan {
                letters: Vec::new(),
                settlements: Vec::new(),
                replays_handled: Vec::new(),
                spans: Vec::new(),
                give_back: Vec::new(),
            },
            dropped_instances: std::collections::HashSet::new(),
            attributes: Vec::new(),
        }
    }

    /// The journal record of a handling, when the route keeps a journal.
    fn record(
        &self,
        e: &Envelope,
        outcome: journal::Outcome,
        took: Duration,
        span: Option<&Context>,
    ) -> Option<journal::Record> {
        let sink = self.ctx.journal.as_ref()?;
        let mut r = journal::Record::of(
            e,
            self.plugin,
            outcome,
            took,
            &self.ctx.host,
            sink.payloads(),
        );
        r.replay_of = DeadLetter::replay_of(e).map(str::to_owned);
        r.trace_id = span.and_then(telemetry::ids).map(|(t, _)| t);
        r.attributes.clone_from(&self.attributes);
        Some(r)
    }

    fn add(&mut self, mut p: Processed) {
        self.attributes = std::mem::take(&mut p.attributes);
        let attrs = [
            self.plugin_kv.clone(),
            self.version_kv.clone(),
            self.type_attr.of(type_label(&p.delivery)),
        ];
        match p.verdict {
            Verdict::Handled(outputs) => self.handled(p.delivery, outputs, p.took, p.span, attrs),
            Verdict::RetryLater(delay, f) => {
                self.retry_later(p.delivery, delay, f, p.took, p.span, attrs)
            }
            Verdict::DeadLetter(f) => self.dead_letter(p.delivery, f, p.took, p.span, attrs),
            Verdict::Done(record) => self.done(p.delivery, record, p.took),
            Verdict::NotFound => self.not_found(p.delivery, p.took, p.span, attrs),
        }
    }

    /// A saga's message whose instance is not there, ignored as the
    /// pipeline says: settled with nothing, and counted when settled (a
    /// batch handled again after a conflict does not count it twice).
    fn not_found(
        &mut self,
        delivery: Delivery,
        took: Duration,
        span: Option<Context>,
        attrs: MessageAttrs,
    ) {
        if let Some(replayed) = DeadLetter::replay_of(&delivery.envelope) {
            self.plan.replays_handled.push(replayed.to_owned());
        }
        let journal = self.record(
            &delivery.envelope,
            journal::Outcome::SagaNotFound,
            took,
            span.as_ref(),
        );
        self.plan.spans.extend(span);
        self.plan.settlements.push(Planned {
            settlement: Settlement {
                journal: journal.map(Box::new),
                delivery,
                outcome: Outcome::Handled {
                    outputs: Vec::new(),
                    reply: None,
                    state: crate::state::Changes::default(),
                    saga: None,
                },
            },
            dead: false,
            metric: Metric::SagaNotFound { attrs },
        });
    }

    /// A redelivery of a message an exactly-once plugin handled: settled
    /// with the outputs recorded then, unhandled and uncounted.
    fn done(&mut self, delivery: Delivery, record: crate::state::Done, took: Duration) {
        let e = &delivery.envelope;
        let journal = self
            .record(e, journal::Outcome::Duplicate, took, None)
            .map(|r| {
                let mut r = r.with_sent(&record.outputs);
                r.replied = record.reply.is_some();
                r
            });
        if let Some(replayed) = DeadLetter::replay_of(e) {
            self.plan.replays_handled.push(replayed.to_owned());
        }
        tracing::info!(
            plugin = %self.plugin.name(),
            message.r#type = %e.message_type,
            message.id = %e.id,
            emitted = %summarize(&record.outputs, record.reply.is_some()),
            "Handled before (exactly once); sending what it emitted again"
        );
        self.plan.settlements.push(Planned {
            settlement: Settlement {
                journal: journal.map(Box::new),
                delivery,
                outcome: Outcome::Handled {
                    outputs: record.outputs,
                    reply: record.reply,
                    state: crate::state::Changes::default(),
                    saga: None,
                },
            },
            dead: false,
            metric: Metric::Redelivered,
        });
    }

    /// A handled message: its outputs (each with a `send` span) and reply
    /// are settled with it. One that sent a command nobody handles is
    /// dead-lettered instead: a command must not vanish.
    fn handled(
        &mut self,
        delivery: Delivery,
        outputs: Vec<Output>,
        took: Duration,
        span: Option<Context>,
        attrs: MessageAttrs,
    ) {
        let name = self.plugin.name().as_str();
        let e = &delivery.envelope;
        let Outcome::Handled {
            mut outputs,
            reply,
            state,
            saga,
        } = outcome_of(e, outputs)
        else {
            return;
        };
        if let Some(step) = &saga
            && self.dropped_instances.contains(&step.instance)
        {
            self.plan.spans.extend(span);
            self.plan.give_back.push(delivery);
            return;
        }
        // Validation makes this impossible for declared outputs.
        let lost = outputs.iter().find(|o| {
            o.kind == Kind::Command && self.ctx.topology.destinations(&o.message_type).is_empty()
        });
        if let Some(lost) = lost {
            let failure = Failure {
                kind: FailureKind::ContractViolation,
                message: format!(
                    "plugin {name} sent command {}, which no plugin in this pipeline handles",
                    lost.message_type
                ),
                code: None,
                details: Vec::new(),
                backtrace: None,
                output: None,
            };
            if let Some(step) = saga {
                self.dropped_instances.insert(step.instance);
            }
            // The try that sent it is the one that failed.
            let mut delivery = delivery;
            let attempt = super::worker::final_attempt(
                self.plugin,
                delivery.envelope.attempt,
                &failure,
                span.as_ref().and_then(telemetry::ids),
            );
            delivery.envelope.history.push(attempt);
            return self.dead_letter(delivery, failure, took, span, attrs);
        }
        if let Some(cx) = &span {
            for o in &mut outputs {
                self.plan
                    .spans
                    .extend(send_span(&self.ctx.telemetry, cx, o));
            }
        }
        let (trace_id, span_id) = log_ids(span.as_ref());
        tracing::info!(
            plugin = %name,
            message.r#type = %e.message_type,
            message.id = %e.id,
            attempt = e.attempt,
            took = ?took,
            emitted = %summarize(&outputs, reply.is_some()),
            trace_id = trace_id.as_deref().map(tracing::field::display),
            span_id = span_id.as_deref().map(tracing::field::display),
            "Handled"
        );
        let age_ms = now_ms().saturating_sub(e.created_at_ms);
        if let Some(record) = DeadLetter::replay_of(e) {
            self.plan.replays_handled.push(record.to_owned());
        }
        let journal = self
            .record(e, journal::Outcome::Handled, took, span.as_ref())
            .map(|r| {
                let mut r = r.with_sent(&outputs);
                r.replied = reply.is_some();
                r.saga_instance = saga.as_ref().map(|s| s.instance.clone());
                r
            });
        let saga_marks = saga.as_ref().map(|s| SagaMarks {
            started: s.read_version == 0,
            completed: s.completed,
            timed_out: s.fired.is_some(),
        });
        self.plan.spans.extend(span);
        self.plan.settlements.push(Planned {
            settlement: Settlement {
                journal: journal.map(Box::new),
                delivery,
                outcome: Outcome::Handled {
                    outputs,
                    reply,
                    state,
                    saga,
                },
            },
            dead: false,
            metric: Metric::Handled {
                attrs,
                age_s: age_ms as f64 / 1000.0,
                saga: saga_marks,
            },
        });
    }

    /// A message to be tried again after `delay`: scheduled with the
    /// settlement of its delivery.
    fn retry_later(
        &mut self,
        delivery: Delivery,
        delay: Duration,
        f: Failure,
        took: Duration,
        span: Option<Context>,
        attrs: MessageAttrs,
    ) {
        let e = &delivery.envelope;
        let (trace_id, span_id) = log_ids(span.as_ref());
        tracing::warn!(
            plugin = %self.plugin.name(),
            message.r#type = %e.message_type,
            message.id = %e.id,
            attempt = e.attempt.saturating_sub(1),
            error.kind = %f.kind,
            error = %f.message,
            retry_in = ?delay,
            trace_id = trace_id.as_deref().map(tracing::field::display),
            span_id = span_id.as_deref().map(tracing::field::display),
            "Attempt failed; retry scheduled"
        );
        let mut message = e.clone();
        if let Some(cx) = &span {
            cx.span().add_event(
                "retry scheduled",
                vec![KeyValue::new(
                    "switchyard.retry_in_ms",
                    i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
                )],
            );
            telemetry::set_error(cx, &clip(&f.message, MAX_ATTEMPT_ERROR));
            // A replay's first attempt opened a new trace: its retries
            // continue that trace, not the original one.
            if message
                .headers
                .iter()
                .any(|(n, _)| n == REPLAY_TRACE_HEADER)
            {
                message.headers.retain(|(n, _)| n != REPLAY_TRACE_HEADER);
                self.ctx.telemetry.inject(cx, &mut message.headers);
            }
        }
        let not_before_ms =
            now_ms().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        let journal = self
            .record(e, journal::Outcome::RetriedLater, took, span.as_ref())
            .map(|mut r| {
                r.retry_at_ms = Some(not_before_ms);
                r.error = Some(brief(&f));
                r
            });
        self.plan.spans.extend(span);
        self.plan.settlements.push(Planned {
            settlement: Settlement {
                journal: journal.map(Box::new),
                delivery,
                outcome: Outcome::Retry {
                    message,
                    not_before_ms,
                },
            },
            dead: false,
            metric: Metric::RetriedLater { attrs },
        });
    }

    /// The fault of a command a saga sent that failed for good, when that
    /// saga handles the command's faults.
    fn fault_for(&self, e: &Envelope, f: &Failure, record: &str) -> Option<Envelope> {
        if e.kind != Kind::Command {
            return None;
        }
        let (saga, instance) = crate::saga::sender(e)?;
        let fault_type = crate::saga::fault_type(&e.message_type);
        if !self
            .ctx
            .topology
            .destinations(&fault_type)
            .iter()
            .any(|r| r == saga)
        {
            return None;
        }
        tracing::info!(
            plugin = %self.plugin.name(),
            message.id = %e.id,
            saga,
            saga.instance = instance,
            "The command's fault goes back to the saga that sent it"
        );
        Some(crate::saga::fault(
            e,
            saga,
            instance,
            &crate::saga::FaultInfo {
                plugin: self.plugin.name().as_str(),
                kind: f.kind.as_str(),
                code: f.code.as_deref(),
                message: &f.message,
                dead_letter: record,
            },
            self.ctx.max_message_size,
        ))
    }

    /// A message that failed for good: its dead letter is written before
    /// its delivery is settled (with a broker copy, if the pipeline asks).
    fn dead_letter(
        &mut self,
        delivery: Delivery,
        f: Failure,
        took: Duration,
        span: Option<Context>,
        attrs: MessageAttrs,
    ) {
        let e = &delivery.envelope;
        let letter = dead_letter(
            self.ctx,
            self.plugin,
            e,
            delivery.origin.as_ref(),
            &f,
            span.as_ref(),
        );
        let name = self.plugin.name();
        let (trace_id, span_id) = log_ids(span.as_ref());
        tracing::warn!(
            plugin = %name,
            message.r#type = %e.message_type,
            message.id = %e.id,
            attempts = letter.attempts.len(),
            error.kind = %f.kind,
            error = %f.message,
            fingerprint = %letter.fingerprint,
            trace_id = trace_id.as_deref().map(tracing::field::display),
            span_id = span_id.as_deref().map(tracing::field::display),
            "Dead-lettered"
        );
        if let Some(bt) = &f.backtrace {
            tracing::debug!(plugin = %name, message.id = %e.id, "wasm backtrace:\n{bt}");
        }
        if let Some(cx) = &span {
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
        let copy = self.ctx.broker_dead_letters.then(|| letter.broker_copy());
        let fault = self.fault_for(e, &f, &letter.id);
        // A failed step of a saga names its instance and the version it
        // read (a message that found no instance names no version).
        let detail = |name: &str| {
            f.details
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let saga_failed = match (
            &self.ctx.saga,
            detail("saga.instance"),
            detail("saga.version"),
        ) {
            (Some(_), Some(id), Some(v)) => v.parse().ok().map(|v| (id.to_owned(), v)),
            _ => None,
        };
        let journal = self
            .record(e, journal::Outcome::DeadLettered, took, span.as_ref())
            .map(|mut r| {
                // The store may add to an earlier record of the message:
                // `commit` puts in the id it returns.
                r.dead_letter = Some(letter.id.clone());
                r.error = Some(brief(&f));
                r
            });
        self.plan.letters.push(letter);
        self.plan.spans.extend(span);
        self.plan.settlements.push(Planned {
            settlement: Settlement {
                journal: journal.map(Box::new),
                delivery,
                outcome: Outcome::DeadLettered {
                    copy,
                    fault,
                    saga_failed,
                },
            },
            dead: true,
            metric: Metric::DeadLettered {
                attrs,
                kind: f.kind,
            },
        });
    }
}
