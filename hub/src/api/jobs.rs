//! REST for scheduled jobs and their runs, under `/api/v1/jobs` and `/api/v1/runs`.

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::state::AppState;
use crate::jobs::manifest;
use crate::jobs::policy;
use crate::jobs::scheduler::{JobError, job_policy};
use crate::jobs::store::JobRecord;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/jobs", get(list_jobs).post(apply_job))
        .route("/api/v1/jobs/{name}", get(show_job).delete(delete_job))
        .route("/api/v1/jobs/{name}/run", post(run_job))
        .route("/api/v1/jobs/{name}/export", get(export_job))
        .route("/api/v1/jobs/{name}/suspend", post(suspend_job))
        .route("/api/v1/jobs/{name}/resume", post(resume_job))
        .route("/api/v1/runs", get(list_runs))
        .route("/api/v1/runs/{id}", get(show_run))
        .route("/api/v1/runs/{id}/logs", get(run_logs))
        .route("/api/v1/runs/{id}/artifacts", get(list_artifacts))
        .route("/api/v1/runs/{id}/artifacts/{*path}", get(get_artifact))
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        let status = match &e {
            JobError::Invalid(_) => StatusCode::BAD_REQUEST,
            JobError::NotFound(_) => StatusCode::NOT_FOUND,
            JobError::Store(_) | JobError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

fn find_job(s: &AppState, name: &str) -> Result<JobRecord, ApiError> {
    s.job_store
        .jobs()?
        .into_iter()
        .find(|j| j.manifest.metadata.name == name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no job named {name:?}")))
}

fn summary(r: &JobRecord) -> serde_json::Value {
    let spec = &r.manifest.spec;
    let next = manifest::check(r.manifest.clone()).ok().and_then(|def| {
        policy::next_wakeup(&job_policy(&def, None), chrono::Utc::now())
            .map(|t| t.timestamp_millis())
    });
    json!({
        "name": r.manifest.metadata.name,
        "schedule": spec.schedule,
        "time_zone": spec.time_zone.clone().unwrap_or_else(|| "UTC".into()),
        "concurrency_policy": spec.concurrency_policy.clone().unwrap_or_else(|| "Allow".into()),
        "suspend": spec.suspend.unwrap_or(false),
        "created_ms": r.created_ms,
        "last_schedule_ms": r.last_schedule_ms,
        "next_schedule_ms": if spec.suspend.unwrap_or(false) { None } else { next },
    })
}

/// Body: the CronJob manifest, YAML or JSON.
async fn apply_job(
    State(s): State<AppState>,
    body: String,
) -> Result<Json<serde_json::Value>, Response> {
    let def = manifest::parse(&body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": e.to_string(), "field": e.field, "reason": e.reason })),
        )
            .into_response()
    })?;
    let name = def.name().to_string();
    s.jobs
        .apply(def)
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    Ok(Json(json!({ "job": name, "applied": true })))
}

async fn list_jobs(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let jobs = s.job_store.jobs()?;
    Ok(Json(
        json!({ "jobs": jobs.iter().map(summary).collect::<Vec<_>>() }),
    ))
}

async fn show_job(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let record = find_job(&s, &name)?;
    let mut v = summary(&record);
    v["manifest"] = serde_json::to_value(&record.manifest).expect("manifest serialises");
    Ok(Json(v))
}

#[derive(Deserialize)]
struct ExportQuery {
    /// `cronjob` (default) or `job` (the Job a run started now would submit).
    #[serde(default)]
    kind: Option<String>,
}

/// The job as a Kubernetes object (JSON), ready for `kubectl apply -f -`.
async fn export_job(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let record = find_job(&s, &name)?;
    let def = manifest::check(record.manifest)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let value = match q.kind.as_deref().unwrap_or("cronjob") {
        "cronjob" => crate::jobs::kubernetes::cronjob(&def),
        "job" => {
            let now = chrono::Utc::now();
            let id = crate::jobs::scheduler::manual_run_id(&name, now);
            let env = crate::jobs::scheduler::identity_env(&name, &id, &s.hub_url);
            crate::jobs::kubernetes::job(&def, &id, now, &env)
        }
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("kind {other:?} is not cronjob or job"),
            ));
        }
    };
    // JSON, which kubectl takes as is: a YAML emitter would leave timestamp-like strings (the
    // scheduled-timestamp annotation) unquoted, and YAML 1.1 readers take them for dates.
    let mut text = serde_json::to_string_pretty(&value).expect("object serialises");
    text.push('\n');
    Ok(([(header::CONTENT_TYPE, "application/json")], text).into_response())
}

async fn delete_job(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.jobs.delete(&name).await?;
    Ok(Json(json!({ "job": name, "deleted": true })))
}

async fn run_job(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = s.jobs.trigger(&name).await?;
    Ok(Json(json!({ "job": name, "run": id })))
}

async fn suspend_job(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.jobs.set_suspend(&name, true).await?;
    Ok(Json(json!({ "job": name, "suspend": true })))
}

async fn resume_job(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.jobs.set_suspend(&name, false).await?;
    Ok(Json(json!({ "job": name, "suspend": false })))
}

#[derive(Deserialize)]
struct RunsQuery {
    job: Option<String>,
}

async fn list_runs(
    State(s): State<AppState>,
    Query(q): Query<RunsQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(json!({ "runs": s.job_store.runs(q.job.as_deref())? })))
}

async fn show_run(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let run = s
        .job_store
        .run(&id)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no run {id:?}")))?;
    Ok(Json(serde_json::to_value(run).expect("run serialises")))
}

#[derive(Deserialize)]
struct LogQuery {
    attempt: Option<u32>,
}

/// The output of one attempt (default: the last), as plain text.
async fn run_logs(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let run = s
        .job_store
        .run(&id)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no run {id:?}")))?;
    let attempts = run.attempts.len().max(1) as u32;
    let attempt = q.attempt.unwrap_or(attempts);
    if attempt == 0 || attempt > attempts {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("attempt must be between 1 and {attempts}"),
        ));
    }
    let path = s.runs_dir.join(&id).join(format!("attempt-{attempt}.log"));
    let text = tokio::fs::read_to_string(&path).await.unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// The files a run left in its SHOAL_ARTIFACTS_DIR: `{"artifacts": [{"path", "bytes"}]}`.
async fn list_artifacts(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.job_store
        .run(&id)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no run {id:?}")))?;
    let root = s.runs_dir.join(&id).join("artifacts");
    let files = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                match e.metadata() {
                    Ok(m) if m.is_dir() => stack.push(p),
                    Ok(m) => {
                        let rel = p.strip_prefix(&root).unwrap_or(&p);
                        out.push(serde_json::json!({
                            "path": rel.to_string_lossy(),
                            "bytes": m.len(),
                        }));
                    }
                    Err(_) => {}
                }
            }
        }
        out.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
        out
    })
    .await
    .unwrap_or_default();
    Ok(Json(serde_json::json!({ "run": id, "artifacts": files })))
}

/// One artifact's bytes.
async fn get_artifact(
    State(s): State<AppState>,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    s.job_store
        .run(&id)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no run {id:?}")))?;
    if path
        .split('/')
        .any(|p| p.is_empty() || p == ".." || p == ".")
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{path:?} is not a path inside the run's artifacts"),
        ));
    }
    let file = s.runs_dir.join(&id).join("artifacts").join(&path);
    match tokio::fs::read(&file).await {
        Ok(bytes) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
        }
        Err(_) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("run {id} has no artifact {path:?}"),
        )),
    }
}
