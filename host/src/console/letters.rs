//! The dead-letter pages: failure groups, the records of a group, one
//! record, and what can be done to it (replay, resolve, edit and send
//! again).

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use maud::{Markup, html};

use super::pages::{path_segment, short_digest, urlencode};
use super::{
    Inner, Page, Shared, ago, html_response, layout, refuse, signed_in, signed_in_form, when,
};
use crate::dlq::replay::{self, ReplayOptions};
use crate::dlq::{DeadLetter, Filter, Status};

/// The most records one click replays from a group.
const GROUP_REPLAY_LIMIT: usize = 1000;
/// Records listed on one page.
const LIST_LIMIT: u64 = 200;
/// The most of a payload a record's page shows.
const SHOWN_PAYLOAD: usize = 256 << 10;

pub(super) async fn index(
    State(inner): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let page = match signed_in(&inner, &headers, "/ui/dead-letters") {
        Ok(p) => p,
        Err(r) => return r,
    };
    let status = q.get("status").map_or("dead", String::as_str);
    let statuses = if status == "all" {
        Vec::new()
    } else {
        match Status::parse(status) {
            Some(s) => vec![s],
            None => return refuse(StatusCode::BAD_REQUEST, "There is no such status."),
        }
    };
    let fingerprint = q.get("fingerprint").filter(|f| !f.is_empty()).cloned();
    let route = q.get("route").filter(|f| !f.is_empty()).cloned();
    let store = inner.control.services().dead_letters.clone();
    let filter = Filter {
        fingerprint: fingerprint.clone(),
        route: route.clone(),
        statuses,
        ..Filter::default()
    };
    let status_links = html! {
        nav.filters {
            "Status: "
            @for s in ["dead", "replaying", "replayed", "handled", "resolved", "all"] {
                @if s == status { strong { (s) } } @else {
                    a href={ "/ui/dead-letters?status=" (s)
                        @if let Some(f) = &fingerprint { "&fingerprint=" (urlencode(f)) }
                        @if let Some(r) = &route { "&route=" (urlencode(r)) } } { (s) }
                }
                " "
            }
        }
    };
    let body = if fingerprint.is_none() && route.is_none() {
        match store.groups(&filter).await {
            Ok(groups) => html! {
                p.lead { "Failures grouped by fingerprint: the plugin, the kind of error and its cause with ids and numbers taken out." }
                (status_links)
                @if groups.is_empty() {
                    p.empty { "No dead letters with status " (status) "." }
                } @else {
                    table.groups {
                        thead { tr { th { "Route" } th { "Error" } th { "Cause" } th.num { "Records" } th { "First" } th { "Last" } } }
                        tbody {
                            @for g in &groups {
                                tr data-fingerprint=(g.fingerprint) {
                                    td { (g.route) }
                                    td { span.kind { (g.error_kind) } }
                                    td.cause { a href={ "/ui/dead-letters?status=" (status) "&fingerprint=" (urlencode(&g.fingerprint)) } { (g.cause) } }
                                    td.num { (g.count) }
                                    td title=(when(g.first_failed_at_ms)) { (ago(g.first_failed_at_ms)) }
                                    td title=(when(g.last_failed_at_ms)) { (ago(g.last_failed_at_ms)) }
                                }
                            }
                        }
                    }
                }
            },
            Err(e) => {
                html! { p.error { "Cannot read the dead-letter store: " (format!("{e:#}")) } }
            }
        }
    } else {
        let mut filter = filter;
        filter.limit = Some(LIST_LIMIT);
        match store.list(&filter).await {
            Ok(records) => html! {
                p { a href="/ui/dead-letters" { "All groups" } }
                (status_links)
                @if let Some(f) = &fingerprint {
                    @if status == "dead" && !records.is_empty() {
                        form.inline method="post" action="/ui/dead-letters/replay" {
                            input type="hidden" name="csrf" value=(page.session.csrf);
                            input type="hidden" name="fingerprint" value=(f);
                            button type="submit" { "Replay every dead record of this group" }
                        }
                    }
                }
                (record_table(&records))
                @if records.len() as u64 >= LIST_LIMIT {
                    p.small { "The newest " (LIST_LIMIT) " records; " code { "switchyard dlq list" } " lists them all." }
                }
            },
            Err(e) => {
                html! { p.error { "Cannot read the dead-letter store: " (format!("{e:#}")) } }
            }
        }
    };
    html_response(
        StatusCode::OK,
        layout(&inner, &page, "Dead letters", "dead-letters", body),
    )
}

