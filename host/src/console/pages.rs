//! The overview and the plugins page.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use maud::{Markup, html};

use super::{Inner, Page, Shared, ago, html_response, layout, signed_in, signed_in_form};
use crate::dlq::{Filter, Status};
use crate::supervisor::{ChangeError, RouteInfo};

pub(super) async fn overview(State(inner): State<Shared>, headers: HeaderMap) -> Response {
    let page = match signed_in(&inner, &headers, "/ui") {
        Ok(p) => p,
        Err(r) => return r,
    };
    let live = live(&inner).await;
    let body = html! {
        p.lead {
            "Routes, what they handled and failed over the last hour, and what waits in the dead-letter store. "
            "This page refreshes itself every 5 seconds."
        }
        div #live data-refresh="/ui/live/overview" data-every="5" { (live) }
    };
    html_response(
        StatusCode::OK,
        layout(&inner, &page, "Overview", "overview", body),
    )
}

/// The part of the overview that refreshes itself.
pub(super) async fn overview_live(State(inner): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(r) = super::signed_in_fragment(&inner, &headers) {
        return r;
    }
    html_response(StatusCode::OK, live(&inner).await)
}

async fn live(inner: &Inner) -> Markup {
    let routes = inner.control.list().await;
    let (rates, window) = inner.rates();
    let window_min = (window.as_secs() / 60).max(1);
    let get = |metric: &str, route: &str| {
        rates
            .get(&(format!("switchyard.messages.{metric}"), route.to_owned()))
            .copied()
            .unwrap_or((0.0, 0.0))
    };
    let store = inner.control.services().dead_letters.clone();
    let counts = store.counts().await;
    let dead_by_route: BTreeMap<String, u64> = match store
        .groups(&Filter {
            statuses: vec![Status::Dead],
            ..Filter::default()
        })
        .await
    {
        Ok(groups) => groups.into_iter().fold(BTreeMap::new(), |mut m, g| {
            *m.entry(g.route).or_insert(0) += g.count;
            m
        }),
        Err(_) => BTreeMap::new(),
    };
    let journal = match &inner.journal {
        Some(j) => Some((j.location(), j.count().await)),
        None => None,
    };
    let sagas = super::sagas::counts(inner).await;
    let transport = inner.control.transport();
    html! {
        table.routes {
            caption { "Routes" }
            thead {
                tr {
                    th { "Route" } th { "Version" } th { "Since" }
                    th.num { "Handled (" (window_min) " min)" }
                    th.num { "Failed tries (" (window_min) " min)" }
                    th.num { "In flight" }
                    th.num { "Dead letters" }
                }
            }
            tbody {
                @for r in &routes {
                    @let handled = get("handled", &r.plugin);
                    @let failed = get("failed", &r.plugin);
                    @let in_flight = get("in_flight", &r.plugin);
                    @let dead = dead_by_route.get(&r.plugin).copied().unwrap_or(0);
                    tr data-route=(r.plugin) {
                        td { a href="/ui/plugins" { (r.plugin) } }
                        td { (r.version) " " span.digest title=(r.digest) { (short_digest(&r.digest)) } }
                        td { (ago(r.loaded_at_ms)) }
                        td.num.handled title={ (handled.0) " since the host started" } { (handled.1) }
                        td.num.failed.bad[failed.1 > 0.0] title={ (failed.0) " since the host started" } { (failed.1) }
                        td.num { (in_flight.0) }
                        td.num.bad[dead > 0] {
                            @if dead > 0 {
                                a href={ "/ui/dead-letters?route=" (urlencode(&r.plugin)) } { (dead) }
                            } @else { "0" }
                        }
                    }
                }
            }
        }
        section.cards {
            div.card {
                h2 { "Dead letters" }
                @match &counts {
                    Ok(counts) => {
                        dl {
                            @for (status, n) in counts {
                                dt { (status.as_str()) } dd data-status=(status.as_str()) { (n) }
                            }
                        }
                        p { a href="/ui/dead-letters" { "Failure groups" } }
                    }
                    Err(e) => p.error { "Cannot read the dead-letter store: " (format!("{e:#}")) }
                }
            }
            @if let Some(sagas) = &sagas {
                div.card.sagas {
                    h2 { "Sagas" }
                    @match sagas {
                        Ok(list) => {
                            table {
                                thead { tr { th { "Saga" } th.num { "Running" } th.num { "Stuck" } th.num { "Failed" } } }
                                tbody {
                                    @for (plugin, [running, failed, stuck]) in list {
                                        @let base = format!("/ui/sagas?plugin={}", urlencode(plugin));
                                        tr data-saga=(plugin) {
                                            td { a href=(base) { (plugin) } }
                                            td.num { (super::sagas::shown_count(*running)) }
                                            td.num.bad[*stuck > 0] { a href={ (base) "&stuck=15m" } { (super::sagas::shown_count(*stuck)) } }
                                            td.num.bad[*failed > 0] { a href={ (base) "&status=failed" } { (super::sagas::shown_count(*failed)) } }
                                        }
                                    }
                                }
                            }
                            p.small { "Stuck: running, with no step for 15 minutes." }
                        }
                        Err(e) => p.error { "Cannot read the state store: " (format!("{e:#}")) }
                    }
                }
            }
            div.card {
                h2 { "Transport" }
                p { (transport.kind()) } p.small { (transport.location()) }
            }
            div.card {
                h2 { "Journal" }
                @match &journal {
                    Some((location, Ok(n))) => { p { (n) " records" } p.small { (location) } p { a href="/ui/messages" { "Find a message" } } }
                    Some((location, Err(e))) => { p.error { "Cannot read " (location) ": " (format!("{e:#}")) } }
                    None => { p { "Off: messages leave no record (" code { "[journal] enabled = false" } ", or the journal could not be opened)." } }
                }
            }
            div.card {
                h2 { "Host" }
                p { (inner.control.services().host) } p.small { "console up " (humantime::format_duration(std::time::Duration::from_secs(inner.started.elapsed().as_secs()))) }
            }
        }
    }
}

