//! Replaying dead letters: back through the route that failed them, to the
//! plugin version running now.
//!
//! Each batch is claimed (marked `replaying`, counted, and stamped with the
//! replay's own claim) in the dead-letter store, enqueued on the transport,
//! then marked `replayed`. Two replays running at once (two operators, two
//! hosts on one PostgreSQL store) never both claim a record: the second
//! skips what the first holds. A replay killed between the last two steps
//! leaves records `replaying` under its claim; once the claim is older than
//! [`CLAIM_LEASE`], the next replay takes them over and reports them,
//! because their messages may now be delivered twice. No record is ever
//! lost: it is either replayed (and marked) or still present.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::{DeadLetter, DeadLetterStore, Filter, Status};
use crate::envelope::{Envelope, new_id, now_ms};
use crate::transport::Transport;

/// How long a replay's claim on a record holds: longer than any one batch's
/// enqueue takes (a broker confirm waits 30 s at most). A record still
/// `replaying` after that was left by a replay that died.
pub const CLAIM_LEASE: Duration = Duration::from_secs(300);

/// How a replay runs.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// List what would be replayed; change nothing.
    pub dry_run: bool,
    /// Replay even records that reached the loop guard.
    pub force: bool,
    /// The loop guard: records replayed this often are skipped.
    pub max_replays: u32,
    /// Records per batch (one store transaction and one enqueue each).
    pub batch_size: usize,
    /// At most this many records per second, to spare downstream systems.
    pub rate: Option<f64>,
    /// Routes the pipeline has; records of other routes are skipped.
    pub routes: Vec<String>,
    /// How old another replay's claim must be before this one takes it
    /// over ([`CLAIM_LEASE`]).
    pub claim_lease: Duration,
}

/// Why a record was not replayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// It was replayed `max_replays` times already and keeps failing.
    LoopGuard { replays: u32 },
    /// Its route is not part of this pipeline any more.
    UnknownRoute,
}

/// What a replay did (or, for a dry run, would do).
#[derive(Clone, Debug, Default)]
pub struct ReplayReport {
    /// Records replayed (for a dry run: that would be).
    pub replayed: Vec<DeadLetter>,
    pub skipped: Vec<(DeadLetter, Skip)>,
    /// Records found `replaying` from an interrupted replay and replayed
    /// again: their messages may be delivered twice.
    pub resumed: usize,
    /// Records another replay was working on, left to it.
    pub claimed_elsewhere: usize,
}

/// The records a filter selects that a replay may act on.
pub async fn candidates(store: &dyn DeadLetterStore, filter: &Filter) -> Result<Vec<DeadLetter>> {
    let mut filter = filter.clone();
    if filter.statuses.is_empty() {
        filter.statuses = vec![Status::Dead, Status::Replaying];
    }
    let mut records = store.list(&filter).await?;
    // Oldest failures first: replay in the order things broke.
    records.reverse();
    Ok(records)
}

/// Replays `records`, calling `progress(done, total)` after each batch.
pub async fn replay(
    store: &dyn DeadLetterStore,
    transport: &dyn Transport,
    records: Vec<DeadLetter>,
    options: &ReplayOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<ReplayReport> {
    let (mut report, todo) = triage(records, options);
    if options.dry_run {
        report.replayed = todo;
        return Ok(report);
    }
    let total = todo.len();
    let started = Instant::now();
    let claim = new_id();
    let mut done = 0usize;
    for chunk in todo.chunks(options.batch_size.max(1)) {
        if let Some(rate) = options.rate.filter(|r| *r > 0.0) {
            pace(rate, done, started).await;
        }
        let sent = replay_batch(store, transport, chunk, &claim, options, &mut report).await?;
        done += chunk.len();
        report.replayed.extend(sent);
        progress(done, total);
    }
    Ok(report)
}

/// The records to replay; the others go to the report's skipped ones.
fn triage(records: Vec<DeadLetter>, options: &ReplayOptions) -> (ReplayReport, Vec<DeadLetter>) {
    let mut report = ReplayReport::default();
    let mut todo = Vec::new();
    for r in records {
        if !options.routes.contains(&r.route) {
            report.skipped.push((r, Skip::UnknownRoute));
        } else if r.replay_count >= options.max_replays && !options.force {
            let replays = r.replay_count;
            report.skipped.push((r, Skip::LoopGuard { replays }));
        } else {
            todo.push(r);
        }
    }
    (report, todo)
}

/// Waits until the batch after `done` records is within `rate` records per
/// second since `started`.
async fn pace(rate: f64, done: usize, started: Instant) {
    let due = Duration::try_from_secs_f64(done as f64 / rate).unwrap_or(Duration::MAX);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        tokio::time::sleep(wait).await;
    }
}

/// Claims one batch under `claim`, enqueues what it got and marks that
/// replayed; returns the records replayed. Records held by another replay
/// and records taken over from an interrupted one are counted in `report`.
async fn replay_batch(
    store: &dyn DeadLetterStore,
    transport: &dyn Transport,
    chunk: &[DeadLetter],
    claim: &str,
    options: &ReplayOptions,
    report: &mut ReplayReport,
) -> Result<Vec<DeadLetter>> {
    let ids: Vec<String> = chunk.iter().map(|r| r.id.clone()).collect();
    let stale_before =
        now_ms().saturating_sub(u64::try_from(options.claim_lease.as_millis()).unwrap_or(u64::MAX));
    let started_batch = store
        .begin_replay(&ids, claim, stale_before)
        .await
        .context("cannot mark records as replaying")?;
    let taken = chunk.len() - started_batch.len();
    if taken > 0 {
        tracing::warn!(
            records = taken,
            "Records are being replayed by another replay right now; skipped"
        );
        report.claimed_elsewhere += taken;
    }
    report.resumed += chunk
        .iter()
        .filter(|r| r.status == Status::Replaying && started_batch.iter().any(|s| s.id == r.id))
        .count();
    enqueue_by_route(store, transport, &started_batch).await?;
    Ok(started_batch)
}

