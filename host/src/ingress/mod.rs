//! The ingress: HTTP requests in, commands and events out (`[ingress]`).
//!
//! | method and path | what |
//! |---|---|
//! | `POST /commands/{Type}` | sends the command to its handler; waits for the reply (200) up to `wait`, else 202 with the message id |
//! | `POST /events/{Type}` | publishes the event; 202 with the message id |
//!
//! A 202 means the message is durable: committed to the embedded store or
//! confirmed by the broker. The body is the payload (plain JSON, or any
//! content type), a CloudEvent in binary mode (`ce-*` headers) or in
//! structured mode (`application/cloudevents+json`). The message id is
//! the CloudEvent's `id`, or an `Idempotency-Key`, or a new one. Every
//! field has the limits of a message arriving from a broker
//! ([`crate::limits`]); a payload that breaks its type's `[schemas]`
//! contract is refused with the schema's complaint, before anything is
//! sent. An incoming `traceparent` continues its trace. A message whose id
//! the client named is sent once however often the request is retried
//! within `dedupe_window` ([`accepted`]).

mod accepted;
mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry::KeyValue;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::config::{IngressConfig, MessageType};
use crate::console::Guesses;
use crate::envelope::{Envelope, Kind, Reply};
use crate::supervisor::Supervisor;
use crate::transport::ReplyInbox;
use accepted::{Accepted, Claim};

/// Connections served at once.
const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send its headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request's body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the host may take to make a message durable before the
/// request is answered 503.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The bearer tokens an ingress admits, read from the environment.
#[derive(Clone, Default)]
pub struct Tokens {
    /// Good for every type (`token_env`).
    pub all: Option<String>,
    /// Good for one type only (`[ingress.tokens]`).
    pub by_type: HashMap<String, String>,
}

/// Never the tokens themselves.
impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("all", &self.all.is_some())
            .field("by_type", &self.by_type.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Tokens {
    /// Whether requests need a token at all.
    pub fn required(&self) -> bool {
        self.all.is_some() || !self.by_type.is_empty()
    }

    /// The tokens that admit a request for `message_type`.
    fn admitting(&self, message_type: &str) -> Vec<&str> {
        self.all
            .iter()
            .chain(self.by_type.get(message_type))
            .map(String::as_str)
            .collect()
    }
}

/// A bound ingress listener, ready to serve once the routes run.
pub struct Ingress {
    listener: tokio::net::TcpListener,
    config: IngressConfig,
    tokens: Tokens,
    tls: Option<tokio_rustls::TlsAcceptor>,
    accepted: Accepted,
    inbox: Box<dyn ReplyInbox>,
}

struct Shared {
    control: Arc<Supervisor>,
    config: IngressConfig,
    tokens: Tokens,
    guesses: Arc<Guesses>,
    /// Where replies to this ingress's commands go.
    address: String,
    /// Requests waiting for the reply to their command, by command id.
    waiters: Mutex<HashMap<String, oneshot::Sender<Reply>>>,
    /// The ids clients named that were made durable.
    accepted: Accepted,
    /// Where requests hand their message to be made durable
    /// ([`enqueue_batches`]).
    enqueue: mpsc::Sender<Pending>,
}

/// A message waiting to be made durable, and the request waiting for the
/// outcome.
type Pending = (Envelope, oneshot::Sender<Result<(), String>>);

/// The most messages one enqueue takes.
const MAX_BATCH: usize = 256;

impl Ingress {
    /// Binds the listener, reads the TLS certificate and key, opens the
    /// file of accepted ids and the reply inbox: everything that can fail,
    /// before any route starts. `tokens` are the values of the token
    /// variables.
    pub async fn bind(
        pipeline: &crate::config::Pipeline,
        config: IngressConfig,
        tokens: Tokens,
        transport: &dyn crate::transport::Transport,
    ) -> Result<Self> {
        let tls = match &config.tls {
            Some(files) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                tls::server_config(files)?,
            ))),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {} for [ingress]", config.listen))?;
        let accepted = Accepted::open_for(pipeline, config.dedupe_window).await?;
        let inbox = transport
            .reply_inbox()
            .await
            .context("cannot open the ingress's reply inbox")?;
        Ok(Ingress {
            listener,
            config,
            tokens,
            tls,
            accepted,
            inbox,
        })
    }

    /// Whether the ingress speaks HTTPS.
    pub fn https(&self) -> bool {
        self.tls.is_some()
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves the running host `control` until `shutdown` completes;
    /// requests in progress get a moment to finish.
    pub async fn serve(
        self,
        control: Arc<Supervisor>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let Ingress {
            listener,
            config,
            tokens,
            tls,
            accepted,
            inbox,
        } = self;
        let (enqueue, pending) = mpsc::channel(MAX_CONNECTIONS);
        let batches = tokio::spawn(enqueue_batches(control.clone(), pending));
        let shared = Arc::new(Shared {
            enqueue,
            control,
            config,
            tokens,
            guesses: Guesses::new(),
            address: inbox.address().to_owned(),
            waiters: Mutex::new(HashMap::new()),
            accepted,
        });
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let replies = tokio::spawn(deliver_replies(inbox, shared.clone(), stopped));
        let pruner = tokio::spawn(prune(shared.clone()));
        let app = Router::new()
            .route("/commands/{message_type}", post(command))
            .route("/events/{message_type}", post(event))
            .fallback(|| async {
                error(
                    StatusCode::NOT_FOUND,
                    "not found: POST /commands/{Type} or /events/{Type}",
                )
            })
            .with_state(shared);
        let serving = crate::admin::Serving {
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
            connection_timeout: BODY_TIMEOUT + ACCEPT_TIMEOUT + DEFAULT_MAX_WAIT_CAP,
            keep_alive: true,
            tls,
        };
        crate::admin::serve_http(listener, app, serving, shutdown).await;
        let _ = stop.send(true);
        let _ = replies.await;
        pruner.abort();
        // Not aborted: a batch being made durable is finished, and its
        // requests answered. The task ends once the last request (the
        // last holder of the sender) is gone.
        let _ = tokio::time::timeout(ACCEPT_TIMEOUT, batches).await;
        Ok(())
    }
}

