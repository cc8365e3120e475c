//! `switchyard test`: contract tests for a plugin component, run in the
//! real sandbox without a broker.
//!
//! A test file (TOML) holds cases. Each case gives one input message and
//! what the handler must do with it: the events it publishes, the commands
//! it sends, its reply, or the kind of failure. Expectations are strict:
//! outputs not listed fail the case. A payload is compared whole (`exact`,
//! the default) or as a JSON subset (`subset`: every field given must be
//! there with that value; others may be too).
//!
//! A case may give the plugin's state before it runs (`[case.state]`, each
//! key's value as JSON) and the whole state it must leave behind
//! (`[case.expect.state]`): keys not listed must not be there.
//!
//! A file with a `[saga]` table (the keys of a pipeline's
//! `[plugins.NAME.saga]`) runs the plugin as a saga: the host finds each
//! input's instance as a pipeline would. A case gives the instance that
//! exists before it (`[case.saga]`; none: no instance exists), whose state
//! `[case.state]` is, and expects what becomes of it (`expect.saga`:
//! `running`, `completed`, or `ignored` when the message found no instance
//! and `not_found = "ignore"`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{Grants, Limits, PluginName};
use crate::envelope::{Envelope, Kind};
use crate::plugin::{
    ComponentCache, HttpSimulation, HttpStub, LoadedPlugin, Output, PluginEngine, Sandbox,
    Simulation,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    /// Run the plugin as a saga, as a pipeline's `[plugins.NAME.saga]`.
    saga: Option<SagaSection>,
    #[serde(rename = "case", default)]
    cases: Vec<Case>,
}

/// `[saga]`: the keys of a pipeline's `[plugins.NAME.saga]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SagaSection {
    starts: Vec<String>,
    instance_key: Option<String>,
    #[serde(default)]
    instance_keys: std::collections::BTreeMap<String, String>,
    not_found: Option<String>,
}

impl SagaSection {
    /// The saga as a pipeline would run it, for a plugin that handles
    /// `handled`.
    fn spec(&self, handled: &[String]) -> Result<crate::saga::SagaSpec> {
        use crate::saga::{InstanceKey, NotFound, SagaSpec};
        for t in self.starts.iter().chain(self.instance_keys.keys()) {
            if !handled.contains(t) {
                bail!("[saga] names {t}, which the plugin does not handle");
            }
        }
        let default = self
            .instance_key
            .as_deref()
            .map(InstanceKey::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let mut keys = std::collections::BTreeMap::new();
        for t in handled {
            let key = match (self.instance_keys.get(t), &default) {
                (Some(k), _) => InstanceKey::parse(k).map_err(anyhow::Error::msg)?,
                (None, _) if t.ends_with(".Fault") => InstanceKey::fault(),
                (None, Some(k)) => k.clone(),
                (None, None) => bail!(
                    "[saga] does not say how {t} finds its instance: add instance_key or instance_keys.{t}"
                ),
            };
            keys.insert(t.clone(), key);
        }
        let not_found = match self.not_found.as_deref() {
            None | Some("ignore") => NotFound::Ignore,
            Some("dead-letter") => NotFound::DeadLetter,
            Some(other) => {
                bail!("[saga] not_found is \"ignore\" or \"dead-letter\", not {other:?}")
            }
        };
        Ok(SagaSpec {
            starts: self.starts.clone(),
            keys,
            not_found,
        })
    }
}

/// `[case.saga]`: the instance that exists before a saga case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GivenInstance {
    instance: String,
    /// Steps committed so far (1 by default).
    version: Option<u64>,
    /// `running` (default), `completed` or `failed`.
    status: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    input: Input,
    #[serde(default)]
    expect: Expect,
    /// How the host behaves towards the plugin in this case.
    #[serde(default)]
    host: HostBehaviour,
    /// The plugin's state before the case: key → JSON value.
    #[serde(default)]
    state: std::collections::BTreeMap<String, Value>,
    /// For a saga: the instance that exists before the case.
    saga: Option<GivenInstance>,
    /// `[[case.http]]`: the answers to the plugin's HTTP requests. Nothing
    /// goes on the network in a test; a request no stub answers fails the
    /// case.
    #[serde(default)]
    http: Vec<HttpStubSpec>,
}

