//! The HTTP side of hearth (CONTRACT §5): the REST API under `/api/v1`, the WebSocket push,
//! `/metrics`, `/healthz`, `/readyz` and `/openapi.json`.
//!
//! `router(state)` is separate from serving, so tests can call it directly; `serve` runs until
//! shutdown. `hearth up` and `hearth api` serve the whole API on `api_listen`; `hearth ingest`
//! and `hearth worker` serve only their metrics ([`metrics_router`]) on `metrics_listen`.
//! Every `/api/v1` route and the WebSocket need a bearer token ([`auth`]); errors are JSON
//! ([`error`]).

pub mod alerts;
pub mod auth;
pub mod dlq;
pub mod error;
pub mod events;
pub mod grpc;
pub mod health;
pub mod openapi;
pub mod params;
pub mod sensors;
pub mod series;
pub mod subscribe;
pub mod ws;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Who a token is (shared with the embedded broker).
    pub auth: Arc<crate::auth::Authenticator>,
    pub hub: Arc<ws::Hub>,
    /// The last (time, received, stored) read for `/pipeline`'s rates.
    pub last_counts: Mutex<Option<(Instant, u64, u64)>>,
    /// `POST /events`: the intake every source shares (its gate shared with the process's
    /// other intakes).
    pub intake: crate::intake::Intake,
}

impl AppState {
    /// The API on a backend's seams.
    pub fn new(
        role: &'static str,
        config: Arc<Config>,
        auth: Arc<crate::auth::Authenticator>,
        seams: Seams,
        gate: Arc<crate::intake::Gate>,
    ) -> Arc<AppState> {
        Arc::new(AppState {
            role,
            hub: Arc::new(ws::Hub::new(
                seams.fanout.clone(),
                config.ws_client_buffer,
                ws::SeatLimits {
                    total: config.http_max_connections,
                    per_house: config.push_clients_per_house,
                },
            )),
            intake: crate::intake::Intake::new(
                seams.queue.clone(),
                gate,
                "http",
                crate::codec::Codecs::from_config(&config),
            ),
            seams,
            config,
            auth,
            last_counts: Mutex::new(None),
        })
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/events", post(events::post_events))
        .route("/houses", get(sensors::houses))
        .route("/houses/{house}/sensors", get(sensors::house_sensors))
        .route(
            "/houses/{house}/sensors/{sensor}/latest",
            get(sensors::sensor_latest),
        )
        .route(
            "/houses/{house}/sensors/{sensor}/events",
            get(sensors::sensor_events),
        )
        .route(
            "/houses/{house}/sensors/{sensor}/series",
            get(series::sensor_series),
        )
        .route("/alerts", get(alerts::list_alerts))
        .route("/alerts/{id}/ack", post(alerts::ack_alert))
        .route("/pipeline", get(health::pipeline))
        .route("/dlq", get(dlq::list))
        .route("/dlq/replay", post(dlq::replay))
        .route("/dlq/purge", post(dlq::purge))
        .route("/ws", get(ws::upgrade));
    Router::new()
        .nest("/api/v1", v1)
        .route("/metrics", get(metrics))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.json", get(openapi::document))
        .route("/", get(dashboard))
        .fallback(health::not_found)
        .with_state(state)
}

/// The dashboard: one page, its script and style inline (no CDN: it works offline). It asks for
/// a token and then uses the REST API and the WebSocket like any client.
async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP.as_str()),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        DASHBOARD,
    )
}

const DASHBOARD: &str = include_str!("dashboard.html");

/// The dashboard's Content-Security-Policy: its one inline script and style by their hashes,
/// nothing else from anywhere but this origin, never in a frame (clickjacking an Acknowledge).
static DASHBOARD_CSP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let script = crate::auth::csp_hash(inline(DASHBOARD, "script"));
    let style = crate::auth::csp_hash(inline(DASHBOARD, "style"));
    format!(
        "default-src 'none'; script-src '{script}'; style-src '{style}'; connect-src 'self'; \
         img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
});

/// The text of the page's one inline `<tag>` element.
fn inline<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    page.split_once(&open)
        .and_then(|(_, rest)| rest.split_once(&close))
        .map_or("", |(body, _)| body)
}

/// Only `/metrics` and `/healthz`, for processes without the API.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(health::healthz))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let status = match state.seams.queue.status().await {
        Ok(status) => Some(status),
        Err(e) => {
            tracing::debug!(error = %e, "queue metrics unavailable");
            None
        }
    };
    let body = crate::metrics::render(state.role, status.as_ref());
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

/// The bounds of the HTTP server: every way in has a size, a count and a time.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; the next ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// A request's headers must be in within this.
    pub header_timeout: Duration,
    /// A request (its body included) must be answered within this; WebSocket sessions aside.
    pub request_timeout: Duration,
}

impl Limits {
    pub fn from_config(config: &Config) -> Limits {
        let header = Duration::from_millis(config.http_header_timeout_ms);
        Limits {
            max_connections: config.http_max_connections,
            header_timeout: header,
            request_timeout: header * 10,
        }
    }
}

/// Serve until shutdown: each connection on hyper's HTTP/1 with a header-read timeout, at most
/// `max_connections` at once, every request (WebSocket upgrades aside) answered within its time
/// or 408. With `tls`, every connection is HTTPS (its handshake within the header time; a client
/// speaking plain HTTP fails it). On shutdown, connections finish their request in hand (at
/// most the request time).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<crate::tls::TlsAcceptor>,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    use hyper_util::rt::TokioTimer;
    let addr: SocketAddr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, %scheme, "http listening");
    let router = router.layer(axum::middleware::from_fn_with_state(
        limits.request_timeout,
        deadline,
    ));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p?,
            _ = shutdown.wait() => break,
        };
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let sock = socket2::SockRef::from(&tcp);
        let _ = sock.set_tcp_nodelay(true);
        let _ = sock.set_send_buffer_size(SEND_BUFFER);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let (http, stop, tls) = (http.clone(), shutdown.clone(), tls.clone());
        let handshake = limits.header_timeout;
        tokio::spawn(async move {
            match tls {
                None => connection(&http, tcp, service, stop).await,
                Some(acceptor) => {
                    match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => connection(&http, stream, service, stop).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "tls handshake failed"),
                        Err(_) => tracing::debug!("no tls handshake in time"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    // Every connection gives its permit back when it is done.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(limits.request_timeout, permits.acquire_many(all)).await;
    Ok(())
}

/// One connection, served until its client leaves or shutdown (then its request in hand is
/// finished first).
async fn connection<S>(
    http: &hyper::server::conn::http1::Builder,
    io: S,
    service: hyper_util::service::TowerToHyperService<Router>,
    mut stop: Shutdown,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let conn = http
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.wait() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Answer a request within `limit` (its body read included), or 408; the WebSocket upgrade is
/// answered at once and its session is bounded by its own pings. Every answer says `nosniff`
/// and `no-referrer`.
async fn deadline(
    State(limit): State<Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    // Only the WebSocket route is let through without a deadline (its session is bounded by
    // its pings): any other request, `Upgrade` header or not, must be whole in time.
    let websocket = request.uri().path() == "/api/v1/ws";
    let mut response = if websocket {
        next.run(request).await
    } else {
        match tokio::time::timeout(limit, next.run(request)).await {
            Ok(response) => response,
            Err(_) => error::ApiError::Timeout(format!(
                "the request was not complete within {} s",
                limit.as_secs()
            ))
            .into_response(),
        }
    };
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    response
}
