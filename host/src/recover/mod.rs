//! What happens after a failure: classification, the retry policy, backoff
//! with jitter, and the fingerprint that groups dead letters by cause.

use std::fmt;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// How a message failed, as the host classifies it. Stored and sent by
/// the names [`FailureKind::as_str`] gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    /// The handler said: retry later.
    Transient,
    /// The handler said: this message is poison.
    Permanent,
    /// The plugin trapped (a panic, an unreachable, a bad memory access...).
    Trap,
    /// The plugin ran past its CPU deadline.
    Timeout,
    /// The plugin tried to grow memory past its cap.
    OutOfMemory,
    /// The plugin emitted something its declaration does not allow.
    ContractViolation,
    /// The stored message could not be decoded, or breaks one of the host's
    /// limits; no plugin saw it.
    Malformed,
    /// The broker refuses the outcome of the message for good (a record
    /// over its size limit, a command no queue takes).
    Undeliverable,
    /// The host died while handling this message, again and again
    /// (`[host] crash_loop_limit` times in a row); no plugin sees it again.
    CrashLoop,
    /// A saga's message found no instance: its instance key does not
    /// resolve, the instance does not exist or has completed
    /// (`not_found = "dead-letter"`), or its stored instance is corrupt.
    NoInstance,
}

impl FailureKind {
    pub const ALL: [FailureKind; 10] = [
        FailureKind::Transient,
        FailureKind::Permanent,
        FailureKind::Trap,
        FailureKind::Timeout,
        FailureKind::OutOfMemory,
        FailureKind::ContractViolation,
        FailureKind::Malformed,
        FailureKind::Undeliverable,
        FailureKind::CrashLoop,
        FailureKind::NoInstance,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Transient => "transient",
            FailureKind::Permanent => "permanent",
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::OutOfMemory => "out-of-memory",
            FailureKind::ContractViolation => "contract-violation",
            FailureKind::Malformed => "malformed",
            FailureKind::Undeliverable => "undeliverable",
            FailureKind::CrashLoop => "crash-loop",
            FailureKind::NoInstance => "no-instance",
        }
    }

    pub fn parse(s: &str) -> Option<FailureKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Kinds a retry can never fix: the message or the plugin's contract is
    /// wrong, not the moment.
    pub fn is_never_retried(self) -> bool {
        matches!(
            self,
            FailureKind::Permanent
                | FailureKind::ContractViolation
                | FailureKind::Malformed
                | FailureKind::Undeliverable
                | FailureKind::CrashLoop
                | FailureKind::NoInstance
        )
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a failed message is tried again, per plugin.
///
/// Each delivery gets `immediate` quick retries on the spot; after those, the
/// message is scheduled again `delayed` times, waiting `backoff`, then twice
/// that, and so on up to `max_backoff` (each wait jittered), and finally
/// goes to the dead-letter store. Only the kinds in `retry_on` are retried;
/// everything else is dead-lettered after its first attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub immediate: u32,
    pub delayed: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub retry_on: Vec<FailureKind>,
}

/// Retrying a timeout is worth it (a dependency may have been slow); traps
/// and memory exhaustion are usually deterministic for a given message.
pub const DEFAULT_RETRY_ON: [FailureKind; 2] = [FailureKind::Transient, FailureKind::Timeout];

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            immediate: 1,
            delayed: 3,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5 * 60),
            retry_on: DEFAULT_RETRY_ON.to_vec(),
        }
    }
}

/// What to do with a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Try again at once.
    RetryNow,
    /// Schedule the message again after this long.
    RetryLater(Duration),
    /// Give up: write a dead letter.
    DeadLetter,
}

impl Decision {
    /// The name recorded in the attempt history.
    pub fn as_str(self) -> &'static str {
        self.then().as_str()
    }

    /// What a message's history records of this decision.
    pub fn then(self) -> Then {
        match self {
            Decision::RetryNow => Then::RetryNow,
            Decision::RetryLater(_) => Then::RetryLater,
            Decision::DeadLetter => Then::DeadLetter,
        }
    }
}

/// What the host did after a failed attempt, as the attempt history
/// records it (`retry-now`, `retry-later`, `dead-letter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    RetryNow,
    RetryLater,
    DeadLetter,
}

