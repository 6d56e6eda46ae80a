//! How long readings and cleared alerts are kept: the retention policy both stores apply.
//!
//! Readings are kept `retention_days` (0: forever), or a kind's own days from
//! `retention_by_kind` (`power=30,motion=7`). Rollups outlive the raw rows they summarise, so a
//! year of a sensor stays chartable after its readings are gone: hour and day rollups are never
//! expired, minute ones after `rollup_minute_days` (0: never), by their minute. A reading that
//! comes later than that for its minute is not folded into it (its hour and day count it).
//!
//! PostgreSQL keeps readings in partitions, by the days their class keeps (the days of their
//! kind when stored) and then by when they were received, so expiring them is dropping whole
//! partitions ([`Keep::partition_days`] wide), never deleting rows from the hot table. A class
//! the configuration no longer names (the retention changed) expires after the longest days
//! configured, so that nothing the current policy keeps is dropped. SQLite deletes expired rows
//! by the current policy, in bounded chunks.

use std::collections::BTreeMap;

use crate::config::Config;

/// Microseconds in a day.
pub const DAY_US: i64 = 86_400_000_000;

/// The retention policy of the configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Keep {
    /// Days a reading is kept unless its kind has its own; 0 keeps forever.
    pub days: u32,
    /// Kinds with their own days (0: forever).
    pub by_kind: BTreeMap<String, u32>,
    /// Days a cleared alert is kept after it cleared; 0 keeps forever.
    pub alert_days: u32,
    /// Days a minute rollup is kept, by its minute; 0 keeps forever.
    pub minute_rollup_days: u32,
}

impl Keep {
    pub fn from_config(config: &Config) -> Keep {
        Keep {
            days: config.retention_days,
            // Validated at start.
            by_kind: parse_by_kind(&config.retention_by_kind).unwrap_or_default(),
            alert_days: config.alert_retention_days,
            minute_rollup_days: config.rollup_minute_days,
        }
    }

    /// The minute before which minute rollups are expired at `now_us` (epoch ms; `None`: never).
    pub fn minute_rollup_cutoff_ms(&self, now_us: i64) -> Option<i64> {
        match self.minute_rollup_days {
            0 => None,
            d => Some((now_us - i64::from(d) * DAY_US) / 1000),
        }
    }

    /// `q` without the minutes expired at `now_us`: a series never shows a minute the next sweep
    /// removes, nor one that late readings alone would make again.
    pub fn unexpired(
        &self,
        q: &crate::series::SeriesQuery,
        now_us: i64,
    ) -> crate::series::SeriesQuery {
        let mut q = q.clone();
        if q.step == crate::series::Step::Minute
            && let Some(cutoff) = self.minute_rollup_cutoff_ms(now_us)
        {
            q.from = q.from.max(cutoff);
        }
        q
    }

    /// The days readings of `kind` are kept (0: forever): their class.
    pub fn days_of(&self, kind: &str) -> u32 {
        self.by_kind.get(kind).copied().unwrap_or(self.days)
    }

    /// Every class the configuration names, in order.
    pub fn classes(&self) -> Vec<u32> {
        let mut c: Vec<u32> = std::iter::once(self.days)
            .chain(self.by_kind.values().copied())
            .collect();
        c.sort_unstable();
        c.dedup();
        c
    }

    /// The longest days configured (`None`: something is kept forever): how long a class the
    /// configuration no longer names is kept.
    pub fn longest(&self) -> Option<u32> {
        let c = self.classes();
        if c.contains(&0) {
            None
        } else {
            c.last().copied()
        }
    }

    /// How long readings of a stored class are kept now (`None`: forever).
    pub fn days_of_class(&self, class: u32) -> Option<u32> {
        if self.classes().contains(&class) {
            (class > 0).then_some(class)
        } else {
            self.longest()
        }
    }

    /// Width of a class's partitions in days: about a month of them for short retentions,
    /// weeks up to a year, months beyond (and forever). A reading is dropped with its partition,
    /// so it is kept up to this much longer than its class says.
    pub fn partition_days(class: u32) -> i64 {
        match class {
            1..=31 => 1,
            32..=400 => 7,
            _ => 30,
        }
    }

    /// The partition (start and end, epoch µs) holding a reading received at `received_us`.
    pub fn partition_of(class: u32, received_us: i64) -> (i64, i64) {
        let width = Keep::partition_days(class) * DAY_US;
        let start = received_us.div_euclid(width) * width;
        (start, start + width)
    }

    /// Whether a partition of `class` ending at `end_us` holds only expired readings at `now_us`.
    pub fn expired(&self, class: u32, end_us: i64, now_us: i64) -> bool {
        self.days_of_class(class)
            .is_some_and(|days| end_us <= now_us - i64::from(days) * DAY_US)
    }

    /// The readings' part of the policy as one string (`days;kind=days,...`): two writers with
    /// the same one put every kind in the same class.
    pub fn canonical(&self) -> String {
        let kinds: Vec<String> = self
            .by_kind
            .iter()
            .map(|(k, d)| format!("{k}={d}"))
            .collect();
        format!("{};{}", self.days, kinds.join(","))
    }

