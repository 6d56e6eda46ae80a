//! The process roles of SPEC §4 (`up`, `ingest`, `worker`) and what each checks before it
//! starts: the schema is migrated, the lanes' consumer groups exist, the shard count has not
//! changed under queued events. A server that is down at start is waited for with backoff, as it
//! would be later: no role exits because Redis, PostgreSQL or the broker is away.

use std::future::Future;
use std::sync::Arc;

use tracing::warn;

use crate::alerts::rules::RuleSet;
use crate::backoff::Backoff;
use crate::config::Config;
use crate::queue::{Queue, QueueError};
use crate::shutdown::Shutdown;
use crate::{api, ingest, store, worker};

/// Why a role could not run: a bad configuration (exit code 2) or anything else (1).
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Runtime(#[from] anyhow::Error),
}

/// Retry `f` with backoff until it succeeds; `None` on shutdown.
pub async fn retry<T, E, Fut>(
    what: &str,
    shutdown: &Shutdown,
    mut f: impl FnMut() -> Fut,
) -> Option<T>
where
    E: std::fmt::Display,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(5),
    );
    loop {
        match f().await {
            Ok(v) => return Some(v),
            Err(e) => {
                if backoff.attempts() % 10 == 0 {
                    warn!(error = %e, "{what} failed, retrying");
                }
                if !shutdown.clone().sleep(backoff.next_delay()).await {
                    return None;
                }
            }
        }
    }
}

async fn prepare_store(config: &Config, shutdown: &Shutdown) -> bool {
    retry("migrating the database", shutdown, || {
        store::migrate(&config.database_url)
    })
    .await
    .is_some()
}

async fn prepare_queue(config: &Config, shutdown: &Shutdown) -> Result<bool, RoleError> {
    let queue = Queue::open(&config.redis_url, &config.redis_prefix, config.shards)
        .map_err(|e| RoleError::Config(e.to_string()))?;
    let checked = retry("preparing the redis streams", shutdown, || async {
        queue.ensure_groups().await?;
        match queue.check_shards().await {
            Err(e @ QueueError::ShardsChanged { .. }) => Ok(Err(e)),
            Err(e) => Err(e),
            Ok(()) => Ok(Ok(())),
        }
    })
    .await;
    match checked {
        None => Ok(false),
        Some(Err(e)) => Err(RoleError::Config(e.to_string())),
        Some(Ok(())) => Ok(true),
    }
}

/// What a role's HTTP server serves.
#[derive(Clone, Copy, PartialEq)]
enum Http {
    /// The whole API (`up`, `api`).
    Api,
    /// `/metrics` and `/healthz` (`ingest`, `worker`).
    Metrics,
}

/// Start the HTTP server of a role on `addr` (nothing when `addr` is empty). Binding happens
/// now, so a taken port is an error at start, not later.
async fn http(
    config: &Arc<Config>,
    addr: &str,
    role: &'static str,
    kind: Http,
    shutdown: &Shutdown,
) -> Result<Option<tokio::task::JoinHandle<anyhow::Result<()>>>, RoleError> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = api::bind(addr).await?;
    let admin_token = if config.admin_token.is_empty() && kind == Http::Api {
        let (token, _) = api::auth::new_token();
        warn!(
            token = %token,
            "no admin_token configured: this run's admin token is the one shown; set HEARTH_ADMIN_TOKEN to choose it"
        );
        token
    } else {
        config.admin_token.clone()
    };
    let state = api::AppState::new(role, config.clone(), admin_token)
        .map_err(|e| RoleError::Config(e.to_string()))?;
    let router = match kind {
        Http::Api => api::router(state),
        Http::Metrics => api::metrics_router(state),
    };
    Ok(Some(tokio::spawn(api::serve(
        listener,
        router,
        shutdown.clone(),
    ))))
}

fn rules(config: &Config) -> Result<Arc<RuleSet>, RoleError> {
    RuleSet::load(&config.rules_file)
        .map(Arc::new)
        .map_err(RoleError::Config)
}

pub async fn up(config: Arc<Config>, shutdown: Shutdown) -> Result<(), RoleError> {
    let rules = rules(&config)?;
    let server = http(&config, &config.api_listen, "up", Http::Api, &shutdown).await?;
    if !prepare_store(&config, &shutdown).await || !prepare_queue(&config, &shutdown).await? {
        return Ok(());
    }
    let ingest = tokio::spawn(ingest::run(config.clone(), shutdown.clone()));
    let workers = tokio::spawn(worker::run(config.clone(), rules, shutdown.clone()));
    let (i, w) = tokio::join!(ingest, workers);
    i.map_err(anyhow::Error::from)??;
    w.map_err(anyhow::Error::from)??;
    finish(server).await
}

pub async fn ingest(config: Arc<Config>, shutdown: Shutdown) -> Result<(), RoleError> {
    let server = http(
        &config,
        &config.metrics_listen,
        "ingest",
        Http::Metrics,
        &shutdown,
    )
    .await?;
    if !prepare_queue(&config, &shutdown).await? {
        return Ok(());
    }
    ingest::run(config, shutdown).await?;
    finish(server).await
}

pub async fn worker(config: Arc<Config>, shutdown: Shutdown) -> Result<(), RoleError> {
    let rules = rules(&config)?;
    let server = http(
        &config,
        &config.metrics_listen,
        "worker",
        Http::Metrics,
        &shutdown,
    )
    .await?;
    if !prepare_store(&config, &shutdown).await || !prepare_queue(&config, &shutdown).await? {
        return Ok(());
    }
    worker::run(config, rules, shutdown).await?;
    finish(server).await
}

/// The API alone: REST, WebSocket, metrics.
pub async fn api(config: Arc<Config>, shutdown: Shutdown) -> Result<(), RoleError> {
    let server = http(&config, &config.api_listen, "api", Http::Api, &shutdown).await?;
    if !prepare_store(&config, &shutdown).await {
        return Ok(());
    }
    finish(server).await
}

async fn finish(
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
) -> Result<(), RoleError> {
    if let Some(server) = server {
        server.await.map_err(anyhow::Error::from)??;
    }
    Ok(())
}
