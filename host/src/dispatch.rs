//! The per-route loop: receive a batch, run each message through the plugin,
//! turn what it emitted into envelopes, settle the batch.
//!
//! The plugin runs on a blocking thread (wasm calls are synchronous and may
//! take up to their deadline); the loop itself is async and owns the
//! subscription. A failed settle is retried with backoff: its deliveries were
//! not removed and are received again.

use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::watch;

use crate::envelope::{Envelope, Kind, Reply, new_id, now_ms};
use crate::plugin::{Failure, Instance, LoadedPlugin, Output};
use crate::transport::{Delivery, FailureRecord, Outcome, Settlement, Subscription};

/// Longest pause between attempts to settle after store errors.
const MAX_SETTLE_BACKOFF: Duration = Duration::from_secs(5);

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
    /// if the last trapped or is due for recycling.
    pub fn handle(&mut self, envelope: &mut Envelope) -> Result<Vec<Output>, Failure> {
        if self.instance.as_ref().is_some_and(Instance::is_spent) {
            self.instance = None;
        }
        let instance = match &mut self.instance {
            Some(i) => i,
            None => match self.plugin.instantiate() {
                Ok(i) => self.instance.insert(i),
                Err(e) => {
                    return Err(Failure {
                        kind: crate::plugin::FailureKind::Trap,
                        message: format!("cannot instantiate plugin: {e:#}"),
                        code: None,
                        details: Vec::new(),
                        backtrace: None,
                    });
                }
            },
        };
        let result = instance.handle(envelope);
        if instance.is_spent() {
            // Drop now, not at the next message: a trapped store may hold a
            // lot of memory.
            self.instance = None;
        }
        result
    }

    /// Handles a batch in order.
    pub fn handle_batch(&mut self, batch: Vec<Delivery>) -> Vec<Handled> {
        batch
            .into_iter()
            .map(|mut delivery| {
                let started = Instant::now();
                let result = self.handle(&mut delivery.envelope);
                Handled {
                    delivery,
                    result,
                    took: started.elapsed(),
                }
            })
            .collect()
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

/// Consumes one route until `shutdown` turns true. The batch in hand when
/// shutdown arrives is finished and settled first.
pub async fn run_route(
    plugin: LoadedPlugin,
    mut subscription: Box<dyn Subscription>,
    batch_size: usize,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut worker = Some(Worker::new(plugin.clone()));
    let mut backoff = Duration::from_millis(50);
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
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_SETTLE_BACKOFF);
                continue;
            }
        };
        let Some(mut w) = worker.take() else {
            anyhow::bail!("route {} lost its worker", plugin.name());
        };
        let (w, handled) = tokio::task::spawn_blocking(move || {
            let handled = w.handle_batch(batch);
            (w, handled)
        })
        .await
        .map_err(|e| anyhow::anyhow!("route {} worker panicked: {e}", plugin.name()))?;
        worker = Some(w);
        let settlements = settle_batch(&plugin, handled);
        match subscription.settle(settlements).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) => {
                tracing::error!(
                    plugin = %plugin.name(),
                    error = %format!("{e:#}"),
                    "Cannot settle a batch; its messages stay queued and will be handled again"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_SETTLE_BACKOFF);
            }
        }
    }
}
