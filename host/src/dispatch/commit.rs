//! Making a processed batch durable, in the order the at-least-once
//! argument needs: the state store's commit (on a broker), then dead
//! letters, then the settlements, then the records of replays that were
//! handled. What a broker refuses for good is
//! dead-lettered on its own.

use opentelemetry::KeyValue;

use super::plan::{Metric, Plan, plan};
use super::worker::final_attempt;
use super::{Processed, RouteContext, RouteState, dead_letter};
use crate::dlq::{DeadLetter, Status};
use crate::plugin::{Failure, FailureKind, LoadedPlugin};
use crate::telemetry;
use crate::transport::{Delivery, Outcome, Refused, Settlement, Subscription};

/// Makes a processed batch durable in the right order. Returns whether
/// everything was applied; deliveries that were not are given back.
pub(super) async fn commit(
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
        give_back,
    } = plan(ctx, plugin, processed);
    unhandled.extend(give_back);
    // Redeliveries of done messages: recorded already.
    let redelivered: std::collections::HashSet<u64> = settlements
        .iter()
        .filter(|p| matches!(p.metric, Metric::Redelivered))
        .map(|p| p.settlement.delivery.receipt)
        .collect();
    // State first: a batch given back (a saga conflict, a store error) must
    // not leave dead letters behind that its next run writes again.
    if let Err(e) = commit_state(
        ctx,
        plugin,
        settlements.iter().map(|p| &p.settlement),
        &redelivered,
    )
    .await
    {
        state_not_committed(ctx, plugin, &e);
        for cx in &spans {
            telemetry::set_error(
                cx,
                "the batch's state could not be committed; it will be handled again",
            );
        }
        unhandled.extend(settlements.into_iter().map(|p| p.settlement.delivery));
        return false;
    }
    // Message id → record id of each dead letter written.
    let written = write_letters(ctx, plugin, letters).await;
    let mut ok = written.is_some();
    let mut to_settle = Vec::with_capacity(settlements.len());
    let mut metrics = Vec::with_capacity(settlements.len());
    for p in settlements {
        if p.dead && written.is_none() {
            unhandled.push(p.settlement.delivery);
        } else {
            to_settle.push(p.settlement);
            metrics.push(p.metric);
        }
    }
    let written = written.unwrap_or_default();
    name_dead_letters(&mut to_settle, &written);
    let records = take_records(ctx, &mut to_settle);
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
    let settled_timeouts = settled_timeouts(ctx, &to_settle);
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
    send_records(ctx, records, &refused);
    let (metrics, recovered) = without_refused(state, &refused, receipts, metrics, recovered);
    if !refused.is_empty()
        && !dead_letter_refused(ctx, plugin, state, subscription, refused, unhandled).await
    {
        ok = false;
    }
    let saga_count_moved = metrics.iter().any(Metric::moves_saga_count);
    Metric::apply_all(metrics, &ctx.telemetry.metrics);
    forget_timeouts(ctx, plugin, settled_timeouts).await;
    if !written.is_empty() {
        record_store_size(ctx).await;
    }
    if saga_count_moved {
        record_saga_count(ctx, plugin.name().as_str()).await;
    }
    for (message_id, _) in &written {
        state.dead_but_unsettled.remove(message_id);
    }
    state.handled_replays.extend(replays_handled);
    state.handled_replays.extend(recovered);
    mark_replays_handled(ctx, plugin, state).await;
    ok
}

/// On a broker, the saga timeouts whose messages this batch settles for
/// good without a step (dropped, or dead-lettered): forgotten once settled,
/// so no host sends them again. (A step deletes its own timeout in its
/// commit; the embedded settle forgets the rest itself.)
fn settled_timeouts(ctx: &RouteContext, settlements: &[Settlement]) -> Vec<String> {
    if ctx.saga.is_none() || ctx.state.as_ref().is_none_or(|a| a.store.is_none()) {
        return Vec::new();
    }
    settlements
        .iter()
        .filter(|s| {
            matches!(
                s.outcome,
                Outcome::Handled { saga: None, .. } | Outcome::DeadLettered { .. }
            )
        })
        .filter_map(|s| crate::saga::fired_timeout(&s.delivery.envelope).map(str::to_owned))
        .collect()
}

async fn forget_timeouts(ctx: &RouteContext, plugin: &LoadedPlugin, ids: Vec<String>) {
    let Some(store) = ctx.state.as_ref().and_then(|a| a.store.as_ref()) else {
        return;
    };
    if ids.is_empty() {
        return;
    }
    if let Err(e) = store.forget_timeouts(plugin.name().as_str(), ids).await {
        tracing::warn!(
            plugin = %plugin.name(),
            error = %format!("{e:#}"),
            "Cannot forget settled saga timeouts; they may be sent again"
        );
    }
}

