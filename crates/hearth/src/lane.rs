//! Lanes: how events are spread over the queue. One critical lane for the kinds of
//! [`crate::event::CRITICAL_KINDS`], and `shards` routine lanes chosen by a hash of the sensor,
//! (house, sensor), so that all events of a sensor sit in one lane, in the order they were
//! appended, and one consumer at a time stores them. The hash is FNV-1a: stable across
//! processes, versions and platforms.

use crate::event::Event;

/// A lane: one stream, owned by one worker at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Lane {
    #[default]
    Critical,
    Routine(u16),
}

impl Lane {
    pub fn for_event(event: &Event, shards: u16) -> Lane {
        Lane::of(&event.house_id, &event.sensor_id, &event.kind, shards)
    }

    /// The lane of a sensor's readings of a kind: a sensor is (house, sensor), so that the
    /// `kitchen` of every house does not crowd into one lane.
    pub fn of(house_id: &str, sensor_id: &str, kind: &str, shards: u16) -> Lane {
        if crate::event::is_critical_kind(kind) {
            Lane::Critical
        } else {
            let h = fnv1a_from(fnv1a_from(FNV_OFFSET, house_id.as_bytes()), b"/");
            Lane::Routine((fnv1a_from(h, sensor_id.as_bytes()) % u64::from(shards)) as u16)
        }
    }

    /// `events` grouped by lane, each group in arrival order, lanes in order of first event: one
    /// queue entry per group.
    pub fn group<'a>(events: &[&'a Event], shards: u16) -> Vec<(Lane, Vec<&'a Event>)> {
        let mut by_lane: Vec<(Lane, Vec<&Event>)> = Vec::new();
        for event in events {
            let lane = Lane::for_event(event, shards);
            match by_lane.iter_mut().find(|(l, _)| *l == lane) {
                Some((_, list)) => list.push(event),
                None => by_lane.push((lane, vec![event])),
            }
        }
        by_lane
    }

    pub fn routine(shards: u16) -> impl Iterator<Item = Lane> {
        (0..shards).map(Lane::Routine)
    }

    /// A lane from its name (`critical`, `routine-{n}`).
    pub fn parse(name: &str) -> Option<Lane> {
        match name {
            "critical" => Some(Lane::Critical),
            _ => name
                .strip_prefix("routine-")?
                .parse()
                .ok()
                .map(Lane::Routine),
        }
    }

    /// The lane's name in keys, fences and status.
    pub fn name(&self) -> String {
        match self {
            Lane::Critical => "critical".into(),
            Lane::Routine(n) => format!("routine-{n}"),
        }
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, 64 bits, continued from `h`: stable across processes, versions and platforms, which
/// `std`'s hasher is not.
fn fnv1a_from(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Events queued in the routine lanes, of a lane → depth list: what backpressure compares with
/// the watermarks (critical events are never held back).
pub fn routine_depth(depths: &[(Lane, u64)]) -> u64 {
    depths
        .iter()
        .filter(|(l, _)| *l != Lane::Critical)
        .map(|(_, d)| d)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sensor_always_maps_to_the_same_lane_and_critical_kinds_to_theirs() {
        let mk = |sensor: &str, kind: &str| Event {
            house_id: "house-1".into(),
            sensor_id: sensor.into(),
            kind: kind.into(),
            value: 1.0,
            unit: None,
            source_unit: None,
            seq: None,
            ts_ms: 0,
            received_us: 0,
            ingest_id: None,
        };
        assert_eq!(Lane::for_event(&mk("s1", "smoke"), 8), Lane::Critical);
        let a = Lane::for_event(&mk("s1", "temperature"), 8);
        assert_eq!(a, Lane::for_event(&mk("s1", "humidity"), 8));
        // The hash is fixed forever: a change would reorder every installation's sensors.
        assert_eq!(fnv1a_from(FNV_OFFSET, b"s1"), 0x08d8_ff07_b578_d149);
        assert_eq!(
            fnv1a_from(FNV_OFFSET, b"house-1/s1"),
            fnv1a_from(fnv1a_from(fnv1a_from(FNV_OFFSET, b"house-1"), b"/"), b"s1")
        );
        // Two houses' `kitchen`s are two sensors, on lanes of their own.
        let kitchens: std::collections::HashSet<_> = (0..64)
            .map(|i| Lane::of(&format!("house-{i}"), "kitchen", "power", 8))
            .collect();
        assert_eq!(kitchens.len(), 8);
        let spread: std::collections::HashSet<_> = (0..200)
            .map(|i| Lane::for_event(&mk(&format!("sensor-{i}"), "power"), 8))
            .collect();
        assert_eq!(spread.len(), 8);
    }
}