/// Enqueues claimed records route by route: a record is marked replayed
/// only once its own enqueue succeeded; on a failure the rest go back to
/// `dead`.
async fn enqueue_by_route(
    store: &dyn DeadLetterStore,
    transport: &dyn Transport,
    claimed: &[DeadLetter],
) -> Result<()> {
    let mut by_route: BTreeMap<&str, Vec<&DeadLetter>> = BTreeMap::new();
    for r in claimed {
        by_route.entry(r.route.as_str()).or_default().push(r);
    }
    let mut routes = by_route.into_iter();
    while let Some((route, records)) = routes.next() {
        let messages: Vec<Envelope> = records.iter().map(|r| r.replay_message()).collect();
        let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        if let Err(e) = transport.enqueue_to(route, messages).await {
            let mut unsent = ids;
            for (_, rest) in routes {
                unsent.extend(rest.iter().map(|r| r.id.clone()));
            }
            if let Err(undo) = store.abort_replay(&unsent).await {
                tracing::warn!(error = %format!("{undo:#}"), "Cannot put unsent replays back to dead; they stay `replaying`");
            }
            return Err(e.context(format!("cannot enqueue replays on route {route}")));
        }
        store
            .finish_replay(&ids)
            .await
            .context("cannot mark records as replayed")?;
    }
    Ok(())
}

/// The note an edited record is resolved with, naming the message sent in
/// its place.
pub fn edited_note(new_id: &str) -> String {
    format!("edited and sent again as message {new_id}")
}

/// Sends `payload` in place of a dead record's message: a new message (new
/// id, attempt 1) of the same type and route, caused by the original
/// message and in its flow, so `switchyard why` tells both. The payload is
/// checked against the type's schema first. The record is then resolved
/// with [`edited_note`]. Returns the new message's id.
pub async fn edit(
    store: &dyn DeadLetterStore,
    transport: &dyn Transport,
    schemas: &crate::schemas::Schemas,
    record: &DeadLetter,
    payload: Vec<u8>,
    routes: &[String],
) -> Result<String> {
    if record.status != Status::Dead {
        bail!(
            "dead letter {} is `{}`: only a `dead` record can be edited and sent again",
            record.id,
            record.status
        );
    }
    if !routes.contains(&record.route) {
        bail!(
            "dead letter {} belongs to route `{}`, which this pipeline no longer has",
            record.id,
            record.route
        );
    }
    if record.message.content_type.contains("json") {
        serde_json::from_slice::<serde_json::Value>(&payload).with_context(|| {
            format!(
                "the new payload is not JSON, and message {} is `{}`",
                record.message.id, record.message.content_type
            )
        })?;
    }
    schemas
        .check(&record.message.message_type, &payload)
        .map_err(|e| anyhow::anyhow!("the new payload is refused: {e}"))?;
    let mut message = record.message.clone();
    message.id = new_id();
    // The claim names the new message, and no replay takes it over when it
    // grows old: once the new message may be out, the old one must never
    // be sent after it.
    let claim = format!("{}{}", super::query::EDIT_CLAIM, message.id);
    let stale_before =
        now_ms().saturating_sub(u64::try_from(CLAIM_LEASE.as_millis()).unwrap_or(u64::MAX));
    let claimed = store
        .begin_replay(std::slice::from_ref(&record.id), &claim, stale_before)
        .await
        .context("cannot claim the record")?;
    if claimed.is_empty() {
        bail!(
            "dead letter {} is being replayed by someone else right now",
            record.id
        );
    }
    message.payload = payload;
    message.causation_id = Some(record.message.id.clone());
    message
        .correlation_id
        .get_or_insert_with(|| record.message.id.clone());
    message.headers.retain(|(n, _)| {
        n != crate::dlq::REPLAY_HEADER && n != crate::envelope::REPLAY_TRACE_HEADER
    });
    message
        .headers
        .push((EDITED_HEADER.to_owned(), record.id.clone()));
    message.attempt = 1;
    message.history.clear();
    message.created_at_ms = now_ms();
    let id = message.id.clone();
    if let Err(e) = transport.enqueue_to(&record.route, vec![message]).await {
        if let Err(undo) = store.abort_replay(std::slice::from_ref(&record.id)).await {
            tracing::warn!(error = %format!("{undo:#}"), "Cannot put an unsent edit's record back to dead; it stays `replaying`");
        }
        return Err(e.context(format!(
            "cannot enqueue the edited message on route {}",
            record.route
        )));
    }
    // The new message is out: close the record, trying a few times, since
    // a record left `replaying` under the edit's claim needs a hand.
    let note = edited_note(&id);
    let mut last = None;
    for wait in [0u64, 200, 1000, 3000] {
        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
        match store
            .resolve(std::slice::from_ref(&record.id), Some(&note))
            .await
        {
            Ok(_) => return Ok(id),
            Err(e) => last = Some(e),
        }
    }
    let why = last.map(|e| format!("{e:#}")).unwrap_or_default();
    bail!(
        "the edited message was sent as {id}, but dead letter {} could not be resolved ({why}); \
         it stays `replaying` under the edit's claim, which no replay takes over: \
         resolve it with `switchyard dlq resolve {}`",
        record.id,
        record.id
    )
}

/// The header of a message sent in place of a dead letter's, naming the
/// record.
pub const EDITED_HEADER: &str = "switchyard-edited-from";
