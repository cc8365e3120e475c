//! Logging: lines on stderr (text, or one JSON object a line with
//! `--log-format json`), filtered by `RUST_LOG`. When
//! tracing is on, the host's own `tracing` spans are also exported through
//! `tracing-opentelemetry`, and per-message log lines carry `trace_id` and
//! `span_id` fields.

use opentelemetry_sdk::trace::SdkTracer;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Installs the global subscriber. `default` is the filter used when
/// `RUST_LOG` is unset, e.g. `"info"`.
pub fn init(default: &str, format: Format) {
    init_with(default, format, None);
}

/// How log lines are written on stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One line of text per event, for people.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, the
    /// event's fields with `message`, and `trace_id`/`span_id` on the
    /// lines of a traced message), for log pipelines.
    Json,
}

/// Like [`init`], and bridges `tracing` spans to `tracer` if given.
pub fn init_with(default: &str, format: Format, tracer: Option<SdkTracer>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = match format {
        Format::Text => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_writer(std::io::stderr)
            .boxed(),
        Format::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    }
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
