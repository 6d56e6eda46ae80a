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

    /// Refuse anything but the admin token (routes about the installation, not a house).
    pub fn admin(&self) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::House(_) => Err(ApiError::Forbidden(
                "this route is for the admin token".into(),
            )),
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

/// The admin token kept in `path` (the data folder's `admin_token`), made there (mode 0600, in a
/// folder made 0700) when missing; whether it was just made. The dashboard keeps the token it
/// was given: one made again at every start would sign everyone out at every restart.
pub fn stored_admin_token(path: &std::path::Path) -> Result<(String, bool), String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Ok(text) = std::fs::read_to_string(path) {
        let token = text.trim().to_string();
        if token.chars().count() >= crate::config::MIN_ADMIN_TOKEN {
            return Ok((token, false));
        }
        return Err(format!(
            "{} holds no admin token of at least {} characters: remove it to have one made",
            path.display(),
            crate::config::MIN_ADMIN_TOKEN
        ));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| format!("cannot prepare {}: {e}", dir.display()))?;
    }
    let (token, _) = new_token();
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        // Another process made it meanwhile: use its token.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::thread::sleep(std::time::Duration::from_millis(50));
            return stored_admin_token(path);
        }
        Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
    };
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok((token, true))
}

pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// A token's public id: the first 6 bytes of its hash, in hex. It names the token in `hearth
/// token list` and `revoke` and tells nothing of the secret.
pub fn token_id(hash: &[u8]) -> String {
    hash.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Compare without telling, by timing, how much of the token matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A token hash's house (none: unknown token) and when it was looked up.
type Lookup = (Option<String>, Instant);

/// House tokens already looked up (hash → house, or none), for a second: a revoked or expired
/// token stops working in every process within that, and a burst of requests costs one lookup.

#[derive(Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<Vec<u8>, Lookup>>,
}

const TOKEN_TTL: Duration = Duration::from_secs(1);

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
