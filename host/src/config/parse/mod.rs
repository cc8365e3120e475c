//! The section parsers: from the TOML document to the validated
//! [`Pipeline`], one file per section of the pipeline file, each reading
//! its table key by key through the [`reader`](super::reader) and recording
//! every mistake as a [`Diagnostic`]. [`parse`] runs them in order, then the
//! rules that span plugins ([`routing`]).

mod dead_letters;
mod defaults;
mod fleet;
mod grants;
mod host;
mod ingress;
mod journal;
mod pipeline;
mod plugins;
mod retry;
mod routing;
mod saga;
mod schemas;
mod telemetry;
mod transport;

use std::path::Path;
use std::time::Duration;

use super::diagnostic::{Diagnostic, Diagnostics};
use super::model::Pipeline;
use super::names::{format_size, parse_duration, parse_size};
use super::reader::{Section, Spanned};

/// Parses pipeline text. `path` is the file's absolute location; relative
/// paths inside the file are resolved against its directory. Performs no I/O.
///
/// Returns the pipeline when there are no errors, and every diagnostic found.
pub fn parse(text: &str, path: &Path) -> (Option<Pipeline>, Diagnostics) {
    let mut diags = Diagnostics::default();
    let doc = match toml_edit::Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            diags.push(
                Diagnostic::error(
                    format!("invalid TOML: {}", e.message().trim_end()),
                    e.span(),
                )
                .with_label("here"),
            );
            return (None, diags);
        }
    };
    let base = path.parent().map(Path::to_owned).unwrap_or_default();
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pipeline".into());

    let mut root = Section::new("", doc.as_table(), None);
    let mut p = Parser {
        diags: &mut diags,
        base: &base,
        pipeline_name: String::new(),
    };

    let name = p.pipeline_section(&mut root, &stem);
    p.pipeline_name = name.clone();
    let transport = p.transport_section(&mut root, &name);
    let host = p.host_section(&mut root);
    let defaults = p.defaults_section(&mut root);
    let dead_letters = p.dead_letters_section(&mut root, &transport);
    let state = p.state_section(&mut root, &transport);
    let journal = p.journal_section(&mut root, &transport);
    let fleet = p.fleet_section(&mut root, &transport);
    let telemetry = p.telemetry_section(&mut root);
    let (admin, admin_token_env) = p.admin_section(&mut root);
    let schemas = p.schemas_section(&mut root);
    let plugins = p.plugins_section(&mut root, &defaults);
    // The types some plugin takes, for the ingress's per-type tokens.
    let routed: std::collections::BTreeSet<&str> = plugins
        .iter()
        .filter_map(|p| p.spec.as_ref())
        .flat_map(|s| s.subscriptions().map(|(t, _)| t.as_str()))
        .collect();
    let ingress = p.ingress_section(&mut root, host.max_message_size, &routed);
    root.finish(p.diags);

    routing::check_routing(&plugins, &mut diags);

    if diags.has_errors() {
        diags.sort();
        return (None, diags);
    }
    let pipeline = Pipeline {
        name,
        source: path.to_owned(),
        transport,
        cache_dir: host.cache_dir,
        dead_letters,
        state,
        journal,
        fleet,
        telemetry,
        admin,
        admin_token_env,
        ingress,
        watch: host.watch,
        watch_interval: host.watch_interval,
        state_dir: host.state_dir,
        max_message_size: host.max_message_size,
        crash_loop_limit: host.crash_loop_limit,
        schemas,
        plugins: plugins.into_iter().filter_map(|p| p.spec).collect(),
    };
    diags.sort();
    (Some(pipeline), diags)
}

/// What every section parser shares: where diagnostics go and where
/// relative paths start.
struct Parser<'a> {
    diags: &'a mut Diagnostics,
    base: &'a Path,
    pipeline_name: String,
}

impl Parser<'_> {
    /// A size key of `section` ("1 MiB" or a number of bytes), from 1 byte
    /// to `max`; `example` shows the form in the complaint.
    fn size_up_to(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
        example: &'static str,
        max: u64,
    ) -> Option<u64> {
        let m = section.string_or_int(key, example, self.diags)?;
        match parse_size(&m.value) {
            Ok(bytes) if (1..=max).contains(&bytes) => Some(bytes),
            Ok(bytes) => {
                self.diags.push(
                    Diagnostic::error(
                        format!(
                            "{key} {} is out of range: it must be between 1 byte and {}",
                            format_size(bytes),
                            format_size(max)
                        ),
                        m.span,
                    )
                    .with_label("out of range"),
                );
                None
            }
            Err(e) => {
                self.diags
                    .push(Diagnostic::error(e, m.span).with_label("not a size"));
                None
            }
        }
    }

    /// A duration key of `section`, which must be more than zero.
    fn duration(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
    ) -> Option<Spanned<Duration>> {
        let s = section.string(key, self.diags)?;
        match parse_duration(&s.value) {
            Ok(d) if d.is_zero() => {
                self.diags.push(
                    Diagnostic::error(
                        format!("`{}.{key}` must be more than zero", section.path()),
                        s.span,
                    )
                    .with_label("zero"),
                );
                None
            }
            Ok(d) => Some(Spanned::new(d, s.span)),
            Err(e) => {
                self.diags
                    .push(Diagnostic::error(e, s.span).with_label("not a duration"));
                None
            }
        }
    }
}
