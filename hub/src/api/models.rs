//! Models and alerts: MLflow's registry as the hub sees it (`/api/v1/models/registry`),
//! deployments (`/api/v1/models/deployments`, scientist to change), the
//! alerts on anomaly scores (`/api/v1/alerts`, operator to acknowledge), and the embedded
//! Open Inference Protocol server at `/v2` (any role), behind the same tokens.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, Path, Query};
use super::state::AppState;
use crate::auth::{Principal, Role};
use crate::models::alerts::{Alert, AlertError};
use crate::models::{DeployError, DeployRequest, Deployment, SeldonDeployed, SeldonRequest};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(list_deployments, deploy))
        .routes(routes!(registry))
        .routes(routes!(undeploy))
        .routes(routes!(deploy_seldon))
        .routes(routes!(list_alerts))
        .routes(routes!(acknowledge))
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        let status = match e {
            DeployError::BadRequest(_) => StatusCode::BAD_REQUEST,
            DeployError::Fetch(_) => StatusCode::BAD_GATEWAY,
            DeployError::Load(_) => StatusCode::UNPROCESSABLE_ENTITY,
            DeployError::NotFound(_) => StatusCode::NOT_FOUND,
            DeployError::Policy(_) => StatusCode::CONFLICT,
            DeployError::Store(_) | DeployError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<AlertError> for ApiError {
    fn from(e: AlertError) -> Self {
        match e {
            AlertError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            AlertError::Resolved(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            AlertError::Store(s) => s.into(),
        }
    }
}

/// `GET /api/v1/models/deployments`.
#[derive(Serialize, ToSchema)]
pub struct DeploymentList {
    pub deployments: Vec<Deployment>,
    /// The model whose deployment scores telemetry ("" when scoring is off).
    pub scoring_model: String,
}

/// The deployed models.
#[utoipa::path(
    get,
    path = "/api/v1/models/deployments",
    tag = "models",
    security(("token" = ["viewer"])),
    responses((status = 200, description = "Deployed models", body = DeploymentList)),
)]
async fn list_deployments(State(s): State<AppState>) -> Json<DeploymentList> {
    Json(DeploymentList {
        deployments: s.models.list(),
        scoring_model: s.models.scoring_model.clone(),
    })
}

/// `GET /api/v1/models/registry`.
#[derive(Serialize, ToSchema)]
pub struct Registry {
    /// The hub's MLflow tracking server (`--mlflow-tracking-uri`); `null` without one, and then
    /// `models` is empty.
    #[schema(required)]
    pub tracking_uri: Option<String>,
    /// By name; each with its newest versions (at most 10).
    pub models: Vec<RegisteredModel>,
}

#[derive(Serialize, ToSchema)]
pub struct RegisteredModel {
    pub name: String,
    pub description: String,
    /// Newest first.
    pub versions: Vec<RegisteredVersion>,
}

/// A registered version and what its training run recorded.
#[derive(Serialize, ToSchema)]
pub struct RegisteredVersion {
    pub version: String,
    /// MLflow's status: `READY`, `PENDING_REGISTRATION` or `FAILED_REGISTRATION`.
    pub status: String,
    pub created_ms: i64,
    /// Where its files are (an artifact URI).
    pub source: String,
    /// The MLflow run that made it ("" when registered without one).
    pub run_id: String,
    /// The run's latest value of each metric (e.g. `holdout_rmse`).
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// The run's parameters (features, target, `dataset_rows`, ...).
    pub params: std::collections::BTreeMap<String, String>,
    /// The run's Shoal tags: the dataset it trained on (`shoal.dataset_uri`, and
    /// `shoal.dataset_sha256`, its manifest's digest), the job and run that trained it.
    pub tags: std::collections::BTreeMap<String, String>,
}

/// MLflow's model registry as the hub's tracking server has it: registered models, their
/// newest versions, and each version's run metrics, parameters and training dataset.
#[utoipa::path(
    get,
    path = "/api/v1/models/registry",
    tag = "models",
    security(("token" = ["viewer"])),
    responses(
        (status = 200, description = "The registry (empty without a tracking server)", body = Registry),
        (status = 502, description = "The tracking server could not be read", body = ErrorBody),
    ),
)]
async fn registry(State(s): State<AppState>) -> Result<Json<Registry>, ApiError> {
    let tracking_uri = s.models.tracking_uri().map(str::to_string);
    let models = match s.models.registry().await {
        None => Vec::new(),
        Some(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("MLflow's registry could not be read: {e}"),
            ));
        }
        Some(Ok(models)) => models
            .into_iter()
            .map(|m| RegisteredModel {
                name: m.name,
                description: m.description,
                versions: m
                    .versions
                    .into_iter()
                    .map(|v| RegisteredVersion {
                        version: v.version,
                        status: v.status,
                        created_ms: v.created_ms,
                        source: v.source,
                        run_id: v.run_id,
                        metrics: v.metrics,
                        params: v.params,
                        tags: v.tags,
                    })
                    .collect(),
            })
            .collect(),
    };
    Ok(Json(Registry {
        tracking_uri,
        models,
    }))
}

