//! What a handler can do while it handles a message.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{HandlerError, JSON, Outgoing, Response};

/// Severity of a log line written with [`Context::log`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the handler coped with.
    Warn,
    /// Something failed.
    Error,
}

/// Where a [`Context`] sends what the handler emits: the component's host
/// imports inside WebAssembly, a recorder in [`crate::testing`].
pub(crate) trait Outbox {
    fn publish(&mut self, event: Outgoing);
    fn send(&mut self, command: Outgoing);
    fn reply(&mut self, answer: Response);
    fn log(&mut self, level: LogLevel, text: &str);
    fn span_attribute(&mut self, key: &str, value: &str);
    fn span_event(&mut self, name: &str, attributes: &[(String, String)]);
    fn state_get(&mut self, key: &str) -> Option<Vec<u8>>;
    fn state_set(&mut self, key: &str, value: Vec<u8>);
    fn state_delete(&mut self, key: &str);
    fn state_keys(&mut self, prefix: &str, after: Option<&str>, limit: u32) -> Vec<String>;
    fn state_increment(&mut self, key: &str, delta: i64) -> i64;
    fn saga_current(&mut self) -> Option<SagaInstance>;
    fn saga_complete(&mut self);
    fn saga_request_timeout(&mut self, after_ms: u64, message_type: &str, payload: Vec<u8>);
    fn http(
        &mut self,
        request: &crate::http::Request,
    ) -> Result<crate::http::Response, crate::http::HttpError>;
}

/// The saga instance of the message being handled, from [`Context::saga`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SagaInstance {
    /// The instance id the host found from the message (an order id, say).
    pub id: String,
    /// Steps committed for the instance before this message.
    pub version: u64,
    /// When the instance started, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
}

impl SagaInstance {
    /// Whether this message starts the instance.
    pub fn is_new(&self) -> bool {
        self.version == 0
    }
}

/// The handler's view of the host while one message is being handled.
///
/// Everything emitted here is buffered by the host and dispatched only if the
/// handler returns `Ok`.
pub struct Context<'a> {
    outbox: &'a mut dyn Outbox,
}

impl<'a> Context<'a> {
    pub(crate) fn new(outbox: &'a mut dyn Outbox) -> Self {
        Context { outbox }
    }

    /// Publishes an event with `value` as its JSON payload. The type must be
    /// declared with [`PluginInfo::publishes`](crate::PluginInfo::publishes).
    pub fn publish<T: Serialize + ?Sized>(
        &mut self,
        event_type: &str,
        value: &T,
    ) -> Result<(), HandlerError> {
        self.publish_message(Outgoing::json(event_type, value)?);
        Ok(())
    }

    /// Publishes a fully built event.
    pub fn publish_message(&mut self, event: Outgoing) {
        self.outbox.publish(event);
    }

    /// Sends a command with `value` as its JSON payload to the command's one
    /// handler. The type must be declared with
    /// [`PluginInfo::sends`](crate::PluginInfo::sends).
    pub fn send<T: Serialize + ?Sized>(
        &mut self,
        command_type: &str,
        value: &T,
    ) -> Result<(), HandlerError> {
        self.send_message(Outgoing::json(command_type, value)?);
        Ok(())
    }

    /// Sends a fully built command.
    pub fn send_message(&mut self, command: Outgoing) {
        self.outbox.send(command);
    }

