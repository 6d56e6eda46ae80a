//! `POST /api/v1/events` (CONTRACT §5): readings over HTTP, through the one intake.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::AppState;
use super::auth::Principal;
use super::error::ApiError;
use crate::codec;
use crate::intake::Input;

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

/// One reading sent to `POST /events` (the schema of what the route reads; the native MQTT
/// payload with its house and sensor).
#[derive(serde::Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct ReadingIn {
    #[schema(pattern = r"^[A-Za-z0-9_.-]{1,64}$")]
    pub house_id: String,
    #[schema(pattern = r"^[A-Za-z0-9_.-]{1,64}$")]
    pub sensor_id: String,
    /// temperature, humidity, motion, door, smoke… (a kind hearth knows, or any id).
    #[schema(pattern = r"^[A-Za-z0-9_.-]{1,64}$")]
    pub kind: String,
    /// The reading (`true`/`false` are accepted for binary kinds, as 1/0).
    pub value: f64,
    /// The unit sent; converted to the kind's canonical unit when hearth knows both.
    pub unit: Option<String>,
    /// The device's counter: with (house, sensor, kind) the dedup key.
    #[schema(minimum = 0)]
    pub seq: Option<i64>,
    /// Reading time, epoch milliseconds (or an RFC 3339 instant); default: when received.
    #[schema(minimum = 0)]
    pub ts: Option<i64>,
}

/// A reading, or an array of them (at most `max_readings_per_message`).
#[derive(serde::Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum ReadingsIn {
    One(ReadingIn),
    Many(Vec<ReadingIn>),
}

/// Refused readings listed in a `POST /events` answer (the count and reasons cover them all).
const LISTED_REJECTIONS: usize = 10;

/// Largest `POST /events` body.
const MAX_BODY: usize = 1024 * 1024;

/// Ingest readings over HTTP: one object or an array, each with `house_id` and `sensor_id`
/// beside the fields of the MQTT payload. Answered 202 once durably queued.
#[utoipa::path(post, path = "/api/v1/events", tag = "events",
    request_body(content = ReadingsIn, description = "A reading or an array of them (at most `max_readings_per_message`)", content_type = "application/json"),
    responses(
        (status = 202, description = "Queued (and the refused ones dead-lettered, in one letter)", body = Accepted),
        (status = 400, description = "Not a reading or an array of readings", body = super::error::ErrorBody),
        (status = 401, description = "No or bad token", body = super::error::ErrorBody),
        (status = 429, description = "Past the token's rate: retry after `Retry-After` seconds", body = super::error::ErrorBody),
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
    // Past axum's own limit (2 MiB) the body is not even read.
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(e.body_text()),
        _ => ApiError::BadRequest(e.body_text()),
    })?;
    let accepted = ingest(&state, &who, &body).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// Readings (a JSON reading or an array of them) through the one intake, within what `who`
/// may write: the core of `POST /events`, and of gRPC's `Ingest` and `IngestStream`.
pub(crate) async fn ingest(
    state: &AppState,
    who: &Principal,
    body: &[u8],
) -> Result<Accepted, ApiError> {
    let limits = state.intake.limits();
    if body.len() > MAX_BODY {
        return Err(ApiError::TooLarge(format!(
            "the body is {} bytes, the limit is {MAX_BODY}",
            body.len()
        )));
    }
    let items = codec::http::readings(body, limits).map_err(|r| match r.reason {
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
    Ok(Accepted {
        accepted: input.events.len(),
        rejected: refused.len(),
        reasons,
        first_rejected,
    })
}
