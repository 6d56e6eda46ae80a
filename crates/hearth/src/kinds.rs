//! The vocabulary of readings: which kinds hearth knows, what values each takes, its canonical
//! unit, and the conversions into it (CONTRACT §3).
//!
//! Kinds follow Home Assistant's device classes
//! (<https://www.home-assistant.io/integrations/sensor/#device-class>,
//! <https://www.home-assistant.io/integrations/binary_sensor/#device-class>) under hearth's
//! shorter names: `light` for illuminance, `co2` for carbon dioxide, `co` for the carbon monoxide
//! detector, `water_leak` for moisture, `motion` for occupancy and presence. Every codec maps its
//! ecosystem's names onto these ([`canonical`]), and every reading is normalised here
//! ([`normalise`]): the value in the kind's canonical unit (°C, %, hPa, lx, W, kWh, V, A, ppm),
//! the unit the device sent kept beside it. Rules therefore compare like with like: a °F
//! thermostat is alerted on in °C.
//!
//! A kind hearth does not know is stored as sent, any finite number, unit as given.

/// What values a kind accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRule {
    /// true/false, or the numbers 0 and 1.
    Boolean,
    /// A finite number within the inclusive bounds (in the canonical unit).
    Range(f64, f64),
    /// Any finite number (unknown kinds).
    Finite,
}

/// The binary kinds: true = detected, open, on, low, online.
#[cfg(test)]
pub const BINARY: &[&str] = &[
    "motion",
    "door",
    "window",
    "smoke",
    "co",
    "gas",
    "water_leak",
    "alarm",
    "intrusion",
    "panic",
    "tamper",
    "vibration",
    "battery_low",
    "switch",
    "input",
    "availability",
];

/// A measured kind: its canonical unit, the units it converts from, and its plausible range in
/// the canonical unit (a broken sensor or payload beyond it, not weather).
struct Measure {
    /// The kinds measured so; [`measure`] is the lookup (a test keeps the two in step).
    #[cfg_attr(not(test), allow(dead_code))]
    kinds: &'static [&'static str],
    unit: &'static str,
    /// (spelling, factor, offset): canonical = value × factor + offset.
    from: &'static [(&'static str, f64, f64)],
    range: (f64, f64),
}

const F_TO_C: (f64, f64) = (5.0 / 9.0, -32.0 * 5.0 / 9.0);

static MEASURES: &[Measure] = &[
    Measure {
        kinds: &["temperature", "dew_point", "device_temperature"],
        unit: "°C",
        from: &[
            ("°C", 1.0, 0.0),
            ("C", 1.0, 0.0),
            ("degC", 1.0, 0.0),
            ("℃", 1.0, 0.0),
            ("°F", F_TO_C.0, F_TO_C.1),
            ("F", F_TO_C.0, F_TO_C.1),
            ("degF", F_TO_C.0, F_TO_C.1),
            ("℉", F_TO_C.0, F_TO_C.1),
            ("K", 1.0, -273.15),
        ],
        range: (-90.0, 150.0),
    },
    Measure {
        kinds: &["humidity", "battery", "moisture_level"],
        unit: "%",
        from: &[("%", 1.0, 0.0)],
        range: (0.0, 100.0),
    },
    Measure {
        kinds: &["pressure"],
        unit: "hPa",
        from: &[
            ("hPa", 1.0, 0.0),
            ("mbar", 1.0, 0.0),
            ("Pa", 0.01, 0.0),
            ("kPa", 10.0, 0.0),
            ("bar", 1000.0, 0.0),
            ("mmHg", 1.333_224, 0.0),
            ("inHg", 33.863_89, 0.0),
            ("psi", 68.947_57, 0.0),
        ],
        range: (0.0, 20_000.0),
    },
    Measure {
        kinds: &["light"],
        unit: "lx",
        from: &[("lx", 1.0, 0.0), ("lux", 1.0, 0.0)],
        range: (0.0, 200_000.0),
    },
    Measure {
        kinds: &["co2", "co_level"],
        unit: "ppm",
        from: &[("ppm", 1.0, 0.0)],
        range: (0.0, 100_000.0),
    },
    Measure {
        kinds: &["power"],
        unit: "W",
        from: &[("W", 1.0, 0.0), ("kW", 1000.0, 0.0), ("mW", 0.001, 0.0)],
        range: (-1.0e6, 1.0e6),
    },
    Measure {
        kinds: &["energy"],
        unit: "kWh",
        from: &[("kWh", 1.0, 0.0), ("Wh", 0.001, 0.0), ("MWh", 1000.0, 0.0)],
        range: (-1.0e9, 1.0e9),
    },
    Measure {
        kinds: &["voltage"],
        unit: "V",
        from: &[("V", 1.0, 0.0), ("mV", 0.001, 0.0), ("kV", 1000.0, 0.0)],
        range: (0.0, 100_000.0),
    },
    Measure {
        kinds: &["current"],
        unit: "A",
        from: &[("A", 1.0, 0.0), ("mA", 0.001, 0.0)],
        range: (-10_000.0, 10_000.0),
    },
];

