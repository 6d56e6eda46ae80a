//! Sources: which topic families hearth takes events from, in which ecosystem's format, for which
//! house (CONTRACT §3).
//!
//! The `sources` setting lists them, comma-separated, each `ecosystem[:prefix][@house]`:
//! `zigbee2mqtt`, `tasmota@garage`, `zigbee2mqtt:z2m-upstairs@flat2`. A prefix replaces the
//! ecosystem's default first topic levels; a house replaces `default_house`. Empty (the default)
//! means every ecosystem at its default topics, so a one-home `hearth up` takes a stock
//! Zigbee2MQTT, Tasmota, Shelly or ESPHome at once. The native and minimal forms name their house
//! in the topic (`hearth/{house}/…`, `maison/…`) and take no `@house`.
//!
//! A topic is decoded by the first source whose topics it belongs to, in the order listed (the
//! defaults: the ones with fixed first levels before Shelly's and ESPHome's, whose first level is
//! the device's own name).

use std::fmt;

use crate::event::is_valid_id;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ecosystem {
    Native,
    Minimal,
    Zigbee2mqtt,
    Tasmota,
    HaDiscovery,
    Shelly,
    Esphome,
}

impl Ecosystem {
    pub const ALL: [Ecosystem; 7] = [
        Ecosystem::Native,
        Ecosystem::Minimal,
        Ecosystem::Zigbee2mqtt,
        Ecosystem::Tasmota,
        Ecosystem::HaDiscovery,
        Ecosystem::Shelly,
        Ecosystem::Esphome,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Ecosystem::Native => "native",
            Ecosystem::Minimal => "minimal",
            Ecosystem::Zigbee2mqtt => "zigbee2mqtt",
            Ecosystem::Tasmota => "tasmota",
            Ecosystem::HaDiscovery => "ha_discovery",
            Ecosystem::Shelly => "shelly",
            Ecosystem::Esphome => "esphome",
        }
    }

    fn parse(s: &str) -> Option<Ecosystem> {
        Ecosystem::ALL.into_iter().find(|e| e.name() == s)
    }

    /// The first topic levels the ecosystem publishes under by default ("" for none: Tasmota's
    /// `tele/…`, Shelly's and ESPHome's device-named first level).
    fn default_prefix(self) -> &'static str {
        match self {
            Ecosystem::Native => "hearth",
            Ecosystem::Minimal => "maison/capteurs",
            Ecosystem::Zigbee2mqtt => "zigbee2mqtt",
            Ecosystem::HaDiscovery => "homeassistant",
            Ecosystem::Tasmota | Ecosystem::Shelly | Ecosystem::Esphome => "",
        }
    }

    /// The topic filters under the prefix.
    fn filters(self) -> &'static [&'static str] {
        match self {
            Ecosystem::Native => &["+/+"],
            Ecosystem::Minimal => &["+"],
            Ecosystem::Zigbee2mqtt | Ecosystem::HaDiscovery => &["#"],
            Ecosystem::Tasmota => &["tele/+/+", "stat/+/+"],
            Ecosystem::Shelly => &["+/events/rpc", "+/online"],
            Ecosystem::Esphome => &[
                "+/sensor/+/state",
                "+/binary_sensor/+/state",
                "+/switch/+/state",
                "+/status",
            ],
        }
    }

    /// Whether the house is a topic level (native) or the topic itself (minimal).
    fn names_its_house(self) -> bool {
        matches!(self, Ecosystem::Native | Ecosystem::Minimal)
    }
}

impl fmt::Display for Ecosystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One topic family hearth takes events from.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub ecosystem: Ecosystem,
    /// The first topic levels (none for Tasmota, Shelly and ESPHome by default).
    pub prefix: Vec<String>,
    /// The house its readings go to (none for native and minimal, whose topics name it).
    pub house: Option<String>,
}

/// Most sources one installation lists.
pub const MAX_SOURCES: usize = 64;

impl Source {
    fn new(ecosystem: Ecosystem, prefix: &str, house: Option<String>) -> Source {
        Source {
            ecosystem,
            prefix: prefix
                .split('/')
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
            house,
        }
    }

    /// The MQTT subscriptions that bring this source's messages.
    pub fn filters(&self) -> Vec<String> {
        self.ecosystem
            .filters()
            .iter()
            .map(|f| {
                let mut levels = self.prefix.clone();
                levels.push(f.to_string());
                levels.join("/")
            })
            .collect()
    }

    /// The topic's levels after the prefix, if the topic is one of this source's.
    pub fn route<'l, 't>(&self, levels: &'l [&'t str]) -> Option<&'l [&'t str]> {
        let n = self.prefix.len();
        if levels.len() <= n || levels[..n].iter().zip(&self.prefix).any(|(a, b)| a != b) {
            return None;
        }
        let rest = &levels[n..];
        let belongs = match self.ecosystem {
            Ecosystem::Native => rest.len() == 2,
            Ecosystem::Minimal => rest.len() == 1,
            Ecosystem::Zigbee2mqtt | Ecosystem::HaDiscovery => true,
            Ecosystem::Tasmota => rest.len() == 3 && matches!(rest[0], "tele" | "stat"),
            Ecosystem::Shelly => matches!(rest, [_, "events", "rpc"] | [_, "online"]),
            Ecosystem::Esphome => matches!(
                rest,
                [_, "sensor" | "binary_sensor" | "switch", _, "state"] | [_, "status"]
            ),
        };
        belongs.then_some(rest)
    }
}

