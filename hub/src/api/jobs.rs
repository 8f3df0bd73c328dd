//! REST for scheduled jobs and their runs, under `/api/v1/jobs` and `/api/v1/runs`.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::{Path, Query, TextBody};
use super::schemas;
use super::state::AppState;
use crate::jobs::manifest::{self, CronJob};
use crate::jobs::policy;
use crate::jobs::scheduler::{JobError, job_policy};
use crate::jobs::store::{JobRecord, RunRecord};

/// The routes and, from their `#[utoipa::path]` annotations, their part of the OpenAPI document.
/// Handlers of one path go in one `routes!`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(list_jobs, apply_job))
        .routes(routes!(show_job, delete_job))
        .routes(routes!(run_job))
        .routes(routes!(export_job))
        .routes(routes!(suspend_job))
        .routes(routes!(resume_job))
        .routes(routes!(list_runs))
        .routes(routes!(show_run))
        .routes(routes!(run_logs))
        .routes(routes!(list_artifacts))
        .routes(routes!(get_artifact))
}

/// A job as listed.
#[derive(Serialize, ToSchema)]
pub struct JobSummary {
    name: String,
    /// Cron expression (Kubernetes' dialect).
    schedule: String,
    /// IANA time zone of the schedule (default `UTC`).
    time_zone: String,
    /// `Allow`, `Forbid` or `Replace`.
    concurrency_policy: String,
    suspend: bool,
    /// When it was first applied, epoch milliseconds.
    created_ms: i64,
    /// The schedule time of the last start, skip or miss (epoch ms); `null` before any.
    #[schema(required)]
    last_schedule_ms: Option<i64>,
    /// The next schedule time (epoch ms); `null` when suspended or never again.
    #[schema(required)]
    next_schedule_ms: Option<i64>,
}

/// `GET /api/v1/jobs`.
#[derive(Serialize, ToSchema)]
pub struct JobList {
    jobs: Vec<JobSummary>,
}

/// A job with the manifest it was applied with.
#[derive(Serialize, ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    summary: JobSummary,
    /// The CronJob manifest as applied.
    #[schema(value_type = schemas::KubernetesObject)]
    manifest: CronJob,
}

/// A manifest the hub refused: which field and why.
#[derive(Serialize, ToSchema)]
pub struct ManifestErrorBody {
    /// What went wrong, and what to do about it.
    error: String,
    /// The refused field, e.g. `spec.schedule` (absent when the body was not text at all).
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    /// Why the field was refused (absent when the body was not text at all).
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Applied {
    job: String,
    applied: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Deleted {
    job: String,
    deleted: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Triggered {
    job: String,
    /// The new run's id.
    run: String,
}

#[derive(Serialize, ToSchema)]
pub struct Suspended {
    job: String,
    /// Whether the job is suspended now.
    suspend: bool,
}

/// `GET /api/v1/runs`: newest first.
#[derive(Serialize, ToSchema)]
pub struct RunList {
    #[schema(value_type = Vec<schemas::RunRecord>)]
    runs: Vec<RunRecord>,
}

/// A file a run left in its `SHOAL_ARTIFACTS_DIR`.
#[derive(Serialize, ToSchema)]
pub struct Artifact {
    /// Relative to the artifacts folder, `/`-separated.
    path: String,
    bytes: u64,
}

/// `GET /api/v1/runs/{id}/artifacts`.
#[derive(Serialize, ToSchema)]
pub struct ArtifactList {
    run: String,
    /// In path order.
    artifacts: Vec<Artifact>,
}

fn not_found_run(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no run {id:?}"))
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

fn summary(r: &JobRecord) -> JobSummary {
    let spec = &r.manifest.spec;
    let next = manifest::check(r.manifest.clone()).ok().and_then(|def| {
        policy::next_wakeup(&job_policy(&def, None), chrono::Utc::now())
            .map(|t| t.timestamp_millis())
    });
    let suspend = spec.suspend.unwrap_or(false);
    JobSummary {
        name: r.manifest.metadata.name.clone(),
        schedule: spec.schedule.clone(),
        time_zone: spec.time_zone.clone().unwrap_or_else(|| "UTC".into()),
        concurrency_policy: spec
            .concurrency_policy
            .clone()
            .unwrap_or_else(|| "Allow".into()),
        suspend,
        created_ms: r.created_ms,
        last_schedule_ms: r.last_schedule_ms,
        next_schedule_ms: if suspend { None } else { next },
    }
}

/// Creates or replaces a job from its CronJob manifest (`batch/v1`), YAML or JSON.
#[utoipa::path(
    post,
    path = "/api/v1/jobs",
    tag = "jobs",
    security(("token" = ["scientist"])),
    request_body(
        description = "The CronJob manifest (the content type is not checked: YAML is a superset of JSON)",
        content(
            (String = "application/yaml"),
            (schemas::KubernetesObject = "application/json"),
        ),
    ),
    responses(
        (status = 200, description = "Applied", body = Applied),
        (status = 400, description = "The manifest was refused (the field and why), or the body is not UTF-8", body = ManifestErrorBody),
        (status = 413, description = "The body is over the size limit (2 MB)", body = ErrorBody),
        (status = 503, description = "The scheduler has stopped or could not store the job", body = ErrorBody),
    ),
)]
async fn apply_job(State(s): State<AppState>, body: TextBody) -> Result<Json<Applied>, Response> {
    let TextBody(body) = body;
    let def = manifest::parse(&body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            Json(ManifestErrorBody {
                error: e.to_string(),
                field: Some(e.field),
                reason: Some(e.reason),
            }),
        )
            .into_response()
    })?;
    let name = def.name().to_string();
    s.jobs
        .apply(def)
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    Ok(Json(Applied {
        job: name,
        applied: true,
    }))
}

