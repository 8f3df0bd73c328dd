//! Dataset export: telemetry windows from the store to Parquet in a folder or S3
//! (`POST /api/v1/datasets/export`, `shoal datasets export`).
//!
//! The answer is a stream of JSON lines: `{"progress":{"rows":N,"total":T}}` while rows are
//! written, then `{"manifest":{…}}`, or `{"error":"…"}`. Rows are read on a blocking thread and
//! handed to the writer in chunks, so memory stays at one Parquet file's worth of rows.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::json;
use shoal_ml::dataset::{DatasetWriter, Manifest, Row};
use shoal_ml::store::Location;
use tokio::sync::mpsc;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::JsonBody;
use super::schemas;
use super::state::AppState;
use crate::store::Store;
use crate::store::series;
use crate::store::writer::DeviceState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default().routes(routes!(export))
}

/// What to export, and where to.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({ "since": "24h", "devices": "arch=aarch64", "to": "s3://datasets/pi-fleet" }))]
pub struct ExportRequest {
    /// Start of the window: RFC 3339, epoch ms, or a duration back from now (`1h`).
    pub since: String,
    /// End of the window (default now).
    #[serde(default)]
    pub until: Option<String>,
    /// Which devices: `key=value,key!=value` over labels and `id`, `arch`, `os`, `model`,
    /// `hostname`; all devices when absent.
    #[serde(default)]
    pub devices: Option<String>,
    /// Where to write: a folder on the hub's machine, file:///…, or s3://BUCKET/PREFIX.
    pub to: String,
}

/// A parsed device selector.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Selector(Vec<(String, bool, String)>);

impl Selector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (key, eq, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v.trim_start_matches('='))
            } else {
                return Err(format!(
                    "{term:?} is not key=value or key!=value (e.g. arch=aarch64,site!=lab)"
                ));
            };
            if key.trim().is_empty() {
                return Err(format!("{term:?} has no key"));
            }
            terms.push((key.trim().to_string(), eq, value.trim().to_string()));
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, r: &crate::registry::DeviceRecord) -> bool {
        self.0.iter().all(|(k, eq, v)| {
            let actual = match k.as_str() {
                "id" => Some(r.device_id.as_str()),
                "arch" => Some(r.arch.as_str()),
                "os" => Some(r.os.as_str()),
                "model" => Some(r.hardware_model.as_str()),
                "hostname" => Some(r.hostname.as_str()),
                label => r.labels.get(label).map(String::as_str),
            };
            (actual == Some(v.as_str())) == *eq
        })
    }
}

/// One line of the export's answer (`application/x-ndjson`: one JSON object a line).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportLine {
    /// Rows written so far, of those in the window (an estimate when seqs have gaps): first
    /// `rows: 0`, then every 65,536 rows.
    Progress { rows: u64, total: u64 },
    /// The last line of an export that completed: the manifest it wrote.
    #[schema(value_type = schemas::DatasetManifest)]
    Manifest(Manifest),
    /// The last line of an export that failed; what it wrote is incomplete.
    Error(String),
}

/// Rows handed from the store reader to the writer at a time.
const CHUNK: usize = 8192;
/// A progress line every this many rows.
const PROGRESS_EVERY: u64 = 65_536;

enum Msg {
    /// Rows in the window (an estimate when seqs have gaps).
    Total(u64),
    Rows(Vec<Row>),
}

fn line(v: ExportLine) -> Result<Bytes, std::convert::Infallible> {
    let mut s = serde_json::to_string(&v).expect("line serialises");
    s.push('\n');
    Ok(Bytes::from(s))
}

/// Exports a telemetry window to Parquet.
///
/// Writes Parquet files and a `manifest.json` to a folder on the hub's machine or to S3. The
/// answer streams: progress lines while rows are written, then the manifest, or an error (the
/// status is 200 by then).
#[utoipa::path(
    post,
    path = "/api/v1/datasets/export",
    operation_id = "export_dataset",
    tag = "datasets",
    security(("token" = ["scientist"])),
    request_body = ExportRequest,
    responses(
        (status = 200, description = "A stream of JSON lines, each an `ExportLine`: `progress` lines, then one `manifest` or `error` line", body = ExportLine, content_type = "application/x-ndjson"),
        (status = 400, description = "A bad window, selector or destination, or a body that is not JSON", body = ErrorBody),
        (status = 413, description = "The body is over the size limit (2 MB)", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 422, description = "The JSON does not fit `ExportRequest` (a missing or unknown field)", body = ErrorBody),
    ),
)]
pub async fn export(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<ExportRequest>,
) -> Result<Response, ApiError> {
    let plan = plan_export(&s, req)?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(16);
    tokio::spawn(run_export(s.store.clone(), plan, tx));
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .expect("response"))
}

/// The answer's lines, on their way to the response body.
type LineSender = mpsc::Sender<Result<Bytes, std::convert::Infallible>>;

/// A checked export request: the window, the devices it covers, and where to write.
struct ExportPlan {
    from: i64,
    to: i64,
    /// The selected devices, sorted by id.
    devices: Vec<DeviceState>,
    location: Location,
    /// What the manifest records about the request.
    source: serde_json::Value,
}