/// Makes the requests' messages durable, many at a time: whatever arrives
/// while one enqueue runs goes into the next (one transaction on the
/// embedded store, the broker's confirms awaited together), so concurrent
/// requests share the cost of a commit. Each request is answered with its
/// batch's outcome.
///
/// A batch the transport refuses is sent again one message at a time, so
/// that one message's refusal (a record too large for the broker, say)
/// is its request's answer alone. On a broker, messages of the refused
/// batch may have been published before the refusal: sent again, they
/// are duplicates (at least once, never lost).
async fn enqueue_batches(control: Arc<Supervisor>, mut pending: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while pending.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // A request that gave up (timed out, hung up) sends nothing more.
        batch.retain(|(_, waiter)| !waiter.is_closed());
        if batch.is_empty() {
            continue;
        }
        let transport = control.transport();
        let enqueue = |messages: Vec<Envelope>| async {
            transport
                .enqueue(messages)
                .await
                .map(drop)
                .map_err(|e| format!("{e:#}"))
        };
        // One message: moved in, its outcome is its request's.
        if batch.len() == 1
            && let Some((m, w)) = batch.pop()
        {
            let _ = w.send(enqueue(vec![m]).await);
            continue;
        }
        // Several: copies go into the batch, so that the originals can be
        // sent one at a time if it is refused.
        let copies = batch.iter().map(|(e, _)| e.clone()).collect();
        match enqueue(copies).await {
            Ok(()) => {
                for (_, w) in batch.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "Ingress: a batch was refused; sending its messages one at a time");
                for (m, w) in batch.drain(..) {
                    let _ = w.send(enqueue(vec![m]).await);
                }
            }
        }
    }
}

/// The longest a connection may last, past its body and acceptance.
const DEFAULT_MAX_WAIT_CAP: Duration = Duration::from_secs(15 * 60);

/// Forgets the named ids past the window, every 10 minutes.
async fn prune(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(Duration::from_secs(600));
    loop {
        every.tick().await;
        match shared.accepted.prune().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(ids = n, "Ingress: forgot ids past the dedupe window"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "Ingress: cannot forget old ids"),
        }
    }
}

