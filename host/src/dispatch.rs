//! The per-route loop: receive a batch, run each message through the plugin,
//! turn what it emitted into envelopes, settle the batch.
//!
//! The plugin runs on a blocking thread (wasm calls are synchronous and may
//! take up to their deadline); the loop itself is async and owns the
//! subscription. A failed settle is retried with backoff: its deliveries were
//! not removed and are received again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::watch;

use crate::envelope::{Envelope, Kind, Reply, new_id, now_ms};
use crate::plugin::{Failure, Instance, LoadedPlugin, Output};
use crate::transport::{Delivery, FailureRecord, Outcome, Settlement, Subscription};

/// Longest pause between attempts after store or plugin errors.
const MAX_SETTLE_BACKOFF: Duration = Duration::from_secs(30);

/// Runs a plugin's messages; owns its warm instance.
pub struct Worker {
    plugin: LoadedPlugin,
    instance: Option<Instance>,
}

/// What handling one delivery produced.
#[derive(Debug)]
pub struct Handled {
    pub delivery: Delivery,
    pub result: Result<Vec<Output>, Failure>,
    pub took: Duration,
}

/// What became of a batch: messages handled (to settle), messages not
/// attempted (to give back), and why the batch stopped early.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    pub handled: Vec<Handled>,
    pub unhandled: Vec<Delivery>,
    /// The plugin could not run at all (it failed to instantiate): no
    /// message is at fault, so none is failed.
    pub route_error: Option<anyhow::Error>,
}

/// Bytes of outputs a batch may hold before it is settled early, so a
/// batch of large outputs does not hold `batch_size` times the per-call
/// limit in memory.
const BATCH_OUTPUT_BUDGET: usize = crate::plugin::MAX_OUTPUT_BYTES;

fn output_bytes(outputs: &[Output]) -> usize {
    outputs
        .iter()
        .map(|o| match o {
            Output::Event(o) | Output::Command(o) => o.payload.len(),
            Output::Reply(r) => r.payload.len(),
        })
        .sum()
}

impl Worker {
    pub fn new(plugin: LoadedPlugin) -> Self {
        Worker {
            plugin,
            instance: None,
        }
    }

    pub fn plugin(&self) -> &LoadedPlugin {
        &self.plugin
    }

    /// Handles one message on the warm instance, creating a fresh one first
    /// if the last trapped or is due for recycling. The outer error means the
    /// plugin could not be instantiated: the message was not attempted.
    pub fn handle(&mut self, envelope: &mut Envelope) -> Result<Result<Vec<Output>, Failure>> {
        if self.instance.as_ref().is_some_and(Instance::is_spent) {
            self.instance = None;
        }
        let instance = match &mut self.instance {
            Some(i) => i,
            None => self.instance.insert(self.plugin.instantiate()?),
        };
        let result = instance.handle(envelope);
        if instance.is_spent() {
            // Drop now, not at the next message: a trapped store may hold a
            // lot of memory.
            self.instance = None;
        }
        Ok(result)
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
            match self.handle(&mut delivery.envelope) {
                Ok(result) => {
                    if let Ok(outputs) = &result {
                        bytes += output_bytes(outputs);
                    }
                    out.handled.push(Handled {
                        delivery,
                        result,
                        took: started.elapsed(),
                    });
                }
                Err(e) => {
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
        });
    }
    Outcome::Handled {
        outputs: envelopes,
        reply,
    }
}

fn summarize(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Handled { outputs, reply } => {
            let mut parts: Vec<String> = outputs
                .iter()
                .map(|o| match o.kind {
                    Kind::Event => o.message_type.clone(),
                    Kind::Command => format!("{} (command)", o.message_type),
                })
                .collect();
            if reply.is_some() {
                parts.push("reply".into());
            }
            if parts.is_empty() {
                "nothing".into()
            } else {
                parts.join(", ")
            }
        }
        Outcome::Failed(_) => "nothing".into(),
    }
}

/// Builds the settlements of a handled batch and logs each message.
pub fn settle_batch(plugin: &LoadedPlugin, handled: Vec<Handled>) -> Vec<Settlement> {
    let name = plugin.name().as_str();
    handled
        .into_iter()
        .map(|h| {
            let e = &h.delivery.envelope;
            let outcome = match h.result {
                Ok(outputs) => {
                    let outcome = outcome_of(e, outputs);
                    tracing::info!(
                        plugin = %name,
                        message.r#type = %e.message_type,
                        message.id = %e.id,
                        took = ?h.took,
                        emitted = %summarize(&outcome),
                        "Handled"
                    );
                    outcome
                }
                Err(f) => {
                    tracing::warn!(
                        plugin = %name,
                        message.r#type = %e.message_type,
                        message.id = %e.id,
                        error.kind = %f.kind,
                        error = %f.message,
                        "Message failed; kept in the store's failed table"
                    );
                    if let Some(bt) = &f.backtrace {
                        tracing::debug!(plugin = %name, message.id = %e.id, "wasm backtrace:\n{bt}");
                    }
                    Outcome::Failed(FailureRecord {
                        kind: f.kind.as_str().to_owned(),
                        message: f.message,
                        code: f.code,
                        details: f.details,
                        backtrace: f.backtrace,
                        plugin: format!("{}@{}", plugin.name(), plugin.info().version),
                        plugin_digest: plugin.digest().to_owned(),
                        failed_at_ms: now_ms(),
                    })
                }
            };
            Settlement {
                delivery: h.delivery,
                outcome,
            }
        })
        .collect()
}

/// Consumes one route until `shutdown` turns true. The message in hand when
/// shutdown arrives is finished; the rest of its batch is given back
/// unhandled, so shutdown waits for at most one message's deadline.
pub async fn run_route(
    plugin: LoadedPlugin,
    mut subscription: Box<dyn Subscription>,
    batch_size: usize,
    mut shutdown: watch::Receiver<bool>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let mut worker = Some(Worker::new(plugin.clone()));
    let mut backoff = Backoff::default();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let batch = tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            batch = subscription.receive(batch_size) => batch,
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(plugin = %plugin.name(), error = %format!("{e:#}"), "Cannot receive; retrying");
                backoff.wait(&mut shutdown).await;
                continue;
            }
        };
        let Some(mut w) = worker.take() else {
            anyhow::bail!("route {} lost its worker", plugin.name());
        };
        let stop_flag = stop.clone();
        let (w, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = w.handle_batch(batch, &stop_flag);
            (w, outcome)
        })
        .await
        .map_err(|e| anyhow::anyhow!("route {} worker panicked: {e}", plugin.name()))?;
        worker = Some(w);
        let settlements = settle_batch(&plugin, outcome.handled);
        let settled = match subscription.settle(settlements).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(
                    plugin = %plugin.name(),
                    error = %format!("{e:#}"),
                    "Cannot settle a batch; its messages stay queued and will be handled again"
                );
                false
            }
        };
        if !outcome.unhandled.is_empty() {
            subscription.release(outcome.unhandled).await?;
        }
        if let Some(e) = &outcome.route_error {
            tracing::error!(
                plugin = %plugin.name(),
                error = %format!("{e:#}"),
                "Plugin cannot start; its messages stay queued and the route retries"
            );
        }
        if settled && outcome.route_error.is_none() {
            backoff.reset();
        } else {
            backoff.wait(&mut shutdown).await;
        }
    }
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
        self.next = (self.next * 2).min(MAX_SETTLE_BACKOFF);
    }
}
