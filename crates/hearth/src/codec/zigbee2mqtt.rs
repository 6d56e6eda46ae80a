//! Zigbee2MQTT, by its documented format:
//! <https://www.zigbee2mqtt.io/guide/usage/mqtt_topics_and_messages.html> and the `exposes` of
//! each device page (<https://www.zigbee2mqtt.io/supported-devices/>).
//!
//! - `zigbee2mqtt/{friendly_name}`: the device's whole state, one JSON object of attributes
//!   (a friendly name may hold `/`). Each attribute that is a reading becomes one, on the sensor
//!   named after the device: `occupancy` is motion, `contact: true` means closed (door 0),
//!   `state: "ON"` is a switch on, `illuminance`/`illuminance_lux` is light in lx. `linkquality`,
//!   `last_seen`, `update`, `elapsed` and the like describe the radio or the firmware, not the
//!   home, and are not readings; nor is `voltage` on a battery device (its battery's, in mV).
//! - `zigbee2mqtt/{friendly_name}/availability`: `{"state":"online"}` (or the legacy plain
//!   `online`/`offline`): an `availability` reading.
//! - `zigbee2mqtt/{friendly_name}/{attribute}` with a plain value: the `output: attribute` mode.
//! - `zigbee2mqtt/bridge/…` (state, info, logging, devices, events, responses) and the command
//!   topics `…/set`, `…/get`: housekeeping, ignored.

use serde_json::{Map, Value};

use super::Decoded;
use super::device::{Readings, on_off, text_on_off};
use super::reading::Context;
use super::sources::slug;
use crate::event::{Reason, Rejection};

/// Attributes that describe the radio, the firmware or the device's settings.
const NOT_READINGS: &[&str] = &[
    "linkquality",
    "last_seen",
    "update",
    "update_available",
    "elapsed",
    "device",
    "power_on_behavior",
    "color",
    "color_mode",
    "color_temp",
    "color_temp_startup",
    "brightness",
    "action",
    "child_lock",
    "indicator_mode",
    "led_disabled_night",
    "sensitivity",
    "interval",
    "calibration",
];

pub fn decode(ctx: &Context<'_>, rest: &[&str], payload: &[u8]) -> Decoded {
    match rest {
        ["bridge", ..] => return Decoded::default(),
        [.., "set" | "get"] | [_, "set" | "get", ..] => return Decoded::default(),
        _ => {}
    }
    let parsed: Option<Value> = serde_json::from_slice(payload).ok();
    if let [name @ .., "availability"] = rest
        && !name.is_empty()
    {
        let state = match &parsed {
            Some(Value::Object(o)) => o.get("state").and_then(on_off),
            _ => super::device::text(payload).ok().and_then(text_on_off),
        };
        let mut r = Readings::new(ctx);
        match (state, device(name)) {
            (Some(online), Ok(sensor)) => {
                r.add(&sensor, "availability", &Value::Bool(online), None)
            }
            (None, _) => r.refuse(Rejection::new(
                Reason::WrongType,
                "availability must be {\"state\":\"online\"|\"offline\"} or online/offline",
            )),
            (_, Err(why)) => r.refuse(why),
        }
        return r.done();
    }
    match parsed {
        Some(Value::Object(attributes)) => state(ctx, rest, &attributes),
        // `output: attribute`: one attribute per topic, a plain value.
        Some(v @ (Value::Number(_) | Value::Bool(_) | Value::String(_))) if rest.len() >= 2 => {
            let (name, attribute) = rest.split_at(rest.len() - 1);
            let mut one = Map::new();
            one.insert(attribute[0].to_string(), v);
            state(ctx, name, &one)
        }
        None if rest.len() >= 2 => match super::device::text(payload) {
            Ok(t) => {
                let (name, attribute) = rest.split_at(rest.len() - 1);
                let mut one = Map::new();
                one.insert(attribute[0].to_string(), Value::String(t.to_string()));
                state(ctx, name, &one)
            }
            Err(why) => Decoded::rejected(why.reason, why.detail),
        },
        Some(other) => Decoded::rejected(
            Reason::WrongType,
            format!(
                "a Zigbee2MQTT state must be an object, got {}",
                super::reading::type_name(&other)
            ),
        ),
        None => Decoded::rejected(Reason::MalformedJson, "a Zigbee2MQTT state must be JSON"),
    }
}

