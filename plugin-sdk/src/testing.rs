//! Run a handler natively, without a host or a broker, and look at what it did.
//!
//! [`TestHost`] calls [`Plugin::handle`] directly and applies the same
//! contract checks the Switchyard host makes: a plugin may only publish the
//! event types and send the command types it declares, only replies while
//! handling a command (at most once), and a failed attempt publishes nothing.
//! The host's resource limits (memory, CPU deadline, output counts) are not
//! simulated: they depend on the pipeline.
//!
//! The plugin's state lives in the `TestHost` across messages, as it would
//! in the host: set it before with [`TestHost::with_state`], read it after
//! with [`TestHost::state`]. A failed message leaves it as it was.
//!
//! ```
//! # use switchyard_sdk::{Context, HandlerError, Message, Plugin, PluginInfo};
//! # struct Echo;
//! # impl Plugin for Echo {
//! #     fn describe() -> PluginInfo { PluginInfo::new("echo", "1.0.0").handles_command("Ping") }
//! #     fn handle(ctx: &mut Context<'_>, m: Message) -> Result<(), HandlerError> {
//! #         ctx.reply(&m.json::<serde_json::Value>()?)
//! #     }
//! # }
//! use switchyard_sdk::testing::TestHost;
//!
//! let outcome = TestHost::<Echo>::new().handle(Message::command("Ping").with_json(&1));
//! outcome.assert_ok();
//! assert_eq!(outcome.replies[0].json_payload::<i32>().unwrap(), 1);
//!
//! let outcome = TestHost::<Echo>::new().handle(Message::command("Ping").with_payload("{", "application/json"));
//! assert!(outcome.handler_error().is_some_and(|e| !e.is_transient()));
//! ```

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context::Outbox;
use crate::{
    Context, HandlerError, Kind, LogLevel, Message, Outgoing, Plugin, PluginInfo, Response,
};

/// Runs one plugin's handler natively.
pub struct TestHost<P> {
    info: PluginInfo,
    plugin: PhantomData<P>,
    /// The plugin's committed state (a saga's: its instance's).
    state: RefCell<BTreeMap<String, Vec<u8>>>,
    /// The saga instance every message belongs to, when run as a saga.
    saga: RefCell<Option<(crate::SagaInstance, bool)>>,
    /// Answers to HTTP requests: method, URL, response.
    http: Vec<(String, String, crate::http::Response)>,
    /// Every HTTP request fails to connect.
    network_down: bool,
}

impl<P: Plugin> Default for TestHost<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Plugin> TestHost<P> {
    /// Calls the plugin's `describe` once, as the host does when it loads it.
    pub fn new() -> Self {
        TestHost {
            info: P::describe(),
            plugin: PhantomData,
            state: RefCell::default(),
            saga: RefCell::default(),
            http: Vec::new(),
            network_down: false,
        }
    }

    /// Answers `method url` with `response` whenever the handler asks. A
    /// request no stub answers fails with [`HttpErrorKind::Denied`], as a
    /// request outside the plugin's grant does in a host.
    ///
    /// [`HttpErrorKind::Denied`]: crate::http::HttpErrorKind::Denied
    pub fn with_http(mut self, method: &str, url: &str, response: crate::http::Response) -> Self {
        self.http
            .push((method.to_ascii_uppercase(), url.to_owned(), response));
        self
    }

    /// Every HTTP request fails to connect ([`HttpErrorKind::Connect`]).
    ///
    /// [`HttpErrorKind::Connect`]: crate::http::HttpErrorKind::Connect
    pub fn with_network_down(mut self) -> Self {
        self.network_down = true;
        self
    }

    /// Runs the plugin as a saga whose messages all belong to instance
    /// `id`, which has `version` steps already (0: the next message starts
    /// it). The state is that instance's.
    pub fn with_saga(self, id: &str, version: u64) -> Self {
        *self.saga.borrow_mut() = Some((
            crate::SagaInstance {
                id: id.to_owned(),
                version,
                started_at_ms: 0,
            },
            false,
        ));
        self
    }

    /// Whether the saga instance is complete (a handled message called
    /// [`Context::complete_saga`]).
    pub fn saga_completed(&self) -> bool {
        self.saga.borrow().as_ref().is_some_and(|(_, done)| *done)
    }

