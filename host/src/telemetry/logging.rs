//! Logging: human-readable lines on stderr, filtered by `RUST_LOG`. When
//! tracing is on, the host's own `tracing` spans are also exported through
//! `tracing-opentelemetry`, and per-message log lines carry `trace_id` and
//! `span_id` fields.

use opentelemetry_sdk::trace::SdkTracer;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Installs the global subscriber. `default` is the filter used when
/// `RUST_LOG` is unset, e.g. `"info"`.
pub fn init(default: &str) {
    init_with(default, None);
}

/// Like [`init`], and bridges `tracing` spans to `tracer` if given.
pub fn init_with(default: &str, tracer: Option<SdkTracer>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_filter(filter);
    // Only spans the host opens itself (not per-message spans, which are
    // made directly with OpenTelemetry) go through this bridge.
    let otel = tracer.map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t)
            .with_filter(tracing_subscriber::filter::filter_fn(|m| m.is_span()))
    });
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
}
