//! Metrics: OpenTelemetry instruments, read on demand for Prometheus'
//! `/metrics` and, if configured, pushed over OTLP.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Weak};
use std::time::Duration;

use opentelemetry::metrics::{Counter, Gauge, Histogram, MeterProvider as _, UpDownCounter};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};

/// Bucket bounds (seconds) for handler durations and end-to-end latencies:
/// from 50 µs, where a warm call sits, to a minute.
const SECONDS_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    5.0, 60.0,
];

/// The host's instruments. Attribute keys: `plugin`, `plugin.version`,
/// `message.type`, `error.type`, `retry`, `status`.
pub struct Metrics {
    provider: SdkMeterProvider,
    reader: Arc<ManualReader>,
    pub handled: Counter<u64>,
    pub failed: Counter<u64>,
    pub retried: Counter<u64>,
    pub dead_lettered: Counter<u64>,
    pub handler_duration: Histogram<f64>,
    pub latency: Histogram<f64>,
    pub in_flight: UpDownCounter<i64>,
    pub dead_letters: Gauge<u64>,
    /// How long a route took to swap to a new plugin version.
    pub swap_duration: Histogram<f64>,
    /// Saga instances started, completed; timeouts handled by their
    /// instance; messages whose instance was not found; commits refused
    /// because an instance moved on; instances not completed.
    pub saga_started: Counter<u64>,
    pub saga_completed: Counter<u64>,
    pub saga_timed_out: Counter<u64>,
    pub saga_active: Gauge<u64>,
    pub saga_not_found: Counter<u64>,
    pub saga_conflicts: Counter<u64>,
    /// Messages a route with `concurrency` above 1 handled beside one that
    /// wrote what they read, given back to be handled again.
    pub rerun: Counter<u64>,
    /// Journal records a broker host could not write (the journal's store
    /// down or behind); the messages they describe were not affected.
    pub journal_dropped: Counter<u64>,
    /// Requests the ingress answered, by message type and status.
    pub ingress_requests: Counter<u64>,
}

/// Shares the manual reader between the meter provider and `/metrics`.
#[derive(Debug)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

impl Metrics {
    /// Instruments kept in memory, plus an OTLP push if given.
    pub fn new(otlp: Option<(opentelemetry_otlp::MetricExporter, Duration)>) -> Self {
        Self::with_resource(Resource::builder().build(), otlp)
    }

    pub fn with_resource(
        resource: Resource,
        otlp: Option<(opentelemetry_otlp::MetricExporter, Duration)>,
    ) -> Self {
        let reader = Arc::new(ManualReader::builder().build());
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(SharedReader(reader.clone()));
        if let Some((exporter, interval)) = otlp {
            builder = builder.with_reader(
                opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
                    .with_interval(interval)
                    .build(),
            );
        }
        let provider = builder.build();
        let meter = provider.meter("switchyard");
        Metrics {
            handled: meter
                .u64_counter("switchyard.messages.handled")
                .with_description("Messages handled successfully")
                .build(),
            failed: meter
                .u64_counter("switchyard.messages.failed")
                .with_description("Failed attempts to handle a message, by error type")
                .build(),
            retried: meter
                .u64_counter("switchyard.messages.retried")
                .with_description("Retries: immediate (now) or scheduled (later)")
                .build(),
            dead_lettered: meter
                .u64_counter("switchyard.messages.dead_lettered")
                .with_description("Messages given up on and written to the dead-letter store")
                .build(),
            handler_duration: meter
                .f64_histogram("switchyard.handler.duration")
                .with_unit("s")
                .with_description("Time spent in the plugin per attempt")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build(),
            latency: meter
                .f64_histogram("switchyard.message.latency")
                .with_unit("s")
                .with_description("From a message's creation to the end of its handling")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build(),
            in_flight: meter
                .i64_up_down_counter("switchyard.messages.in_flight")
                .with_description("Messages received and not yet settled")
                .build(),
            dead_letters: meter
                .u64_gauge("switchyard.dead_letters")
                .with_description("Records in the dead-letter store, by status")
                .build(),
            swap_duration: meter
                .f64_histogram("switchyard.plugin.swap.duration")
                .with_unit("s")
                .with_description("Time a route took to swap to a new plugin version")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build(),
            saga_started: meter
                .u64_counter("switchyard.saga.started")
                .with_description("Saga instances started")
                .build(),
            saga_completed: meter
                .u64_counter("switchyard.saga.completed")
                .with_description("Saga instances completed")
                .build(),
            saga_timed_out: meter
                .u64_counter("switchyard.saga.timed_out")
                .with_description("Saga timeouts fired and handled by their instance")
                .build(),
            saga_active: meter
                .u64_gauge("switchyard.saga.active")
                .with_description("Saga instances not completed (running or failed), as the state store last counted them")
                .build(),
            saga_not_found: meter
                .u64_counter("switchyard.saga.not_found")
                .with_description("Messages whose saga instance does not exist or has completed")
                .build(),
            saga_conflicts: meter
                .u64_counter("switchyard.saga.conflicts")
                .with_description("Batches handled again because a saga instance changed meanwhile")
                .build(),
            rerun: meter
                .u64_counter("switchyard.messages.rerun")
                .with_description("Messages handled beside one that wrote what they read (concurrency above 1), given back to be handled again")
                .build(),
            journal_dropped: meter
                .u64_counter("switchyard.journal.dropped")
                .with_description("Journal records not written because the journal's store was down or behind (messages are not affected)")
                .build(),
            ingress_requests: meter
                .u64_counter("switchyard.ingress.requests")
                .with_description("HTTP requests the ingress answered, by message type and status")
                .build(),
            provider,
            reader,
        }
    }