fn record_table(records: &[DeadLetter]) -> Markup {
    html! {
        @if records.is_empty() {
            p.empty { "No records." }
        } @else {
            table.records {
                thead { tr { th { "Record" } th { "Message" } th { "Status" } th { "Error" } th.num { "Attempts" } th { "Last failed" } } }
                tbody {
                    @for r in records {
                        tr data-record=(r.id) {
                            td { a href={ "/ui/dead-letters/" (path_segment(&r.id)) } { (r.id) } }
                            td { (r.message.message_type) " " span.small { (r.message.id) } }
                            td { span.status { (r.status.as_str()) } }
                            td.cause { span.kind { (r.error.kind) } " " (crate::text::clip(&r.error.message, 200)) }
                            td.num { (r.attempts.len()) }
                            td title=(when(r.last_failed_at_ms)) { (ago(r.last_failed_at_ms)) }
                        }
                    }
                }
            }
        }
    }
}

/// How a record's payload is shown: the text to show (JSON
/// pretty-printed, other UTF-8 as it is, anything else in hex, each cut at
/// [`SHOWN_PAYLOAD`]), what it is, and the payload's exact text when it can
/// be edited in a form (UTF-8, not cut).
fn payload_text(payload: &[u8]) -> (String, &'static str, Option<&str>) {
    let exact = std::str::from_utf8(payload)
        .ok()
        .filter(|_| payload.len() <= SHOWN_PAYLOAD);
    if payload.len() <= SHOWN_PAYLOAD
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload)
        && let Ok(pretty) = serde_json::to_string_pretty(&v)
    {
        return (pretty, "JSON, pretty-printed", exact);
    }
    let shown = &payload[..payload.len().min(SHOWN_PAYLOAD)];
    match std::str::from_utf8(shown) {
        Ok(t) => (t.to_owned(), "text", exact),
        // Cut inside a character: the text up to it.
        Err(e) if e.error_len().is_none() && e.valid_up_to() > 0 => (
            String::from_utf8_lossy(&shown[..e.valid_up_to()]).into_owned(),
            "text",
            exact,
        ),
        Err(_) => (hex::encode(shown), "bytes, in hex", None),
    }
}

