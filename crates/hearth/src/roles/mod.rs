//! The process roles (`up`, `ingest`, `worker`, `api`; CONTRACT §4), each on a backend's
//! seams, and what each checks before it starts: the schema is migrated, the lanes' consumer
//! groups exist, the shard count has not changed under queued events. A server that is down at start is waited for with backoff, as it
//! would be later: no role exits because Redis, PostgreSQL or the broker is away.

use std::future::Future;
use std::sync::Arc;

use tracing::warn;

use crate::alerts::rules::RuleSet;
use crate::backoff::Backoff;
use crate::config::Config;
use crate::intake::{Gate, Intake};
use crate::seam::{Backend, Seams};
use crate::servers::Servers;
use crate::servers::queue::{Queue, QueueError};
use crate::shutdown::Shutdown;
use crate::{api, ingest, worker};

mod embedded;
use embedded::{demo_sim, up_embedded};

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
                if backoff.attempts().is_multiple_of(10) {
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
        crate::servers::schema::migrate(&config.database_url)
    })
    .await
    .is_some()
}

async fn prepare_queue(config: &Config, shutdown: &Shutdown) -> Result<bool, RoleError> {
    let queue = Queue::from_config(config).map_err(|e| RoleError::Config(e.to_string()))?;
    let checked = retry("preparing the redis streams", shutdown, || async {
        queue.ensure_groups().await?;
        match queue.check_shards().await {
            Err(e @ QueueError::ShardsChanged { .. }) => return Ok(Err(e)),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        migrate_cache(&queue).await?;
        Ok(Ok(()))
    })
    .await;
    match checked {
        None => Ok(false),
        Some(Err(e)) => Err(RoleError::Config(e.to_string())),
        Some(Ok(())) => Ok(true),
    }
}

/// Once per installation: move latest values cached by a version that keyed them by sensor id
/// alone to their houses' keys (see [`crate::servers::cache::Cache::migrate_unscoped`]).
async fn migrate_cache(queue: &Queue) -> Result<(), QueueError> {
    let mut conn = queue.conn.clone();
    let done: Option<String> = redis::cmd("HGET")
        .arg(queue.keys.meta())
        .arg("latest")
        .query_async(&mut conn)
        .await?;
    if done.as_deref() == Some(crate::servers::queue::ROUTE) {
        return Ok(());
    }
    let cache = crate::servers::cache::Cache::new(queue.conn.clone(), queue.keys.clone());
    let moved = cache.migrate_unscoped().await?;
    if moved > 0 {
        tracing::info!(
            sensors = moved,
            "latest values moved to (house, sensor) keys"
        );
    }
    redis::cmd("HSET")
        .arg(queue.keys.meta())
        .arg("latest")
        .arg(crate::servers::queue::ROUTE)
        .exec_async(&mut conn)
        .await?;
    Ok(())
}

/// What a role's HTTP server serves.
#[derive(Clone, Copy, PartialEq)]
enum Http {
    /// The whole API (`up`, `api`).
    Api,
    /// `/metrics` and `/healthz` (`ingest`, `worker`).
    Metrics,
}

/// The admin token: the configured one, else the one kept in the data folder (made there the
/// first time).
fn admin_token(config: &Config) -> Result<String, RoleError> {
    if !config.admin_token.is_empty() {
        return Ok(config.admin_token.clone());
    }
    let path = std::path::Path::new(&config.data_dir).join("admin_token");
    let (token, made) = crate::auth::stored_admin_token(&path).map_err(RoleError::Config)?;
    if made {
        warn!(
            token = %token,
            file = %path.display(),
            "no admin_token configured: made one, kept in the file (mode 0600) and used again at every start; set HEARTH_ADMIN_TOKEN to choose it"
        );
    } else {
        tracing::info!(file = %path.display(), "admin token read from the data folder");
    }
    Ok(token)
}

/// Start the HTTP server of a role on `addr` (nothing when `addr` is empty), on the backend's
/// seams. Binding happens now, so a taken port is an error at start, not later. `admin`: the
/// admin token (none for a metrics-only server).
#[allow(clippy::too_many_arguments)]
async fn http(
    config: &Arc<Config>,
    addr: &str,
    role: &'static str,
    kind: Http,
    shutdown: &Shutdown,
    seams: &Seams,
    auth: Arc<crate::auth::Authenticator>,
    gate: Arc<Gate>,
) -> Result<Option<tokio::task::JoinHandle<anyhow::Result<()>>>, RoleError> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = api::bind(addr).await?;
    let state = api::AppState::new(role, config.clone(), auth, seams.clone(), gate);
    if matches!(kind, Http::Api) && !config.grpc_listen.is_empty() {
        let grpc = api::bind(&config.grpc_listen).await?;
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = api::grpc::serve(grpc, state, shutdown).await {
                tracing::error!(error = %e, "grpc server failed");
            }
        });
    }
    let router = match kind {
        Http::Api => api::router(state),
        Http::Metrics => api::metrics_router(state),
    };
    let tls = crate::tls::acceptor(&config.api_tls_cert, &config.api_tls_key, &[b"http/1.1"])
        .map_err(|e| RoleError::Config(format!("api_tls_cert: {e}")))?;
    Ok(Some(tokio::spawn(api::serve(
        listener,
        router,
        api::Limits::from_config(config),
        tls,
        shutdown.clone(),
    ))))
}