/// `[[case.http]]`: one stubbed HTTP exchange.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpStubSpec {
    /// `GET` by default.
    method: Option<String>,
    /// The whole URL the plugin asks for, query included.
    url: String,
    /// The request's body must contain this text.
    body_contains: Option<String>,
    /// 200 by default.
    status: Option<u16>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    /// A JSON response body, written as TOML (sets `content-type`).
    json: Option<Value>,
    /// A text response body.
    text: Option<String>,
}

impl HttpStubSpec {
    fn stub(&self) -> Result<HttpStub> {
        let status = self.status.unwrap_or(200);
        if !(100..=599).contains(&status) {
            bail!("status {status} is not an HTTP status (100 to 599)");
        }
        let mut headers: Vec<(String, String)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let body = match (&self.json, &self.text) {
            (Some(_), Some(_)) => bail!("{}: give json or text, not both", self.url),
            (Some(json), None) => {
                if !headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                {
                    headers.push(("content-type".into(), "application/json".into()));
                }
                serde_json::to_vec(json)?
            }
            (None, Some(text)) => text.clone().into_bytes(),
            (None, None) => Vec::new(),
        };
        let url: http::Uri = self
            .url
            .parse()
            .with_context(|| format!("{:?} is not a URL", self.url))?;
        if url.scheme().is_none() || url.host().is_none() {
            bail!(
                "{:?} is not a whole URL, like https://api.example.com/charges",
                self.url
            );
        }
        Ok(HttpStub {
            method: self.method.clone().unwrap_or_else(|| "GET".into()),
            // As the host sees a request: a URL without a path ends in `/`.
            url: url.to_string(),
            body_contains: self.body_contains.clone(),
            status,
            headers,
            body,
        })
    }
}

/// `[case.host]`: host behaviour a case simulates.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostBehaviour {
    /// The wall clock reads this UTC time (RFC 3339) and stands still.
    clock: Option<String>,
    /// Environment variables the plugin sees.
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    /// `down`: every outbound connection fails; `up` (default): as granted.
    network: Option<String>,
}

