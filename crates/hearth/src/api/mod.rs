//! The HTTP side of hearth. For now: `/metrics` (Prometheus) and `/healthz`, served by every
//! role process that is given an address (`api_listen` for `hearth up`, `metrics_listen` for
//! `hearth ingest` and `hearth worker`).
//!
//! `router(state)` is separate from serving, so tests can call it directly; `serve` runs until
//! shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::queue::Queue;
use crate::shutdown::Shutdown;

/// What the handlers need.
#[derive(Clone)]
pub struct AppState {
    /// The role of this process, for `hearth_process_role`.
    pub role: &'static str,
    /// The queue, to export its depth and accounting.
    pub queue: Option<Queue>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let body = crate::metrics::render(state.role, state.queue.as_ref()).await;
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

/// Serve until shutdown.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "http listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await?;
    Ok(())
}
