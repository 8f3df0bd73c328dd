//! Axum's extractors, answering a request they refuse with the API's `{"error": "..."}` form
//! (and axum's status and message) instead of axum's plain text, so every error the API
//! documents has one shape.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// [`axum::extract::Query`]: 400 on a query string that does not fit `T`.
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Query(v) =
            axum::extract::Query::from_request_parts(parts, state).await?;
        Ok(Self(v))
    }
}

/// [`axum::extract::Path`]: 400 on a segment that is not valid UTF-8 once decoded.
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(v) = axum::extract::Path::from_request_parts(parts, state).await?;
        Ok(Self(v))
    }
}

/// [`axum::Json`] as a request body: 400 (not JSON), 413 (over the body limit), 415 (no JSON
/// content type), 422 (JSON of the wrong shape).
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(v) = axum::Json::from_request(req, state).await?;
        Ok(Self(v))
    }
}

/// The body as text: 400 (not UTF-8), 413 (over the body limit).
pub struct TextBody(pub String);

impl<S> FromRequest<S> for TextBody
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Ok(Self(String::from_request(req, state).await?))
    }
}