    /// Sets a state key (as JSON) before the next message.
    ///
    /// Panics if `value` cannot be serialized: that is the test's mistake.
    #[track_caller]
    pub fn with_state<T: Serialize + ?Sized>(self, key: &str, value: &T) -> Self {
        let bytes = match serde_json::to_vec(value) {
            Ok(b) => b,
            Err(e) => panic!("cannot serialize state {key:?}: {e}"),
        };
        self.state.borrow_mut().insert(key.to_owned(), bytes);
        self
    }

    /// A state key, parsed from JSON; `None` if it is not set.
    ///
    /// Panics if the value is not the expected JSON.
    #[track_caller]
    pub fn state<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let state = self.state.borrow();
        let bytes = state.get(key)?;
        match serde_json::from_slice(bytes) {
            Ok(v) => Some(v),
            Err(e) => panic!("state {key:?} is not the expected JSON: {e}"),
        }
    }

    /// Every state key and its raw value.
    pub fn state_bytes(&self) -> BTreeMap<String, Vec<u8>> {
        self.state.borrow().clone()
    }

    /// What the plugin declared.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// Feeds one message to the handler.
    pub fn handle(&self, message: Message) -> Outcome {
        // A copy: the handler may be given the host's state again (nested
        // tests), and this one is replaced only on success.
        let committed = self.state.borrow().clone();
        let mut recorder = Recorder {
            info: &self.info,
            kind: message.kind,
            message_type: message.message_type.clone(),
            outcome: Outcome::default(),
            violation: None,
            state: &committed,
            writes: BTreeMap::new(),
            saga: self.saga.borrow().as_ref().map(|(i, _)| i.clone()),
            completed: false,
            http: &self.http,
            network_down: self.network_down,
        };
        let declared = self.info.handled_kind(&message.message_type);
        let result = if declared != Some(message.kind) {
            Err(Failure::ContractViolation(format!(
                "plugin {} does not declare that it handles {} {}",
                self.info.name, message.kind, message.message_type
            )))
        } else {
            let mut ctx = Context::new(&mut recorder);
            let result = P::handle(&mut ctx, message);
            // A broken contract is reported whatever the handler returned.
            match (recorder.violation.take(), result) {
                (Some(v), _) => Err(Failure::ContractViolation(v)),
                (None, Ok(())) => Ok(()),
                (None, Err(e)) => Err(Failure::Handler(e)),
            }
        };
        let writes = std::mem::take(&mut recorder.writes);
        let completed = recorder.completed;
        let mut outcome = recorder.outcome;
        if result.is_ok()
            && let Some((instance, done)) = self.saga.borrow_mut().as_mut()
        {
            instance.version += 1;
            *done |= completed;
            outcome.saga_completed = completed;
        }
        if result.is_ok() {
            let mut state = self.state.borrow_mut();
            for (k, v) in &writes {
                match v {
                    Some(v) => state.insert(k.clone(), v.clone()),
                    None => state.remove(k),
                };
            }
            outcome.state_writes = writes;
        }
        if result.is_err() {
            // Outbox semantics: a failed attempt publishes nothing.
            outcome.published.clear();
            outcome.sent.clear();
            outcome.replies.clear();
            outcome.timeouts.clear();
        }
        outcome.result = result;
        outcome
    }
}

/// Why a handled message failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The handler returned an error.
    Handler(HandlerError),
    /// The handler broke the contract (an undeclared output, a reply to an
    /// event, ...). The host fails such a message as `contract-violation`,
    /// which is never retried.
    ContractViolation(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Handler(e) => write!(f, "handler error: {e}"),
            Failure::ContractViolation(v) => write!(f, "contract violation: {v}"),
        }
    }
}

/// What happened when a message was handled.
#[derive(Debug)]
pub struct Outcome {
    /// `Ok` if the host would acknowledge the message.
    pub result: Result<(), Failure>,
    /// Events that would be dispatched (empty on failure).
    pub published: Vec<Outgoing>,
    /// Commands that would be dispatched (empty on failure).
    pub sent: Vec<Outgoing>,
    /// Replies that would be delivered (empty on failure).
    pub replies: Vec<Response>,
    /// Log lines, kept even on failure.
    pub logs: Vec<(LogLevel, String)>,
    /// Attributes added to the message's trace span.
    pub span_attributes: Vec<(String, String)>,
    /// Events recorded on the message's trace span: name and attributes.
    pub span_events: Vec<(String, Vec<(String, String)>)>,
    /// State keys written (`None`: deleted), kept only on success.
    pub state_writes: BTreeMap<String, Option<Vec<u8>>>,
    /// The handler completed its saga instance (only on success).
    pub saga_completed: bool,
    /// Timeouts the saga requested, with how long after (empty on failure).
    pub timeouts: Vec<(std::time::Duration, Outgoing)>,
    /// HTTP requests the handler sent, answered or not.
    pub http_requests: Vec<crate::http::Request>,
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            result: Ok(()),
            published: Vec::new(),
            sent: Vec::new(),
            replies: Vec::new(),
            logs: Vec::new(),
            span_attributes: Vec::new(),
            span_events: Vec::new(),
            state_writes: BTreeMap::new(),
            saga_completed: false,
            timeouts: Vec::new(),
            http_requests: Vec::new(),
        }
    }
}

