//! Plain Rust shapes of the contract's records, independent of wit-bindgen.

use std::sync::OnceLock;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::HandlerError;

/// The media type the SDK uses for JSON payloads.
pub const JSON: &str = "application/json";

/// Whether a message type is a command or an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An instruction with exactly one handler, which may reply.
    Command,
    /// A fact with zero or more consumers, which never reply.
    Event,
}

impl Kind {
    /// `"command"` or `"event"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Event => "event",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message delivered to [`Plugin::handle`](crate::Plugin::handle).
///
/// In tests, build one with [`Message::command`] or [`Message::event`] and the
/// `with_*` methods.
///
/// The headers, correlation and causation ids and reply address are read
/// from the host the first time one of them is asked for, so a handler that
/// never looks at them does not pay for them. Read them while the message is
/// being handled: a message kept past its `handle` call has only what was
/// read before the call ended (in a plugin; natively, as in
/// [`testing::TestHost`](crate::testing::TestHost), a message always has
/// all of it). Equality compares the metadata too, reading it if it has not
/// been read.
#[derive(Clone, Debug)]
pub struct Message {
    /// Unique id, stable across retries and replays.
    pub id: String,
    /// The message type, e.g. `PlaceOrder`.
    pub message_type: String,
    /// Command or event.
    pub kind: Kind,
    /// The body.
    pub payload: Vec<u8>,
    /// Media type of `payload`.
    pub content_type: String,
    /// Creation time in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// 1 on the first delivery, 2 on the first retry, ...
    pub attempt: u32,
    /// Read on first use (see above).
    pub(crate) metadata: OnceLock<Metadata>,
    /// Which `handle` call delivered the message, 0 for one built here.
    pub(crate) call: u64,
}

/// The part of a message read from the host on demand.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Metadata {
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) causation_id: Option<String>,
    pub(crate) reply_to: Option<String>,
}

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.message_type == other.message_type
            && self.kind == other.kind
            && self.payload == other.payload
            && self.content_type == other.content_type
            && self.created_at_ms == other.created_at_ms
            && self.attempt == other.attempt
            && self.metadata() == other.metadata()
    }
}

impl Eq for Message {}

impl Message {
    fn new(message_type: &str, kind: Kind) -> Self {
        Message {
            id: format!("test-{message_type}"),
            message_type: message_type.to_owned(),
            kind,
            payload: Vec::new(),
            content_type: JSON.to_owned(),
            created_at_ms: 0,
            attempt: 1,
            metadata: OnceLock::from(Metadata::default()),
            call: 0,
        }
    }

    fn metadata(&self) -> &Metadata {
        self.metadata.get_or_init(|| load_metadata(self.call))
    }

    fn edit_metadata(mut self, edit: impl FnOnce(&mut Metadata)) -> Self {
        let mut metadata = self
            .metadata
            .take()
            .unwrap_or_else(|| load_metadata(self.call));
        edit(&mut metadata);
        self.metadata = OnceLock::from(metadata);
        self
    }

    /// A command of the given type with an empty payload (for tests).
    pub fn command(message_type: &str) -> Self {
        Self::new(message_type, Kind::Command)
    }

    /// An event of the given type with an empty payload (for tests).
    pub fn event(message_type: &str) -> Self {
        Self::new(message_type, Kind::Event)
    }

    /// Replaces the payload with `value` as JSON.
    ///
    /// Serializing plain data structures cannot fail; a `Serialize` impl that
    /// does fail leaves the payload empty, which the handler then sees.
    pub fn with_json<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        self.payload = serde_json::to_vec(value).unwrap_or_default();
        self.content_type = JSON.to_owned();
        self
    }

    /// Replaces the payload with raw bytes of the given media type.
    pub fn with_payload(mut self, payload: impl Into<Vec<u8>>, content_type: &str) -> Self {
        self.payload = payload.into();
        self.content_type = content_type.to_owned();
        self
    }

    /// Sets the message id.
    pub fn with_id(mut self, id: &str) -> Self {
        self.id = id.to_owned();
        self
    }

    /// Appends a header.
    pub fn with_header(self, name: &str, value: &str) -> Self {
        self.edit_metadata(|m| m.headers.push((name.to_owned(), value.to_owned())))
    }

    /// Sets the reply address.
    pub fn with_reply_to(self, reply_to: &str) -> Self {
        self.edit_metadata(|m| m.reply_to = Some(reply_to.to_owned()))
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(self, id: &str) -> Self {
        self.edit_metadata(|m| m.correlation_id = Some(id.to_owned()))
    }

    /// Sets the causation id.
    pub fn with_causation_id(self, id: &str) -> Self {
        self.edit_metadata(|m| m.causation_id = Some(id.to_owned()))
    }

    /// Sets the attempt number (1 = first delivery).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    /// Parses the payload as JSON.
    ///
    /// A payload that does not parse is poison: retrying cannot fix it, so the
    /// error is [`HandlerError::permanent`] and names the message.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            HandlerError::permanent(format!(
                "payload of {} message {} is not the expected JSON: {e}",
                self.message_type, self.id
            ))
            .with_code("malformed-payload")
        })
    }

    /// The payload as UTF-8 text, if it is.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }

    /// Headers in arrival order. Names are case-sensitive.
    pub fn headers(&self) -> &[(String, String)] {
        &self.metadata().headers
    }

    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Ties together every message of one business flow.
    pub fn correlation_id(&self) -> Option<&str> {
        self.metadata().correlation_id.as_deref()
    }

    /// The id of the message whose handling produced this one.
    pub fn causation_id(&self) -> Option<&str> {
        self.metadata().causation_id.as_deref()
    }

    /// Where a reply goes, if the sender wants one.
    pub fn reply_to(&self) -> Option<&str> {
        self.metadata().reply_to.as_deref()
    }
}

