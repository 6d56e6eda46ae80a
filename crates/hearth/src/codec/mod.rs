//! Codecs: from an MQTT topic and payload to validated events, or to reasoned rejections.
//!
//! The topic picks the source ([`sources`]: which ecosystem's format, which house), the source
//! its codec: the native format (`hearth/{house}/{sensor}`, CONTRACT §3), the seed's minimal form
//! (`maison/capteurs/{sensor}`), and the device ecosystems a real home runs ([`zigbee2mqtt`],
//! [`tasmota`], [`shelly`], [`esphome`]), each by its documented format. Every codec goes through
//! the same [`reading`] checks and [`crate::kinds`] vocabulary, so a value, a unit, a `seq` or a
//! `ts` means the same thing whatever the format. A decode never fails as a whole: each reading of
//! a message is either an event or a rejection, a message that cannot be read at all is one
//! rejection, and housekeeping (a bridge's log, a device's uptime) is neither: it is ignored.

#[cfg(test)]
mod corpus;
mod device;
pub mod discovery;
mod esphome;
#[cfg(test)]
mod fuzz;
pub mod http;
mod minimal;
mod native;
pub mod reading;
mod shelly;
pub mod sources;
mod tasmota;
mod zigbee2mqtt;

use std::sync::Arc;

pub use crate::event::truncate;
use crate::event::{Event, Reason, Rejection};
use discovery::{Announcement, Registry};
use sources::{Ecosystem, Source};

/// Bounds a payload must respect.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    /// Most readings in one message (or HTTP request): more is refused whole.
    pub max_readings: usize,
    pub max_future_skew_ms: i64,
    /// Most devices recorded per house, in the sensors' device map and in a bridge's catalog
    /// each (`max_sensors_per_house`: a device past it could have no stored sensor anyway).
    pub max_devices_per_house: u64,
}

impl Limits {
    pub fn from_config(config: &crate::config::Config) -> Limits {
        Limits {
            max_payload_bytes: config.max_payload_bytes,
            max_readings: config.max_readings_per_message,
            max_future_skew_ms: config.max_future_skew_secs.saturating_mul(1000) as i64,
            max_devices_per_house: config.max_sensors_per_house,
        }
    }

