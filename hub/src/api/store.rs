//! The store's size, age, growth and retention: `GET /api/v1/store` (any role).

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::state::AppState;
use crate::store::health::WriteState;
use crate::store::retention::{Hold, RetentionStatus};
use crate::store::{Store, StoreError};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default().routes(routes!(store_status))
}

/// `GET /api/v1/store`.
#[derive(Serialize, ToSchema)]
pub struct StoreStatus {
    /// The store file.
    pub path: String,
    /// Its size on disk. Space freed by retention is reused, so this stops growing rather than
    /// shrinking.
    pub file_bytes: u64,
    /// Bytes held by samples (their encoded size and keys).
    pub sample_bytes: u64,
    /// Samples stored.
    pub samples: u64,
    /// The oldest sample's own timestamp (epoch ms); absent with no samples.
    pub oldest_sample_ms: Option<i64>,
    /// The newest sample's timestamp (epoch ms); absent with no samples.
    pub newest_sample_ms: Option<i64>,
    /// What is kept (`--retention`, `--retention-size`).
    pub retention: PolicyView,
    /// What the last retention pass did, what held data back, and how fast the store grows.
    pub retention_status: RetentionStatus,
    /// Dataset exports (and the like) keeping samples from a time on, now.
    pub holds: Vec<Hold>,
    /// Whether the store takes writes.
    pub write_state: WriteState,
    /// Bytes free on the data directory's filesystem; absent when it cannot be read.
    pub free_bytes: Option<u64>,
    /// The low-disk watermark (`--min-free-space`; 0: off).
    pub min_free_bytes: u64,
}

/// The retention policy.
#[derive(Serialize, ToSchema)]
pub struct PolicyView {
    /// Samples older than this many seconds are deleted; absent: kept by age.
    pub max_age_seconds: Option<u64>,
    /// The store file is kept under this many bytes; absent: no size limit.
    pub max_size_bytes: Option<u64>,
}

/// The store: its size, oldest sample, growth rate, retention policy and what holds data back,
/// and whether it takes writes.
#[utoipa::path(
    get,
    path = "/api/v1/store",
    tag = "ops",
    security(("token" = ["viewer"])),
    responses(
        (status = 200, description = "The store's status", body = StoreStatus),
        (status = 500, description = "The store could not be read", body = super::error::ErrorBody),
    ),
)]
async fn store_status(State(s): State<AppState>) -> Result<Json<StoreStatus>, ApiError> {
    let store = s.store.clone();
    let status = tokio::task::spawn_blocking(move || status(&store))
        .await
        .expect("status task")?;
    Ok(Json(status))
}

fn status(store: &Store) -> Result<StoreStatus, StoreError> {
    let (sample_bytes, samples) = store.sample_totals()?;
    let bounds = store.sample_time_bounds()?;
    let policy = store.retention_policy();
    Ok(StoreStatus {
        path: store.dir().join("shoal.redb").display().to_string(),
        file_bytes: store.file_bytes(),
        sample_bytes,
        samples,
        oldest_sample_ms: bounds.map(|b| b.0),
        newest_sample_ms: bounds.map(|b| b.1),
        retention: PolicyView {
            max_age_seconds: policy.max_age.map(|d| d.as_secs()),
            max_size_bytes: policy.max_size,
        },
        retention_status: store.retention_status(),
        holds: store.holds(),
        write_state: store.health().state(),
        free_bytes: crate::store::health::free_bytes(store.dir()).ok(),
        min_free_bytes: store.health().min_free_bytes(),
    })
}
