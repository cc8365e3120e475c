//! Traces, metrics and logs.
//!
//! Every handled message gets a `process {type}` CONSUMER span whose parent
//! is the W3C trace context in the message's headers, and every output a
//! `send {type}` PRODUCER span whose context is written into the output's
//! headers: one trace follows a flow across every hop, retry and replay.
//! Spans are made with the OpenTelemetry API against a tracer provider the
//! host owns and passes to its routes (no global state, so tests run hosts
//! side by side); the host's own `tracing` spans reach the same provider
//! through `tracing-opentelemetry`. Metrics are OpenTelemetry instruments,
//! read for `/metrics` and, if configured, pushed over OTLP.

pub mod logging;
pub mod metrics;
mod tree;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use opentelemetry::propagation::{
    Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
};
use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanExporter};

pub use metrics::Metrics;

use crate::config::{TelemetryConfig, TraceExport};

/// Which traces are recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Follow the parent's decision when there is one.
    pub parent_based: bool,
    /// Fraction of traces without a parent decision that are sampled.
    pub ratio: f64,
}

/// The settings in force: the pipeline's, then `OTEL_*` variables, then
/// defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub traces: TraceExport,
    pub metrics_otlp: bool,
    pub endpoint: Option<String>,
    pub service_name: String,
    pub sampling: Sampling,
    pub metrics_interval: Duration,
}

/// Events kept per span: more than a plugin may add in one call (see
/// `plugin::MAX_PLUGIN_SPAN_EVENTS`), so the host's own events (failed
/// attempts, retries, dead letters) always fit.
pub const MAX_EVENTS_PER_SPAN: u32 = 256;

/// Reads an environment variable, treating an empty one as unset.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl TelemetryConfig {
    /// Applies the standard `OTEL_*` variables where the pipeline is silent.
    pub fn resolve(&self, pipeline: &str) -> Result<Resolved> {
        let endpoint_set = self.endpoint.is_some()
            || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
        let traces = match &self.traces {
            Some(t) => t.clone(),
            None => match env("OTEL_TRACES_EXPORTER").as_deref() {
                Some("otlp") => TraceExport::Otlp,
                Some("console") => TraceExport::Stdout,
                Some("none") => TraceExport::Off,
                Some(other) => bail!(
                    "OTEL_TRACES_EXPORTER={other} is not supported; use otlp, console or none"
                ),
                None if endpoint_set => TraceExport::Otlp,
                None => TraceExport::Off,
            },
        };
        let metrics_otlp = match self.metrics_otlp {
            Some(m) => m,
            None => match env("OTEL_METRICS_EXPORTER").as_deref() {
                Some("otlp") => true,
                Some("none") | Some("prometheus") => false,
                Some(other) => {
                    bail!("OTEL_METRICS_EXPORTER={other} is not supported; use otlp or none")
                }
                None => env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some(),
            },
        };
        if (traces == TraceExport::Otlp || metrics_otlp)
            && let Some(p) = env("OTEL_EXPORTER_OTLP_PROTOCOL")
            && p != "http/protobuf"
        {
            bail!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={p} is not supported; switchyard exports OTLP over http/protobuf"
            );
        }
        let sampling = match self.sample_ratio {
            Some(ratio) => Sampling {
                parent_based: true,
                ratio,
            },
            None => {
                let arg = || -> Result<f64> {
                    Ok(env("OTEL_TRACES_SAMPLER_ARG")
                        .map(|a| a.parse::<f64>())
                        .transpose()
                        .context("OTEL_TRACES_SAMPLER_ARG must be a number between 0 and 1")?
                        .unwrap_or(1.0))
                };
                let (parent_based, ratio) = match env("OTEL_TRACES_SAMPLER").as_deref() {
                    None | Some("parentbased_always_on") => (true, 1.0),
                    Some("always_on") => (false, 1.0),
                    Some("always_off") => (false, 0.0),
                    Some("parentbased_always_off") => (true, 0.0),
                    Some("traceidratio") => (false, arg()?),
                    Some("parentbased_traceidratio") => (true, arg()?),
                    Some(other) => bail!("OTEL_TRACES_SAMPLER={other} is not supported"),
                };
                Sampling {
                    parent_based,
                    ratio,
                }
            }
        };
        if !(0.0..=1.0).contains(&sampling.ratio) {
            bail!(
                "the trace sample ratio must be between 0 and 1, not {}",
                sampling.ratio
            );
        }
        Ok(Resolved {
            traces,
            metrics_otlp,
            endpoint: self.endpoint.clone(),
            service_name: self
                .service_name
                .clone()
                .or_else(|| env("OTEL_SERVICE_NAME"))
                .unwrap_or_else(|| format!("switchyard-{pipeline}")),
            sampling,
            metrics_interval: self.metrics_interval.unwrap_or(Duration::from_secs(10)),
        })
    }
}

