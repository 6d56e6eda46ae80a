//! `/api/v1/dlq`: the dead letters, for the admin token only (they hold every house's raw
//! payloads). The same filters as `hearth dlq`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};

use super::AppState;
use super::auth::Principal;
use super::error::ApiError;
use super::params::{only, query_pairs, valid_id};
use crate::codec::Codecs;
use crate::dlq::{Filter, Letter, Replayed};

const FILTER: &[&str] = &[
    "reason",
    "house",
    "sensor",
    "older_than",
    "newer_than",
    "limit",
];

/// The filter every dead-letter route takes (documentation only: parsed by [`filter`]).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct DlqQuery {
    /// Only this reason.
    #[param(pattern = r"^[A-Za-z0-9_.-]{1,64}$")]
    reason: Option<String>,
    /// Only letters about this house.
    #[param(pattern = r"^[A-Za-z0-9_.-]{1,64}$")]
    house: Option<String>,
    /// Only letters about this sensor (of any house, unless `house` is given too).
    #[param(pattern = r"^[A-Za-z0-9_.-]{1,64}$")]
    sensor: Option<String>,
    /// At least this old: 30s, 10m, 1h.
    #[param(pattern = r"^[0-9]{1,9}(ms|s|m|h|d)$")]
    older_than: Option<String>,
    /// Younger than this.
    #[param(pattern = r"^[0-9]{1,9}(ms|s|m|h|d)$")]
    newer_than: Option<String>,
    /// Listing: default 100; replay and purge: default all.
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u32>,
}

fn filter(
    who: &Principal,
    raw: Option<String>,
    config: &crate::config::Config,
) -> Result<Filter, ApiError> {
    who.admin()?;
    let params = query_pairs(raw)?;
    only(&params, FILTER)?;
    let duration = |name: &str| {
        params
            .get(name)
            .map(|v| {
                crate::config::parse_duration(v)
                    .map_err(|e| ApiError::BadRequest(format!("{name}: {e}")))
            })
            .transpose()
    };
    let reason = params.get("reason").cloned();
    if let Some(r) = &reason {
        valid_id("reason", r)?;
    }
    let house = params.get("house").cloned();
    if let Some(h) = &house {
        valid_id("house", h)?;
    }
    let sensor = params.get("sensor").cloned();
    if let Some(s) = &sensor {
        valid_id("sensor", s)?;
    }
    let limit = params
        .get("limit")
        .map(|v| {
            v.parse::<usize>()
                .ok()
                .filter(|l| (1..=10_000).contains(l))
                .ok_or_else(|| ApiError::BadRequest("limit must be an integer in 1..=10000".into()))
        })
        .transpose()?;
    Ok(Filter {
        reason,
        house,
        sensor,
        older_than: duration("older_than")?,
        newer_than: duration("newer_than")?,
        limit,
        codecs: Some(std::sync::Arc::new(Codecs::from_config(config))),
    })
}

/// Dead letters, oldest first.
#[utoipa::path(get, path = "/api/v1/dlq", tag = "dead letters",
    params(DlqQuery),
    responses(
        (status = 200, body = Vec<Letter>),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 429, description = "Past the token's rate: retry after `Retry-After` seconds", body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    who: Principal,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<Letter>>, ApiError> {
    let mut f = filter(&who, raw, &state.config)?;
    f.limit.get_or_insert(100);
    Ok(Json(state.seams.queue.dead_letters(&f).await?))
}

/// Replay the selected dead letters through the normal path, and remove them.
#[utoipa::path(post, path = "/api/v1/dlq/replay", tag = "dead letters",
    params(DlqQuery),
    responses(
        (status = 200, body = Replayed),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 429, description = "Past the token's rate: retry after `Retry-After` seconds", body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn replay(
    State(state): State<Arc<AppState>>,
    who: Principal,
    RawQuery(raw): RawQuery,
) -> Result<Json<Replayed>, ApiError> {
    let f = filter(&who, raw, &state.config)?;
    let codecs = Codecs::from_config(&state.config);
    Ok(Json(state.seams.queue.replay(&codecs, &f).await?))
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Purged {
    pub purged: u64,
}

/// Remove the selected dead letters.
#[utoipa::path(post, path = "/api/v1/dlq/purge", tag = "dead letters",
    params(DlqQuery),
    responses(
        (status = 200, body = Purged),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 429, description = "Past the token's rate: retry after `Retry-After` seconds", body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn purge(
    State(state): State<Arc<AppState>>,
    who: Principal,
    RawQuery(raw): RawQuery,
) -> Result<Json<Purged>, ApiError> {
    let f = filter(&who, raw, &state.config)?;
    Ok(Json(Purged {
        purged: state.seams.queue.purge(&f).await?,
    }))
}
