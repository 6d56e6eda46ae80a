//! Home Assistant MQTT discovery, by its documented format:
//! <https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery> (topics, abbreviations,
//! the `~` base topic), <https://www.home-assistant.io/integrations/sensor.mqtt/>,
//! <https://www.home-assistant.io/integrations/binary_sensor.mqtt/>,
//! <https://www.home-assistant.io/integrations/switch.mqtt/> (state topics, templates,
//! `payload_on`/`payload_off`, availability).
//!
//! A device announces each of its entities with a retained config message on
//! `homeassistant/{component}/[{node_id}/]{object_id}/config`: where its state is published, what
//! it measures (`device_class` → kind, `unit_of_measurement` → unit), how to read it
//! (`value_template`), and its availability topic. hearth reads `sensor`, `binary_sensor` and
//! `switch` entities; other components are ignored. An empty config removes the entity.
//!
//! Templates: the subset devices actually send, `{{ value }}`, `{{ value_json.a.b }}`,
//! `{{ value_json['a'] }}`, with the filters `float`, `int` (each with an optional default),
//! `round(n)` and `is_defined`. Anything else (conditions, arithmetic, Home Assistant's own functions) makes the
//! config one dead letter (`unsupported_template`), and its entity's states are then ignored,
//! never dead-lettered one by one.
//!
//! An entity's readings go to its device's sensor (the device's name), or to a channel
//! `{device}.{object_id}` when the object id does not name its kind (`outside_temperature`).
//! Availability topics give `availability` readings of the device.

mod registry;
mod template;

use std::sync::Arc;

use serde_json::{Map, Value};

pub use registry::{MAX_ENTITIES, Registry};
pub use template::Template;

use super::sources::slug;
use crate::event::{Reason, Rejection, truncate};
use crate::kinds;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Sensor,
    BinarySensor,
    Switch,
}

/// One availability topic of an entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Availability {
    pub topic: String,
    pub template: Option<Template>,
    pub available: String,
    pub not_available: String,
}

/// What a device's config announces about one entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub component: Component,
    pub state_topic: Option<String>,
    /// The device's sensor id (availability readings).
    pub device: String,
    /// The entity's sensor id: the device's, or a channel of it.
    pub sensor: String,
    pub kind: String,
    pub unit: Option<String>,
    pub template: Option<Template>,
    pub on: Value,
    pub off: Value,
    pub availability: Vec<Availability>,
    /// The device's model and maker, as announced.
    pub model: Option<String>,
    pub manufacturer: Option<String>,
    /// A config whose template hearth cannot evaluate: its states are ignored.
    pub unsupported: bool,
}

/// A config message read: the entity it announces, or its removal (`None`).
#[derive(Debug, Clone)]
pub struct Announcement {
    pub config_topic: String,
    pub payload: Vec<u8>,
    pub entity: Option<Arc<Entity>>,
    /// Why the config costs a dead letter though it is kept (an unsupported template).
    pub refused: Option<Rejection>,
}

/// The abbreviations of config keys (Home Assistant's `abbreviations.py`, the keys hearth reads).
const ABBREVIATIONS: &[(&str, &str)] = &[
    ("avty", "availability"),
    ("avty_t", "availability_topic"),
    ("avty_tpl", "availability_template"),
    ("dev", "device"),
    ("dev_cla", "device_class"),
    ("name", "name"),
    ("obj_id", "object_id"),
    ("pl_avail", "payload_available"),
    ("pl_not_avail", "payload_not_available"),
    ("pl_off", "payload_off"),
    ("pl_on", "payload_on"),
    ("stat_off", "state_off"),
    ("stat_on", "state_on"),
    ("stat_t", "state_topic"),
    ("t", "topic"),
    ("uniq_id", "unique_id"),
    ("unit_of_meas", "unit_of_measurement"),
    ("val_tpl", "value_template"),
    ("ids", "identifiers"),
    ("mf", "manufacturer"),
    ("mdl", "model"),
    ("sw", "sw_version"),
    ("hw", "hw_version"),
];

fn expand(obj: &Map<String, Value>, base: Option<&str>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in obj {
        let key = ABBREVIATIONS
            .iter()
            .find(|(a, _)| a == k)
            .map_or(k.as_str(), |(_, full)| full);
        let v = match v {
            Value::String(s) if key.ends_with("topic") => Value::String(with_base(s, base)),
            Value::Object(o) => Value::Object(expand(o, base)),
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| match i {
                        Value::Object(o) => Value::Object(expand(o, base)),
                        other => other.clone(),
                    })
                    .collect(),
            ),
            other => other.clone(),
        };
        out.insert(key.to_string(), v);
    }
    out
}

fn with_base(topic: &str, base: Option<&str>) -> String {
    match base {
        Some(b) if topic.starts_with('~') => format!("{b}{}", &topic[1..]),
        Some(b) if topic.ends_with('~') => format!("{}{b}", &topic[..topic.len() - 1]),
        _ => topic.to_string(),
    }
}

