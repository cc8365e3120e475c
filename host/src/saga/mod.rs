//! Sagas: plugins whose messages belong to instances of a long-running
//! process (one order's fulfilment, say).
//!
//! The pipeline says which message types start an instance and how every
//! type it handles finds its instance ([`SagaSpec`]). Before the plugin
//! runs, the host resolves the message's instance id ([`SagaSpec::locate`])
//! and looks the instance up; the plugin's `state` calls then read and
//! write that instance's keys only. A handled message becomes a [`Step`]:
//! the instance's next version, committed with the state changes in the
//! transaction that settles the message. A step whose instance moved on
//! since it was read (another host handled a message of the same instance)
//! is a [`Conflict`]: the commit is refused and the message is handled
//! again on the instance as it now is.

mod path;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use path::JsonPath;

use crate::envelope::Envelope;

/// Instance ids are at most this long, in bytes.
pub const MAX_INSTANCE_ID: usize = 255;

/// Separates an instance id from a key in the state store: instance ids
/// may not contain control characters, so the split is unambiguous.
const KEY_SEPARATOR: char = '\u{1f}';

/// How a message type finds its instance.
#[derive(Clone, Debug, PartialEq)]
pub enum InstanceKey {
    /// A property of the JSON payload.
    Path(JsonPath),
    /// The message's correlation id.
    CorrelationId,
}

impl InstanceKey {
    /// How a fault (`<command>.Fault`) finds its instance: `$.instance`.
    pub fn fault() -> Self {
        // A constant path: it parses.
        JsonPath::parse("$.instance").map_or(InstanceKey::CorrelationId, InstanceKey::Path)
    }

    /// Parses `correlation-id` or a JSON path such as `$.order.id`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "correlation-id" {
            Ok(InstanceKey::CorrelationId)
        } else {
            JsonPath::parse(text).map(InstanceKey::Path)
        }
    }
}

impl std::fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstanceKey::Path(p) => write!(f, "{p}"),
            InstanceKey::CorrelationId => f.write_str("correlation-id"),
        }
    }
}

/// What becomes of a message whose instance does not exist (or has
/// completed) and whose type does not start one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NotFound {
    /// Settled without calling the plugin, logged and counted.
    #[default]
    Ignore,
    /// Dead-lettered (`no-instance`), saying which instance was missing.
    DeadLetter,
}

/// `[plugins.NAME.saga]`: how a plugin's messages find their instances.
#[derive(Clone, Debug, PartialEq)]
pub struct SagaSpec {
    /// Types that create the instance when it does not exist yet.
    pub starts: Vec<String>,
    /// How each type the plugin handles finds its instance.
    pub keys: BTreeMap<String, InstanceKey>,
    pub not_found: NotFound,
}

/// Where a message belongs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    pub instance: String,
    /// The message's type starts instances.
    pub starts: bool,
}

impl SagaSpec {
    /// The instance `envelope` belongs to, or why it has none.
    pub fn locate(&self, envelope: &Envelope) -> Result<Located, String> {
        let Some(key) = self.keys.get(&envelope.message_type) else {
            return Err(format!(
                "the saga has no instance key for message type {}",
                envelope.message_type
            ));
        };
        let instance = match key {
            InstanceKey::CorrelationId => envelope.correlation_id.clone().ok_or_else(|| {
                "the message has no correlation id, which finds its saga instance".to_owned()
            })?,
            InstanceKey::Path(path) => {
                let value: serde_json::Value =
                    serde_json::from_slice(&envelope.payload).map_err(|e| {
                        format!(
                            "the payload is not JSON, so {path} cannot find its saga instance: {e}"
                        )
                    })?;
                path.resolve(&value)?
            }
        };
        check_instance_id(&instance)?;
        Ok(Located {
            instance,
            starts: self.starts.contains(&envelope.message_type),
        })
    }
}

/// Instance ids are non-empty, at most [`MAX_INSTANCE_ID`] bytes and free
/// of control characters.
pub fn check_instance_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        Err("the saga instance id is empty".to_owned())
    } else if id.len() > MAX_INSTANCE_ID {
        Err(format!(
            "the saga instance id is {} bytes long (at most {MAX_INSTANCE_ID}): {}…",
            id.len(),
            crate::text::clip(id, 64)
        ))
    } else if id.chars().any(char::is_control) {
        Err(format!(
            "the saga instance id {id:?} contains a control character"
        ))
    } else {
        Ok(())
    }
}

/// Where a saga instance's `key` is kept in its plugin's state.
pub fn stored_key(instance: &str, key: &str) -> String {
    let mut k = String::with_capacity(instance.len() + 1 + key.len());
    k.push_str(instance);
    k.push(KEY_SEPARATOR);
    k.push_str(key);
    k
}

