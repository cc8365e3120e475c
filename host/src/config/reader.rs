//! Reads TOML tables key by key, recording every mistake instead of stopping
//! at the first one.
//!
//! serde's `deny_unknown_fields` stops at the first problem of a table; an
//! operator fixing a pipeline wants them all at once. A [`Section`] wraps one
//! table: each typed getter records a diagnostic for a wrong type, and
//! [`Section::finish`] reports every key nobody asked for, with a suggestion.

use std::ops::Range;

use toml_edit::{Item, TableLike, Value};

use super::diagnostic::{Diagnostic, Diagnostics};

/// A value and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spanned<T> {
    pub value: T,
    pub span: Option<Range<usize>>,
}

impl<T> Spanned<T> {
    pub fn new(value: T, span: Option<Range<usize>>) -> Self {
        Spanned { value, span }
    }
}

/// One TOML table being read.
pub struct Section<'a> {
    /// Dotted path for messages, e.g. `plugins.orders`.
    path: String,
    table: &'a dyn TableLike,
    span: Option<Range<usize>>,
    known: Vec<&'static str>,
}

/// A human name for the type of a TOML item.
fn describe(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Value(v) => match v {
            Value::String(_) => "a string",
            Value::Integer(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Boolean(_) => "a boolean",
            Value::Datetime(_) => "a date-time",
            Value::Array(_) => "an array",
            Value::InlineTable(_) => "a table",
        },
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
    }
}

impl<'a> Section<'a> {
    pub fn new(
        path: impl Into<String>,
        table: &'a dyn TableLike,
        span: Option<Range<usize>>,
    ) -> Self {
        Section {
            path: path.into(),
            table,
            span,
            known: Vec::new(),
        }
    }