/// The kind an entity's `device_class` means.
fn kind_of(component: Component, device_class: Option<&str>, object: &str) -> String {
    let class = match device_class {
        Some(c) => c,
        None if component == Component::Switch => "switch",
        None => return object.to_ascii_lowercase(),
    };
    let kind = match (component, class) {
        (Component::Switch, _) => "switch",
        (Component::Sensor, "atmospheric_pressure") => "pressure",
        (Component::Sensor, "carbon_monoxide") => "co_level",
        (Component::BinarySensor, "battery") => "battery_low",
        (Component::BinarySensor, "window") => "window",
        (_, class) => kinds::canonical(class),
    };
    kind.to_string()
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Read one config message on `topic`: `levels` are its levels after the discovery prefix
/// (`{component}/[{node_id}/]{object_id}/config`).
pub fn announcement(
    topic: &str,
    levels: &[&str],
    payload: &[u8],
) -> Result<Option<Announcement>, Rejection> {
    let config_topic = topic.to_string();
    let (component, node, object) = match levels {
        [c, object, "config"] => (*c, None, *object),
        [c, node, object, "config"] => (*c, Some(*node), *object),
        _ => return Ok(None),
    };
    let component = match component {
        "sensor" => Component::Sensor,
        "binary_sensor" => Component::BinarySensor,
        "switch" => Component::Switch,
        _ => return Ok(None),
    };
    if payload.is_empty() {
        return Ok(Some(Announcement {
            config_topic,
            payload: Vec::new(),
            entity: None,
            refused: None,
        }));
    }
    let raw: Map<String, Value> = match serde_json::from_slice(payload) {
        Ok(Value::Object(o)) => o,
        Ok(other) => {
            return Err(super::reading::wrong_type(
                "a discovery config",
                "an object",
                &other,
            ));
        }
        Err(e) => return Err(Rejection::new(Reason::MalformedJson, e.to_string())),
    };
    let base = raw.get("~").and_then(Value::as_str).map(str::to_string);
    let c = expand(&raw, base.as_deref());
    // hearth's own alerts, announced to Home Assistant: not read back.
    if c.get("unique_id")
        .and_then(Value::as_str)
        .is_some_and(|u| u.starts_with(crate::alerts::mqtt::OWN_PREFIX))
    {
        return Ok(None);
    }
    let device_info = c.get("device").and_then(Value::as_object);
    let device_name = device_info
        .and_then(|d| d.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| node.map(str::to_string))
        .or_else(|| {
            device_info
                .and_then(|d| d.get("identifiers"))
                .and_then(|i| match i {
                    Value::Array(a) => text(a.first()),
                    other => text(Some(other)),
                })
        })
        .unwrap_or_else(|| object.to_string());
    let no_id = || Rejection::new(Reason::BadId, "the config leaves no sensor id");
    let device = slug(&device_name).ok_or_else(no_id)?;
    let object = slug(object).ok_or_else(no_id)?;
    let kind = kind_of(
        component,
        c.get("device_class").and_then(Value::as_str),
        &object,
    );
    if !crate::event::is_valid_id(&kind) {
        return Err(Rejection::new(
            Reason::BadId,
            format!("kind {:?} is not an id", truncate(&kind, 64)),
        ));
    }
    let sensor = if kinds::canonical(&object.to_ascii_lowercase()) == kind {
        device.clone()
    } else {
        slug(&format!("{device}.{object}")).ok_or_else(no_id)?
    };
    let mut unsupported = None;
    let mut template = |key: &str, obj: &Map<String, Value>| -> Option<Template> {
        let t = obj.get(key).and_then(Value::as_str)?;
        match Template::parse(t) {
            Ok(t) => Some(t),
            Err(why) => {
                unsupported.get_or_insert(why);
                None
            }
        }
    };
    let value_template = template("value_template", &c);
    let (on_key, off_key) = match component {
        Component::Switch => ("state_on", "state_off"),
        _ => ("payload_on", "payload_off"),
    };
    let on = c
        .get(on_key)
        .or_else(|| c.get("payload_on"))
        .cloned()
        .unwrap_or_else(|| Value::String("ON".into()));
    let off = c
        .get(off_key)
        .or_else(|| c.get("payload_off"))
        .cloned()
        .unwrap_or_else(|| Value::String("OFF".into()));
    let available = text(c.get("payload_available")).unwrap_or_else(|| "online".into());
    let not_available = text(c.get("payload_not_available")).unwrap_or_else(|| "offline".into());
    let mut availability = Vec::new();
    if let Some(t) = c.get("availability_topic").and_then(Value::as_str) {
        availability.push(Availability {
            topic: t.to_string(),
            template: template("availability_template", &c),
            available: available.clone(),
            not_available: not_available.clone(),
        });
    }
    for a in c
        .get("availability")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
    {
        if let Some(t) = a.get("topic").and_then(Value::as_str) {
            availability.push(Availability {
                topic: t.to_string(),
                template: template("value_template", a),
                available: text(a.get("payload_available")).unwrap_or_else(|| available.clone()),
                not_available: text(a.get("payload_not_available"))
                    .unwrap_or_else(|| not_available.clone()),
            });
        }
    }
    let info = |key: &str| {
        device_info
            .and_then(|d| d.get(key))
            .and_then(Value::as_str)
            .map(|s| truncate(s, 64).to_string())
    };
    let entity = Entity {
        component,
        state_topic: c
            .get("state_topic")
            .and_then(Value::as_str)
            .map(str::to_string),
        device,
        sensor,
        unit: c
            .get("unit_of_measurement")
            .and_then(Value::as_str)
            .map(str::to_string),
        kind,
        template: value_template,
        on,
        off,
        availability,
        model: info("model"),
        manufacturer: info("manufacturer"),
        unsupported: unsupported.is_some(),
    };
    Ok(Some(Announcement {
        config_topic,
        payload: payload.to_vec(),
        entity: Some(Arc::new(entity)),
        // Kept (its states are then ignored), and refused once, here.
        refused: unsupported.map(|why| {
            Rejection::new(
                Reason::UnsupportedTemplate,
                format!("{why}; the entity's states are ignored"),
            )
        }),
    }))
}

/// What a template produced.
fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        other => other.to_string(),
    }
}