pub(super) fn short_digest(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex).to_owned()
}

/// `s` encoded for a query string's value.
pub(super) fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `s` encoded as one segment of a path: as in a query string, but with a
/// space as `%20` (a `+` in a path is a plus sign).
pub(super) fn path_segment(s: &str) -> String {
    urlencode(s).replace('+', "%20")
}

pub(super) async fn plugins(State(inner): State<Shared>, headers: HeaderMap) -> Response {
    let page = match signed_in(&inner, &headers, "/ui/plugins") {
        Ok(p) => p,
        Err(r) => return r,
    };
    let routes = inner.control.list().await;
    let deployments = inner.control.deployments();
    let fleet = inner.fleet.as_ref().map(|rx| rx.borrow().clone());
    let body = html! {
        p.lead { "What each route runs, and the versions deployed to it through the admin API (newest last)." }
        @match &fleet {
            None => {}
            Some(None) => p.small { "This host follows a fleet ([fleet]) and has not read it yet." }
            Some(Some(view)) => {
                section.fleet data-fleet="pipeline" {
                    h2 { "Fleet" }
                    p.small {
                        "This host is " code { (view.host) } "; "
                        (view.hosts.iter().filter(|h| h.live()).count()) " live host(s), read " (ago(view.at_ms)) ". "
                        "See " code { "switchyard deploy --status" } " and " code { "switchyard fleet history" } "."
                    }
                    @if view.desired.contains_key(crate::fleet::PIPELINE_FILE) {
                        (fleet_rollout(view, crate::fleet::PIPELINE_FILE))
                    }
                }
            }
        }
        @for r in &routes {
            section.plugin id=(r.plugin) data-plugin=(r.plugin) {
                h2 { (r.plugin) " " span.version { (r.version) } }
                (route_facts(r))
                @if let Some(Some(view)) = &fleet {
                    (fleet_rollout(view, &r.plugin))
                }
                @match deployments.history(&r.plugin) {
                    Ok(history) if !history.is_empty() => {
                        table {
                            caption { "Deployments" }
                            thead { tr { th { "Version" } th { "Digest" } th { "Deployed" } th.num { "Bytes" } } }
                            tbody {
                                @for d in &history {
                                    tr { td { (d.version) } td.digest title=(d.digest) { (short_digest(&d.digest)) } td { (super::when(d.deployed_at_ms)) } td.num { (d.size) } }
                                }
                            }
                        }
                        form method="post" action={ "/ui/plugins/" (path_segment(&r.plugin)) "/rollback" } {
                            input type="hidden" name="csrf" value=(page.session.csrf);
                            button type="submit" { "Roll back to the version before" }
                        }
                    }
                    Ok(_) => p.small { "Runs the component the pipeline file names; nothing deployed." }
                    Err(e) => p.error { "Cannot read the deployments: " (format!("{e:#}")) }
                }
            }
        }
    };
    html_response(
        StatusCode::OK,
        layout(&inner, &page, "Plugins", "plugins", body),
    )
}

