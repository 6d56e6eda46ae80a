//! The native format (CONTRACT §3): topic `hearth/{house}/{sensor}`, payload one reading object or a
//! JSON array of them. A reading may repeat `house_id` and `sensor_id`; they must then match the
//! topic, so that a device cannot write into another house by naming it in the payload.

use serde_json::{Map, Value};

use super::Decoded;
use super::reading::{self, Context, Fields};
use crate::event::{Event, Reason, Rejection};

pub fn decode(ctx: &Context<'_>, payload: Value) -> Decoded {
    let mut out = Decoded::default();
    match payload {
        Value::Object(obj) => out.push(one(ctx, &obj)),
        Value::Array(items) if items.is_empty() => out.push(Err(Rejection::new(
            Reason::MissingField,
            "empty array: no readings",
        ))),
        Value::Array(items) if items.len() > ctx.limits.max_readings => out
            .push(Err(ctx.limits.too_many(items.len()).unwrap_or_else(|| {
                Rejection::new(Reason::TooManyReadings, "too many readings")
            }))),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let r = match item {
                    Value::Object(obj) => one(ctx, obj),
                    other => Err(reading::wrong_type("a reading", "an object", other)),
                };
                out.push(r.map_err(|mut rej| {
                    rej.detail = format!("reading {i}: {}", rej.detail);
                    rej
                }));
            }
        }
        other => out.push(Err(reading::wrong_type(
            "the payload",
            "a reading object or an array of them",
            &other,
        ))),
    }
    out
}

pub fn one(ctx: &Context<'_>, obj: &Map<String, Value>) -> Result<Event, Rejection> {
    for (field, expected, reason) in [
        ("house_id", &ctx.house_id, Reason::HouseMismatch),
        ("sensor_id", &ctx.sensor_id, Reason::BadId),
    ] {
        match obj.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == expected => {}
            Some(other) => {
                return Err(Rejection::new(
                    reason,
                    format!("{field} {other} in the payload differs from the topic's {expected:?}"),
                ));
            }
        }
    }
    let kind = match obj.get("kind") {
        Some(Value::String(k)) => k.as_str(),
        None | Some(Value::Null) => {
            return Err(Rejection::new(Reason::MissingField, "kind is missing"));
        }
        Some(other) => return Err(reading::wrong_type("kind", "a string", other)),
    };
    reading::build(
        ctx,
        Fields {
            kind,
            value: obj.get("value"),
            unit: obj.get("unit"),
            seq: obj.get("seq"),
            ts: obj.get("ts"),
        },
    )
}