/// A state message of `entity`: its reading's value (a number, or a boolean for a binary
/// entity), or none for "no value" states (`unknown`, `nan`, a payload matching neither
/// `payload_on` nor `payload_off`).
pub fn state(entity: &Entity, payload: &[u8]) -> Result<Option<Value>, Rejection> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| Rejection::new(Reason::MalformedJson, "a state is UTF-8 text"))?
        .trim();
    let value = match &entity.template {
        Some(t) => match t.eval(text)? {
            Some(v) => v,
            None => return Ok(None),
        },
        None => Value::String(text.to_string()),
    };
    match entity.component {
        Component::Sensor => {
            let n = match &value {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok().filter(|v| v.is_finite()),
                _ => None,
            };
            let none = matches!(
                render(&value).to_ascii_lowercase().as_str(),
                "" | "nan" | "unknown" | "unavailable" | "none" | "null"
            );
            match n {
                Some(n) => Ok(serde_json::Number::from_f64(n).map(Value::Number)),
                None if none => Ok(None),
                None => Err(Rejection::new(
                    Reason::WrongType,
                    format!(
                        "{} state {:?} is not a number",
                        entity.kind,
                        truncate(&render(&value), 32)
                    ),
                )),
            }
        }
        Component::BinarySensor | Component::Switch => {
            let is = |expected: &Value| match (expected, &value) {
                (Value::Bool(a), Value::Bool(b)) => a == b,
                (e, v) => render(e) == render(v),
            };
            Ok(if is(&entity.on) {
                Some(Value::Bool(true))
            } else if is(&entity.off) {
                Some(Value::Bool(false))
            } else {
                None
            })
        }
    }
}

/// An availability message: online or offline, or neither.
pub fn available(a: &Availability, payload: &[u8]) -> Result<Option<bool>, Rejection> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| Rejection::new(Reason::MalformedJson, "availability is UTF-8 text"))?
        .trim();
    let value = match &a.template {
        Some(t) => match t.eval(text)? {
            Some(v) => render(&v),
            None => return Ok(None),
        },
        None => text.to_string(),
    };
    Ok(if value == a.available {
        Some(true)
    } else if value == a.not_available {
        Some(false)
    } else {
        None
    })
}

/// The readings a message on a discovered entity's state or availability topic gives.
pub fn readings(
    registry: &Registry,
    house: &str,
    topic: &str,
    payload: &[u8],
    received_us: i64,
    limits: &super::Limits,
) -> super::Decoded {
    let ctx = super::reading::Context {
        house_id: house.to_string(),
        sensor_id: String::new(),
        received_us,
        limits,
    };
    let mut r = super::device::Readings::new(&ctx);
    let mut devices_told: Vec<String> = Vec::new();
    for e in registry.entities(topic) {
        if e.state_topic.as_deref() == Some(topic) && !e.unsupported {
            match state(&e, payload) {
                Ok(Some(v)) => r.add(&e.sensor, &e.kind, &v, e.unit.as_deref()),
                Ok(None) => {}
                Err(why) => r.refuse(why),
            }
        }
        for a in e.availability.iter().filter(|a| a.topic == topic) {
            if devices_told.contains(&e.device) {
                continue;
            }
            match available(a, payload) {
                Ok(Some(online)) => {
                    devices_told.push(e.device.clone());
                    r.add(&e.device, "availability", &Value::Bool(online), None);
                }
                Ok(None) => {}
                Err(why) => r.refuse(why),
            }
        }
    }
    r.done()
}

#[cfg(test)]
mod tests;
