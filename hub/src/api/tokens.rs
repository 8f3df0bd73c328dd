//! Who may use the API: API tokens (`/api/v1/tokens`, admin), the caller's own identity
//! (`/api/v1/whoami`) and the audit log (`/api/v1/audit`, admin).

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, Path, Query};
use super::state::AppState;
use crate::auth::audit::Outcome;
use crate::auth::tokens::{TokenError, TokenInfo};
use crate::auth::{AuditEntry, Principal, Role};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(whoami))
        .routes(routes!(audit))
}

/// A token to make.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({ "name": "ci-nightly", "role": "scientist", "expires_in": "30d" }))]
pub struct CreateToken {
    /// Unique among active tokens: letters, digits, `.`, `_`, `-`.
    pub name: String,
    pub role: Role,
    /// How long it works (`30d`, `12h`); never expires when absent.
    #[serde(default)]
    pub expires_in: Option<String>,
}

/// A new token: shown this once, stored only as a hash.
#[derive(Debug, Serialize, ToSchema)]
pub struct Created {
    /// The token to send as `Authorization: Bearer TOKEN`.
    pub token: String,
    #[serde(flatten)]
    pub info: TokenInfo,
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        let status = match e {
            TokenError::BadName(_) => StatusCode::BAD_REQUEST,
            TokenError::NameTaken(_) => StatusCode::CONFLICT,
            TokenError::NotFound(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// Makes an API token.
#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    tag = "access",
    security(("token" = ["admin"])),
    request_body = CreateToken,
    responses(
        (status = 201, description = "Made; the token is in the answer and nowhere else", body = Created),
        (status = 400, description = "A bad name, role or expiry", body = ErrorBody),
        (status = 409, description = "An active token has that name", body = ErrorBody),
    ),
)]
async fn create_token(
    State(s): State<AppState>,
    Extension(by): Extension<Principal>,
    JsonBody(req): JsonBody<CreateToken>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let expires_in = req
        .expires_in
        .as_deref()
        .map(|e| {
            humantime::parse_duration(e).map_err(|err| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("invalid expires_in {e:?}: {err} (e.g. 30d, 12h)"),
                )
            })
        })
        .transpose()?;
    let (info, token) = s
        .auth
        .tokens
        .create(&req.name, req.role, expires_in, &by.name)?;
    Ok((StatusCode::CREATED, Json(Created { token, info })))
}

/// Every token (never the secret), revoked and expired ones included.
#[utoipa::path(
    get,
    path = "/api/v1/tokens",
    tag = "access",
    security(("token" = ["admin"])),
    responses((status = 200, description = "Oldest first", body = Vec<TokenInfo>)),
)]
async fn list_tokens(State(s): State<AppState>) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    Ok(Json(s.auth.tokens.list()?))
}

/// Revokes a token by id (or by the name of an active one): it opens nothing from the next
/// request on.
#[utoipa::path(
    delete,
    path = "/api/v1/tokens/{id}",
    tag = "access",
    security(("token" = ["admin"])),
    params(("id" = String, Path, description = "The token's id, or an active token's name")),
    responses(
        (status = 200, description = "Revoked (or already was)", body = TokenInfo),
        (status = 404, description = "No such token", body = ErrorBody),
    ),
)]
async fn revoke_token(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TokenInfo>, ApiError> {
    Ok(Json(s.auth.tokens.revoke(&id)?))
}

/// Who the caller is, and with which role.
#[utoipa::path(
    get,
    path = "/api/v1/whoami",
    tag = "access",
    security(("token" = ["viewer"])),
    responses((status = 200, description = "The caller", body = Principal)),
)]
async fn whoami(Extension(p): Extension<Principal>) -> Json<Principal> {
    Json(p)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Most entries returned, the latest ones (default 100, at most 10000).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Only `allowed` or only `denied`.
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// Only this actor (`token:NAME`, `anonymous`, `unauthenticated`).
    #[serde(default)]
    pub actor: Option<String>,
}

/// The audit log: every change and every refusal, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/audit",
    tag = "access",
    security(("token" = ["admin"])),
    params(AuditQuery),
    responses(
        (status = 200, description = "The latest entries that match, oldest first", body = Vec<AuditEntry>),
        (status = 400, description = "A bad query", body = ErrorBody),
    ),
)]
async fn audit(
    State(s): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if limit > 10_000 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "limit must be at most 10000",
        ));
    }
    let log = s.auth.audit.clone();
    let entries = tokio::task::spawn_blocking(move || {
        log.read(limit, |e| {
            q.outcome.is_none_or(|o| o == e.outcome)
                && q.actor.as_deref().is_none_or(|a| a == e.actor)
        })
    })
    .await
    .expect("audit reader")
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the audit log: {e}"),
        )
    })?;
    Ok(Json(entries))
}
