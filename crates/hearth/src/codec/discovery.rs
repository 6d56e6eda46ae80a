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

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};

use super::sources::slug;
use crate::event::{Reason, Rejection, truncate};
use crate::kinds;

/// Most bytes of a template hearth reads.
const MAX_TEMPLATE: usize = 256;

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

/// A template of the supported subset.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// Parsed from `value_json` (else the payload text), then these keys or indexes.
    json: bool,
    path: Vec<Step>,
    filters: Vec<Filter>,
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, PartialEq)]
enum Filter {
    Float(Option<f64>),
    Int(Option<f64>),
    Round(u32),
    /// `is_defined`: the value as it is (a missing one is no reading already).
    Defined,
}

impl Template {
    pub fn parse(t: &str) -> Result<Template, String> {
        let unsupported = || {
            format!(
                "template {:?} is outside the supported subset",
                truncate(t, 96)
            )
        };
        if t.len() > MAX_TEMPLATE {
            return Err(format!("template longer than {MAX_TEMPLATE} bytes"));
        }
        let inner = t
            .trim()
            .strip_prefix("{{")
            .and_then(|s| s.strip_suffix("}}"))
            .ok_or_else(unsupported)?;
        let mut s = inner.trim();
        // `(value_json.x | float)`: parentheses around the whole.
        while let Some(i) = s.strip_prefix('(').and_then(|x| x.strip_suffix(')')) {
            s = i.trim();
        }
        let mut parts = s.split('|');
        let head = parts.next().unwrap_or("").trim();
        let (json, rest) = if let Some(r) = head.strip_prefix("value_json") {
            (true, r)
        } else if let Some(r) = head.strip_prefix("value") {
            (false, r)
        } else {
            return Err(unsupported());
        };
        let mut path = Vec::new();
        let mut r = rest.trim();
        while !r.is_empty() {
            if let Some(x) = r.strip_prefix('.') {
                let end = x
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(x.len());
                if end == 0 {
                    return Err(unsupported());
                }
                path.push(Step::Key(x[..end].to_string()));
                r = &x[end..];
            } else if let Some(x) = r.strip_prefix('[') {
                let end = x.find(']').ok_or_else(unsupported)?;
                let key = x[..end].trim();
                let quoted = key
                    .strip_prefix('\'')
                    .and_then(|k| k.strip_suffix('\''))
                    .or_else(|| key.strip_prefix('"').and_then(|k| k.strip_suffix('"')));
                match (quoted, key.parse::<usize>()) {
                    (Some(k), _) => path.push(Step::Key(k.to_string())),
                    (None, Ok(i)) => path.push(Step::Index(i)),
                    _ => return Err(unsupported()),
                }
                r = &x[end + 1..];
            } else {
                return Err(unsupported());
            }
            r = r.trim_start();
        }
        if !json && !path.is_empty() {
            return Err(unsupported());
        }
        let mut filters = Vec::new();
        for f in parts {
            let f = f.trim();
            let (name, arg) = match f.split_once('(') {
                Some((n, a)) => (
                    n.trim(),
                    Some(a.strip_suffix(')').ok_or_else(unsupported)?.trim()),
                ),
                None => (f, None),
            };
            let number = |a: Option<&str>| -> Result<Option<f64>, String> {
                match a {
                    None | Some("") => Ok(None),
                    Some(a) => a.parse::<f64>().map(Some).map_err(|_| unsupported()),
                }
            };
            filters.push(match name {
                "float" => Filter::Float(number(arg)?),
                "is_defined" if arg.is_none() => Filter::Defined,
                "int" => Filter::Int(number(arg)?),
                "round" => Filter::Round(number(arg)?.map_or(Ok(0), |n| {
                    ((0.0..=10.0).contains(&n) && n.fract() == 0.0)
                        .then_some(n as u32)
                        .ok_or_else(unsupported)
                })?),
                _ => return Err(unsupported()),
            });
        }
        Ok(Template {
            json,
            path,
            filters,
        })
    }