fn rules(config: &Config) -> Result<Arc<RuleSet>, RoleError> {
    let rules = RuleSet::load(&config.rules_file).map_err(RoleError::Config)?;
    // Each webhook's client, made once here so that an unreadable CA fails the start.
    crate::alerts::notify::Notifier::new(&rules)
        .map_err(|e| RoleError::Config(format!("rules_file {}: {e}", config.rules_file)))?;
    Ok(Arc::new(rules))
}

fn servers(config: &Arc<Config>, rules: Arc<RuleSet>) -> Result<Arc<Servers>, RoleError> {
    Servers::open(config.clone(), rules)
        .map(Arc::new)
        .map_err(|e| RoleError::Config(e.to_string()))
}

/// The authenticator of a role's HTTP server: the admin token for the API, none for metrics.
fn authenticator(
    config: &Config,
    kind: Http,
    seams: &Seams,
) -> Result<Arc<crate::auth::Authenticator>, RoleError> {
    let admin = if kind == Http::Api {
        admin_token(config)?
    } else {
        String::new()
    };
    let requests = crate::rate::Rate {
        per_second: config.api_requests_per_second,
        burst: config.api_request_burst,
    };
    let lookups = crate::rate::Rate {
        per_second: config.token_lookups_per_second,
        burst: config.token_lookups_per_second,
    };
    Ok(Arc::new(crate::auth::Authenticator::new(
        admin,
        seams.store.clone(),
        requests,
        lookups,
    )))
}

/// The fan-out's pushes, whose alert transitions go back to the broker; none if the fan-out
/// cannot be subscribed to now (alerts still reach WebSocket clients and webhooks).
async fn alert_pushes(seams: &Seams) -> Option<crate::alerts::mqtt::AlertFeed> {
    match crate::pushes::subscribe(seams.fanout.clone()).await {
        Ok(pushes) => Some(crate::alerts::mqtt::AlertFeed {
            pushes,
            store: seams.alerts.clone(),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "alerts will not be published over MQTT");
            None
        }
    }
}

/// One alert feed per broker of `mqtt_url`.
async fn alert_feeds(
    config: &Config,
    seams: &Seams,
) -> Vec<Option<crate::alerts::mqtt::AlertFeed>> {
    let mut feeds = Vec::new();
    for _ in config.mqtt_urls() {
        feeds.push(alert_pushes(seams).await);
    }
    feeds
}

/// The MQTT ingest's intake on a backend's queue, knowing the entities discovered so far.
async fn mqtt_intake(
    config: &Config,
    seams: &Seams,
    gate: Arc<Gate>,
) -> Result<Arc<Intake>, RoleError> {
    let codecs = crate::codec::Codecs::from_config(config);
    // Without them (the queue is down), entities are learnt again from their retained configs,
    // which the broker sends at every subscription.
    match seams.queue.discovery().await {
        Ok(kept) => codecs.load_discovery(&kept),
        Err(e) => tracing::warn!(error = %e, "cannot read the discovered entities now"),
    }
    Ok(Arc::new(Intake::new(
        seams.queue.clone(),
        gate,
        "mqtt",
        codecs,
    )))
}