    /// The rejection of a message with `n` readings, past the limit.
    pub fn too_many(&self, n: usize) -> Option<Rejection> {
        (n > self.max_readings).then(|| {
            Rejection::new(
                Reason::TooManyReadings,
                format!(
                    "{n} readings in one message, the limit is {} (max_readings_per_message)",
                    self.max_readings
                ),
            )
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::from_config(&crate::config::Config::default())
    }
}

/// What one message became.
#[derive(Debug, Default)]
pub struct Decoded {
    pub events: Vec<Event>,
    pub rejections: Vec<Rejection>,
    /// Discovery configs read (kept before the message is acknowledged, then applied).
    pub announcements: Vec<Announcement>,
    /// The device the message's readings come from (device ecosystems).
    pub device: Option<Box<crate::seam::DeviceInfo>>,
    /// What a bridge says of its devices (model, maker), by house.
    pub catalog: Vec<(String, crate::seam::DeviceInfo)>,
}

impl Decoded {
    /// Housekeeping: a message that holds no reading and nothing wrong (a bridge's log, a
    /// device's uptime, a sensor with no value yet).
    pub fn is_ignored(&self) -> bool {
        self.events.is_empty() && self.rejections.is_empty() && self.announcements.is_empty()
    }

    fn rejected(reason: Reason, detail: impl Into<String>) -> Self {
        Decoded {
            rejections: vec![Rejection::new(reason, detail)],
            ..Decoded::default()
        }
    }

    fn push(&mut self, r: Result<Event, Rejection>) {
        match r {
            Ok(e) => self.events.push(e),
            Err(r) => self.rejections.push(r),
        }
    }

    /// The message's one dead letter, if any reading of it was refused.
    pub fn dead_letter(
        &self,
        source: &'static str,
        topic: &str,
        payload: &[u8],
        at_ms: i64,
    ) -> Option<crate::dead_letter::DeadLetter> {
        crate::dead_letter::DeadLetter::from_rejections(
            &self.rejections,
            source,
            topic,
            payload,
            at_ms,
        )
    }
}

/// The sources hearth takes events from, and the bounds every message respects.
#[derive(Debug, Clone)]
pub struct Codecs {
    pub limits: Limits,
    sources: Vec<Source>,
    /// The entities Home Assistant discovery announced, shared by the clones of these codecs.
    pub discovery: Arc<Registry>,
}

impl Codecs {
    pub fn new(limits: Limits, sources: Vec<Source>) -> Codecs {
        Codecs {
            limits,
            sources,
            discovery: Arc::default(),
        }
    }

    /// The configured sources (checked when the config was loaded; the defaults otherwise).
    pub fn from_config(config: &crate::config::Config) -> Codecs {
        let sources = sources::parse(&config.sources, &config.default_house)
            .unwrap_or_else(|_| sources::defaults(&config.default_house));
        Codecs::new(Limits::from_config(config), sources)
    }

    /// Every ecosystem at its default topics, for the house `home`.
    pub fn defaults(limits: Limits) -> Codecs {
        Codecs::new(limits, sources::defaults("home"))
    }

    /// The MQTT subscriptions that bring every source's messages, and the topics discovered
    /// entities are read from.
    pub fn subscriptions(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let discovered = self
            .discovery
            .topics()
            .into_iter()
            .filter(|t| !self.routes(t));
        for f in self
            .sources
            .iter()
            .flat_map(Source::filters)
            .chain(discovered)
        {
            if !out.contains(&f) {
                out.push(f);
            }
        }
        out
    }

    /// The source a topic (or a topic filter) belongs to, and its levels after the prefix.
    fn route<'l, 't>(&self, levels: &'l [&'t str]) -> Option<(&Source, &'l [&'t str])> {
        self.sources
            .iter()
            .find_map(|s| s.route(levels).map(|rest| (s, rest)))
    }

    /// Whether a topic is one of the sources' (or a discovered entity's).
    pub fn wants(&self, topic: &str) -> bool {
        self.routes(topic) || self.discovery.reads(topic)
    }

    /// Whether a discovered topic needs a subscription of its own (no source's filter brings
    /// it: overlapping subscriptions may bring a message twice).
    pub fn needs_subscription(&self, topic: &str) -> bool {
        !self.routes(topic)
    }

    fn routes(&self, topic: &str) -> bool {
        let levels: Vec<&str> = topic.split('/').collect();
        self.route(&levels).is_some()
    }

    /// Topics whose messages are never readings, whatever they hold: a Zigbee2MQTT bridge's own
    /// state and logs, and the commands sent to its devices.
    fn housekeeping(routed: Option<(&Source, &[&str])>) -> bool {
        matches!(
            routed,
            Some((s, rest)) if s.ecosystem == Ecosystem::Zigbee2mqtt
                && matches!(rest, ["bridge", ..] | [.., "set" | "get"] | [_, "set" | "get", ..])
        )
    }

    /// Learn the entities of discovery configs kept by the queue (at start).
    pub fn load_discovery(&self, kept: &[(String, Vec<u8>)]) {
        let mut announced = Vec::new();
        for (topic, payload) in kept {
            let levels: Vec<&str> = topic.split('/').collect();
            if let Some((s, rest)) = self.route(&levels)
                && s.ecosystem == Ecosystem::HaDiscovery
                && let Ok(Some(a)) = discovery::announcement(topic, rest, payload)
            {
                announced.push(a);
            }
        }
        self.discovery.apply(&announced);
    }

    /// The house discovered entities' readings go to: the discovery source's.
    fn discovery_house(&self) -> Option<&str> {
        self.sources
            .iter()
            .find(|s| s.ecosystem == Ecosystem::HaDiscovery)
            .and_then(|s| s.house.as_deref())
    }

