//! The admin HTTP listener: `/metrics` (Prometheus text) and `/healthz`.
//! Localhost by default; it exposes no way to change anything.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::telemetry::Telemetry;

/// A bound listener, ready to serve.
pub struct Admin {
    listener: tokio::net::TcpListener,
    telemetry: Telemetry,
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
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let telemetry = self.telemetry;
        let app = Router::new()
            .route(
                "/metrics",
                get(move || {
                    let telemetry = telemetry.clone();
                    async move {
                        (
                            [(
                                header::CONTENT_TYPE,
                                "text/plain; version=0.0.4; charset=utf-8",
                            )],
                            telemetry.metrics.prometheus(),
                        )
                            .into_response()
                    }
                }),
            )
            .route("/healthz", get(|| async { "ok\n" }));
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("the admin listener failed")
    }
}
