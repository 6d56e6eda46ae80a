//! Houses, their sensors, latest values and history (CONTRACT §5), each within what the caller's
//! token may see.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::AppState;
use super::auth::Principal;
use super::error::ApiError;
use super::params::{in_range, instant, only, query_pairs, valid_id};
use crate::seam::HistoryQuery;

/// A sensor with its latest value of each kind.
#[derive(Debug, Serialize, ToSchema)]
pub struct SensorView {
    pub sensor_id: String,
    pub house_id: String,
    pub kinds: Vec<String>,
    /// Epoch milliseconds.
    pub first_seen: i64,
    /// Epoch milliseconds (written at most every `sensor_touch_interval_ms`).
    pub last_seen: i64,
    /// Kind → its latest value.
    #[schema(value_type = BTreeMap<String, LatestValue>)]
    pub latest: BTreeMap<String, Value>,
    /// The device it belongs to, for sensors of a device ecosystem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<crate::seam::DeviceInfo>,
}

/// The latest values of some sensors of a house (kind → JSON value each), in one round trip.
async fn latest(
    state: &AppState,
    house: &str,
    sensors: &[String],
) -> Result<Vec<BTreeMap<String, Value>>, ApiError> {
    Ok(state
        .seams
        .cache
        .latest(house, sensors)
        .await?
        .into_iter()
        .map(|kinds| {
            kinds
                .into_iter()
                .filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?)))
                .collect()
        })
        .collect())
}

pub use crate::seam::{HistoryEvent, HouseView};

/// The houses this token may see (the admin token: every house with a sensor), by id.
#[utoipa::path(get, path = "/api/v1/houses", tag = "sensors",
    responses(
        (status = 200, body = Vec<HouseView>),
        (status = 401, body = super::error::ErrorBody),
        (status = 429, description = "Past the token's rate: retry after `Retry-After` seconds", body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn houses(
    State(state): State<Arc<AppState>>,
    who: Principal,
) -> Result<Json<Vec<HouseView>>, ApiError> {
    let only: Option<String> = match &who {
        Principal::Admin => None,
        Principal::House(h) => Some(h.clone()),
    };
    let mut out = state.seams.store.houses(only.as_deref()).await?;
    if let (Some(h), true) = (only, out.is_empty()) {
        out.push(HouseView {
            house_id: h,
            sensors: 0,
        });
    }
    Ok(Json(out))
}

/// The sensors of a house, with their latest values.
#[utoipa::path(get, path = "/api/v1/houses/{house}/sensors", tag = "sensors",
    params(("house" = String, Path, description = "House id", pattern = r"^[A-Za-z0-9_.-]{1,64}$")),
    responses(
        (status = 200, body = Vec<SensorView>),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 429, description = "Past the token's rate: retry after `Retry-After` seconds", body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn house_sensors(
    State(state): State<Arc<AppState>>,
    who: Principal,
    Path(house): Path<String>,
) -> Result<Json<Vec<SensorView>>, ApiError> {
    valid_id("house", &house)?;
    who.check(&house)?;
    let rows = state.seams.store.sensors(&house).await?;
    let ids: Vec<String> = rows.iter().map(|r| r.sensor_id.clone()).collect();
    let values = latest(&state, &house, &ids).await?;
    let mut devices = state.seams.queue.devices(&house).await?;
    // A bridge's word on a device (its model, maker) where its readings said nothing of it.
    let catalog = state.seams.queue.catalog(&house).await?;
    for d in devices.values_mut() {
        if let Some(known) = catalog.get(&d.device_id) {
            d.model = d.model.take().or_else(|| known.model.clone());
            d.manufacturer = d.manufacturer.take().or_else(|| known.manufacturer.clone());
        }
    }
    Ok(Json(
        rows.into_iter()
            .zip(values)
            .map(|(r, latest)| SensorView {
                latest,
                device: devices.remove(&r.sensor_id),
                sensor_id: r.sensor_id,
                house_id: r.house_id,
                kinds: r.kinds,
                first_seen: r.first_seen,
                last_seen: r.last_seen,
            })
            .collect(),
    ))
}

/// A sensor of a house, checked against the token: another house's is 403 (the house is in the
/// path: nothing is told about its sensors), a sensor the house does not have is 404.
pub(super) async fn sensor_of(
    state: &AppState,
    who: &Principal,
    house: &str,
    sensor: &str,
) -> Result<crate::seam::SensorRow, ApiError> {
    valid_id("house", house)?;
    valid_id("sensor", sensor)?;
    who.check(house)?;
    state
        .seams
        .store
        .sensor(house, sensor)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("house {house:?} has no sensor {sensor:?}")))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LatestView {
    pub sensor_id: String,
    pub house_id: String,
    /// Kind → its latest value.
    #[schema(value_type = BTreeMap<String, LatestValue>)]
    pub latest: BTreeMap<String, Value>,
}

/// A sensor's latest value of one kind, as the cache keeps it ([`crate::seam::latest_json`]).
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)] // the schema of what the cache holds as JSON
pub struct LatestValue {
    pub value: f64,
    /// The canonical unit of the kind, if it has one.
    pub unit: Option<String>,
    /// Reading time, epoch milliseconds.
    pub ts: i64,
    pub seq: Option<i64>,
    /// When hearth received it, epoch microseconds.
    pub received_us: i64,
    pub house_id: String,
}

