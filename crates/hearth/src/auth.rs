//! Who is asking, for every way in that takes credentials (the HTTP API, the WebSocket, the
//! embedded MQTT broker): the admin token, which sees every house, or a house token, made by
//! `hearth token create --house H` and stored as its SHA-256 only, which sees its house alone.
//! A token's house is looked up in the store at most once a second per process, so a revoked or
//! expired token stops working everywhere within a second.
//!
//! Rates are bounded too, per process: the store lookups of tokens never seen or unknown
//! (`token_lookups_per_second`, API requests and MQTT logins alike; a token seen as a house's is
//! looked up again each second freely), so that a flood of made-up tokens costs the store no
//! more than that and cannot crowd the real ones out, and the API requests of each house token
//! (`api_requests_per_second` after a burst of `api_request_burst`, [`Authenticator::admit`]).
//! The admin token is not limited.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::rate::{Bucket, Buckets, Rate};
use crate::seam::{EventStore, Unavailable};

/// Who is asking.
#[derive(Debug, Clone, PartialEq)]
pub enum Principal {
    Admin,
    House(String),
}

impl Principal {
    /// May this principal see (and write into) `house`?
    pub fn allows(&self, house: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::House(h) => h == house,
        }
    }

    pub fn name(&self) -> String {
        match self {
            Principal::Admin => "admin".into(),
            Principal::House(h) => format!("house:{h}"),
        }
    }
}

/// Tells who a token is: the admin token of the configuration, or a house token of the store.
pub struct Authenticator {
    admin: String,
    store: Arc<dyn EventStore>,
    cache: TokenCache,
    rates: Rates,
}

/// Why [`Authenticator::admit`] turned a request away before answering it.
#[derive(Debug)]
pub enum Refused {
    Unavailable(Unavailable),
    /// Past a rate (`requests`: the token's own; `lookups`: the store lookups'): how long until
    /// one more is taken.
    TooMany {
        rate: &'static str,
        wait: Duration,
    },
}

impl From<Unavailable> for Refused {
    fn from(e: Unavailable) -> Self {
        Refused::Unavailable(e)
    }
}

impl Authenticator {
    /// `requests`: each house token's requests; `lookups`: the store lookups of tokens not in
    /// the cache (both per process, for [`Authenticator::admit`]).
    pub fn new(
        admin: String,
        store: Arc<dyn EventStore>,
        requests: Rate,
        lookups: Rate,
    ) -> Authenticator {
        Authenticator {
            admin,
            store,
            cache: TokenCache::default(),
            rates: Rates {
                per_token: Buckets::new(requests),
                lookups,
                lookup_bucket: Mutex::new(Bucket::full(lookups, Instant::now())),
            },
        }
    }

    /// The principal of `token`, or none for a token that is unknown, expired or revoked (a
    /// login: the embedded broker's CONNECT). A token never seen, or unknown when last looked up,
    /// is refused past the lookups' rate.
    pub async fn principal(&self, token: &str) -> Result<Option<Principal>, Refused> {
        Ok(self.resolve(token).await?.map(|(p, _)| p))
    }

    /// [`Authenticator::principal`] of an API request, also within its token's rate.
    pub async fn admit(&self, token: &str) -> Result<Option<Principal>, Refused> {
        let Some((principal, hash)) = self.resolve(token).await? else {
            return Ok(None);
        };
        if let Some(hash) = hash
            && let Err(refused) = self.rates.request(hash)
        {
            if let Principal::House(h) = &principal {
                crate::rate::held_back(h, "api_requests_per_second");
            }
            return Err(refused);
        }
        Ok(Some(principal))
    }

    /// The principal of `token` and, for a house token, its hash.
    async fn resolve(&self, token: &str) -> Result<Option<(Principal, Option<Vec<u8>>)>, Refused> {
        if token.is_empty() || token.len() > MAX_TOKEN {
            return Ok(None);
        }
        if !self.admin.is_empty() && same(token.as_bytes(), self.admin.as_bytes()) {
            return Ok(Some((Principal::Admin, None)));
        }
        let hash = hash(token);
        let house = match self.cache.get(&hash) {
            Some(Cached::Fresh(house)) => house,
            cached => {
                // A token that was a house's when last looked up is looked up again freely; only
                // one never seen, or unknown then, spends the lookups' allowance, so that made-up
                // tokens cannot crowd the real ones out.
                if !matches!(cached, Some(Cached::Stale(Some(_)))) {
                    self.rates.lookup()?;
                }
                let house = self.store.token_house(&hash).await?;
                self.cache.put(hash.clone(), house.clone());
                house
            }
        };
        Ok(house.map(|h| (Principal::House(h), Some(hash))))
    }
}

