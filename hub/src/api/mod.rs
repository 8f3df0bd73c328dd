//! The REST/JSON API under `/api/v1` (one file per resource), plus `/healthz` and Prometheus
//! `/metrics`. Handlers read the store and the fleet view and ask the scheduler; they never
//! open the store's tables. Every request is counted once, by route template and status.

pub mod datasets;
pub mod devices;
pub mod error;
pub mod jobs;
pub mod ops;
pub mod state;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};

pub use self::error::ApiError;
pub use self::state::AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/metrics", get(ops::metrics))
        .route("/api/v1/datasets/export", post(datasets::export))
        .merge(devices::routes())
        .merge(jobs::routes())
        .fallback(error::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Counts every request, including 404s and the fallback, under its route template (so
/// `/api/v1/devices/{id}` is one series however many devices there are).
async fn count(State(s): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    s.metrics.observe_http(&route, response.status().as_u16());
    response
}