/// The latest value of each kind of a sensor (from the cache).
#[utoipa::path(get, path = "/api/v1/houses/{house}/sensors/{sensor}/latest", tag = "sensors",
    params(
        ("house" = String, Path, description = "House id", pattern = r"^[A-Za-z0-9_.-]{1,64}$"),
        ("sensor" = String, Path, description = "Sensor id (within the house)", pattern = r"^[A-Za-z0-9_.-]{1,64}$"),
    ),
    responses(
        (status = 200, body = LatestView),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 429, description = "Past the token's rate: retry after `Retry-After` seconds", body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn sensor_latest(
    State(state): State<Arc<AppState>>,
    who: Principal,
    Path((house, sensor)): Path<(String, String)>,
) -> Result<Json<LatestView>, ApiError> {
    Ok(Json(latest_of(&state, &who, house, sensor).await?))
}

/// A sensor's latest values, within what `who` may see (REST and gRPC).
pub(crate) async fn latest_of(
    state: &AppState,
    who: &Principal,
    house: String,
    sensor: String,
) -> Result<LatestView, ApiError> {
    sensor_of(state, who, &house, &sensor).await?;
    let ids = [sensor];
    let latest = latest(state, &house, &ids).await?.pop().unwrap_or_default();
    let [sensor_id] = ids;
    Ok(LatestView {
        latest,
        sensor_id,
        house_id: house,
    })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct History {
    /// Newest first.
    pub events: Vec<HistoryEvent>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A sensor's history, newest first, paged.
#[utoipa::path(get, path = "/api/v1/houses/{house}/sensors/{sensor}/events", tag = "sensors",
    params(
        ("house" = String, Path, description = "House id", pattern = r"^[A-Za-z0-9_.-]{1,64}$"),
        ("sensor" = String, Path, description = "Sensor id (within the house)", pattern = r"^[A-Za-z0-9_.-]{1,64}$"),
        ("kind" = Option<String>, Query, description = "Only this kind", pattern = r"^[A-Za-z0-9_.-]{1,64}$"),
        ("from" = Option<i64>, Query, description = "Readings at or after: epoch milliseconds (or an RFC 3339 instant)", minimum = 0, maximum = 95_617_584_000_000_i64),
        ("to" = Option<i64>, Query, description = "Readings before: epoch milliseconds (or an RFC 3339 instant)", minimum = 0, maximum = 95_617_584_000_000_i64),
        ("limit" = Option<u32>, Query, description = "Page size, default 100", minimum = 1, maximum = 1000),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page", pattern = r"^[0-9]{1,14}\.[0-9]{1,19}$"),
    ),
    responses(
        (status = 200, body = History),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 429, description = "Past the token's rate: retry after `Retry-After` seconds", body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn sensor_events(
    State(state): State<Arc<AppState>>,
    who: Principal,
    Path((house, sensor)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Json<History>, ApiError> {
    let params = query_pairs(raw)?;
    Ok(Json(
        history_of(&state, &who, house, sensor, &params).await?,
    ))
}

/// A sensor's history page for `params` (the REST query's), within what `who` may see.
pub(crate) async fn history_of(
    state: &AppState,
    who: &Principal,
    house: String,
    sensor: String,
    params: &std::collections::HashMap<String, String>,
) -> Result<History, ApiError> {
    only(params, &["kind", "from", "to", "limit", "cursor"])?;
    let kind = params.get("kind").cloned();
    if let Some(k) = &kind {
        valid_id("kind", k)?;
    }
    let from = params.get("from").map(|v| instant("from", v)).transpose()?;
    let to = params.get("to").map(|v| instant("to", v)).transpose()?;
    let limit: i64 = match params.get("limit") {
        None => 100,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| ApiError::BadRequest("limit must be an integer in 1..=1000".into()))?,
    };
    let cursor: Option<(i64, i64)> = params
        .get("cursor")
        .map(|c| {
            c.split_once('.')
                .and_then(|(ts, id)| Some((ts.parse().ok()?, id.parse().ok()?)))
                .filter(|(ts, _): &(i64, i64)| in_range("cursor", *ts).is_ok())
                .ok_or_else(|| ApiError::BadRequest("cursor is not one this API gave".into()))
        })
        .transpose()?;
    sensor_of(state, who, &house, &sensor).await?;
    let mut events = state
        .seams
        .store
        .history(&HistoryQuery {
            house,
            sensor,
            kind,
            from,
            to,
            cursor,
            limit: limit + 1,
        })
        .await?;
    let next_cursor = if events.len() as i64 > limit {
        events.truncate(limit as usize);
        events.last().map(|e| format!("{}.{}", e.ts, e.id))
    } else {
        None
    };
    Ok(History {
        events,
        next_cursor,
    })
}