    /// Evaluate on a payload; `None` when the value is missing (a key the payload lacks).
    pub fn eval(&self, payload: &str) -> Result<Option<Value>, Rejection> {
        let mut v = if self.json {
            serde_json::from_str::<Value>(payload)
                .map_err(|e| Rejection::new(Reason::MalformedJson, e.to_string()))?
        } else {
            Value::String(payload.to_string())
        };
        for step in &self.path {
            let next = match (step, &v) {
                (Step::Key(k), Value::Object(o)) => o.get(k).cloned(),
                (Step::Index(i), Value::Array(a)) => a.get(*i).cloned(),
                _ => None,
            };
            match next {
                Some(n) => v = n,
                None => return Ok(None),
            }
        }
        for f in &self.filters {
            if *f == Filter::Defined {
                continue;
            }
            let n = match &v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                Value::Bool(b) => Some(f64::from(u8::from(*b))),
                _ => None,
            }
            .filter(|n| n.is_finite());
            let out = match f {
                Filter::Float(default) => n.or(*default).or(Some(0.0)),
                Filter::Int(default) => n.map(f64::trunc).or(*default).or(Some(0.0)),
                Filter::Round(digits) => n.map(|n| {
                    let p = 10f64.powi(*digits as i32);
                    (n * p).round() / p
                }),
                Filter::Defined => n,
            };
            v = match out.and_then(serde_json::Number::from_f64) {
                Some(n) => Value::Number(n),
                None => return Ok(None),
            };
        }
        Ok(Some(v))
    }
}

/// The entities discovered so far, by the topics they are read from. Shared by a process's
/// intakes; filled at start from what the queue kept, and as configs are appended.
#[derive(Default)]
pub struct Registry {
    inner: RwLock<Inner>,
    /// Entities held, readable without the lock: most homes have none, and every message asks.
    count: std::sync::atomic::AtomicUsize,
    /// Woken when an entity brings a topic not subscribed yet.
    pub changed: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    by_config: HashMap<String, Arc<Entity>>,
    /// State and availability topic → config topics.
    by_topic: HashMap<String, Vec<String>>,
    /// Topics that appeared since the last [`Registry::take_new_topics`].
    new_topics: Vec<String>,
}

/// Most entities one installation keeps.
pub const MAX_ENTITIES: usize = 10_000;

impl Registry {
    /// Apply announcements (an entity announced, replaced, or removed).
    pub fn apply(&self, announcements: &[Announcement]) {
        let Ok(mut inner) = self.inner.write() else {
            return;
        };
        let mut fresh = false;
        for a in announcements {
            if let Some(old) = inner.by_config.remove(&a.config_topic) {
                for t in topics_of(&old) {
                    if let Some(list) = inner.by_topic.get_mut(&t) {
                        list.retain(|c| c != &a.config_topic);
                        if list.is_empty() {
                            inner.by_topic.remove(&t);
                        }
                    }
                }
            }
            let Some(entity) = &a.entity else { continue };
            if inner.by_config.len() >= MAX_ENTITIES {
                continue;
            }
            for t in topics_of(entity) {
                let inner = &mut *inner;
                let list = inner.by_topic.entry(t.clone()).or_default();
                if list.is_empty() {
                    inner.new_topics.push(t);
                    fresh = true;
                }
                if !list.contains(&a.config_topic) {
                    list.push(a.config_topic.clone());
                }
            }
            inner
                .by_config
                .insert(a.config_topic.clone(), entity.clone());
        }
        self.count
            .store(inner.by_config.len(), std::sync::atomic::Ordering::Relaxed);
        drop(inner);
        if fresh {
            self.changed.notify_one();
        }
    }

