//! `retry` tables (`[defaults.retry]`, `[plugins.NAME.retry]`): how often
//! and how patiently a failed message is tried again.

use super::Parser;
use crate::config::diagnostic::Diagnostic;
use crate::config::model::MAX_HISTORY;
use crate::config::reader::Section;
use crate::recover::{FailureKind, RetryPolicy};

impl Parser<'_> {
    /// A `retry` table over `base`.
    pub(super) fn retry(&mut self, mut r: Section<'_>, base: &RetryPolicy) -> RetryPolicy {
        let mut policy = base.clone();
        self.retry_counts(&mut r, &mut policy);
        self.retry_waits(&mut r, &mut policy);
        self.retry_on(&mut r, &mut policy);
        r.finish(self.diags);
        policy
    }

    /// `immediate` and `delayed`, and the attempts they make together.
    fn retry_counts(&mut self, r: &mut Section<'_>, policy: &mut RetryPolicy) {
        if let Some(n) = r.count_in("immediate", 0..=100, self.diags) {
            policy.immediate = u32::try_from(n.value).unwrap_or(100);
        }
        if let Some(n) = r.count_in("delayed", 0..=1000, self.diags) {
            policy.delayed = u32::try_from(n.value).unwrap_or(1000);
        }
        let attempts = (u64::from(policy.immediate) + 1) * (u64::from(policy.delayed) + 1);
        if attempts > MAX_HISTORY as u64 {
            self.diags.push(
                Diagnostic::error(
                    format!(
                        "`{}` lets one message be tried {attempts} times, more than the {} attempts a message carries in its history",
                        r.path(),
                        MAX_HISTORY
                    ),
                    r.span(),
                )
                .with_label("too many attempts")
                .with_note("help: each delayed retry makes `immediate + 1` attempts; lower `immediate` or `delayed`"),
            );
        }
    }

    /// `backoff` and `max_backoff`.
    fn retry_waits(&mut self, r: &mut Section<'_>, policy: &mut RetryPolicy) {
        let backoff = self.duration(r, "backoff");
        if let Some(d) = &backoff {
            policy.backoff = d.value;
        }
        let max = self.duration(r, "max_backoff");
        if let Some(d) = &max {
            policy.max_backoff = d.value;
        }
        // Checked where the waits are set, not again in every table that
        // inherits them.
        if (backoff.is_some() || max.is_some()) && policy.max_backoff < policy.backoff {
            self.diags.push(
                Diagnostic::error(
                    format!(
                        "`{}.max_backoff` ({}) is shorter than `backoff` ({})",
                        r.path(),
                        humantime::format_duration(policy.max_backoff),
                        humantime::format_duration(policy.backoff)
                    ),
                    max.and_then(|m| m.span).or(r.span()),
                )
                .with_label("shorter than the first wait"),
            );
        }
    }

    /// `retry_on`: the failure kinds worth another attempt.
    fn retry_on(&mut self, r: &mut Section<'_>, policy: &mut RetryPolicy) {
        if let Some(kinds) = r.strings("retry_on", self.diags) {
            let mut retry_on = Vec::new();
            for k in kinds {
                match FailureKind::parse(&k.value) {
                    Some(kind) if kind.is_never_retried() => self.diags.push(
                        Diagnostic::error(format!("`{}` failures are never retried", k.value), k.span)
                            .with_label("not retryable")
                            .with_note("note: a permanent failure, a contract violation, a malformed or undeliverable message, or one that crashed the host again and again cannot be fixed by trying again; it goes to the dead-letter store"),
                    ),
                    Some(kind) => retry_on.push(kind),
                    None => self.diags.push(
                        Diagnostic::error(format!("unknown failure kind `{}`", k.value), k.span)
                            .with_label("not a failure kind")
                            .with_note("help: retryable kinds are `transient`, `timeout`, `trap` and `out-of-memory`"),
                    ),
                }
            }
            policy.retry_on = retry_on;
        }
    }
}