/// The measure of a kind: a `match` (it runs for every reading), kept in step with
/// [`MEASURES`] by a test.
fn measure(kind: &str) -> Option<&'static Measure> {
    let i = match kind {
        "temperature" | "dew_point" | "device_temperature" => 0,
        "humidity" | "battery" | "moisture_level" => 1,
        "pressure" => 2,
        "light" => 3,
        "co2" | "co_level" => 4,
        "power" => 5,
        "energy" => 6,
        "voltage" => 7,
        "current" => 8,
        _ => return None,
    };
    MEASURES.get(i)
}

fn is_binary(kind: &str) -> bool {
    matches!(
        kind,
        "motion"
            | "door"
            | "window"
            | "smoke"
            | "co"
            | "gas"
            | "water_leak"
            | "alarm"
            | "intrusion"
            | "panic"
            | "tamper"
            | "vibration"
            | "battery_low"
            | "switch"
            | "input"
            | "availability"
    )
}

/// hearth's name for a kind an ecosystem (or Home Assistant) names otherwise, or the name
/// itself: `illuminance` → `light`, `occupancy` → `motion`, `carbon_dioxide` → `co2`, ...
pub fn canonical(name: &str) -> &str {
    match name {
        "temp" => "temperature",
        "illuminance" | "illuminance_lux" | "lux" => "light",
        "occupancy" | "presence" => "motion",
        "carbon_dioxide" => "co2",
        "carbon_monoxide" => "co",
        "moisture" | "leak" => "water_leak",
        "opening" | "garage_door" => "door",
        "online" | "connectivity" => "availability",
        other => other,
    }
}

/// The canonical unit of a kind, if it is measured in one.
pub fn unit_of(kind: &str) -> Option<&'static str> {
    measure(kind).map(|m| m.unit)
}

/// A reading's unit as shown: the one stored, else its kind's canonical one.
pub fn unit_or_canonical(kind: &str, unit: Option<String>) -> Option<String> {
    unit.or_else(|| unit_of(kind).map(str::to_string))
}

/// The accepted values of each known kind, in its canonical unit.
pub fn value_rule(kind: &str) -> ValueRule {
    if is_binary(kind) {
        return ValueRule::Boolean;
    }
    match measure(kind) {
        Some(m) => ValueRule::Range(m.range.0, m.range.1),
        None => ValueRule::Finite,
    }
}

/// A value in its kind's canonical unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalised {
    pub value: f64,
    /// The canonical unit of a measured kind sent with a unit, the unit as sent for any
    /// other; none when none was sent (the value is then in the canonical unit).
    pub unit: Option<String>,
    /// The unit the device sent, when it is not the canonical spelling.
    pub source_unit: Option<String>,
}

