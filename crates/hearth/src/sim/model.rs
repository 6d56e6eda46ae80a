//! Simulated sensors that behave like real ones: temperature and humidity drift, motion comes in
//! bursts, doors open then close, light follows the time of day, smoke is rare. Each sensor has
//! its own `seq`, starting at 1, so hearth can tell a lost reading from a late one.

/// What a simulated sensor measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Temperature,
    Humidity,
    Motion,
    Door,
    Window,
    Light,
    Power,
    Co2,
    Battery,
    Smoke,
}

impl Kind {
    /// The mix of a house: the i-th sensor of a house has kind `MIX[i % MIX.len()]`.
    pub const MIX: [Kind; 10] = [
        Kind::Temperature,
        Kind::Humidity,
        Kind::Motion,
        Kind::Door,
        Kind::Light,
        Kind::Power,
        Kind::Window,
        Kind::Co2,
        Kind::Battery,
        Kind::Smoke,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Temperature => "temperature",
            Kind::Humidity => "humidity",
            Kind::Motion => "motion",
            Kind::Door => "door",
            Kind::Window => "window",
            Kind::Light => "light",
            Kind::Power => "power",
            Kind::Co2 => "co2",
            Kind::Battery => "battery",
            Kind::Smoke => "smoke",
        }
    }

    fn unit(self) -> Option<&'static str> {
        match self {
            Kind::Temperature => Some("°C"),
            Kind::Humidity | Kind::Battery => Some("%"),
            Kind::Light => Some("lx"),
            Kind::Power => Some("W"),
            Kind::Co2 => Some("ppm"),
            _ => None,
        }
    }
}

/// One simulated sensor.
pub struct Sensor {
    pub house: String,
    pub id: String,
    pub kind: Kind,
    pub seq: u64,
    level: f64,
    /// Readings left in the current burst (motion), opening (door, window) or alarm (smoke).
    hold: u32,
    rng: fastrand::Rng,
}

impl Sensor {
    pub fn new(house: usize, index: usize, seed: u64) -> Sensor {
        let kind = Kind::MIX[index % Kind::MIX.len()];
        let mut rng = fastrand::Rng::with_seed(seed ^ ((house as u64) << 20) ^ index as u64);
        let level = match kind {
            Kind::Temperature => rng.f64() * 4.0 + 19.0,
            Kind::Humidity => rng.f64() * 20.0 + 40.0,
            Kind::Power => rng.f64() * 400.0 + 100.0,
            Kind::Co2 => rng.f64() * 200.0 + 450.0,
            Kind::Battery => 100.0 - rng.f64() * 30.0,
            _ => 0.0,
        };
        Sensor {
            house: format!("house-{house}"),
            id: format!("house-{house}-{}-{index}", kind.name()),
            kind,
            seq: 0,
            level,
            hold: 0,
            rng,
        }
    }

    pub fn topic(&self) -> String {
        format!("hearth/{}/{}", self.house, self.id)
    }

    /// The next reading, at `now_ms`, as a native payload; and whether it is an alarm.
    pub fn next(&mut self, now_ms: i64) -> (Vec<u8>, bool) {
        self.seq += 1;
        let rng = &mut self.rng;
        let value: f64 = match self.kind {
            Kind::Temperature => {
                // A random walk pulled back towards 21 °C.
                self.level += (rng.f64() - 0.5) * 0.2 + (21.0 - self.level) * 0.01;
                round(self.level, 1)
            }
            Kind::Humidity => {
                self.level = (self.level + (rng.f64() - 0.5) * 0.8 + (50.0 - self.level) * 0.01)
                    .clamp(20.0, 90.0);
                round(self.level, 1)
            }
            Kind::Power => {
                self.level = (self.level + (rng.f64() - 0.5) * 60.0).clamp(20.0, 4000.0);
                round(self.level, 0)
            }
            Kind::Co2 => {
                self.level = (self.level + (rng.f64() - 0.5) * 20.0).clamp(380.0, 2000.0);
                round(self.level, 0)
            }
            Kind::Battery => {
                self.level = (self.level - 0.01).max(5.0);
                round(self.level, 1)
            }
            Kind::Light => {
                // Daylight: a sine from 06:00 to 18:00 (UTC), lamps in the evening.
                let hour = (now_ms / 3_600_000 % 24) as f64 + (now_ms % 3_600_000) as f64 / 3.6e6;
                let sun = (std::f64::consts::PI * (hour - 6.0) / 12.0).sin().max(0.0) * 800.0;
                let lamps = if (18.0..23.0).contains(&hour) {
                    150.0
                } else {
                    0.0
                };
                round(sun + lamps + rng.f64() * 10.0, 0)
            }
            Kind::Motion => bursts(&mut self.hold, rng, 0.02, 5..20),
            Kind::Door | Kind::Window => bursts(&mut self.hold, rng, 0.01, 3..30),
            Kind::Smoke => bursts(&mut self.hold, rng, 1.0 / 20_000.0, 2..4),
        };
        let alarm = self.kind == Kind::Smoke && value == 1.0;
        let boolean = matches!(
            self.kind,
            Kind::Motion | Kind::Door | Kind::Window | Kind::Smoke
        );
        let value = if boolean {
            serde_json::Value::Bool(value == 1.0)
        } else {
            serde_json::json!(value)
        };
        let mut reading = serde_json::json!({
            "kind": self.kind.name(),
            "value": value,
            "seq": self.seq,
            "ts": now_ms,
        });
        if let Some(unit) = self.kind.unit() {
            reading["unit"] = unit.into();
        }
        (reading.to_string().into_bytes(), alarm)
    }
}

/// A two-state signal: mostly 0, sometimes 1 for a while.
fn bursts(
    hold: &mut u32,
    rng: &mut fastrand::Rng,
    start: f64,
    length: std::ops::Range<u32>,
) -> f64 {
    if *hold > 0 {
        *hold -= 1;
        return 1.0;
    }
    if rng.f64() < start {
        *hold = rng.u32(length);
        return 1.0;
    }
    0.0
}

fn round(v: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (v * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, Limits};

    #[test]
    fn every_reading_is_valid_for_hearth_and_counts_its_seq() {
        let now_ms = 1_764_139_200_000;
        for index in 0..Kind::MIX.len() {
            let mut sensor = Sensor::new(3, index, 42);
            for expected_seq in 1..=2_000 {
                let (payload, _) = sensor.next(now_ms + expected_seq);
                let decoded =
                    codec::decode(&sensor.topic(), &payload, now_ms * 1000, &Limits::default());
                assert!(
                    decoded.rejections.is_empty(),
                    "{:?}: {:?}",
                    sensor.kind,
                    decoded.rejections
                );
                assert_eq!(decoded.events[0].seq, Some(expected_seq));
            }
        }
    }

    #[test]
    fn doors_open_then_close() {
        let mut door = Sensor::new(0, 3, 7);
        assert_eq!(door.kind, Kind::Door);
        let values: Vec<bool> = (0..5_000)
            .map(|i| {
                let (p, _) = door.next(i);
                let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
                v["value"].as_bool().unwrap()
            })
            .collect();
        let opened = values.windows(2).filter(|w| !w[0] && w[1]).count();
        let closed = values.windows(2).filter(|w| w[0] && !w[1]).count();
        assert!(
            opened > 10 && closed + 1 >= opened,
            "{opened} opened, {closed} closed"
        );
    }
}