/// Asks the host for the metadata of the message delivered by `call`, if
/// that call is still under way.
#[cfg(target_family = "wasm")]
fn load_metadata(call: u64) -> Metadata {
    crate::guest::metadata(call)
}

/// Natively every message is built with its metadata: nothing to load.
#[cfg(not(target_family = "wasm"))]
fn load_metadata(_call: u64) -> Metadata {
    Metadata::default()
}

/// A message emitted with [`Context::publish_message`](crate::Context::publish_message)
/// or [`Context::send_message`](crate::Context::send_message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// The message type.
    pub message_type: String,
    /// The body.
    pub payload: Vec<u8>,
    /// Media type of `payload`.
    pub content_type: String,
    /// Extra headers; the host sets ids, correlation and causation itself.
    pub headers: Vec<(String, String)>,
    /// Keeps messages with the same key in order on partitioned brokers.
    pub partition_key: Option<String>,
}

impl Outgoing {
    /// An outgoing message with `value` serialized as its JSON payload.
    pub fn json<T: Serialize + ?Sized>(
        message_type: &str,
        value: &T,
    ) -> Result<Self, HandlerError> {
        let payload = serde_json::to_vec(value).map_err(|e| {
            HandlerError::permanent(format!("cannot serialize {message_type} as JSON: {e}"))
        })?;
        Ok(Self::raw(message_type, payload, JSON))
    }

    /// An outgoing message with a raw payload.
    pub fn raw(message_type: &str, payload: impl Into<Vec<u8>>, content_type: &str) -> Self {
        Outgoing {
            message_type: message_type.to_owned(),
            payload: payload.into(),
            content_type: content_type.to_owned(),
            headers: Vec::new(),
            partition_key: None,
        }
    }

    /// Appends a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the partition key.
    pub fn with_partition_key(mut self, key: &str) -> Self {
        self.partition_key = Some(key.to_owned());
        self
    }

    /// Parses the payload as JSON (handy in tests).
    pub fn json_payload<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

/// A command handler's answer, emitted with [`Context::reply`](crate::Context::reply).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The body.
    pub payload: Vec<u8>,
    /// Media type of `payload`.
    pub content_type: String,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
}

impl Response {
    /// Parses the payload as JSON (handy in tests).
    pub fn json_payload<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

/// One message type a plugin handles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// The message type.
    pub message_type: String,
    /// Command or event.
    pub kind: Kind,
}

/// What a plugin declares about itself; built in [`Plugin::describe`](crate::Plugin::describe).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginInfo {
    /// Plugin name; must match its name in the pipeline.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// Message types delivered to `handle`.
    pub handles: Vec<Subscription>,
    /// Event types the plugin may publish.
    pub publishes: Vec<String>,
    /// Command types the plugin may send.
    pub sends: Vec<String>,
}

impl PluginInfo {
    /// A plugin that handles nothing yet.
    pub fn new(name: &str, version: &str) -> Self {
        PluginInfo {
            name: name.to_owned(),
            version: version.to_owned(),
            handles: Vec::new(),
            publishes: Vec::new(),
            sends: Vec::new(),
        }
    }

    /// Declares that this plugin is the one handler of a command type.
    pub fn handles_command(mut self, message_type: &str) -> Self {
        self.handles.push(Subscription {
            message_type: message_type.to_owned(),
            kind: Kind::Command,
        });
        self
    }

    /// Declares that this plugin consumes an event type.
    pub fn consumes_event(mut self, message_type: &str) -> Self {
        self.handles.push(Subscription {
            message_type: message_type.to_owned(),
            kind: Kind::Event,
        });
        self
    }

    /// Declares an event type this plugin may publish.
    pub fn publishes(mut self, message_type: &str) -> Self {
        self.publishes.push(message_type.to_owned());
        self
    }

    /// Declares a command type this plugin may send.
    pub fn sends(mut self, message_type: &str) -> Self {
        self.sends.push(message_type.to_owned());
        self
    }

    /// How this plugin handles `message_type`, if it does.
    pub fn handled_kind(&self, message_type: &str) -> Option<Kind> {
        self.handles
            .iter()
            .find(|s| s.message_type == message_type)
            .map(|s| s.kind)
    }
}
