//! The story of a message, or of a whole flow, told from the journal and
//! the dead-letter store: what `switchyard why` prints and the console's
//! message journey shows.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::dlq::{DeadLetterStore, Status};
use crate::journal::{self, Outcome, Record};
use crate::state::Reader;

/// The most messages a story follows: a flow larger than this is cut, and
/// says so.
pub const MAX_MESSAGES: usize = 2000;
/// The most causation links followed up from a message.
const MAX_ANCESTORS: usize = 64;

/// One message of a story and what happened to it.
#[derive(Debug, Serialize)]
pub struct Node {
    pub id: String,
    pub message_type: String,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// Every handling of it, oldest first.
    pub handlings: Vec<Record>,
    /// Its dead-letter records, as they are now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dead_letters: Vec<LetterNow>,
    /// The saga steps it drove, as committed (see [`add_saga_steps`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub saga_steps: Vec<DrivenStep>,
}

/// A saga step a message drove: the step as committed, and its instance
/// as it is now.
#[derive(Debug, Serialize)]
pub struct DrivenStep {
    pub plugin: String,
    /// The instance's status now (`None`: the instance is gone).
    pub instance_now: Option<String>,
    /// The instance's version now.
    pub instance_version: Option<u64>,
    pub step: crate::saga::Step,
}