/// Logs why a batch's state was not committed: a saga conflict (counted; the
/// batch runs again on the instances as they are) or a store error.
fn state_not_committed(ctx: &RouteContext, plugin: &LoadedPlugin, e: &anyhow::Error) {
    if crate::saga::is_conflict(e) {
        tracing::info!(
            plugin = %plugin.name(),
            error = %format!("{e:#}"),
            "Saga conflict; the batch is handled again"
        );
        ctx.telemetry
            .metrics
            .saga_conflicts
            .add(1, &[KeyValue::new("plugin", plugin.name().to_string())]);
    } else {
        tracing::error!(
            plugin = %plugin.name(),
            error = %format!("{e:#}"),
            "Cannot commit the state a batch wrote; its messages go back and will be handled again"
        );
    }
}

/// What the broker refused is neither counted nor a recovery: the metric
/// updates (one per receipt) and recovered records that remain.
fn without_refused(
    state: &RouteState,
    refused: &[Refused],
    receipts: Vec<u64>,
    metrics: Vec<Metric>,
    recovered: Vec<String>,
) -> (Vec<Metric>, Vec<String>) {
    let is_refused = |receipt: u64| {
        refused
            .iter()
            .any(|r| r.settlement.delivery.receipt == receipt)
    };
    let metrics = receipts
        .into_iter()
        .zip(metrics)
        .filter(|(receipt, _)| !is_refused(*receipt))
        .map(|(_, m)| m)
        .collect();
    let recovered = recovered
        .into_iter()
        .filter(|record| {
            !refused.iter().any(|r| {
                state
                    .dead_but_unsettled
                    .get(&r.settlement.delivery.envelope.id)
                    == Some(record)
            })
        })
        .collect();
    (metrics, recovered)
}

/// Puts the ids of the dead-letter records the store wrote (it may have
/// added to an earlier record of the same message) into the journal
/// records of those messages.
fn name_dead_letters(settlements: &mut [Settlement], written: &[(String, String)]) {
    if written.is_empty() {
        return;
    }
    for s in settlements {
        if let Some(r) = s.journal.as_deref_mut()
            && r.dead_letter.is_some()
            && let Some((_, id)) = written.iter().find(|(m, _)| *m == r.message_id)
        {
            r.dead_letter = Some(id.clone());
        }
    }
}

/// The journal records a broker host's writer keeps, taken out of the
/// settlements with the receipt of each (the embedded transport writes
/// them in its settle transaction instead).
fn take_records(
    ctx: &RouteContext,
    settlements: &mut [Settlement],
) -> Vec<(u64, crate::journal::Record)> {
    if !matches!(ctx.journal, Some(crate::journal::Sink::Writer(_))) {
        return Vec::new();
    }
    settlements
        .iter_mut()
        .filter_map(|s| Some((s.delivery.receipt, *s.journal.take()?)))
        .collect()
}

/// Hands the records of what was settled to the journal's writer; the
/// refused were not settled as their records say.
fn send_records(
    ctx: &RouteContext,
    records: Vec<(u64, crate::journal::Record)>,
    refused: &[Refused],
) {
    let Some(crate::journal::Sink::Writer(writer)) = &ctx.journal else {
        return;
    };
    writer.send(
        records
            .into_iter()
            .filter(|(receipt, _)| {
                !refused
                    .iter()
                    .any(|r| r.settlement.delivery.receipt == *receipt)
            })
            .map(|(_, r)| r)
            .collect(),
    );
}

/// Writes a batch's dead letters: the message id and record id of each, or
/// `None` if the store failed (those messages stay queued).
async fn write_letters(
    ctx: &RouteContext,
    plugin: &LoadedPlugin,
    letters: Vec<DeadLetter>,
) -> Option<Vec<(String, String)>> {
    if letters.is_empty() {
        return Some(Vec::new());
    }
    let message_ids: Vec<String> = letters.iter().map(|l| l.message.id.clone()).collect();
    match ctx.dead_letters.record(letters).await {
        Ok(record_ids) => Some(message_ids.into_iter().zip(record_ids).collect()),
        Err(e) => {
            tracing::error!(
                plugin = %plugin.name(),
                error = %format!("{e:#}"),
                "Cannot write dead letters; those messages stay queued and will be handled again"
            );
            None
        }
    }
}

