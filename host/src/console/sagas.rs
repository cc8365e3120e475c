//! The sagas pages: instances (running, failed, stuck, completed) and one
//! instance's state and steps, each step with what it changed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use maud::{Markup, html};

use super::pages::{path_segment, urlencode};
use super::{Inner, Shared, ago, html_response, layout, refuse, signed_in, when};
use crate::envelope::now_ms;
use crate::saga::{self, Instance, Listed, Pending, Status, Step};
use crate::state::Reader;

/// Instances listed on one page.
const LIST_LIMIT: usize = 200;
/// A running instance with no step for this long is stuck, unless the
/// page asks for another threshold.
pub(super) const STUCK_AFTER: Duration = Duration::from_secs(15 * 60);
/// Counted up to this many per status on the overview; more show as "1000+".
pub(super) const COUNT_LIMIT: usize = 1000;

/// The state store's reader, when the host keeps state.
pub(super) fn reader(inner: &Inner) -> Option<Arc<dyn Reader>> {
    inner
        .control
        .services()
        .state
        .as_ref()
        .map(|a| a.reader.clone())
}

/// Runs a read on a blocking thread (the PostgreSQL reader blocks).
async fn blocking<T: Send + 'static>(
    reader: Arc<dyn Reader>,
    f: impl FnOnce(&dyn Reader) -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(move || f(reader.as_ref())).await {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!("the state read failed: {e}")),
    }
}

