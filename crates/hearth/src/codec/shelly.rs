//! Shelly Gen2+ firmware, by its documented format:
//! <https://shelly-api-docs.shelly.cloud/gen2/General/Notifications> (`NotifyStatus`,
//! `NotifyFullStatus`, `NotifyEvent`),
//! <https://shelly-api-docs.shelly.cloud/gen2/ComponentsAndServices/Mqtt> (topics) and each
//! component's status (`Switch`, `PM1`, `Temperature`, `Humidity`, `Illuminance`,
//! `DevicePower`, `Smoke`, `Flood`, `Input`).
//!
//! - `{id}/events/rpc`: JSON-RPC notifications. `NotifyStatus` carries only what changed (a
//!   partial update: only the fields present become readings), `NotifyFullStatus` everything;
//!   `params.ts` is in seconds and becomes the readings' time. Each `component:N` is a reading
//!   source: `switch`/`pm1` (`apower` W, `voltage`, `current`, `aenergy.total` in Wh → kWh,
//!   `output` a switch, `temperature.tC` the device's own temperature), `temperature` (`tC`),
//!   `humidity` (`rh`), `illuminance` (`lux`), `devicepower` (`battery.percent`), `smoke` and
//!   `flood` (`alarm`), `input` (`state`). Component 0 is the device's own sensor, component N
//!   the channel `{device}.N`. `sys`, `wifi`, `cloud`, `mqtt`, `ble` and `NotifyEvent` are
//!   housekeeping, ignored.
//! - `{id}/online`: `true`/`false`, the device's last will: an `availability` reading.

use serde_json::{Map, Value};

use super::Decoded;
use super::device::{Readings, text, text_on_off};
use super::reading::Context;
use super::sources::slug;
use crate::event::{Reason, Rejection};

pub fn decode(ctx: &Context<'_>, rest: &[&str], payload: &[u8]) -> Decoded {
    let mut r = Readings::new(ctx);
    match rest {
        [id, "online"] => match (slug(id), text(payload).map(text_on_off)) {
            (Some(device), Ok(Some(online))) => {
                r.add(&device, "availability", &Value::Bool(online), None)
            }
            (None, _) => r.refuse(Rejection::new(Reason::BadId, "no sensor id in the topic")),
            (_, Ok(None)) => r.refuse(Rejection::new(Reason::WrongType, "online is true or false")),
            (_, Err(why)) => r.refuse(why),
        },
        [id, "events", "rpc"] => match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(o)) => notification(&mut r, id, &o),
            Ok(other) => r.refuse(super::reading::wrong_type(
                "a notification",
                "an object",
                &other,
            )),
            Err(e) => r.refuse(Rejection::new(Reason::MalformedJson, e.to_string())),
        },
        _ => {}
    }
    r.done()
}

/// The device a message is about: the notification's `src`, else the topic's id.
pub fn device_name(rest: &[&str], payload: &[u8]) -> Option<String> {
    let src = match rest {
        [_, "events", "rpc"] => serde_json::from_slice::<Value>(payload)
            .ok()
            .and_then(|v| v.get("src").and_then(Value::as_str).map(str::to_string)),
        _ => None,
    };
    src.or_else(|| rest.first().map(|id| id.to_string()))
}

fn notification(r: &mut Readings<'_>, topic_id: &str, n: &Map<String, Value>) {
    let method = n.get("method").and_then(Value::as_str);
    if !matches!(method, Some("NotifyStatus" | "NotifyFullStatus")) {
        return; // NotifyEvent, replies to RPC calls: housekeeping.
    }
    let Some(params) = n.get("params").and_then(Value::as_object) else {
        r.refuse(Rejection::new(Reason::MissingField, "params is missing"));
        return;
    };
    let id = n.get("src").and_then(Value::as_str).unwrap_or(topic_id);
    let Some(device) = slug(id) else {
        r.refuse(Rejection::new(Reason::BadId, "no sensor id in src"));
        return;
    };
    if let Some(ts) = params.get("ts").and_then(Value::as_f64)
        && ts.is_finite()
        // Before its clock is set a device counts seconds since boot: then the receive time.
        && ts > 946_684_800.0
        && ts < 1.0e11
    {
        r.at_ms((ts * 1000.0).round() as i64);
    }
    for (key, status) in params {
        let (Some((component, n)), Value::Object(status)) = (key.split_once(':'), status) else {
            continue;
        };
        let Ok(n) = n.parse::<u32>() else { continue };
        let sensor = match n {
            0 => Some(device.clone()),
            n => slug(&format!("{device}.{n}")),
        };
        let Some(sensor) = sensor else { continue };
        let mut add = |kind: &str, value: Option<&Value>, unit: Option<&str>| {
            if let Some(v) = value.filter(|v| v.is_number() || v.is_boolean()) {
                r.add(&sensor, kind, v, unit);
            }
        };
        match component {
            "switch" | "pm1" => {
                add("power", status.get("apower"), Some("W"));
                add("voltage", status.get("voltage"), Some("V"));
                add("current", status.get("current"), Some("A"));
                add(
                    "energy",
                    status.get("aenergy").and_then(|a| a.get("total")),
                    Some("Wh"),
                );
                add("switch", status.get("output"), None);
                add(
                    "device_temperature",
                    status.get("temperature").and_then(|t| t.get("tC")),
                    Some("°C"),
                );
            }
            "temperature" => add("temperature", status.get("tC"), Some("°C")),
            "humidity" => add("humidity", status.get("rh"), Some("%")),
            "illuminance" => add("light", status.get("lux"), Some("lx")),
            "devicepower" => add(
                "battery",
                status.get("battery").and_then(|b| b.get("percent")),
                Some("%"),
            ),
            "smoke" => add("smoke", status.get("alarm"), None),
            "flood" => add("water_leak", status.get("alarm"), None),
            "input" => add("input", status.get("state"), None),
            _ => {}
        }
    }
}