    /// Where this table is, for errors about the table as a whole.
    pub fn span(&self) -> Option<Range<usize>> {
        self.span.clone()
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    fn item(&mut self, key: &'static str) -> Option<&'a Item> {
        self.known.push(key);
        self.table.get(key).filter(|i| !i.is_none())
    }

    fn wrong_type(&self, key: &str, item: &Item, expected: &str, diags: &mut Diagnostics) {
        diags.push(
            Diagnostic::error(
                format!(
                    "`{}.{key}` must be {expected}, found {}",
                    self.path,
                    describe(item)
                ),
                item.span(),
            )
            .with_label(format!("expected {expected}")),
        );
    }

    fn missing(&self, key: &str, expected: &str, diags: &mut Diagnostics) {
        let (what, span) = if self.path.is_empty() {
            ("the pipeline".to_owned(), None)
        } else {
            (format!("[{}]", self.path), self.span.clone())
        };
        diags.push(
            Diagnostic::error(format!("{what} is missing `{key}`"), span)
                .with_label(format!("add `{key} = {expected}` to this table")),
        );
    }

    pub fn string(
        &mut self,
        key: &'static str,
        diags: &mut Diagnostics,
    ) -> Option<Spanned<String>> {
        let item = self.item(key)?;
        match item.as_str() {
            Some(s) => Some(Spanned::new(s.to_owned(), item.span())),
            None => {
                self.wrong_type(key, item, "a string", diags);
                None
            }
        }
    }

    pub fn required_string(
        &mut self,
        key: &'static str,
        example: &str,
        diags: &mut Diagnostics,
    ) -> Option<Spanned<String>> {
        if self.table.get(key).is_none() {
            self.known.push(key);
            self.missing(key, example, diags);
            return None;
        }
        self.string(key, diags)
    }

    pub fn bool(&mut self, key: &'static str, diags: &mut Diagnostics) -> Option<Spanned<bool>> {
        let item = self.item(key)?;
        match item.as_bool() {
            Some(b) => Some(Spanned::new(b, item.span())),
            None => {
                self.wrong_type(key, item, "true or false", diags);
                None
            }
        }
    }

    /// A non-negative integer.
    pub fn count(&mut self, key: &'static str, diags: &mut Diagnostics) -> Option<Spanned<u64>> {
        let item = self.item(key)?;
        match item.as_integer() {
            Some(n) if n >= 0 => Some(Spanned::new(n.unsigned_abs(), item.span())),
            Some(n) => {
                diags.push(
                    Diagnostic::error(
                        format!("`{}.{key}` must not be negative, found {n}", self.path),
                        item.span(),
                    )
                    .with_label("expected 0 or more"),
                );
                None
            }
            None => {
                self.wrong_type(key, item, "a whole number", diags);
                None
            }
        }
    }

    /// A number, integer or float.
    pub fn number(&mut self, key: &'static str, diags: &mut Diagnostics) -> Option<Spanned<f64>> {
        let item = self.item(key)?;
        if let Some(f) = item.as_float() {
            return Some(Spanned::new(f, item.span()));
        }
        if let Some(i) = item.as_integer() {
            return Some(Spanned::new(i as f64, item.span()));
        }
        self.wrong_type(key, item, "a number", diags);
        None
    }

    /// A string or an integer, returned as written (for sizes like `"64 MiB"`
    /// or `67108864`).
    pub fn string_or_int(
        &mut self,
        key: &'static str,
        expected: &str,
        diags: &mut Diagnostics,
    ) -> Option<Spanned<String>> {
        let item = self.item(key)?;
        if let Some(s) = item.as_str() {
            return Some(Spanned::new(s.to_owned(), item.span()));
        }
        if let Some(n) = item.as_integer() {
            return Some(Spanned::new(n.to_string(), item.span()));
        }
        self.wrong_type(key, item, expected, diags);
        None
    }

    /// An array of strings; wrong elements are reported one by one.
    pub fn strings(
        &mut self,
        key: &'static str,
        diags: &mut Diagnostics,
    ) -> Option<Vec<Spanned<String>>> {
        let item = self.item(key)?;
        let Some(array) = item.as_array() else {
            self.wrong_type(key, item, "an array of strings", diags);
            return None;
        };
        let mut out = Vec::with_capacity(array.len());
        for v in array.iter() {
            match v.as_str() {
                Some(s) => out.push(Spanned::new(s.to_owned(), v.span())),
                None => diags.push(
                    Diagnostic::error(
                        format!(
                            "`{}.{key}` must contain only strings, found {}",
                            self.path,
                            describe(&Item::Value(v.clone()))
                        ),
                        v.span(),
                    )
                    .with_label("expected a string"),
                ),
            }
        }
        Some(out)
    }

    /// A sub-table, either `[a.b]` or an inline `b = { ... }`.
    pub fn table(&mut self, key: &'static str, diags: &mut Diagnostics) -> Option<Section<'a>> {
        let item = self.item(key)?;
        match item.as_table_like() {
            Some(t) => Some(Section::new(
                self.child_path(key),
                t,
                item.span().or_else(|| self.key_span(key)),
            )),
            None => {
                self.wrong_type(key, item, "a table", diags);
                None
            }
        }
    }

    /// An array of inline tables or `[[a.b]]` tables.
    pub fn tables(
        &mut self,
        key: &'static str,
        diags: &mut Diagnostics,
    ) -> Option<Vec<Section<'a>>> {
        let item = self.item(key)?;
        let path = self.child_path(key);
        if let Some(aot) = item.as_array_of_tables() {
            return Some(
                aot.iter()
                    .enumerate()
                    .map(|(i, t)| Section::new(format!("{path}[{i}]"), t, t.span()))
                    .collect(),
            );
        }
        let Some(array) = item.as_array() else {
            self.wrong_type(key, item, "an array of tables", diags);
            return None;
        };
        let mut out = Vec::new();
        for (i, v) in array.iter().enumerate() {
            match v.as_inline_table() {
                Some(t) => out.push(Section::new(format!("{path}[{i}]"), t, v.span())),
                None => diags.push(
                    Diagnostic::error(
                        format!("`{path}` must contain only tables like `{{ ... }}`"),
                        v.span(),
                    )
                    .with_label("expected a table"),
                ),
            }
        }
        Some(out)
    }

    /// Every entry of a table whose keys are names chosen by the user (like
    /// `[plugins.NAME]`), as sub-sections.
    pub fn entries(&mut self, diags: &mut Diagnostics) -> Vec<(Spanned<String>, Section<'a>)> {
        let mut out = Vec::new();
        for (key, item) in self.table.iter() {
            let key_span = self.key_span(key);
            match item.as_table_like() {
                Some(t) => out.push((
                    Spanned::new(key.to_owned(), key_span.clone()),
                    Section::new(self.child_path(key), t, item.span().or(key_span)),
                )),
                None => diags.push(
                    Diagnostic::error(
                        format!(
                            "`{}` must be a table like [{}], found {}",
                            self.child_path(key),
                            self.child_path(key),
                            describe(item)
                        ),
                        key_span,
                    )
                    .with_label("expected a table"),
                ),
            }
        }
        out
    }

    /// Every entry of a table of strings (like `env = { K = "v" }`).
    pub fn string_map(
        &mut self,
        diags: &mut Diagnostics,
    ) -> Vec<(Spanned<String>, Spanned<String>)> {
        let mut out = Vec::new();
        for (key, item) in self.table.iter() {
            let key_span = self.key_span(key);
            match item.as_str() {
                Some(v) => out.push((
                    Spanned::new(key.to_owned(), key_span),
                    Spanned::new(v.to_owned(), item.span()),
                )),
                None => self.wrong_type(key, item, "a string", diags),
            }
        }
        out
    }

    fn key_span(&self, key: &str) -> Option<Range<usize>> {
        self.table.key(key).and_then(|k| k.span())
    }

    fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Keys present that no getter has asked for (yet).
    pub fn unknown_keys(&self) -> Vec<&'a str> {
        self.table
            .iter()
            .map(|(k, _)| k)
            .filter(|k| !self.known.contains(k))
            .collect()
    }

    /// Reports every key that no getter asked for.
    pub fn finish(self, diags: &mut Diagnostics) {
        for (key, _) in self.table.iter() {
            if self.known.contains(&key) {
                continue;
            }
            let place = if self.path.is_empty() {
                "at the top level".to_owned()
            } else {
                format!("in [{}]", self.path)
            };
            let mut d =
                Diagnostic::error(format!("unknown key `{key}` {place}"), self.key_span(key))
                    .with_label("not a known setting");
            match closest(key, &self.known) {
                Some(s) => d = d.with_note(format!("help: did you mean `{s}`?")),
                None => {
                    let mut known = self.known.clone();
                    known.sort_unstable();
                    known.dedup();
                    d = d.with_note(format!("note: known keys are {}", quote_list(&known)));
                }
            }
            diags.push(d);
        }
    }
}

/// `a`, `b` and `c`.
pub fn quote_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("`{s}`")).collect();
    match quoted.as_slice() {
        [] => "none".to_owned(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// The known key closest to a misspelt one, if any is close enough.
pub fn closest<'k>(word: &str, candidates: &[&'k str]) -> Option<&'k str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_keys_only() {
        assert_eq!(
            closest("handels", &["commands", "wasm", "handles"]),
            Some("handles")
        );
        assert_eq!(closest("timout", &["timeout", "memory"]), Some("timeout"));
        assert_eq!(closest("zzz", &["timeout", "memory"]), None);
    }

    #[test]
    fn quotes_lists() {
        assert_eq!(quote_list(&["a"]), "`a`");
        assert_eq!(quote_list(&["a", "b", "c"]), "`a`, `b` and `c`");
    }
}