impl Then {
    pub fn as_str(self) -> &'static str {
        match self {
            Then::RetryNow => "retry-now",
            Then::RetryLater => "retry-later",
            Then::DeadLetter => "dead-letter",
        }
    }

    pub fn parse(s: &str) -> Option<Then> {
        [Then::RetryNow, Then::RetryLater, Then::DeadLetter]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

impl fmt::Display for Then {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RetryPolicy {
    /// Decides after a failure of `kind`, given the immediate retries already
    /// spent on this delivery and the delayed retries spent on this message.
    pub fn decide(&self, kind: FailureKind, immediate_used: u32, delayed_used: u32) -> Decision {
        if kind.is_never_retried() || !self.retry_on.contains(&kind) {
            return Decision::DeadLetter;
        }
        if immediate_used < self.immediate {
            return Decision::RetryNow;
        }
        if delayed_used < self.delayed {
            return Decision::RetryLater(self.delay(delayed_used + 1, fastrand::f64()));
        }
        Decision::DeadLetter
    }

    /// The wait before delayed retry `n` (1-based): `backoff × 2^(n-1)`,
    /// capped, then jittered to between half and all of it so that messages
    /// that failed together do not come back together. `unit` is a random
    /// number in `[0, 1)`.
    pub fn delay(&self, n: u32, unit: f64) -> Duration {
        let exp = self
            .backoff
            .saturating_mul(2u32.saturating_pow(n.saturating_sub(1)))
            .min(self.max_backoff);
        exp.mul_f64(0.5 + unit.clamp(0.0, 1.0) / 2.0)
    }
}

/// The failure text with its variable parts (numbers, ids, hex, quoted
/// values) replaced, so failures of one cause group together.
pub fn normalize(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(256));
    let mut chars = message.chars().peekable();
    while let Some(c) = chars.next() {
        if out.len() >= 240 {
            break;
        }
        match c {
            '"' | '\'' | '`' => {
                // A quoted value: keep the quotes, drop the contents.
                let close = c;
                let mut closed = false;
                for n in chars.by_ref() {
                    if n == close {
                        closed = true;
                        break;
                    }
                }
                out.push(close);
                out.push('…');
                if closed {
                    out.push(close);
                }
            }
            c if c.is_ascii_hexdigit() => {
                let mut token = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_ascii_alphanumeric() || n == '-' || n == '_' {
                        token.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push_str(&generalize(&token));
            }
            c if c.is_alphanumeric() || c == '_' => {
                let mut token = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_alphanumeric() || n == '-' || n == '_' {
                        token.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push_str(&generalize(&token));
            }
            c if c.is_whitespace() => {
                if !out.ends_with(' ') {
                    out.push(' ');
                }
            }
            c => out.push(c),
        }
    }
    out.trim().to_owned()
}

/// One word of a message: kept if it reads like a word, replaced if it
/// carries a value.
fn generalize(token: &str) -> String {
    let digits = token.chars().filter(char::is_ascii_digit).count();
    let is_hex = token.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    if digits == 0 {
        return token.to_owned();
    }
    if is_hex && token.len() >= 8 {
        return "<id>".into();
    }
    if digits == token.len() {
        return "#".into();
    }
    // Letters with digits, e.g. `A-1002` or `v2`: keep the letters.
    let mut out = String::new();
    let mut in_digits = false;
    for c in token.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

/// The frame of a wasm backtrace that best names where a trap happened: the
/// first one outside the runtime, allocator and panic machinery.
pub fn culprit_frame(backtrace: &str) -> Option<&str> {
    const MACHINERY: [&str; 12] = [
        "std::",
        "core::",
        "alloc::",
        "__rust",
        "rust_panic",
        "panic",
        "abort",
        "dlmalloc",
        "<unnamed>",
        "wit_bindgen",
        "cabi_",
        "__wasm",
    ];
    backtrace
        .lines()
        .filter_map(|l| l.split_once(": ").map(|(_, name)| name.trim()))
        .find(|name| {
            !MACHINERY
                .iter()
                .any(|m| name.starts_with(m) || name.contains("::panicking::"))
        })
}

/// The cause of a failure, for grouping: a short hash of the plugin, the
/// failure kind, the normalized message and (for traps) the frame that
/// trapped. Returns the hash and the normalized text.
pub fn fingerprint(
    plugin: &str,
    kind: &str,
    message: &str,
    backtrace: Option<&str>,
) -> (String, String) {
    let mut text = normalize(message);
    if let Some(frame) = backtrace.and_then(culprit_frame) {
        text.push_str(" @ ");
        text.push_str(frame);
    }
    let mut h = Sha256::new();
    for part in [plugin, kind, &text] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let hash = hex::encode(h.finalize());
    (hash[..12].to_owned(), text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_decisions_are_read_back_by_their_names() {
        for kind in FailureKind::ALL {
            assert_eq!(FailureKind::parse(kind.as_str()), Some(kind));
        }
        for decision in [
            Decision::RetryNow,
            Decision::RetryLater(Duration::from_secs(1)),
            Decision::DeadLetter,
        ] {
            assert_eq!(decision.as_str(), decision.then().as_str());
            assert_eq!(Then::parse(decision.as_str()), Some(decision.then()));
        }
        assert_eq!(Then::parse("retry-someday"), None);
    }

    #[test]
    fn permanent_failures_are_never_retried() {
        let p = RetryPolicy::default();
        assert_eq!(p.decide(FailureKind::Permanent, 0, 0), Decision::DeadLetter);
        assert_eq!(
            p.decide(FailureKind::ContractViolation, 0, 0),
            Decision::DeadLetter
        );
        // Even when listed: a permanent failure is a property of the message.
        let all = RetryPolicy {
            retry_on: FailureKind::ALL.to_vec(),
            ..RetryPolicy::default()
        };
        assert_eq!(
            all.decide(FailureKind::Permanent, 0, 0),
            Decision::DeadLetter
        );
    }

    #[test]
    fn immediate_then_delayed_then_dead_letter() {
        let p = RetryPolicy {
            immediate: 2,
            delayed: 1,
            ..RetryPolicy::default()
        };
        assert_eq!(p.decide(FailureKind::Transient, 0, 0), Decision::RetryNow);
        assert_eq!(p.decide(FailureKind::Transient, 1, 0), Decision::RetryNow);
        assert!(matches!(
            p.decide(FailureKind::Transient, 2, 0),
            Decision::RetryLater(_)
        ));
        // Each delayed round gets its immediate retries again.
        assert_eq!(p.decide(FailureKind::Transient, 0, 1), Decision::RetryNow);
        assert_eq!(p.decide(FailureKind::Transient, 2, 1), Decision::DeadLetter);
        // Traps are not retried by default.
        assert_eq!(p.decide(FailureKind::Trap, 0, 0), Decision::DeadLetter);
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let p = RetryPolicy {
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5),
            ..RetryPolicy::default()
        };
        assert_eq!(p.delay(1, 0.999_999).as_millis(), 999);
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(500));
        assert_eq!(p.delay(3, 0.0), Duration::from_secs(2));
        assert_eq!(
            p.delay(4, 0.0),
            Duration::from_millis(2500),
            "capped at 5 s before jitter"
        );
        assert_eq!(p.delay(40, 0.0), Duration::from_millis(2500), "no overflow");
    }

    #[test]
    fn normalization_groups_by_cause() {
        assert_eq!(
            normalize("payment gateway timed out charging order A-1002 (attempt 1)"),
            normalize("payment gateway timed out charging order A-77 (attempt 2)")
        );
        assert_eq!(
            normalize(
                "payload of PlaceOrder message 01a222c2-be70-74b5-b8ce-3be17bca249f is not JSON"
            ),
            "payload of PlaceOrder message <id> is not JSON"
        );
        assert_eq!(
            normalize("missing field `sku` at line 3 column 9"),
            "missing field `…` at line # column #"
        );
        assert_ne!(normalize("out of stock"), normalize("card declined"));
    }

    #[test]
    fn fingerprints_depend_on_plugin_kind_and_cause() {
        let (a, text) = fingerprint(
            "payments",
            "transient",
            "timed out after 30s on order 5",
            None,
        );
        let (b, _) = fingerprint(
            "payments",
            "transient",
            "timed out after 31s on order 9",
            None,
        );
        let (c, _) = fingerprint(
            "orders",
            "transient",
            "timed out after 30s on order 5",
            None,
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 12);
        assert_eq!(text, "timed out after #s on order #");
    }

    #[test]
    fn trap_fingerprints_name_the_culprit_frame() {
        let bt = "   5: rust_panic\n   9: std::panicking::begin_panic_handler\n  12: rogue::handle\n  13: wit_bindgen::rt::run";
        assert_eq!(culprit_frame(bt), Some("rogue::handle"));
        let (_, text) = fingerprint("rogue", "trap", "wasm trap: unreachable", Some(bt));
        assert!(text.ends_with("@ rogue::handle"), "{text}");
    }
}
