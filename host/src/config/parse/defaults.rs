//! `[defaults]`, and the limit keys it shares with every plugin table
//! (`memory`, `timeout`, `recycle_after`, `max_outputs`, `max_state_value`,
//! `max_state_keys`, `concurrency`).

use std::time::Duration;

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::model::{Limits, MAX_CONCURRENCY};
use crate::config::names::{format_size, parse_size};
use crate::config::reader::Section;
use crate::recover::RetryPolicy;

/// Wasm linear memory is 32-bit: 4 GiB is the most any plugin can use.
const MAX_MEMORY: u64 = 4 << 30;
const MIN_MEMORY: u64 = 1 << 20;
/// A state value travels in one row and one message's transaction.
const MAX_STATE_VALUE: u64 = 64 << 20;
const MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);

impl Parser<'_> {
    /// Reads the limit keys of `[defaults]` or a plugin table over `base`.
    pub(super) fn limits(&mut self, section: &mut Section<'_>, base: &Limits) -> Limits {
        let mut limits = base.clone();
        if let Some(m) = section.string_or_int("memory", "a size like \"64 MiB\"", self.diags) {
            match parse_size(&m.value) {
                Ok(bytes) if (MIN_MEMORY..=MAX_MEMORY).contains(&bytes) => limits.memory = bytes,
                Ok(bytes) => self.diags.push(
                    Diagnostic::error(
                        format!(
                            "memory limit {} is out of range: it must be between 1 MiB and 4 GiB",
                            format_size(bytes)
                        ),
                        m.span,
                    )
                    .with_label("out of range"),
                ),
                Err(e) => self
                    .diags
                    .push(Diagnostic::error(e, m.span).with_label("not a size")),
            }
        }
        if let Some(t) = self.duration(section, "timeout") {
            if t.value > MAX_TIMEOUT {
                self.diags.push(
                    Diagnostic::error(
                        format!(
                            "timeout {} is longer than the 15 minute maximum",
                            humantime::format_duration(t.value)
                        ),
                        t.span,
                    )
                    .with_label("too long"),
                );
            } else {
                limits.timeout = t.value;
            }
        }
        if let Some(n) = section.count("recycle_after", self.diags) {
            if n.value == 0 {
                self.diags.push(
                    Diagnostic::error("`recycle_after` must be at least 1", n.span)
                        .with_label("zero"),
                );
            } else {
                limits.recycle_after = n.value;
            }
        }
        if let Some(n) = section.count("max_outputs", self.diags) {
            limits.max_outputs = n.value;
        }
        if let Some(m) =
            section.string_or_int("max_state_value", "a size like \"64 KiB\"", self.diags)
        {
            match parse_size(&m.value) {
                Ok(bytes) if bytes <= MAX_STATE_VALUE => limits.max_state_value = bytes,
                Ok(bytes) => self.diags.push(
                    Diagnostic::error(
                        format!(
                            "max_state_value {} is over the {} maximum",
                            format_size(bytes),
                            format_size(MAX_STATE_VALUE)
                        ),
                        m.span,
                    )
                    .with_label("too large"),
                ),
                Err(e) => self
                    .diags
                    .push(Diagnostic::error(e, m.span).with_label("not a size")),
            }
        }
        if let Some(n) = section.count("max_state_keys", self.diags) {
            limits.max_state_keys = n.value;
        }
        if let Some(n) = section.count_in("concurrency", 1..=MAX_CONCURRENCY as u64, self.diags) {
            limits.concurrency = usize::try_from(n.value).unwrap_or(MAX_CONCURRENCY);
        }
        limits
    }

    /// `[defaults]`: limits and `[defaults.retry]` for every plugin.
    pub(super) fn defaults_section(&mut self, root: &mut Section<'_>) -> (Limits, RetryPolicy) {
        let Some(mut section) = root.table("defaults", self.diags) else {
            return (Limits::default(), RetryPolicy::default());
        };
        let limits = self.limits(&mut section, &Limits::default());
        let retry = match section.table("retry", self.diags) {
            Some(r) => self.retry(r, &RetryPolicy::default()),
            None => RetryPolicy::default(),
        };
        section.finish(self.diags);
        (limits, retry)
    }
}
