//! The admin HTTP listener. Localhost by default.
//!
//! | method and path | what | token |
//! |---|---|---|
//! | `GET /metrics` | Prometheus text | no |
//! | `GET /healthz` | `ok` while the process serves HTTP (liveness) | no |
//! | `GET /readyz` | 200 `ready` once every route runs and the transport and stores answer; 503 with the reasons otherwise, and while draining (readiness) | no |
//! | `GET /plugins` | what each route runs (JSON) | no |
//! | `PUT /plugins/{name}` | deploy the component in the body | yes |
//! | `POST /plugins/{name}/rollback` | back to the version before | yes |
//! | `/ui/...` | the web console ([`crate::console`]) | a session from the token |
//!
//! Changing endpoints need `Authorization: Bearer <token>`, the token being
//! the value of the environment variable `[admin] token_env` names. Without
//! a configured token they are refused, before their body is read.
//!
//! The listener is exposed to whatever can reach its address, so it guards
//! itself: at most [`MAX_CONNECTIONS`] connections at once (more are closed
//! on arrival), one request per connection, headers within
//! [`HEADER_TIMEOUT`] and an upload within [`BODY_TIMEOUT`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use hyper_util::rt::{TokioIo, TokioTimer};
use tower_service::Service as _;

use crate::supervisor::{ChangeError, Supervisor};
use crate::telemetry::Telemetry;

/// The largest component a deploy may upload.
pub const MAX_DEPLOY_BYTES: usize = 256 << 20;
/// Connections served at once: enough for scrapers and an operator, few
/// enough that a flood of idle connections cannot exhaust the host.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an authorized upload may take (256 MiB at about 1 MB/s).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a connection may last in all; a request is answered well
/// within it.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(600);

/// How long each readiness check may take before it counts as a failure.
pub const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the host is in its life, as `/readyz` tells it: starting until
/// every route has started, serving, then draining from the moment it is
/// asked to stop until its routes have settled what they hold.
#[derive(Debug, Default)]
pub struct Phase(AtomicU8);

impl Phase {
    const STARTING: u8 = 0;
    const SERVING: u8 = 1;
    const DRAINING: u8 = 2;

    pub fn new() -> Arc<Self> {
        Arc::new(Phase::default())
    }

    /// Every route has started.
    pub fn serving(&self) {
        let _ = self.0.compare_exchange(
            Self::STARTING,
            Self::SERVING,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// The host was asked to stop: it takes no new work.
    pub fn draining(&self) {
        self.0.store(Self::DRAINING, Ordering::SeqCst);
    }

    fn get(&self) -> u8 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A bound listener, ready to serve.
pub struct Admin {
    listener: tokio::net::TcpListener,
    telemetry: Telemetry,
    control: Option<Arc<Supervisor>>,
    token: Option<String>,
    console: Option<crate::console::Console>,
    header_timeout: Duration,
    guesses: Arc<crate::console::Guesses>,
    phase: Option<Arc<Phase>>,
}

#[derive(Clone)]
struct AppState {
    telemetry: Telemetry,
    control: Option<Arc<Supervisor>>,
    token: Option<Arc<str>>,
    guesses: Arc<crate::console::Guesses>,
    phase: Option<Arc<Phase>>,
    readiness: Arc<Readiness>,
}

impl Admin {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr, telemetry: Telemetry) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} for the admin API (set [admin] listen, or \"off\")")
        })?;
        Ok(Admin {
            listener,
            telemetry,
            control: None,
            token: None,
            console: None,
            header_timeout: HEADER_TIMEOUT,
            guesses: crate::console::Guesses::new(),
            phase: None,
        })
    }

    /// The wrong tokens of this listener: the console's sign-in counts
    /// them with the admin API's.
    pub fn guesses(&self) -> Arc<crate::console::Guesses> {
        self.guesses.clone()
    }

    /// Closes connections whose request headers take longer than this
    /// ([`HEADER_TIMEOUT`] by default).
    pub fn with_header_timeout(mut self, timeout: Duration) -> Self {
        self.header_timeout = timeout;
        self
    }

    /// Serves the plugin endpoints of a running host; changes need `token`.
    pub fn with_control(mut self, control: Arc<Supervisor>, token: Option<String>) -> Self {
        self.control = Some(control);
        self.token = token;
        self
    }

    /// Answers `/readyz` from the host's phase (and, while it serves, from
    /// its routes, transport and stores). Without one, `/readyz` answers
    /// as `/healthz` does.
    pub fn with_phase(mut self, phase: Arc<Phase>) -> Self {
        self.phase = Some(phase);
        self
    }

    /// Serves the web console at `/ui`.
    pub fn with_console(mut self, console: crate::console::Console) -> Self {
        self.console = Some(console);
        self
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let state = AppState {
            telemetry: self.telemetry,
            control: self.control,
            token: self.token.map(Into::into),
            guesses: self.guesses,
            phase: self.phase,
            readiness: Arc::new(Readiness::default()),
        };
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/plugins", get(list))
            .route("/plugins/{name}", put(deploy).post(deploy))
            .route("/plugins/{name}/rollback", post(rollback))
            .with_state(state);
        let app = match &self.console {
            Some(console) => app.merge(console.router()),
            None => app,
        };
        let serving = Serving {
            max_connections: MAX_CONNECTIONS,
            header_timeout: self.header_timeout,
            connection_timeout: CONNECTION_TIMEOUT,
            keep_alive: false,
            tls: None,
        };
        serve_http(self.listener, app, serving, shutdown).await;
        Ok(())
    }
}

