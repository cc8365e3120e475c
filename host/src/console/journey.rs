//! A message's journey: the story `switchyard why` tells, as a page.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use maud::{Markup, html};

use super::pages::{path_segment, short_digest, urlencode};
use super::{Inner, Shared, html_response, layout, signed_in, when};
use crate::journal::Outcome;
use crate::story::{self, Story};

pub(super) async fn search(
    State(inner): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let query = q.get("q").map(|s| s.trim().to_owned()).unwrap_or_default();
    let by_flow = q.get("by").is_some_and(|b| b == "correlation");
    let here = format!(
        "/ui/messages?q={}{}",
        urlencode(&query),
        if by_flow { "&by=correlation" } else { "" }
    );
    let page = match signed_in(&inner, &headers, &here) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let form = html! {
        form.search method="get" action="/ui/messages" role="search" {
            label for="q" { "Message id, dead-letter id, correlation id, or NAME=VALUE of a span attribute (order.id=A-1001)" }
            input #q type="search" name="q" value=(query) placeholder="an id, or the start of one" required;
            label.check { input type="checkbox" name="by" value="correlation" checked[by_flow]; " a whole flow (correlation id)" }
            button type="submit" { "Find" }
        }
    };
    let result = if query.is_empty() {
        html! {}
    } else {
        match &inner.journal {
            None => {
                html! { p.error { "This host keeps no journal, so there is no journey to show." } }
            }
            Some(journal) => {
                let letters = inner.control.services().dead_letters.clone();
                let searched = vec![journal.location(), "the dead-letter store".to_owned()];
                let attribute = if by_flow {
                    None
                } else {
                    story::attribute_query(&query)
                };
                if let Some((name, value)) = attribute {
                    let result = match story::by_attribute(journal.as_ref(), name, value).await {
                        Ok(found) if found.len() == 1 => {
                            match story::flow(
                                journal.as_ref(),
                                letters.as_ref(),
                                &found[0].flow,
                                searched.clone(),
                            )
                            .await
                            {
                                Ok(s) if !s.messages.is_empty() => html! {
                                    p.small { "The one flow in which a plugin set " code { (name) } " = " code { (value) } ":" }
                                    (told(&inner, s).await)
                                },
                                Ok(_) => {
                                    html! { p.empty { "The flow is no longer in the journal." } }
                                }
                                Err(e) => html! { p.error role="alert" { (format!("{e:#}")) } },
                            }
                        }
                        Ok(found) if found.is_empty() => html! {
                            p.empty role="status" {
                                "No plugin set " code { (name) } " = " code { (value) } " on a message the journal holds. Searched: " (journal.location()) "."
                            }
                        },
                        Ok(found) => html! {
                            p { code { (name) } " = " code { (value) } " was set in " (found.len()) " flows, the most recent first:" }
                            table.flows {
                                thead { tr { th { "Last set" } th { "Message" } th { "By" } th { "Outcome" } th { "Flow" } } }
                                tbody {
                                    @for f in &found {
                                        @let r = &f.handlings[0];
                                        tr data-flow=(f.flow) {
                                            td { (story::time(r.at_ms)) }
                                            td { (r.message_type) " " a href={ "/ui/messages?q=" (urlencode(&r.message_id)) } { code { (r.message_id) } } }
                                            td { (r.plugin) "@" (r.plugin_version) }
                                            td { (r.outcome.as_str()) }
                                            td { a href={ "/ui/messages?by=correlation&q=" (urlencode(&f.flow)) } { "the whole flow" } }
                                        }
                                    }
                                }
                            }
                        },
                        Err(e) => html! { p.error role="alert" { (format!("{e:#}")) } },
                    };
                    let body = html! { (form) (result) };
                    return html_response(
                        StatusCode::OK,
                        layout(&inner, &page, "Messages", "messages", body),
                    );
                }
                let found = if by_flow {
                    story::flow(journal.as_ref(), letters.as_ref(), &query, searched.clone())
                        .await
                        .map(Some)
                } else {
                    match story::resolve(journal.as_ref(), letters.as_ref(), &query).await {
                        Ok(Some(id)) => story::message(
                            journal.as_ref(),
                            letters.as_ref(),
                            &id,
                            searched.clone(),
                        )
                        .await
                        .map(Some),
                        Ok(None) => {
                            // Not a message: perhaps a flow.
                            story::flow(
                                journal.as_ref(),
                                letters.as_ref(),
                                &query,
                                searched.clone(),
                            )
                            .await
                            .map(|s| (!s.messages.is_empty()).then_some(s))
                        }
                        Err(e) => Err(e),
                    }
                };
                match found {
                    Ok(Some(s)) if !s.messages.is_empty() => told(&inner, s).await,
                    Ok(_) => html! {
                        p.empty role="status" {
                            "Nothing is known of " code { (query) } ". Searched: " (searched.join("; ")) "."
                        }
                    },
                    Err(e) => html! { p.error role="alert" { (format!("{e:#}")) } },
                }
            }
        }
    };
    let body = html! { (form) (result) };
    html_response(
        StatusCode::OK,
        layout(&inner, &page, "Messages", "messages", body),
    )
}

