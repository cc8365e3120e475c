//! `[pipeline]`: the pipeline's name, or one made from the file's name.

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::names::PluginName;
use crate::config::reader::Section;

impl Parser<'_> {
    /// `[pipeline]`: its name (checked like a plugin name) and description.
    pub(super) fn pipeline_section(&mut self, root: &mut Section<'_>, stem: &str) -> String {
        let Some(mut section) = root.table("pipeline", self.diags) else {
            return default_pipeline_name(stem);
        };
        let name = section.string("name", self.diags).and_then(|n| {
            match PluginName::try_from(n.value.as_str()) {
                Ok(_) => Some(n.value),
                Err(e) => {
                    self.diags.push(
                        Diagnostic::error(e.replace("plugin name", "pipeline name"), n.span)
                            .with_label("invalid name"),
                    );
                    None
                }
            }
        });
        let _ = section.string("description", self.diags);
        section.finish(self.diags);
        name.unwrap_or_else(|| default_pipeline_name(stem))
    }
}

/// A pipeline name made from the file's name.
fn default_pipeline_name(stem: &str) -> String {
    let cleaned: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    if cleaned.starts_with(|c: char| c.is_ascii_lowercase()) {
        cleaned
    } else {
        format!("p-{cleaned}")
    }
}