/// Hands each reply that arrives to the request waiting for it.
async fn deliver_replies(
    mut inbox: Box<dyn ReplyInbox>,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        let next = tokio::select! {
            _ = stopped.changed() => return,
            next = inbox.next_reply(deadline) => next,
        };
        match next {
            Ok(Some(reply)) => {
                let waiter = lock(&shared.waiters).remove(&reply.in_reply_to);
                if let Some(w) = waiter {
                    let _ = w.send(reply);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "Ingress: cannot read replies; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes a request's place in the waiters out when the request ends,
/// however it ends.
struct Waiting<'a> {
    shared: &'a Shared,
    id: String,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.shared.waiters).remove(&self.id);
    }
}

fn error(status: StatusCode, text: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": text.into() }))).into_response()
}

async fn command(
    State(shared): State<Arc<Shared>>,
    Path(message_type): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(&shared, Kind::Command, message_type, headers, body).await
}

async fn event(
    State(shared): State<Arc<Shared>>,
    Path(message_type): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(&shared, Kind::Event, message_type, headers, body).await
}

/// Answers one request, and counts the answer by type and status.
async fn answer(
    shared: &Shared,
    kind: Kind,
    message_type: String,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = match accept(shared, kind, &message_type, &headers, body).await {
        Ok(r) | Err(r) => r,
    };
    // An unknown type is counted as such, not under a name a client chose.
    let known = shared.control.topology().kind(&message_type).is_some();
    shared
        .control
        .services()
        .telemetry
        .metrics
        .ingress_requests
        .add(
            1,
            &[
                KeyValue::new(
                    "message_type",
                    if known {
                        message_type
                    } else {
                        "(unknown)".to_owned()
                    },
                ),
                KeyValue::new("status", i64::from(response.status().as_u16())),
            ],
        );
    response
}

/// The bearer token, when the ingress has any: one good for every type, or
/// one of the request's type.
async fn authorize(
    shared: &Shared,
    message_type: &str,
    headers: &HeaderMap,
) -> Result<(), Response> {
    if !shared.tokens.required() {
        return Ok(());
    }
    let admitting = shared.tokens.admitting(message_type);
    crate::admin::check_bearer(headers, &admitting, &shared.guesses, "Ingress").await
}

async fn accept(
    shared: &Shared,
    kind: Kind,
    message_type: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Response> {
    authorize(shared, message_type, headers).await?;
    let t = MessageType::try_from(message_type)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("not a message type: {e}")))?;
    check_kind(shared, &t, kind).await?;
    let body = read_body(shared, headers, body).await?;
    let (mut e, named) = envelope(&t, kind, headers, body)?;
    if let Err(why) = crate::limits::check_text("id", &e.id, crate::limits::MAX_ID)
        .and_then(|()| crate::limits::check_headers(&e.headers))
    {
        return Err(error(StatusCode::BAD_REQUEST, format!("refused: {why}")));
    }
    if let Err(why) = shared
        .control
        .services()
        .schemas
        .check(t.as_str(), &e.payload)
    {
        return Err(error(StatusCode::BAD_REQUEST, format!("not sent: {why}")));
    }
    let wait = match kind {
        Kind::Command => wait_for(shared, headers)?,
        Kind::Event => None,
    };
    // A retry of a request that named its id is not sent again.
    let holding = if named {
        match shared.accepted.claim(t.as_str(), &e.id).await {
            Ok(Claim::New(h)) => Some(h),
            Ok(Claim::Done(at)) => {
                let body = json!({
                    "id": e.id,
                    "type": t.as_str(),
                    "status": "duplicate",
                    "note": format!(
                        "a message with this id was accepted at {}; not sent again",
                        crate::transport::cloudevents::rfc3339(at)
                    ),
                });
                return Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response());
            }
            Ok(Claim::Busy) => {
                return Err(retry_soon(
                    StatusCode::CONFLICT,
                    "a request with this id is being accepted right now; retry it in a moment",
                ));
            }
            Err(err) => {
                tracing::warn!(message.id = %e.id, error = %format!("{err:#}"), "Ingress: cannot look up an id");
                return Err(unavailable(format!("cannot look up the id: {err:#}")));
            }
        }
    } else {
        None
    };
    let mut waiting = None;
    if let Some(w) = wait {
        let (tx, rx) = oneshot::channel();
        {
            // One waiter an id: a second command under an id whose reply
            // is awaited (of another type, say) would take that reply.
            let mut waiters = lock(&shared.waiters);
            if waiters.contains_key(&e.id) {
                return Err(retry_soon(
                    StatusCode::CONFLICT,
                    "a request under this id is waiting for its reply; retry it in a moment",
                ));
            }
            waiters.insert(e.id.clone(), tx);
        }
        e.reply_to = Some(shared.address.clone());
        waiting = Some((
            Waiting {
                shared,
                id: e.id.clone(),
            },
            rx,
            w,
        ));
    }
    let id = e.id.clone();
    let (done, outcome) = oneshot::channel();
    let durable = async {
        shared
            .enqueue
            .send((e, done))
            .await
            .map_err(|_| "the ingress is stopping".to_owned())?;
        outcome
            .await
            .map_err(|_| "the ingress is stopping".to_owned())?
    };
    match tokio::time::timeout(ACCEPT_TIMEOUT, durable).await {
        Ok(Ok(())) => {
            if named && let Err(err) = shared.accepted.done(t.as_str(), &id).await {
                // Durable but not noted: a retry would send it again.
                tracing::warn!(message.id = %id, error = %format!("{err:#}"), "Ingress: cannot note an accepted id");
            }
        }
        Ok(Err(err)) => {
            tracing::warn!(message.id = %id, error = %format!("{err:#}"), "Ingress: the transport did not take a message");
            return Err(unavailable(format!(
                "the transport did not take it: {err:#}"
            )));
        }
        Err(_) => {
            return Err(unavailable(format!(
                "the transport did not take it within {} s",
                ACCEPT_TIMEOUT.as_secs()
            )));
        }
    }
    // Noted: a retry from now on is told it is a duplicate.
    drop(holding);
    let accepted = |note: Option<String>| {
        let mut body = json!({ "id": id, "type": t.as_str(), "status": "accepted" });
        if let Some(n) = note {
            body["note"] = json!(n);
        }
        (StatusCode::ACCEPTED, axum::Json(body)).into_response()
    };
    let Some((_waiting, rx, wait)) = waiting else {
        return Ok(accepted(None));
    };
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(reply)) => {
            let content_type = HeaderValue::from_str(&reply.content_type)
                .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
            Ok((
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, content_type),
                    (
                        header::HeaderName::from_static("switchyard-message-id"),
                        HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("")),
                    ),
                ],
                reply.payload,
            )
                .into_response())
        }
        _ => Ok(accepted(Some(format!(
            "no reply within {} ms; the command is durable and will be handled",
            wait.as_millis()
        )))),
    }
}

