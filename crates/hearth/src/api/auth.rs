//! Bearer tokens. The admin token (config `admin_token`) sees every house; a house token, made by
//! `hearth token create --house H` and stored as its SHA-256, sees only its house. No token or an
//! unknown one: 401. A house token asking for another house: 403 (or 404 where the route names a
//! sensor, so as not to tell which sensors exist elsewhere).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use super::AppState;
use super::error::ApiError;

/// Who is asking.
#[derive(Debug, Clone, PartialEq)]
pub enum Principal {
    Admin,
    House(String),
}

impl Principal {
    /// May this principal see `house`?
    pub fn allows(&self, house: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::House(h) => h == house,
        }
    }

    pub fn check(&self, house: &str) -> Result<(), ApiError> {
        if self.allows(house) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this token is not for house {house:?}"
            )))
        }
    }

    pub fn name(&self) -> String {
        match self {
            Principal::Admin => "admin".into(),
            Principal::House(h) => format!("house:{h}"),
        }
    }
}

/// A new house token, and the hash to store.
pub fn new_token() -> (String, Vec<u8>) {
    let token = format!(
        "hth_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let hash = hash(&token);
    (token, hash)
}

pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Compare without telling, by timing, how much of the token matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// House tokens already looked up (hash → house, or none), for a minute.
/// A token hash's house (none: unknown token) and when it was looked up.
type Lookup = (Option<String>, Instant);

#[derive(Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<Vec<u8>, Lookup>>,
}

const TOKEN_TTL: Duration = Duration::from_secs(60);

impl TokenCache {
    fn get(&self, hash: &[u8]) -> Option<Option<String>> {
        let entries = self.entries.lock().ok()?;
        entries
            .get(hash)
            .filter(|(_, at)| at.elapsed() < TOKEN_TTL)
            .map(|(house, _)| house.clone())
    }

    fn put(&self, hash: Vec<u8>, house: Option<String>) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() > 10_000 {
                entries.clear();
            }
            entries.insert(hash, (house, Instant::now()));
        }
    }
}

/// Resolve a presented token.
pub async fn authenticate(state: &AppState, token: Option<&str>) -> Result<Principal, ApiError> {
    let token = token
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::Unauthorized)?;
    if same(token.as_bytes(), state.admin_token.as_bytes()) {
        return Ok(Principal::Admin);
    }
    let hash = hash(token);
    let house = match state.tokens.get(&hash) {
        Some(house) => house,
        None => {
            let house = state.seams.store.token_house(&hash).await?;
            state.tokens.put(hash, house.clone());
            house
        }
    };
    house.map(Principal::House).ok_or(ApiError::Unauthorized)
}

/// The bearer token of a request: the `Authorization` header, or `?token=` (browsers cannot set
/// headers on a WebSocket).
pub fn bearer(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION)
        && let Ok(value) = value.to_str()
    {
        return value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(|t| t.trim().to_string());
    }
    parts.uri.query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "token")
            .map(|(_, v)| v.to_string())
    })
}

impl FromRequestParts<std::sync::Arc<AppState>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &std::sync::Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        authenticate(state, bearer(parts).as_deref()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_hashed() {
        let (a, ha) = new_token();
        let (b, _) = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with("hth_") && a.len() == 68);
        assert_eq!(ha, hash(&a));
        assert_eq!(ha.len(), 32);
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"abc", b"ab"));
    }
}