impl Outcome {
    /// Panics with the failure if the message was not handled successfully.
    #[track_caller]
    pub fn assert_ok(&self) {
        if let Err(f) = &self.result {
            panic!("expected the message to be handled, but it failed with {f}");
        }
    }

    /// The handler's own error, if it returned one.
    pub fn handler_error(&self) -> Option<&HandlerError> {
        match &self.result {
            Err(Failure::Handler(e)) => Some(e),
            _ => None,
        }
    }

    /// The contract violation, if the handler committed one.
    pub fn contract_violation(&self) -> Option<&str> {
        match &self.result {
            Err(Failure::ContractViolation(v)) => Some(v),
            _ => None,
        }
    }

    /// Payloads of the published events of one type, parsed as JSON.
    ///
    /// Panics if one does not parse: in a test that is the failure to report.
    #[track_caller]
    pub fn published_json<T: DeserializeOwned>(&self, event_type: &str) -> Vec<T> {
        parse_all(&self.published, event_type)
    }

    /// Payloads of the sent commands of one type, parsed as JSON.
    #[track_caller]
    pub fn sent_json<T: DeserializeOwned>(&self, command_type: &str) -> Vec<T> {
        parse_all(&self.sent, command_type)
    }
}

#[track_caller]
fn parse_all<T: DeserializeOwned>(messages: &[Outgoing], message_type: &str) -> Vec<T> {
    messages
        .iter()
        .filter(|m| m.message_type == message_type)
        .map(|m| match m.json_payload() {
            Ok(v) => v,
            Err(e) => panic!("{message_type} payload is not the expected JSON: {e}"),
        })
        .collect()
}

struct Recorder<'a> {
    info: &'a PluginInfo,
    kind: Kind,
    message_type: String,
    outcome: Outcome,
    /// The first contract violation; later ones are usually consequences.
    violation: Option<String>,
    /// The state before this message.
    state: &'a BTreeMap<String, Vec<u8>>,
    /// What this message wrote.
    writes: BTreeMap<String, Option<Vec<u8>>>,
    /// The saga instance of the message, when run as a saga.
    saga: Option<crate::SagaInstance>,
    /// The handler completed its saga instance.
    completed: bool,
    http: &'a [(String, String, crate::http::Response)],
    network_down: bool,
}

impl Recorder<'_> {
    fn violate(&mut self, text: String) {
        if self.violation.is_none() {
            self.violation = Some(text);
        }
    }

    /// Whether the host would take `key`: non-empty, at most 1,024 bytes.
    fn key_ok(&mut self, key: &str) -> bool {
        if key.is_empty() || key.len() > 1024 {
            self.violate(format!(
                "plugin {} used a state key of {} bytes (1 to 1,024)",
                self.info.name,
                key.len()
            ));
            return false;
        }
        true
    }
}