fn ms_ago(d: Duration) -> u64 {
    now_ms().saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Per saga plugin: running, failed, and running with no step for
/// [`STUCK_AFTER`], each counted up to [`COUNT_LIMIT`].
pub(super) async fn counts(inner: &Inner) -> Option<Result<Vec<(String, [usize; 3])>>> {
    let reader = reader(inner)?;
    let sagas: Vec<String> = inner
        .control
        .pipeline()
        .await
        .plugins
        .iter()
        .filter(|p| p.saga.is_some())
        .map(|p| p.name.to_string())
        .collect();
    if sagas.is_empty() {
        return None;
    }
    let stuck_before = ms_ago(STUCK_AFTER);
    Some(
        blocking(reader, move |r| {
            let mut out = Vec::new();
            for plugin in sagas {
                let count = |status, updated_before_ms| {
                    r.instances(&saga::Query {
                        plugin: Some(plugin.clone()),
                        status: Some(status),
                        updated_before_ms,
                        started_before_ms: None,
                        limit: COUNT_LIMIT + 1,
                    })
                    .map(|l| l.len())
                };
                let running = count(Status::Running, None)?;
                let failed = count(Status::Failed, None)?;
                let stuck = count(Status::Running, Some(stuck_before))?;
                out.push((plugin, [running, failed, stuck]));
            }
            Ok(out)
        })
        .await,
    )
}

/// A count as the overview shows it.
pub(super) fn shown_count(n: usize) -> String {
    if n > COUNT_LIMIT {
        format!("{COUNT_LIMIT}+")
    } else {
        n.to_string()
    }
}

pub(super) async fn index(
    State(inner): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let page = match signed_in(&inner, &headers, "/ui/sagas") {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(reader) = reader(&inner) else {
        let body = html! { p.empty { "This host keeps no state, so it runs no sagas." } };
        return html_response(
            StatusCode::OK,
            layout(&inner, &page, "Sagas", "sagas", body),
        );
    };
    let plugin = q.get("plugin").filter(|p| !p.is_empty()).cloned();
    let shown = q.get("status").map_or("open", String::as_str);
    let stuck = match q.get("stuck").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match crate::config::parse_duration(s) {
            Ok(d) => Some(d),
            Err(_) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "`stuck` is not a duration (like 15m or 2h).",
                );
            }
        },
    };
    let status = match (shown, stuck) {
        (_, Some(_)) => Some(Status::Running),
        ("open" | "all", None) => None,
        (s, None) => match Status::parse(s) {
            Some(s) => Some(s),
            None => return refuse(StatusCode::BAD_REQUEST, "There is no such status."),
        },
    };
    let query = saga::Query {
        plugin: plugin.clone(),
        status,
        updated_before_ms: stuck.map(ms_ago),
        started_before_ms: None,
        // Open instances are running and failed ones: read a page more
        // than shown, and drop the completed.
        limit: if shown == "open" {
            LIST_LIMIT * 4
        } else {
            LIST_LIMIT
        },
    };
    let found = blocking(reader, move |r| r.instances(&query)).await;
    let plugin_part = plugin
        .as_ref()
        .map(|p| format!("&plugin={}", urlencode(p)))
        .unwrap_or_default();
    let stuck_label = humantime::format_duration(STUCK_AFTER).to_string();
    let filters = html! {
        nav.filters {
            "Show: "
            @for (key, label) in [("open", "running and failed"), ("running", "running"), ("failed", "failed"), ("completed", "completed"), ("all", "all")] {
                @if stuck.is_none() && key == shown { strong { (label) } } @else {
                    a href={ "/ui/sagas?status=" (key) (plugin_part) } { (label) }
                }
                " "
            }
            @if stuck.is_some() { strong { "stuck" } } @else {
                a href={ "/ui/sagas?stuck=" (stuck_label) (plugin_part) } { "stuck (no step for " (stuck_label) ")" }
            }
        }
    };
    let body = match found {
        Err(e) => {
            html! { (filters) p.error { "Cannot read the state store: " (format!("{e:#}")) } }
        }
        Ok(found) => {
            let mut found: Vec<Listed> = if shown == "open" && stuck.is_none() {
                found
                    .into_iter()
                    .filter(|l| l.instance.status.is_open())
                    .collect()
            } else {
                found
            };
            let more = found.len() > LIST_LIMIT;
            found.truncate(LIST_LIMIT);
            html! {
                p.lead {
                    "Saga instances, the most recently changed first. A failed instance had a step dead-lettered; "
                    "a stuck one is running but nothing has moved it on for a while."
                }
                (filters)
                @if let Some(p) = &plugin { p.small { "Saga " strong { (p) } " only. " a href="/ui/sagas" { "All sagas" } } }
                @if found.is_empty() {
                    p.empty { "No instances." }
                } @else {
                    table.sagas {
                        thead { tr { th { "Saga" } th { "Instance" } th { "Status" } th.num { "Steps" } th { "Last step" } th { "Changed" } th { "Started" } } }
                        tbody {
                            @for l in &found {
                                @let stale = l.instance.status == Status::Running && l.instance.updated_at_ms < ms_ago(STUCK_AFTER);
                                tr data-instance=(l.id) {
                                    td { a href={ "/ui/sagas?plugin=" (urlencode(&l.plugin)) } { (l.plugin) } }
                                    td { a href=(instance_href(&l.plugin, &l.id)) { (l.id) } }
                                    td { span class={ "status " (l.instance.status.as_str()) } { (l.instance.status.as_str()) } @if stale { " " span.status.stuck { "stuck" } } }
                                    td.num { (l.instance.version) }
                                    td { (l.instance.last_type) }
                                    td title=(when(l.instance.updated_at_ms)) { (ago(l.instance.updated_at_ms)) }
                                    td title=(when(l.instance.started_at_ms)) { (ago(l.instance.started_at_ms)) }
                                }
                            }
                        }
                    }
                    @if more { p.small { "The first " (LIST_LIMIT) "; " code { "switchyard sagas list" } " lists more." } }
                }
            }
        }
    };
    html_response(
        StatusCode::OK,
        layout(&inner, &page, "Sagas", "sagas", body),
    )
}

pub(super) fn instance_href(plugin: &str, id: &str) -> String {
    format!("/ui/sagas/{}/{}", path_segment(plugin), path_segment(id))
}

type Shown = (Instance, Vec<(String, Vec<u8>)>, Vec<Step>, Vec<Pending>);