    pub fn shutdown(&self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
    }

    /// The sums of the counters and up-down counters named `names`, per
    /// value of the attribute `by` (`plugin`, say), summed over their other
    /// attributes: `(metric name, attribute value) -> sum`.
    pub fn totals(&self, names: &[&str], by: &str) -> BTreeMap<(String, String), f64> {
        let mut rm = ResourceMetrics::default();
        if let Err(e) = self.reader.collect(&mut rm) {
            tracing::warn!(error = %e, "Cannot collect metrics");
        }
        let mut out = BTreeMap::new();
        for scope in rm.scope_metrics() {
            for metric in scope.metrics().filter(|m| names.contains(&m.name())) {
                let mut add = |key: String, v: f64| {
                    *out.entry((metric.name().to_owned(), key)).or_insert(0.0) += v;
                };
                match metric.data() {
                    AggregatedMetrics::U64(MetricData::Sum(s)) => {
                        for p in s.data_points() {
                            add(value_of(p.attributes(), by), p.value() as f64);
                        }
                    }
                    AggregatedMetrics::I64(MetricData::Sum(s)) => {
                        for p in s.data_points() {
                            add(value_of(p.attributes(), by), p.value() as f64);
                        }
                    }
                    AggregatedMetrics::F64(MetricData::Sum(s)) => {
                        for p in s.data_points() {
                            add(value_of(p.attributes(), by), p.value());
                        }
                    }
                    _ => {}
                }
            }
        }
        out
    }

    /// Every metric in the Prometheus text exposition format (0.0.4).
    pub fn prometheus(&self) -> String {
        let mut rm = ResourceMetrics::default();
        if let Err(e) = self.reader.collect(&mut rm) {
            tracing::warn!(error = %e, "Cannot collect metrics");
        }
        let mut out = String::new();
        for scope in rm.scope_metrics() {
            for metric in scope.metrics() {
                write_metric(
                    &mut out,
                    metric.name(),
                    metric.description(),
                    metric.unit(),
                    metric.data(),
                );
            }
        }
        out
    }
}

/// `switchyard.messages.handled` → `switchyard_messages_handled`.
fn prometheus_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels<'a>(attrs: impl Iterator<Item = &'a KeyValue>, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = attrs
        .map(|kv| {
            let v = match &kv.value {
                Value::String(s) => s.as_str().to_owned(),
                other => other.to_string(),
            };
            format!(
                "{}=\"{}\"",
                prometheus_name(kv.key.as_str()),
                escape_label(&v)
            )
        })
        .collect();
    parts.sort();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn number<T: std::fmt::Display>(v: T) -> String {
    v.to_string()
}

fn write_metric(
    out: &mut String,
    name: &str,
    description: &str,
    unit: &str,
    data: &AggregatedMetrics,
) {
    let mut base = prometheus_name(name);
    if unit == "s" {
        base.push_str("_seconds");
    }
    match data {
        AggregatedMetrics::U64(d) => write_data(out, &base, description, d),
        AggregatedMetrics::I64(d) => write_data(out, &base, description, d),
        AggregatedMetrics::F64(d) => write_data(out, &base, description, d),
    }
}

