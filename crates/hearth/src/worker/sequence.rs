//! Upstream loss detection: gaps in a sensor's `seq`.
//!
//! A lane's owner sees each sensor's readings in the order the broker delivered them, so a jump
//! from `seq` n to n + k (k > 1) means k − 1 readings never reached hearth: dropped by a broker
//! (a SIGKILL before its autosave, a queue limit) or by the device's own network. The counter is
//! kept per (house, sensor, kind), as the dedup key is: a device that shares one counter between kinds
//! shows gaps that are not losses. A `seq` that goes down is a device restart, not a gap.

use std::collections::HashMap;

use crate::event::{Event, PerSensor};

/// Sensors remembered before the memo starts over (bounded memory; a fresh start only misses a
/// gap across the restart).
const MAX_TRACKED: usize = 500_000;

/// A jump of `seq` larger than this is a device that reset or reseeded its counter (or sent
/// garbage), not readings lost: counting it would add up to 2^63 to the counter at once.
const MAX_GAP: i64 = 100_000;

#[derive(Default)]
pub struct SequenceTracker {
    /// (house, sensor) → kind → last seq.
    last: PerSensor<HashMap<String, i64>>,
}

impl SequenceTracker {
    /// Take note of stored events, in order; returns the readings found missing.
    pub fn observe<'a>(&mut self, events: impl IntoIterator<Item = &'a Event>) -> u64 {
        let mut missing = 0;
        for e in events {
            let Some(seq) = e.seq else { continue };
            if self.last.len() >= MAX_TRACKED {
                self.last.clear();
            }
            let kinds = self
                .last
                .get_or_insert_with(&e.house_id, &e.sensor_id, HashMap::new);
            match kinds.get_mut(&e.kind) {
                Some(last) => {
                    let gap = seq.saturating_sub(*last).saturating_sub(1);
                    if gap > 0 && gap <= MAX_GAP {
                        missing += gap as u64;
                    }
                    if seq > *last || seq < last.saturating_sub(1) {
                        *last = seq;
                    }
                }
                None => {
                    kinds.insert(e.kind.clone(), seq);
                }
            }
        }
        missing
    }

    /// Forget what is known (the lanes changed hands: another consumer saw the readings between).
    pub fn clear(&mut self) {
        self.last.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(sensor: &str, seq: i64) -> Event {
        Event {
            house_id: "h".into(),
            sensor_id: sensor.into(),
            kind: "power".into(),
            value: 0.0,
            unit: None,
            source_unit: None,
            seq: Some(seq),
            ts_ms: 0,
            received_us: 0,
            ingest_id: None,
        }
    }

    #[test]
    fn counts_missing_readings_not_restarts_or_redeliveries() {
        let mut t = SequenceTracker::default();
        let seqs = [ev("a", 1), ev("a", 2), ev("a", 5), ev("b", 7), ev("a", 6)];
        assert_eq!(t.observe(&seqs), 2, "3 and 4 are missing");
        // a redelivery of 6, then a device restart at 1: no gap
        assert_eq!(t.observe(&[ev("a", 6), ev("a", 1), ev("a", 2)]), 0);
        assert_eq!(
            t.observe(&[ev("a", 4)]),
            1,
            "after the restart, 3 is missing"
        );
        // A jump to the end of the range is a reset, not 2^63 readings lost.
        assert_eq!(t.observe(&[ev("a", i64::MAX), ev("a", 0), ev("a", 1)]), 0);
        // Another house's `a` is another sensor.
        let other = Event {
            house_id: "h2".into(),
            ..ev("a", 50)
        };
        assert_eq!(t.observe(&[other]), 0);
    }
}