pub(super) async fn instance(
    State(inner): State<Shared>,
    Path((plugin, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let page = match signed_in(&inner, &headers, &instance_href(&plugin, &id)) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let Some(reader) = reader(&inner) else {
        return refuse(
            StatusCode::NOT_FOUND,
            "This host keeps no state, so it runs no sagas.",
        );
    };
    let (name, key) = (plugin.clone(), id.clone());
    let read = blocking(reader, move |r| -> Result<Option<Shown>> {
        let Some(instance) = r.instance(&name, &key)? else {
            return Ok(None);
        };
        let state = crate::state::instance_state(r, &name, &key)?;
        let steps = r.steps(&name, &key)?;
        let timeouts = r.timeouts(&name, &key)?;
        Ok(Some((instance, state, steps, timeouts)))
    })
    .await;
    let (instance, state, steps, timeouts) = match read {
        Ok(Some(s)) => s,
        Ok(None) => {
            return refuse(
                StatusCode::NOT_FOUND,
                &format!("Saga {plugin} has no instance {id}."),
            );
        }
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("Cannot read the state store: {e:#}"),
            );
        }
    };
    let stale = instance.status == Status::Running && instance.updated_at_ms < ms_ago(STUCK_AFTER);
    let body = html! {
        p.lead {
            "Saga " strong { (plugin) } " instance " code { (id) } " is "
            span class={ "status " (instance.status.as_str()) } { (instance.status.as_str()) }
            @if stale { ", and nothing has moved it on for " (ago(instance.updated_at_ms).trim_end_matches(" ago")) }
            "."
            @if instance.status == Status::Failed {
                " A step of it was dead-lettered: "
                a href={ "/ui/dead-letters?route=" (urlencode(&plugin)) } { "its route's dead letters" }
                "; a replay that succeeds makes it running again."
            }
        }
        dl.facts {
            dt { "Steps" } dd { (instance.version) }
            dt { "Started" } dd { (when(instance.started_at_ms)) " (" (ago(instance.started_at_ms)) ")" }
            dt { "Last step" } dd { (instance.last_type) ", " (when(instance.updated_at_ms)) " (" (ago(instance.updated_at_ms)) ")" }
            dt { "Written by" } dd { (plugin) "@" (instance.plugin_version) }
        }
        section.state {
            h2 { "State" }
            @if state.is_empty() { p.empty { "Empty." } } @else {
                dl.facts { @for (k, v) in &state { dt { (k) } dd { pre { (value_text(v)) } } } }
            }
        }
        @if !timeouts.is_empty() {
            section.timeouts {
                h2 { "Pending timeouts" }
                table {
                    thead { tr { th { "Due" } th { "Type" } th { "Id" } th { "Sent" } } }
                    tbody {
                        @for t in &timeouts {
                            tr {
                                td { (when(t.due_ms)) }
                                td { (t.message_type) }
                                td { code { (t.id) } }
                                td { @match t.fired_at_ms { Some(at) => { (t.sends) " time(s), last " (when(at)) } None => { "not yet" } } }
                            }
                        }
                    }
                }
            }
        }
        section.steps {
            h2 { "Steps" }
            (steps_markup(&plugin, &steps))
        }
    };
    let title = format!("Saga {plugin} · {id}");
    html_response(StatusCode::OK, layout(&inner, &page, &title, "sagas", body))
}

/// A state value: JSON pretty-printed, text as it is, bytes in hex.
fn value_text(v: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(v) {
        Ok(j @ (serde_json::Value::Object(_) | serde_json::Value::Array(_))) => {
            serde_json::to_string_pretty(&j).unwrap_or_else(|_| saga::shown_value(v))
        }
        _ => saga::shown_value(v),
    }
}

/// What a step changed: each key with its value before and after the
/// step (`None`: there was none, or it was deleted).
type Diff<'a> = Vec<(&'a str, Option<&'a str>, Option<&'a str>)>;