    pub fn len(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a config is new, or says something else than the one kept.
    pub fn differs(&self, a: &Announcement) -> bool {
        self.inner.read().map_or(true, |i| {
            i.by_config.get(&a.config_topic).map(|e| e.as_ref()) != a.entity.as_deref()
        })
    }

    /// Whether entities are read from `topic`.
    pub fn reads(&self, topic: &str) -> bool {
        !self.is_empty()
            && self
                .inner
                .read()
                .is_ok_and(|i| i.by_topic.contains_key(topic))
    }

    /// The entities read from `topic`.
    pub fn entities(&self, topic: &str) -> Vec<Arc<Entity>> {
        let Ok(inner) = self.inner.read() else {
            return Vec::new();
        };
        inner
            .by_topic
            .get(topic)
            .into_iter()
            .flatten()
            .filter_map(|c| inner.by_config.get(c).cloned())
            .collect()
    }

    /// Every topic entities are read from.
    pub fn topics(&self) -> Vec<String> {
        self.inner
            .read()
            .map(|i| i.by_topic.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The topics that appeared since the last call (to subscribe to).
    pub fn take_new_topics(&self) -> Vec<String> {
        self.inner
            .write()
            .map(|mut i| std::mem::take(&mut i.new_topics))
            .unwrap_or_default()
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({} entities)", self.len())
    }
}

fn topics_of(e: &Entity) -> Vec<String> {
    let mut out: Vec<String> = e.state_topic.iter().cloned().collect();
    out.extend(e.availability.iter().map(|a| a.topic.clone()));
    out.retain(|t| !t.is_empty() && !t.contains(['+', '#']) && t.len() <= 1024);
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity(config: &str) -> Entity {
        let levels = ["sensor", "node", "temperature", "config"];
        let a = announcement("t", &levels, config.as_bytes())
            .unwrap()
            .unwrap();
        a.entity.unwrap().as_ref().clone()
    }

    #[test]
    fn abbreviations_and_the_base_topic_are_expanded() {
        let e = entity(
            r#"{"~":"home/living","stat_t":"~/state","dev_cla":"temperature","unit_of_meas":"°F",
                "val_tpl":"{{ value_json.t | float }}","avty_t":"~/avail","dev":{"name":"Living room","mf":"Acme","mdl":"T1"}}"#,
        );
        assert_eq!(e.state_topic.as_deref(), Some("home/living/state"));
        assert_eq!(e.availability[0].topic, "home/living/avail");
        assert_eq!(
            (e.kind.as_str(), e.unit.as_deref()),
            ("temperature", Some("°F"))
        );
        assert_eq!(
            (e.device.as_str(), e.sensor.as_str()),
            ("Living_room", "Living_room")
        );
        assert_eq!(e.manufacturer.as_deref(), Some("Acme"));
        assert_eq!(
            state(&e, br#"{"t":"71.6"}"#).unwrap(),
            Some(serde_json::json!(71.6))
        );
    }

    #[test]
    fn templates_of_the_subset_evaluate_and_others_are_refused() {
        let eval = |t: &str, p: &str| Template::parse(t).unwrap().eval(p).unwrap();
        assert_eq!(
            eval("{{ value }}", "21.5"),
            Some(Value::String("21.5".into()))
        );
        assert_eq!(
            eval("{{ value_json.a.b }}", r#"{"a":{"b":3}}"#),
            Some(serde_json::json!(3))
        );
        assert_eq!(
            eval("{{ value_json['a'] }}", r#"{"a":true}"#),
            Some(Value::Bool(true))
        );
        assert_eq!(
            eval("{{ value | int }}", "21.7"),
            Some(serde_json::json!(21.0))
        );
        assert_eq!(
            eval("{{ value_json.t | round(1) }}", r#"{"t":21.66}"#),
            Some(serde_json::json!(21.7))
        );
        assert_eq!(
            eval("{{ (value_json.x | float) }}", r#"{"x":"2"}"#),
            Some(serde_json::json!(2.0))
        );
        assert_eq!(eval("{{ value_json.missing }}", r#"{"x":1}"#), None);
        for bad in [
            "{{ value | float * 10 }}",
            "{% if value == 'ON' %}on{% endif %}",
            "{{ states('sensor.x') }}",
            "{{ now() }}",
            "{{ value_json.x | float | multiply(2) }}",
            "plain",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_unsupported_template_is_refused_once_and_kept() {
        let levels = ["sensor", "node", "power", "config"];
        let a = announcement(
            "t",
            &levels,
            br#"{"stat_t":"n/p","val_tpl":"{{ value | float * 1000 }}","dev_cla":"power"}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.refused.unwrap().reason, Reason::UnsupportedTemplate);
        assert!(a.entity.unwrap().unsupported);
    }

    #[test]
    fn binary_states_follow_payload_on_and_off() {
        let levels = ["binary_sensor", "hall", "front_door", "config"];
        let a = announcement(
            "t",
            &levels,
            br#"{"stat_t":"hall/door","dev_cla":"door","pl_on":"open","pl_off":"closed"}"#,
        )
        .unwrap()
        .unwrap();
        let e = a.entity.unwrap();
        assert_eq!(
            (e.kind.as_str(), e.sensor.as_str()),
            ("door", "hall.front_door")
        );
        assert_eq!(state(&e, b"open").unwrap(), Some(Value::Bool(true)));
        assert_eq!(state(&e, b"closed").unwrap(), Some(Value::Bool(false)));
        assert_eq!(state(&e, b"ajar").unwrap(), None);
    }

    #[test]
    fn the_registry_indexes_topics_and_forgets_removed_entities() {
        let r = Registry::default();
        let levels = ["sensor", "node", "temperature", "config"];
        let a = announcement("t", &levels, br#"{"stat_t":"n/t","avty_t":"n/status"}"#)
            .unwrap()
            .unwrap();
        r.apply(&[a]);
        assert!(r.reads("n/t") && r.reads("n/status"));
        let mut fresh = r.take_new_topics();
        fresh.sort();
        assert_eq!(fresh, ["n/status", "n/t"]);
        let removed = announcement("t", &levels, b"").unwrap().unwrap();
        r.apply(&[removed]);
        assert!(!r.reads("n/t") && r.is_empty());
    }
}