    /// Replies to the command being handled with `value` as JSON. Replying
    /// while handling an event is a contract violation.
    pub fn reply<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), HandlerError> {
        let payload = serde_json::to_vec(value)
            .map_err(|e| HandlerError::permanent(format!("cannot serialize reply as JSON: {e}")))?;
        self.reply_response(Response {
            payload,
            content_type: JSON.to_owned(),
            headers: Vec::new(),
        });
        Ok(())
    }

    /// Replies with a fully built response.
    pub fn reply_response(&mut self, answer: Response) {
        self.outbox.reply(answer);
    }

    /// Writes a line to the host's log, tagged with the plugin and message.
    pub fn log(&mut self, level: LogLevel, text: &str) {
        self.outbox.log(level, text);
    }

    /// Writes an info line to the host's log.
    pub fn info(&mut self, text: &str) {
        self.log(LogLevel::Info, text);
    }

    /// Writes a warning to the host's log.
    pub fn warn(&mut self, text: &str) {
        self.log(LogLevel::Warn, text);
    }

    /// Writes a debug line to the host's log.
    pub fn debug(&mut self, text: &str) {
        self.log(LogLevel::Debug, text);
    }

    /// Adds an attribute to the trace span of this message, e.g.
    /// `("order.id", "A-1")`, so the trace can be found by it.
    pub fn set_span_attribute(&mut self, key: &str, value: &str) {
        self.outbox.span_attribute(key, value);
    }

    /// The plugin's own key-value state. What the handler writes here is
    /// kept only if it returns `Ok`, together with its outputs.
    pub fn state(&mut self) -> State<'_> {
        State {
            outbox: &mut *self.outbox,
        }
    }

    /// The saga instance this message belongs to, when the pipeline runs
    /// the plugin as a saga (`[plugins.NAME.saga]`); `None` otherwise. A
    /// saga's [`Context::state`] is its instance's.
    pub fn saga(&mut self) -> Option<SagaInstance> {
        self.outbox.saga_current()
    }

    /// Marks the saga instance complete once this message is handled:
    /// later messages no longer find it. Dropped if the handler fails. A
    /// plugin not run as a saga that calls it breaks the contract.
    pub fn complete_saga(&mut self) {
        self.outbox.saga_complete();
    }

    /// Asks the host to deliver a message of `message_type` (a type this
    /// saga handles) with `value` as its JSON payload to this instance once
    /// `after` has passed. Requested only if the handler returns `Ok`;
    /// dropped if the instance completes first. Outside a saga it breaks
    /// the contract.
    pub fn request_timeout<T: Serialize + ?Sized>(
        &mut self,
        after: std::time::Duration,
        message_type: &str,
        value: &T,
    ) -> Result<(), HandlerError> {
        let payload = serde_json::to_vec(value).map_err(|e| {
            HandlerError::permanent(format!(
                "cannot serialize timeout {message_type} as JSON: {e}"
            ))
        })?;
        let after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        self.outbox
            .saga_request_timeout(after_ms, message_type, payload);
        Ok(())
    }

    /// Sends an HTTP request and waits for its whole response. The host
    /// sends it only to an origin of the plugin's `http` grant and ends the
    /// wait at the message's deadline; an error says why there is no
    /// response (it converts to a [`HandlerError`] with `?`: permanent when
    /// refused, transient otherwise). A response with any status is `Ok`.
    pub fn http(
        &mut self,
        request: crate::http::Request,
    ) -> Result<crate::http::Response, crate::http::HttpError> {
        self.outbox.http(&request)
    }

    /// Records an event with attributes on the trace span of this message.
    pub fn add_span_event(&mut self, name: &str, attributes: &[(&str, &str)]) {
        let attributes: Vec<(String, String)> = attributes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.outbox.span_event(name, &attributes);
    }
}

/// The plugin's key-value state, from [`Context::state`].
///
/// Reads see everything written before, including this handler's own
/// writes; writes are committed with the message's outcome, once, and
/// dropped if the handler fails. Values are JSON unless written with
/// [`State::set_bytes`]. Counters kept with [`State::increment`] read back
/// as integers.
pub struct State<'a> {
    outbox: &'a mut dyn Outbox,
}