/// The telemetry of one host: the tracer (if tracing is on), the metrics,
/// and the providers to flush on shutdown.
#[derive(Clone)]
pub struct Telemetry {
    tracer: Option<SdkTracer>,
    tracer_provider: Option<SdkTracerProvider>,
    pub metrics: Arc<Metrics>,
    propagator: Arc<TextMapCompositePropagator>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("tracing", &self.tracer.is_some())
            .finish_non_exhaustive()
    }
}

fn resource(service_name: &str) -> Resource {
    Resource::builder()
        .with_service_name(service_name.to_owned())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

fn propagator() -> Arc<TextMapCompositePropagator> {
    Arc::new(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]))
}

/// OTLP signal URL from a base endpoint.
fn signal_url(base: &str, signal: &str) -> String {
    format!("{}/v1/{signal}", base.trim_end_matches('/'))
}

impl Telemetry {
    /// Nothing traced; metrics kept in memory for `/metrics`.
    pub fn off() -> Self {
        Telemetry {
            tracer: None,
            tracer_provider: None,
            metrics: Arc::new(Metrics::new(None)),
            propagator: propagator(),
        }
    }

    /// Sets up what the settings ask for.
    pub fn start(settings: &Resolved) -> Result<Self> {
        use opentelemetry_otlp::WithExportConfig as _;
        let resource = resource(&settings.service_name);
        let root = match settings.sampling.ratio {
            r if r >= 1.0 => Sampler::AlwaysOn,
            r if r <= 0.0 => Sampler::AlwaysOff,
            r => Sampler::TraceIdRatioBased(r),
        };
        let sampler = if settings.sampling.parent_based {
            Sampler::ParentBased(Box::new(root))
        } else {
            root
        };
        let tracer_provider = match settings.traces {
            TraceExport::Off => None,
            TraceExport::Otlp => {
                let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
                if let Some(base) = &settings.endpoint {
                    builder = builder.with_endpoint(signal_url(base, "traces"));
                }
                let exporter = builder
                    .build()
                    .context("cannot set up the OTLP span exporter")?;
                Some(
                    SdkTracerProvider::builder()
                        .with_resource(resource.clone())
                        .with_sampler(sampler)
                        .with_max_events_per_span(MAX_EVENTS_PER_SPAN)
                        .with_batch_exporter(exporter)
                        .build(),
                )
            }
            TraceExport::Stdout => Some(
                SdkTracerProvider::builder()
                    .with_resource(resource.clone())
                    .with_sampler(sampler)
                    .with_max_events_per_span(MAX_EVENTS_PER_SPAN)
                    .with_simple_exporter(tree::TreeExporter::stdout())
                    .build(),
            ),
        };
        let metric_exporter = if settings.metrics_otlp {
            let mut builder = opentelemetry_otlp::MetricExporter::builder().with_http();
            if let Some(base) = &settings.endpoint {
                builder = builder.with_endpoint(signal_url(base, "metrics"));
            }
            Some((
                builder
                    .build()
                    .context("cannot set up the OTLP metric exporter")?,
                settings.metrics_interval,
            ))
        } else {
            None
        };
        let metrics = Metrics::with_resource(resource, metric_exporter);
        Ok(Self::assemble(tracer_provider, metrics))
    }

    /// Traces every message to `exporter` (synchronously, for tests and
    /// benchmarks); metrics in memory.
    pub fn with_span_exporter(exporter: impl SpanExporter + 'static) -> Self {
        let provider = SdkTracerProvider::builder()
            .with_resource(resource("switchyard-test"))
            .with_simple_exporter(exporter)
            .build();
        Self::assemble(Some(provider), Metrics::new(None))
    }

    /// Like [`Telemetry::with_span_exporter`], but batching spans on a
    /// background thread the way production does.
    pub fn with_batched_span_exporter(exporter: impl SpanExporter + 'static) -> Self {
        let provider = SdkTracerProvider::builder()
            .with_resource(resource("switchyard-test"))
            .with_batch_exporter(exporter)
            .build();
        Self::assemble(Some(provider), Metrics::new(None))
    }

    fn assemble(tracer_provider: Option<SdkTracerProvider>, metrics: Metrics) -> Self {
        Telemetry {
            tracer: tracer_provider.as_ref().map(|p| p.tracer("switchyard")),
            tracer_provider,
            metrics: Arc::new(metrics),
            propagator: propagator(),
        }
    }

