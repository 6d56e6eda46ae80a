//! A sensor's readings of one kind, bucket by bucket (minute, hour, day), from the rollups: a
//! week of a chatty sensor in one request, whatever its raw rows ([`crate::series`]).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::auth::Principal;
use super::error::ApiError;
use super::params::{instant, only, query_pairs, valid_id};
use super::sensors::sensor_of;
use crate::series::{MAX_POINTS, Point, SeriesQuery, Step};

#[derive(Debug, Serialize, ToSchema)]
pub struct Series {
    pub house_id: String,
    pub sensor_id: String,
    pub kind: String,
    /// `minute`, `hour` or `day`.
    pub step: String,
    /// Buckets with readings, oldest first (a bucket without readings is absent).
    pub points: Vec<Point>,
}

/// A sensor's kind per minute, hour or day: count, min, max, average and last value of each
/// bucket (UTC), oldest first.
#[utoipa::path(get, path = "/api/v1/houses/{house}/sensors/{sensor}/series", tag = "sensors",
    params(
        ("house" = String, Path, description = "House id", pattern = r"^[A-Za-z0-9_.-]{1,64}$"),
        ("sensor" = String, Path, description = "Sensor id (within the house)", pattern = r"^[A-Za-z0-9_.-]{1,64}$"),
        ("kind" = String, Query, description = "The kind (a sensor may have several)", pattern = r"^[A-Za-z0-9_.-]{1,64}$"),
        ("step" = Option<Step>, Query, description = "Bucket width, default `hour`"),
        ("from" = Option<i64>, Query, description = "Buckets starting at or after: epoch milliseconds (or an RFC 3339 instant); default: 1,000 steps before `to`, and never more than 1,000 steps before it", minimum = 0, maximum = 95_617_584_000_000_i64),
        ("to" = Option<i64>, Query, description = "Buckets starting before: epoch milliseconds (or an RFC 3339 instant); default: now", minimum = 0, maximum = 95_617_584_000_000_i64),
    ),
    responses(
        (status = 200, body = Series),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 429, description = "Past the token's rate: retry after `Retry-After` seconds", body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn sensor_series(
    State(state): State<Arc<AppState>>,
    who: Principal,
    Path((house, sensor)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Series>, ApiError> {
    let params = query_pairs(raw)?;
    only(&params, &["kind", "step", "from", "to"])?;
    let kind = params
        .get("kind")
        .cloned()
        .ok_or_else(|| ApiError::BadRequest("kind is required".into()))?;
    valid_id("kind", &kind)?;
    let step = match params.get("step") {
        None => Step::Hour,
        Some(s) => Step::parse(s)
            .ok_or_else(|| ApiError::BadRequest("step must be minute, hour or day".into()))?,
    };
    let to = match params.get("to") {
        Some(v) => instant("to", v)?,
        None => crate::event::now_us() / 1000 + step.ms(),
    };
    let from = match params.get("from") {
        Some(v) => instant("from", v)?,
        None => (to - 1_000 * step.ms()).max(0),
    };
    sensor_of(&state, &who, &house, &sensor).await?;
    if from >= to {
        // An empty range, as the history route answers it.
        return Ok(Json(Series {
            house_id: house,
            sensor_id: sensor,
            kind,
            step: step.name().into(),
            points: Vec::new(),
        }));
    }
    if (to - from) / step.ms() > MAX_POINTS {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_POINTS} {}s in one request",
            step.name()
        )));
    }
    let q = SeriesQuery {
        house,
        sensor,
        kind,
        step,
        from: step.bucket(from),
        to,
    };
    let points = state.seams.store.series(&q).await?;
    Ok(Json(Series {
        house_id: q.house,
        sensor_id: q.sensor,
        kind: q.kind,
        step: step.name().into(),
        points,
    }))
}
