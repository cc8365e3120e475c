//! The transport-neutral message the host moves around.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::recover::Then;

/// Header a replayed message carries: the `trace-span` ids of its dead
/// letter's last span, which the replay's span links to.
pub const REPLAY_TRACE_HEADER: &str = "switchyard-replay-trace";

/// The header a malformed message's own id is kept in when it is too long
/// or unprintable to be its id in the dead-letter store.
pub const ORIGINAL_ID_HEADER: &str = "switchyard-original-id";

/// Command or event: decides routing (one handler vs. every consumer) and
/// whether a reply is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Command,
    Event,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Event => "event",
        }
    }

    /// "a command" or "an event".
    pub fn with_article(self) -> &'static str {
        match self {
            Kind::Command => "a command",
            Kind::Event => "an event",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "command" => Some(Kind::Command),
            "event" => Some(Kind::Event),
            _ => None,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message in flight, independent of any broker's wire format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Unique id (a UUIDv7 for messages the host creates).
    pub id: String,
    pub message_type: String,
    pub kind: Kind,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    /// Address a reply to this command goes to.
    pub reply_to: Option<String>,
    /// Ordering key on partitioned brokers.
    pub partition_key: Option<String>,
    pub created_at_ms: u64,
    /// Delivery attempt this envelope is on, starting at 1.
    pub attempt: u32,
    /// The failed attempts before this one (since the message was created or
    /// last replayed), so a restart or a delayed retry does not reset them.
    pub history: Vec<Attempt>,
}

/// One failed attempt to handle a message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attempt {
    pub number: u32,
    pub started_at_ms: u64,
    pub duration_us: u64,
    /// The name of the attempt's [`crate::recover::FailureKind`]. Histories
    /// travel between hosts and stores of different versions, so a name
    /// this host does not know must not make a message or a record
    /// unreadable: it is kept as text.
    pub error_kind: String,
    pub error: String,
    /// `name@version` of the plugin that made the attempt.
    pub plugin: String,
    /// What the host did next: a [`Then`]'s name, read through
    /// [`Attempt::then`] (text for the same reason as `error_kind`).
    pub then: String,
    /// The attempt's trace span, when tracing was on: the next attempt's span
    /// links to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
}

impl Attempt {
    /// What the host did next, if this host knows the name.
    pub fn then(&self) -> Option<Then> {
        Then::parse(&self.then)
    }
}

impl Envelope {
    /// How many times the message was scheduled again after a delay: the
    /// level of its next delayed retry.
    pub fn delayed_retries(&self) -> u32 {
        let n = self
            .history
            .iter()
            .filter(|a| a.then() == Some(Then::RetryLater))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// A new message with a fresh id, created now.
    pub fn new(
        message_type: impl Into<String>,
        kind: Kind,
        payload: Vec<u8>,
        content_type: impl Into<String>,
    ) -> Self {
        Envelope {
            id: new_id(),
            message_type: message_type.into(),
            kind,
            payload,
            content_type: content_type.into(),
            headers: Vec::new(),
            correlation_id: None,
            causation_id: None,
            reply_to: None,
            partition_key: None,
            created_at_ms: now_ms(),
            attempt: 1,
            history: Vec::new(),
        }
    }

    /// The correlation id children of this message inherit: its own
    /// correlation id, or its id when it starts a flow.
    pub fn flow_id(&self) -> &str {
        self.correlation_id.as_deref().unwrap_or(&self.id)
    }
}

/// A command handler's answer, addressed to the requester.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The `reply_to` of the command.
    pub address: String,
    /// Id of the command being answered.
    pub in_reply_to: String,
    pub correlation_id: String,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub created_at_ms: u64,
}

impl Reply {
    /// A reply as it arrived at `address` in a broker message: the command
    /// it answers is the message's cause.
    pub fn received(address: &str, e: Envelope) -> Reply {
        Reply {
            address: address.to_owned(),
            in_reply_to: e.causation_id.unwrap_or_default(),
            correlation_id: e.correlation_id.unwrap_or_default(),
            payload: e.payload,
            content_type: e.content_type,
            headers: e.headers,
            created_at_ms: e.created_at_ms,
        }
    }

    /// The reply as a message on a broker: an event named after the
    /// command (`<CommandType>.reply`), caused by the command and in its
    /// flow.
    pub fn envelope(&self, command_type: &str) -> Envelope {
        let mut e = Envelope::new(
            format!("{command_type}.reply"),
            Kind::Event,
            self.payload.clone(),
            self.content_type.clone(),
        );
        e.headers = self.headers.clone();
        e.correlation_id = Some(self.correlation_id.clone());
        e.causation_id = Some(self.in_reply_to.clone());
        e.created_at_ms = self.created_at_ms;
        e
    }
}

/// A time-ordered unique id (UUIDv7), so ids sort by creation time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