impl HostBehaviour {
    fn simulation(&self) -> Result<Simulation> {
        let clock = match &self.clock {
            None => None,
            Some(text) => {
                let at = humantime::parse_rfc3339_weak(text).with_context(|| {
                    format!("host.clock {text:?} is not a UTC time in RFC 3339 form, like 2026-11-29T12:00:00Z")
                })?;
                Some(
                    at.duration_since(std::time::UNIX_EPOCH)
                        .with_context(|| format!("host.clock {text:?} is before 1970"))?,
                )
            }
        };
        let network_down = match self.network.as_deref() {
            None | Some("up") => false,
            Some("down") => true,
            Some(other) => bail!("host.network is `up` or `down`, not {other:?}"),
        };
        Ok(Simulation {
            clock,
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            network_down,
            http: None,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    #[serde(rename = "type")]
    message_type: String,
    /// The message id; a new UUID by default.
    id: Option<String>,
    /// `command` or `event`; by default what the plugin declares for the type.
    kind: Option<String>,
    /// A JSON payload, written as TOML.
    json: Option<Value>,
    /// A payload given as text.
    text: Option<String>,
    content_type: Option<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    /// The attempt number the handler sees (retries are attempts 2, 3, ...).
    attempt: Option<u32>,
    correlation_id: Option<String>,
    /// Where a reply should go: a command handler that replies only when
    /// asked sees that it was.
    reply_to: Option<String>,
    /// For a saga: the input is a timeout of its instance firing.
    #[serde(default)]
    timeout: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    #[serde(default)]
    published: Vec<Expected>,
    #[serde(default)]
    sent: Vec<Expected>,
    reply: Option<Expected>,
    /// The failure kind: `transient`, `permanent`, `trap`, `timeout`,
    /// `out-of-memory` or `contract-violation`.
    error: Option<String>,
    /// Text the failure's message must contain.
    error_contains: Option<String>,
    /// The failure's code.
    error_code: Option<String>,
    /// The plugin's whole state after the case: key → JSON value. For a
    /// saga, the state of the input's instance.
    state: Option<std::collections::BTreeMap<String, Value>>,
    /// For a saga: `running` or `completed` (the instance after the case),
    /// or `ignored` (no instance, and `not_found = "ignore"`).
    saga: Option<String>,
    /// For a saga: the timeouts it must request, in order, like `published`
    /// (type and payload).
    timeouts: Option<Vec<Expected>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    /// The output's type (not given for a reply).
    #[serde(rename = "type")]
    message_type: Option<String>,
    json: Option<Value>,
    text: Option<String>,
    /// `exact` (default) or `subset`.
    #[serde(rename = "match")]
    mode: Option<String>,
    /// A JSON Schema file (relative to the test file) the payload must match.
    schema: Option<PathBuf>,
}

/// One case's outcome.
struct Outcome {
    file: String,
    name: String,
    took: Duration,
    /// Why it failed, readable; `None` when it passed.
    failure: Option<String>,
}

/// Runs the test files against the component; prints a line per case and a
/// diff per failure; writes JUnit XML if asked. Returns whether all passed.
pub async fn run(
    wasm: &Path,
    files: &[PathBuf],
    junit: Option<&Path>,
    limits: Limits,
    grants: Grants,
    schemas: std::sync::Arc<crate::schemas::Schemas>,
) -> Result<bool> {
    let wasm = wasm.to_owned();
    let plugin = tokio::task::spawn_blocking(move || -> Result<LoadedPlugin> {
        let engine = PluginEngine::new(ComponentCache::default_dir())?;
        let stem = wasm
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = PluginName::try_from(stem.as_str())
            .or_else(|_| PluginName::try_from("plugin"))
            .map_err(anyhow::Error::msg)?;
        Ok(engine.load(
            &wasm,
            Sandbox {
                name,
                limits,
                grants,
            },
        )?)
    })
    .await
    .context("the loading task failed")??;
    let info = plugin.info();
    println!(
        "testing {} {} ({})",
        info.name,
        info.version,
        crate::plugin::short_digest(plugin.digest())
    );

    let mut outcomes = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let mut parsed: TestFile = toml_edit::de::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e.to_string().trim_end()))?;
        let base = file.parent().map(Path::to_owned).unwrap_or_default();
        for case in &mut parsed.cases {
            let e = &mut case.expect;
            for x in e
                .published
                .iter_mut()
                .chain(e.sent.iter_mut())
                .chain(e.reply.iter_mut())
            {
                if let Some(schema) = &mut x.schema {
                    *schema = base.join(&*schema);
                }
            }
        }
        if parsed.cases.is_empty() {
            bail!("{}: no [[case]] in this file", file.display());
        }
        let handled: Vec<String> = info.handles.iter().map(|(t, _)| t.clone()).collect();
        let saga = parsed
            .saga
            .as_ref()
            .map(|s| s.spec(&handled))
            .transpose()
            .with_context(|| file.display().to_string())?
            .map(std::sync::Arc::new);
        let shown = file.display().to_string();
        for case in parsed.cases {
            let plugin = plugin.clone();
            let schemas = schemas.clone();
            let saga = saga.clone();
            let name = case.name.clone();
            let started = Instant::now();
            let failure = tokio::task::spawn_blocking(move || {
                run_case(&plugin, &schemas, saga.as_deref(), &case)
            })
            .await
            .context("a test task failed")?;
            let outcome = Outcome {
                file: shown.clone(),
                name,
                took: started.elapsed(),
                failure,
            };
            match &outcome.failure {
                None => println!("  ok    {} :: {}", outcome.file, outcome.name),
                Some(why) => {
                    println!("  FAIL  {} :: {}", outcome.file, outcome.name);
                    for line in why.lines() {
                        println!("        {line}");
                    }
                }
            }
            outcomes.push(outcome);
        }
    }
    let failed = outcomes.iter().filter(|o| o.failure.is_some()).count();
    println!("{} passed, {failed} failed", outcomes.len() - failed);
    if let Some(path) = junit {
        std::fs::write(path, junit_xml(&plugin, &outcomes))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(failed == 0)
}

/// A case's input message, and a fresh instance that sees the host as
/// the case says; why not, when the case is wrong or the plugin cannot
/// start.
fn start_case(
    plugin: &LoadedPlugin,
    case: &Case,
    http: &Arc<HttpSimulation>,
) -> Result<(Envelope, crate::plugin::Instance), String> {
    let message = input_message(plugin, &case.input).map_err(|e| format!("bad input: {e}"))?;
    let mut simulation = case
        .host
        .simulation()
        .map_err(|e| format!("bad host behaviour: {e:#}"))?;
    simulation.http = Some(http.clone());
    let instance = plugin
        .instantiate_simulated(&simulation)
        .map_err(|e| format!("the plugin cannot start: {e:#}"))?;
    Ok((message, instance))
}

/// Runs one case on a fresh instance; `Some(reason)` when it fails.
fn run_case(
    plugin: &LoadedPlugin,
    schemas: &crate::schemas::Schemas,
    saga: Option<&crate::saga::SagaSpec>,
    case: &Case,
) -> Option<String> {
    let stubs = match case
        .http
        .iter()
        .map(HttpStubSpec::stub)
        .collect::<Result<Vec<_>>>()
    {
        Ok(stubs) => stubs,
        Err(e) => return Some(format!("bad http stub: {e:#}")),
    };
    let http = Arc::new(HttpSimulation::new(stubs));
    let verdict = match saga {
        Some(spec) => run_saga_case(plugin, schemas, spec, case, &http),
        None => run_plain_case(plugin, schemas, case, &http),
    };
    let unmatched = http.take_unmatched();
    if unmatched.is_empty() {
        return verdict;
    }
    let said = format!(
        "the plugin sent HTTP requests no [[case.http]] stub answers: {}",
        unmatched.join(", ")
    );
    Some(match verdict {
        Some(v) => format!("{v}\n{said}"),
        None => said,
    })
}

/// Runs a case of a plugin that is not a saga.
fn run_plain_case(
    plugin: &LoadedPlugin,
    schemas: &crate::schemas::Schemas,
    case: &Case,
    http: &Arc<HttpSimulation>,
) -> Option<String> {
    if case.saga.is_some()
        || case.expect.saga.is_some()
        || case.expect.timeouts.is_some()
        || case.input.timeout
    {
        return Some(
            "the case gives or expects a saga instance, but the file has no [saga] table".into(),
        );
    }
    let (mut message, mut instance) = match start_case(plugin, case, http) {
        Ok(started) => started,
        Err(why) => return Some(why),
    };
    let store = std::sync::Arc::new(crate::state::Memory::default());
    let name = plugin.name().as_str();
    for (key, value) in &case.state {
        store.put(name, key, value.to_string().into_bytes());
    }
    instance.set_state(crate::state::Scope::new(name, store.clone()));
    // Outputs are checked against the pipeline's contracts, as the host does.
    let result = instance
        .handle(&mut message)
        .and_then(|outputs| crate::schemas::check_outputs(schemas, outputs));
    if let Ok(outputs) = &result {
        for o in outputs {
            if let Output::State(changes) = o {
                store.apply(name, changes);
            }
        }
    }
    let outcome = check_result(&case.expect, result);
    let state = case
        .expect
        .state
        .as_ref()
        .and_then(|want| check_state(want, &store.all(name)));
    match (outcome, state) {
        (None, None) => None,
        (Some(a), None) | (None, Some(a)) => Some(a),
        (Some(a), Some(b)) => Some(format!("{a}\n{b}")),
    }
}

/// Runs one case of a saga: the instance is found as a pipeline would
/// find it, and the case's state is that instance's.
fn run_saga_case(
    plugin: &LoadedPlugin,
    schemas: &crate::schemas::Schemas,
    spec: &crate::saga::SagaSpec,
    case: &Case,
    http: &Arc<HttpSimulation>,
) -> Option<String> {
    use crate::dispatch::saga::Prep;
    use crate::saga::{Instance, Status};
    let (mut message, mut instance) = match start_case(plugin, case, http) {
        Ok(started) => started,
        Err(why) => return Some(why),
    };
    let store = std::sync::Arc::new(crate::state::Memory::default());
    let name = plugin.name().as_str();
    if let Some(given) = &case.saga {
        let status = match given.status.as_deref() {
            None | Some("running") => Status::Running,
            Some("completed") => Status::Completed,
            Some("failed") => Status::Failed,
            Some(other) => {
                return Some(format!(
                    "bad saga: status is running, completed or failed, not {other:?}"
                ));
            }
        };
        store.put_instance(
            name,
            &given.instance,
            Instance {
                status,
                version: given.version.unwrap_or(1),
                plugin_version: plugin.info().version.clone(),
                started_at_ms: message.created_at_ms,
                updated_at_ms: message.created_at_ms,
                last_type: String::new(),
            },
        );
        for (key, value) in &case.state {
            store.put(
                name,
                &crate::saga::stored_key(&given.instance, key),
                value.to_string().into_bytes(),
            );
        }
        if case.input.timeout {
            // The input is a pending timeout of the instance, firing.
            message
                .headers
                .push((crate::saga::TIMEOUT_HEADER.to_owned(), message.id.clone()));
            store.put_timeout(
                name,
                &given.instance,
                crate::saga::Timeout {
                    id: message.id.clone(),
                    due_ms: message.created_at_ms,
                    message_type: message.message_type.clone(),
                    command: message.kind == Kind::Command,
                    payload: message.payload.clone(),
                },
            );
        }
    } else if !case.state.is_empty() {
        return Some(
            "bad case: [case.state] of a saga is its instance's, so it needs [case.saga]".into(),
        );
    } else if case.input.timeout {
        // A timeout of an instance that is gone: it no longer fires.
        message
            .headers
            .push((crate::saga::TIMEOUT_HEADER.to_owned(), message.id.clone()));
    }
    instance.set_state(crate::state::Scope::new(name, store.clone()));
    let scope = crate::state::Scope::new(name, store.clone());
    let (result, became, found) =
        match crate::dispatch::saga::prepare(spec, Some(&scope), name, &message) {
            Err(f) => (Err(f), None, None),
            Ok(Prep::NotSaga) => (Ok(Vec::new()), None, None),
            Ok(Prep::Skip(_) | Prep::Drop(_)) => (Ok(Vec::new()), Some("ignored"), None),
            Ok(Prep::Run(call)) => {
                instance.set_saga(Some(call.clone()));
                let result = instance
                    .handle(&mut message)
                    .and_then(|outputs| crate::schemas::check_outputs(schemas, outputs));
                let completed = instance.saga_completed();
                let timeouts = instance.take_timeouts();
                let mut became = None;
                if let Ok(outputs) = &result {
                    let step = crate::dispatch::saga::step_of(
                        &call,
                        &message,
                        outputs,
                        plugin.info().version.clone(),
                        completed,
                        timeouts,
                    );
                    for o in outputs {
                        if let Output::State(changes) = o {
                            store.apply(name, changes);
                        }
                    }
                    became = Some(if completed { "completed" } else { "running" });
                    if let Err(e) = store.apply_step(name, &step) {
                        return Some(format!("{e:#}"));
                    }
                }
                (result, became, Some(call.id))
            }
        };
    let mut why: Vec<String> = check_result(&case.expect, result).into_iter().collect();
    if let Some(want) = &case.expect.timeouts {
        let pending = store.all_timeouts(name);
        // What the case requested: not the timeout that fired.
        let requested: Vec<(Option<&str>, &Vec<u8>)> = pending
            .iter()
            .filter(|(_, t)| !(case.input.timeout && t.id == message.id))
            .map(|(_, t)| (Some(t.message_type.as_str()), &t.payload))
            .collect();
        compare_list("timeout", want, &requested, &mut why);
    }
    if let Some(want) = &case.expect.saga {
        let got = became.unwrap_or("not handled");
        if want != got {
            why.push(format!("saga: expected {want}, got {got}"));
        }
    }
    if let Some(want) = &case.expect.state {
        let id = found.or_else(|| case.saga.as_ref().map(|g| g.instance.clone()));
        let got: std::collections::BTreeMap<String, Vec<u8>> = match &id {
            Some(id) => store
                .all(name)
                .into_iter()
                .filter_map(|(k, v)| crate::saga::instance_key(id, &k).map(|k| (k.to_owned(), v)))
                .collect(),
            None => Default::default(),
        };
        why.extend(check_state(want, &got));
    }
    (!why.is_empty()).then(|| why.join("\n"))
}

/// Compares the state a case left with the state it expects, whole.
fn check_state(
    want: &std::collections::BTreeMap<String, Value>,
    got: &std::collections::BTreeMap<String, Vec<u8>>,
) -> Option<String> {
    let mut why = Vec::new();
    for (key, value) in want {
        match got.get(key) {
            None => why.push(format!(
                "state {key:?}: expected {value}, but it is not set"
            )),
            Some(bytes) => match serde_json::from_slice::<Value>(bytes) {
                Ok(actual) if &actual == value => {}
                _ => why.push(format!(
                    "state {key:?}: expected {value}, got {}",
                    show_state(bytes)
                )),
            },
        }
    }
    for (key, bytes) in got {
        if !want.contains_key(key) {
            why.push(format!(
                "state {key:?}: not expected, but set to {}",
                show_state(bytes)
            ));
        }
    }
    (!why.is_empty()).then(|| why.join("\n"))
}

/// Compares a call's result with what a case expects of it.
fn check_result(
    expect: &Expect,
    result: Result<Vec<Output>, crate::plugin::Failure>,
) -> Option<String> {
    match (result, &expect.error) {
        (Ok(outputs), None) => check_outputs(expect, &outputs),
        (Ok(outputs), Some(kind)) => Some(format!(
            "expected a {kind} failure; the handler succeeded with {}",
            describe_outputs(&outputs)
        )),
        (Err(f), None) => Some(format!(
            "expected success; the handler failed: {} {}{}",
            f.kind,
            f.message,
            f.code.map(|c| format!(" [{c}]")).unwrap_or_default()
        )),
        (Err(f), Some(kind)) => {
            let mut why = Vec::new();
            if f.kind.as_str() != kind {
                why.push(format!(
                    "expected a {kind} failure, got {}: {}",
                    f.kind, f.message
                ));
            }
            if let Some(text) = &expect.error_contains
                && !f.message.contains(text.as_str())
            {
                why.push(format!(
                    "the failure's message does not contain {text:?}: {:?}",
                    f.message
                ));
            }
            if let Some(code) = &expect.error_code
                && f.code.as_deref() != Some(code.as_str())
            {
                why.push(format!(
                    "expected error code {code:?}, got {:?}",
                    f.code.unwrap_or_default()
                ));
            }
            (!why.is_empty()).then(|| why.join("\n"))
        }
    }
}

fn input_message(plugin: &LoadedPlugin, input: &Input) -> Result<Envelope> {
    let kind = match input.kind.as_deref() {
        Some(k) => {
            Kind::parse(k).with_context(|| format!("kind `{k}` is neither command nor event"))?
        }
        None => plugin
            .info()
            .handles
            .iter()
            .find(|(t, _)| *t == input.message_type)
            .map(|(_, k)| *k)
            .with_context(|| {
                format!(
                    "the plugin does not handle `{}`; give the input a kind to send it anyway",
                    input.message_type
                )
            })?,
    };
    let (payload, content_type) = match (&input.json, &input.text) {
        (Some(_), Some(_)) => bail!("give the input `json` or `text`, not both"),
        (Some(v), None) => (
            serde_json::to_vec(v).context("cannot encode the JSON payload")?,
            "application/json",
        ),
        (None, Some(t)) => (t.clone().into_bytes(), "text/plain"),
        (None, None) => (Vec::new(), "application/octet-stream"),
    };
    let content_type = input.content_type.as_deref().unwrap_or(content_type);
    let mut m = Envelope::new(input.message_type.clone(), kind, payload, content_type);
    m.headers = input
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(a) = input.attempt {
        m.attempt = a.max(1);
    }
    if let Some(id) = &input.id {
        m.id.clone_from(id);
    }
    m.correlation_id = input.correlation_id.clone();
    m.reply_to = input.reply_to.clone();
    Ok(m)
}

fn describe_outputs(outputs: &[Output]) -> String {
    if outputs.is_empty() {
        return "no outputs".into();
    }
    outputs
        .iter()
        .map(|o| match o {
            Output::Event(o) => format!("event {}", o.message_type),
            Output::Command(o) => format!("command {}", o.message_type),
            Output::Reply(_) => "a reply".into(),
            Output::State(c) => format!("{} state writes", c.writes.len()),
            Output::Saga(_) => "a saga step".into(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_outputs(expect: &Expect, outputs: &[Output]) -> Option<String> {
    let mut published = Vec::new();
    let mut sent = Vec::new();
    let mut reply = None;
    for o in outputs {
        match o {
            Output::Event(e) => published.push((Some(e.message_type.as_str()), &e.payload)),
            Output::Command(c) => sent.push((Some(c.message_type.as_str()), &c.payload)),
            Output::Reply(r) => reply = Some((None, &r.payload)),
            // Compared with `expect.state` and `expect.saga` after the call.
            Output::State(_) | Output::Saga(_) => {}
        }
    }
    let mut why = Vec::new();
    compare_list("published event", &expect.published, &published, &mut why);
    compare_list("sent command", &expect.sent, &sent, &mut why);
    match (&expect.reply, reply) {
        (None, None) => {}
        (Some(_), None) => why.push("expected a reply; there was none".into()),
        (None, Some((_, p))) => why.push(format!("unexpected reply: {}", show_payload(p))),
        (Some(e), Some(actual)) => compare_one("reply", e, actual, &mut why),
    }
    (!why.is_empty()).then(|| why.join("\n"))
}

fn compare_list(
    what: &str,
    expected: &[Expected],
    actual: &[(Option<&str>, &Vec<u8>)],
    why: &mut Vec<String>,
) {
    if expected.len() != actual.len() {
        why.push(format!(
            "expected {} {what}{}, got {}: [{}]",
            expected.len(),
            if expected.len() == 1 { "" } else { "s" },
            actual.len(),
            actual
                .iter()
                .map(|(t, _)| t.unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for (i, (e, a)) in expected.iter().zip(actual).enumerate() {
        compare_one(&format!("{what} #{}", i + 1), e, *a, why);
    }
}

fn compare_one(
    what: &str,
    expected: &Expected,
    actual: (Option<&str>, &Vec<u8>),
    why: &mut Vec<String>,
) {
    let (actual_type, payload) = actual;
    if let (Some(want), Some(got)) = (&expected.message_type, actual_type)
        && want != got
    {
        why.push(format!("{what}: expected type {want}, got {got}"));
        return;
    }
    let subset = match expected.mode.as_deref() {
        None | Some("exact") => false,
        Some("subset") => true,
        Some(other) => {
            why.push(format!(
                "{what}: unknown match `{other}` (expected \"exact\" or \"subset\")"
            ));
            return;
        }
    };
    if let Some(path) = &expected.schema {
        match crate::schemas::compile(path) {
            Ok(v) => {
                let complaints = crate::schemas::violations(&v, payload);
                if !complaints.is_empty() {
                    let mut text = format!("{what}: payload does not match {}", path.display());
                    for c in complaints {
                        let _ = write!(text, "\n  {c}");
                    }
                    why.push(text);
                }
            }
            Err(e) => why.push(format!("{what}: {e:#}")),
        }
    }
    if let Some(text) = &expected.text {
        if payload.as_slice() != text.as_bytes() {
            why.push(format!(
                "{what}: payload differs\n  expected: {text:?}\n  actual:   {}",
                show_payload(payload)
            ));
        }
        return;
    }
    let Some(want) = &expected.json else {
        return;
    };
    let got: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(_) => {
            why.push(format!(
                "{what}: expected JSON, got {}",
                show_payload(payload)
            ));
            return;
        }
    };
    let mut diffs = Vec::new();
    crate::json_diff::json_diff("$", want, &got, subset, &mut diffs);
    if !diffs.is_empty() {
        let mut text = format!("{what}: payload differs");
        for d in diffs.iter().take(20) {
            let _ = write!(text, "\n  {d}");
        }
        if diffs.len() > 20 {
            let _ = write!(text, "\n  ... and {} more", diffs.len() - 20);
        }
        why.push(text);
    }
}

/// A state value: its JSON when it is JSON, like the case writes it.
fn show_state(bytes: &[u8]) -> String {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => crate::text::clip(&v.to_string(), 400),
        Err(_) => show_payload(bytes),
    }
}

fn show_payload(p: &[u8]) -> String {
    match std::str::from_utf8(p) {
        Ok(s) => format!("{:?}", crate::text::clip(s, 400)),
        Err(_) => format!("{} bytes of binary", p.len()),
    }
}

fn xml(s: &str) -> String {
    s.chars()
        .filter(|c| matches!(c, '\t' | '\n' | '\r') || !c.is_control())
        .fold(String::new(), |mut out, c| {
            match c {
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '"' => out.push_str("&quot;"),
                '\'' => out.push_str("&apos;"),
                c => out.push(c),
            }
            out
        })
}

/// JUnit XML: one `<testsuite>` per test file.
fn junit_xml(plugin: &LoadedPlugin, outcomes: &[Outcome]) -> String {
    let mut files: Vec<&str> = outcomes.iter().map(|o| o.file.as_str()).collect();
    files.dedup();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let total = outcomes.len();
    let failed = outcomes.iter().filter(|o| o.failure.is_some()).count();
    let _ = writeln!(
        out,
        "<testsuites name=\"{}\" tests=\"{total}\" failures=\"{failed}\">",
        xml(&format!("{} {}", plugin.info().name, plugin.info().version))
    );
    for file in files {
        let cases: Vec<&Outcome> = outcomes.iter().filter(|o| o.file == file).collect();
        let time: f64 = cases.iter().map(|o| o.took.as_secs_f64()).sum();
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"0\" time=\"{time:.6}\">",
            xml(file),
            cases.len(),
            cases.iter().filter(|o| o.failure.is_some()).count()
        );
        for case in cases {
            let _ = write!(
                out,
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.6}\"",
                xml(file),
                xml(&case.name),
                case.took.as_secs_f64()
            );
            match &case.failure {
                None => out.push_str("/>\n"),
                Some(why) => {
                    let first = why.lines().next().unwrap_or_default();
                    let _ = writeln!(
                        out,
                        ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                        xml(first),
                        xml(why)
                    );
                }
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn diff(want: Value, got: Value, subset: bool) -> Vec<String> {
        let mut out = Vec::new();
        crate::json_diff::json_diff("$", &want, &got, subset, &mut out);
        out
    }

    #[test]
    fn exact_and_subset_matches() {
        let got = json!({"order_id": "A-1", "total_cents": 1200, "items": [{"sku": "book"}]});
        assert!(diff(got.clone(), got.clone(), false).is_empty());
        assert!(diff(json!({"order_id": "A-1"}), got.clone(), true).is_empty());
        assert_eq!(
            diff(json!({"order_id": "A-1"}), got.clone(), false),
            vec![
                "$.items: not expected, got [{\"sku\":\"book\"}]",
                "$.total_cents: not expected, got 1200"
            ]
        );
        assert_eq!(
            diff(json!({"items": [{"sku": "pen"}]}), got.clone(), true),
            vec!["$.items[0].sku: expected \"pen\", got \"book\""]
        );
        assert_eq!(
            diff(json!({"missing": 1}), got, true),
            vec!["$.missing: expected 1, missing"]
        );
        assert!(diff(json!(1), json!(1.0), false).is_empty());
    }

    #[test]
    fn xml_is_escaped() {
        assert_eq!(xml("a<b>&\"c'\u{1}"), "a&lt;b&gt;&amp;&quot;c&apos;");
    }
}
