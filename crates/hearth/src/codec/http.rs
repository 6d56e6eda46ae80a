//! HTTP ingestion (`POST /api/v1/events`): readings that name their house and sensor
//! themselves, then go through the same checks as the native MQTT format.

use serde_json::{Map, Value};

use super::reading::{self, Context};
use super::{Decoded, Limits, native};
use crate::event::{Event, Reason, Rejection, is_valid_id};

/// The body's readings: one object or an array of them (at most `limits.max_readings`).
pub fn readings(body: &[u8], limits: &Limits) -> Result<Vec<Value>, Rejection> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) if items.is_empty() => Err(Rejection::new(
            Reason::MissingField,
            "empty array: no readings",
        )),
        Ok(Value::Array(items)) => match limits.too_many(items.len()) {
            Some(r) => Err(r),
            None => Ok(items),
        },
        Ok(obj @ Value::Object(_)) => Ok(vec![obj]),
        Ok(other) => Err(reading::wrong_type(
            "the body",
            "a reading object or an array of them",
            &other,
        )),
        Err(e) => Err(Rejection::new(Reason::MalformedJson, e.to_string())),
    }
}

/// The house a reading names (to authorise it before anything else).
pub fn house_of(item: &Value) -> Option<&str> {
    item.get("house_id").and_then(Value::as_str)
}

/// One reading of an HTTP body, received at `received_us`.
pub fn event(item: &Value, received_us: i64, limits: &Limits) -> Result<Event, Rejection> {
    let obj: &Map<String, Value> = item
        .as_object()
        .ok_or_else(|| reading::wrong_type("a reading", "an object", item))?;
    let id = |field: &str| -> Result<String, Rejection> {
        match obj.get(field) {
            Some(Value::String(s)) if is_valid_id(s) => Ok(s.clone()),
            Some(Value::String(s)) => Err(Rejection::new(
                Reason::BadId,
                format!(
                    "{field} {:?} is not [A-Za-z0-9_.-]{{1,64}}",
                    super::truncate(s, 80)
                ),
            )),
            None | Some(Value::Null) => Err(Rejection::new(
                Reason::MissingField,
                format!("{field} is missing"),
            )),
            Some(other) => Err(reading::wrong_type(field, "a string", other)),
        }
    };
    let ctx = Context {
        house_id: id("house_id")?,
        sensor_id: id("sensor_id")?,
        received_us,
        limits,
    };
    native::one(&ctx, obj)
}

/// The readings of an HTTP body, each judged alone: the events, and the refused readings as the
/// body's decoded form (details prefixed `reading {i}:`) with the index of each.
pub fn events(items: &[Value], received_us: i64, limits: &Limits) -> (Decoded, Vec<usize>) {
    let mut out = Decoded::default();
    let mut refused = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match event(item, received_us, limits) {
            Ok(e) => out.events.push(e),
            Err(mut r) => {
                r.detail = format!("reading {i}: {}", r.detail);
                out.rejections.push(r);
                refused.push(i);
            }
        }
    }
    (out, refused)
}

/// A whole body, as `POST /events` reads it (a replayed dead letter is decoded again here).
pub fn decode(body: &[u8], received_us: i64, limits: &Limits) -> Decoded {
    match readings(body, limits) {
        Ok(items) => events(&items, received_us, limits).0,
        Err(r) => Decoded {
            rejections: vec![r],
            ..Decoded::default()
        },
    }
}