/// Most bytes of a bridge's device list read, and most devices taken from it.
const CATALOG_MAX_BYTES: usize = 4 * 1024 * 1024;
const CATALOG_MAX_DEVICES: usize = 5_000;

/// What the bridge's retained `bridge/devices` says of each device: its model and vendor
/// (<https://www.zigbee2mqtt.io/guide/usage/mqtt_topics_and_messages.html#zigbee2mqtt-bridge-devices>).
/// The coordinator is not a device of the home; anything unreadable gives nothing.
pub fn catalog(payload: &[u8]) -> Vec<crate::seam::DeviceInfo> {
    if payload.len() > CATALOG_MAX_BYTES {
        return Vec::new();
    }
    let Ok(Value::Array(devices)) = serde_json::from_slice::<Value>(payload) else {
        return Vec::new();
    };
    let text = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(|s| crate::event::truncate(s, 64).to_string())
    };
    devices
        .iter()
        .filter(|d| d.get("type").and_then(Value::as_str) != Some("Coordinator"))
        .filter_map(|d| {
            let device_id = slug(d.get("friendly_name")?.as_str()?)?;
            let definition = d.get("definition");
            Some(crate::seam::DeviceInfo {
                device_id,
                ecosystem: "zigbee2mqtt".into(),
                model: text(definition.and_then(|x| x.get("model")))
                    .or_else(|| text(d.get("model_id"))),
                manufacturer: text(definition.and_then(|x| x.get("vendor")))
                    .or_else(|| text(d.get("manufacturer"))),
            })
        })
        .take(CATALOG_MAX_DEVICES)
        .collect()
}

/// The friendly name of the device a topic is about.
pub fn device_name(rest: &[&str]) -> Option<String> {
    let name = match rest {
        [name @ .., "availability"] => name,
        name => name,
    };
    (!name.is_empty()).then(|| name.join("/"))
}

fn device(name: &[&str]) -> Result<String, Rejection> {
    slug(&name.join("/")).ok_or_else(|| {
        Rejection::new(
            Reason::BadId,
            "the device's friendly name leaves no sensor id",
        )
    })
}

fn state(ctx: &Context<'_>, name: &[&str], attributes: &Map<String, Value>) -> Decoded {
    let sensor = match device(name) {
        Ok(s) => s,
        Err(why) => return Decoded::rejected(why.reason, why.detail),
    };
    let battery_device = attributes.contains_key("battery");
    let mut r = Readings::new(ctx);
    for (attribute, value) in attributes {
        if NOT_READINGS.contains(&attribute.as_str())
            || (attribute == "voltage" && battery_device)
            // Older releases sent both: the raw value and its conversion to lx.
            || (attribute == "illuminance" && attributes.contains_key("illuminance_lux"))
            || !crate::event::is_valid_id(attribute)
        {
            continue;
        }
        match (attribute.as_str(), value) {
            ("contact", v) => match on_off(v) {
                Some(closed) => r.add(&sensor, "door", &Value::Bool(!closed), None),
                None => r.refuse(super::reading::wrong_type("contact", "a boolean", v)),
            },
            ("state", v) => {
                if let Some(on) = on_off(v) {
                    r.add(&sensor, "switch", &Value::Bool(on), None)
                }
            }
            // A multi-gang switch: `state_l1`, `state_l2`, … each a channel.
            (channel, v) if channel.starts_with("state_") && on_off(v).is_some() => {
                if let Some(s) = slug(&format!("{sensor}.{}", &channel["state_".len()..])) {
                    r.add(&s, "switch", &Value::Bool(on_off(v) == Some(true)), None)
                }
            }
            (_, Value::Number(_) | Value::Bool(_)) => r.add(&sensor, attribute, value, None),
            // Text attributes (modes, actions, firmware ids), objects and lists: not readings.
            _ => {}
        }
    }
    r.done()
}
