//! Which sensors a batch must record in the `sensors` table, and which it must check against the
//! caps first.
//!
//! Writing every sensor of every batch would double the rows a worker touches. A sensor, (house,
//! sensor), is recorded when it is new to this consumer, shows a new kind, or was last recorded
//! more than `sensor_touch_interval_ms` ago; `last_seen` is therefore at most that stale (the
//! exact latest reading is in the cache). A (sensor, kind) this consumer has not recorded may be
//! new to the store: [`SensorMemo::unknown`] names them, for [`crate::caps::admit`].

use std::collections::BTreeMap;

use crate::alerts::engine::SensorKey;
use crate::event::{Event, PerSensor};

/// A sensor seen in a batch, for the `sensors` table.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorSeen {
    pub sensor_id: String,
    pub house_id: String,
    pub kinds: Vec<String>,
    pub first_us: i64,
    pub last_us: i64,
    /// The usual interval between its readings, when known.
    pub interval_ms: Option<f64>,
}

/// Sensors remembered per consumer before the memo starts over (bounded memory).
const MAX_REMEMBERED: usize = 200_000;

pub struct SensorMemo {
    interval_us: i64,
    recorded: PerSensor<Recorded>,
    /// Per sensor: last receive time (µs) and the usual interval between readings (EWMA, ms).
    cadence: PerSensor<(i64, Option<f64>)>,
}

struct Recorded {
    kinds: Vec<String>,
    at_us: i64,
}

impl SensorMemo {
    pub fn new(interval_ms: u64) -> Self {
        SensorMemo {
            interval_us: interval_ms as i64 * 1000,
            recorded: PerSensor::default(),
            cadence: PerSensor::default(),
        }
    }

    /// The (house, sensor)s of `events` with a kind this consumer has not recorded: they may be
    /// new to the store, and are checked against the caps before they are written.
    pub fn unknown(&self, events: &[&Event]) -> Vec<SensorKey> {
        let mut out: Vec<SensorKey> = Vec::new();
        for e in events {
            let known = self
                .recorded
                .get(&e.house_id, &e.sensor_id)
                .is_some_and(|r| r.kinds.contains(&e.kind));
            if !known
                && !out
                    .iter()
                    .any(|(h, s)| *h == e.house_id && *s == e.sensor_id)
            {
                out.push((e.house_id.clone(), e.sensor_id.clone()));
            }
        }
        out
    }

    /// The sensors of `events` that need recording, one entry per sensor, sorted by (house,
    /// sensor) (the order rows are locked in, the same in every worker).
    pub fn to_record(&self, events: &[&Event]) -> Vec<SensorSeen> {
        let mut seen: BTreeMap<(&str, &str), SensorSeen> = BTreeMap::new();
        for e in events {
            let s = seen
                .entry((&e.house_id, &e.sensor_id))
                .or_insert_with(|| SensorSeen {
                    sensor_id: e.sensor_id.clone(),
                    house_id: e.house_id.clone(),
                    kinds: Vec::new(),
                    first_us: e.received_us,
                    last_us: e.received_us,
                    interval_ms: self
                        .cadence
                        .get(&e.house_id, &e.sensor_id)
                        .and_then(|c| c.1),
                });
            if !s.kinds.contains(&e.kind) {
                s.kinds.push(e.kind.clone());
            }
            s.first_us = s.first_us.min(e.received_us);
            s.last_us = s.last_us.max(e.received_us);
        }
        seen.into_values()
            .filter(|s| match self.recorded.get(&s.house_id, &s.sensor_id) {
                None => true,
                Some(r) => {
                    s.kinds.iter().any(|k| !r.kinds.contains(k))
                        || s.last_us - r.at_us >= self.interval_us
                }
            })
            .collect()
    }

    /// Learn each sensor's usual interval from stored readings (in order).
    pub fn observe(&mut self, events: &[&Event]) {
        if self.cadence.len() > MAX_REMEMBERED {
            self.cadence.clear();
        }
        for e in events {
            let (last, ewma) = self
                .cadence
                .get_or_insert_with(&e.house_id, &e.sensor_id, || (e.received_us, None));
            if e.received_us > *last {
                let gap_ms = (e.received_us - *last) as f64 / 1000.0;
                *ewma = Some(match *ewma {
                    Some(v) => 0.9 * v + 0.1 * gap_ms,
                    None => gap_ms,
                });
                *last = e.received_us;
            }
        }
    }

    /// Remember what was committed.
    pub fn recorded(&mut self, seen: Vec<SensorSeen>) {
        if self.recorded.len() > MAX_REMEMBERED {
            self.recorded.clear();
        }
        for s in seen {
            let r = self
                .recorded
                .get_or_insert_with(&s.house_id, &s.sensor_id, || Recorded {
                    kinds: Vec::new(),
                    at_us: s.last_us,
                });
            for k in s.kinds {
                if !r.kinds.contains(&k) {
                    r.kinds.push(k);
                }
            }
            r.at_us = s.last_us;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(sensor: &str, kind: &str, at_us: i64) -> Event {
        Event {
            house_id: "h".into(),
            sensor_id: sensor.into(),
            kind: kind.into(),
            value: 0.0,
            unit: None,
            source_unit: None,
            seq: None,
            ts_ms: 0,
            received_us: at_us,
            ingest_id: None,
        }
    }

    #[test]
    fn a_sensor_is_its_house_and_its_id() {
        let mut memo = SensorMemo::new(10);
        let a = [ev("s1", "power", 0)];
        memo.recorded(memo.to_record(&a.iter().collect::<Vec<_>>()));
        let other = Event {
            house_id: "h2".into(),
            ..ev("s1", "power", 1)
        };
        let seen = memo.to_record(&[&other]);
        assert_eq!(seen.len(), 1, "h2's s1 is new");
        assert_eq!(seen[0].house_id, "h2");
        assert_eq!(
            memo.unknown(&[&other]),
            [("h2".to_string(), "s1".to_string())]
        );
        assert!(memo.unknown(&[&a[0]]).is_empty());
    }

    #[test]
    fn records_new_sensors_new_kinds_and_stale_ones_only() {
        let mut memo = SensorMemo::new(10);
        let a = [
            ev("s1", "power", 0),
            ev("s1", "power", 5),
            ev("s2", "power", 1),
        ];
        let seen = memo.to_record(&a.iter().collect::<Vec<_>>());
        assert_eq!(seen.len(), 2);
        assert_eq!((seen[0].first_us, seen[0].last_us), (0, 5));
        memo.recorded(seen);

        let b = [ev("s1", "power", 6_000), ev("s2", "energy", 2_000)];
        let seen = memo.to_record(&b.iter().collect::<Vec<_>>());
        assert_eq!(seen.len(), 1, "s1 is fresh, s2 has a new kind");
        assert_eq!(seen[0].sensor_id, "s2");
        memo.recorded(seen);

        let c = [ev("s1", "power", 20_000)];
        assert_eq!(
            memo.to_record(&c.iter().collect::<Vec<_>>()).len(),
            1,
            "s1 is stale"
        );
    }
}
