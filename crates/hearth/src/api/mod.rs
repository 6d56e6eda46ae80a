//! The HTTP side of hearth (SPEC §5): the REST API under `/api/v1`, the WebSocket push,
//! `/metrics`, `/healthz`, `/readyz` and `/openapi.json`.
//!
//! `router(state)` is separate from serving, so tests can call it directly; `serve` runs until
//! shutdown. `hearth up` and `hearth api` serve the whole API on `api_listen`; `hearth ingest`
//! and `hearth worker` serve only their metrics ([`metrics_router`]) on `metrics_listen`.
//! Every `/api/v1` route and the WebSocket need a bearer token ([`auth`]); errors are JSON
//! ([`error`]).

pub mod auth;
pub mod dlq;
pub mod error;
pub mod openapi;
pub mod routes;
pub mod ws;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::seam::Seams;
use crate::shutdown::Shutdown;

/// What the handlers share.
pub struct AppState {
    /// The role of this process, for `hearth_process_role`.
    pub role: &'static str,
    pub config: Arc<Config>,
    /// The queue, store, cache and fan-out: the servers', or the embedded ones.
    pub seams: Seams,
    /// The alert rules and webhooks, read once at start (an acknowledgement is pushed to the
    /// webhooks of its severity).
    pub rules: crate::alerts::rules::RuleSet,
    pub admin_token: String,
    pub tokens: auth::TokenCache,
    pub hub: Arc<ws::Hub>,
    /// The last (time, received, stored) read for `/pipeline`'s rates.
    pub last_counts: Mutex<Option<(Instant, u64, u64)>>,
    /// The routine depth last read, and when: HTTP ingestion's backpressure.
    pub depth: Mutex<(Instant, u64)>,
}

impl AppState {
    /// The API on the configured servers.
    pub fn new(
        role: &'static str,
        config: Arc<Config>,
        admin_token: String,
    ) -> Result<Arc<AppState>, crate::queue::QueueError> {
        let seams = crate::seam::servers::open(&config)?;
        Ok(AppState::with_seams(role, config, admin_token, seams))
    }

    /// The API on any backend.
    pub fn with_seams(
        role: &'static str,
        config: Arc<Config>,
        admin_token: String,
        seams: Seams,
    ) -> Arc<AppState> {
        Arc::new(AppState {
            role,
            rules: crate::alerts::rules::RuleSet::load(&config.rules_file).unwrap_or_default(),
            hub: Arc::new(ws::Hub::new(seams.fanout.clone(), config.ws_client_buffer)),
            seams,
            config,
            admin_token,
            tokens: auth::TokenCache::default(),
            last_counts: Mutex::new(None),
            depth: Mutex::new((Instant::now(), 0)),
        })
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/events", post(routes::post_events))
        .route("/houses", get(routes::houses))
        .route("/houses/{house}/sensors", get(routes::house_sensors))
        .route(
            "/houses/{house}/sensors/{sensor}/latest",
            get(routes::sensor_latest),
        )
        .route(
            "/houses/{house}/sensors/{sensor}/events",
            get(routes::sensor_events),
        )
        .route("/alerts", get(routes::list_alerts))
        .route("/alerts/{id}/ack", post(routes::ack_alert))
        .route("/pipeline", get(routes::pipeline))
        .route("/dlq", get(dlq::list))
        .route("/dlq/replay", post(dlq::replay))
        .route("/dlq/purge", post(dlq::purge))
        .route("/ws", get(ws::upgrade));
    Router::new()
        .nest("/api/v1", v1)
        .route("/metrics", get(metrics))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/openapi.json", get(openapi::document))
        .route("/", get(dashboard))
        .fallback(routes::not_found)
        .with_state(state)
}

/// Only `/metrics` and `/healthz`, for processes without the API.
/// The dashboard: one page, its script and style inline (no CDN: it works offline). It asks for
/// a token and then uses the REST API and the WebSocket like any client.
async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("dashboard.html"),
    )
}

pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(routes::healthz))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let body = crate::metrics::render(state.role, Some(&*state.seams.queue)).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// Bind `addr`; a clear error when it is taken.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

/// Kernel send buffer of each HTTP connection. Fixed rather than auto-tuned (up to 4 MiB on
/// Linux), so that what a WebSocket client that stops reading can hold is bounded, and is
/// noticed: its messages then pile up in hearth's own bounded queue, and it is dropped.
const SEND_BUFFER: usize = 256 * 1024;

/// Serve until shutdown.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    use axum::serve::ListenerExt;
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "http listening");
    let listener = listener.tap_io(|tcp| {
        let sock = socket2::SockRef::from(&*tcp);
        let _ = sock.set_tcp_nodelay(true);
        let _ = sock.set_send_buffer_size(SEND_BUFFER);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await?;
    Ok(())
}
