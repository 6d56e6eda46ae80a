//! The native format (CONTRACT §3): topic `hearth/{house}/{sensor}`, payload one reading object or a
//! JSON array of them. A reading may repeat `house_id` and `sensor_id`; they must then match the
//! topic, so that a device cannot write into another house by naming it in the payload.

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::Decoded;
use super::reading::{self, Context, Fields};
use crate::event::{Event, Reason, Rejection};

/// The common shape, one reading object whose fields have the expected types, read without
/// building a JSON tree (a map of owned keys per message, measured as most of the decode's
/// allocations). Only these fields: another one might hold what the tree refuses (a number
/// out of range), so it goes the tree's way.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Plain<'a> {
    #[serde(borrow, default)]
    house_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    sensor_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    value: Option<Value>,
    #[serde(default)]
    unit: Option<Value>,
    #[serde(default)]
    seq: Option<Value>,
    #[serde(default)]
    ts: Option<Value>,
}

/// Decode a native payload: the plain shape at once; anything else (an array, a field of
/// another type, ids that differ from the topic's, a duplicated field, bad JSON) through the
/// JSON tree, which says what is wrong. Both give the same events for what the plain shape reads.
pub fn decode_payload(ctx: &Context<'_>, payload: &[u8]) -> Decoded {
    if let Ok(p) = serde_json::from_slice::<Plain<'_>>(payload) {
        let matches = |id: &Option<Cow<'_, str>>, expected: &str| {
            id.as_deref().is_none_or(|id| id == expected)
        };
        if matches(&p.house_id, &ctx.house_id) && matches(&p.sensor_id, &ctx.sensor_id) {
            let mut out = Decoded::default();
            out.push(reading::build(
                ctx,
                Fields {
                    kind: &p.kind,
                    value: p.value.as_ref(),
                    unit: p.unit.as_ref(),
                    seq: p.seq.as_ref(),
                    ts: p.ts.as_ref(),
                },
            ));
            return out;
        }
    }
    match serde_json::from_slice(payload) {
        Ok(value) => decode(ctx, value),
        Err(e) => Decoded::rejected(Reason::MalformedJson, e.to_string()),
    }
}

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
