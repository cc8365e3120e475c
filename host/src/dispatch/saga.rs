//! What a saga plugin's message runs on: its instance, found before the
//! plugin is called, and the step a successful call makes of it.

use crate::envelope::Envelope;
use crate::plugin::{Failure, FailureKind, Output, SagaCall};
use crate::saga::{Corrupt, NotFound, SagaSpec, Step, instance_key, shown_value};

/// What a saga plugin's message runs on.
#[derive(Debug)]
pub enum Prep {
    /// The plugin is not a saga.
    NotSaga,
    Run(SagaCall),
    /// No instance, and the pipeline says to ignore that: why.
    Skip(String),
    /// A timeout that is no longer pending: settled without the plugin,
    /// whatever `not_found` says.
    Drop(String),
}

/// The instance `envelope` belongs to, as `scope` (the batch, then the
/// store) sees it: an existing instance, a new one (its type starts
/// instances), or none (skipped or a `no-instance` failure, as
/// `not_found` says). A store that cannot be read is a transient failure.
pub fn prepare(
    spec: &SagaSpec,
    scope: Option<&crate::state::Scope>,
    plugin: &str,
    envelope: &Envelope,
) -> Result<Prep, Failure> {
    let no_instance = |why: String, instance: Option<&str>| {
        let mut f = Failure::new(FailureKind::NoInstance, why);
        if let Some(id) = instance {
            f.details.push(("saga.instance".into(), id.to_owned()));
        }
        f
    };
    let read_failed = |e: anyhow::Error| {
        Failure::new(
            FailureKind::Transient,
            format!("the state store cannot be read: {e:#}"),
        )
    };
    // A fault goes to every consumer of its type; it is this saga's only
    // if this saga sent the command.
    if envelope.message_type.ends_with(".Fault")
        && let Some((saga, _)) = crate::saga::sender(envelope)
        && saga != plugin
    {
        return Ok(Prep::Drop(format!(
            "{} is the fault of a command saga {saga} sent, not {plugin}",
            envelope.message_type
        )));
    }
    let Some(scope) = scope else {
        return Err(no_instance(
            format!("saga {plugin} runs on a host that keeps no state"),
            None,
        ));
    };
    // A timeout belongs to the instance that asked for it, whatever its
    // payload says, and fires only while it is pending: one whose instance
    // completed, or that was handled already (fired twice), is dropped.
    if let Some(timeout) = crate::saga::fired_timeout(envelope) {
        let owner = scope.timeout_instance(timeout).map_err(read_failed)?;
        // A timeout that was dead-lettered is forgotten; a replay of it
        // goes to the instance it was for (its correlation id).
        let owner = owner.or_else(|| {
            crate::dlq::DeadLetter::replay_of(envelope).and(envelope.correlation_id.clone())
        });
        let instance = match &owner {
            Some(id) => read_instance(scope, id, &no_instance)?,
            None => None,
        };
        return Ok(match (owner, instance) {
            (Some(id), Some(i)) if i.status.is_open() => Prep::Run(SagaCall {
                id,
                version: i.version,
                started_at_ms: i.started_at_ms,
            }),
            _ => Prep::Drop(format!(
                "timeout {timeout} of saga {plugin} is no longer pending (its instance completed, or the timeout was handled)"
            )),
        });
    }
    let located = spec.locate(envelope).map_err(|why| {
        no_instance(
            format!(
                "saga {plugin} cannot find the instance of this {} message: {why}",
                envelope.message_type
            ),
            None,
        )
    })?;
    let id = located.instance.as_str();
    let instance = read_instance(scope, id, &no_instance)?;
    let why = match instance {
        Some(i) if i.status.is_open() => {
            return Ok(Prep::Run(SagaCall {
                id: located.instance,
                version: i.version,
                started_at_ms: i.started_at_ms,
            }));
        }
        None if located.starts => {
            return Ok(Prep::Run(SagaCall {
                id: located.instance,
                version: 0,
                started_at_ms: crate::envelope::now_ms(),
            }));
        }
        Some(_) => format!("saga instance {id} of {plugin} has completed"),
        None => format!(
            "saga {plugin} has no instance {id}, and {} does not start one",
            envelope.message_type
        ),
    };
    match spec.not_found {
        NotFound::Ignore => Ok(Prep::Skip(why)),
        NotFound::DeadLetter => Err(no_instance(why, Some(id))),
    }
}

/// The step a saga call made that returned `outputs` (its output ids are
/// filled in when they are assigned).
pub fn step_of(
    call: &SagaCall,
    envelope: &Envelope,
    outputs: &[Output],
    plugin_version: String,
    completed: bool,
    timeouts: Vec<crate::saga::Timeout>,
) -> Step {
    let changes = outputs
        .iter()
        .rev()
        .find_map(|o| match o {
            Output::State(c) => Some(c),
            _ => None,
        })
        .map(|c| {
            c.writes
                .iter()
                .filter_map(|(k, v)| {
                    instance_key(&call.id, k).map(|k| (k.to_owned(), v.as_deref().map(shown_value)))
                })
                .collect()
        })
        .unwrap_or_default();
    Step {
        instance: call.id.clone(),
        read_version: call.version,
        message_id: envelope.id.clone(),
        message_type: envelope.message_type.clone(),
        at_ms: crate::envelope::now_ms(),
        started_at_ms: call.started_at_ms,
        plugin_version,
        completed,
        changes,
        outputs: Vec::new(),
        timeouts,
        fired: crate::saga::fired_timeout(envelope).map(str::to_owned),
    }
}

/// Instance `id` as the scope sees it; a corrupt one is a `no-instance`
/// failure (quarantined), a store that cannot be read a transient one.
fn read_instance(
    scope: &crate::state::Scope,
    id: &str,
    no_instance: &dyn Fn(String, Option<&str>) -> Failure,
) -> Result<Option<crate::saga::Instance>, Failure> {
    match scope.instance(id) {
        Ok(i) => Ok(i),
        Err(e) if e.chain().any(|c| c.is::<Corrupt>()) => Err(no_instance(
            format!(
                "{e:#}; the instance is quarantined: its messages are dead-lettered until it is repaired"
            ),
            Some(id),
        )),
        Err(e) => Err(Failure::new(
            FailureKind::Transient,
            format!("the state store cannot be read: {e:#}"),
        )),
    }
}
