//! `[schemas]`: the JSON Schema file each message type's payload must match.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::names::MessageType;
use crate::config::reader::Section;

impl Parser<'_> {
    /// `[schemas]`: message type = JSON Schema file.
    pub(super) fn schemas_section(
        &mut self,
        root: &mut Section<'_>,
    ) -> BTreeMap<MessageType, PathBuf> {
        let mut out = BTreeMap::new();
        let Some(mut s) = root.table("schemas", self.diags) else {
            return out;
        };
        for (k, v) in s.string_map(self.diags) {
            match MessageType::try_from(k.value.as_str()) {
                Ok(t) if !v.value.trim().is_empty() => {
                    out.insert(t, self.base.join(&v.value));
                }
                Ok(_) => self.diags.push(
                    Diagnostic::error(
                        format!("the schema of `{}` is an empty path", k.value),
                        v.span,
                    )
                    .with_label("expected a JSON Schema file"),
                ),
                Err(e) => self
                    .diags
                    .push(Diagnostic::error(e, k.span).with_label("not a message type")),
            }
        }
        // Every key was read as a type: nothing left to report as unknown.
        out
    }
}
