//! The admin HTTP listener. Localhost by default.
//!
//! | method and path | what | token |
//! |---|---|---|
//! | `GET /metrics` | Prometheus text | no |
//! | `GET /healthz` | `ok` | no |
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

/// A bound listener, ready to serve.
pub struct Admin {
    listener: tokio::net::TcpListener,
    telemetry: Telemetry,
    control: Option<Arc<Supervisor>>,
    token: Option<String>,
    console: Option<crate::console::Console>,
    header_timeout: Duration,
    guesses: Arc<crate::console::Guesses>,
}

#[derive(Clone)]
struct AppState {
    telemetry: Telemetry,
    control: Option<Arc<Supervisor>>,
    token: Option<Arc<str>>,
    guesses: Arc<crate::console::Guesses>,
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
        };
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/plugins", get(list))
            .route("/plugins/{name}", put(deploy).post(deploy))
            .route("/plugins/{name}/rollback", post(rollback))
            .with_state(state);
        let app = match &self.console {
            Some(console) => app.merge(console.router()),
            None => app,
        };
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        // Dropped at shutdown: every connection then finishes its request
        // and closes.
        let (closing, closed) = tokio::sync::watch::channel(());
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => accepted,
            };
            let io = match accepted {
                Ok((io, _)) => io,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "Admin listener cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::debug!("Admin listener at its connection limit; a connection is closed");
                continue;
            };
            let app = app.clone();
            let mut closed = closed.clone();
            let header_timeout = self.header_timeout;
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let mut app = app.clone();
                        async move { app.call(req.map(Body::new)).await }
                    });
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .keep_alive(false);
                let conn = http.serve_connection(TokioIo::new(io), service);
                let mut conn = std::pin::pin!(conn);
                let served = tokio::time::timeout(CONNECTION_TIMEOUT, async {
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
                    tracing::debug!(error = %e, "Admin connection ended with an error");
                }
                drop(permit);
            });
        }
        drop(closing);
        // Requests in progress get a moment to finish.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            permits.acquire_many(MAX_CONNECTIONS as u32),
        )
        .await;
        Ok(())
    }
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
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if crate::text::constant_time_eq(t.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => {
            state.guesses.wrong().await;
            tracing::warn!("Admin API: a request with a wrong token");
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
