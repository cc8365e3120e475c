//! The admin HTTP listener. Localhost by default.
//!
//! | method and path | what | token |
//! |---|---|---|
//! | `GET /metrics` | Prometheus text | no |
//! | `GET /healthz` | `ok` | no |
//! | `GET /plugins` | what each route runs (JSON) | no |
//! | `PUT /plugins/{name}` | deploy the component in the body | yes |
//! | `POST /plugins/{name}/rollback` | back to the version before | yes |
//!
//! Changing endpoints need `Authorization: Bearer <token>`, the token being
//! the value of the environment variable `[admin] token_env` names. Without
//! a configured token they are refused.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};

use crate::reload::{ChangeError, Control};
use crate::telemetry::Telemetry;

/// The largest component a deploy may upload.
pub const MAX_DEPLOY_BYTES: usize = 256 << 20;

/// A bound listener, ready to serve.
pub struct Admin {
    listener: tokio::net::TcpListener,
    telemetry: Telemetry,
    control: Option<Arc<Control>>,
    token: Option<String>,
}

#[derive(Clone)]
struct AppState {
    telemetry: Telemetry,
    control: Option<Arc<Control>>,
    token: Option<Arc<str>>,
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
        })
    }

    /// Serves the plugin endpoints of a running host; changes need `token`.
    pub fn with_control(mut self, control: Arc<Control>, token: Option<String>) -> Self {
        self.control = Some(control);
        self.token = token;
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
        };
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/plugins", get(list))
            .route("/plugins/{name}", put(deploy).post(deploy))
            .route("/plugins/{name}/rollback", post(rollback))
            .layer(DefaultBodyLimit::max(MAX_DEPLOY_BYTES))
            .with_state(state);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("the admin listener failed")
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

fn control(state: &AppState) -> Result<&Arc<Control>, Response> {
    state.control.as_ref().ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this listener serves no running pipeline",
        )
    })
}

/// Refuses a changing request without the right bearer token.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), Response> {
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
        Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(error(StatusCode::UNAUTHORIZED, "wrong token")),
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

/// Compares without stopping at the first difference, so response times do
/// not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

fn change_response(result: Result<crate::reload::RouteInfo, ChangeError>) -> Response {
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

async fn deploy(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    let c = match control(&state) {
        Ok(c) => c,
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
    if let Err(r) = authorize(&state, &headers) {
        return r;
    }
    match control(&state) {
        Ok(c) => change_response(c.rollback(&name).await),
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-token", b"secret-tokem"));
        assert!(!constant_time_eq(b"secret", b"secret-token"));
        assert!(!constant_time_eq(b"secret-token-and-more", b"secret-token"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