pub(super) async fn record(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let here = format!("/ui/dead-letters/{}", path_segment(&id));
    let page = match signed_in(&inner, &headers, &here) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let store = inner.control.services().dead_letters.clone();
    let r = match store.get(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => return refuse(StatusCode::NOT_FOUND, "There is no such dead letter."),
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("Cannot read the dead-letter store: {e:#}"),
            );
        }
    };
    let (payload, what, exact) = payload_text(&r.message.payload);
    let editable = r.status == Status::Dead && exact.is_some();
    let m = &r.message;
    let body = html! {
        p.lead {
            (m.message_type) " " code { (m.id) } " failed in " strong { (r.route) "@" (r.plugin_version) }
            " and is " span.status { (r.status.as_str()) } "."
            " " a href={ "/ui/messages?q=" (urlencode(&m.id)) } { "Its journey" }
        }
        section.error {
            h2 { "Error" }
            p { span.kind { (r.error.kind) } @if let Some(c) = &r.error.code { " " code { (c) } } }
            pre.message { (r.error.message) }
            @if !r.error.details.is_empty() {
                dl.facts { @for (k, v) in &r.error.details { dt { (k) } dd { (v) } } }
            }
            @if let Some(b) = &r.error.backtrace { h3 { "Backtrace" } pre.backtrace { (b) } }
            @if let Some(o) = &r.error.output { h3 { "Plugin output" } pre.output { (o) } }
        }
        section.actions {
            @if matches!(r.status, Status::Dead | Status::Replaying) {
                form.inline method="post" action={ "/ui/dead-letters/" (path_segment(&r.id)) "/replay" } {
                    input type="hidden" name="csrf" value=(page.session.csrf);
                    button type="submit" #replay { "Replay" }
                }
            }
            @if matches!(r.status, Status::Dead | Status::Replaying | Status::Replayed) {
                form.inline method="post" action={ "/ui/dead-letters/" (path_segment(&r.id)) "/resolve" } {
                    input type="hidden" name="csrf" value=(page.session.csrf);
                    input type="text" name="note" placeholder="Note (why it needs no replay)" maxlength="500";
                    button type="submit" #resolve { "Resolve" }
                }
            }
        }
        section.payload {
            h2 { "Payload" } p.small { (m.content_type) ", " (m.payload.len()) " bytes, shown as " (what) }
            pre #payload { (payload) }
            @if m.payload.len() > SHOWN_PAYLOAD {
                p.small { "Only the first " (SHOWN_PAYLOAD) " bytes are shown." }
            }
            @if r.status == Status::Dead && exact.is_none() {
                p.small { "Only a text payload of at most " (SHOWN_PAYLOAD) " bytes can be edited here; " code { "switchyard dlq edit" } " takes any." }
            }
            @if let Some(original) = exact.filter(|_| editable) {
                details {
                    summary { "Edit and send again" }
                    p.small { "Sends the edited payload, byte for byte as written here, as a new message of the same type, caused by this one; it is checked against the type's schema first. This record is then resolved." }
                    form method="post" action={ "/ui/dead-letters/" (path_segment(&r.id)) "/edit" } {
                        input type="hidden" name="csrf" value=(page.session.csrf);
                        // The parser drops one newline after the tag: this
                        // one, so a payload's own first newline stays.
                        textarea #edited name="payload" rows="12" spellcheck="false" { "\n" (original) }
                        button type="submit" #send-edited { "Send as a new message" }
                    }
                }
            }
        }
        section.facts {
            h2 { "Record" }
            dl.facts {
                dt { "Record id" } dd { (r.id) }
                dt { "Fingerprint" } dd { a href={ "/ui/dead-letters?status=all&fingerprint=" (urlencode(&r.fingerprint)) } { (r.fingerprint) } " · " (r.cause) }
                dt { "Plugin" } dd { (r.route) "@" (r.plugin_version) " " span.digest title=(r.plugin_digest) { (short_digest(&r.plugin_digest)) } }
                dt { "First failed" } dd { (when(r.first_failed_at_ms)) }
                dt { "Last failed" } dd { (when(r.last_failed_at_ms)) " (" (ago(r.last_failed_at_ms)) ")" }
                dt { "Replays" } dd { (r.replay_count) @if let Some(t) = r.replayed_at_ms { ", last " (when(t)) } }
                @if let Some(n) = &r.note { dt { "Note" } dd { (n) } }
                dt { "Trace" } dd { @if let Some(t) = &r.trace_id { code { (t) } } @else { "none" } }
                dt { "Host" } dd { (r.host) }
                dt { "Source" } dd { (r.source.transport) " · " (r.source.queue)
                    @if let Some(p) = r.source.partition { " · partition " (p) }
                    @if let Some(o) = r.source.offset { " · offset " (o) } }
                @if let Some(c) = &m.correlation_id { dt { "Correlation" } dd { a href={ "/ui/messages?by=correlation&q=" (urlencode(c)) } { (c) } } }
                @if let Some(c) = &m.causation_id { dt { "Caused by" } dd { a href={ "/ui/messages?q=" (urlencode(c)) } { (c) } } }
            }
        }
        section.attempts {
            h2 { "Attempts" }
            table {
                thead { tr { th.num { "#" } th { "Started" } th { "Plugin" } th.num { "Took" } th { "Error" } th { "Then" } } }
                tbody {
                    @for a in &r.attempts {
                        tr {
                            td.num { (a.number) }
                            td { (when(a.started_at_ms)) }
                            td { (a.plugin) }
                            td.num { (crate::story::duration_us(a.duration_us)) }
                            td { span.kind { (a.error_kind) } " " (a.error) }
                            td { (a.then) }
                        }
                    }
                }
            }
        }
        @if !m.headers.is_empty() {
            section.headers {
                h2 { "Headers" }
                table { tbody { @for (k, v) in &m.headers { tr { th { (k) } td { (v) } } } } }
            }
        }
    };
    let title = format!("Dead letter {}", r.id);
    html_response(
        StatusCode::OK,
        layout(&inner, &page, &title, "dead-letters", body),
    )
}

