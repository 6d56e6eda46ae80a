//! The seed's minimal form: topic `maison/capteurs/{sensor}`, payload one flat object such as
//! `{"temp": 22.5}` or `{"temp": 21.0, "hum": 40}`.
//!
//! The house is `maison` and the sensor is the topic's last level. Each numeric or boolean key is
//! one reading; its kind is the key, with the usual short names expanded (`temp` → temperature,
//! `hum` → humidity, ...), and `value` meaning "the kind the sensor is named after". `ts`, `seq`
//! and `unit` apply to every reading of the message.

use serde_json::Value;

use super::Decoded;
use super::reading::{self, Context, Fields};
use crate::event::{Reason, Rejection};

const SHARED: &[&str] = &["ts", "seq", "unit"];

pub fn decode(ctx: &Context<'_>, payload: Value) -> Decoded {
    let mut out = Decoded::default();
    let obj = match payload {
        Value::Object(obj) => obj,
        // A bare number is what the simplest sensors send: a reading of the sensor's own kind.
        value @ (Value::Number(_) | Value::Bool(_)) => {
            out.push(reading::build(
                ctx,
                Fields {
                    kind: &ctx.sensor_id,
                    value: Some(&value),
                    ..Fields::default()
                },
            ));
            return out;
        }
        other => {
            out.push(Err(reading::wrong_type("the payload", "an object", &other)));
            return out;
        }
    };
    if let Some(r) = ctx.limits.too_many(obj.len()) {
        out.push(Err(r));
        return out;
    }
    for (key, value) in obj.iter().filter(|(k, _)| !SHARED.contains(&k.as_str())) {
        let kind = match key.as_str() {
            "value" => ctx.sensor_id.as_str(),
            other => expand(other),
        };
        out.push(reading::build(
            ctx,
            Fields {
                kind,
                value: Some(value),
                unit: obj.get("unit"),
                seq: obj.get("seq"),
                ts: obj.get("ts"),
            },
        ));
    }
    if out.events.is_empty() && out.rejections.is_empty() {
        out.push(Err(Rejection::new(
            Reason::MissingField,
            "no reading in the payload",
        )));
    }
    out
}

fn expand(key: &str) -> &str {
    match key {
        "temp" | "t" => "temperature",
        "hum" | "h" => "humidity",
        "lux" => "light",
        "bat" | "batt" => "battery",
        "press" => "pressure",
        other => other,
    }
}
