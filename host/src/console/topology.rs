//! The topology page: which plugin handles, consumes, sends and publishes
//! which message type, drawn as a graph (an SVG laid out here, in columns
//! from the types nothing in the pipeline produces) and listed as a table.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use maud::{Markup, html};

use super::pages::urlencode;
use super::{Shared, html_response, layout, signed_in};
use crate::envelope::Kind;
use crate::plugin::PluginInfo;

/// A node of the graph: a plugin or a message type.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Node {
    Plugin(String),
    Type(String),
}

/// An edge: type → plugin (handles, consumes) or plugin → type (sends,
/// publishes).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Edge {
    from: Node,
    to: Node,
    verb: &'static str,
}

/// Who does what with each message type.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Uses {
    pub kind: Option<Kind>,
    pub handled_by: BTreeSet<String>,
    pub produced_by: BTreeSet<String>,
}

/// The graph of the running routes' contracts.
#[derive(Debug, Default)]
pub(super) struct Graph {
    pub types: BTreeMap<String, Uses>,
    edges: Vec<Edge>,
    plugins: Vec<String>,
}

impl Graph {
    pub(super) fn of(contracts: &[(String, PluginInfo)]) -> Self {
        let mut g = Graph::default();
        for (name, info) in contracts {
            g.plugins.push(name.clone());
            for (t, k) in &info.handles {
                let u = g.types.entry(t.clone()).or_default();
                u.kind = Some(*k);
                u.handled_by.insert(name.clone());
                g.edges.push(Edge {
                    from: Node::Type(t.clone()),
                    to: Node::Plugin(name.clone()),
                    verb: if *k == Kind::Command {
                        "handles"
                    } else {
                        "consumes"
                    },
                });
            }
            for (list, kind, verb) in [
                (&info.sends, Kind::Command, "sends"),
                (&info.publishes, Kind::Event, "publishes"),
            ] {
                for t in list {
                    let u = g.types.entry(t.clone()).or_default();
                    u.kind.get_or_insert(kind);
                    u.produced_by.insert(name.clone());
                    g.edges.push(Edge {
                        from: Node::Plugin(name.clone()),
                        to: Node::Type(t.clone()),
                        verb,
                    });
                }
            }
        }
        g
    }

    /// The column of each node: the types no plugin produces first, then
    /// each node one column right of the first node that leads to it.
    /// Nodes only a cycle reaches start a column of their own at 0.
    fn columns(&self) -> BTreeMap<Node, usize> {
        let mut column: BTreeMap<Node, usize> = BTreeMap::new();
        let mut queue: VecDeque<Node> = VecDeque::new();
        let start = |n: Node, column: &mut BTreeMap<Node, usize>, queue: &mut VecDeque<Node>| {
            if !column.contains_key(&n) {
                column.insert(n.clone(), 0);
                queue.push_back(n);
            }
        };
        for (t, u) in &self.types {
            if u.produced_by.is_empty() {
                start(Node::Type(t.clone()), &mut column, &mut queue);
            }
        }
        let mut all: Vec<Node> = self.plugins.iter().cloned().map(Node::Plugin).collect();
        all.extend(self.types.keys().cloned().map(Node::Type));
        let mut rest = all.into_iter();
        loop {
            while let Some(n) = queue.pop_front() {
                let c = column.get(&n).copied().unwrap_or(0);
                for e in self.edges.iter().filter(|e| e.from == n) {
                    if !column.contains_key(&e.to) {
                        column.insert(e.to.clone(), c + 1);
                        queue.push_back(e.to.clone());
                    }
                }
            }
            match rest.find(|n| !column.contains_key(n)) {
                Some(n) => start(n, &mut column, &mut queue),
                None => return column,
            }
        }
    }
}

/// Where each node is drawn.
struct Placed {
    x: f64,
    y: f64,
}

const COLUMN_WIDTH: f64 = 210.0;
const ROW_HEIGHT: f64 = 56.0;
const NODE_WIDTH: f64 = 160.0;
const NODE_HEIGHT: f64 = 32.0;
const MARGIN: f64 = 16.0;