fn unavailable(text: String) -> Response {
    retry_soon(StatusCode::SERVICE_UNAVAILABLE, text)
}

/// An error worth trying again in a second (`Retry-After: 1`).
fn retry_soon(status: StatusCode, text: impl Into<String>) -> Response {
    let mut r = error(status, text);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// 404 for a type nobody takes, 409 for one routed as the other kind.
async fn check_kind(shared: &Shared, t: &MessageType, kind: Kind) -> Result<(), Response> {
    let kind_now = shared.control.topology().kind(t.as_str());
    match kind_now {
        Some(k) if k == kind => Ok(()),
        Some(k) => Err(error(
            StatusCode::CONFLICT,
            format!(
                "`{t}` is {} here; post it to /{}/{t}",
                k.with_article(),
                match k {
                    Kind::Command => "commands",
                    Kind::Event => "events",
                }
            ),
        )),
        None => {
            let pipeline = shared.control.pipeline().await;
            Err(error(
                StatusCode::NOT_FOUND,
                format!(
                    "no plugin in pipeline `{}` takes the {kind} `{t}`; its {kind}s are {}",
                    pipeline.name,
                    pipeline.hint_types(kind)
                ),
            ))
        }
    }
}

/// The body, at most `max_body` bytes: 413 past it.
async fn read_body(shared: &Shared, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, Response> {
    let max = usize::try_from(shared.config.max_body).unwrap_or(usize::MAX);
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than [ingress] max_body ({max} bytes)"),
        )
    };
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > shared.config.max_body) {
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, max)).await {
        Ok(Ok(b)) => Ok(b.to_vec()),
        Ok(Err(e)) => {
            let limit = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if limit {
                Err(too_large())
            } else {
                Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the body: {e}"),
                ))
            }
        }
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// How long to wait for a command's reply: `Prefer: respond-async` not
/// at all, `Prefer: wait=N` N seconds (at most `max_wait`), otherwise
/// `wait`.
fn wait_for(shared: &Shared, headers: &HeaderMap) -> Result<Option<Duration>, Response> {
    let mut wait = Some(shared.config.wait);
    for value in headers.get_all("prefer") {
        let Ok(value) = value.to_str() else {
            return Err(error(StatusCode::BAD_REQUEST, "Prefer is not text"));
        };
        for pref in value.split(',').map(str::trim) {
            if pref.eq_ignore_ascii_case("respond-async") {
                wait = None;
            } else if let Some(n) = pref
                .strip_prefix("wait=")
                .or_else(|| pref.strip_prefix("WAIT="))
            {
                let secs: u64 = n.trim().parse().map_err(|_| {
                    error(
                        StatusCode::BAD_REQUEST,
                        format!("Prefer: wait={n} is not a whole number of seconds"),
                    )
                })?;
                wait = Some(Duration::from_secs(secs).min(shared.config.max_wait));
            }
        }
    }
    Ok(wait.filter(|w| !w.is_zero()))
}

