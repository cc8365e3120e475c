//! `[plugins.NAME]`: each plugin's component, the types routed to it, and
//! its limits, retry policy and grants.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::model::{Grants, Limits, PluginSpec};
use crate::config::names::{MessageType, PluginName};
use crate::config::reader::{self, Section, Spanned};
use crate::envelope::Kind;
use crate::recover::RetryPolicy;

/// A plugin as far as it could be read, plus the places its types were
/// written: cross-plugin rules are checked even when one of its other
/// settings is wrong, so every error shows up in one run.
pub(super) struct ParsedPlugin {
    /// The key as written, for messages.
    pub(super) key: String,
    /// `None` if any of its settings had an error.
    pub(super) spec: Option<PluginSpec>,
    pub(super) subscriptions: Vec<(MessageType, Kind)>,
    pub(super) type_spans: BTreeMap<MessageType, Option<Range<usize>>>,
}

impl Parser<'_> {
    /// `[plugins]`: a table per plugin, at least one.
    pub(super) fn plugins_section(
        &mut self,
        root: &mut Section<'_>,
        defaults: &(Limits, RetryPolicy),
    ) -> Vec<ParsedPlugin> {
        root.require("plugins");
        let Some(mut plugins) = root.table("plugins", self.diags) else {
            self.diags.push(
                Diagnostic::error("the pipeline has no plugins", None)
                    .with_note("help: add a table per plugin, e.g. [plugins.orders] with wasm = \"orders.wasm\" and commands = [\"PlaceOrder\"]"),
            );
            return Vec::new();
        };
        let entries = plugins.entries_named(PluginName::PATTERN, self.diags);
        if entries.is_empty() {
            self.diags.push(
                Diagnostic::error("the pipeline has no plugins", plugins.span())
                    .with_label("add at least one [plugins.NAME] table"),
            );
        }
        entries
            .into_iter()
            .map(|(name, section)| self.plugin(name, section, defaults))
            .collect()
    }

    /// One `[plugins.NAME]` table over `[defaults]`.
    fn plugin(
        &mut self,
        name: Spanned<String>,
        mut section: Section<'_>,
        defaults: &(Limits, RetryPolicy),
    ) -> ParsedPlugin {
        let plugin_name = match PluginName::try_from(name.value.as_str()) {
            Ok(n) => Some(n),
            Err(e) => {
                self.diags
                    .push(Diagnostic::error(e, name.span.clone()).with_label("invalid name"));
                None
            }
        };
        let wasm = self.plugin_wasm(&mut section, &name);
        let mut type_spans = BTreeMap::new();
        let errors_before = self.diags.error_count();
        let commands = self.types(&mut section, "commands", &mut type_spans);
        let events = self.types(&mut section, "events", &mut type_spans);
        let limits = self.limits(&mut section, &defaults.0);
        let retry = match section.table("retry", self.diags) {
            Some(r) => self.retry(r, &defaults.1),
            None => defaults.1.clone(),
        };
        let grants = match section.table("grants", self.diags) {
            Some(g) => self.grants(g),
            None => Grants::default(),
        };
        let exactly_once = section
            .bool("exactly_once", self.diags)
            .is_some_and(|b| b.value);
        let handled: Vec<MessageType> = commands.iter().chain(&events).cloned().collect();
        let saga = section
            .table("saga", self.diags)
            .map(|s| self.saga(s, &name.value, &handled));
        self.check_handles_something(
            &section,
            &name,
            commands.is_empty() && events.is_empty(),
            errors_before,
        );
        section.finish(self.diags);
        let subscriptions = commands
            .iter()
            .map(|t| (t.clone(), Kind::Command))
            .chain(events.iter().map(|t| (t.clone(), Kind::Event)))
            .collect();
        let spec = match (plugin_name, wasm) {
            (Some(name), Some(wasm)) => Some(PluginSpec {
                name,
                wasm,
                commands,
                events,
                limits,
                retry,
                grants,
                exactly_once,
                saga: saga.flatten().map(std::sync::Arc::new),
            }),
            _ => None,
        };
        ParsedPlugin {
            key: name.value,
            spec,
            subscriptions,
            type_spans,
        }
    }

    /// `wasm`: the plugin's component file, resolved against the pipeline's
    /// directory.
    fn plugin_wasm(
        &mut self,
        section: &mut Section<'_>,
        name: &Spanned<String>,
    ) -> Option<PathBuf> {
        section
            .required_string("wasm", "\"path/to/plugin.wasm\"", self.diags)
            .and_then(|w| {
                if w.value.trim().is_empty() {
                    self.diags.push(
                        Diagnostic::error(
                            format!("`plugins.{}.wasm` must not be empty", name.value),
                            w.span,
                        )
                        .with_label("empty path"),
                    );
                    None
                } else {
                    Some(self.base.join(w.value))
                }
            })
    }

    /// A plugin with no `commands` and no `events` is an error of its own.
    fn check_handles_something(
        &mut self,
        section: &Section<'_>,
        name: &Spanned<String>,
        listed_nothing: bool,
        errors_before: usize,
    ) {
        // An empty plugin is only worth its own error if its lists were not
        // just reported as malformed or misspelt.
        let misspelt_list = section
            .unknown_keys()
            .iter()
            .any(|k| reader::closest(k, &["commands", "events"]).is_some());
        if listed_nothing && self.diags.error_count() == errors_before && !misspelt_list {
            self.diags.push(
                Diagnostic::error(
                    format!("plugin `{}` handles nothing", name.value),
                    section.span().or(name.span.clone()),
                )
                .with_label("no `commands` or `events`")
                .with_note("help: list the types routed to it, e.g. `commands = [\"PlaceOrder\"]` or `events = [\"OrderPlaced\"]`"),
            );
        }
    }

    /// `commands` or `events`: message types, each listed once per plugin.
    fn types(
        &mut self,
        section: &mut Section<'_>,
        key: &'static str,
        spans: &mut BTreeMap<MessageType, Option<Range<usize>>>,
    ) -> Vec<MessageType> {
        let mut out = Vec::new();
        for t in section
            .strings_matching(key, MessageType::PATTERN, self.diags)
            .unwrap_or_default()
        {
            match MessageType::try_from(t.value.as_str()) {
                Ok(mt) => {
                    if spans.contains_key(&mt) {
                        self.diags.push(
                            Diagnostic::error(
                                format!("`{mt}` is listed twice in [{}]", section.path()),
                                t.span,
                            )
                            .with_label("duplicate")
                            .with_note(
                                "note: a plugin lists each type once, under `commands` or `events`",
                            ),
                        );
                        continue;
                    }
                    spans.insert(mt.clone(), t.span);
                    out.push(mt);
                }
                Err(e) => self
                    .diags
                    .push(Diagnostic::error(e, t.span).with_label("invalid message type")),
            }
        }
        out
    }
}