/// The buckets: one per house token that made a request lately, one for the lookups.
struct Rates {
    per_token: Buckets<Vec<u8>>,
    lookups: Rate,
    lookup_bucket: Mutex<Bucket>,
}

impl Rates {
    fn request(&self, hash: Vec<u8>) -> Result<(), Refused> {
        self.per_token.take(hash).map_err(|wait| Refused::TooMany {
            rate: "requests",
            wait,
        })
    }

    fn lookup(&self) -> Result<(), Refused> {
        let mut bucket = self.lookup_bucket.lock().unwrap_or_else(|p| p.into_inner());
        bucket
            .take(self.lookups, Instant::now())
            .map_err(|wait| Refused::TooMany {
                rate: "lookups",
                wait,
            })
    }
}

/// Longer presented tokens are not even hashed.
const MAX_TOKEN: usize = 1024;

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

/// A CSP source for an inline script or style: `sha256-` and the base64 of its SHA-256.
pub fn csp_hash(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let digest = Sha256::digest(text.as_bytes());
    let mut out = String::from("sha256-");
    for chunk in digest.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
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

/// House tokens already looked up (hash → house, or none), trusted for a second: a revoked or
/// expired token stops working in every process within that, and a burst of requests costs one
/// lookup. Older entries are kept to tell a token seen as a house's from one never seen
/// ([`Authenticator::admit`]'s lookups' rate).
#[derive(Default)]
struct TokenCache {
    entries: Mutex<HashMap<Vec<u8>, Lookup>>,
}

/// A cache entry: looked up within [`TOKEN_TTL`], or before.
enum Cached {
    Fresh(Option<String>),
    Stale(Option<String>),
}

const TOKEN_TTL: Duration = Duration::from_secs(1);

/// Entries kept before the unknown tokens' are let go (the houses' are bounded by the tokens
/// made; the unknown ones by nothing but this).
const TOKENS_KEPT: usize = 10_000;

impl TokenCache {
    fn get(&self, hash: &[u8]) -> Option<Cached> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(hash)
            .map(|(house, at)| match at.elapsed() < TOKEN_TTL {
                true => Cached::Fresh(house.clone()),
                false => Cached::Stale(house.clone()),
            })
    }

    fn put(&self, hash: Vec<u8>, house: Option<String>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= TOKENS_KEPT && !entries.contains_key(&hash) {
            entries.retain(|_, (house, _)| house.is_some());
            if entries.len() >= TOKENS_KEPT {
                entries.clear();
            }
        }
        entries.insert(hash, (house, Instant::now()));
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
        assert_eq!(token_id(&ha).len(), 12);
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"abc", b"ab"));
    }

    #[test]
    fn the_token_cache_lets_unknown_tokens_go_first() {
        let cache = TokenCache::default();
        cache.put(vec![0], Some("h1".into()));
        for i in 1..TOKENS_KEPT as u32 {
            cache.put(i.to_be_bytes().to_vec(), None);
        }
        // Full: one more lets every unknown token go, the house's stays.
        cache.put(u32::MAX.to_be_bytes().to_vec(), None);
        let entries = cache.entries.lock().unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries.contains_key(&vec![0]));
    }

    #[test]
    fn csp_hashes_are_base64_sha256() {
        // printf 'abc' | openssl dgst -sha256 -binary | base64
        assert_eq!(
            csp_hash("abc"),
            "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
        );
    }

    #[test]
    fn an_admin_token_is_made_once_kept_private_and_used_again() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("hearth-admin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("data/admin_token");
        let (made, fresh) = stored_admin_token(&path).unwrap();
        assert!(fresh && made.len() >= crate::config::MIN_ADMIN_TOKEN);
        let (again, fresh) = stored_admin_token(&path).unwrap();
        assert_eq!((again.as_str(), fresh), (made.as_str(), false));
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.join("data")), 0o700);
        std::fs::write(&path, "short").unwrap();
        assert!(stored_admin_token(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
