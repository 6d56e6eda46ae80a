//! The REST handlers of SPEC §5. Every parameter is checked here and a bad one is a 400 with the
//! JSON error; ids are validated before they reach a Redis key or a SQL statement (which are all
//! parameterised anyway).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::AppState;
use super::auth::Principal;
use super::error::ApiError;
use crate::alerts::{Alert, AlertState};
use crate::codec;
use crate::event::is_valid_id;
use crate::intake::Input;
use crate::seam::HistoryQuery;

/// The query string as pairs, percent-decoded; a malformed one is a 400.
pub fn query_pairs(raw: Option<String>) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k)?, decode(v)?);
        if out.insert(k.clone(), v).is_some() {
            return Err(ApiError::BadRequest(format!(
                "parameter {k:?} is given twice"
            )));
        }
    }
    Ok(out)
}

fn decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ApiError::BadRequest("malformed percent-encoding in the query".into())
                    })?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::BadRequest("the query is not UTF-8".into()))
}

pub(super) fn valid_id(what: &str, id: &str) -> Result<(), ApiError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{what} must match [A-Za-z0-9_.-]{{1,64}}"
        )))
    }
}

/// Refuse parameters a route does not know (a typo would otherwise be silently ignored).
pub(super) fn only(params: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    match params
        .keys()
        .find(|k| !known.contains(&k.as_str()) && *k != "token")
    {
        Some(k) => Err(ApiError::BadRequest(format!(
            "unknown parameter {k:?}; this route takes {}",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// Epoch milliseconds or RFC 3339.
fn instant(name: &str, raw: &str) -> Result<i64, ApiError> {
    let ms = match raw.parse::<i64>() {
        Ok(ms) => ms,
        Err(_) => time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
            .map_err(|_| {
                ApiError::BadRequest(format!("{name} must be epoch milliseconds or RFC 3339"))
            })?,
    };
    in_range(name, ms)
}

/// Instants the stores can hold: from 1970 to the year 5000.
const LATEST_INSTANT_MS: i64 = 95_617_584_000_000;

fn in_range(name: &str, ms: i64) -> Result<i64, ApiError> {
    if (0..=LATEST_INSTANT_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(ApiError::BadRequest(format!(
            "{name} must be between 1970 and the year 5000"
        )))
    }
}

// ---- ingestion -------------------------------------------------------------------------------

/// What `POST /events` did with the readings.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    /// Readings durably queued.
    pub accepted: usize,
    /// Readings refused (all in one dead letter).
    pub rejected: usize,
    /// How many were refused for each reason.
    pub reasons: BTreeMap<String, usize>,
    /// The first refused readings (at most 10), each with its reason.
    pub first_rejected: Vec<RejectedReading>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RejectedReading {
    pub index: usize,
    pub reason: String,
    pub detail: String,
}

/// Refused readings listed in a `POST /events` answer (the count and reasons cover them all).
const LISTED_REJECTIONS: usize = 10;

/// Largest `POST /events` body.
const MAX_BODY: usize = 1024 * 1024;

/// Ingest readings over HTTP: one object or an array, each with `house_id` and `sensor_id`
/// beside the fields of the MQTT payload. Answered 202 once durably queued.
#[utoipa::path(post, path = "/api/v1/events", tag = "events",
    request_body(content = Value, description = "A reading `{house_id, sensor_id, kind, value, unit?, seq?, ts?}` or an array of them (at most `max_readings_per_message`)", content_type = "application/json"),
    responses(
        (status = 202, description = "Queued (and the refused ones dead-lettered, in one letter)", body = Accepted),
        (status = 400, description = "Not a reading or an array of readings", body = super::error::ErrorBody),
        (status = 401, description = "No or bad token", body = super::error::ErrorBody),
        (status = 403, description = "A reading names a house this token is not for", body = super::error::ErrorBody),
        (status = 413, description = "More than 1 MiB, or more readings than `max_readings_per_message`", body = super::error::ErrorBody),
        (status = 503, description = "The queue is full or Redis is down: retry", body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn post_events(
    State(state): State<Arc<AppState>>,
    who: Principal,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let limits = state.intake.limits();
    // Past axum's own limit (2 MiB) the body is not even read.
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(e.body_text()),
        _ => ApiError::BadRequest(e.body_text()),
    })?;
    if body.len() > MAX_BODY {
        return Err(ApiError::TooLarge(format!(
            "the body is {} bytes, the limit is {MAX_BODY}",
            body.len()
        )));
    }
    let items = codec::http::readings(&body, limits).map_err(|r| match r.reason {
        crate::event::Reason::TooManyReadings => ApiError::TooLarge(r.to_string()),
        _ => ApiError::BadRequest(r.to_string()),
    })?;
    // Every reading's house first: a token writes into its own house only, or nothing at all.
    for item in &items {
        if let Some(house) = codec::http::house_of(item) {
            who.check(house)?;
        }
    }
    let received_us = crate::event::now_us();
    let (decoded, refused) = codec::http::events(&items, received_us, limits);
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for r in &decoded.rejections {
        *reasons.entry(r.reason.as_str().to_string()).or_default() += 1;
    }
    let first_rejected = refused
        .iter()
        .zip(&decoded.rejections)
        .take(LISTED_REJECTIONS)
        .map(|(index, r)| RejectedReading {
            index: *index,
            reason: r.reason.as_str().into(),
            detail: r.detail.clone(),
        })
        .collect();
    // The letter keeps the refused readings only: replaying it sends them, not the stored ones.
    let refused_items: Vec<&Value> = refused.iter().filter_map(|i| items.get(*i)).collect();
    let raw = serde_json::to_vec(&refused_items).unwrap_or_default();
    let input = Input::of(decoded, "http", "http", &raw, received_us / 1000);
    if state.intake.holds(&input) {
        return Err(ApiError::Unavailable(
            "the queue is above its high watermark; retry shortly".into(),
        ));
    }
    state.intake.append(&[&input]).await?;
    let accepted = input.events.len();
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            accepted,
            rejected: refused.len(),
            reasons,
            first_rejected,
        }),
    ))
}

// ---- sensors ---------------------------------------------------------------------------------

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
    /// Kind → `{value, unit, ts, seq, received_us, house_id}`.
    #[schema(value_type = Object)]
    pub latest: BTreeMap<String, Value>,
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
    Ok(Json(
        rows.into_iter()
            .zip(values)
            .map(|(r, latest)| SensorView {
                latest,
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
async fn sensor_of(
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
    /// Kind → `{value, unit, ts, seq, received_us, house_id}`.
    #[schema(value_type = Object)]
    pub latest: BTreeMap<String, Value>,
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
        (status = 403, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn sensor_latest(
    State(state): State<Arc<AppState>>,
    who: Principal,
    Path((house, sensor)): Path<(String, String)>,
) -> Result<Json<LatestView>, ApiError> {
    sensor_of(&state, &who, &house, &sensor).await?;
    let ids = [sensor];
    let latest = latest(&state, &house, &ids)
        .await?
        .pop()
        .unwrap_or_default();
    let [sensor_id] = ids;
    Ok(Json(LatestView {
        latest,
        sensor_id,
        house_id: house,
    }))
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
        ("kind" = Option<String>, Query, description = "Only this kind"),
        ("from" = Option<String>, Query, description = "Readings at or after (epoch ms or RFC 3339)"),
        ("to" = Option<String>, Query, description = "Readings before (epoch ms or RFC 3339)"),
        ("limit" = Option<u32>, Query, description = "Page size, 1..=1000, default 100"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, body = History),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
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
    only(&params, &["kind", "from", "to", "limit", "cursor"])?;
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
    sensor_of(&state, &who, &house, &sensor).await?;
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
    Ok(Json(History {
        events,
        next_cursor,
    }))
}

// ---- alerts ----------------------------------------------------------------------------------

/// Alerts, newest first.
#[utoipa::path(get, path = "/api/v1/alerts", tag = "alerts",
    params(
        ("house" = Option<String>, Query, description = "Only this house (a house token sees only its own)"),
        ("state" = Option<String>, Query, description = "active, acknowledged or cleared"),
        ("limit" = Option<u32>, Query, description = "1..=1000, default 100"),
    ),
    responses(
        (status = 200, body = Vec<Alert>),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn list_alerts(
    State(state): State<Arc<AppState>>,
    who: Principal,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<Alert>>, ApiError> {
    let params = query_pairs(raw)?;
    only(&params, &["house", "state", "limit"])?;
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
    Ok(Json(
        state
            .seams
            .alerts
            .list(house.as_deref(), alert_state, limit)
            .await?,
    ))
}

/// Acknowledge an alert; the change is pushed to WebSocket clients and webhooks.
#[utoipa::path(post, path = "/api/v1/alerts/{id}/ack", tag = "alerts",
    params(("id" = i64, Path, description = "Alert id")),
    responses(
        (status = 200, description = "Acknowledged (or already)", body = Alert),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
        (status = 409, description = "The alert is already cleared", body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn ack_alert(
    State(state): State<Arc<AppState>>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<Alert>, ApiError> {
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
    Ok(Json(alert))
}

// ---- pipeline and health ---------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
pub struct Pipeline {
    /// Per lane: depth (events), entries, pending, lag, owner, consumers.
    #[schema(value_type = Object)]
    pub queue: Value,
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
        queue: serde_json::to_value(&status).unwrap_or(Value::Null),
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
            Some(state.config.mqtt_listen.clone())
        } else {
            crate::mqtt::Endpoint::parse(&state.config.mqtt_url, "readyz")
                .ok()
                .map(|ep| format!("{}:{}", ep.host, ep.port))
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
