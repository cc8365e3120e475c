//! `[telemetry]`: where traces and metrics are exported.

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::model::{TelemetryConfig, TraceExport};
use crate::config::reader::Section;

impl Parser<'_> {
    /// `[telemetry]`: traces and metrics export.
    pub(super) fn telemetry_section(&mut self, root: &mut Section<'_>) -> TelemetryConfig {
        let mut config = TelemetryConfig::default();
        let Some(mut t) = root.table("telemetry", self.diags) else {
            return config;
        };
        self.telemetry_exports(&mut t, &mut config);
        self.telemetry_otlp(&mut t, &mut config);
        config.metrics_interval = self.duration(&mut t, "metrics_interval").map(|d| d.value);
        t.finish(self.diags);
        config
    }

    /// `traces` and `metrics`: what is exported.
    fn telemetry_exports(&mut self, t: &mut Section<'_>, config: &mut TelemetryConfig) {
        if let Some(v) = t.choice("traces", &["otlp", "stdout", "off"], None, self.diags) {
            config.traces = match v.value.as_str() {
                "otlp" => Some(TraceExport::Otlp),
                "stdout" => Some(TraceExport::Stdout),
                "off" => Some(TraceExport::Off),
                _ => None,
            };
        }
        if let Some(v) = t.choice(
            "metrics",
            &["otlp", "off"],
            Some("metrics are always served at /metrics on the admin listener"),
            self.diags,
        ) {
            config.metrics_otlp = Some(v.value == "otlp");
        }
    }

    /// `endpoint`, `service_name` and `sample_ratio`: where and how much.
    fn telemetry_otlp(&mut self, t: &mut Section<'_>, config: &mut TelemetryConfig) {
        if let Some(e) = t.string("endpoint", self.diags) {
            if e.value.starts_with("http://") || e.value.starts_with("https://") {
                config.endpoint = Some(e.value);
            } else {
                self.diags.push(
                    Diagnostic::error(
                        "`telemetry.endpoint` must be an http:// or https:// URL",
                        e.span,
                    )
                    .with_label("expected e.g. \"http://127.0.0.1:4318\""),
                );
            }
        }
        config.service_name = t.string("service_name", self.diags).map(|s| s.value);
        if let Some(r) = t.number("sample_ratio", self.diags) {
            match r.value {
                v if (0.0..=1.0).contains(&v) => config.sample_ratio = Some(v),
                _ => self.diags.push(
                    Diagnostic::error("`telemetry.sample_ratio` must be between 0 and 1", r.span)
                        .with_label("out of range"),
                ),
            }
        }
    }
}
