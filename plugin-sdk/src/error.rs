//! The error a handler returns, split by what the host should do next.

use std::fmt;

/// Whether a failed message is worth retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Try again later: a dependency was down, a lock was taken, ...
    Transient,
    /// Never retry: the message itself is bad (poison).
    Permanent,
}

/// Why a handler gave up on a message.
///
/// Choose the kind deliberately: a [`transient`](HandlerError::transient)
/// error follows the plugin's retry policy, a
/// [`permanent`](HandlerError::permanent) one goes straight to the
/// dead-letter store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerError {
    /// Retry or not.
    pub kind: ErrorKind,
    /// Human-readable description, kept with the failed message.
    pub message: String,
    /// Optional machine-readable code, e.g. `payment-declined`.
    pub code: Option<String>,
    /// Structured context, e.g. `("order-id", "A-1")`.
    pub details: Vec<(String, String)>,
}

impl HandlerError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        HandlerError {
            kind,
            message: message.into(),
            code: None,
            details: Vec::new(),
        }
    }

    /// A failure worth retrying later.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, message)
    }

    /// A failure no retry can fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Permanent, message)
    }

    /// Attaches a machine-readable code.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// Attaches one piece of structured context.
    pub fn with_detail(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.details.push((name.into(), value.into()));
        self
    }

    /// True for [`ErrorKind::Transient`].
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        };
        write!(f, "{kind}: {}", self.message)?;
        if let Some(code) = &self.code {
            write!(f, " [{code}]")?;
        }
        Ok(())
    }
}

impl std::error::Error for HandlerError {}

/// JSON that does not parse or serialize is a property of the message, so
/// retrying cannot help.
impl From<serde_json::Error> for HandlerError {
    fn from(e: serde_json::Error) -> Self {
        HandlerError::permanent(e.to_string()).with_code("malformed-payload")
    }
}