/// The graph as SVG: plugins as boxes, commands and events as tags of
/// their own colour, produced types' edges dashed.
fn svg(g: &Graph) -> Markup {
    let columns = g.columns();
    let mut by_column: BTreeMap<usize, Vec<&Node>> = BTreeMap::new();
    for (n, c) in &columns {
        by_column.entry(*c).or_default().push(n);
    }
    let mut placed: BTreeMap<&Node, Placed> = BTreeMap::new();
    let mut rows = 0usize;
    for (c, nodes) in &by_column {
        rows = rows.max(nodes.len());
        for (i, n) in nodes.iter().enumerate() {
            placed.insert(
                n,
                Placed {
                    x: MARGIN + *c as f64 * COLUMN_WIDTH,
                    y: MARGIN + i as f64 * ROW_HEIGHT,
                },
            );
        }
    }
    let width = MARGIN * 2.0 + by_column.len().max(1) as f64 * COLUMN_WIDTH;
    let height = MARGIN * 2.0 + rows.max(1) as f64 * ROW_HEIGHT;
    let view_box = format!("0 0 {width} {height}");
    let paths: Vec<(String, &'static str, &'static str)> = g
        .edges
        .iter()
        .filter_map(|e| {
            let (a, b) = (placed.get(&e.from)?, placed.get(&e.to)?);
            let (x1, y1) = (a.x + NODE_WIDTH, a.y + NODE_HEIGHT / 2.0);
            let (x2, y2) = (b.x, b.y + NODE_HEIGHT / 2.0);
            let d = if x2 > x1 {
                let mid = (x1 + x2) / 2.0;
                format!("M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}")
            } else {
                // Back to an earlier column: around, below the nodes.
                let low = y1.max(y2) + ROW_HEIGHT * 0.6;
                format!(
                    "M{x1},{y1} C{},{y1} {},{low} {},{low} S{},{y2} {x2},{y2}",
                    x1 + 40.0,
                    x1 + 20.0,
                    (x1 + x2) / 2.0,
                    x2 - 40.0
                )
            };
            let class = if matches!(e.from, Node::Plugin(_)) {
                "edge produced"
            } else {
                "edge taken"
            };
            Some((d, class, e.verb))
        })
        .collect();
    html! {
        svg.topology xmlns="http://www.w3.org/2000/svg" viewBox=(view_box) width=(width) height=(height) role="img" aria-label="The pipeline's message flow" {
            defs {
                marker #arrow viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                    // Inside SVG an element is closed only by its end tag.
                    path d="M0,0 L10,5 L0,10 z" class="arrowhead" {}
                }
            }
            @for (d, class, verb) in &paths {
                path class=(class) d=(d) marker-end="url(#arrow)" { title { (verb) } }
            }
            @for (n, p) in &placed {
                @let (label, class, href) = match n {
                    Node::Plugin(name) => (name.as_str(), "node plugin", format!("/ui/plugins#{}", urlencode(name))),
                    Node::Type(t) => (t.as_str(), match g.types.get(t).and_then(|u| u.kind) {
                        Some(Kind::Command) => "node command",
                        _ => "node event",
                    }, format!("#type-{}", urlencode(t))),
                };
                a href=(href) {
                    g class=(class) data-node=(label) {
                        rect x=(p.x) y=(p.y) width=(NODE_WIDTH) height=(NODE_HEIGHT) rx=(if class == "node plugin" { 3 } else { 14 }) {}
                        text x=(p.x + NODE_WIDTH / 2.0) y=(p.y + NODE_HEIGHT / 2.0 + 5.0) text-anchor="middle" {
                            (crate::text::clip(label, 22))
                        }
                    }
                }
            }
        }
    }
}

