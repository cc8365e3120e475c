//! Errors and warnings about a pipeline file, with the place they point at,
//! rendered the way compilers do: `file:line:col`, the line, a caret.

use std::fmt::Write as _;
use std::ops::Range;

/// How bad a [`Diagnostic`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The pipeline cannot run.
    Error,
    /// The pipeline runs, but probably not as intended.
    Warning,
}

/// One problem found in a pipeline file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    /// Byte range in the source; `None` when the problem has no place (e.g.
    /// the file is missing).
    pub span: Option<Range<usize>>,
    /// Short text shown under the caret.
    pub label: Option<String>,
    /// Extra lines, e.g. "help: did you mean ...".
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>, span: Option<Range<usize>>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            span,
            label: None,
            notes: Vec::new(),
        }
    }

    pub fn warning(message: impl Into<String>, span: Option<Range<usize>>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Self::error(message, span)
        }
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// Renders the diagnostic against the source it points into.
    pub fn render(&self, path: &str, source: &str) -> String {
        let mut out = String::new();
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let _ = writeln!(out, "{sev}: {}", self.message);
        match &self.span {
            Some(span) => {
                let (line_no, col, line) = locate(source, span.start);
                let gutter = " ".repeat(line_no.to_string().len());
                let _ = writeln!(out, "{gutter}--> {path}:{line_no}:{col}");
                let _ = writeln!(out, "{gutter} |");
                let _ = writeln!(out, "{line_no} | {line}");
                // Underline the span, clipped to its first line.
                let width = span
                    .end
                    .saturating_sub(span.start)
                    .min(line.len().saturating_sub(col - 1))
                    .max(1);
                let pad: String = line
                    .chars()
                    .take(col - 1)
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                let label = self
                    .label
                    .as_deref()
                    .map(|l| format!(" {l}"))
                    .unwrap_or_default();
                let _ = writeln!(out, "{gutter} | {pad}{}{label}", "^".repeat(width));
                for note in &self.notes {
                    let _ = writeln!(out, "{gutter} = {note}");
                }
            }
            None => {
                let _ = writeln!(out, " --> {path}");
                for note in &self.notes {
                    let _ = writeln!(out, "  = {note}");
                }
            }
        }
        out
    }
}

/// 1-based line, 1-based column (in characters) and the text of the line
/// holding byte `offset`.
pub fn locate(source: &str, offset: usize) -> (usize, usize, &str) {
    let offset = offset.min(source.len());
    let mut start = 0;
    let mut line_no = 1;
    for (i, b) in source.bytes().enumerate() {
        if i >= offset {
            break;
        }
        if b == b'\n' {
            start = i + 1;
            line_no += 1;
        }
    }
    let end = source[start..]
        .find('\n')
        .map_or(source.len(), |n| start + n);
    let line = source[start..end].trim_end_matches('\r');
    let col = source
        .get(start..offset)
        .map_or(1, |prefix| prefix.chars().count() + 1);
    (line_no, col, line)
}

/// All the diagnostics of one file, errors and warnings.
#[derive(Clone, Debug, Default)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.items.push(d);
    }

    pub fn error(&mut self, message: impl Into<String>, span: Option<Range<usize>>) {
        self.push(Diagnostic::error(message, span));
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(Diagnostic::is_error)
    }

    pub fn error_count(&self) -> usize {
        self.items.iter().filter(|d| d.is_error()).count()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter()
    }

    /// Orders diagnostics by position so output reads top to bottom.
    pub fn sort(&mut self) {
        self.items
            .sort_by_key(|d| d.span.as_ref().map_or(usize::MAX, |s| s.start));
    }

    pub fn into_vec(self) -> Vec<Diagnostic> {
        self.items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_lines_and_columns() {
        let src = "a = 1\nbb = 2\n";
        assert_eq!(locate(src, 0), (1, 1, "a = 1"));
        assert_eq!(locate(src, 6), (2, 1, "bb = 2"));
        assert_eq!(locate(src, 11), (2, 6, "bb = 2"));
        assert_eq!(locate(src, 999).0, 3);
    }

    #[test]
    fn renders_file_line_col_and_caret() {
        let src = "[plugins.a]\nwasm = 3\n";
        let d = Diagnostic::error("expected a string", Some(19..20)).with_label("here");
        let text = d.render("p.toml", src);
        assert!(text.contains("\n --> p.toml:2:8\n"), "{text}");
        assert!(text.contains("2 | wasm = 3"), "{text}");
        assert!(text.contains("  |        ^ here"), "{text}");
    }
}