/// The prefix of every stored key of `instance`.
pub fn stored_prefix(instance: &str) -> String {
    stored_key(instance, "")
}

/// The instance's own key of a stored key of `instance`.
pub fn instance_key<'k>(instance: &str, stored: &'k str) -> Option<&'k str> {
    stored
        .strip_prefix(instance)
        .and_then(|rest| rest.strip_prefix(KEY_SEPARATOR))
}

/// Where an instance is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    /// The plugin marked it complete: its messages no longer find it, its
    /// state and history are kept to be looked at.
    Completed,
    /// A message of it was dead-lettered (its step failed for good): it
    /// waits for someone to act. Its messages still find it, and the next
    /// step that succeeds (a replay of that dead letter, say) makes it
    /// running again.
    Failed,
}

impl Status {
    /// Whether messages still find the instance: it is not completed.
    pub fn is_open(self) -> bool {
        self != Status::Completed
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(Status::Running),
            "completed" => Some(Status::Completed),
            "failed" => Some(Status::Failed),
            _ => None,
        }
    }
}

/// A saga instance as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub status: Status,
    /// Steps committed so far; each commit expects the one it read.
    pub version: u64,
    /// The version of the plugin that made the last step.
    pub plugin_version: String,
    pub started_at_ms: u64,
    pub updated_at_ms: u64,
    /// The type of the message of the last step.
    pub last_type: String,
}

/// One handled message of an instance, as committed and as `switchyard
/// sagas show` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub instance: String,
    /// The instance's version this step read (0: it started the instance);
    /// it commits as this plus one.
    pub read_version: u64,
    pub message_id: String,
    pub message_type: String,
    pub at_ms: u64,
    /// When the instance started (this step's time, if it started it).
    pub started_at_ms: u64,
    pub plugin_version: String,
    /// The plugin marked the instance complete.
    pub completed: bool,
    /// What the step wrote: each key's new value, or `None` where it was
    /// deleted. Values are kept as text when they are UTF-8, in hex
    /// otherwise (`hex:` prefixed).
    pub changes: BTreeMap<String, Option<String>>,
    /// What the step emitted: type and id of each message.
    pub outputs: Vec<StepOutput>,
    /// Timeouts the step asked for.
    #[serde(default)]
    pub timeouts: Vec<Timeout>,
    /// The timeout this step handled (its message was that timeout firing).
    #[serde(default)]
    pub fired: Option<String>,
}

/// A message a saga asked to be delivered to its instance later.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeout {
    /// Also the id of the message it becomes, so a timeout fired twice is
    /// one message.
    pub id: String,
    pub due_ms: u64,
    #[serde(rename = "type")]
    pub message_type: String,
    pub command: bool,
    /// Kept in the timeout's own row, not in the step's record.
    #[serde(skip)]
    pub payload: Vec<u8>,
}

/// The header a fired timeout's message carries: the timeout's id.
pub const TIMEOUT_HEADER: &str = "switchyard-saga-timeout";

impl Timeout {
    /// The message the timeout becomes when it fires, for `instance`.
    pub fn message(&self, instance: &str) -> Envelope {
        let mut e = Envelope::new(
            self.message_type.clone(),
            if self.command {
                crate::envelope::Kind::Command
            } else {
                crate::envelope::Kind::Event
            },
            self.payload.clone(),
            "application/json",
        );
        e.id.clone_from(&self.id);
        e.correlation_id = Some(instance.to_owned());
        e.headers.push((TIMEOUT_HEADER.to_owned(), self.id.clone()));
        e.created_at_ms = self.due_ms;
        e
    }
}

/// The header of a command a saga sent: the saga's plugin name.
pub const SAGA_HEADER: &str = "switchyard-saga";
/// The header of a command a saga sent: the instance that sent it.
pub const INSTANCE_HEADER: &str = "switchyard-saga-instance";

/// The type of the fault of command type `command`.
pub fn fault_type(command: &str) -> String {
    format!("{command}.Fault")
}

/// The saga (plugin, instance) that sent `command`, when a saga did.
pub fn sender(command: &Envelope) -> Option<(&str, &str)> {
    let header = |name: &str| {
        command
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    Some((header(SAGA_HEADER)?, header(INSTANCE_HEADER)?))
}

/// Why a command failed for good, as its fault tells the saga that sent it.
pub struct FaultInfo<'a> {
    /// The plugin that failed it.
    pub plugin: &'a str,
    pub kind: &'a str,
    pub code: Option<&'a str>,
    pub message: &'a str,
    pub dead_letter: &'a str,
}