/// How [`serve_http`] serves a listener.
pub(crate) struct Serving {
    /// Connections at once; more are closed on arrival.
    pub max_connections: usize,
    /// How long a client may take to send its headers (and, with TLS, to
    /// finish its handshake).
    pub header_timeout: Duration,
    /// The longest a connection may last.
    pub connection_timeout: Duration,
    pub keep_alive: bool,
    /// HTTPS: every connection starts with a TLS handshake.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Serves `app` on `listener` until `shutdown` completes, within the
/// limits of `serving`. At shutdown each connection finishes its request
/// and closes; requests in progress get up to 5 seconds.
pub(crate) async fn serve_http(
    listener: tokio::net::TcpListener,
    app: Router,
    serving: Serving,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let max_connections = serving.max_connections;
    let serving = Arc::new(serving);
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    // Dropped at shutdown: every connection then finishes its request
    // and closes.
    let (closing, closed) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let io = match accepted {
            Ok((io, _)) => io,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "HTTP listener cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!("HTTP listener at its connection limit; a connection is closed");
            continue;
        };
        let app = app.clone();
        let closed = closed.clone();
        let serving = serving.clone();
        tokio::spawn(async move {
            match &serving.tls {
                None => serve_connection(io, app, &serving, closed).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(serving.header_timeout, acceptor.accept(io)).await;
                    match handshake {
                        Ok(Ok(tls)) => serve_connection(tls, app, &serving, closed).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake not finished in time"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(closing);
    // Requests in progress get a moment to finish.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        permits.acquire_many(u32::try_from(max_connections).unwrap_or(u32::MAX)),
    )
    .await;
}

/// Serves one connection, plain or TLS, until it ends or the listener
/// closes.
async fn serve_connection<I>(
    io: I,
    app: Router,
    serving: &Serving,
    mut closed: tokio::sync::watch::Receiver<()>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let mut app = app.clone();
        async move { app.call(req.map(Body::new)).await }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(serving.header_timeout)
        .keep_alive(serving.keep_alive);
    let conn = http.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let served = tokio::time::timeout(serving.connection_timeout, async {
        tokio::select! {
            result = conn.as_mut() => result,
            _ = closed.changed() => {
                conn.as_mut().graceful_shutdown();
                conn.as_mut().await
            }
        }
    })
    .await;
    if let Ok(Err(e)) = served {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// 200 `ready`, or 503 `not ready` with one line per reason. The reasons
/// name what does not answer; why (addresses, errors) goes to the log,
/// which the probe's unauthenticated caller does not read.
async fn readyz(State(state): State<AppState>) -> Response {
    let problems = match &state.phase {
        None => Vec::new(),
        Some(phase) => match phase.get() {
            Phase::STARTING => vec!["starting: not every route has started yet".to_owned()],
            Phase::SERVING => match &state.control {
                Some(control) => state.readiness.problems(control).await,
                None => Vec::new(),
            },
            _ => vec!["draining: the host is stopping and takes no new work".to_owned()],
        },
    };
    let no_store = [(header::CACHE_CONTROL, "no-store")];
    if problems.is_empty() {
        return (StatusCode::OK, no_store, "ready\n").into_response();
    }
    let mut body = String::from("not ready\n");
    for p in &problems {
        body.push_str("- ");
        body.push_str(p);
        body.push('\n');
    }
    (StatusCode::SERVICE_UNAVAILABLE, no_store, body).into_response()
}

/// The last readiness checks of a serving host, kept for
/// [`READY_CACHE`]: probes that come closer together share one run of the
/// checks, and only one run is under way at a time, so probes cannot add
/// to the load of what they check.
#[derive(Default)]
struct Readiness {
    last: tokio::sync::Mutex<Option<(std::time::Instant, Vec<String>)>>,
}

/// How long one run of the readiness checks answers for.
const READY_CACHE: Duration = Duration::from_secs(1);

impl Readiness {
    async fn problems(&self, control: &Supervisor) -> Vec<String> {
        let mut last = self.last.lock().await;
        if let Some((at, problems)) = last.as_ref()
            && at.elapsed() < READY_CACHE
        {
            return problems.clone();
        }
        let found = readiness_problems(control).await;
        let (summaries, details): (Vec<String>, Vec<String>) = found.into_iter().unzip();
        let before = last.as_ref().map(|(_, p)| p.clone()).unwrap_or_default();
        if summaries != before {
            if details.is_empty() {
                tracing::info!("Ready");
            } else {
                tracing::warn!(reasons = %details.join("; "), "Not ready");
            }
        }
        *last = Some((std::time::Instant::now(), summaries.clone()));
        summaries
    }
}

/// What keeps a serving host from being ready, each as a line for the
/// probe and one for the log: a route of the pipeline that is not running
/// or whose plugin cannot start, a transport or store that does not answer
/// within [`READY_CHECK_TIMEOUT`]. The journal is left out: its outage
/// never holds up a message. Nothing here waits for a change in progress.
async fn readiness_problems(control: &Supervisor) -> Vec<(String, String)> {
    async fn check<F: Future<Output = Result<T>>, T>(
        what: String,
        f: F,
    ) -> Option<(String, String)> {
        match tokio::time::timeout(READY_CHECK_TIMEOUT, f).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some((
                format!("{what} does not answer"),
                format!("{what} does not answer: {e:#}"),
            )),
            Err(_) => {
                let line = format!(
                    "{what} did not answer within {} s",
                    READY_CHECK_TIMEOUT.as_secs()
                );
                Some((line.clone(), line))
            }
        }
    }
    let transport = control.transport();
    let services = control.services();
    let mut problems = Vec::new();
    let running = control.list().await;
    for route in control.topology().route_names() {
        if !running.iter().any(|r| r.plugin == route) {
            let line = format!("route {route} is not running");
            problems.push((line.clone(), line));
        }
    }
    for (route, why) in control.routes_that_cannot_start() {
        problems.push((
            format!("route {route}: its plugin cannot start"),
            format!("route {route}: its plugin cannot start: {why}"),
        ));
    }
    let transport_ok = check(
        format!("the {} transport", transport.kind()),
        transport.ping(),
    );
    let dead_letters = check(
        "the dead-letter store".to_owned(),
        services.dead_letters.ping(),
    );
    let state_store = async {
        match services.state.as_ref().and_then(|a| a.store.clone()) {
            Some(store) => check("the state store".to_owned(), store.ping()).await,
            None => None,
        }
    };
    let (t, d, s) = tokio::join!(transport_ok, dead_letters, state_store);
    problems.extend([t, d, s].into_iter().flatten());
    problems
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.telemetry.metrics.prometheus(),
    )
        .into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": message.into() });
    (status, axum::Json(body)).into_response()
}

fn control(state: &AppState) -> Result<&Arc<Supervisor>, Response> {
    state.control.as_ref().ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this listener serves no running pipeline",
        )
    })
}

/// Refuses a changing request without the right bearer token.
async fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    let Some(expected) = &state.token else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "changes through the admin API are off on this host: set [admin] token_env in the pipeline and that variable in the host's environment",
        ));
    };
    check_bearer(headers, &[&**expected], &state.guesses, "Admin API").await
}