/// Parse the `sources` setting ("" for the defaults).
pub fn parse(spec: &str, default_house: &str) -> Result<Vec<Source>, String> {
    if spec.trim().is_empty() {
        return Ok(defaults(default_house));
    }
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (rest, house) = match item.split_once('@') {
            Some((r, h)) => (r, Some(h.to_string())),
            None => (item, None),
        };
        let (name, prefix) = match rest.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (rest, None),
        };
        let ecosystem = Ecosystem::parse(name).ok_or_else(|| {
            let known: Vec<&str> = Ecosystem::ALL.iter().map(|e| e.name()).collect();
            format!(
                "sources: unknown ecosystem {:?} (known: {})",
                crate::event::truncate(name, 32),
                known.join(", ")
            )
        })?;
        if let Some(h) = &house {
            if ecosystem.names_its_house() {
                return Err(format!(
                    "sources: {name} topics name their house; {item:?} cannot set one"
                ));
            }
            if !is_valid_id(h) {
                return Err(format!(
                    "sources: house {:?} is not [A-Za-z0-9_.-]{{1,64}}",
                    crate::event::truncate(h, 80)
                ));
            }
        }
        let prefix = prefix.unwrap_or(ecosystem.default_prefix());
        if prefix
            .split('/')
            .any(|l| l.contains(['+', '#', '\0']) || l.starts_with('$'))
            || prefix.len() > 128
        {
            return Err(format!(
                "sources: prefix {:?} must be plain topic levels",
                crate::event::truncate(prefix, 64)
            ));
        }
        let house = match ecosystem.names_its_house() {
            true => None,
            false => Some(house.unwrap_or_else(|| default_house.to_string())),
        };
        out.push(Source::new(ecosystem, prefix, house));
    }
    if out.is_empty() || out.len() > MAX_SOURCES {
        return Err(format!("sources: between 1 and {MAX_SOURCES} sources"));
    }
    Ok(out)
}

/// Every ecosystem at its default topics.
pub fn defaults(default_house: &str) -> Vec<Source> {
    Ecosystem::ALL
        .into_iter()
        .map(|e| {
            let house = (!e.names_its_house()).then(|| default_house.to_string());
            Source::new(e, e.default_prefix(), house)
        })
        .collect()
}

/// A device's name as a sensor id: any character outside `[A-Za-z0-9_.-]` becomes `_`, runs of
/// `_` one, at most 64 bytes; none if nothing is left (or only dots).
pub fn slug(name: &str) -> Option<String> {
    let mut out = String::with_capacity(name.len().min(64));
    for c in name.chars() {
        let c = if c.is_ascii_alphanumeric() || matches!(c, '.' | '-') {
            c
        } else {
            '_'
        };
        if c == '_' && out.ends_with('_') {
            continue;
        }
        if out.len() == 64 {
            break;
        }
        out.push(c);
    }
    is_valid_id(&out).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_lists_ecosystems_with_their_prefix_and_house() {
        let s = parse(
            "zigbee2mqtt, tasmota@garage, zigbee2mqtt:z2m/up@flat2",
            "home",
        )
        .unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].filters(), ["zigbee2mqtt/#"]);
        assert_eq!(s[0].house.as_deref(), Some("home"));
        assert_eq!(s[1].house.as_deref(), Some("garage"));
        assert_eq!(s[2].filters(), ["z2m/up/#"]);
        assert_eq!(s[2].house.as_deref(), Some("flat2"));
        for bad in [
            "zwave",
            "native@h1",
            "tasmota@bad house",
            "zigbee2mqtt:a/+",
            ",",
        ] {
            assert!(parse(bad, "home").is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_cover_every_ecosystem_and_routes_keep_to_their_family() {
        let all = parse("", "home").unwrap();
        assert_eq!(all.len(), Ecosystem::ALL.len());
        let levels = |t: &'static str| t.split('/').collect::<Vec<_>>();
        let first = |t: &'static str| {
            let l = levels(t);
            all.iter()
                .find(|s| s.route(&l).is_some())
                .map(|s| s.ecosystem)
        };
        assert_eq!(first("hearth/h1/kitchen"), Some(Ecosystem::Native));
        assert_eq!(
            first("zigbee2mqtt/lamp/availability"),
            Some(Ecosystem::Zigbee2mqtt)
        );
        assert_eq!(first("tele/plug/SENSOR"), Some(Ecosystem::Tasmota));
        assert_eq!(first("shellyplus1-a1/events/rpc"), Some(Ecosystem::Shelly));
        assert_eq!(
            first("node1/sensor/temperature/state"),
            Some(Ecosystem::Esphome)
        );
        assert_eq!(first("homeassistant/status"), Some(Ecosystem::HaDiscovery));
        assert_eq!(first("random/topic"), None);
    }

    #[test]
    fn slugs_are_ids() {
        assert_eq!(
            slug("Living room/Lamp 1").as_deref(),
            Some("Living_room_Lamp_1")
        );
        assert_eq!(
            slug("0x00158d0001a2b3c4").as_deref(),
            Some("0x00158d0001a2b3c4")
        );
        assert_eq!(slug("  ").as_deref(), Some("_"));
        assert_eq!(slug(""), None);
        assert_eq!(slug(".."), None);
        assert_eq!(slug(&"é".repeat(100)).as_deref(), Some("_"));
        assert_eq!(slug(&"a".repeat(100)).map(|s| s.len()), Some(64));
    }
}
