//! Device identity: enrollment tokens (`/api/v1/enrollments`, admin), the certificates enrolled
//! devices hold (`/api/v1/identities`), and revocation (`/api/v1/devices/{id}/revoke`, admin).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, Path};
use super::state::AppState;
use crate::auth::devices::{DeviceIdentity, EnrollmentInfo};
use crate::auth::{DeviceAuthError, DeviceAuthority, Principal};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(list_enrollments, create_enrollment))
        .routes(routes!(list_identities))
        .routes(routes!(revoke_device))
}

/// An enrollment to make.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({ "device_id": "pi-7", "labels": { "site": "lab" }, "ttl": "24h" }))]
pub struct CreateEnrollment {
    /// The id the device gets (its certificate names it).
    pub device_id: String,
    /// Labels the device reports in its hello.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How long the token can be used (default 24h; 1s to 365d).
    #[serde(default)]
    pub ttl: Option<String>,
}

/// A new enrollment token: shown this once, stored only as a hash.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedEnrollment {
    /// The one-time token for `shoal-agent enroll --token`.
    pub token: String,
    #[serde(flatten)]
    pub info: EnrollmentInfo,
    /// The hub's gRPC URL as agents reach it (when the hub listens on every address, this
    /// host's name).
    pub hub: String,
    /// SHA-256 of the device CA certificate: the agent trusts the hub through it.
    pub ca_sha256: String,
    /// The command to run on the device.
    pub command: String,
}

impl From<DeviceAuthError> for ApiError {
    fn from(e: DeviceAuthError) -> Self {
        let status = match e {
            DeviceAuthError::BadDeviceId(_) | DeviceAuthError::BadTtl(_) => StatusCode::BAD_REQUEST,
            DeviceAuthError::NotEnrolled { .. } => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

fn authority(s: &AppState) -> Result<&DeviceAuthority, ApiError> {
    s.devices.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "device authentication is off on this hub (shoal serve --device-auth none): devices \
             send without certificates, there is nothing to enroll or revoke",
        )
    })
}

/// Makes a one-time enrollment token for a device.
#[utoipa::path(
    post,
    path = "/api/v1/enrollments",
    tag = "devices",
    security(("token" = ["admin"])),
    request_body = CreateEnrollment,
    responses(
        (status = 201, description = "Made; the token is in the answer and nowhere else", body = CreatedEnrollment),
        (status = 400, description = "A bad device id, label or ttl", body = ErrorBody),
        (status = 409, description = "Device authentication is off", body = ErrorBody),
    ),
)]
async fn create_enrollment(
    State(s): State<AppState>,
    Extension(by): Extension<Principal>,
    JsonBody(req): JsonBody<CreateEnrollment>,
) -> Result<(StatusCode, Json<CreatedEnrollment>), ApiError> {
    let devices = authority(&s)?;
    let ttl = match req.ttl.as_deref() {
        None => std::time::Duration::from_secs(24 * 3600),
        Some(t) => humantime::parse_duration(t).map_err(|err| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid ttl {t:?}: {err} (e.g. 24h, 7d)"),
            )
        })?,
    };
    for (k, v) in &req.labels {
        if k.is_empty() || k.len() > 64 || v.len() > 256 {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid label {k:?}: keys are 1-64 bytes, values at most 256"),
            ));
        }
    }
    let (info, token) = devices.create_enrollment(&req.device_id, req.labels, ttl, &by.name)?;
    let ca_sha256 = devices.ca().fingerprint();
    let command = format!(
        "shoal-agent enroll --hub {} --token {token} --ca-sha256 {ca_sha256}",
        s.grpc_url
    );
    Ok((
        StatusCode::CREATED,
        Json(CreatedEnrollment {
            token,
            info,
            hub: s.grpc_url.clone(),
            ca_sha256,
            command,
        }),
    ))
}

/// Every enrollment token (never the secret), used and expired ones included.
#[utoipa::path(
    get,
    path = "/api/v1/enrollments",
    tag = "devices",
    security(("token" = ["admin"])),
    responses((status = 200, description = "Oldest first", body = Vec<EnrollmentInfo>)),
)]
async fn list_enrollments(
    State(s): State<AppState>,
) -> Result<Json<Vec<EnrollmentInfo>>, ApiError> {
    Ok(Json(authority(&s)?.enrollments()?))
}

/// The certificate each enrolled device holds: serial, expiry, renewal, revocation.
#[utoipa::path(
    get,
    path = "/api/v1/identities",
    tag = "devices",
    security(("token" = ["viewer"])),
    responses((status = 200, description = "By device id", body = Vec<DeviceIdentity>)),
)]
async fn list_identities(State(s): State<AppState>) -> Result<Json<Vec<DeviceIdentity>>, ApiError> {
    Ok(Json(authority(&s)?.identities()?))
}

/// Revokes a device: its certificates stop working at its next request (an open stream ends
/// at its next batch). What it stored stays; so does its spool on the device. Enrolling it
/// again lets it back in.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/revoke",
    tag = "devices",
    security(("token" = ["admin"])),
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 200, description = "Revoked (or already was)", body = DeviceIdentity),
        (status = 404, description = "No enrolled device has that id", body = ErrorBody),
    ),
)]
async fn revoke_device(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceIdentity>, ApiError> {
    authority(&s)?;
    let devices = s.devices.clone().expect("checked above");
    let identity = tokio::task::spawn_blocking(move || devices.revoke(&id))
        .await
        .expect("revoke task")?;
    Ok(Json(identity))
}