/// Each step's changes against the state the steps before it left.
fn diffs(steps: &[Step]) -> Vec<Diff<'_>> {
    let mut current: BTreeMap<&str, &str> = BTreeMap::new();
    steps
        .iter()
        .map(|s| {
            s.changes
                .iter()
                .map(|(k, after)| {
                    let before = match after {
                        Some(a) => current.insert(k, a),
                        None => current.remove(k.as_str()),
                    };
                    (k.as_str(), before, after.as_deref())
                })
                .collect()
        })
        .collect()
}

/// The steps, oldest first, each with the message that made it, every key
/// it changed (the value before and after), and what it sent.
fn steps_markup(plugin: &str, steps: &[Step]) -> Markup {
    let diffs = diffs(steps);
    html! {
        ol.steps {
            @for (s, diff) in steps.iter().zip(&diffs) {
                li.step data-version=(s.version()) {
                    div.step-head {
                        span.num { "#" (s.version()) } " "
                        time title=(when(s.at_ms)) { (crate::story::time(s.at_ms)) } " "
                        strong { (s.message_type) } " "
                        a href={ "/ui/messages?q=" (urlencode(&s.message_id)) } { code { (s.message_id) } } " "
                        span.small { "by " (plugin) "@" (s.plugin_version) }
                        @if let Some(f) = &s.fired { " " span.small { "(timeout " (f) " fired)" } }
                        @if s.completed { " " span.status.completed { "completed the instance" } }
                    }
                    @if !diff.is_empty() {
                        table.diff {
                            tbody {
                                @for (k, before, after) in diff {
                                    tr class=(change_class(*before, *after)) {
                                        th { (k) }
                                        td.before { @match before { Some(b) => { del { (crate::text::clip(b, 2000)) } } None => { span.small { "(none)" } } } }
                                        td.after { @match after { Some(a) => { ins { (crate::text::clip(a, 2000)) } } None => { span.small { "(deleted)" } } } }
                                    }
                                }
                            }
                        }
                    }
                    @if !s.outputs.is_empty() || !s.timeouts.is_empty() {
                        p.small {
                            @for (i, o) in s.outputs.iter().enumerate() {
                                @if i > 0 { ", " }
                                (if o.command { "sent " } else { "published " }) (o.message_type) " "
                                a href={ "/ui/messages?q=" (urlencode(&o.id)) } { (o.id) }
                            }
                            @for t in &s.timeouts {
                                " · timeout " (t.message_type) " due " (when(t.due_ms))
                            }
                        }
                    }
                }
            }
        }
    }
}

fn change_class(before: Option<&str>, after: Option<&str>) -> &'static str {
    match (before, after) {
        (None, Some(_)) => "added",
        (_, None) => "removed",
        _ => "changed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(changes: &[(&str, Option<&str>)]) -> Step {
        Step {
            instance: "A-1".into(),
            read_version: 0,
            message_id: "m".into(),
            message_type: "T".into(),
            at_ms: 0,
            started_at_ms: 0,
            plugin_version: "1".into(),
            completed: false,
            changes: changes
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned)))
                .collect(),
            outputs: Vec::new(),
            timeouts: Vec::new(),
            fired: None,
        }
    }

    #[test]
    fn each_step_is_shown_against_the_state_before_it() {
        let steps = [
            step(&[("status", Some("placed")), ("total", Some("12"))]),
            step(&[("status", Some("paid"))]),
            step(&[("total", None), ("status", Some("shipped"))]),
        ];
        let d = diffs(&steps);
        assert_eq!(
            d[0],
            vec![
                ("status", None, Some("placed")),
                ("total", None, Some("12"))
            ]
        );
        assert_eq!(d[1], vec![("status", Some("placed"), Some("paid"))]);
        assert_eq!(
            d[2],
            vec![
                ("status", Some("paid"), Some("shipped")),
                ("total", Some("12"), None)
            ]
        );
    }
}