/// Deploys a model: fetched from its source (MLflow's registry by default), checked by
/// loading it, kept in the hub's data dir, then served at `/v2` (`to: embedded`) or scored
/// through an external V2 server (`to: v2`). Another version of a deployed model replaces it
/// without dropping requests.
#[utoipa::path(
    post,
    path = "/api/v1/models/deployments",
    tag = "models",
    security(("token" = ["scientist"])),
    request_body = DeployRequest,
    responses(
        (status = 201, description = "Deployed", body = Deployment),
        (status = 400, description = "A bad name, version, source or endpoint", body = ErrorBody),
        (status = 422, description = "The file is not a model the runtime can run", body = ErrorBody),
        (status = 502, description = "The source could not be read (registry, object store, file)", body = ErrorBody),
    ),
)]
async fn deploy(
    State(s): State<AppState>,
    Extension(by): Extension<Principal>,
    JsonBody(req): JsonBody<DeployRequest>,
) -> Result<(StatusCode, Json<Deployment>), ApiError> {
    let d = s.models.deploy(req, &by.name).await?;
    Ok((StatusCode::CREATED, Json(d)))
}

/// Lays a model out in the object store for Seldon Core's servers (Triton's repository and
/// an MLflow Model for MLServer) and writes the Seldon object serving it: a v2 `Model` or a v1
/// `SeldonDeployment`, applied through the Kubernetes API with `apply: true`.
#[utoipa::path(
    post,
    path = "/api/v1/models/seldon",
    tag = "models",
    security(("token" = ["scientist"])),
    request_body = SeldonRequest,
    responses(
        (status = 201, description = "Uploaded, and the object written (or applied)", body = SeldonDeployed),
        (status = 400, description = "A bad name, storage, or apply without a cluster", body = ErrorBody),
        (status = 422, description = "The file is not a model the runtime can run", body = ErrorBody),
        (status = 502, description = "The source, the object store or the Kubernetes API failed", body = ErrorBody),
    ),
)]
async fn deploy_seldon(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<SeldonRequest>,
) -> Result<(StatusCode, Json<SeldonDeployed>), ApiError> {
    let d = s.models.deploy_seldon(req).await?;
    Ok((StatusCode::CREATED, Json(d)))
}

/// Stops serving a model.
#[utoipa::path(
    delete,
    path = "/api/v1/models/deployments/{name}",
    tag = "models",
    security(("token" = ["scientist"])),
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "The deployment that was removed", body = Deployment),
        (status = 404, description = "No such deployment", body = ErrorBody),
    ),
)]
async fn undeploy(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Deployment>, ApiError> {
    Ok(Json(s.models.undeploy(&name)?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AlertsQuery {
    /// Also resolved alerts.
    #[serde(default)]
    all: bool,
}

/// `GET /api/v1/alerts`.
#[derive(Serialize, ToSchema)]
pub struct AlertList {
    /// Newest first.
    pub alerts: Vec<Alert>,
}

/// Alerts on anomaly scores: open and acknowledged ones, or all with `all=true`.
#[utoipa::path(
    get,
    path = "/api/v1/alerts",
    tag = "models",
    security(("token" = ["viewer"])),
    params(AlertsQuery),
    responses(
        (status = 200, description = "Alerts", body = AlertList),
        (status = 400, description = "A bad query", body = ErrorBody),
    ),
)]
async fn list_alerts(
    State(s): State<AppState>,
    Query(q): Query<AlertsQuery>,
) -> Result<Json<AlertList>, ApiError> {
    let alerts = s.alerts.clone();
    let alerts = tokio::task::spawn_blocking(move || alerts.list(q.all))
        .await
        .expect("read task")?;
    Ok(Json(AlertList { alerts }))
}

/// Acknowledges an open alert (it stays open until the device's scores recover).
#[utoipa::path(
    post,
    path = "/api/v1/alerts/{id}/ack",
    tag = "models",
    security(("token" = ["operator"])),
    params(("id" = String, Path, description = "Alert id")),
    responses(
        (status = 200, description = "Acknowledged", body = Alert),
        (status = 404, description = "No such alert", body = ErrorBody),
        (status = 409, description = "The alert is resolved", body = ErrorBody),
    ),
)]
async fn acknowledge(
    State(s): State<AppState>,
    Extension(by): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Alert>, ApiError> {
    Ok(Json(s.alerts.acknowledge(&id, &by.name)?))
}

/// The embedded V2 server's routes (`/v2/…`), open to any role: the protocol has its own
/// specification, so these are not in the hub's OpenAPI document; [`v2_gate`] guards them.
pub fn v2(state: AppState) -> Router<AppState> {
    shoal_ml::serve::http::router(state.models.repo.clone())
        .layer(axum::middleware::from_fn_with_state(state, v2_gate))
}

/// A token with any role (every caller when authentication is off), and the browser checks
/// for a request with a body; inference is not audited (it changes nothing), refusals are.
async fn v2_gate(State(s): State<AppState>, request: Request, next: Next) -> Response {
    let from = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    match super::access::authorize(&s, &method, &path, request.headers(), Role::Viewer, from).await
    {
        Ok(()) => next.run(request).await,
        Err(response) => response.into_response(),
    }
}
