//! The process roles of SPEC §4 (`up`, `ingest`, `worker`) and what each checks before it
//! starts: the schema is migrated, the lanes' consumer groups exist, the shard count has not
//! changed under queued events. A server that is down at start is waited for with backoff, as it
//! would be later: no role exits because Redis, PostgreSQL or the broker is away.

use std::future::Future;
use std::sync::Arc;

use tracing::warn;

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

/// Start the HTTP server of a role on `addr` (nothing when `addr` is empty). Binding happens
/// now, so a taken port is an error at start, not later.
async fn http(
    config: &Config,
    addr: &str,
    role: &'static str,
    shutdown: &Shutdown,
) -> Result<Option<tokio::task::JoinHandle<anyhow::Result<()>>>, RoleError> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = api::bind(addr).await?;
    let queue = Queue::open(&config.redis_url, &config.redis_prefix, config.shards)
        .map_err(|e| RoleError::Config(e.to_string()))?;
    let router = api::router(std::sync::Arc::new(api::AppState {
        role,
        queue: Some(queue),
    }));
    Ok(Some(tokio::spawn(api::serve(
        listener,
        router,
        shutdown.clone(),
    ))))
}

/// Ingest and workers in one process.
pub async fn up(config: Arc<Config>, shutdown: Shutdown) -> Result<(), RoleError> {
    let server = http(&config, &config.api_listen, "up", &shutdown).await?;
    if !prepare_store(&config, &shutdown).await || !prepare_queue(&config, &shutdown).await? {
        return Ok(());
    }
    let ingest = tokio::spawn(ingest::run(config.clone(), shutdown.clone()));
    let workers = tokio::spawn(worker::run(config.clone(), shutdown.clone()));
    let (i, w) = tokio::join!(ingest, workers);
    i.map_err(anyhow::Error::from)??;
    w.map_err(anyhow::Error::from)??;
    finish(server).await
}

pub async fn ingest(config: Arc<Config>, shutdown: Shutdown) -> Result<(), RoleError> {
    let server = http(&config, &config.metrics_listen, "ingest", &shutdown).await?;
    if !prepare_queue(&config, &shutdown).await? {
        return Ok(());
    }
    ingest::run(config, shutdown).await?;
    finish(server).await
}

pub async fn worker(config: Arc<Config>, shutdown: Shutdown) -> Result<(), RoleError> {
    let server = http(&config, &config.metrics_listen, "worker", &shutdown).await?;
    if !prepare_store(&config, &shutdown).await || !prepare_queue(&config, &shutdown).await? {
        return Ok(());
    }
    worker::run(config, shutdown).await?;
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
