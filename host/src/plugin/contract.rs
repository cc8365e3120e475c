//! The rules a plugin's declaration must satisfy, checked when it loads and
//! on every output it emits.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use super::bindings::switchyard::plugin::types as wit;
use crate::config::{MessageType, Pipeline, PluginName, PluginSpec};
use crate::envelope::Kind;

/// What a plugin says about itself in `describe()`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    /// Types delivered to `handle`, with their kind.
    pub handles: Vec<(String, Kind)>,
    /// Event types it may publish.
    pub publishes: Vec<String>,
    /// Command types it may send.
    pub sends: Vec<String>,
}

impl PluginInfo {
    pub(super) fn from_wit(info: wit::PluginInfo) -> Self {
        let clip = |t: String| crate::text::clip(&t, super::MAX_TYPE_IN_ERRORS);
        PluginInfo {
            name: crate::text::clip(&info.name, super::MAX_NAME),
            version: crate::text::clip(&info.version, super::MAX_NAME),
            handles: info
                .handles
                .into_iter()
                .map(|s| {
                    let kind = match s.kind {
                        wit::Kind::Command => Kind::Command,
                        wit::Kind::Event => Kind::Event,
                    };
                    (clip(s.message_type), kind)
                })
                .collect(),
            publishes: info.publishes.into_iter().map(clip).collect(),
            sends: info.sends.into_iter().map(clip).collect(),
        }
    }

    pub fn handled_kind(&self, message_type: &str) -> Option<Kind> {
        self.handles
            .iter()
            .find(|(t, _)| t == message_type)
            .map(|(_, k)| *k)
    }
}

/// Runtime checks of one plugin's outputs against its declaration.
#[derive(Clone, Debug, Default)]
pub struct Contract {
    pub info: PluginInfo,
    plugin: Option<PluginName>,
    publishes: HashSet<String>,
    sends: HashSet<String>,
}

impl Contract {
    pub fn new(info: PluginInfo, plugin: PluginName) -> Self {
        Contract {
            publishes: info.publishes.iter().cloned().collect(),
            sends: info.sends.iter().cloned().collect(),
            plugin: Some(plugin),
            info,
        }
    }

    fn name(&self) -> &str {
        self.plugin.as_ref().map_or("?", PluginName::as_str)
    }

    pub fn check_publish(&self, t: &str) -> Result<(), String> {
        if self.publishes.contains(t) {
            return Ok(());
        }
        let declared_as_command = self.sends.contains(t);
        let t = crate::text::clip(t, super::MAX_TYPE_IN_ERRORS);
        if declared_as_command {
            Err(format!(
                "plugin {} published {t}, which it declares as a command; use send",
                self.name()
            ))
        } else {
            Err(format!(
                "plugin {} published {t}, which its describe() does not list in publishes",
                self.name()
            ))
        }
    }

    pub fn check_send(&self, t: &str) -> Result<(), String> {
        if self.sends.contains(t) {
            return Ok(());
        }
        let declared_as_event = self.publishes.contains(t);
        let t = crate::text::clip(t, super::MAX_TYPE_IN_ERRORS);
        if declared_as_event {
            Err(format!(
                "plugin {} sent {t}, which it declares as an event; use publish",
                self.name()
            ))
        } else {
            Err(format!(
                "plugin {} sent {t}, which its describe() does not list in sends",
                self.name()
            ))
        }
    }

    pub fn check_reply(
        &self,
        kind: Option<Kind>,
        handling: &str,
        already_replied: bool,
    ) -> Result<(), String> {
        match kind {
            Some(Kind::Command) if already_replied => Err(format!(
                "plugin {} replied twice to command {handling}",
                self.name()
            )),
            Some(Kind::Command) => Ok(()),
            _ => Err(format!(
                "plugin {} replied while handling event {handling}; only commands get replies",
                self.name()
            )),
        }
    }
}

