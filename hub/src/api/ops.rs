//! `/healthz` and Prometheus `/metrics`.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::state::AppState;
use crate::store::series;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(healthz))
        .routes(routes!(metrics))
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the hub answers.
    #[schema(example = "ok")]
    status: &'static str,
}

/// Liveness: answers while the hub serves.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "ops",
    security(()),
    responses((status = 200, description = "The hub is up", body = Health)),
)]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Prometheus metrics: ingest counters, HTTP requests by route and status, devices by status.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    security(()),
    responses((
        status = 200,
        description = "Prometheus text exposition format 0.0.4",
        body = String,
        content_type = "text/plain; version=0.0.4",
    )),
)]
pub async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let now = series::now_ms();
    let mut counts = [("online", 0), ("stale", 0), ("offline", 0)];
    for d in s.fleet.all() {
        counts[s.thresholds.status(d.record.last_seen_ms, now) as usize].1 += 1;
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(&counts),
    )
}
