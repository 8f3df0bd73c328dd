//! The REST/JSON API under `/api/v1`, plus `/healthz` and Prometheus `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shoal_proto::v1::Sample;

use crate::metrics::Metrics;
use crate::registry::{DeviceRecord, Status, StatusThresholds};
use crate::series::{self, Bucket, Downsampler};
use crate::store::{Store, StoreError};
use crate::writer::{DeviceState, Fleet};

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub fleet: Arc<Fleet>,
    pub metrics: Arc<Metrics>,
    pub thresholds: StatusThresholds,
    pub jobs: crate::jobs::scheduler::Scheduler,
    pub job_store: crate::jobs::store::JobStore,
    pub runs_dir: std::path::PathBuf,
    /// This hub's REST URL, given to runs.
    pub hub_url: String,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/devices", get(list_devices))
        .route(
            "/api/v1/datasets/export",
            axum::routing::post(crate::datasets::export),
        )
        .route("/api/v1/devices/{id}", get(show_device))
        .route("/api/v1/devices/{id}/samples", get(samples))
        .route("/api/v1/devices/{id}/series", get(series_handler))
        .merge(crate::http_jobs::routes())
        .fallback(not_found)
        .with_state(state)
}

/// An API error: a status and a message that says what to do.
pub struct ApiError(StatusCode, String);

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self(status, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such endpoint; the API lives under /api/v1".into(),
    )
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    s.metrics.http_requests.inc();
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

/// A device as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceView {
    #[serde(flatten)]
    pub record: DeviceRecord,
    pub status: Status,
    /// Highest seq stored for the device.
    pub stored_up_to_seq: u64,
}

fn view(s: &AppState, d: DeviceState, now: i64) -> DeviceView {
    DeviceView {
        status: s.thresholds.status(d.record.last_seen_ms, now),
        stored_up_to_seq: d.max_seq,
        record: d.record,
    }
}

fn device(s: &AppState, id: &str) -> Result<DeviceState, ApiError> {
    s.fleet.get(id).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no device {id:?} has reported to this hub"),
        )
    })
}

async fn list_devices(State(s): State<AppState>) -> Json<serde_json::Value> {
    s.metrics.http_requests.inc();
    let now = series::now_ms();
    let devices: Vec<DeviceView> = s
        .fleet
        .all()
        .into_iter()
        .map(|d| view(&s, d, now))
        .collect();
    Json(serde_json::json!({ "devices": devices }))
}

async fn show_device(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.metrics.http_requests.inc();
    let d = device(&s, &id)?;
    let key = d.key;
    let store = s.store.clone();
    let latest = tokio::task::spawn_blocking(move || store.latest(key))
        .await
        .expect("read task")?;
    let mut v = serde_json::to_value(view(&s, d, series::now_ms())).expect("view serialises");
    v["latest_sample"] = serde_json::to_value(latest).expect("sample serialises");
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
struct SamplesQuery {
    #[serde(default)]
    after_seq: u64,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct SamplesPage {
    device_id: String,
    samples: Vec<Sample>,
    /// Pass as `after_seq` to read on; absent when this page reached the end.
    next_after_seq: Option<u64>,
}

const MAX_PAGE: usize = 10_000;

async fn samples(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<SamplesQuery>,
) -> Result<Json<SamplesPage>, ApiError> {
    s.metrics.http_requests.inc();
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let d = device(&s, &id)?;
    let store = s.store.clone();
    let key = d.key;
    let samples = tokio::task::spawn_blocking(move || store.samples_after(key, q.after_seq, limit))
        .await
        .expect("read task")?;
    let next_after_seq =
        (samples.len() == limit).then(|| samples.last().map_or(q.after_seq, |x| x.seq));
    Ok(Json(SamplesPage {
        device_id: id,
        samples,
        next_after_seq,
    }))
}

#[derive(Debug, Deserialize)]
struct SeriesQuery {
    metric: Option<String>,
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
}

#[derive(Serialize)]
struct SeriesView {
    device_id: String,
    metric: String,
    from: i64,
    to: i64,
    step_ms: u64,
    points: Vec<Bucket>,
}

async fn series_handler(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<SeriesQuery>,
) -> Result<Json<SeriesView>, ApiError> {
    s.metrics.http_requests.inc();
    let metric = q.metric.filter(|m| !m.is_empty()).ok_or_else(|| {
        bad_request("the `metric` parameter is required, e.g. metric=cpu_percent or metric=disk_used_bytes{mount=\"/\"}")
    })?;
    let now = series::now_ms();
    let to =
        q.to.as_deref()
            .map_or(Ok(now), |t| series::parse_time(t, now))
            .map_err(|e| bad_request(format!("to: {e}")))?;
    let from = q
        .from
        .as_deref()
        .map_or(Ok(to - 3_600_000), |t| series::parse_time(t, now))
        .map_err(|e| bad_request(format!("from: {e}")))?;
    let step = match q.step.as_deref() {
        Some(st) => {
            humantime::parse_duration(st).map_err(|e| bad_request(format!("step: {st:?}: {e}")))?
        }
        None => series::default_step(from, to),
    };
    let mut down = Downsampler::new(from, to, step).map_err(bad_request)?;
    let d = device(&s, &id)?;
    let store = s.store.clone();
    let key = d.key;
    let metric_name = metric.clone();
    let points = tokio::task::spawn_blocking(move || -> Result<Vec<Bucket>, StoreError> {
        store.scan_time_range(key, from, to, |sample| {
            if let Some(v) = shoal_proto::metrics::value_of(sample, &metric_name) {
                down.push(sample.timestamp_ms, v);
            }
        })?;
        Ok(down.finish())
    })
    .await
    .expect("read task")?;
    Ok(Json(SeriesView {
        device_id: id,
        metric,
        from,
        to,
        step_ms: step.as_millis() as u64,
        points,
    }))
}

/// How long a reader may wait for the REST API to drain on shutdown.
pub const HTTP_GRACE: Duration = Duration::from_secs(5);