/// Every job.
#[utoipa::path(
    get,
    path = "/api/v1/jobs",
    tag = "jobs",
    security(("token" = ["viewer"])),
    responses(
        (status = 200, description = "The jobs", body = JobList),
        (status = 500, description = "The store could not be read", body = ErrorBody),
    ),
)]
async fn list_jobs(State(s): State<AppState>) -> Result<Json<JobList>, ApiError> {
    let jobs = s.job_store.jobs()?;
    Ok(Json(JobList {
        jobs: jobs.iter().map(summary).collect(),
    }))
}

/// One job, with its manifest.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{name}",
    tag = "jobs",
    security(("token" = ["viewer"])),
    params(("name" = String, Path, description = "Job name")),
    responses(
        (status = 200, description = "The job", body = JobDetail),
        (status = 404, description = "No job with this name", body = ErrorBody),
        (status = 500, description = "The store could not be read", body = ErrorBody),
    ),
)]
async fn show_job(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<JobDetail>, ApiError> {
    let record = find_job(&s, &name)?;
    Ok(Json(JobDetail {
        summary: summary(&record),
        manifest: record.manifest,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ExportQuery {
    /// `cronjob` (default) or `job` (the Job a run started now would submit).
    #[serde(default)]
    kind: Option<String>,
}

/// The job as a Kubernetes object (JSON), ready for `kubectl apply -f -`.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{name}/export",
    tag = "jobs",
    security(("token" = ["viewer"])),
    params(("name" = String, Path, description = "Job name"), ExportQuery),
    responses(
        (status = 200, description = "A `batch/v1` CronJob, or Job", body = schemas::KubernetesObject),
        (status = 400, description = "`kind` is not `cronjob` or `job`, or a bad query string", body = ErrorBody),
        (status = 404, description = "No job with this name", body = ErrorBody),
        (status = 500, description = "The store could not be read, or holds a manifest no longer valid", body = ErrorBody),
    ),
)]
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

/// Deletes a job (a running run is cancelled).
#[utoipa::path(
    delete,
    path = "/api/v1/jobs/{name}",
    tag = "jobs",
    security(("token" = ["scientist"])),
    params(("name" = String, Path, description = "Job name")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "No job with this name", body = ErrorBody),
        (status = 503, description = "The scheduler has stopped or could not store the change", body = ErrorBody),
    ),
)]
async fn delete_job(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    s.jobs.delete(&name).await?;
    Ok(Json(Deleted {
        job: name,
        deleted: true,
    }))
}