/// `value` in `unit` (none: the canonical one) as a reading of `kind`; `Err` names the units
/// the kind converts from.
pub fn normalise(kind: &str, value: f64, unit: Option<&str>) -> Result<Normalised, String> {
    let Some(m) = measure(kind) else {
        return Ok(Normalised {
            value,
            unit: unit.map(str::to_string),
            source_unit: None,
        });
    };
    let (factor, offset, source_unit) = match unit {
        // None sent: the value is in the canonical unit already, and the unit is left out of
        // the row (readers fill it in, [`unit_or_canonical`]): every byte counts per event.
        None => {
            return Ok(Normalised {
                value,
                unit: None,
                source_unit: None,
            });
        }
        Some(u) if u == m.unit => (1.0, 0.0, None),
        Some(u) => match m.from.iter().find(|(s, _, _)| *s == u) {
            Some((_, f, o)) => (*f, *o, Some(u.to_string())),
            None => {
                let known: Vec<&str> = m.from.iter().map(|(s, _, _)| *s).collect();
                return Err(format!(
                    "{kind} in {u:?}: hearth converts from {}",
                    known.join(", ")
                ));
            }
        },
    };
    Ok(Normalised {
        value: value * factor + offset,
        unit: Some(m.unit.to_string()),
        source_unit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn values_come_out_in_the_canonical_unit_with_the_sent_unit_kept() {
        for (kind, value, unit, want, canonical) in [
            ("temperature", 71.6, Some("°F"), 22.0, "°C"),
            ("temperature", 295.15, Some("K"), 22.0, "°C"),
            ("pressure", 101_325.0, Some("Pa"), 1013.25, "hPa"),
            ("pressure", 29.92, Some("inHg"), 1_013.207_588_8, "hPa"),
            ("energy", 1234.5, Some("Wh"), 1.2345, "kWh"),
            ("power", 1.5, Some("kW"), 1500.0, "W"),
            ("voltage", 3000.0, Some("mV"), 3.0, "V"),
            ("light", 120.0, Some("lux"), 120.0, "lx"),
        ] {
            let n = normalise(kind, value, unit).unwrap();
            assert!(
                close(n.value, want),
                "{kind} {value} {unit:?} → {}",
                n.value
            );
            assert_eq!(n.unit.as_deref(), Some(canonical));
            assert_eq!(n.source_unit.as_deref(), unit.filter(|u| *u != canonical));
        }
    }

    #[test]
    fn a_value_sent_without_a_unit_is_in_the_canonical_one() {
        let n = normalise("temperature", 22.0, None).unwrap();
        assert_eq!((n.value, n.unit, n.source_unit), (22.0, None, None));
        assert_eq!(
            unit_or_canonical("temperature", None).as_deref(),
            Some("°C")
        );
        assert_eq!(unit_or_canonical("pm25", None), None);
    }

    #[test]
    fn an_unknown_unit_is_refused_and_an_unknown_kind_kept_as_sent() {
        let err = normalise("temperature", 20.0, Some("bananas")).unwrap_err();
        assert!(err.contains("°F"), "{err}");
        let n = normalise("pm25", 12.0, Some("µg/m³")).unwrap();
        assert_eq!((n.value, n.unit.as_deref()), (12.0, Some("µg/m³")));
    }

    #[test]
    fn the_lookups_agree_with_the_tables() {
        for (i, m) in MEASURES.iter().enumerate() {
            for k in m.kinds {
                assert!(std::ptr::eq(measure(k).unwrap(), &MEASURES[i]), "{k}");
                assert!(!is_binary(k));
            }
        }
        for k in BINARY {
            assert!(is_binary(k) && measure(k).is_none(), "{k}");
        }
    }

    #[test]
    fn every_binary_kind_is_boolean_and_aliases_land_on_known_kinds() {
        for k in BINARY {
            assert_eq!(value_rule(k), ValueRule::Boolean, "{k}");
        }
        for alias in [
            "illuminance",
            "occupancy",
            "carbon_dioxide",
            "moisture",
            "opening",
        ] {
            let k = canonical(alias);
            assert!(BINARY.contains(&k) || measure(k).is_some(), "{alias} → {k}");
        }
    }
}
