//! The WebAssembly side: wit-bindgen bindings and their conversion to the
//! SDK's plain Rust types. Only compiled for WebAssembly targets.

/// Generated from `wit/`; hidden behind the SDK's own types.
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_switchyard_plugin",
        default_bindings_module: "switchyard_sdk::__guest::bindings",
    });
}

use bindings::switchyard::plugin::{host, saga, state, types as wit};

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::context::Outbox;
use crate::message::Metadata;
use crate::{
    Context, ErrorKind, HandlerError, Kind, LogLevel, Message, Outgoing, Plugin, Response,
};

fn kind_to_wit(kind: Kind) -> wit::Kind {
    match kind {
        Kind::Command => wit::Kind::Command,
        Kind::Event => wit::Kind::Event,
    }
}

/// Calls the host imports directly: the host does the buffering.
struct HostImports;

impl Outbox for HostImports {
    fn publish(&mut self, event: Outgoing) {
        host::publish(&outgoing_to_wit(event));
    }

    fn send(&mut self, command: Outgoing) {
        host::send(&outgoing_to_wit(command));
    }

    fn reply(&mut self, answer: Response) {
        host::reply(&wit::Response {
            payload: answer.payload,
            content_type: answer.content_type,
            headers: answer.headers,
        });
    }

    fn log(&mut self, level: LogLevel, text: &str) {
        let level = match level {
            LogLevel::Trace => wit::LogLevel::Trace,
            LogLevel::Debug => wit::LogLevel::Debug,
            LogLevel::Info => wit::LogLevel::Info,
            LogLevel::Warn => wit::LogLevel::Warn,
            LogLevel::Error => wit::LogLevel::Error,
        };
        host::log(level, text);
    }

    fn span_attribute(&mut self, key: &str, value: &str) {
        host::span_attribute(key, value);
    }

    fn span_event(&mut self, name: &str, attributes: &[(String, String)]) {
        host::span_event(name, attributes);
    }

    fn state_get(&mut self, key: &str) -> Option<Vec<u8>> {
        state::get(key)
    }

    fn state_set(&mut self, key: &str, value: Vec<u8>) {
        state::set(key, &value);
    }

    fn state_delete(&mut self, key: &str) {
        state::delete(key);
    }

    fn state_keys(&mut self, prefix: &str, after: Option<&str>, limit: u32) -> Vec<String> {
        state::list_keys(prefix, after, limit)
    }

    fn state_increment(&mut self, key: &str, delta: i64) -> i64 {
        state::increment(key, delta)
    }

    fn saga_current(&mut self) -> Option<crate::SagaInstance> {
        saga::current().map(|i| crate::SagaInstance {
            id: i.id,
            version: i.version,
            started_at_ms: i.started_at_ms,
        })
    }

    fn saga_complete(&mut self) {
        saga::complete();
    }

    fn saga_request_timeout(&mut self, after_ms: u64, message_type: &str, payload: Vec<u8>) {
        saga::request_timeout(after_ms, message_type, &payload);
    }
}

fn outgoing_to_wit(o: Outgoing) -> wit::Outgoing {
    wit::Outgoing {
        message_type: o.message_type,
        payload: o.payload,
        content_type: o.content_type,
        headers: o.headers,
        partition_key: o.partition_key,
    }
}

/// The metadata of the message delivered by `call`, from the host, if that
/// call is the one under way; none otherwise.
pub(crate) fn metadata(call: u64) -> Metadata {
    if call != CALL.load(Ordering::Relaxed) {
        return Metadata::default();
    }
    let m = host::metadata();
    Metadata {
        headers: m.headers,
        correlation_id: m.correlation_id,
        causation_id: m.causation_id,
        reply_to: m.reply_to,
    }
}

/// `describe` export, converting the plugin's declaration to the WIT record.
pub fn describe<P: Plugin>() -> wit::PluginInfo {
    let info = P::describe();
    wit::PluginInfo {
        name: info.name,
        version: info.version,
        handles: info
            .handles
            .into_iter()
            .map(|s| wit::Subscription {
                message_type: s.message_type,
                kind: kind_to_wit(s.kind),
            })
            .collect(),
        publishes: info.publishes,
        sends: info.sends,
    }
}

/// Numbers the `handle` calls, so a message read after its call has ended
/// does not pick up the metadata of the message being handled then.
static CALL: AtomicU64 = AtomicU64::new(0);

/// `handle` export: converts the message, runs the handler, converts the error.
pub fn handle<P: Plugin>(m: wit::Message) -> Result<(), wit::HandlerError> {
    let call = CALL.fetch_add(1, Ordering::Relaxed) + 1;
    let message = Message {
        id: m.id,
        message_type: m.message_type,
        kind: match m.kind {
            wit::Kind::Command => Kind::Command,
            wit::Kind::Event => Kind::Event,
        },
        payload: m.payload,
        content_type: m.content_type,
        created_at_ms: m.created_at_ms,
        attempt: m.attempt,
        // Fetched from the host on first use.
        metadata: OnceLock::new(),
        call,
    };
    let mut imports = HostImports;
    let mut ctx = Context::new(&mut imports);
    let outcome = P::handle(&mut ctx, message);
    // Whatever the handler kept of the message is past its call now.
    CALL.fetch_add(1, Ordering::Relaxed);
    outcome.map_err(|e: HandlerError| {
        let details = wit::ErrorDetails {
            message: e.message,
            code: e.code,
            details: e.details,
        };
        match e.kind {
            ErrorKind::Transient => wit::HandlerError::Transient(details),
            ErrorKind::Permanent => wit::HandlerError::Permanent(details),
        }
    })
}