fn write_data<T: std::fmt::Display + Copy>(
    out: &mut String,
    base: &str,
    description: &str,
    data: &MetricData<T>,
) {
    match data {
        MetricData::Sum(sum) => {
            let (name, kind) = if sum.is_monotonic() {
                (format!("{base}_total"), "counter")
            } else {
                (base.to_owned(), "gauge")
            };
            let _ = writeln!(out, "# HELP {name} {description}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for p in sum.data_points() {
                let _ = writeln!(
                    out,
                    "{name}{} {}",
                    labels(p.attributes(), None),
                    number(p.value())
                );
            }
        }
        MetricData::Gauge(g) => {
            let _ = writeln!(out, "# HELP {base} {description}");
            let _ = writeln!(out, "# TYPE {base} gauge");
            for p in g.data_points() {
                let _ = writeln!(
                    out,
                    "{base}{} {}",
                    labels(p.attributes(), None),
                    number(p.value())
                );
            }
        }
        MetricData::Histogram(h) => {
            let _ = writeln!(out, "# HELP {base} {description}");
            let _ = writeln!(out, "# TYPE {base} histogram");
            for p in h.data_points() {
                let mut cumulative = 0u64;
                let bounds: Vec<f64> = p.bounds().collect();
                for (i, count) in p.bucket_counts().enumerate() {
                    cumulative += count;
                    let le = bounds.get(i).map_or("+Inf".to_owned(), |b| b.to_string());
                    let _ = writeln!(
                        out,
                        "{base}_bucket{} {cumulative}",
                        labels(p.attributes(), Some(("le", le)))
                    );
                }
                let _ = writeln!(
                    out,
                    "{base}_sum{} {}",
                    labels(p.attributes(), None),
                    number(p.sum())
                );
                let _ = writeln!(
                    out,
                    "{base}_count{} {}",
                    labels(p.attributes(), None),
                    p.count()
                );
            }
        }
        MetricData::ExponentialHistogram(_) => {}
    }
}

/// The value of the attribute `key` among `attrs`, or "" without one.
fn value_of<'a>(mut attrs: impl Iterator<Item = &'a KeyValue>, key: &str) -> String {
    attrs
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::new(None);
        let attrs = [
            KeyValue::new("plugin", "orders"),
            KeyValue::new("message.type", "PlaceOrder"),
        ];
        m.handled.add(2, &attrs);
        m.handler_duration.record(0.0003, &attrs);
        m.in_flight.add(3, &[KeyValue::new("plugin", "orders")]);
        m.dead_letters.record(4, &[KeyValue::new("status", "dead")]);
        let text = m.prometheus();
        assert!(
            text.contains("# TYPE switchyard_messages_handled_total counter"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"switchyard_messages_handled_total{message_type="PlaceOrder",plugin="orders"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"switchyard_handler_duration_seconds_bucket{message_type="PlaceOrder",plugin="orders",le="0.00025"} 0"#), "{text}");
        assert!(text.contains(r#"switchyard_handler_duration_seconds_bucket{message_type="PlaceOrder",plugin="orders",le="0.0005"} 1"#), "{text}");
        assert!(text.contains(r#"switchyard_handler_duration_seconds_count{message_type="PlaceOrder",plugin="orders"} 1"#), "{text}");
        assert!(
            text.contains(r#"switchyard_messages_in_flight{plugin="orders"} 3"#),
            "{text}"
        );
        m.handled.add(
            5,
            &[
                KeyValue::new("plugin", "orders"),
                KeyValue::new("message.type", "CancelOrder"),
            ],
        );
        let totals = m.totals(
            &[
                "switchyard.messages.handled",
                "switchyard.messages.in_flight",
            ],
            "plugin",
        );
        assert_eq!(
            totals.get(&("switchyard.messages.handled".into(), "orders".into())),
            Some(&7.0)
        );
        assert_eq!(
            totals.get(&("switchyard.messages.in_flight".into(), "orders".into())),
            Some(&3.0)
        );
        assert_eq!(totals.len(), 2, "{totals:?}");
        assert!(
            text.contains(r#"switchyard_dead_letters{status="dead"} 4"#),
            "{text}"
        );
    }
}
