//! `/healthz` and Prometheus `/metrics`.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::state::AppState;
use crate::store::series;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

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
