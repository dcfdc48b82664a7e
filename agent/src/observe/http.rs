//! The agent's HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use super::{Health, Metrics};

#[derive(Clone)]
pub struct Observed {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

/// Serves until `shutdown` resolves.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    observed: Observed,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(observed);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(observed): State<Observed>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        observed.metrics.encode(),
    )
}

async fn healthz(State(observed): State<Observed>) -> impl IntoResponse {
    match observed.health.stalled() {
        None => (StatusCode::OK, "ok\n".to_owned()),
        Some(problem) => (StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n")),
    }
}

async fn readyz(State(observed): State<Observed>) -> impl IntoResponse {
    if observed.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "first sync not yet programmed\n",
        )
    }
}
