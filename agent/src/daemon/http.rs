//! The agent's HTTP endpoints: `/healthz` (the scheduler is alive; never checks the database or
//! S3, so an S3 outage cannot make Kubernetes restart the pod), `/metrics` (Prometheus) and
//! `/status` (JSON per source).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::Agent;

/// The router.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(agent)
}

async fn healthz(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    if agent.alive.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "scheduler stopped\n")
    }
}

async fn metrics(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        agent.telemetry.encode(),
    )
}

async fn status(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    let sources = agent.status_snapshot();
    axum::Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pod": agent.pod,
        "alive": agent.alive.load(Ordering::Relaxed),
        "sources": sources,
    }))
}
