//! The provenance ledger: `GET /api/v1/provenance` (any role), `POST /api/v1/provenance`
//! (scientist) with a signed statement's DSSE envelope.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody};
use super::extract::JsonBody;
use super::state::AppState;
use crate::auth::Principal;
use crate::provenance::anchor::{AnchorHealth, Anchorer, EntryAnchor};
use crate::provenance::{ChainCheck, Entry, LedgerError};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default().routes(routes!(list, record))
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::NoKeys => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            LedgerError::Refused(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            }
            LedgerError::Store(s) => s.into(),
        }
    }
}

/// A ledger entry and, when the hub anchors on chain, where it stands there.
#[derive(Serialize, ToSchema)]
pub struct LedgerEntry {
    #[serde(flatten)]
    pub entry: Entry,
    /// `None` when the hub has no chain configured (`--chain-rpc`).
    pub anchor: Option<EntryAnchor>,
}

/// `GET /api/v1/provenance`.
#[derive(Serialize, ToSchema)]
pub struct Ledger {
    /// In append order.
    pub entries: Vec<LedgerEntry>,
    /// The last entry's hash (64 zeros when empty).
    pub head: String,
    /// The whole chain re-checked on this read.
    pub chain: ChainCheck,
    /// Ids of the keys whose statements this hub records.
    pub keys: Vec<String>,
    /// Those keys, for verifiers.
    pub public_keys: Vec<crate::provenance::TrustedKey>,
    /// The chain the hub anchors the ledger on, and how that goes; `None` without one.
    pub anchoring: Option<AnchorHealth>,
}

/// The provenance ledger, its chain re-checked.
#[utoipa::path(
    get,
    path = "/api/v1/provenance",
    tag = "models",
    security(("token" = ["viewer"])),
    responses((status = 200, description = "The ledger", body = Ledger)),
)]
async fn list(State(s): State<AppState>) -> Result<Json<Ledger>, ApiError> {
    let (ledger, anchorer) = (s.ledger.clone(), s.anchorer.clone());
    let (entries, chain, anchors) = tokio::task::spawn_blocking(move || {
        let (entries, chain) = ledger.entries()?;
        let anchors = anchorer.as_ref().map(|a| a.anchors()).transpose()?;
        Ok::<_, crate::store::StoreError>((entries, chain, anchors))
    })
    .await
    .expect("read task")?;
    Ok(Json(Ledger {
        head: entries.last().map_or_else(
            || crate::provenance::GENESIS.to_string(),
            |e| e.hash.clone(),
        ),
        entries: entries
            .into_iter()
            .map(|entry| LedgerEntry {
                anchor: anchors
                    .as_deref()
                    .map(|a| Anchorer::state_of(entry.index, a)),
                entry,
            })
            .collect(),
        chain,
        keys: s.ledger.key_ids(),
        public_keys: s.ledger.public_keys(),
        anchoring: s.anchorer.as_ref().map(|a| a.health()),
    }))
}

/// Records a signed statement (the DSSE envelope `shoal-ml train --signing-key` writes), when
/// a key this hub trusts signed it; the same statement again answers its existing entry (200).
#[utoipa::path(
    post,
    path = "/api/v1/provenance",
    tag = "models",
    security(("token" = ["scientist"])),
    request_body(content = Object, description = "A DSSE envelope over an in-toto statement"),
    responses(
        (status = 201, description = "Recorded", body = Entry),
        (status = 200, description = "Already recorded", body = Entry),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 409, description = "The hub trusts no keys", body = ErrorBody),
        (status = 422, description = "Not signed by a trusted key, tampered with, or not a statement", body = ErrorBody),
    ),
)]
async fn record(
    State(s): State<AppState>,
    Extension(by): Extension<Principal>,
    JsonBody(envelope): JsonBody<Value>,
) -> Result<(StatusCode, Json<Entry>), ApiError> {
    let ledger = s.ledger.clone();
    let (entry, new) = tokio::task::spawn_blocking(move || ledger.append(envelope, &by.name))
        .await
        .expect("append task")?;
    if let Some(a) = &s.anchorer {
        a.wake();
    }
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(entry)))
}
