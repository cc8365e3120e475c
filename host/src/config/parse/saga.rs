//! `[plugins.NAME.saga]`: which message types start an instance of a saga
//! plugin, how each of its types finds its instance, and what becomes of a
//! message whose instance does not exist.

use std::collections::BTreeMap;

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::names::MessageType;
use crate::config::reader::Section;
use crate::saga::{InstanceKey, NotFound, SagaSpec};

impl Parser<'_> {
    /// The saga section of the plugin `plugin`, which handles `handled`.
    pub(super) fn saga(
        &mut self,
        mut section: Section<'_>,
        plugin: &str,
        handled: &[MessageType],
    ) -> Option<SagaSpec> {
        let errors_before = self.diags.error_count();
        let path = section.path().to_owned();
        let is_handled = |t: &str| handled.iter().any(|h| h.as_str() == t);
        let mut starts = Vec::new();
        section.require("starts");
        match section.strings_matching("starts", MessageType::PATTERN, self.diags) {
            None => self.diags.push(
                Diagnostic::error(format!("[{path}] is missing `starts`"), section.span())
                    .with_label(
                        "add `starts = [\"OrderPlaced\"]`: the types that create an instance",
                    ),
            ),
            Some(list) => {
                if list.is_empty() {
                    self.diags.push(
                        Diagnostic::error(format!("`{path}.starts` is empty"), section.span())
                            .with_label("no message type could ever create an instance"),
                    );
                }
                for t in list {
                    if is_handled(&t.value) {
                        starts.push(t.value);
                    } else {
                        self.diags.push(
                            Diagnostic::error(
                                format!(
                                    "saga {plugin} starts on `{}`, which it does not handle",
                                    t.value
                                ),
                                t.span,
                            )
                            .with_label("not in the plugin's `commands` or `events`"),
                        );
                    }
                }
            }
        }
        let default_key = section.string("instance_key", self.diags).and_then(|k| {
            match InstanceKey::parse(&k.value) {
                Ok(key) => Some(key),
                Err(e) => {
                    self.diags
                        .push(Diagnostic::error(e, k.span).with_label("invalid instance key"));
                    None
                }
            }
        });
        let mut keys = BTreeMap::new();
        if let Some(mut by_type) = section.table("instance_keys", self.diags) {
            for (t, k) in by_type.string_map(self.diags) {
                if !is_handled(&t.value) {
                    self.diags.push(
                        Diagnostic::error(
                            format!("saga {plugin} has an instance key for `{}`, which it does not handle", t.value),
                            t.span,
                        )
                        .with_label("not in the plugin's `commands` or `events`"),
                    );
                    continue;
                }
                match InstanceKey::parse(&k.value) {
                    Ok(key) => {
                        keys.insert(t.value, key);
                    }
                    Err(e) => self
                        .diags
                        .push(Diagnostic::error(e, k.span).with_label("invalid instance key")),
                }
            }
        }
        let not_found = match section.choice(
            "not_found",
            &["ignore", "dead-letter"],
            Some("\"ignore\" settles such a message without the plugin; \"dead-letter\" keeps it"),
            self.diags,
        ) {
            None => NotFound::default(),
            Some(v) => match v.value.as_str() {
                "dead-letter" => NotFound::DeadLetter,
                _ => NotFound::Ignore,
            },
        };
        let section_span = section.span();
        section.finish(self.diags);
        for t in handled {
            if keys.contains_key(t.as_str()) {
                continue;
            }
            // The fault of a command the saga sent names its instance.
            if t.as_str().ends_with(".Fault") {
                keys.insert(t.as_str().to_owned(), InstanceKey::fault());
                continue;
            }
            match &default_key {
                Some(k) => {
                    keys.insert(t.as_str().to_owned(), k.clone());
                }
                None if self.diags.error_count() == errors_before => self.diags.push(
                    Diagnostic::error(
                        format!("saga {plugin} does not say how `{t}` finds its instance"),
                        section_span.clone(),
                    )
                    .with_label("no instance key for this type")
                    .with_note(format!(
                        "help: add `instance_key = \"$.order_id\"` (every type) or `{t} = \"...\"` under [{path}.instance_keys]; `correlation-id` uses the message's correlation id"
                    )),
                ),
                None => {}
            }
        }
        (self.diags.error_count() == errors_before).then_some(SagaSpec {
            starts,
            keys,
            not_found,
        })
    }
}