/// The replay options of the running pipeline: its routes and loop guard.
async fn options(inner: &Inner) -> ReplayOptions {
    let pipeline = inner.control.pipeline().await;
    ReplayOptions {
        dry_run: false,
        force: false,
        max_replays: pipeline.dead_letters.max_replays,
        batch_size: 100,
        rate: None,
        routes: pipeline
            .plugins
            .iter()
            .map(|p| p.name.to_string())
            .collect(),
        claim_lease: replay::CLAIM_LEASE,
    }
}

/// What a replay did, in a sentence.
fn replay_summary(report: &replay::ReplayReport) -> String {
    let mut parts = vec![format!("{} replayed", report.replayed.len())];
    let guarded = report
        .skipped
        .iter()
        .filter(|(_, s)| matches!(s, replay::Skip::LoopGuard { .. }))
        .count();
    if guarded > 0 {
        parts.push(format!(
            "{guarded} skipped: replayed too often already (`switchyard dlq replay --force` overrides)"
        ));
    }
    let unknown = report.skipped.len() - guarded;
    if unknown > 0 {
        parts.push(format!(
            "{unknown} skipped: their route is not in the pipeline now"
        ));
    }
    if report.claimed_elsewhere > 0 {
        parts.push(format!(
            "{} being replayed elsewhere",
            report.claimed_elsewhere
        ));
    }
    if report.resumed > 0 {
        parts.push(format!(
            "{} had been left mid-replay by a replay that stopped, so their messages may be delivered twice",
            report.resumed
        ));
    }
    format!("{}.", parts.join("; "))
}

/// Runs a change to the store to its end on a task of its own, so that a
/// browser that goes away (or a connection that times out) does not stop
/// it half-way.
async fn to_the_end<F>(work: F) -> String
where
    F: std::future::Future<Output = String> + Send + 'static,
{
    match tokio::spawn(work).await {
        Ok(message) => message,
        Err(e) => format!("The action failed: {e}"),
    }
}

async fn run_replay(inner: &Inner, records: Vec<DeadLetter>) -> String {
    let store = inner.control.services().dead_letters.clone();
    let transport = inner.control.transport().clone();
    let options = options(inner).await;
    to_the_end(async move {
        match replay::replay(
            store.as_ref(),
            transport.as_ref(),
            records,
            &options,
            |_, _| {},
        )
        .await
        {
            Ok(report) => {
                tracing::info!(
                    replayed = report.replayed.len(),
                    "Console: dead letters replayed"
                );
                replay_summary(&report)
            }
            Err(e) => format!("The replay stopped: {e:#}"),
        }
    })
    .await
}

pub(super) async fn replay_one(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (page, _) = match signed_in_form(&inner, &headers, body).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let store = inner.control.services().dead_letters.clone();
    let records = match replay::candidates(
        store.as_ref(),
        &Filter {
            ids: vec![id.clone()],
            ..Filter::default()
        },
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
    };
    let message = if records.is_empty() {
        "Nothing replayed: the record is not dead (any more).".to_owned()
    } else {
        run_replay(&inner, records).await
    };
    back_to_record(&inner, &page, message, &id)
}