impl State<'_> {
    /// The value under `key`, parsed from JSON; `None` if there is none.
    /// A value that does not parse as `T` is a permanent error.
    pub fn get<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, HandlerError> {
        match self.outbox.state_get(key) {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                HandlerError::permanent(format!(
                    "state key {key:?} does not hold the expected JSON: {e}"
                ))
            }),
        }
    }

    /// Stores `value` as JSON under `key`.
    pub fn set<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<(), HandlerError> {
        let bytes = serde_json::to_vec(value).map_err(|e| {
            HandlerError::permanent(format!("cannot serialize state key {key:?} as JSON: {e}"))
        })?;
        self.outbox.state_set(key, bytes);
        Ok(())
    }

    /// The raw bytes under `key`.
    pub fn get_bytes(&mut self, key: &str) -> Option<Vec<u8>> {
        self.outbox.state_get(key)
    }

    /// Stores raw bytes under `key`.
    pub fn set_bytes(&mut self, key: &str, value: Vec<u8>) {
        self.outbox.state_set(key, value);
    }

    /// Removes `key`.
    pub fn delete(&mut self, key: &str) {
        self.outbox.state_delete(key);
    }

    /// Every key that starts with `prefix`, in byte order (fetched a page
    /// at a time).
    pub fn keys(&mut self, prefix: &str) -> Vec<String> {
        const PAGE: u32 = 500;
        let mut keys: Vec<String> = Vec::new();
        loop {
            let page = self
                .outbox
                .state_keys(prefix, keys.last().map(String::as_str), PAGE);
            let done = page.len() < PAGE as usize;
            keys.extend(page);
            if done {
                return keys;
            }
        }
    }

    /// Adds `delta` to the integer under `key` (0 if there is none) and
    /// returns the new value.
    pub fn increment(&mut self, key: &str, delta: i64) -> i64 {
        self.outbox.state_increment(key, delta)
    }

    /// The [`Shaped`] value under `key`, in this build's shape: a value
    /// stored by an older shape goes through [`Shaped::migrate`] (and is
    /// kept in the new shape once this handler succeeds). A value stored
    /// by a newer shape than this build's (a rollback, or an old version
    /// still running during a deploy) is a transient error with code
    /// `state-shape-newer`: retried, then dead-lettered to be replayed
    /// once the newer version runs everywhere.
    pub fn load<T: Shaped>(&mut self, key: &str) -> Result<Option<T>, HandlerError> {
        let Some(stored) = self.get::<serde_json::Value>(key)? else {
            return Ok(None);
        };
        let (shape, data) = match stored {
            serde_json::Value::Object(mut o)
                if o.len() == 2 && o.contains_key(SHAPE_FIELD) && o.contains_key(DATA_FIELD) =>
            {
                let shape = o
                    .get(SHAPE_FIELD)
                    .and_then(serde_json::Value::as_u64)
                    .and_then(|s| u32::try_from(s).ok())
                    .ok_or_else(|| {
                        HandlerError::permanent(format!(
                            "state key {key:?} has a shape that is not a number"
                        ))
                    })?;
                (shape, o.remove(DATA_FIELD).unwrap_or_default())
            }
            // Written before the plugin kept shapes.
            other => (0, other),
        };
        if shape > T::SHAPE {
            return Err(HandlerError::transient(format!(
                "state key {key:?} was stored in shape {shape}, newer than this build's shape {}: a newer version of the plugin wrote it",
                T::SHAPE
            ))
            .with_code("state-shape-newer")
            .with_detail("state.key", key));
        }
        let value = if shape == T::SHAPE {
            serde_json::from_value(data).map_err(|e| {
                HandlerError::permanent(format!(
                    "state key {key:?} (shape {shape}) does not hold the expected JSON: {e}"
                ))
            })?
        } else {
            let migrated = T::migrate(shape, data)?;
            self.store(key, &migrated)?;
            migrated
        };
        Ok(Some(value))
    }

    /// Stores `value` under `key` with this build's shape, for
    /// [`State::load`]: `{"shape": N, "data": ...}`.
    pub fn store<T: Shaped>(&mut self, key: &str, value: &T) -> Result<(), HandlerError> {
        let data = serde_json::to_value(value).map_err(|e| {
            HandlerError::permanent(format!("cannot serialize state key {key:?} as JSON: {e}"))
        })?;
        self.set(
            key,
            &serde_json::json!({ SHAPE_FIELD: T::SHAPE, DATA_FIELD: data }),
        )
    }
}

const SHAPE_FIELD: &str = "shape";
const DATA_FIELD: &str = "data";

/// A value kept in state with the version of its shape, so that a plugin
/// (a saga, most of all) can change what it keeps while instances stored by
/// its older versions are still running: [`State::load`] hands older data
/// to [`Shaped::migrate`].
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use switchyard_sdk::{HandlerError, Shaped};
///
/// #[derive(Serialize, Deserialize)]
/// struct Order {
///     customer: String,
///     // Shape 2 keeps cents; shape 1 kept a float amount.
///     total_cents: u64,
/// }
///
/// impl Shaped for Order {
///     const SHAPE: u32 = 2;
///     fn migrate(from: u32, old: serde_json::Value) -> Result<Self, HandlerError> {
///         match from {
///             1 => Ok(Order {
///                 customer: old["customer"].as_str().unwrap_or_default().to_owned(),
///                 total_cents: (old["total"].as_f64().unwrap_or(0.0) * 100.0).round() as u64,
///             }),
///             _ => Err(HandlerError::permanent(format!("no way from order shape {from}"))),
///         }
///     }
/// }
/// ```
pub trait Shaped: Serialize + DeserializeOwned {
    /// The shape this build reads and writes. Start at 1, and raise it
    /// when old data no longer reads as the new type.
    const SHAPE: u32;

    /// Turns data stored in shape `from` (older than [`Shaped::SHAPE`]; 0
    /// for a value stored without a shape) into this shape. By default,
    /// data that already reads as this type is taken as it is.
    fn migrate(from: u32, old: serde_json::Value) -> Result<Self, HandlerError> {
        serde_json::from_value(old).map_err(|e| {
            HandlerError::permanent(format!(
                "state stored in shape {from} cannot be read as shape {}: {e}; implement Shaped::migrate",
                Self::SHAPE
            ))
        })
    }
}
