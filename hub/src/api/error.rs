//! The API's error answer: a status and `{"error": "..."}` with a message that says what to do.
//!
//! Requests the extractors refuse (a bad query string, a JSON body of the wrong shape, one over
//! the size limit) get the same form, through the extractors in [`super::extract`].

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection, StringRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::StoreError;

/// An API error: a status and a message that says what to do.
pub struct ApiError(StatusCode, String);

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({ "error": "no device \"pi-7\" has reported to this hub" }))]
pub struct ErrorBody {
    /// What went wrong, and what to do about it.
    pub error: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self(status, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

/// Axum's rejections keep their status (400, 413, 415, 422) and message, in the API's form.
macro_rules! from_rejection {
    ($($rejection:ty),*) => {$(
        impl From<$rejection> for ApiError {
            fn from(r: $rejection) -> Self {
                ApiError(r.status(), r.body_text())
            }
        }
    )*};
}
from_rejection!(
    JsonRejection,
    PathRejection,
    QueryRejection,
    StringRejection
);

pub fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

pub async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such endpoint; the API lives under /api/v1".into(),
    )
}
