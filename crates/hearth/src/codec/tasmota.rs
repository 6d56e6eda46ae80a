//! Tasmota, by its documented format: <https://tasmota.github.io/docs/MQTT/> (topics, `LWT`),
//! <https://tasmota.github.io/docs/Commands/#sensor> (`TempUnit`, `SetOption8`),
//! <https://tasmota.github.io/docs/Power-Monitoring-Calibration/> (`ENERGY`).
//!
//! - `tele/{device}/SENSOR`: one object per attached sensor (`"AM2301": {"Temperature": 22.1,
//!   "Humidity": 45}`), temperatures in `TempUnit` (`C` or `F`), pressures in `PressureUnit`;
//!   `ENERGY` holds the power monitor (`Total` kWh, `Power` W, `Voltage`, `Current`, each one
//!   number or one per channel). Several sensors of one kind in a message (two DS18B20s, a
//!   BME280 beside an AM2301) are kept apart as channels: sensor `{device}.{sensor name}`;
//!   a single one is the device's own reading.
//! - `tele/{device}/LWT`: `Online`/`Offline`, the broker's last will: an `availability` reading.
//! - `stat/{device}/POWER` (`POWER1`, …): a relay's `ON`/`OFF`, a `switch` reading.
//! - `tele/{device}/STATE`, `INFO1`–`3`, `stat/{device}/RESULT`, `STATUS…`: housekeeping
//!   (uptime, heap, Wi-Fi, command echoes), ignored.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::{Map, Value};

use super::Decoded;
use super::device::{Readings, on_off, text, text_on_off};
use super::reading::Context;
use super::sources::slug;
use crate::event::{Reason, Rejection};

pub fn decode(ctx: &Context<'_>, rest: &[&str], payload: &[u8]) -> Decoded {
    let [prefix, device, leaf] = rest else {
        return Decoded::default();
    };
    let Some(device) = slug(device) else {
        return Decoded::rejected(Reason::BadId, "the device's topic leaves no sensor id");
    };
    let mut r = Readings::new(ctx);
    match (*prefix, *leaf) {
        // `stat/…/SENSOR` answers a `Status 8` or `TelePeriod` command with the same message.
        ("tele" | "stat", "SENSOR") => match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(o)) => sensor(&mut r, &device, &o),
            Ok(other) => r.refuse(super::reading::wrong_type(
                "a SENSOR message",
                "an object",
                &other,
            )),
            Err(e) => r.refuse(Rejection::new(Reason::MalformedJson, e.to_string())),
        },
        ("tele", "LWT") => match text(payload).map(text_on_off) {
            Ok(Some(online)) => r.add(&device, "availability", &Value::Bool(online), None),
            Ok(None) => r.refuse(Rejection::new(
                Reason::WrongType,
                "LWT is Online or Offline",
            )),
            Err(why) => r.refuse(why),
        },
        ("stat", power) if power.starts_with("POWER") => {
            let channel = &power["POWER".len()..];
            if !channel.is_empty() && !channel.bytes().all(|b| b.is_ascii_digit()) {
                return Decoded::default();
            }
            let sensor = match channel {
                "" => Some(device.clone()),
                n => slug(&format!("{device}.{n}")),
            };
            match (text(payload).map(text_on_off), sensor) {
                (Ok(Some(on)), Some(sensor)) => r.add(&sensor, "switch", &Value::Bool(on), None),
                (Ok(None), _) => r.refuse(Rejection::new(Reason::WrongType, "POWER is ON or OFF")),
                (Err(why), _) => r.refuse(why),
                (_, None) => r.refuse(Rejection::new(Reason::BadId, "no sensor id")),
            }
        }
        _ => {}
    }
    r.done()
}

/// A reading found in a SENSOR message, before channels are known.
struct Found<'m> {
    /// The sensor object's name (`DS18B20-1`), or the channel number of an `ENERGY` list.
    part: String,
    kind: Cow<'static, str>,
    value: &'m Value,
    unit: Option<&'static str>,
}

