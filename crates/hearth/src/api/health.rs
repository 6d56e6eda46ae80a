//! `GET /api/v1/pipeline`, `/healthz`, `/readyz`, and the JSON 404.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::auth::Principal;
use super::error::ApiError;

#[derive(Debug, Serialize, ToSchema)]
pub struct Pipeline {
    /// Per lane: depth (events), entries, pending, lag, owner, consumers; dead letters and the
    /// loss accounting.
    pub queue: crate::status::Status,
    /// Events per second since the previous call (over all processes).
    pub received_per_s: f64,
    pub stored_per_s: f64,
    /// Dependency → whether its circuit is open in any process (reported within 10 s).
    pub circuits: BTreeMap<String, bool>,
}

/// Queue depth, lag, pending, dead letters, throughput, circuit states (admin token only).
#[utoipa::path(get, path = "/api/v1/pipeline", tag = "pipeline",
    responses(
        (status = 200, body = Pipeline),
        (status = 401, body = super::error::ErrorBody),
        (status = 429, description = "Past the token's rate: retry after `Retry-After` seconds", body = super::error::ErrorBody),
        (status = 403, description = "A house token", body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn pipeline(
    State(state): State<Arc<AppState>>,
    who: Principal,
) -> Result<Json<Pipeline>, ApiError> {
    // Every house's traffic and the processes' names: the installation's, not a house's.
    who.admin()?;
    let status = state.seams.queue.status().await?;
    let (received, stored) = (status.events.received, status.events.stored);
    let now = Instant::now();
    let (mut received_per_s, mut stored_per_s) = (0.0, 0.0);
    if let Ok(mut last) = state.last_counts.lock() {
        if let Some((at, r, s)) = *last {
            let dt = now.duration_since(at).as_secs_f64().max(1e-3);
            received_per_s = received.saturating_sub(r) as f64 / dt;
            stored_per_s = stored.saturating_sub(s) as f64 / dt;
        }
        *last = Some((now, received, stored));
    }
    // Every process's circuits (shared through Redis), and this process's own.
    let mut circuits = state.seams.queue.circuits().await?;
    for (dependency, open) in crate::metrics::circuits() {
        *circuits.entry(dependency).or_insert(false) |= open;
    }
    Ok(Json(Pipeline {
        queue: status,
        received_per_s,
        stored_per_s,
        circuits,
    }))
}

/// Alive.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "ok")))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    /// `servers` (Redis, PostgreSQL, an MQTT broker) or `embedded` (one data folder).
    pub backend: String,
    /// The queue answers (Redis, or the embedded store).
    pub redis: bool,
    /// The store answers (PostgreSQL, or the embedded store).
    pub postgres: bool,
    /// The broker accepts connections.
    pub broker: bool,
}

/// Ready only when the queue, the store and the broker answer.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let timeout = Duration::from_secs(2);
    let answers = |ready: Result<(&'static str, bool), crate::seam::Unavailable>| {
        ready.map(|(_, ok)| ok).unwrap_or(false)
    };
    let broker = async {
        let address = if state.config.embedded {
            // Its own broker: the plain listener, or the TLS one when there is no plain one.
            Some(match state.config.mqtt_listen.as_str() {
                "" => state.config.mqtt_tls_listen.clone(),
                plain => plain.to_string(),
            })
        } else {
            crate::mqtt::Endpoint::address(&state.config.first_mqtt_url())
                .ok()
                .map(|(host, port)| format!("{host}:{port}"))
        };
        match address {
            Some(a) => tokio::net::TcpStream::connect(a).await.is_ok(),
            None => false,
        }
    };
    let (redis, postgres, broker) = tokio::join!(
        async {
            tokio::time::timeout(timeout, state.seams.queue.ready())
                .await
                .map(answers)
                .unwrap_or(false)
        },
        async {
            tokio::time::timeout(timeout, state.seams.store.ready())
                .await
                .map(answers)
                .unwrap_or(false)
        },
        async { tokio::time::timeout(timeout, broker).await.unwrap_or(false) },
    );
    let ready = redis && postgres && broker;
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(Readiness {
            ready,
            backend: if state.config.embedded {
                "embedded"
            } else {
                "servers"
            }
            .into(),
            redis,
            postgres,
            broker,
        }),
    )
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such route; see /openapi.json".into())
}