/// Closes the records of replayed (or recovered) messages that were
/// handled; what cannot be closed now is tried again after the next batch.
async fn mark_replays_handled(ctx: &RouteContext, plugin: &LoadedPlugin, state: &mut RouteState) {
    if state.handled_replays.is_empty() {
        return;
    }
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
    let (letters, settlements) = refused_letters(ctx, plugin, refused);
    let types: Vec<String> = settlements
        .iter()
        .map(|s| s.delivery.envelope.message_type.clone())
        .collect();
    let Some(written) = write_letters(ctx, plugin, letters).await else {
        unhandled.extend(settlements.into_iter().map(|s| s.delivery));
        return false;
    };
    let mut settlements = settlements;
    name_dead_letters(&mut settlements, &written);
    let records = take_records(ctx, &mut settlements);
    match subscription.settle(settlements).await {
        Ok(again) => {
            send_records(ctx, records, &again);
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

/// The dead letters of refused settlements (as `undeliverable`), and the
/// settlements that replace them.
fn refused_letters(
    ctx: &RouteContext,
    plugin: &LoadedPlugin,
    refused: Vec<Refused>,
) -> (Vec<DeadLetter>, Vec<Settlement>) {
    let mut letters = Vec::with_capacity(refused.len());
    let mut settlements = Vec::with_capacity(refused.len());
    for Refused {
        settlement,
        mut reason,
    } in refused
    {
        // On a broker the state store committed before the broker refused.
        let state_committed = ctx.state.as_ref().is_some_and(|a| a.store.is_some())
            && matches!(&settlement.outcome, Outcome::Handled { state, .. } if !state.is_empty());
        if state_committed {
            reason.push_str(
                "; the state changes it made were committed before the broker refused it",
            );
        }
        // A refused retry's message carries the attempt that failed.
        let mut message = match settlement.outcome {
            Outcome::Retry { message, .. } => message,
            _ => settlement.delivery.envelope.clone(),
        };
        let failure = Failure::new(FailureKind::Undeliverable, reason);
        message
            .history
            .push(final_attempt(plugin, message.attempt, &failure, None));
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
        let journal = ctx.journal.as_ref().map(|sink| {
            let mut r = crate::journal::Record::of(
                &message,
                plugin,
                crate::journal::Outcome::DeadLettered,
                std::time::Duration::ZERO,
                &ctx.host,
                sink.payloads(),
            );
            r.dead_letter = Some(letter.id.clone());
            r.error = Some(crate::journal::ErrorBrief {
                kind: failure.kind.as_str().to_owned(),
                code: None,
                message: crate::text::clip(&failure.message, crate::journal::MAX_ERROR),
            });
            Box::new(r)
        });
        letters.push(letter);
        settlements.push(Settlement {
            journal,
            delivery: settlement.delivery,
            outcome: Outcome::DeadLettered {
                copy: None,
                fault: None,
                saga_failed: None,
            },
        });
    }
    (letters, settlements)
}

/// Updates the gauge of the saga's active instances (running or failed)
/// from the state store.
/// A store that cannot be read leaves the gauge as it was.
pub async fn record_saga_count(ctx: &RouteContext, plugin: &str) {
    let (Some(_), Some(access)) = (&ctx.saga, &ctx.state) else {
        return;
    };
    let reader = access.reader.clone();
    let name = plugin.to_owned();
    // A store's reads block (PostgreSQL's on a runtime of its own).
    let counted = tokio::task::spawn_blocking(move || reader.active(&name)).await;
    match counted {
        Ok(Ok(n)) => ctx
            .telemetry
            .metrics
            .saga_active
            .record(n, &[KeyValue::new("plugin", plugin.to_owned())]),
        Ok(Err(e)) => tracing::debug!(
            plugin = %plugin,
            error = %format!("{e:#}"),
            "Cannot count the saga's active instances"
        ),
        Err(_) => {}
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

/// On a broker, commits the state the batch's handled messages wrote to
/// the state store, in one transaction, before the broker hears of them;
/// for an exactly-once plugin, with the record of each handled message and
/// its outputs. (The embedded transport commits state in its settle
/// transaction instead.)
async fn commit_state(
    ctx: &RouteContext,
    plugin: &LoadedPlugin,
    settlements: impl Iterator<Item = &Settlement>,
    redelivered: &std::collections::HashSet<u64>,
) -> anyhow::Result<()> {
    let Some(store) = ctx.state.as_ref().and_then(|a| a.store.as_ref()) else {
        return Ok(());
    };
    let mut changes = crate::state::Changes::default();
    let mut steps = Vec::new();
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for s in settlements {
        let (outputs, reply, state, saga) = match &s.outcome {
            Outcome::Handled {
                outputs,
                reply,
                state,
                saga,
            } => (outputs, reply, state, saga),
            Outcome::DeadLettered {
                saga_failed: Some(failure),
                ..
            } => {
                failed.push(failure.clone());
                continue;
            }
            _ => continue,
        };
        changes.then(state);
        steps.extend(saga.iter().cloned());
        if ctx.exactly_once && !redelivered.contains(&s.delivery.receipt) {
            done.push(crate::state::Done {
                message_id: s.delivery.envelope.id.clone(),
                outputs: outputs.clone(),
                reply: reply.clone(),
            });
        }
    }
    if !(changes.is_empty() && steps.is_empty() && done.is_empty()) {
        // Instances in one order on every host, so two commits of the same
        // instances lock their rows in the same order (each instance's
        // steps keep theirs: the sort is stable).
        steps.sort_by(|a, b| a.instance.cmp(&b.instance));
        store
            .commit(plugin.name().as_str(), changes, steps, done)
            .await?;
    }
    if !failed.is_empty() {
        // A status to look at, not part of the outcome: a store that
        // cannot take it leaves the instances running, and says so.
        failed.sort();
        failed.dedup();
        if let Err(e) = store.mark_failed(plugin.name().as_str(), failed).await {
            tracing::warn!(
                plugin = %plugin.name(),
                error = %format!("{e:#}"),
                "Cannot mark the saga instances of dead-lettered steps failed"
            );
        }
    }
    Ok(())
}
