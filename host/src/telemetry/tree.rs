//! `--trace-stdout`: prints each trace as a tree once it has been quiet for
//! a moment, to follow a flow locally without a tracing backend.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::Value;
use opentelemetry::trace::{SpanId, SpanKind, Status, TraceId};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// How long a trace must go without new spans before it is printed.
const QUIET: Duration = Duration::from_millis(800);
/// A trace that never goes quiet (a long flow, a loop) is printed in parts,
/// at least this often, so it is seen and its spans do not pile up.
const MAX_WAIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Pending {
    /// Per trace: when its first and latest pending spans arrived.
    traces: HashMap<TraceId, (Instant, Instant, Vec<SpanData>)>,
}

/// Collects spans and prints finished traces as trees.
#[derive(Clone)]
pub struct TreeExporter {
    pending: Arc<Mutex<Pending>>,
    out: Arc<dyn Fn(&str) + Send + Sync>,
}

impl std::fmt::Debug for TreeExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TreeExporter")
    }
}

impl TreeExporter {
    /// Prints to stdout, from a background thread that watches for quiet
    /// traces.
    pub fn stdout() -> Self {
        let exporter = TreeExporter {
            pending: Arc::default(),
            out: Arc::new(|text: &str| {
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(text.as_bytes());
                let _ = stdout.flush();
            }),
        };
        let watcher = exporter.clone();
        let _ = std::thread::Builder::new()
            .name("switchyard-trace-tree".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(QUIET / 2);
                    watcher.print(false);
                    // Stop once the exporter is gone (this thread holds the
                    // other reference).
                    if Arc::strong_count(&watcher.pending) == 1 {
                        watcher.print(true);
                        break;
                    }
                }
            });
        exporter
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Prints the traces that have been quiet long enough (or all of them).
    fn print(&self, all: bool) {
        let ready: Vec<(TraceId, Vec<SpanData>)> = {
            let mut p = self.pending();
            let ids: Vec<TraceId> = p
                .traces
                .iter()
                .filter(|(_, (first, last, _))| {
                    all || last.elapsed() >= QUIET || first.elapsed() >= MAX_WAIT
                })
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| p.traces.remove(&id).map(|(_, _, spans)| (id, spans)))
                .collect()
        };
        for (id, spans) in ready {
            (self.out)(&render(id, spans));
        }
    }
}

impl SpanExporter for TreeExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut p = self.pending();
        for span in batch {
            let now = Instant::now();
            let entry = p
                .traces
                .entry(span.span_context.trace_id())
                .or_insert_with(|| (now, now, Vec::new()));
            entry.1 = now;
            entry.2.push(span);
        }
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.print(true);
        Ok(())
    }
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn kind(k: &SpanKind) -> &'static str {
    match k {
        SpanKind::Consumer => "consumer",
        SpanKind::Producer => "producer",
        SpanKind::Client => "client",
        SpanKind::Server => "server",
        SpanKind::Internal => "internal",
    }
}

fn millis(start: SystemTime, end: SystemTime) -> String {
    let d = end.duration_since(start).unwrap_or_default();
    format!("{:.2}ms", d.as_secs_f64() * 1000.0)
}

/// One line per span, children indented under their parent.
pub fn render(trace_id: TraceId, mut spans: Vec<SpanData>) -> String {
    spans.sort_by_key(|s| s.start_time);
    let ids: Vec<SpanId> = spans.iter().map(|s| s.span_context.span_id()).collect();
    let mut children: HashMap<SpanId, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        if ids.contains(&s.parent_span_id) {
            children.entry(s.parent_span_id).or_default().push(i);
        } else {
            roots.push(i);
        }
    }
    let mut out = format!("trace {trace_id}\n");
    let count = roots.len();
    for (n, i) in roots.into_iter().enumerate() {
        line(&mut out, &spans, &children, i, "", n + 1 == count);
    }
    out
}

fn line(
    out: &mut String,
    spans: &[SpanData],
    children: &HashMap<SpanId, Vec<usize>>,
    i: usize,
    indent: &str,
    last: bool,
) {
    let s = &spans[i];
    let branch = if last { "└─ " } else { "├─ " };
    let _ = write!(out, "{indent}{branch}{} [{}]", s.name, kind(&s.span_kind));
    if let Some(plugin) = attr(s, "switchyard.plugin.name") {
        let version = attr(s, "switchyard.plugin.version")
            .map(|v| format!("@{v}"))
            .unwrap_or_default();
        let _ = write!(out, " {plugin}{version}");
    }
    if let Some(attempt) = attr(s, "switchyard.attempt") {
        let _ = write!(out, " attempt {attempt}");
    }
    if s.span_kind == SpanKind::Consumer {
        let _ = write!(out, " {}", millis(s.start_time, s.end_time));
    }
    // Attributes a plugin added (the standard ones are shown above).
    for kv in &s.attributes {
        let key = kv.key.as_str();
        if !(key.starts_with("messaging.") || key.starts_with("switchyard.")) {
            let _ = write!(out, " {key}={}", kv.value);
        }
    }
    if let Status::Error { description } = &s.status {
        let _ = write!(out, " ✗ {description}");
    }
    if !s.links.is_empty() {
        let linked: Vec<String> = s
            .links
            .iter()
            .map(|l| l.span_context.span_id().to_string())
            .collect();
        let _ = write!(out, " (linked to {})", linked.join(", "));
    }
    out.push('\n');
    let child_indent = format!("{indent}{}", if last { "   " } else { "│  " });
    for e in s.events.iter() {
        let detail = e
            .attributes
            .iter()
            .filter(|kv| kv.key.as_str() != "log.severity")
            .map(|kv| kv.value.to_string())
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(out, "{child_indent}· {} {detail}", e.name);
    }
    let kids = children
        .get(&s.span_context.span_id())
        .cloned()
        .unwrap_or_default();
    let count = kids.len();
    for (n, k) in kids.into_iter().enumerate() {
        line(out, spans, children, k, &child_indent, n + 1 == count);
    }
}