    /// Whether discovery reads `topic` rather than the source it belongs to: codecs whose
    /// messages name their readings (native, minimal, Zigbee2MQTT, Tasmota, Shelly) keep
    /// theirs; ESPHome's plain states, which say nothing of their kind or unit, are read as the
    /// node's discovery config says.
    fn discovered(&self, topic: &str, routed: Option<(&Source, &[&str])>) -> bool {
        self.discovery.reads(topic)
            && self.discovery_house().is_some()
            && match routed {
                None => true,
                // A state topic under the discovery prefix is no config.
                Some((s, _)) => matches!(s.ecosystem, Ecosystem::Esphome | Ecosystem::HaDiscovery),
            }
    }

    /// The ecosystem a topic's messages are read as, if any.
    pub fn ecosystem(&self, topic: &str) -> Option<Ecosystem> {
        let levels: Vec<&str> = topic.split('/').collect();
        let routed = self.route(&levels);
        if self.discovered(topic, routed) {
            return Some(Ecosystem::HaDiscovery);
        }
        routed.map(|(s, _)| s.ecosystem)
    }

    /// Decode one MQTT message received at `received_us` (epoch microseconds).
    pub fn decode(&self, topic: &str, payload: &[u8], received_us: i64) -> Decoded {
        let limits = &self.limits;
        let levels: Vec<&str> = topic.split('/').collect();
        let routed = self.route(&levels);
        // Housekeeping whatever it holds, read by no one: no bound to check. But for what a
        // Zigbee2MQTT bridge says of its devices (its retained list, with models and makers).
        if Codecs::housekeeping(routed) {
            return match routed {
                Some((s, ["bridge", "devices"])) => Decoded {
                    catalog: zigbee2mqtt::catalog(payload)
                        .into_iter()
                        .map(|d| (s.house.clone().unwrap_or_default(), d))
                        .collect(),
                    ..Decoded::default()
                },
                _ => Decoded::default(),
            };
        }
        if payload.len() > limits.max_payload_bytes {
            return Decoded::rejected(
                Reason::PayloadTooLarge,
                format!(
                    "payload is {} bytes, the limit is {}",
                    payload.len(),
                    limits.max_payload_bytes
                ),
            );
        }
        if self.discovered(topic, routed) {
            let house = self.discovery_house().unwrap_or("home");
            let mut d =
                discovery::readings(&self.discovery, house, topic, payload, received_us, limits);
            if !d.events.is_empty() {
                d.device = self.discovery.entities(topic).first().map(|e| {
                    Box::new(crate::seam::DeviceInfo {
                        device_id: e.device.clone(),
                        ecosystem: Ecosystem::HaDiscovery.name().to_string(),
                        model: e.model.clone(),
                        manufacturer: e.manufacturer.clone(),
                    })
                });
            }
            return d;
        }
        let Some((source, rest)) = routed else {
            return Decoded::rejected(
                Reason::UnknownTopic,
                format!("no codec for topic {:?}", truncate(topic, 128)),
            );
        };
        let json = || -> Result<serde_json::Value, Decoded> {
            serde_json::from_slice(payload)
                .map_err(|e| Decoded::rejected(Reason::MalformedJson, e.to_string()))
        };
        let ctx = |house: &str, sensor: &str| reading::Context {
            house_id: house.to_string(),
            sensor_id: sensor.to_string(),
            received_us,
            limits,
        };
        let house = source.house.as_deref().unwrap_or("maison");
        match (source.ecosystem, rest) {
            (Ecosystem::Native, [house, sensor]) => match check_topic_ids(house, sensor) {
                Ok(()) => native::decode_payload(&ctx(house, sensor), payload),
                Err(d) => d,
            },
            (Ecosystem::Minimal, [sensor]) => {
                match check_topic_ids("maison", sensor).and_then(|()| json()) {
                    Ok(value) => minimal::decode(&ctx("maison", sensor), value),
                    Err(d) => d,
                }
            }
            (e @ Ecosystem::Zigbee2mqtt, rest) => with_device(
                e,
                zigbee2mqtt::device_name(rest),
                zigbee2mqtt::decode(&ctx(house, "-"), rest, payload),
            ),
            (e @ Ecosystem::Tasmota, rest) => with_device(
                e,
                rest.get(1).copied(),
                tasmota::decode(&ctx(house, "-"), rest, payload),
            ),
            (e @ Ecosystem::Shelly, rest) => with_device(
                e,
                shelly::device_name(rest, payload),
                shelly::decode(&ctx(house, "-"), rest, payload),
            ),
            (e @ Ecosystem::Esphome, rest) => with_device(
                e,
                rest.first().copied(),
                esphome::decode(&ctx(house, "-"), rest, payload),
            ),
            // Discovery configs; Home Assistant's own status and other components: nothing.
            (Ecosystem::HaDiscovery, rest) => match discovery::announcement(topic, rest, payload) {
                // Neither kept nor applied: the store holds no more than the registry.
                Ok(Some(a)) if !self.discovery.admits(&a) => Decoded::rejected(
                    Reason::TooManySensors,
                    format!(
                        "{} entities are discovered already, the most kept",
                        discovery::MAX_ENTITIES
                    ),
                ),
                Ok(Some(a)) if self.discovery.differs(&a) => Decoded {
                    rejections: a.refused.iter().cloned().collect(),
                    announcements: vec![a],
                    ..Decoded::default()
                },
                // The same config again (a retained message, at every subscription): known.
                Ok(_) => Decoded::default(),
                Err(why) => Decoded::rejected(why.reason, why.detail),
            },
            _ => Decoded::rejected(
                Reason::UnknownTopic,
                format!("no codec for topic {:?}", truncate(topic, 128)),
            ),
        }
    }