fn header_text<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, Response> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                format!("the {name} header is not visible ASCII text"),
            )
        }),
    }
}

fn is_json(content_type: &str) -> bool {
    let media = content_type.split(';').next().unwrap_or("").trim();
    media.eq_ignore_ascii_case("application/json") || media.to_ascii_lowercase().ends_with("+json")
}

/// The message a request describes: a structured CloudEvent, a binary one,
/// or a plain body; and whether the client named its id.
fn envelope(
    t: &MessageType,
    kind: Kind,
    headers: &HeaderMap,
    body: Vec<u8>,
) -> Result<(Envelope, bool), Response> {
    let bad = |text: String| error(StatusCode::BAD_REQUEST, text);
    let content_type = header_text(headers, "content-type")?
        .unwrap_or(crate::config::DEFAULT_CONTENT_TYPE)
        .to_owned();
    let mut trace = Vec::new();
    for name in ["traceparent", "tracestate"] {
        if let Some(v) = header_text(headers, name)? {
            trace.push((name.to_owned(), v.to_owned()));
        }
    }
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media.eq_ignore_ascii_case("application/cloudevents+json") {
        let event: Value = serde_json::from_slice(&body)
            .map_err(|e| bad(format!("the CloudEvent is not JSON: {e}")))?;
        let attr = |name: &str| event.get(name).and_then(Value::as_str);
        if attr("specversion") != Some("1.0") {
            return Err(bad("the CloudEvent's specversion must be \"1.0\"".into()));
        }
        check_ce_type(t, attr("type"))?;
        let id = attr("id").ok_or_else(|| bad("the CloudEvent has no id".into()))?;
        if event.get("data_base64").is_some() {
            return Err(bad(
                "data_base64 is not taken: send binary data in binary mode (ce-* headers)".into(),
            ));
        }
        let data_type = attr("datacontenttype").unwrap_or("application/json");
        let payload = match event.get("data") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) if !is_json(data_type) => s.clone().into_bytes(),
            Some(v) => serde_json::to_vec(v).map_err(|e| bad(e.to_string()))?,
        };
        let mut e = Envelope::new(t.as_str(), kind, payload, data_type);
        e.id = id.to_owned();
        e.correlation_id = attr("correlationid").map(str::to_owned);
        e.partition_key = attr("partitionkey").map(str::to_owned);
        for name in ["traceparent", "tracestate"] {
            if let Some(v) = attr(name) {
                trace.retain(|(n, _)| n != name);
                trace.push((name.to_owned(), v.to_owned()));
            }
        }
        e.headers = trace;
        return Ok((e, true));
    }
    if is_json(&content_type)
        && let Err(err) = serde_json::from_slice::<serde::de::IgnoredAny>(&body)
    {
        return Err(bad(format!("the body is not JSON: {err}")));
    }
    let mut e = Envelope::new(t.as_str(), kind, body, content_type);
    let mut named = true;
    if let Some(version) = header_text(headers, "ce-specversion")? {
        if version != "1.0" {
            return Err(bad("ce-specversion must be 1.0".into()));
        }
        check_ce_type(t, header_text(headers, "ce-type")?)?;
        e.id = header_text(headers, "ce-id")?
            .ok_or_else(|| bad("a binary-mode CloudEvent needs ce-id".into()))?
            .to_owned();
        e.correlation_id = header_text(headers, "ce-correlationid")?.map(str::to_owned);
        e.partition_key = header_text(headers, "ce-partitionkey")?.map(str::to_owned);
    } else if let Some(key) = header_text(headers, "idempotency-key")? {
        e.id = key.to_owned();
    } else {
        named = false;
    }
    e.headers = trace;
    Ok((e, named))
}

/// A CloudEvent's `type` must be the path's, when it has one.
fn check_ce_type(t: &MessageType, given: Option<&str>) -> Result<(), Response> {
    match given {
        Some(g) if g != t.as_str() => Err(error(
            StatusCode::BAD_REQUEST,
            format!("the CloudEvent's type `{g}` is not the path's `{t}`"),
        )),
        _ => Ok(()),
    }
}