/// A dead-letter record as it is now.
#[derive(Debug, Serialize)]
pub struct LetterNow {
    pub id: String,
    pub status: String,
    pub replay_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The story: the messages in causal order, the subject among them.
#[derive(Debug, Serialize)]
pub struct Story {
    /// The message (or flow) asked about.
    pub subject: String,
    /// Messages, parents before the messages they caused.
    pub messages: Vec<Node>,
    /// Messages named as a cause that the journal does not hold (sent from
    /// outside, or pruned).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown_causes: Vec<String>,
    /// Whether the story was cut at [`MAX_MESSAGES`].
    pub truncated: bool,
    /// What was searched.
    pub searched: Vec<String>,
    /// The pipeline file, for the commands the story suggests.
    #[serde(skip)]
    pub pipeline: Option<String>,
}

/// The message id `given` names: a message id, a dead-letter record's id,
/// or a unique prefix of either (a prefix that starts ids of both kinds is
/// refused rather than guessed).
pub async fn resolve(
    journal: &dyn journal::Store,
    letters: &dyn DeadLetterStore,
    given: &str,
) -> Result<Option<String>> {
    if !journal.of_message(given).await?.is_empty() {
        return Ok(Some(given.to_owned()));
    }
    let letter = letters.get(given).await?;
    if let Some(l) = &letter
        && l.id == given
    {
        return Ok(Some(l.message.id.clone()));
    }
    let ids = if given.len() >= 4 {
        journal.ids_like(given, 2).await?
    } else {
        Vec::new()
    };
    match (ids.as_slice(), letter) {
        ([], Some(l)) => Ok(Some(l.message.id)),
        ([one], None) => Ok(Some(one.clone())),
        ([], None) => Ok(None),
        ([one], Some(l)) if *one == l.message.id => Ok(Some(one.clone())),
        _ => bail!(
            "`{given}` starts more than one id (of messages or dead letters); give more of it"
        ),
    }
}

/// Groups records into nodes, in the order their messages first appear.
fn nodes(records: Vec<Record>) -> Vec<Node> {
    let mut order: Vec<String> = Vec::new();
    let mut by_id: BTreeMap<String, Node> = BTreeMap::new();
    for r in records {
        let node = by_id.entry(r.message_id.clone()).or_insert_with(|| {
            order.push(r.message_id.clone());
            Node {
                id: r.message_id.clone(),
                message_type: r.message_type.clone(),
                kind: r.kind.clone(),
                causation_id: r.causation_id.clone(),
                handlings: Vec::new(),
                dead_letters: Vec::new(),
                saga_steps: Vec::new(),
            }
        });
        node.handlings.push(r);
    }
    order
        .into_iter()
        .filter_map(|id| by_id.remove(&id))
        .collect()
}

/// The story of one message: up its causes to the first message of the
/// flow, then down everything it caused.
pub async fn message(
    journal: &dyn journal::Store,
    letters: &dyn DeadLetterStore,
    id: &str,
    searched: Vec<String>,
) -> Result<Story> {
    let mut ancestors = Vec::new();
    let mut unknown_causes = Vec::new();
    let own = journal.of_message(id).await?;
    let mut cause = own.iter().find_map(|r| r.causation_id.clone());
    let mut seen: BTreeSet<String> = BTreeSet::from([id.to_owned()]);
    while let Some(c) = cause.take() {
        if ancestors.len() >= MAX_ANCESTORS || !seen.insert(c.clone()) {
            break;
        }
        let records = journal.of_message(&c).await?;
        if records.is_empty() {
            unknown_causes.push(c);
            break;
        }
        cause = records.iter().find_map(|r| r.causation_id.clone());
        ancestors.extend(nodes(records));
    }
    ancestors.reverse();
    let mut messages = ancestors;
    messages.extend(nodes(own));
    let mut frontier = vec![id.to_owned()];
    let mut truncated = false;
    while !frontier.is_empty() {
        let room = (MAX_MESSAGES - messages.len().min(MAX_MESSAGES)) * 8 + 1;
        let caused = journal.caused_by(&frontier, room).await?;
        frontier.clear();
        for node in nodes(caused) {
            if !seen.insert(node.id.clone()) {
                continue;
            }
            if messages.len() >= MAX_MESSAGES {
                truncated = true;
                break;
            }
            frontier.push(node.id.clone());
            messages.push(node);
        }
        if truncated {
            break;
        }
    }
    finish(
        letters,
        Story {
            subject: id.to_owned(),
            messages: order(messages),
            unknown_causes,
            truncated,
            searched,
            pipeline: None,
        },
    )
    .await
}

/// The story of a flow: every message journaled with its correlation id.
pub async fn flow(
    journal: &dyn journal::Store,
    letters: &dyn DeadLetterStore,
    correlation_id: &str,
    searched: Vec<String>,
) -> Result<Story> {
    let records = journal.of_flow(correlation_id, MAX_MESSAGES * 8).await?;
    let truncated = records.len() >= MAX_MESSAGES * 8;
    let messages = order(nodes(records));
    let known: BTreeSet<&str> = messages.iter().map(|n| n.id.as_str()).collect();
    let unknown_causes = messages
        .iter()
        .filter_map(|n| n.causation_id.as_deref())
        .filter(|c| !known.contains(c))
        .map(str::to_owned)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    finish(
        letters,
        Story {
            subject: correlation_id.to_owned(),
            messages,
            unknown_causes,
            truncated,
            searched,
            pipeline: None,
        },
    )
    .await
}

/// Orders messages so that each comes after the message that caused it
/// (depth first, children by when they were first handled).
fn order(nodes: Vec<Node>) -> Vec<Node> {
    let ids: BTreeSet<String> = nodes.iter().map(|n| n.id.clone()).collect();
    let mut children: BTreeMap<Option<String>, Vec<Node>> = BTreeMap::new();
    for n in nodes {
        let parent = n.causation_id.clone().filter(|c| ids.contains(c));
        children.entry(parent).or_default().push(n);
    }
    for list in children.values_mut() {
        list.sort_by_key(|n| n.handlings.first().map_or(0, |r| r.at_ms));
    }
    let mut out = Vec::new();
    let mut stack: Vec<Node> = children.remove(&None).unwrap_or_default();
    stack.reverse();
    while let Some(n) = stack.pop() {
        if let Some(mut kids) = children.remove(&Some(n.id.clone())) {
            kids.reverse();
            stack.extend(kids);
        }
        out.push(n);
    }
    // A cycle of causes (ids reused by a client) is still shown.
    out.extend(children.into_values().flatten());
    out
}

/// Adds to a story the dead-letter records its journal names, as they are
/// now.
async fn finish(letters: &dyn DeadLetterStore, mut story: Story) -> Result<Story> {
    for node in &mut story.messages {
        let ids: BTreeSet<&str> = node
            .handlings
            .iter()
            .filter_map(|r| r.dead_letter.as_deref())
            .collect();
        for id in ids {
            if let Some(d) = letters.get(id).await? {
                node.dead_letters.push(LetterNow {
                    id: d.id,
                    status: d.status.as_str().to_owned(),
                    replay_count: d.replay_count,
                    note: d.note,
                });
            } else {
                node.dead_letters.push(LetterNow {
                    id: id.to_owned(),
                    status: "deleted".into(),
                    replay_count: 0,
                    note: None,
                });
            }
        }
    }
    Ok(story)
}

/// The most saga instances whose steps a story reads.
pub const MAX_SAGA_INSTANCES: usize = 200;

/// Adds to a story the saga steps its messages drove, read from the state
/// store: each handling the journal says drove a saga instance is matched
/// to the step that instance committed for the message. A handling that
/// committed no step (it failed, or lost a race and was handled again)
/// matches none. Reads the steps of at most [`MAX_SAGA_INSTANCES`]
/// instances.
pub async fn add_saga_steps(story: &mut Story, reader: Arc<dyn Reader>) -> Result<()> {
    let mut wanted: BTreeSet<(String, String)> = BTreeSet::new();
    for r in story.messages.iter().flat_map(|n| &n.handlings) {
        if let Some(i) = &r.saga_instance {
            if wanted.len() >= MAX_SAGA_INSTANCES {
                break;
            }
            wanted.insert((r.plugin.clone(), i.clone()));
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let read = tokio::task::spawn_blocking(move || {
        let mut out = BTreeMap::new();
        for (plugin, id) in wanted {
            let steps = reader.steps(&plugin, &id)?;
            let now = reader.instance(&plugin, &id)?;
            out.insert((plugin, id), (steps, now));
        }
        anyhow::Ok(out)
    })
    .await
    .map_err(|e| anyhow::anyhow!("the saga state read failed: {e}"))??;
    for node in &mut story.messages {
        for r in &node.handlings {
            let Some(id) = &r.saga_instance else { continue };
            let Some((steps, now)) = read.get(&(r.plugin.clone(), id.clone())) else {
                continue;
            };
            for step in steps.iter().filter(|s| s.message_id == node.id) {
                let known = node.saga_steps.iter().any(|d| {
                    d.plugin == r.plugin
                        && d.step.instance == *id
                        && d.step.version() == step.version()
                });
                if !known {
                    node.saga_steps.push(DrivenStep {
                        plugin: r.plugin.clone(),
                        instance_now: now.as_ref().map(|i| i.status.as_str().to_owned()),
                        instance_version: now.as_ref().map(|i| i.version),
                        step: step.clone(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// The most handlings a search by attribute reads.
pub const MAX_FOUND: usize = 200;

/// A flow in which a plugin set a span attribute: the flow's id and the
/// handlings that set it, newest first.
#[derive(Debug, Serialize)]
pub struct Found {
    pub flow: String,
    pub handlings: Vec<Record>,
}

/// A span attribute searched for, from `NAME=VALUE`.
pub fn attribute_query(text: &str) -> Option<(&str, &str)> {
    let (name, value) = text.split_once('=')?;
    let name = name.trim();
    (!name.is_empty() && !name.contains(char::is_whitespace)).then_some((name, value.trim()))
}

/// The flows in which a plugin set the span attribute `name` to `value`,
/// the most recent first.
pub async fn by_attribute(
    journal: &dyn journal::Store,
    name: &str,
    value: &str,
) -> Result<Vec<Found>> {
    let records = journal.with_attribute(name, value, MAX_FOUND).await?;
    let mut found: Vec<Found> = Vec::new();
    for r in records {
        let flow = r.flow_id().to_owned();
        match found.iter_mut().find(|f| f.flow == flow) {
            Some(f) => f.handlings.push(r),
            None => found.push(Found {
                flow,
                handlings: vec![r],
            }),
        }
    }
    Ok(found)
}

/// A time to the millisecond (the order of hops is in the milliseconds).
pub fn time(ms: u64) -> String {
    match std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms)) {
        Some(t) if ms < 253_402_300_800_000 => humantime::format_rfc3339_millis(t).to_string(),
        _ => format!("{ms} ms"),
    }
}

pub fn duration_us(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.1} s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else {
        format!("{us} µs")
    }
}

/// One handling in a few words: "handled by payments@1.0.0 on attempt 2".
pub fn handling_line(r: &Record) -> String {
    let by = format!("{}@{}", r.plugin, r.plugin_version);
    let replay = r
        .replay_of
        .as_deref()
        .map(|d| format!(" (a replay of dead letter {d})"))
        .unwrap_or_default();
    match r.outcome {
        Outcome::Handled => format!(
            "handled by {by} on attempt {} in {}{replay}",
            r.attempt,
            duration_us(r.took_us)
        ),
        Outcome::RetriedLater => format!(
            "failed in {by} on attempt {}{replay}; retry due at {}",
            r.attempt,
            r.retry_at_ms.map_or_else(|| "?".into(), time)
        ),
        Outcome::DeadLettered => format!(
            "failed for good in {by} on attempt {}{replay}; dead-lettered as {}",
            r.attempt,
            r.dead_letter.as_deref().unwrap_or("?")
        ),
        Outcome::Duplicate => format!(
            "came again to {by} and was not handled again: it had been handled before (exactly once){replay}"
        ),
        Outcome::SagaNotFound => {
            format!("ignored by the saga {by}: no instance of it was running{replay}")
        }
    }
}

/// Where a message is now, from its last handling per plugin.
pub fn now_line(node: &Node, pipeline: Option<&str>) -> String {
    let p = pipeline.map(|p| format!(" -p {p}")).unwrap_or_default();
    let mut last: BTreeMap<&str, &Record> = BTreeMap::new();
    for r in &node.handlings {
        last.insert(r.plugin.as_str(), r);
    }
    let parts: Vec<String> = last
        .values()
        .map(|r| match r.outcome {
            Outcome::Handled | Outcome::Duplicate => format!("handled by {}", r.plugin),
            Outcome::SagaNotFound => format!("ignored by {}", r.plugin),
            Outcome::RetriedLater => format!(
                "waiting in {} for a retry at {}",
                r.plugin,
                r.retry_at_ms.map_or_else(|| "?".into(), time)
            ),
            Outcome::DeadLettered => {
                let id = r.dead_letter.as_deref().unwrap_or("?");
                match node.dead_letters.iter().find(|d| d.id == id) {
                    Some(d) if d.status == Status::Resolved.as_str() => format!(
                        "dead-lettered in {} as {id}, since resolved{}",
                        r.plugin,
                        d.note
                            .as_deref()
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default()
                    ),
                    Some(d) if d.status == Status::Dead.as_str() => format!(
                        "dead-lettered in {} as {id}: `switchyard dlq show{p} {id}` has the error, `switchyard dlq replay{p} {id}` sends it again",
                        r.plugin
                    ),
                    Some(d) => format!(
                        "dead-lettered in {} as {id}, now {} (replayed {} times)",
                        r.plugin, d.status, d.replay_count
                    ),
                    None => format!("dead-lettered in {} as {id}", r.plugin),
                }
            }
        })
        .collect();
    parts.join("; ")
}

/// The story in words: a summary first, then each message with each of its
/// handlings, indented under the message that caused it.
pub fn tell(story: &Story) -> String {
    let mut out = String::new();
    let subject = story.messages.iter().find(|n| n.id == story.subject);
    match subject {
        Some(n) => {
            out.push_str(&format!(
                "{} {} ({}): {}.\n",
                n.message_type,
                n.id,
                n.kind,
                now_line(n, story.pipeline.as_deref())
            ));
            let root = &story.messages[0];
            if root.id != n.id {
                out.push_str(&format!(
                    "It is part of the flow started by {} {}.\n",
                    root.message_type, root.id
                ));
            }
        }
        None => out.push_str(&format!(
            "Flow {}: {} messages.\n",
            story.subject,
            story.messages.len()
        )),
    }
    let failed: Vec<&Node> = story
        .messages
        .iter()
        .filter(|n| {
            n.handlings
                .last()
                .is_some_and(|r| matches!(r.outcome, Outcome::DeadLettered | Outcome::RetriedLater))
        })
        .collect();
    if subject.is_some() || !failed.is_empty() {
        let others: Vec<String> = failed
            .iter()
            .filter(|n| subject.is_none_or(|s| s.id != n.id))
            .map(|n| {
                format!(
                    "{} {}: {}",
                    n.message_type,
                    n.id,
                    now_line(n, story.pipeline.as_deref())
                )
            })
            .collect();
        if !others.is_empty() {
            out.push_str("Not done in this flow:\n");
            for o in others {
                out.push_str(&format!("  {o}\n"));
            }
        }
    }
    if let Some(c) = story.unknown_causes.first() {
        out.push_str(&format!(
            "Caused by {c}, which the journal does not hold (sent from outside, or pruned).\n"
        ));
    }
    out.push('\n');
    let depth = depths(&story.messages);
    for n in &story.messages {
        let pad = "  ".repeat(depth.get(n.id.as_str()).copied().unwrap_or(0));
        let mark = if n.id == story.subject { "▶ " } else { "" };
        let first = n.handlings.first().map_or(0, |r| r.at_ms);
        out.push_str(&format!(
            "{pad}{mark}{} {} {} ({})\n",
            time(first),
            n.message_type,
            n.id,
            n.kind
        ));
        for r in &n.handlings {
            out.push_str(&format!(
                "{pad}    {}: {}\n",
                time(r.at_ms),
                handling_line(r)
            ));
            let code = r
                .error
                .as_ref()
                .and_then(|e| e.code.as_deref())
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            for (i, t) in r.failures.iter().enumerate() {
                // The code of the error the handling ended with.
                let code = if i + 1 == r.failures.len() {
                    code.as_str()
                } else {
                    ""
                };
                out.push_str(&format!(
                    "{pad}      attempt {} ({}): {}{code}: {} → {}\n",
                    t.number,
                    duration_us(t.duration_us),
                    t.error_kind,
                    t.error,
                    t.then
                ));
            }
            if let Some(e) = &r.error
                && r.failures.is_empty()
            {
                out.push_str(&format!(
                    "{pad}      {}{}: {}\n",
                    e.kind,
                    e.code
                        .as_deref()
                        .map(|c| format!(" ({c})"))
                        .unwrap_or_default(),
                    e.message
                ));
            }
            if !r.sent.is_empty() || r.replied {
                let mut sent: Vec<String> = r
                    .sent
                    .iter()
                    .map(|s| format!("{} {}", s.message_type, s.id))
                    .collect();
                if r.replied {
                    sent.push("a reply".into());
                }
                out.push_str(&format!("{pad}      sent {}\n", sent.join(", ")));
            }
            if let Some(i) = &r.saga_instance {
                let driven: Vec<&DrivenStep> = n
                    .saga_steps
                    .iter()
                    .filter(|d| d.plugin == r.plugin && d.step.instance == *i)
                    .filter(|_| r.outcome == Outcome::Handled)
                    .collect();
                if driven.is_empty() {
                    out.push_str(&format!("{pad}      saga instance {i}\n"));
                }
                for d in driven {
                    out.push_str(&format!("{pad}      {}\n", step_line(d)));
                    for line in d.step.effects(time, false) {
                        out.push_str(&format!("{pad}        {line}\n"));
                    }
                }
            }
            let mut ids = vec![format!("digest {}", short(&r.plugin_digest))];
            if let Some(t) = &r.trace_id {
                ids.push(format!("trace {t}"));
            }
            ids.push(format!("host {}", r.host));
            out.push_str(&format!("{pad}      {}\n", ids.join(", ")));
        }
    }
    if story.truncated {
        out.push_str(&format!(
            "\n(cut at {MAX_MESSAGES} messages; --json holds the same)\n"
        ));
    }
    out
}

/// A driven step in a few words: "step 3 of saga fulfilment's instance
/// S-2 (now completed, at step 5)".
pub fn step_line(d: &DrivenStep) -> String {
    let now = match (&d.instance_now, d.instance_version) {
        (Some(status), Some(v)) if v == d.step.version() => format!("now {status}, at this step"),
        (Some(status), Some(v)) => format!("now {status}, at step {v}"),
        _ => "the instance is gone".to_owned(),
    };
    let started = if d.step.read_version == 0 {
        ", which it started"
    } else {
        ""
    };
    format!(
        "step {} of saga {}'s instance {}{started} ({now}):",
        d.step.version(),
        d.plugin,
        d.step.instance
    )
}

/// `sha256:` and the first 12 hex digits.
pub fn short(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("sha256:{}", hex.get(..12).unwrap_or(hex))
}

/// How deep each message sits below the first of the story.
pub fn depths(messages: &[Node]) -> BTreeMap<&str, usize> {
    let mut depth: BTreeMap<&str, usize> = BTreeMap::new();
    for n in messages {
        let d = n
            .causation_id
            .as_deref()
            .and_then(|c| depth.get(c))
            .map_or(0, |d| d + 1);
        depth.insert(n.id.as_str(), d);
    }
    depth
}

/// The story of a message as `why` tells it, for tests and tools.
pub async fn story_of(
    journal: Arc<dyn journal::Store>,
    letters: Arc<dyn DeadLetterStore>,
    id: &str,
) -> Result<Option<Story>> {
    match resolve(journal.as_ref(), letters.as_ref(), id).await? {
        Some(id) => Ok(Some(
            message(
                journal.as_ref(),
                letters.as_ref(),
                &id,
                vec![journal.location()],
            )
            .await?,
        )),
        None => Ok(None),
    }
}