pub(super) async fn replay_group(
    State(inner): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (page, form) = match signed_in_form(&inner, &headers, body).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(fingerprint) = form.get("fingerprint").filter(|f| !f.is_empty()) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Which group? The form names no fingerprint.",
        );
    };
    let store = inner.control.services().dead_letters.clone();
    let records = match replay::candidates(
        store.as_ref(),
        &Filter {
            fingerprint: Some(fingerprint.clone()),
            statuses: vec![Status::Dead],
            limit: Some(GROUP_REPLAY_LIMIT as u64 + 1),
            ..Filter::default()
        },
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
    };
    let more = records.len() > GROUP_REPLAY_LIMIT;
    let records: Vec<DeadLetter> = records.into_iter().take(GROUP_REPLAY_LIMIT).collect();
    let mut message = run_replay(&inner, records).await;
    if more {
        message.push_str(&format!(
            " The group holds more than {GROUP_REPLAY_LIMIT} dead records: replay again for the next ones, or replay the whole group with `switchyard dlq replay --group` (and --rate)."
        ));
    }
    inner.flash_and_go(
        &page,
        message,
        &format!(
            "/ui/dead-letters?status=all&fingerprint={}",
            urlencode(fingerprint)
        ),
    )
}

pub(super) async fn resolve(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (page, form) = match signed_in_form(&inner, &headers, body).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let note = form
        .get("note")
        .map(|n| crate::text::clip(n.trim(), 500))
        .filter(|n| !n.is_empty());
    let store = inner.control.services().dead_letters.clone();
    let record = id.clone();
    let message = to_the_end(async move {
        match store
            .resolve(std::slice::from_ref(&record), note.as_deref())
            .await
        {
            Ok(0) => "Nothing resolved: the record is resolved or handled already.".to_owned(),
            Ok(_) => {
                tracing::info!(record = %record, "Console: dead letter resolved");
                "Resolved.".to_owned()
            }
            Err(e) => format!("Not resolved: {e:#}"),
        }
    })
    .await;
    back_to_record(&inner, &page, message, &id)
}

pub(super) async fn edit(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (page, form) = match signed_in_form(&inner, &headers, body).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(edited) = form.get("payload") else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "The form has no payload: nothing was sent.",
        );
    };
    let store = inner.control.services().dead_letters.clone();
    let record = match store.get(&id).await {
        Ok(Some(r)) if r.id == id => r,
        Ok(_) => return refuse(StatusCode::NOT_FOUND, "There is no such dead letter."),
        Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
    };
    // Browsers send a text area's lines ended with CR LF: a payload that
    // had no CR gets its own line ends back.
    let payload = if record.message.payload.contains(&b'\r') {
        edited.clone().into_bytes()
    } else {
        edited.replace("\r\n", "\n").into_bytes()
    };
    let options = options(&inner).await;
    let transport = inner.control.transport().clone();
    let schemas = inner.control.services().schemas.clone();
    let message = to_the_end(async move {
        match replay::edit(
            store.as_ref(),
            transport.as_ref(),
            &schemas,
            &record,
            payload,
            &options.routes,
        )
        .await
        {
            Ok(new_id) => {
                tracing::info!(record = %record.id, message = %new_id, "Console: dead letter edited and sent again");
                format!("Sent as a new message {new_id}; this record is resolved.")
            }
            // Sent, but the record could not be closed: say so as it is.
            Err(e) if e.to_string().starts_with("the edited message was sent") => {
                format!("The edited message was sent{}", e.to_string().trim_start_matches("the edited message was sent"))
            }
            Err(e) => format!("Not sent: {e:#}"),
        }
    })
    .await;
    back_to_record(&inner, &page, message, &id)
}

/// After an action on a record: its page, with what the action did.
fn back_to_record(inner: &Inner, page: &Page, message: String, id: &str) -> Response {
    inner.flash_and_go(
        page,
        message,
        &format!("/ui/dead-letters/{}", path_segment(id)),
    )
}
