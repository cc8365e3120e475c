//! The `saga` import: the instance of the message being handled, and
//! completing it.

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
}
