//! Event contracts: a pipeline's `[schemas]` give message types a JSON
//! Schema their payloads must match. The host checks every event a plugin
//! publishes and every command it sends before they leave; a payload that
//! does not match fails the handler as `permanent`, with the schema's
//! complaints, so the message that caused it ends in the dead-letter store
//! and nothing malformed reaches a consumer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::config::Pipeline;
use crate::plugin::{Failure, FailureKind, Output};

/// Complaints quoted per violation.
const MAX_COMPLAINTS: usize = 5;

/// The compiled schemas of a pipeline.
#[derive(Default)]
pub struct Schemas {
    by_type: HashMap<String, (PathBuf, jsonschema::Validator)>,
}

impl std::fmt::Debug for Schemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.by_type.keys()).finish()
    }
}

/// Reads and compiles one schema file; the error names the file.
pub fn compile(path: &Path) -> Result<jsonschema::Validator> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the schema {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("the schema {} is not JSON", path.display()))?;
    jsonschema::validator_for(&value)
        .map_err(|e| anyhow::anyhow!("{} is not a valid JSON Schema: {e}", path.display()))
}

/// Why `payload` does not match, one line per complaint; empty if it does.
pub fn violations(validator: &jsonschema::Validator, payload: &[u8]) -> Vec<String> {
    let value: serde_json::Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => return vec![format!("the payload is not JSON: {e}")],
    };
    validator
        .iter_errors(&value)
        .take(MAX_COMPLAINTS)
        .map(|e| {
            let at = e.instance_path().to_string();
            format!("{}: {e}", if at.is_empty() { "/" } else { at.as_str() })
        })
        .collect()
}

impl Schemas {
    /// Compiles every schema of the pipeline, reporting every bad file.
    pub fn load(pipeline: &Pipeline) -> Result<Self> {
        let mut by_type = HashMap::new();
        let mut errors = Vec::new();
        for (t, path) in &pipeline.schemas {
            match compile(path) {
                Ok(v) => {
                    by_type.insert(t.to_string(), (path.clone(), v));
                }
                Err(e) => errors.push(format!("error: schema of {t}: {e:#}")),
            }
        }
        if !errors.is_empty() {
            anyhow::bail!("{}", errors.join("\n"));
        }
        Ok(Schemas { by_type })
    }

    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// Checks a payload of `message_type`; `Err` says why it does not match
    /// the type's schema. Types without a schema always pass.
    pub fn check(&self, message_type: &str, payload: &[u8]) -> Result<(), String> {
        let Some((path, validator)) = self.by_type.get(message_type) else {
            return Ok(());
        };
        let complaints = violations(validator, payload);
        if complaints.is_empty() {
            return Ok(());
        }
        let file = path.file_name().map_or_else(
            || path.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        );
        Err(format!(
            "{message_type} does not match its schema ({file}): {}",
            complaints.join("; ")
        ))
    }
}

/// The host's check of a handler's outputs: the first event or command
/// whose payload breaks its type's schema fails the call as `permanent`
/// (code `schema-violation`), and none of the outputs leave.
pub fn check_outputs(schemas: &Schemas, outputs: Vec<Output>) -> Result<Vec<Output>, Failure> {
    if schemas.is_empty() {
        return Ok(outputs);
    }
    for o in &outputs {
        let (what, out) = match o {
            Output::Event(e) => ("event", e),
            Output::Command(c) => ("command", c),
            Output::Reply(_) | Output::State(_) | Output::Saga(_) => continue,
        };
        if let Err(why) = schemas.check(&out.message_type, &out.payload) {
            return Err(Failure {
                kind: FailureKind::Permanent,
                message: format!("the {what} it emitted breaks its contract: {why}"),
                code: Some("schema-violation".into()),
                details: vec![("message_type".into(), out.message_type.clone())],
                backtrace: None,
                output: None,
            });
        }
    }
    Ok(outputs)
}
