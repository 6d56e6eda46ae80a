//! The API's errors: one enum, each variant a status code, rendered as the JSON of CONTRACT §5,
//! `{"error": "...", "detail": "..."}`. A handler never answers 500 for what a client sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The request is larger than the API takes (bytes or readings).
    #[error("{0}")]
    TooLarge(String),
    /// The request (headers and body) took longer than the server waits.
    #[error("{0}")]
    Timeout(String),
    /// A dependency is down or the queue is full: try again later.
    #[error("{0}")]
    Unavailable(String),
    /// Past a rate (a house token's requests, or the lookups of unknown tokens): try again
    /// after this.
    #[error("too many requests: try again in {} s", retry_after(*.0))]
    TooMany(std::time::Duration),
    /// Past a bound on what a house holds at once (its push clients): try again once one left.
    #[error("{0}")]
    Crowded(String),
}

/// Whole seconds to wait, rounded up, at least one (`Retry-After` has no fractions).
fn retry_after(wait: std::time::Duration) -> u64 {
    u64::try_from(wait.as_nanos().div_ceil(1_000_000_000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A short, stable code: bad_request, unauthorized, forbidden, not_found, conflict,
    /// too_large, timeout, unavailable, too_many_requests.
    pub error: String,
    /// What went wrong, for people.
    pub detail: String,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::TooMany(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            ApiError::Crowded(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_clients"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        // Try again later: in a second (a dependency down, the queue full), or once the rate
        // allows.
        let wait = match &self {
            ApiError::Unavailable(_) => Some(1),
            ApiError::TooMany(wait) => Some(retry_after(*wait)),
            _ => None,
        };
        let body = Json(ErrorBody {
            error: code.into(),
            detail: self.to_string(),
        });
        let mut response = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(wait) = wait {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(wait),
            );
        }
        response
    }
}

impl From<crate::servers::store::StoreError> for ApiError {
    fn from(e: crate::servers::store::StoreError) -> Self {
        tracing::warn!(error = %e, "database error in the API");
        ApiError::Unavailable(format!("database: {e}"))
    }
}

impl From<crate::servers::queue::QueueError> for ApiError {
    fn from(e: crate::servers::queue::QueueError) -> Self {
        tracing::warn!(error = %e, "redis error in the API");
        ApiError::Unavailable(format!("redis: {e}"))
    }
}

impl From<crate::seam::Unavailable> for ApiError {
    fn from(e: crate::seam::Unavailable) -> Self {
        tracing::warn!(error = %e, "dependency error in the API");
        ApiError::Unavailable(e.0)
    }
}