/// Checks the request's window, selector and destination, and picks the devices (400 if bad).
fn plan_export(s: &AppState, req: ExportRequest) -> Result<ExportPlan, ApiError> {
    let bad = |field: &str, reason: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid {field}: {reason}"),
        )
    };
    let now = series::now_ms();
    let from = series::parse_time(&req.since, now).map_err(|e| bad("since", e))?;
    let to = match &req.until {
        Some(t) => series::parse_time(t, now).map_err(|e| bad("until", e))?,
        None => now,
    };
    if from >= to {
        return Err(bad(
            "since",
            "the window is empty: since must be before until".into(),
        ));
    }
    let selector =
        Selector::parse(req.devices.as_deref().unwrap_or("")).map_err(|e| bad("devices", e))?;
    let location = Location::parse(&req.to).map_err(|e| bad("to", e.to_string()))?;
    let mut devices: Vec<_> = s
        .fleet
        .all()
        .into_iter()
        .filter(|d| selector.matches(&d.record))
        .collect();
    devices.sort_by(|a, b| a.record.device_id.cmp(&b.record.device_id));
    let source = json!({
        "since": req.since, "until": req.until, "from_ms": from, "to_ms": to,
        "devices": req.devices, "hub": s.hub_url,
    });
    Ok(ExportPlan {
        from,
        to,
        devices,
        location,
        source,
    })
}

/// Runs an export to its end, sending progress lines and then the manifest or the error.
async fn run_export(store: Store, plan: ExportPlan, tx: LineSender) {
    let ExportPlan {
        from,
        to,
        devices,
        location,
        source,
    } = plan;
    let (rows_tx, rows_rx) = mpsc::channel::<Msg>(4);
    let reader =
        tokio::task::spawn_blocking(move || read_rows(&store, &devices, from, to, rows_tx));
    let mut writer = DatasetWriter::new(location);
    // Dropping `rows_rx` on the way out lets a reader blocked on a full channel finish.
    let mut result = write_rows(&mut writer, rows_rx, &tx).await;
    if let Ok(Err(e)) = reader.await
        && result.is_ok()
    {
        result = Err(e);
    }
    let outcome = match result {
        Ok(()) => writer.finish(source).await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    if let Err(e) = &outcome {
        tracing::warn!(error = %e, "dataset export failed");
    }
    let _ = tx
        .send(line(match outcome {
            Ok(manifest) => ExportLine::Manifest(manifest),
            Err(e) => ExportLine::Error(e),
        }))
        .await;
}

/// Reads the window's rows from the store (blocking): the total first, then chunks of `CHUNK`.
fn read_rows(
    store: &Store,
    devices: &[DeviceState],
    from: i64,
    to: i64,
    rows_tx: mpsc::Sender<Msg>,
) -> Result<(), String> {
    // Retention leaves the window alone until every row is read.
    let _hold = store.hold(
        format!(
            "a dataset export of {} device(s) from {}",
            devices.len(),
            crate::store::series::rfc3339_ms(from)
        ),
        from,
    );
    let total: u64 = devices
        .iter()
        .map(|d| store.count_time_range(d.key, from, to).unwrap_or(0))
        .sum();
    let _ = rows_tx.blocking_send(Msg::Total(total));
    let mut chunk = Vec::with_capacity(CHUNK);
    for d in devices {
        let id = d.record.device_id.clone();
        store
            .scan_time_range(d.key, from, to, |sample| {
                chunk.push(Row::from_sample(&id, sample.seq, sample));
                if chunk.len() == CHUNK {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                    let _ = rows_tx.blocking_send(Msg::Rows(full));
                }
            })
            .map_err(|e| format!("reading the store: {e}"))?;
    }
    if !chunk.is_empty() {
        let _ = rows_tx.blocking_send(Msg::Rows(chunk));
    }
    Ok(())
}

/// Writes the reader's rows: a progress line once the total is known, then every `PROGRESS_EVERY`.
async fn write_rows(
    writer: &mut DatasetWriter,
    mut rows_rx: mpsc::Receiver<Msg>,
    tx: &LineSender,
) -> Result<(), String> {
    let (mut total, mut reported) = (0u64, 0u64);
    while let Some(msg) = rows_rx.recv().await {
        let rows = match msg {
            Msg::Total(t) => {
                total = t;
                let _ = tx.send(line(ExportLine::Progress { rows: 0, total })).await;
                continue;
            }
            Msg::Rows(rows) => rows,
        };
        for row in rows {
            writer.push(row).await.map_err(|e| e.to_string())?;
        }
        if writer.rows() - reported >= PROGRESS_EVERY {
            reported = writer.rows();
            let _ = tx
                .send(line(ExportLine::Progress {
                    rows: reported,
                    total: total.max(reported),
                }))
                .await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::DeviceRecord;

    fn device(id: &str, arch: &str, labels: &[(&str, &str)]) -> DeviceRecord {
        DeviceRecord {
            device_id: id.into(),
            hostname: String::new(),
            arch: arch.into(),
            os: String::new(),
            kernel: String::new(),
            hardware_model: String::new(),
            agent_version: String::new(),
            gpu_driver_version: String::new(),
            cuda_version: String::new(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            first_seen_ms: 0,
            last_seen_ms: 0,
        }
    }

    #[test]
    fn selectors_match_labels_and_identity() {
        let pi = device("pi-1", "aarch64", &[("site", "lab")]);
        let gpu = device("gpu-1", "x86_64", &[]);
        let sel = Selector::parse("arch=aarch64").unwrap();
        assert!(sel.matches(&pi) && !sel.matches(&gpu));
        let sel = Selector::parse("site!=lab").unwrap();
        assert!(
            !sel.matches(&pi) && sel.matches(&gpu),
            "a missing label is not equal"
        );
        let sel = Selector::parse("id=gpu-1, arch==x86_64").unwrap();
        assert!(sel.matches(&gpu) && !sel.matches(&pi));
        assert!(
            Selector::parse("").unwrap().matches(&pi),
            "empty: every device"
        );
        assert!(Selector::parse("arch").is_err());
        assert!(Selector::parse("=x").is_err());
    }
}
