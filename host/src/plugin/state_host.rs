//! The `state` import: a plugin's key-value state, read through the route's
//! [`Scope`](crate::state::Scope) and written into the call's buffer.

use anyhow::{Result, anyhow};

use super::State;
use super::bindings::switchyard::plugin::state::Host;
use crate::config::format_size;
use crate::state::{MAX_KEY, Scope};
use crate::text::clip;

impl State {
    /// The scope, or a violation when this host keeps no state.
    fn scope(&mut self) -> Option<std::sync::Arc<Scope>> {
        if self.scope.is_none() {
            let name = self.plugin.sandbox.name.clone();
            self.violate(format!(
                "plugin {name} uses state, but this host has no state store for it"
            ));
        }
        self.scope.clone()
    }

    /// Whether `key` may be used; a violation otherwise.
    fn key_ok(&mut self, key: &str) -> bool {
        let why = if key.is_empty() {
            "an empty state key".to_owned()
        } else if key.len() > MAX_KEY {
            format!(
                "a state key of {} bytes (at most {MAX_KEY}): {}…",
                key.len(),
                clip(key, 64)
            )
        } else {
            return true;
        };
        let name = self.plugin.sandbox.name.clone();
        self.violate(format!("plugin {name} used {why}"));
        false
    }

    /// Where `key` is kept: a saga call's keys are its instance's.
    fn stored(&self, key: &str) -> String {
        match &self.saga {
            Some(s) => crate::saga::stored_key(&s.id, key),
            None => key.to_owned(),
        }
    }

    /// Reads `key` as the call sees it; a store error abandons the call.
    fn read(&mut self, scope: &Scope, key: &str) -> Result<Option<Vec<u8>>> {
        scope
            .get(&self.call.state, key)
            .map_err(|e| self.store_failed(&e))
    }

    fn store_failed(&mut self, e: &anyhow::Error) -> anyhow::Error {
        let text = format!("the state store cannot be read: {e:#}");
        self.call.state_error.get_or_insert_with(|| text.clone());
        anyhow!(text)
    }

    /// Buffers a write, unless it breaks the plugin's limits.
    fn write(&mut self, key: String, value: Option<Vec<u8>>) {
        let limits = &self.plugin.sandbox.limits;
        let (max_value, max_keys) = (limits.max_state_value, limits.max_state_keys);
        let name = self.plugin.sandbox.name.clone();
        if let Some(v) = &value
            && v.len() as u64 > max_value
        {
            self.violate(format!(
                "plugin {name} stored {} under state key {}, over its limit of {} (max_state_value)",
                format_size(v.len() as u64),
                clip(&key, 128),
                format_size(max_value)
            ));
            return;
        }
        let writes = &mut self.call.state.writes;
        if !writes.contains_key(&key) && writes.len() as u64 >= max_keys {
            self.violate(format!(
                "plugin {name} wrote more than {max_keys} state keys for one message (max_state_keys)"
            ));
            return;
        }
        // State the host holds until the batch settles counts with the
        // call's outputs.
        let bytes = key.len() + value.as_ref().map_or(0, Vec::len);
        if self.call.output_bytes.saturating_add(bytes) > super::MAX_OUTPUT_BYTES {
            self.violate(format!(
                "plugin {name} wrote more than {} of outputs and state for one message",
                format_size(super::MAX_OUTPUT_BYTES as u64)
            ));
            return;
        }
        self.call.output_bytes += bytes;
        self.call.state.writes.insert(key, value);
    }
}

impl Host for State {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>> {
        let Some(scope) = self.scope() else {
            return Ok(None);
        };
        if !self.key_ok(&key) {
            return Ok(None);
        }
        let key = self.stored(&key);
        self.read(&scope, &key)
    }

    fn set(&mut self, key: String, value: Vec<u8>) {
        if self.scope().is_some() && self.key_ok(&key) {
            let key = self.stored(&key);
            self.write(key, Some(value));
        }
    }

    fn delete(&mut self, key: String) {
        if self.scope().is_some() && self.key_ok(&key) {
            let key = self.stored(&key);
            self.write(key, None);
        }
    }

    fn list_keys(
        &mut self,
        prefix: String,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<String>> {
        let Some(scope) = self.scope() else {
            return Ok(Vec::new());
        };
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let Some(saga) = self.saga.as_ref().map(|s| s.id.clone()) else {
            return scope
                .keys(&self.call.state, &prefix, after.as_deref(), limit)
                .map_err(|e| self.store_failed(&e));
        };
        // A saga lists its instance's keys, named as it wrote them.
        let prefix = crate::saga::stored_key(&saga, &prefix);
        let after = after.map(|a| crate::saga::stored_key(&saga, &a));
        let keys = scope
            .keys(&self.call.state, &prefix, after.as_deref(), limit)
            .map_err(|e| self.store_failed(&e))?;
        Ok(keys
            .iter()
            .filter_map(|k| crate::saga::instance_key(&saga, k).map(str::to_owned))
            .collect())
    }

    fn increment(&mut self, key: String, delta: i64) -> Result<i64> {
        let Some(scope) = self.scope() else {
            return Ok(0);
        };
        if !self.key_ok(&key) {
            return Ok(0);
        }
        let key = self.stored(&key);
        let current = match self.read(&scope, &key)? {
            None => 0,
            Some(bytes) => match std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
            {
                Some(n) => n,
                None => {
                    let name = self.plugin.sandbox.name.clone();
                    self.violate(format!(
                        "plugin {name} incremented state key {}, whose value is not an integer",
                        clip(&key, 128)
                    ));
                    return Ok(0);
                }
            },
        };
        let Some(next) = current.checked_add(delta) else {
            let name = self.plugin.sandbox.name.clone();
            self.violate(format!(
                "plugin {name} incremented state key {} past the range of s64 ({current} + {delta})",
                clip(&key, 128)
            ));
            return Ok(0);
        };
        self.write(key, Some(next.to_string().into_bytes()));
        Ok(next)
    }
}