    /// The house whose topics a topic, or every topic a filter matches, belongs to: the
    /// native `hearth/{house}/...`, `maison/capteurs/...` for the house `maison`, a source's
    /// house for its topics; none for anything reaching beyond one house (`#`, `hearth/+/x`)
    /// or outside the sources. A client logged in as a house publishes and subscribes there only.
    ///
    /// Under a native prefix the next level names the house, whatever follows (`hearth/h1/#`,
    /// `hearth/h1/kitchen/set`). A filter whose first level is a wildcard (`+/online`) may
    /// match the topics of any source, hence of any house: it belongs to none.
    pub fn topic_house<'t>(&'t self, topic: &'t str) -> Option<&'t str> {
        let levels: Vec<&'t str> = topic.split('/').collect();
        for s in self
            .sources
            .iter()
            .filter(|s| s.ecosystem == Ecosystem::Native)
        {
            let n = s.prefix.len();
            if levels.len() > n && levels[..n].iter().zip(&s.prefix).all(|(a, b)| a == b) {
                return Some(levels[n]).filter(|h| crate::event::is_valid_id(h));
            }
        }
        if matches!(levels.first(), Some(&"+" | &"#")) {
            return None;
        }
        let routed = self.route(&levels);
        if self.discovered(topic, routed) {
            return self.discovery_house();
        }
        let (source, _) = routed?;
        match source.ecosystem {
            Ecosystem::Minimal => Some("maison"),
            _ => source.house.as_deref(),
        }
    }
}

/// The device a message of an ecosystem comes from, named by its topic.
fn with_device(ecosystem: Ecosystem, name: Option<impl AsRef<str>>, mut d: Decoded) -> Decoded {
    if !d.events.is_empty() {
        d.device = name
            .and_then(|n| sources::slug(n.as_ref()))
            .map(|device_id| {
                Box::new(crate::seam::DeviceInfo {
                    device_id,
                    ecosystem: ecosystem.name().to_string(),
                    model: None,
                    manufacturer: None,
                })
            });
    }
    d
}

/// Decode with the default sources (tests).
#[cfg(test)]
pub fn decode(topic: &str, payload: &[u8], received_us: i64, limits: &Limits) -> Decoded {
    Codecs::defaults(limits.clone()).decode(topic, payload, received_us)
}

fn check_topic_ids(house: &str, sensor: &str) -> Result<(), Decoded> {
    for (what, id) in [("house", house), ("sensor", sensor)] {
        if !crate::event::is_valid_id(id) {
            return Err(Decoded::rejected(
                Reason::BadId,
                format!(
                    "{what} id {:?} is not [A-Za-z0-9_.-]{{1,64}}",
                    truncate(id, 80)
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
