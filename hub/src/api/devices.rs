//! Devices and their telemetry: `/api/v1/devices[/{id}[/samples|/series]]`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use shoal_proto::v1::Sample;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody, bad_request};
use super::extract::{Path, Query};
use super::schemas;
use super::state::AppState;
use crate::registry::{DeviceRecord, Status};
use crate::store::StoreError;
use crate::store::readings::Readings;
use crate::store::series::{self, Bucket, Downsampler};
use crate::store::writer::DeviceState;

/// The routes and, from their `#[utoipa::path]` annotations, their part of the OpenAPI document.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(list_devices))
        .routes(routes!(show_device))
        .routes(routes!(samples))
        .routes(routes!(series_handler))
}

/// A device as the API shows it: its registry record, its status and how far its samples are
/// stored.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceView {
    #[serde(flatten)]
    #[schema(value_type = schemas::DeviceRecord)]
    pub record: DeviceRecord,
    #[schema(value_type = schemas::DeviceStatus)]
    pub status: Status,
    /// Highest seq stored for the device.
    pub stored_up_to_seq: u64,
    /// Its latest anomaly score from the scoring model; `null` until one is scored.
    #[schema(required)]
    pub anomaly: Option<crate::models::scoring::DeviceScore>,
    /// Its newest sample in brief (what the fleet table shows); `null` until one is stored.
    #[schema(required)]
    pub latest: Option<Readings>,
}

/// `GET /api/v1/devices`.
#[derive(Serialize, ToSchema)]
pub struct DeviceList {
    /// Every device that has reported to this hub.
    pub devices: Vec<DeviceView>,
}

/// `GET /api/v1/devices/{id}`: the device and its newest sample.
#[derive(Serialize, ToSchema)]
pub struct DeviceDetail {
    #[serde(flatten)]
    pub view: DeviceView,
    /// The newest stored sample; `null` when none is stored.
    #[schema(value_type = Option<schemas::Sample>, required)]
    pub latest_sample: Option<Sample>,
    /// The seqs stored for it; `null` when none is.
    #[schema(required)]
    pub stored: Option<StoredSeqs>,
}

/// The seqs a device has stored: retention removes the oldest, so `first_seq` rises over time;
/// `missing` counts seqs between the first and the last that never arrived (0 for an agent,
/// whose spool resends until the hub acknowledges).
#[derive(Serialize, ToSchema)]
pub struct StoredSeqs {
    pub first_seq: u64,
    pub last_seq: u64,
    pub samples: u64,
    pub missing: u64,
}

impl StoredSeqs {
    fn of((first_seq, last_seq, samples): (u64, u64, u64)) -> Self {
        Self {
            first_seq,
            last_seq,
            samples,
            missing: (last_seq - first_seq + 1).saturating_sub(samples),
        }
    }
}

fn view(s: &AppState, d: DeviceState, now: i64) -> DeviceView {
    DeviceView {
        status: s.thresholds.status(d.record.last_seen_ms, now),
        stored_up_to_seq: d.max_seq,
        anomaly: s.models.scores.get(&d.record.device_id),
        latest: d.latest.as_deref().cloned(),
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

/// Every device that has reported to this hub.
#[utoipa::path(
    get,
    path = "/api/v1/devices",
    tag = "devices",
    security(("token" = ["viewer"])),
    responses((status = 200, description = "The fleet", body = DeviceList)),
)]
async fn list_devices(State(s): State<AppState>) -> Json<DeviceList> {
    let now = series::now_ms();
    let devices: Vec<DeviceView> = s
        .fleet
        .all()
        .into_iter()
        .map(|d| view(&s, d, now))
        .collect();
    Json(DeviceList { devices })
}