/// The fault of a command a saga sent, for the saga: an event of type
/// `<command type>.Fault` whose JSON payload says which command failed,
/// where and why, and names the instance (`instance`). Its id is derived
/// from the command's, so a fault made twice is one message. The
/// command's payload is left out (`payload_omitted`) when the fault would
/// be over `max` bytes, the largest message a route takes.
pub fn fault(
    command: &Envelope,
    saga: &str,
    instance: &str,
    why: &FaultInfo<'_>,
    max: u64,
) -> Envelope {
    let original =
        serde_json::from_slice::<serde_json::Value>(&command.payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&command.payload).into_owned())
        });
    let mut payload = serde_json::json!({
        "instance": instance,
        "command": {
            "type": command.message_type,
            "id": command.id,
            "payload": original,
        },
        "plugin": why.plugin,
        "error": {
            "kind": why.kind,
            "code": why.code,
            "message": crate::text::clip(why.message, 4096),
        },
        "dead_letter": why.dead_letter,
    });
    let mut bytes = serde_json::to_vec(&payload).unwrap_or_default();
    if bytes.len() as u64 > max / 2 {
        payload["command"]["payload"] = serde_json::Value::Null;
        payload["command"]["payload_omitted"] = serde_json::Value::Bool(true);
        bytes = serde_json::to_vec(&payload).unwrap_or_default();
    }
    let mut e = Envelope::new(
        fault_type(&command.message_type),
        crate::envelope::Kind::Event,
        bytes,
        "application/json",
    );
    let id = format!("{}.fault", command.id);
    if id.len() <= 255 {
        e.id = id;
    }
    e.correlation_id = Some(command.flow_id().to_owned());
    e.causation_id = Some(command.id.clone());
    e.headers.push((SAGA_HEADER.to_owned(), saga.to_owned()));
    e.headers
        .push((INSTANCE_HEADER.to_owned(), instance.to_owned()));
    e
}

/// The timeout a message is the firing of, if it is one.
pub fn fired_timeout(envelope: &Envelope) -> Option<&str> {
    envelope
        .headers
        .iter()
        .find(|(n, _)| n == TIMEOUT_HEADER)
        .map(|(_, v)| v.as_str())
}

/// A message a step emitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOutput {
    #[serde(rename = "type")]
    pub message_type: String,
    pub id: String,
    pub command: bool,
}

impl Step {
    /// The version the instance has once this step commits.
    pub fn version(&self) -> u64 {
        self.read_version + 1
    }

    /// The step's record as stored: JSON.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings, numbers and maps with string keys always
        // serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> anyhow::Result<Self> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// What the step did, a line each, as `sagas show` and `why` print
    /// it: keys set and deleted, messages sent and published, timeouts
    /// asked for and handled, and whether it completed the instance.
    /// `time` writes a time; `outputs` says whether to list the messages
    /// (`why` lists them with the handling already).
    pub fn effects(&self, time: impl Fn(u64) -> String, outputs: bool) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in &self.changes {
            match v {
                Some(v) => out.push(format!("set      {k} = {}", crate::text::clip(v, 200))),
                None => out.push(format!("deleted  {k}")),
            }
        }
        for o in self.outputs.iter().filter(|_| outputs) {
            let verb = if o.command { "sent" } else { "published" };
            out.push(format!("{verb:<8} {} {}", o.message_type, o.id));
        }
        for t in &self.timeouts {
            out.push(format!(
                "timeout  {} due {} ({})",
                t.message_type,
                time(t.due_ms),
                t.id
            ));
        }
        if let Some(fired) = &self.fired {
            out.push(format!("handled timeout {fired}"));
        }
        if self.completed {
            out.push("completed the instance".to_owned());
        }
        out
    }

    /// The instance as this step leaves it.
    pub fn instance(&self) -> Instance {
        Instance {
            status: if self.completed {
                Status::Completed
            } else {
                Status::Running
            },
            version: self.version(),
            plugin_version: self.plugin_version.clone(),
            started_at_ms: self.started_at_ms,
            updated_at_ms: self.at_ms,
            last_type: self.message_type.clone(),
        }
    }
}

/// A timeout waiting to fire, as `switchyard sagas show` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pending {
    pub id: String,
    pub due_ms: u64,
    #[serde(rename = "type")]
    pub message_type: String,
    /// When a host last sent it to the broker (it is sent again, waiting
    /// twice as long each time, if it is not handled).
    pub fired_at_ms: Option<u64>,
    /// How often hosts sent it.
    pub sends: u32,
}

/// A value as a step records it.
pub fn shown_value(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => {
            let mut s = String::from("hex:");
            for b in bytes {
                s.push_str(&format!("{b:02x}"));
            }
            s
        }
    }
}

/// A commit refused because an instance moved on since its step read it:
/// the batch is handled again, on the instance as it now is. Not a failure
/// of the message.
#[derive(Debug, thiserror::Error)]
#[error(
    "saga instance {instance} of plugin {plugin} changed while a message for it was handled (it expected version {expected}); the message is handled again"
)]
pub struct Conflict {
    pub plugin: String,
    pub instance: String,
    pub expected: u64,
}