/// How the fleet's last deploy of `item` (a plugin, or the pipeline file)
/// is rolling out: its state, and what each live host runs.
fn fleet_rollout(view: &crate::fleet::FleetView, item: &str) -> Markup {
    let shown = if item == crate::fleet::PIPELINE_FILE {
        "The pipeline file"
    } else {
        "Fleet"
    };
    let Some(d) = view.desired.get(item) else {
        return html! { p.small data-rollout=(item) { (shown) ": nothing deployed to the fleet; each host runs its own." } };
    };
    let live: Vec<&crate::fleet::HostReport> = view.hosts.iter().filter(|h| h.live()).collect();
    let runs = |h: &crate::fleet::HostReport| -> Option<String> {
        if item == crate::fleet::PIPELINE_FILE {
            h.pipeline.clone()
        } else {
            h.running.get(item).map(|r| r.digest.clone())
        }
    };
    let on = live
        .iter()
        .filter(|h| {
            d.digest_for(&h.host)
                .is_none_or(|w| runs(h).as_deref() == Some(w))
        })
        .count();
    html! {
        table.rollout data-rollout=(item) data-state=(d.state.as_str()) {
            caption {
                (shown) ": deploy #" (d.seq) " of " (d.version) " " span.digest title=(d.digest) { (short_digest(&d.digest)) }
                ", " (d.state.as_str()) ", " (ago(d.at_ms)) " · "
                span.converged { (on) " of " (live.len()) " live host(s) run what it wants" }
            }
            @if d.state == crate::fleet::RolloutState::Canary {
                tr { td colspan="3" {
                    "Canary on " (d.canary.join(", "))
                    @if let Some(until) = d.watch_until_ms { " until " (super::when(until)) }
                    "; the other hosts run " (d.previous.as_deref().map_or("-".to_owned(), short_digest)) "."
                } }
            }
            @if let Some(v) = &d.verdict {
                tr { td colspan="3" { (v) } }
            }
            thead { tr { th { "Host" } th { "Runs" } th { "Problem" } } }
            tbody {
                @for h in &live {
                    @let want = d.digest_for(&h.host);
                    @let has = runs(h);
                    tr data-host=(h.host) .bad[want.is_some_and(|w| has.as_deref() != Some(w))] {
                        td { (h.host) }
                        td { (has.as_deref().map_or("its own".to_owned(), short_digest)) }
                        td { (h.problem.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
    }
}

fn route_facts(r: &RouteInfo) -> Markup {
    html! {
        dl.facts {
            dt { "Digest" } dd.digest { (r.digest) }
            dt { "Source" } dd { (r.source) " · " (r.path) }
            dt { "Running since" } dd { (super::when(r.loaded_at_ms)) " (" (ago(r.loaded_at_ms)) ")" }
            dt { "Swaps" } dd { (r.swaps) }
            @if let Some(p) = &r.pending {
                dt { "Waiting to take over" } dd { (p.version) " " span.digest { (short_digest(&p.digest)) } }
            }
        }
    }
}

pub(super) async fn rollback(
    State(inner): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (page, _): (Page, _) = match signed_in_form(&inner, &headers, body).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let message = match inner.control.rollback(&name).await {
        Ok(info) => {
            tracing::info!(plugin = %name, version = %info.version, "Console: rolled back");
            format!(
                "{name} rolled back: it now runs {} ({}).",
                info.version,
                short_digest(&info.digest)
            )
        }
        Err(
            e @ (ChangeError::UnknownPlugin(_) | ChangeError::Refused(_) | ChangeError::Failed(_)),
        ) => {
            format!("{name} was not rolled back: {e}")
        }
    };
    inner.flash_and_go(&page, message, "/ui/plugins")
}
