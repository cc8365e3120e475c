//! Reads TOML tables key by key, recording every mistake instead of stopping
//! at the first one.
//!
//! serde's `deny_unknown_fields` stops at the first problem of a table; an
//! operator fixing a pipeline wants them all at once. A [`Section`] wraps one
//! table: each typed getter records a diagnostic for a wrong type, and
//! [`Section::finish`] reports every key nobody asked for, with a suggestion.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
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

/// How a key is read. The reader records the shapes it asks for when asked
/// to ([`record_shapes`]): the pipeline file's JSON Schema is generated from
/// them, so it says what the reader reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Shape {
    String,
    Bool,
    /// A whole number, 0 or more.
    Count,
    /// A whole number in a range.
    CountIn(u64, u64),
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// An array of strings, each matching this regular expression.
    StringsMatching(&'static str),
    /// An integer or a float.
    Number,
    /// A string or an integer (sizes: `"64 MiB"` or `67108864`).
    StringOrInt,
    /// An array of strings.
    Strings,
    /// A sub-table.
    Table,
    /// An array of tables.
    Tables,
}

/// What the reader asked of one table, at a path with `*` for a name the
/// user chooses and `[]` for the items of an array of tables (e.g.
/// `plugins.*.grants.dirs[]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableShape {
    /// Every key asked for, with the shapes it was read as.
    pub keys: BTreeMap<&'static str, BTreeSet<Shape>>,
    /// The keys that must be there.
    pub required: BTreeSet<&'static str>,
    /// Its keys are names the user chooses, each a table (`[plugins.NAME]`).
    pub entries: bool,
    /// The regular expression such names match.
    pub names: Option<&'static str>,
    /// Its keys are names the user chooses, each a string (`env = { K = "v" }`).
    pub strings: bool,
}

thread_local! {
    static SHAPES: RefCell<Option<BTreeMap<String, TableShape>>> = const { RefCell::new(None) };
}

/// Runs `read`, recording every table the reader enters and every key it
/// asks for; returns them by path.
pub fn record_shapes(read: impl FnOnce()) -> BTreeMap<String, TableShape> {
    /// Stops the recording however `read` ends, a panic included.
    struct Recording;
    impl Drop for Recording {
        fn drop(&mut self) {
            SHAPES.with(|s| s.borrow_mut().take());
        }
    }
    SHAPES.with(|s| *s.borrow_mut() = Some(BTreeMap::new()));
    let recording = Recording;
    read();
    let shapes = SHAPES.with(|s| s.borrow_mut().take()).unwrap_or_default();
    drop(recording);
    shapes
}

fn note(path: &str, change: impl FnOnce(&mut TableShape)) {
    SHAPES.with(|s| {
        if let Some(map) = s.borrow_mut().as_mut() {
            change(map.entry(path.to_owned()).or_default());
        }
    });
}

