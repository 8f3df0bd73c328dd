//! Devices and their telemetry: `/api/v1/devices[/{id}[/samples|/series]]`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use shoal_proto::v1::Sample;

use super::error::{ApiError, bad_request};
use super::state::AppState;
use crate::registry::{DeviceRecord, Status};
use crate::store::StoreError;
use crate::store::series::{self, Bucket, Downsampler};
use crate::store::writer::DeviceState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/devices/{id}", get(show_device))
        .route("/api/v1/devices/{id}/samples", get(samples))
        .route("/api/v1/devices/{id}/series", get(series_handler))
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
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no device {id:?} has reported to this hub"),
        )
    })
}

async fn list_devices(State(s): State<AppState>) -> Json<serde_json::Value> {
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
