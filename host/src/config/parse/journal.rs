//! `[journal]`: whether the host records every handling of a message, where,
//! for how long, and whether with payloads.

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::model::{
    DEFAULT_JOURNAL_MAX_PAYLOAD, DEFAULT_JOURNAL_MAX_RECORDS, DEFAULT_JOURNAL_RETENTION,
    JournalConfig, StoreConfig, TransportConfig,
};
use crate::config::names::parse_size;
use crate::config::reader::Section;

/// The largest `max_payload`: a journal is a record, not a second queue.
const MAX_JOURNAL_PAYLOAD: u64 = 1 << 20;

impl Parser<'_> {
    /// `[journal]`: on by default, in the embedded transport's file or, on a
    /// broker, `.switchyard/<pipeline>-journal.db`.
    pub(super) fn journal_section(
        &mut self,
        root: &mut Section<'_>,
        transport: &TransportConfig,
    ) -> JournalConfig {
        let mut config = JournalConfig {
            enabled: true,
            store: StoreConfig::Embedded {
                path: self.default_store(transport, "journal"),
            },
            retention: DEFAULT_JOURNAL_RETENTION,
            max_records: DEFAULT_JOURNAL_MAX_RECORDS,
            payloads: None,
        };
        let Some(mut j) = root.table("journal", self.diags) else {
            return config;
        };
        if let Some(b) = j.bool("enabled", self.diags) {
            config.enabled = b.value;
        }
        if let Some(t) = self.duration(&mut j, "retention") {
            config.retention = t.value;
        }
        if let Some(n) = j.count("max_records", self.diags) {
            if n.value == 0 {
                self.diags.push(
                    Diagnostic::error("`journal.max_records` must be at least 1", n.span)
                        .with_label("zero")
                        .with_note("help: to keep no journal, set `enabled = false`"),
                );
            } else {
                config.max_records = n.value;
            }
        }
        let payloads = j.bool("payloads", self.diags).is_some_and(|b| b.value);
        let mut max_payload = DEFAULT_JOURNAL_MAX_PAYLOAD;
        if let Some(m) = j.string_or_int("max_payload", "a size like \"4 KiB\"", self.diags) {
            match parse_size(&m.value) {
                Ok(bytes) if (1..=MAX_JOURNAL_PAYLOAD).contains(&bytes) => max_payload = bytes,
                Ok(_) => self.diags.push(
                    Diagnostic::error(
                        "`journal.max_payload` must be between 1 byte and 1 MiB",
                        m.span,
                    )
                    .with_label("out of range"),
                ),
                Err(e) => self
                    .diags
                    .push(Diagnostic::error(e, m.span).with_label("not a size")),
            }
        }
        if payloads {
            config.payloads = Some(usize::try_from(max_payload).unwrap_or(usize::MAX));
        }
        let span = j.span();
        if let Some(store) = self.store_keys(&mut j, "journal", "keep the journal in a SQLite file")
        {
            if matches!(transport, TransportConfig::Embedded(_)) {
                self.diags.push(
                    Diagnostic::error("`[journal]` takes no store on the embedded transport", span)
                        .with_label("the embedded transport keeps the journal in its own file")
                        .with_note("note: there, each record commits in the same transaction as the message it describes; leave `path`, `url` and `url_env` out"),
                );
            } else {
                config.store = store;
            }
        }
        j.finish(self.diags);
        config
    }
}
