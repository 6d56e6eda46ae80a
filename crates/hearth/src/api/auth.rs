//! Bearer tokens on HTTP ([`crate::auth`] says who a token is). No token or an unknown one: 401.
//! A house token asking for another house: 403; for a sensor its house does not have: 404; past
//! its rate (or past the lookups' rate, for a token not looked up lately): 429.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;
pub use crate::auth::{Principal, new_token, stored_admin_token, token_id};

impl Principal {
    /// Refuse anything but the admin token (routes about the installation, not a house).
    pub fn admin(&self) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::House(_) => Err(ApiError::Forbidden(
                "this route is for the admin token".into(),
            )),
        }
    }

    /// Refuse another house than this principal's (403).
    pub fn check(&self, house: &str) -> Result<(), ApiError> {
        if self.allows(house) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this token is not for house {house:?}"
            )))
        }
    }
}

/// Resolve a presented token: 401 when there is none or it is unknown, 429 past a rate
/// ([`crate::auth::Authenticator::admit`]).
pub async fn authenticate(state: &AppState, token: Option<&str>) -> Result<Principal, ApiError> {
    let token = token
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::Unauthorized)?;
    match state.auth.admit(token).await {
        Ok(principal) => principal.ok_or(ApiError::Unauthorized),
        Err(crate::auth::Refused::Unavailable(e)) => Err(e.into()),
        Err(crate::auth::Refused::TooMany { rate, wait }) => {
            crate::metrics::METRICS.api_refused.with(rate).add(1);
            Err(ApiError::TooMany(wait))
        }
    }
}

/// The bearer token of a request: the `Authorization` header, or on the WebSocket alone
/// `?token=` (browsers cannot set headers on a WebSocket; anywhere else a token in the URL ends
/// up in access logs, proxies and browser histories).
pub fn bearer(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION)
        && let Ok(value) = value.to_str()
    {
        return value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(|t| t.trim().to_string());
    }
    // Routers nested under `/api/v1` see the path without it: the request's own is kept aside.
    let path = parts
        .extensions
        .get::<axum::extract::OriginalUri>()
        .map_or(parts.uri.path(), |o| o.0.path());
    if path != WS_PATH {
        return None;
    }
    parts.uri.query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "token")
            .map(|(_, v)| v.to_string())
    })
}

/// The one route that takes `?token=`.
const WS_PATH: &str = "/api/v1/ws";

impl FromRequestParts<std::sync::Arc<AppState>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &std::sync::Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        authenticate(state, bearer(parts).as_deref()).await
    }
}