fn sensor(r: &mut Readings<'_>, device: &str, message: &Map<String, Value>) {
    let temp = match message.get("TempUnit").and_then(Value::as_str) {
        Some("F") => "°F",
        _ => "°C",
    };
    let pressure = match message.get("PressureUnit").and_then(Value::as_str) {
        Some("mmHg") => "mmHg",
        Some("inHg") => "inHg",
        _ => "hPa",
    };
    let mut found: Vec<Found<'_>> = Vec::new();
    let mut switches = Vec::new();
    for (name, part) in message {
        match (name.as_str(), part) {
            ("ENERGY", Value::Object(energy)) => energy_readings(energy, &mut found),
            (_, Value::Object(fields)) => {
                for (field, value) in fields {
                    let (kind, unit) = match field.as_str() {
                        "Temperature" => (Cow::Borrowed("temperature"), Some(temp)),
                        "DewPoint" => (Cow::Borrowed("dew_point"), Some(temp)),
                        "Humidity" => (Cow::Borrowed("humidity"), None),
                        "Pressure" => (Cow::Borrowed("pressure"), Some(pressure)),
                        "Illuminance" => (Cow::Borrowed("light"), None),
                        "CarbonDioxide" => (Cow::Borrowed("co2"), None),
                        // An estimate, when the sensor measures none.
                        "eCO2" if !fields.contains_key("CarbonDioxide") => {
                            (Cow::Borrowed("co2"), None)
                        }
                        "Battery" => (Cow::Borrowed("battery"), None),
                        "TVOC" => (Cow::Borrowed("tvoc"), None),
                        "Distance" => (Cow::Borrowed("distance"), None),
                        // The BME680's gas resistance (kΩ), not a gas detector.
                        "Gas" => (Cow::Borrowed("gas_resistance"), None),
                        other => match other.to_ascii_lowercase() {
                            k if crate::event::is_valid_id(&k)
                                && crate::kinds::value_rule(crate::kinds::canonical(&k))
                                    == crate::kinds::ValueRule::Finite =>
                            {
                                (Cow::Owned(k), None)
                            }
                            _ => continue,
                        },
                    };
                    if value.is_number() {
                        found.push(Found {
                            part: name.clone(),
                            kind,
                            value,
                            unit,
                        });
                    }
                }
            }
            (switch, v) if switch.starts_with("Switch") && on_off(v).is_some() => {
                switches.push((switch, on_off(v).unwrap_or(false)))
            }
            _ => {}
        }
    }
    let mut per_kind: HashMap<&str, usize> = HashMap::new();
    for f in &found {
        *per_kind.entry(&f.kind).or_default() += 1;
    }
    for f in &found {
        let sensor = match per_kind[f.kind.as_ref()] {
            1 => Some(device.to_string()),
            _ => slug(&format!("{device}.{}", f.part)),
        };
        match sensor {
            Some(s) => r.add(&s, &f.kind, f.value, f.unit),
            None => r.refuse(Rejection::new(Reason::BadId, "no sensor id")),
        }
    }
    for (name, on) in &switches {
        let sensor = match switches.len() {
            1 => Some(device.to_string()),
            _ => slug(&format!("{device}.{name}")),
        };
        if let Some(s) = sensor {
            r.add(&s, "switch", &Value::Bool(*on), None);
        }
    }
}

fn energy_readings<'m>(energy: &'m Map<String, Value>, found: &mut Vec<Found<'m>>) {
    for (field, kind, unit) in [
        ("Total", "energy", "kWh"),
        ("Power", "power", "W"),
        ("Voltage", "voltage", "V"),
        ("Current", "current", "A"),
    ] {
        match energy.get(field) {
            Some(v @ Value::Number(_)) => found.push(Found {
                part: "ENERGY".into(),
                kind: Cow::Borrowed(kind),
                value: v,
                unit: Some(unit),
            }),
            Some(Value::Array(channels)) => {
                for (i, v) in channels.iter().enumerate().filter(|(_, v)| v.is_number()) {
                    found.push(Found {
                        part: (i + 1).to_string(),
                        kind: Cow::Borrowed(kind),
                        value: v,
                        unit: Some(unit),
                    });
                }
            }
            _ => {}
        }
    }
}
