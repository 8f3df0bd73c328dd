//! Where stored telemetry goes: `GET /api/v1/sinks` (any role).

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::state::AppState;
use crate::platform::SinkStatus;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default().routes(routes!(list_sinks))
}

/// `GET /api/v1/sinks`.
#[derive(Serialize, ToSchema)]
pub struct SinkList {
    /// In the order they were configured (`--sink`); empty when the hub forwards nothing.
    pub sinks: Vec<SinkStatus>,
}

/// The hub's sinks (Kafka, Elasticsearch): how far each has delivered, its lag, its errors.
#[utoipa::path(
    get,
    path = "/api/v1/sinks",
    tag = "ops",
    security(("token" = ["viewer"])),
    responses((status = 200, description = "Every configured sink", body = SinkList)),
)]
async fn list_sinks(State(s): State<AppState>) -> Result<Json<SinkList>, ApiError> {
    let sinks = s.sinks.clone();
    let sinks = tokio::task::spawn_blocking(move || sinks.status())
        .await
        .expect("status task")?;
    Ok(Json(SinkList { sinks }))
}