/// Starts a run of the job now, whatever its schedule.
#[utoipa::path(
    post,
    path = "/api/v1/jobs/{name}/run",
    tag = "jobs",
    security(("token" = ["scientist"])),
    params(("name" = String, Path, description = "Job name")),
    responses(
        (status = 200, description = "The run started", body = Triggered),
        (status = 404, description = "No job with this name", body = ErrorBody),
        (status = 503, description = "The scheduler has stopped or could not store the run", body = ErrorBody),
    ),
)]
async fn run_job(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Triggered>, ApiError> {
    let run = s.jobs.trigger(&name).await?;
    Ok(Json(Triggered { job: name, run }))
}

/// Stops scheduling the job (runs already started go on).
#[utoipa::path(
    post,
    path = "/api/v1/jobs/{name}/suspend",
    tag = "jobs",
    security(("token" = ["scientist"])),
    params(("name" = String, Path, description = "Job name")),
    responses(
        (status = 200, description = "Suspended", body = Suspended),
        (status = 404, description = "No job with this name", body = ErrorBody),
        (status = 503, description = "The scheduler has stopped or could not store the change", body = ErrorBody),
    ),
)]
async fn suspend_job(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Suspended>, ApiError> {
    s.jobs.set_suspend(&name, true).await?;
    Ok(Json(Suspended {
        job: name,
        suspend: true,
    }))
}

/// Schedules the job again.
#[utoipa::path(
    post,
    path = "/api/v1/jobs/{name}/resume",
    tag = "jobs",
    security(("token" = ["scientist"])),
    params(("name" = String, Path, description = "Job name")),
    responses(
        (status = 200, description = "Resumed", body = Suspended),
        (status = 404, description = "No job with this name", body = ErrorBody),
        (status = 503, description = "The scheduler has stopped or could not store the change", body = ErrorBody),
    ),
)]
async fn resume_job(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Suspended>, ApiError> {
    s.jobs.set_suspend(&name, false).await?;
    Ok(Json(Suspended {
        job: name,
        suspend: false,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct RunsQuery {
    /// Only the runs of this job.
    job: Option<String>,
}

/// Runs, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/runs",
    tag = "runs",
    security(("token" = ["viewer"])),
    params(RunsQuery),
    responses(
        (status = 200, description = "The runs", body = RunList),
        (status = 400, description = "A bad query string", body = ErrorBody),
        (status = 500, description = "The store could not be read", body = ErrorBody),
    ),
)]
async fn list_runs(
    State(s): State<AppState>,
    Query(q): Query<RunsQuery>,
) -> Result<Json<RunList>, ApiError> {
    Ok(Json(RunList {
        runs: s.job_store.runs(q.job.as_deref())?,
    }))
}

/// One run.
#[utoipa::path(
    get,
    path = "/api/v1/runs/{id}",
    tag = "runs",
    security(("token" = ["viewer"])),
    params(("id" = String, Path, description = "Run id")),
    responses(
        (status = 200, description = "The run", body = schemas::RunRecord),
        (status = 404, description = "No run with this id", body = ErrorBody),
        (status = 500, description = "The store could not be read", body = ErrorBody),
    ),
)]
async fn show_run(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunRecord>, ApiError> {
    let run = s.job_store.run(&id)?.ok_or_else(|| not_found_run(&id))?;
    Ok(Json(run))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// Which attempt, from 1 (default: the last).
    #[param(minimum = 1)]
    attempt: Option<u32>,
}

/// The output of one attempt (default: the last), as plain text.
#[utoipa::path(
    get,
    path = "/api/v1/runs/{id}/logs",
    tag = "runs",
    security(("token" = ["viewer"])),
    params(("id" = String, Path, description = "Run id"), LogQuery),
    responses(
        (status = 200, description = "The attempt's stdout and stderr (empty when it wrote nothing yet)", body = String, content_type = "text/plain; charset=utf-8"),
        (status = 400, description = "No such attempt, or a bad query string", body = ErrorBody),
        (status = 404, description = "No run with this id", body = ErrorBody),
        (status = 500, description = "The store could not be read", body = ErrorBody),
    ),
)]
async fn run_logs(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let run = s.job_store.run(&id)?.ok_or_else(|| not_found_run(&id))?;
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

/// The files a run left in its SHOAL_ARTIFACTS_DIR.
#[utoipa::path(
    get,
    path = "/api/v1/runs/{id}/artifacts",
    tag = "runs",
    security(("token" = ["viewer"])),
    params(("id" = String, Path, description = "Run id")),
    responses(
        (status = 200, description = "The artifacts (none when the run left none)", body = ArtifactList),
        (status = 404, description = "No run with this id", body = ErrorBody),
        (status = 500, description = "The store could not be read", body = ErrorBody),
    ),
)]
async fn list_artifacts(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ArtifactList>, ApiError> {
    s.job_store.run(&id)?.ok_or_else(|| not_found_run(&id))?;
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
                        out.push(Artifact {
                            path: rel.to_string_lossy().into_owned(),
                            bytes: m.len(),
                        });
                    }
                    Err(_) => {}
                }
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    })
    .await
    .unwrap_or_default();
    Ok(Json(ArtifactList {
        run: id,
        artifacts: files,
    }))
}

/// One artifact's bytes.
// `{*path}` is axum's catch-all; the document names it `{path}` (see `super::finish`).
#[utoipa::path(
    get,
    path = "/api/v1/runs/{id}/artifacts/{*path}",
    tag = "runs",
    security(("token" = ["viewer"])),
    params(
        ("id" = String, Path, description = "Run id"),
        ("path" = String, Path, description = "The file's path in the artifacts folder; may hold `/`"),
    ),
    responses(
        (status = 200, description = "The file", body = inline(schemas::Binary), content_type = "application/octet-stream"),
        (status = 400, description = "The path leaves the artifacts folder (`..`, `.` or an empty segment)", body = ErrorBody),
        (status = 404, description = "No run with this id, or no such file", body = ErrorBody),
        (status = 500, description = "The store could not be read", body = ErrorBody),
    ),
)]
async fn get_artifact(
    State(s): State<AppState>,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    s.job_store.run(&id)?.ok_or_else(|| not_found_run(&id))?;
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
