//! What a handler can do while it handles a message.

use serde::Serialize;

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

    /// Records an event with attributes on the trace span of this message.
    pub fn add_span_event(&mut self, name: &str, attributes: &[(&str, &str)]) {
        let attributes: Vec<(String, String)> = attributes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.outbox.span_event(name, &attributes);
    }
}
