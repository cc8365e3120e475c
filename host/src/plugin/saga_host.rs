//! The `saga` import: the instance of the message being handled,
//! completing it, and the timeouts it asks for.

use super::State;
use super::bindings::switchyard::plugin::saga::{Host, InstanceInfo};

impl Host for State {
    fn current(&mut self) -> Option<InstanceInfo> {
        self.saga.as_ref().map(|s| InstanceInfo {
            id: s.id.clone(),
            version: s.version,
            started_at_ms: s.started_at_ms,
        })
    }

    fn complete(&mut self) {
        if self.saga.is_some() {
            self.call.saga_completed = true;
        } else {
            let name = self.plugin.sandbox.name.clone();
            self.violate(format!(
                "plugin {name} completed a saga instance, but the pipeline does not run it as a saga ([plugins.{name}.saga])"
            ));
        }
    }

    fn request_timeout(&mut self, after_ms: u64, message_type: String, payload: Vec<u8>) {
        let name = self.plugin.sandbox.name.clone();
        let t = crate::text::clip(&message_type, super::MAX_TYPE_IN_ERRORS);
        if self.saga.is_none() {
            self.violate(format!(
                "plugin {name} requested a timeout, but the pipeline does not run it as a saga ([plugins.{name}.saga])"
            ));
            return;
        }
        let Some(kind) = self.plugin.contract.info.handled_kind(&message_type) else {
            self.violate(format!(
                "saga {name} requested a timeout of type {t}, which it does not handle"
            ));
            return;
        };
        if self.call.timeouts.len() >= MAX_TIMEOUTS_PER_CALL {
            self.violate(format!(
                "saga {name} requested more than {MAX_TIMEOUTS_PER_CALL} timeouts for one message"
            ));
            return;
        }
        let bytes = message_type.len() + payload.len();
        if self.call.output_bytes.saturating_add(bytes) > super::MAX_OUTPUT_BYTES {
            self.violate(format!(
                "plugin {name} emitted more than {} of outputs for one message",
                crate::config::format_size(super::MAX_OUTPUT_BYTES as u64)
            ));
            return;
        }
        self.call.output_bytes += bytes;
        let due_ms = crate::envelope::now_ms().saturating_add(after_ms);
        self.call.timeouts.push(crate::saga::Timeout {
            id: crate::envelope::new_id(),
            due_ms,
            message_type,
            command: kind == crate::envelope::Kind::Command,
            payload,
        });
    }
}

/// Timeouts one call may request.
const MAX_TIMEOUTS_PER_CALL: usize = 100;