fn outcome_class(o: Outcome) -> &'static str {
    match o {
        Outcome::Handled | Outcome::Duplicate => "ok",
        Outcome::RetriedLater => "waiting",
        Outcome::DeadLettered => "bad",
        Outcome::SagaNotFound => "ignored",
    }
}

/// The story with the saga steps its messages drove, when the host keeps
/// state, as a timeline.
async fn told(inner: &Inner, mut s: Story) -> Markup {
    let mut note = None;
    if let Some(reader) = super::sagas::reader(inner)
        && let Err(e) = story::add_saga_steps(&mut s, reader).await
    {
        note = Some(format!("Saga steps are not shown: {e:#}"));
    }
    html! {
        @if let Some(n) = note { p.error role="alert" { (n) } }
        (journey(&s))
    }
}

/// The story as a timeline: each message under the one that caused it,
/// each handling with its plugin@version, tries and outcome.
fn journey(s: &Story) -> Markup {
    let depth = story::depths(&s.messages);
    let subject = s.messages.iter().find(|n| n.id == s.subject);
    html! {
        section.summary {
            @if let Some(n) = subject {
                p.now { strong { (n.message_type) } " " code { (n.id) } ": " (story::now_line(n, None)) "." }
                @if let Some(root) = s.messages.first().filter(|r| r.id != n.id) {
                    p { "Part of the flow started by " a href={ "/ui/messages?q=" (urlencode(&root.id)) } { (root.message_type) " " (root.id) } "." }
                }
            } @else {
                p.now { "Flow " code { (s.subject) } ": " (s.messages.len()) " messages." }
            }
            @for c in s.unknown_causes.iter().take(1) {
                p.small { "Caused by " code { (c) } ", which the journal does not hold (sent from outside, or pruned)." }
            }
            @if s.truncated { p.small { "Cut at " (story::MAX_MESSAGES) " messages." } }
        }
        ol.journey {
            @for n in &s.messages {
                @let d = depth.get(n.id.as_str()).copied().unwrap_or(0).min(8);
                li class={ "hop depth-" (d) @if n.id == s.subject { " subject" } } data-message=(n.id) {
                    div.hop-head {
                        span.type { (n.message_type) } " "
                        a href={ "/ui/messages?q=" (urlencode(&n.id)) } { code { (n.id) } } " "
                        span.small { (n.kind) }
                        @for d in &n.dead_letters {
                            " " a.letter href={ "/ui/dead-letters/" (path_segment(&d.id)) } { "dead letter " (d.status) }
                        }
                    }
                    ul.handlings {
                        @for r in &n.handlings {
                            li class={ "handling " (outcome_class(r.outcome)) } {
                                time title=(when(r.at_ms)) { (story::time(r.at_ms)) } " "
                                (story::handling_line(r))
                                @if !r.failures.is_empty() {
                                    ul.tries {
                                        @for t in &r.failures {
                                            li { "attempt " (t.number) " (" (story::duration_us(t.duration_us)) "): " span.kind { (t.error_kind) } " " (t.error) " → " (t.then) }
                                        }
                                    }
                                }
                                @if let Some(e) = r.error.as_ref().filter(|_| r.failures.is_empty()) {
                                    p.small { span.kind { (e.kind) } @if let Some(c) = &e.code { " (" (c) ")" } ": " (e.message) }
                                }
                                @if !r.sent.is_empty() || r.replied {
                                    p.small { "sent "
                                        @for (i, m) in r.sent.iter().enumerate() {
                                            @if i > 0 { ", " }
                                            (m.message_type) " " a href={ "/ui/messages?q=" (urlencode(&m.id)) } { (m.id) }
                                        }
                                        @if r.replied { @if !r.sent.is_empty() { ", " } "a reply" }
                                    }
                                }
                                p.small.ids {
                                    "digest " span.digest title=(r.plugin_digest) { (short_digest(&r.plugin_digest)) }
                                    @if let Some(t) = &r.trace_id { " · trace " code { (t) } }
                                    " · host " (r.host)
                                    @if let Some(i) = &r.saga_instance { " · saga instance " (i) }
                                }
                                @if r.outcome == Outcome::Handled {
                                    @for d in n.saga_steps.iter().filter(|d| d.plugin == r.plugin && Some(&d.step.instance) == r.saga_instance.as_ref()) {
                                        div.step {
                                            p.small {
                                                a href=(super::sagas::instance_href(&d.plugin, &d.step.instance)) { (story::step_line(d)) }
                                            }
                                            ul.effects {
                                                @for line in d.step.effects(story::time, false) { li { code { (line) } } }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