/// A stored instance that cannot be read: its messages are dead-lettered
/// (the instance is quarantined) until it is repaired; other instances go
/// on.
#[derive(Debug, thiserror::Error)]
#[error("saga instance {instance} of plugin {plugin} is corrupt in the state store: {why}")]
pub struct Corrupt {
    pub plugin: String,
    pub instance: String,
    pub why: String,
}

/// Which instances `switchyard sagas list` shows.
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub plugin: Option<String>,
    pub status: Option<Status>,
    /// Only instances whose last step is older than this.
    pub updated_before_ms: Option<u64>,
    /// Only instances started before this.
    pub started_before_ms: Option<u64>,
    pub limit: usize,
}

/// An instance as `switchyard sagas list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub plugin: String,
    pub id: String,
    pub instance: Instance,
}

/// Whether an instance is one `query` asks for (its limit aside).
pub fn matches(query: &Query, plugin: &str, i: &Instance) -> bool {
    query.plugin.as_deref().is_none_or(|p| p == plugin)
        && query.status.is_none_or(|s| s == i.status)
        && query.updated_before_ms.is_none_or(|t| i.updated_at_ms < t)
        && query.started_before_ms.is_none_or(|t| i.started_at_ms < t)
}

/// Two hosts' commits got in each other's way (a deadlock between their
/// row locks, say): like a [`Conflict`], the batch runs again.
#[derive(Debug, thiserror::Error)]
#[error("the commit of plugin {plugin} ran into another host's: {why}; the batch is handled again")]
pub struct Contention {
    pub plugin: String,
    pub why: String,
}

/// Whether `e` (or what it wraps) is a [`Conflict`] or a [`Contention`].
pub fn is_conflict(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<Conflict>().is_some() || c.downcast_ref::<Contention>().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Kind;

    fn spec() -> SagaSpec {
        SagaSpec {
            starts: vec!["OrderPlaced".into()],
            keys: [
                (
                    "OrderPlaced".to_owned(),
                    InstanceKey::parse("$.order.id").unwrap(),
                ),
                (
                    "Paid".to_owned(),
                    InstanceKey::parse("correlation-id").unwrap(),
                ),
            ]
            .into(),
            not_found: NotFound::Ignore,
        }
    }

    fn message(t: &str, payload: &str) -> Envelope {
        let mut e = Envelope::new(
            t,
            Kind::Event,
            payload.as_bytes().to_vec(),
            "application/json",
        );
        e.correlation_id = Some("flow-1".into());
        e
    }

    #[test]
    fn messages_find_their_instance_by_path_or_correlation_id() {
        let s = spec();
        let placed = s
            .locate(&message("OrderPlaced", r#"{"order":{"id":"A-1"}}"#))
            .unwrap();
        assert_eq!(placed.instance, "A-1");
        assert!(placed.starts);
        let paid = s.locate(&message("Paid", "not json")).unwrap();
        assert_eq!(paid.instance, "flow-1");
        assert!(!paid.starts);
        let numeric = s
            .locate(&message("OrderPlaced", r#"{"order":{"id":17}}"#))
            .unwrap();
        assert_eq!(numeric.instance, "17");
    }

    #[test]
    fn an_unresolvable_instance_says_why() {
        let s = spec();
        let missing = s
            .locate(&message("OrderPlaced", r#"{"order":{}}"#))
            .unwrap_err();
        assert!(missing.contains("$.order.id"), "{missing}");
        let not_json = s.locate(&message("OrderPlaced", "{")).unwrap_err();
        assert!(not_json.contains("not JSON"), "{not_json}");
        let long = format!(r#"{{"order":{{"id":"{}"}}}}"#, "x".repeat(257));
        assert!(
            s.locate(&message("OrderPlaced", &long))
                .unwrap_err()
                .contains("257 bytes")
        );
        let control = s
            .locate(&message("OrderPlaced", r#"{"order":{"id":"a\u001fb"}}"#))
            .unwrap_err();
        assert!(control.contains("control character"), "{control}");
        let unknown = s.locate(&message("Shipped", "{}")).unwrap_err();
        assert!(unknown.contains("Shipped"), "{unknown}");
    }

    #[test]
    fn stored_keys_keep_instances_apart() {
        let a = stored_key("A", "x");
        let a1 = stored_key("A/1", "x");
        assert!(a.starts_with(&stored_prefix("A")));
        assert!(!a1.starts_with(&stored_prefix("A")));
        assert_eq!(instance_key("A", &a), Some("x"));
        assert_eq!(instance_key("A", &a1), None);
    }
}