/// One device, with its newest sample.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}",
    tag = "devices",
    security(("token" = ["viewer"])),
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The device", body = DeviceDetail),
        (status = 404, description = "No device with this id has reported to this hub", body = ErrorBody),
        (status = 500, description = "The store could not be read", body = ErrorBody),
    ),
)]
async fn show_device(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceDetail>, ApiError> {
    let d = device(&s, &id)?;
    let key = d.key;
    let store = s.store.clone();
    let (latest_sample, stored) = tokio::task::spawn_blocking(move || store.newest_and_stored(key))
        .await
        .expect("read task")?;
    Ok(Json(DeviceDetail {
        view: view(&s, d, series::now_ms()),
        latest_sample,
        stored: stored.map(StoredSeqs::of),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SamplesQuery {
    /// Read samples with a seq above this one (default 0: from the start).
    #[serde(default)]
    after_seq: u64,
    /// Samples on the page, 1 to 10000 (default 100).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<usize>,
}

/// A page of stored samples, in seq order.
#[derive(Serialize, ToSchema)]
struct SamplesPage {
    device_id: String,
    #[schema(value_type = Vec<schemas::Sample>)]
    samples: Vec<Sample>,
    /// Pass as `after_seq` to read on; `null` when this page reached the end.
    #[schema(required)]
    next_after_seq: Option<u64>,
}

const MAX_PAGE: usize = 10_000;

/// A page of a device's stored samples, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/samples",
    tag = "devices",
    security(("token" = ["viewer"])),
    params(("id" = String, Path, description = "Device id"), SamplesQuery),
    responses(
        (status = 200, description = "A page of samples", body = SamplesPage),
        (status = 400, description = "A bad `limit` or query string", body = ErrorBody),
        (status = 404, description = "No device with this id has reported to this hub", body = ErrorBody),
        (status = 500, description = "The store could not be read", body = ErrorBody),
    ),
)]
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

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SeriesQuery {
    /// The metric, e.g. `cpu_percent` or `disk_used_bytes{mount="/"}`.
    #[param(required = true)]
    metric: Option<String>,
    /// Start: RFC 3339, epoch milliseconds, `now` or a duration back from now (`1h`); default
    /// an hour before `to`.
    from: Option<String>,
    /// End, in the same forms (default now).
    to: Option<String>,
    /// Bucket width, e.g. `1m` (default: from the window's length).
    step: Option<String>,
}

/// One metric of one device, downsampled.
#[derive(Serialize, ToSchema)]
struct SeriesView {
    device_id: String,
    metric: String,
    /// Start of the window, epoch milliseconds.
    from: i64,
    /// End of the window, epoch milliseconds.
    to: i64,
    step_ms: u64,
    /// What the buckets were read from: `1h` or `1m` rollups (when `step` and `from` are whole
    /// hours or minutes; samples after the rollups' frontier are read as they are), or `raw`
    /// samples.
    #[schema(example = "1h")]
    resolution: &'static str,
    /// One per bucket that holds samples, in time order.
    #[schema(value_type = Vec<schemas::Bucket>)]
    points: Vec<Bucket>,
}

/// One metric of a device over a time window, downsampled to buckets of `step`.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/series",
    operation_id = "series",
    tag = "devices",
    security(("token" = ["viewer"])),
    params(("id" = String, Path, description = "Device id"), SeriesQuery),
    responses(
        (status = 200, description = "The series", body = SeriesView),
        (status = 400, description = "A missing or unknown metric, a bad time or step, or a window too large for the step", body = ErrorBody),
        (status = 404, description = "No device with this id has reported to this hub", body = ErrorBody),
        (status = 500, description = "The store could not be read", body = ErrorBody),
    ),
)]
async fn series_handler(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<SeriesQuery>,
) -> Result<Json<SeriesView>, ApiError> {
    let metric = q.metric.filter(|m| !m.is_empty()).ok_or_else(|| {
        bad_request("the `metric` parameter is required, e.g. metric=cpu_percent or metric=disk_used_bytes{mount=\"/\"}")
    })?;
    // A misspelt or unlabelled name would match nothing and look like "no data".
    shoal_proto::metrics::family_of(&metric).map_err(|e| bad_request(e.to_string()))?;
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
    let down = Downsampler::new(from, to, step).map_err(bad_request)?;
    let d = device(&s, &id)?;
    let store = s.store.clone();
    let key = d.key;
    let metric_name = metric.clone();
    let (points, source) = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
        store.series(key, &metric_name, down, from, to)
    })
    .await
    .expect("read task")?;
    Ok(Json(SeriesView {
        device_id: id,
        metric,
        from,
        to,
        step_ms: step.as_millis() as u64,
        resolution: source.name(),
        points,
    }))
}