    pub fn tracing(&self) -> bool {
        self.tracer.is_some()
    }

    /// The tracer, for the `tracing-opentelemetry` layer.
    pub fn sdk_tracer(&self) -> Option<SdkTracer> {
        self.tracer.clone()
    }

    /// Exports what is buffered and stops the exporters.
    pub fn shutdown(&self) {
        if let Some(p) = &self.tracer_provider {
            if let Err(e) = p.force_flush() {
                tracing::warn!(error = %e, "Cannot flush spans");
            }
            let _ = p.shutdown();
        }
        self.metrics.shutdown();
    }

    /// The trace context in a message's headers. A malformed `traceparent`
    /// is logged and ignored: the message starts a new trace.
    pub fn extract(&self, headers: &[(String, String)], message_id: &str) -> Context {
        let cx = self.propagator.extract(&HeaderExtractor(headers));
        if !cx.span().span_context().is_valid()
            && let Some((_, value)) = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("traceparent"))
        {
            tracing::warn!(
                message.id = %message_id,
                traceparent = %crate::text::clip(value, 128),
                "Malformed traceparent header; the message starts a new trace"
            );
        }
        cx
    }

    /// Writes `cx` into headers as `traceparent`, `tracestate` and
    /// `baggage`, replacing any already there.
    pub fn inject(&self, cx: &Context, headers: &mut Vec<(String, String)>) {
        self.propagator
            .inject_context(cx, &mut HeaderInjector(headers));
    }

    /// Starts a span. `links` are span contexts written as `traceparent`s.
    pub fn start_span(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: &Context,
        attributes: Vec<KeyValue>,
        links: Vec<SpanContext>,
    ) -> Option<Context> {
        let tracer = self.tracer.as_ref()?;
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .with_links(links.into_iter().map(Link::with_context).collect())
            .start_with_context(tracer, parent);
        Some(parent.with_span(span))
    }
}

/// Marks a span failed.
pub fn set_error(cx: &Context, message: &str) {
    cx.span().set_status(Status::error(message.to_owned()));
}

/// `(trace id, span id)` in hex, if `cx` holds a recorded span: ids of a
/// span that was not sampled would point at nothing in the backend.
pub fn ids(cx: &Context) -> Option<(String, String)> {
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled())
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// A span context from hex ids, for links to spans of earlier attempts or
/// of a dead-lettered message.
pub fn span_context(trace_id: &str, span_id: &str) -> Option<SpanContext> {
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

struct HeaderExtractor<'a>(&'a [(String, String)]);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _)| n.as_str()).collect()
    }
}

/// Replaces, never duplicates: a forwarded message carries exactly one
/// `traceparent`.
struct HeaderInjector<'a>(&'a mut Vec<(String, String)>);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.retain(|(n, _)| !n.eq_ignore_ascii_case(key));
        self.0.push((key.to_owned(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injection_replaces_trace_headers() {
        let t = Telemetry::with_span_exporter(
            opentelemetry_sdk::trace::InMemorySpanExporter::default(),
        );
        let cx = t
            .start_span(
                "x",
                SpanKind::Producer,
                &Context::new(),
                Vec::new(),
                Vec::new(),
            )
            .unwrap();
        let mut headers = vec![
            ("TraceParent".to_owned(), "00-old-old-01".to_owned()),
            ("x-keep".to_owned(), "1".to_owned()),
        ];
        t.inject(&cx, &mut headers);
        let tp: Vec<_> = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("traceparent"))
            .collect();
        assert_eq!(tp.len(), 1, "{headers:?}");
        assert!(
            tp[0]
                .1
                .contains(&cx.span().span_context().trace_id().to_string())
        );
        assert!(headers.iter().any(|(n, _)| n == "x-keep"));
    }

    #[test]
    fn a_malformed_traceparent_starts_a_new_trace() {
        let t = Telemetry::off();
        let cx = t.extract(&[("traceparent".into(), "00-zzzz-1234-01".into())], "m");
        assert!(!cx.span().span_context().is_valid());
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = t.extract(&[("traceparent".into(), good.into())], "m");
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn environment_does_not_override_the_pipeline() {
        let config = TelemetryConfig {
            traces: Some(TraceExport::Off),
            sample_ratio: Some(0.5),
            service_name: Some("orders".into()),
            ..TelemetryConfig::default()
        };
        let r = config.resolve("p").unwrap();
        assert_eq!(r.traces, TraceExport::Off);
        assert_eq!(
            r.sampling,
            Sampling {
                parent_based: true,
                ratio: 0.5
            }
        );
        assert_eq!(r.service_name, "orders");
    }
}