/// One TOML table being read.
pub struct Section<'a> {
    /// Dotted path for messages, e.g. `plugins.orders`.
    path: String,
    /// The path for [`record_shapes`], e.g. `plugins.*`.
    shape_path: String,
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
        let path = path.into();
        Section::at(path.clone(), path, table, span)
    }

    fn at(
        path: String,
        shape_path: String,
        table: &'a dyn TableLike,
        span: Option<Range<usize>>,
    ) -> Self {
        note(&shape_path, |_| {});
        Section {
            path,
            shape_path,
            table,
            span,
            known: Vec::new(),
        }
    }

    fn shape(&self, key: &'static str, shape: Shape) {
        note(&self.shape_path, |t| {
            t.keys.entry(key).or_default().insert(shape);
        });
    }

    fn child_shape_path(&self, key: &str) -> String {
        if self.shape_path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.shape_path)
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
        self.shape(key, Shape::String);
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
        note(&self.shape_path, |t| {
            t.required.insert(key);
        });
        if self.table.get(key).is_none() {
            self.shape(key, Shape::String);
            self.known.push(key);
            self.missing(key, example, diags);
            return None;
        }
        self.string(key, diags)
    }

    pub fn bool(&mut self, key: &'static str, diags: &mut Diagnostics) -> Option<Spanned<bool>> {
        self.shape(key, Shape::Bool);
        let item = self.item(key)?;
        match item.as_bool() {
            Some(b) => Some(Spanned::new(b, item.span())),
            None => {
                self.wrong_type(key, item, "true or false", diags);
                None
            }
        }
    }

    /// Notes that the table must have `key` (a table or a value read by
    /// another getter, whose absence the caller reports); whether it has.
    pub fn require(&mut self, key: &'static str) -> bool {
        note(&self.shape_path, |t| {
            t.required.insert(key);
        });
        self.table.get(key).is_some_and(|i| !i.is_none())
    }

    /// A string that must be one of `allowed`; any other is reported, with
    /// the closest allowed one as a suggestion, and `note` if given.
    pub fn choice(
        &mut self,
        key: &'static str,
        allowed: &'static [&'static str],
        note: Option<&str>,
        diags: &mut Diagnostics,
    ) -> Option<Spanned<String>> {
        self.shape(key, Shape::OneOf(allowed));
        let item = self.item(key)?;
        let Some(s) = item.as_str() else {
            self.wrong_type(key, item, "a string", diags);
            return None;
        };
        if allowed.contains(&s) {
            return Some(Spanned::new(s.to_owned(), item.span()));
        }
        let mut d = Diagnostic::error(
            format!(
                "`{}` must be {}, found `{s}`",
                self.child_path(key),
                one_of_list(allowed)
            ),
            item.span(),
        )
        .with_label("not a known choice");
        if let Some(c) = closest(s, allowed) {
            d = d.with_note(format!("help: did you mean `{c}`?"));
        }
        if let Some(n) = note {
            d = d.with_note(format!("note: {n}"));
        }
        diags.push(d);
        None
    }

    /// A whole number within `range`.
    pub fn count_in(
        &mut self,
        key: &'static str,
        range: std::ops::RangeInclusive<u64>,
        diags: &mut Diagnostics,
    ) -> Option<Spanned<u64>> {
        let (min, max) = (*range.start(), *range.end());
        let n = self.count(key, diags);
        // Recorded over `count`'s plain shape.
        note(&self.shape_path, |t| {
            t.keys
                .insert(key, BTreeSet::from([Shape::CountIn(min, max)]));
        });
        let n = n?;
        if range.contains(&n.value) {
            return Some(n);
        }
        diags.push(
            Diagnostic::error(
                format!(
                    "`{}` must be between {min} and {max}, found {}",
                    self.child_path(key),
                    n.value
                ),
                n.span,
            )
            .with_label("out of range"),
        );
        None
    }

    /// An array of strings that should match `pattern` (a regular
    /// expression the caller's own check agrees with, for the schema); read
    /// as [`Section::strings`].
    pub fn strings_matching(
        &mut self,
        key: &'static str,
        pattern: &'static str,
        diags: &mut Diagnostics,
    ) -> Option<Vec<Spanned<String>>> {
        let out = self.strings(key, diags);
        note(&self.shape_path, |t| {
            t.keys
                .insert(key, BTreeSet::from([Shape::StringsMatching(pattern)]));
        });
        out
    }

    /// A non-negative integer.
    pub fn count(&mut self, key: &'static str, diags: &mut Diagnostics) -> Option<Spanned<u64>> {
        self.shape(key, Shape::Count);
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
        self.shape(key, Shape::Number);
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
        self.shape(key, Shape::StringOrInt);
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
        self.shape(key, Shape::Strings);
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
        self.shape(key, Shape::Table);
        let item = self.item(key)?;
        match item.as_table_like() {
            Some(t) => Some(Section::at(
                self.child_path(key),
                self.child_shape_path(key),
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
        self.shape(key, Shape::Tables);
        let item = self.item(key)?;
        let path = self.child_path(key);
        let shape_path = format!("{}[]", self.child_shape_path(key));
        if let Some(aot) = item.as_array_of_tables() {
            return Some(
                aot.iter()
                    .enumerate()
                    .map(|(i, t)| {
                        Section::at(format!("{path}[{i}]"), shape_path.clone(), t, t.span())
                    })
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
                Some(t) => out.push(Section::at(
                    format!("{path}[{i}]"),
                    shape_path.clone(),
                    t,
                    v.span(),
                )),
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

    /// [`Section::entries`] whose names should match `pattern` (a regular
    /// expression the caller's own check agrees with, for the schema).
    pub fn entries_named(
        &mut self,
        pattern: &'static str,
        diags: &mut Diagnostics,
    ) -> Vec<(Spanned<String>, Section<'a>)> {
        note(&self.shape_path, |t| t.names = Some(pattern));
        self.entries(diags)
    }

    /// Every entry of a table whose keys are names chosen by the user (like
    /// `[plugins.NAME]`), as sub-sections.
    pub fn entries(&mut self, diags: &mut Diagnostics) -> Vec<(Spanned<String>, Section<'a>)> {
        note(&self.shape_path, |t| t.entries = true);
        let entry_shape_path = self.child_shape_path("*");
        let mut out = Vec::new();
        for (key, item) in self.table.iter() {
            let key_span = self.key_span(key);
            match item.as_table_like() {
                Some(t) => out.push((
                    Spanned::new(key.to_owned(), key_span.clone()),
                    Section::at(
                        self.child_path(key),
                        entry_shape_path.clone(),
                        t,
                        item.span().or(key_span),
                    ),
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
        note(&self.shape_path, |t| t.strings = true);
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

/// `a`, `b` or `c`.
fn one_of_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("`{s}`")).collect();
    match quoted.as_slice() {
        [] => "nothing".to_owned(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
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