    /// The time before which a reading of `kind` is expired at `now_us` (`None`: never).
    pub fn cutoff_us(&self, kind: &str, now_us: i64) -> Option<i64> {
        match self.days_of(kind) {
            0 => None,
            days => Some(now_us - i64::from(days) * DAY_US),
        }
    }
}

/// What a retention sweep removed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Expired {
    /// Partitions of readings dropped (PostgreSQL).
    pub partitions: Vec<String>,
    /// Readings deleted row by row (SQLite).
    pub readings: u64,
    /// Cleared alerts deleted.
    pub alerts: u64,
    /// Minute rollups deleted.
    pub rollups: u64,
}

/// `kind=days,kind=days` (whitespace allowed around each).
pub fn parse_by_kind(text: &str) -> Result<BTreeMap<String, u32>, String> {
    let mut map = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (kind, days) = item
            .split_once('=')
            .ok_or_else(|| format!("retention_by_kind: expected kind=days, got {item:?}"))?;
        let (kind, days) = (kind.trim(), days.trim());
        if !crate::event::is_valid_id(kind) {
            return Err(format!(
                "retention_by_kind: kind {kind:?} must be [A-Za-z0-9_.-]{{1,64}}"
            ));
        }
        let days: u32 = days
            .parse()
            .ok()
            .filter(|d| *d <= MAX_DAYS)
            .ok_or_else(|| format!("retention_by_kind: {kind}: days must be 0..={MAX_DAYS}"))?;
        if map.insert(kind.to_string(), days).is_some() {
            return Err(format!("retention_by_kind: {kind} is named twice"));
        }
        if map.len() > MAX_KINDS {
            return Err(format!("retention_by_kind: at most {MAX_KINDS} kinds"));
        }
    }
    Ok(map)
}

/// The longest retention that can be configured (100 years).
pub const MAX_DAYS: u32 = 36_500;
/// Most kinds with days of their own (each class is a set of partitions).
pub const MAX_KINDS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    fn keep(days: u32, by_kind: &str) -> Keep {
        Keep {
            days,
            by_kind: parse_by_kind(by_kind).unwrap(),
            alert_days: 0,
            minute_rollup_days: 0,
        }
    }

    #[test]
    fn minutes_expire_by_their_own_days_and_only_minutes() {
        use crate::series::{SeriesQuery, Step};
        let now_us = 100 * DAY_US;
        let mut k = keep(0, "");
        assert_eq!(k.minute_rollup_cutoff_ms(now_us), None);
        k.minute_rollup_days = 5;
        let cutoff = 95 * DAY_US / 1000;
        assert_eq!(k.minute_rollup_cutoff_ms(now_us), Some(cutoff));
        let q = |step| SeriesQuery {
            house: "h".into(),
            sensor: "s".into(),
            kind: "temperature".into(),
            step,
            from: 0,
            to: now_us / 1000,
        };
        assert_eq!(k.unexpired(&q(Step::Minute), now_us).from, cutoff);
        assert_eq!(k.unexpired(&q(Step::Hour), now_us).from, 0);
        assert_eq!(k.unexpired(&q(Step::Day), now_us).from, 0);
    }

    #[test]
    fn a_kind_keeps_its_own_days() {
        let k = keep(90, "power=30, motion = 7");
        assert_eq!(k.days_of("power"), 30);
        assert_eq!(k.days_of("temperature"), 90);
        assert_eq!(k.classes(), vec![7, 30, 90]);
        assert_eq!(k.longest(), Some(90));
        assert_eq!(k.canonical(), "90;motion=7,power=30");
        assert_eq!(Keep::default().canonical(), "0;");
        assert_eq!(keep(0, "power=30").longest(), None);
    }

    #[test]
    fn a_class_no_longer_configured_follows_the_longest() {
        let k = keep(90, "power=30");
        assert_eq!(k.days_of_class(30), Some(30));
        assert_eq!(k.days_of_class(365), Some(90));
        assert_eq!(k.days_of_class(0), Some(90));
        assert_eq!(keep(0, "").days_of_class(30), None);
    }

    #[test]
    fn partitions_tile_time() {
        let day = DAY_US;
        assert_eq!(Keep::partition_of(7, day + 5), (day, 2 * day));
        assert_eq!(Keep::partition_of(90, 15 * day), (14 * day, 21 * day));
        let k = keep(7, "");
        assert!(k.expired(7, 10 * day, 17 * day));
        assert!(!k.expired(7, 10 * day, 17 * day - 1));
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(parse_by_kind("power").is_err());
        assert!(parse_by_kind("power=x").is_err());
        assert!(parse_by_kind("power=1,power=2").is_err());
        assert!(parse_by_kind("bad kind=1").is_err());
        assert!(parse_by_kind(&format!("power={}", MAX_DAYS + 1)).is_err());
        assert!(parse_by_kind("").unwrap().is_empty());
    }
}