/// A problem found by comparing plugins' declarations with the pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub plugin: PluginName,
    pub error: bool,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = if self.error { "error" } else { "warning" };
        write!(f, "{sev}: plugin `{}`: {}", self.plugin, self.message)
    }
}

/// Compares one plugin's `describe()` with its pipeline entry.
pub fn check_plugin(spec: &PluginSpec, info: &PluginInfo) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut problem = |error: bool, message: String| {
        out.push(Problem {
            plugin: spec.name.clone(),
            error,
            message,
        });
    };
    if info.name != spec.name.as_str() {
        problem(
            false,
            format!(
                "the component calls itself `{}`; the pipeline names it `{}`",
                info.name, spec.name
            ),
        );
    }
    let mut seen = HashSet::new();
    let declared = info
        .handles
        .iter()
        .map(|(t, _)| t)
        .chain(&info.publishes)
        .chain(&info.sends);
    for t in declared {
        if let Err(e) = MessageType::try_from(t.as_str()) {
            problem(true, format!("describe() declares an invalid type: {e}"));
        }
    }
    for (t, kind) in &info.handles {
        if !seen.insert(t.as_str()) {
            problem(true, format!("describe() lists `{t}` twice in handles"));
        }
        if spec.subscriptions().all(|(s, _)| s.as_str() != t) {
            problem(
                false,
                format!("it can handle {kind} `{t}`, but the pipeline does not route `{t}` to it"),
            );
        }
    }
    for (t, kind) in spec.subscriptions() {
        match info.handled_kind(t.as_str()) {
            None => problem(
                true,
                format!(
                    "the pipeline routes {kind} `{t}` to it, but its describe() does not list `{t}` (it handles {})",
                    list_or_nothing(info.handles.iter().map(|(t, k)| format!("{k} {t}")))
                ),
            ),
            Some(k) if k != kind => problem(
                true,
                format!(
                    "the pipeline lists `{t}` under `{kind}s`, but the plugin handles it as {}",
                    k.with_article()
                ),
            ),
            Some(_) => {}
        }
    }
    for t in &info.publishes {
        if info.sends.contains(t) {
            problem(
                true,
                format!("describe() lists `{t}` both in publishes and in sends"),
            );
        }
    }
    out
}

/// Checks the declarations of all plugins together: every command sent has
/// a handler, and no type is a command in one place and an event in another.
pub fn check_pipeline(pipeline: &Pipeline, infos: &[(&PluginSpec, &PluginInfo)]) -> Vec<Problem> {
    let mut out = Vec::new();
    // The kind each type has and who says so.
    let mut kinds: BTreeMap<&str, (Kind, String)> = BTreeMap::new();
    for p in &pipeline.plugins {
        for (t, k) in p.subscriptions() {
            kinds.insert(
                t.as_str(),
                (
                    k,
                    format!(
                        "the pipeline routes it to `{}` as {}",
                        p.name,
                        k.with_article()
                    ),
                ),
            );
        }
    }
    for (spec, info) in infos {
        for t in &info.sends {
            match kinds.get(t.as_str()) {
                None => out.push(Problem {
                    plugin: spec.name.clone(),
                    error: true,
                    message: format!(
                        "it sends command `{t}`, but no plugin in the pipeline handles `{t}`; the command would be lost"
                    ),
                }),
                Some((Kind::Event, why)) => out.push(Problem {
                    plugin: spec.name.clone(),
                    error: true,
                    message: format!("it sends `{t}` as a command, but `{t}` is an event: {why}"),
                }),
                Some((Kind::Command, _)) => {}
            }
        }
        for t in &info.publishes {
            if let Some((Kind::Command, why)) = kinds.get(t.as_str()) {
                out.push(Problem {
                    plugin: spec.name.clone(),
                    error: true,
                    message: format!(
                        "it publishes `{t}` as an event, but `{t}` is a command: {why}"
                    ),
                });
            }
        }
    }
    out
}

fn list_or_nothing(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "nothing".into()
    } else {
        v.join(", ")
    }
}
