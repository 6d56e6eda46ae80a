//! Rollups: per (house, sensor, kind), the count, sum, min, max and last value of the readings
//! of each minute, hour and day (UTC), read as a series by
//! `GET /houses/{house}/sensors/{sensor}/series`. Each stored row counts once, folded in every
//! second ([`crate::sweeps::rollups`]): on PostgreSQL a worker's insert appends what the rows it
//! actually inserted add to their minutes, in that statement, and the fold (by one worker
//! process at a time) moves those deltas into the rollups (a series reads both); SQLite, whose one writer
//! stores rows in id order, adds the rows past a mark, mark and rollups in one transaction (and
//! before every series read). They do not depend on the raw rows once written: retention of raw
//! rows leaves them (minute rollups have their own days, [`crate::keep::Keep`]).

use serde::Serialize;
use utoipa::ToSchema;

/// A rollup's width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ToSchema)]
#[schema(rename_all = "lowercase")]
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

/// A stored reading, as the rollups see it.
#[derive(Debug, Clone, Copy)]
pub struct Stored<'a> {
    pub house_id: &'a str,
    pub sensor_id: &'a str,
    pub kind: &'a str,
    pub value: f64,
    pub ts_ms: i64,
    /// Its storage id: the later of two readings at one time is the one stored last.
    pub id: i64,
}

/// The rollups of `stored`, one per (house, sensor, kind, step, bucket).
pub fn fold(stored: &[Stored<'_>]) -> Vec<Rollup> {
    type Key<'a> = (&'a str, &'a str, &'a str, Step, i64);
    let mut out: std::collections::HashMap<Key<'_>, Rollup> = std::collections::HashMap::new();
    for e in stored {
        for step in Step::ALL {
            let bucket = step.bucket(e.ts_ms);
            let key = (e.house_id, e.sensor_id, e.kind, step, bucket);
            match out.get_mut(&key) {
                Some(r) => {
                    r.count += 1;
                    r.sum += e.value;
                    r.min = r.min.min(e.value);
                    r.max = r.max.max(e.value);
                    if (e.ts_ms, e.id) >= (r.last_ts, r.last_id) {
                        (r.last_ts, r.last_id, r.last) = (e.ts_ms, e.id, e.value);
                    }
                }
                None => {
                    out.insert(
                        key,
                        Rollup {
                            house_id: e.house_id.to_string(),
                            sensor_id: e.sensor_id.to_string(),
                            kind: e.kind.to_string(),
                            step,
                            bucket,
                            count: 1,
                            sum: e.value,
                            min: e.value,
                            max: e.value,
                            last_ts: e.ts_ms,
                            last_id: e.id,
                            last: e.value,
                        },
                    );
                }
            }
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
