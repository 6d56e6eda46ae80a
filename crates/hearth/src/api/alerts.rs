//! Alerts listed and acknowledged (CONTRACT §5); an acknowledgement is pushed like any
//! transition.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, RawQuery, State};

use super::AppState;
use super::auth::Principal;
use super::error::ApiError;
use super::params::{only, query_pairs, valid_id};
use crate::alerts::{Alert, AlertState};

/// Alerts, newest first.
#[utoipa::path(get, path = "/api/v1/alerts", tag = "alerts",
    params(
        ("house" = Option<String>, Query, description = "Only this house (a house token sees only its own)", pattern = r"^[A-Za-z0-9_.-]{1,64}$"),
        ("state" = Option<AlertState>, Query, description = "Only alerts in this state"),
        ("limit" = Option<u32>, Query, description = "Most alerts, newest first; default 100", minimum = 1, maximum = 1000),
    ),
    responses(
        (status = 200, body = Vec<Alert>),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 429, description = "Past the token's rate: retry after `Retry-After` seconds", body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_alerts(
    State(state): State<Arc<AppState>>,
    who: Principal,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<Alert>>, ApiError> {
    let params = query_pairs(raw)?;
    Ok(Json(alerts_of(&state, &who, &params).await?))
}

/// The alerts `params` (the REST query's) select, within what `who` may see (REST and gRPC).
pub(crate) async fn alerts_of(
    state: &AppState,
    who: &Principal,
    params: &std::collections::HashMap<String, String>,
) -> Result<Vec<Alert>, ApiError> {
    only(params, &["house", "state", "limit"])?;
    let mut house = params.get("house").cloned();
    if let Some(h) = &house {
        valid_id("house", h)?;
        who.check(h)?;
    }
    if let Principal::House(own) = &who {
        house = Some(own.clone());
    }
    let alert_state = params
        .get("state")
        .map(|s| {
            AlertState::parse(s).ok_or_else(|| {
                ApiError::BadRequest("state must be active, acknowledged or cleared".into())
            })
        })
        .transpose()?;
    let limit: i64 = match params.get("limit") {
        None => 100,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| ApiError::BadRequest("limit must be an integer in 1..=1000".into()))?,
    };
    Ok(state
        .seams
        .alerts
        .list(house.as_deref(), alert_state, limit)
        .await?)
}

/// Acknowledge an alert; the change is pushed to WebSocket clients and webhooks.
#[utoipa::path(post, path = "/api/v1/alerts/{id}/ack", tag = "alerts",
    params(("id" = i64, Path, description = "Alert id", minimum = 1)),
    responses(
        (status = 200, description = "Acknowledged (or already)", body = Alert),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 429, description = "Past the token's rate: retry after `Retry-After` seconds", body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
        (status = 409, description = "The alert is already cleared", body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn ack_alert(
    State(state): State<Arc<AppState>>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<Alert>, ApiError> {
    Ok(Json(acknowledge(&state, &who, &id).await?))
}

/// Acknowledge alert `id` for `who`, and push the change (REST and gRPC).
pub(crate) async fn acknowledge(
    state: &AppState,
    who: &Principal,
    id: &str,
) -> Result<Alert, ApiError> {
    let id: i64 = id
        .parse()
        .ok()
        .filter(|i| *i > 0)
        .ok_or_else(|| ApiError::BadRequest("alert id must be a positive integer".into()))?;
    let store = &state.seams.alerts;
    let existing = store.get(id).await?;
    match &existing {
        Some(a) if who.allows(&a.house_id) => {}
        _ => return Err(ApiError::NotFound(format!("no alert {id}"))),
    }
    let Some((alert, changed)) = store.acknowledge(id, &who.name()).await? else {
        return Err(ApiError::NotFound(format!("no alert {id}")));
    };
    if alert.state == AlertState::Cleared {
        return Err(ApiError::Conflict(format!("alert {id} is already cleared")));
    }
    if changed {
        let pushed = std::slice::from_ref(&alert);
        state.seams.fanout.push_alerts(pushed).await?;
        store.mark_pushed(std::slice::from_ref(&alert)).await?;
    }
    Ok(alert)
}
