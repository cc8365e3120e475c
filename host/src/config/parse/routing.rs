//! Routing rules across plugins: a message type is a command or an event in
//! the whole pipeline, and a command has exactly one handler.

use std::collections::BTreeMap;

use super::plugins::ParsedPlugin;
use crate::config::diagnostic::{Diagnostic, Diagnostics};
use crate::config::names::MessageType;
use crate::envelope::Kind;

/// Rules across plugins: a type has one kind, a command has one handler.
pub(super) fn check_routing(plugins: &[ParsedPlugin], diags: &mut Diagnostics) {
    let mut seen: BTreeMap<&MessageType, (Kind, &ParsedPlugin)> = BTreeMap::new();
    for p in plugins {
        for (t, kind) in &p.subscriptions {
            let kind = *kind;
            let span = p.type_spans.get(t).cloned().flatten();
            let Some((prev_kind, prev)) = seen.get(t) else {
                seen.insert(t, (kind, p));
                continue;
            };
            if *prev_kind != kind {
                diags.push(
                    Diagnostic::error(
                        format!(
                            "`{t}` is {} for plugin `{}` but {} for plugin `{}`",
                            prev_kind.with_article(),
                            prev.key,
                            kind.with_article(),
                            p.key
                        ),
                        span,
                    )
                    .with_label(format!("listed under `{kind}s` here"))
                    .with_note(format!(
                        "note: a message type is either a command or an event in the whole pipeline; plugin `{}` lists it under `{prev_kind}s`",
                        prev.key
                    )),
                );
            } else if kind == Kind::Command {
                diags.push(
                    Diagnostic::error(
                        format!(
                            "command `{t}` has two handlers: plugins `{}` and `{}`",
                            prev.key, p.key
                        ),
                        span,
                    )
                    .with_label("second handler")
                    .with_note("note: a command has exactly one handler; if several plugins must react, publish an event instead"),
                );
            }
        }
    }
}
