//! Rollups: per (house, sensor, kind), the count, sum, min, max and last value of the readings
//! of each minute, hour and day (UTC), kept by the store in the transaction that inserts the
//! readings (only rows actually inserted count, so a redelivery adds nothing), and read as a
//! series by `GET /houses/{house}/sensors/{sensor}/series`. They do not depend on the raw rows
//! once written: retention of raw rows leaves them.

use serde::Serialize;
use utoipa::ToSchema;

use crate::event::Event;

/// A rollup's width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    Minute,
    Hour,
    Day,
}

impl Step {
    pub const ALL: [Step; 3] = [Step::Minute, Step::Hour, Step::Day];

    pub fn name(self) -> &'static str {
        match self {
            Step::Minute => "minute",
            Step::Hour => "hour",
            Step::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|st| st.name() == s)
    }

    pub fn ms(self) -> i64 {
        match self {
            Step::Minute => 60_000,
            Step::Hour => 3_600_000,
            Step::Day => 86_400_000,
        }
    }

    /// The bucket (its start, epoch ms, UTC) holding `ts_ms`.
    pub fn bucket(self, ts_ms: i64) -> i64 {
        ts_ms - ts_ms.rem_euclid(self.ms())
    }
}

/// One bucket of a series.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Point {
    /// The bucket's start, epoch milliseconds (UTC).
    pub bucket: i64,
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    /// The value of the bucket's latest reading (by reading time, then storage order).
    pub last: f64,
}

/// What a series is asked for.
#[derive(Debug, Clone)]
pub struct SeriesQuery {
    pub house: String,
    pub sensor: String,
    pub kind: String,
    pub step: Step,
    /// Epoch ms, inclusive (buckets starting at or after it).
    pub from: i64,
    /// Epoch ms, exclusive.
    pub to: i64,
}

/// Most buckets one series request may span.
pub const MAX_POINTS: i64 = 10_000;

/// A bucket being summed: what the store adds to its row.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    pub house_id: String,
    pub sensor_id: String,
    pub kind: String,
    pub step: Step,
    pub bucket: i64,
    pub count: i64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// The latest reading's time (epoch ms) and storage id: the latest by time, then by id.
    pub last_ts: i64,
    pub last_id: i64,
    pub last: f64,
}

impl Rollup {
    /// Add another part of the same bucket.
    pub fn merge(&mut self, other: &Rollup) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if (other.last_ts, other.last_id) >= (self.last_ts, self.last_id) {
            self.last_ts = other.last_ts;
            self.last_id = other.last_id;
            self.last = other.last;
        }
    }
}

/// The rollups of `inserted` (each with its storage id), one per (house, sensor, kind, step,
/// bucket).
pub fn fold(inserted: &[(&Event, i64)]) -> Vec<Rollup> {
    let mut out: std::collections::BTreeMap<(&str, &str, &str, Step, i64), Rollup> =
        std::collections::BTreeMap::new();
    for (e, id) in inserted {
        for step in Step::ALL {
            let bucket = step.bucket(e.ts_ms);
            let one = Rollup {
                house_id: e.house_id.clone(),
                sensor_id: e.sensor_id.clone(),
                kind: e.kind.clone(),
                step,
                bucket,
                count: 1,
                sum: e.value,
                min: e.value,
                max: e.value,
                last_ts: e.ts_ms,
                last_id: *id,
                last: e.value,
            };
            out.entry((&e.house_id, &e.sensor_id, &e.kind, step, bucket))
                .and_modify(|r| r.merge(&one))
                .or_insert(one);
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_utc_floors_even_before_1970() {
        assert_eq!(Step::Minute.bucket(125_000), 120_000);
        assert_eq!(Step::Hour.bucket(3_600_000), 3_600_000);
        assert_eq!(Step::Day.bucket(-1), -86_400_000);
    }
}