/// Checks `Authorization: Bearer <expected>`: 401 without it, and 401
/// after its turn among the wrong tokens ([`crate::console::Guesses`])
/// with a wrong one. `what` names the listener in the log.
pub(crate) async fn check_bearer(
    headers: &HeaderMap,
    expected: &[&str],
    guesses: &crate::console::Guesses,
    what: &str,
) -> Result<(), Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Every expected token is compared, so the time taken does not tell
    // which one a token came close to.
    let matches = |t: &str| {
        expected.iter().fold(false, |found, e| {
            crate::text::constant_time_eq(t.as_bytes(), e.as_bytes()) | found
        })
    };
    match given {
        Some(t) if matches(t) => Ok(()),
        Some(_) => {
            guesses.wrong().await;
            tracing::warn!("{what}: a request with a wrong token");
            Err(error(StatusCode::UNAUTHORIZED, "wrong token"))
        }
        None => Err((
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(serde_json::json!({
                "error": "this endpoint needs `Authorization: Bearer <token>`"
            })),
        )
            .into_response()),
    }
}

fn change_response(result: Result<crate::supervisor::RouteInfo, ChangeError>) -> Response {
    match result {
        Ok(info) => (StatusCode::OK, axum::Json(info)).into_response(),
        Err(e @ ChangeError::UnknownPlugin(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ ChangeError::Refused(_)) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        Err(e @ ChangeError::Failed(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn list(State(state): State<AppState>) -> Response {
    match control(&state) {
        Ok(c) => axum::Json(c.list().await).into_response(),
        Err(r) => r,
    }
}

/// Reads an authorized request's body, up to [`MAX_DEPLOY_BYTES`] and
/// within [`BODY_TIMEOUT`].
async fn read_body(body: Body) -> Result<Bytes, Response> {
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_DEPLOY_BYTES)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body could not be read (a component may have at most {} bytes): {e}",
                MAX_DEPLOY_BYTES
            ),
        )),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {BODY_TIMEOUT:?}"),
        )),
    }
}

async fn deploy(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // The token first: an unauthorized body is never read.
    if let Err(r) = authorize(&state, &headers).await {
        return r;
    }
    let c = match control(&state) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if body.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "the request body must be the component (.wasm)",
        );
    }
    change_response(c.deploy(&name, body.to_vec()).await)
}

async fn rollback(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&state, &headers).await {
        return r;
    }
    match control(&state) {
        Ok(c) => change_response(c.rollback(&name).await),
        Err(r) => r,
    }
}
