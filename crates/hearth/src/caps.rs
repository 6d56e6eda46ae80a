//! Caps on what input can make hearth keep: houses, sensors per house, kinds per sensor.
//!
//! Every other bound of hearth is per message (size, readings); these are the ones that grow
//! with time: each new id costs a row, a cache entry, a rule state, and work in every listing.
//! A reading that would pass a cap is not stored: it is dead-lettered with its reason
//! (`too_many_houses`, `too_many_sensors`, `too_many_kinds`), so a device that makes up a new
//! kind per message (or a house token holder who makes up sensors) fills a dead-letter stream
//! with a retention, not the store.
//!
//! [`admit`] is pure: the store says what it holds of the ids a batch names ([`Known`]), the
//! function decides. The caps are exact: the embedded store decides in its one writer's
//! transaction; PostgreSQL under a lock that consumers admitting new sensors take in turn, in
//! the transaction that reserves what was admitted (only sensors or kinds a consumer has not
//! written yet are asked about, so this is rare once a house's sensors are known).

use std::collections::{HashMap, HashSet};

use crate::event::{Event, Reason, Rejection};

/// The caps of the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Caps {
    pub houses: u64,
    pub sensors_per_house: u64,
    pub kinds_per_sensor: u64,
}

impl Caps {
    pub fn from_config(config: &crate::config::Config) -> Caps {
        Caps {
            houses: config.max_houses,
            sensors_per_house: config.max_sensors_per_house,
            kinds_per_sensor: config.max_kinds_per_sensor,
        }
    }
}

impl Default for Caps {
    fn default() -> Self {
        Caps::from_config(&crate::config::Config::default())
    }
}

/// What the store holds of the houses and sensors of a batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Known {
    /// The sensors the store was asked about: the others are already stored with their kinds
    /// (the caller knows it wrote them), and pass.
    pub asked: HashSet<(String, String)>,
    /// Houses stored.
    pub houses: u64,
    /// Of the batch's houses, those stored, with their sensor count.
    pub sensors_of: HashMap<String, u64>,
    /// Of the batch's sensors, those stored, with their kinds.
    pub kinds_of: HashMap<(String, String), HashSet<String>>,
}

/// Which events of `events` may be stored within `caps`, given what is `known`; `known` is
/// updated with what is admitted, so that a batch with several new sensors counts them all.
/// Returns the index of every refused event, with its reason.
pub fn admit(events: &[&Event], known: &mut Known, caps: &Caps) -> Vec<(usize, Rejection)> {
    let mut refused = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let sensor = (e.house_id.clone(), e.sensor_id.clone());
        if !known.asked.contains(&sensor) {
            continue;
        }
        if let Some(kinds) = known.kinds_of.get(&sensor) {
            if kinds.contains(&e.kind) {
                continue;
            }
            if kinds.len() as u64 >= caps.kinds_per_sensor {
                refused.push((
                    i,
                    Rejection::new(
                        Reason::TooManyKinds,
                        format!(
                            "sensor {} of house {} has {} kinds, the limit (max_kinds_per_sensor)",
                            e.sensor_id,
                            e.house_id,
                            kinds.len()
                        ),
                    ),
                ));
                continue;
            }
        } else {
            match known.sensors_of.get(&e.house_id) {
                Some(n) if *n >= caps.sensors_per_house => {
                    refused.push((
                        i,
                        Rejection::new(
                            Reason::TooManySensors,
                            format!(
                                "house {} has {n} sensors, the limit (max_sensors_per_house)",
                                e.house_id
                            ),
                        ),
                    ));
                    continue;
                }
                Some(_) => {}
                None if known.houses >= caps.houses => {
                    refused.push((
                        i,
                        Rejection::new(
                            Reason::TooManyHouses,
                            format!("{} houses are stored, the limit (max_houses)", known.houses),
                        ),
                    ));
                    continue;
                }
                None => {
                    known.houses += 1;
                    known.sensors_of.insert(e.house_id.clone(), 0);
                }
            }
            *known.sensors_of.entry(e.house_id.clone()).or_default() += 1;
        }
        known
            .kinds_of
            .entry(sensor)
            .or_default()
            .insert(e.kind.clone());
    }
    refused
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(house: &str, sensor: &str, kind: &str) -> Event {
        Event {
            house_id: house.into(),
            sensor_id: sensor.into(),
            kind: kind.into(),
            value: 1.0,
            unit: None,
            source_unit: None,
            seq: None,
            ts_ms: 0,
            received_us: 0,
            ingest_id: None,
        }
    }

    fn reasons(refused: &[(usize, Rejection)]) -> Vec<(usize, &'static str)> {
        refused
            .iter()
            .map(|(i, r)| (*i, r.reason.as_str()))
            .collect()
    }

    #[test]
    fn each_cap_refuses_past_its_limit_and_counts_what_it_admits() {
        let caps = Caps {
            houses: 2,
            sensors_per_house: 2,
            kinds_per_sensor: 2,
        };
        let asked = ["s1", "s2", "s3"]
            .iter()
            .flat_map(|s| [("h1", *s), ("h2", *s), ("h3", *s)])
            .map(|(h, s)| (h.to_string(), s.to_string()))
            .collect();
        let mut known = Known {
            asked,
            houses: 1,
            sensors_of: HashMap::from([("h1".into(), 1)]),
            kinds_of: HashMap::from([(("h1".into(), "s1".into()), HashSet::from(["a".into()]))]),
        };
        let batch = [
            ev("h1", "s1", "a"), // known
            ev("h1", "s1", "b"), // second kind: admitted
            ev("h1", "s1", "c"), // third kind: refused
            ev("h1", "s2", "a"), // second sensor: admitted
            ev("h1", "s3", "a"), // third sensor: refused
            ev("h2", "s1", "a"), // second house: admitted (its s1 is not h1's)
            ev("h3", "s1", "a"), // third house: refused
            ev("h2", "s1", "b"), // admitted within the batch: a second kind
        ];
        let refs: Vec<&Event> = batch.iter().collect();
        let refused = admit(&refs, &mut known, &caps);
        assert_eq!(
            reasons(&refused),
            [
                (2, "too_many_kinds"),
                (4, "too_many_sensors"),
                (6, "too_many_houses")
            ]
        );
        assert_eq!(known.houses, 2);
        assert_eq!(known.sensors_of["h1"], 2);
        // The same batch again (a redelivery) refuses the same events and admits nothing new.
        assert_eq!(reasons(&admit(&refs, &mut known, &caps)), reasons(&refused));
        // A sensor the store was not asked about is one the caller already stored: it passes.
        known.asked.clear();
        assert!(admit(&refs, &mut known, &caps).is_empty());
    }
}