impl Outbox for Recorder<'_> {
    fn publish(&mut self, event: Outgoing) {
        let t = &event.message_type;
        if self.info.sends.contains(t) {
            self.violate(format!(
                "plugin {} published {t}, which it declares as a command; use send",
                self.info.name
            ));
        } else if !self.info.publishes.contains(t) {
            self.violate(format!(
                "plugin {} published {t}, which its describe() does not list in publishes",
                self.info.name
            ));
        }
        self.outcome.published.push(event);
    }

    fn send(&mut self, command: Outgoing) {
        let t = &command.message_type;
        if self.info.publishes.contains(t) {
            self.violate(format!(
                "plugin {} sent {t}, which it declares as an event; use publish",
                self.info.name
            ));
        } else if !self.info.sends.contains(t) {
            self.violate(format!(
                "plugin {} sent {t}, which its describe() does not list in sends",
                self.info.name
            ));
        }
        self.outcome.sent.push(command);
    }

    fn reply(&mut self, answer: Response) {
        if self.kind == Kind::Event {
            self.violate(format!(
                "plugin {} replied while handling event {}; only commands get replies",
                self.info.name, self.message_type
            ));
        } else if !self.outcome.replies.is_empty() {
            self.violate(format!(
                "plugin {} replied twice to command {}",
                self.info.name, self.message_type
            ));
        }
        self.outcome.replies.push(answer);
    }

    fn log(&mut self, level: LogLevel, text: &str) {
        self.outcome.logs.push((level, text.to_owned()));
    }

    fn span_attribute(&mut self, key: &str, value: &str) {
        self.outcome
            .span_attributes
            .push((key.to_owned(), value.to_owned()));
    }

    fn span_event(&mut self, name: &str, attributes: &[(String, String)]) {
        self.outcome
            .span_events
            .push((name.to_owned(), attributes.to_vec()));
    }

    fn state_get(&mut self, key: &str) -> Option<Vec<u8>> {
        if !self.key_ok(key) {
            return None;
        }
        match self.writes.get(key) {
            Some(v) => v.clone(),
            None => self.state.get(key).cloned(),
        }
    }

    fn state_set(&mut self, key: &str, value: Vec<u8>) {
        if self.key_ok(key) {
            self.writes.insert(key.to_owned(), Some(value));
        }
    }

    fn state_delete(&mut self, key: &str) {
        if self.key_ok(key) {
            self.writes.insert(key.to_owned(), None);
        }
    }

    fn state_keys(&mut self, prefix: &str, after: Option<&str>, limit: u32) -> Vec<String> {
        let mut keys: std::collections::BTreeSet<&String> = self.state.keys().collect();
        for (k, v) in &self.writes {
            if v.is_some() {
                keys.insert(k);
            } else {
                keys.remove(k);
            }
        }
        keys.into_iter()
            .filter(|k| k.starts_with(prefix) && after.is_none_or(|a| k.as_str() > a))
            .take((limit as usize).min(1000))
            .cloned()
            .collect()
    }

    fn saga_current(&mut self) -> Option<crate::SagaInstance> {
        self.saga.clone()
    }

    fn saga_complete(&mut self) {
        if self.saga.is_some() {
            self.completed = true;
        } else {
            self.violate(format!(
                "plugin {} completed a saga instance, but it is not run as a saga (TestHost::with_saga)",
                self.info.name
            ));
        }
    }

    fn saga_request_timeout(&mut self, after_ms: u64, message_type: &str, payload: Vec<u8>) {
        if self.saga.is_none() {
            self.violate(format!(
                "plugin {} requested a timeout, but it is not run as a saga (TestHost::with_saga)",
                self.info.name
            ));
            return;
        }
        if self.info.handled_kind(message_type).is_none() {
            self.violate(format!(
                "saga {} requested a timeout of type {message_type}, which it does not handle",
                self.info.name
            ));
            return;
        }
        self.outcome.timeouts.push((
            std::time::Duration::from_millis(after_ms),
            Outgoing {
                message_type: message_type.to_owned(),
                payload,
                content_type: crate::JSON.to_owned(),
                headers: Vec::new(),
                partition_key: None,
            },
        ));
    }

    fn http(
        &mut self,
        request: &crate::http::Request,
    ) -> Result<crate::http::Response, crate::http::HttpError> {
        use crate::http::{HttpError, HttpErrorKind};
        self.outcome.http_requests.push(request.clone());
        request.parts()?;
        if self.network_down {
            return Err(HttpError::new(
                HttpErrorKind::Connect,
                format!(
                    "{} {}: the network is down (TestHost)",
                    request.method, request.url
                ),
            ));
        }
        self.http
            .iter()
            .find(|(m, u, _)| m.eq_ignore_ascii_case(&request.method) && *u == request.url)
            .map(|(_, _, r)| r.clone())
            .ok_or_else(|| {
                HttpError::new(
                    HttpErrorKind::Denied,
                    format!(
                        "{} {}: no TestHost::with_http stub answers it",
                        request.method, request.url
                    ),
                )
            })
    }

    fn state_increment(&mut self, key: &str, delta: i64) -> i64 {
        let current = match self.state_get(key) {
            None => Some(0),
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok()),
        };
        let Some(next) = current.and_then(|c| c.checked_add(delta)) else {
            self.violate(format!(
                "plugin {} incremented state key {key}, whose value is not an integer or would overflow",
                self.info.name
            ));
            return 0;
        };
        self.state_set(key, next.to_string().into_bytes());
        next
    }
}