pub(super) async fn page(State(inner): State<Shared>, headers: HeaderMap) -> Response {
    let page = match signed_in(&inner, &headers, "/ui/topology") {
        Ok(p) => p,
        Err(r) => return r,
    };
    let g = Graph::of(&inner.control.contracts());
    let body = html! {
        p.lead {
            "Who handles, consumes, sends and publishes each message type, as the running plugins declare in "
            code { "describe()" } ". A command has one handler; an event any number of consumers."
        }
        p.legend.small {
            span.key.plugin { "plugin" } " " span.key.command { "command" } " " span.key.event { "event" }
            " · solid: delivered to · dashed: sent or published by"
        }
        div.graph { (svg(&g)) }
        table.types {
            thead { tr { th { "Type" } th { "Kind" } th { "Sent or published by" } th { "Handled or consumed by" } } }
            tbody {
                @for (t, u) in &g.types {
                    tr id=(format!("type-{}", urlencode(t))) data-type=(t) {
                        td { (t) }
                        td { @match u.kind { Some(k) => (k.as_str()), None => "?" } }
                        td { @if u.produced_by.is_empty() { span.small { "from outside the pipeline" } } @else { (join(&u.produced_by)) } }
                        td {
                            @if u.handled_by.is_empty() {
                                @if u.kind == Some(Kind::Command) {
                                    span.bad { "nobody: sending it fails" }
                                } @else {
                                    span.small { "nobody here" }
                                }
                            } @else { (join(&u.handled_by)) }
                        }
                    }
                }
            }
        }
        p.small { code { "switchyard topology -p PIPELINE" } " prints the same graph as Mermaid." }
    };
    html_response(
        StatusCode::OK,
        layout(&inner, &page, "Topology", "topology", body),
    )
}

fn join(names: &BTreeSet<String>) -> String {
    names.iter().cloned().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(handles: &[(&str, Kind)], sends: &[&str], publishes: &[&str]) -> PluginInfo {
        PluginInfo {
            name: String::new(),
            version: "1".into(),
            handles: handles.iter().map(|(t, k)| ((*t).into(), *k)).collect(),
            publishes: publishes.iter().map(|t| (*t).into()).collect(),
            sends: sends.iter().map(|t| (*t).into()).collect(),
        }
    }

    #[test]
    fn columns_follow_the_flow_and_survive_a_cycle() {
        let g = Graph::of(&[
            (
                "orders".into(),
                info(
                    &[("PlaceOrder", Kind::Command)],
                    &["ChargePayment"],
                    &["OrderPlaced"],
                ),
            ),
            (
                "payments".into(),
                info(
                    &[("ChargePayment", Kind::Command)],
                    &[],
                    &["PaymentCaptured"],
                ),
            ),
            // A saga that hears back from what it started.
            (
                "saga".into(),
                info(
                    &[("OrderPlaced", Kind::Event), ("Shipped", Kind::Event)],
                    &["Ship"],
                    &[],
                ),
            ),
            (
                "shipping".into(),
                info(&[("Ship", Kind::Command)], &[], &["Shipped"]),
            ),
        ]);
        let c = g.columns();
        let at = |n: Node| c[&n];
        assert_eq!(at(Node::Type("PlaceOrder".into())), 0);
        assert_eq!(at(Node::Plugin("orders".into())), 1);
        assert_eq!(at(Node::Type("ChargePayment".into())), 2);
        assert_eq!(at(Node::Plugin("payments".into())), 3);
        assert_eq!(at(Node::Plugin("saga".into())), 3);
        assert_eq!(at(Node::Type("Ship".into())), 4);
        assert_eq!(at(Node::Plugin("shipping".into())), 5);
        assert_eq!(at(Node::Type("Shipped".into())), 6);
        assert_eq!(c.len(), 10, "every node placed: {c:?}");
        assert_eq!(
            g.types["Shipped"].produced_by,
            BTreeSet::from(["shipping".to_owned()])
        );
        assert_eq!(g.types["Ship"].kind, Some(Kind::Command));
    }

    #[test]
    fn a_pipeline_that_is_only_a_cycle_is_still_drawn() {
        let g = Graph::of(&[
            ("a".into(), info(&[("X", Kind::Event)], &[], &["Y"])),
            ("b".into(), info(&[("Y", Kind::Event)], &[], &["X"])),
        ]);
        assert_eq!(g.columns().len(), 4);
    }
}