pub async fn up(config: Arc<Config>, shutdown: Shutdown, demo: bool) -> Result<(), RoleError> {
    if config.embedded {
        return up_embedded(config, shutdown, demo).await;
    }
    let rules = rules(&config)?;
    let backend = servers(&config, rules.clone())?;
    let seams = backend.seams().clone();
    let gate = Gate::start(&config, seams.queue.clone(), &shutdown);
    let auth = authenticator(&config, Http::Api, &seams)?;
    let server = http(
        &config,
        &config.api_listen,
        "up",
        Http::Api,
        &shutdown,
        &seams,
        auth,
        gate.clone(),
    )
    .await?;
    if demo {
        tokio::spawn(demo_sim(config.first_mqtt_url(), shutdown.clone()));
    }
    if !prepare_store(&config, &shutdown).await || !prepare_queue(&config, &shutdown).await? {
        return Ok(());
    }
    let intake = mqtt_intake(&config, &seams, gate).await?;
    let ingest = tokio::spawn(ingest::run(
        config.clone(),
        intake,
        alert_feeds(&config, &seams).await,
        backend.ingest_slots(),
        shutdown.clone(),
    ));
    let workers = tokio::spawn(worker::run(
        backend,
        worker::Settings::from_config(&config),
        rules,
        shutdown.clone(),
    ));
    let (i, w) = tokio::join!(ingest, workers);
    i.map_err(anyhow::Error::from)??;
    w.map_err(anyhow::Error::from)??;
    finish(server).await
}

pub async fn ingest(config: Arc<Config>, shutdown: Shutdown) -> Result<(), RoleError> {
    let backend = servers(&config, Arc::default())?;
    let seams = backend.seams().clone();
    let gate = Gate::start(&config, seams.queue.clone(), &shutdown);
    let server = http(
        &config,
        &config.metrics_listen,
        "ingest",
        Http::Metrics,
        &shutdown,
        &seams,
        authenticator(&config, Http::Metrics, &seams)?,
        gate.clone(),
    )
    .await?;
    if !prepare_queue(&config, &shutdown).await? {
        return Ok(());
    }
    let sweeper = tokio::spawn(crate::sweeps::dead_letters(
        seams.queue.clone(),
        shutdown.clone(),
    ));
    ingest::run(
        config.clone(),
        mqtt_intake(&config, &seams, gate).await?,
        alert_feeds(&config, &seams).await,
        backend.ingest_slots(),
        shutdown,
    )
    .await?;
    sweeper.abort();
    finish(server).await
}

pub async fn worker(config: Arc<Config>, shutdown: Shutdown) -> Result<(), RoleError> {
    let rules = rules(&config)?;
    let backend = servers(&config, rules.clone())?;
    let seams = backend.seams().clone();
    let server = http(
        &config,
        &config.metrics_listen,
        "worker",
        Http::Metrics,
        &shutdown,
        &seams,
        authenticator(&config, Http::Metrics, &seams)?,
        Gate::from_config(&config),
    )
    .await?;
    if !prepare_store(&config, &shutdown).await || !prepare_queue(&config, &shutdown).await? {
        return Ok(());
    }
    worker::run(
        backend,
        worker::Settings::from_config(&config),
        rules,
        shutdown,
    )
    .await?;
    finish(server).await
}

/// The API alone: REST, WebSocket, metrics.
pub async fn api(config: Arc<Config>, shutdown: Shutdown) -> Result<(), RoleError> {
    let backend = servers(&config, rules(&config)?)?;
    let seams = backend.seams().clone();
    let gate = Gate::start(&config, seams.queue.clone(), &shutdown);
    let server = http(
        &config,
        &config.api_listen,
        "api",
        Http::Api,
        &shutdown,
        &seams,
        authenticator(&config, Http::Api, &seams)?,
        gate,
    )
    .await?;
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

/// A command's report, as pretty JSON (`--json`) or as its table, on stdout.
pub fn print_report<R: serde::Serialize>(
    json: bool,
    report: &R,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", table());
    }
    Ok(())
}
