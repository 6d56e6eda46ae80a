//! ESPHome's MQTT client, by its documented format: <https://esphome.io/components/mqtt.html>
//! (state topics, birth and last will messages).
//!
//! - `{node}/sensor/{name}/state`: the value as plain text (`22.5`); `nan` is a sensor with no
//!   reading yet: no reading, and no error.
//! - `{node}/binary_sensor/{name}/state`, `{node}/switch/{name}/state`: `ON`/`OFF`.
//! - `{node}/status`: `online`/`offline` (the birth message and the last will): an
//!   `availability` reading of the node.
//!
//! A state topic carries no device class or unit (Home Assistant discovery does, and a node
//! that announces itself is read through it): the kind comes from the entity's name. A name
//! that is a kind (`temperature`) is the node's own reading; a name that holds one
//! (`outside_temperature`) is a channel, sensor `{node}.{name}`, of that kind; any other name
//! is a channel of its own kind. Values are taken to be in the kind's canonical unit.

use serde_json::Value;

use super::Decoded;
use super::device::{Readings, text, text_on_off};
use super::reading::Context;
use super::sources::slug;
use crate::event::{Reason, Rejection};

/// The words a name is searched for, and the kind each means.
const WORDS: &[(&str, &str)] = &[
    ("temperature", "temperature"),
    ("humidity", "humidity"),
    ("pressure", "pressure"),
    ("illuminance", "light"),
    ("co2", "co2"),
    ("battery", "battery"),
    ("power", "power"),
    ("energy", "energy"),
    ("voltage", "voltage"),
    ("current", "current"),
    ("motion", "motion"),
    ("occupancy", "motion"),
    ("presence", "motion"),
    ("pir", "motion"),
    ("door", "door"),
    ("window", "window"),
    ("smoke", "smoke"),
    ("water_leak", "water_leak"),
    ("leak", "water_leak"),
];

pub fn decode(ctx: &Context<'_>, rest: &[&str], payload: &[u8]) -> Decoded {
    let mut r = Readings::new(ctx);
    let state = match text(payload) {
        Ok(s) => s,
        Err(why) => return Decoded::rejected(why.reason, why.detail),
    };
    let Some(node) = rest.first().and_then(|n| slug(n)) else {
        return Decoded::rejected(Reason::BadId, "no sensor id in the topic");
    };
    match rest {
        [_, "status"] => match text_on_off(state) {
            Some(online) => r.add(&node, "availability", &Value::Bool(online), None),
            None => r.refuse(Rejection::new(
                Reason::WrongType,
                "status is online or offline",
            )),
        },
        [_, domain, name, "state"] => {
            let (sensor, kind) = entity(&node, domain, name);
            let Some(sensor) = sensor else {
                r.refuse(Rejection::new(Reason::BadId, "no sensor id in the topic"));
                return r.done();
            };
            match *domain {
                // No reading yet (`nan`, `None` since 2024.12).
                "sensor" if state.eq_ignore_ascii_case("nan") || state == "None" => {}
                "sensor" => match state.parse::<f64>() {
                    Ok(v) if v.is_finite() => match serde_json::Number::from_f64(v) {
                        Some(n) => r.add(&sensor, &kind, &Value::Number(n), None),
                        None => r.refuse(Rejection::new(Reason::NotFinite, "not finite")),
                    },
                    Ok(_) => r.refuse(Rejection::new(Reason::NotFinite, "value is not finite")),
                    // A text sensor publishes under `sensor/` too: its state is not a reading.
                    Err(_) => {}
                },
                _ => match text_on_off(state) {
                    Some(on) => r.add(&sensor, &kind, &Value::Bool(on), None),
                    None => r.refuse(Rejection::new(Reason::WrongType, "a state is ON or OFF")),
                },
            }
        }
        _ => {}
    }
    r.done()
}

/// The sensor and kind of entity `name` of a node.
/// A switch is a switch whatever its name; a sensor's name is searched for measured kinds, a
/// binary sensor's for binary ones.
fn entity(node: &str, domain: &str, name: &str) -> (Option<String>, String) {
    let name = slug(name).unwrap_or_else(|| "_".into());
    let lower = name.to_ascii_lowercase();
    let binary = |k: &str| crate::kinds::value_rule(k) == crate::kinds::ValueRule::Boolean;
    let fits = |k: &str| match domain {
        "sensor" => !binary(k),
        _ => binary(k),
    };
    let own = match domain {
        "switch" => "switch",
        _ => crate::kinds::canonical(&lower),
    };
    if own == "switch" && domain == "switch" && lower != "switch" {
        return (slug(&format!("{node}.{name}")), own.to_string());
    }
    if own == "switch" || WORDS.iter().any(|(_, k)| *k == own && fits(k)) {
        return (Some(node.to_string()), own.to_string());
    }
    let channel = slug(&format!("{node}.{name}"));
    match WORDS.iter().find(|(w, k)| lower.contains(w) && fits(k)) {
        Some((_, kind)) => (channel, kind.to_string()),
        None => (channel, lower),
    }
}
