//! When each message of a load is due: a rate that changes over time, as straight-line stages
//! ("ramp from 0 to 1,000/s over 30 s, hold 60 s, back to 0 over 30 s"), or no schedule at all
//! (as fast as the broker takes them).

use std::time::Duration;

use crate::config::parse_duration;

/// Resolution of the schedule: messages due within one slot are sent together.
const SLOT: Duration = Duration::from_millis(10);

/// One stage: the rate goes from `from` to `to` events per second, linearly, over `duration`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub duration: Duration,
    pub from: f64,
    pub to: f64,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    /// Messages due by the end of each slot (cumulative), or `None` for as fast as possible.
    cumulative: Option<Vec<u64>>,
    total: u64,
}

impl Schedule {
    /// `total` messages, as fast as possible.
    pub fn unpaced(total: u64) -> Schedule {
        Schedule {
            cumulative: None,
            total,
        }
    }

    /// A constant rate for `duration`.
    pub fn steady(rate: f64, duration: Duration) -> Schedule {
        Schedule::stages(&[Stage {
            duration,
            from: rate,
            to: rate,
        }])
    }

    pub fn stages(stages: &[Stage]) -> Schedule {
        let mut cumulative = Vec::new();
        let mut exact = 0.0f64;
        for stage in stages {
            let slots = (stage.duration.as_secs_f64() / SLOT.as_secs_f64())
                .round()
                .max(1.0) as usize;
            for i in 0..slots {
                let mid = (i as f64 + 0.5) / slots as f64;
                let rate = stage.from + (stage.to - stage.from) * mid;
                exact += rate.max(0.0) * SLOT.as_secs_f64();
                cumulative.push((exact + 1e-6).floor() as u64);
            }
        }
        let total = cumulative.last().copied().unwrap_or(0);
        Schedule {
            cumulative: Some(cumulative),
            total,
        }
    }

    /// Parse `10s:100,30s:1000,10s:0`: each item ramps from the previous rate (0 at first) to
    /// the given one over the given time. `30s:=500` holds 500 for 30 s.
    pub fn parse(spec: &str) -> Result<Vec<Stage>, String> {
        let mut stages = Vec::new();
        let mut rate = 0.0;
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (d, r) = item
                .split_once(':')
                .ok_or_else(|| format!("stage {item:?} is not DURATION:RATE"))?;
            let duration = parse_duration(d)?;
            let (hold, r) = match r.strip_prefix('=') {
                Some(r) => (true, r),
                None => (false, r),
            };
            let to: f64 = r
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("rate {r:?} in stage {item:?} is not a number >= 0"))?;
            let from = if hold { to } else { rate };
            stages.push(Stage { duration, from, to });
            rate = to;
        }
        if stages.is_empty() {
            return Err("no stage given".into());
        }
        Ok(stages)
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// When message `n` (0-based) is due, from the start; `None` means now.
    pub fn due(&self, n: u64) -> Option<Duration> {
        let cumulative = self.cumulative.as_ref()?;
        // The first slot whose cumulative count exceeds n.
        let slot = cumulative.partition_point(|c| *c <= n);
        Some(SLOT * slot as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_rate_spreads_messages_evenly() {
        let s = Schedule::steady(1000.0, Duration::from_secs(2));
        assert_eq!(s.total(), 2000);
        assert_eq!(s.due(0), Some(Duration::ZERO));
        assert_eq!(s.due(999), Some(Duration::from_millis(990)));
        assert_eq!(s.due(1000), Some(Duration::from_secs(1)));
    }

    #[test]
    fn stages_ramp_and_hold() {
        let stages = Schedule::parse("10s:100, 10s:=100, 10s:0").unwrap();
        assert_eq!(
            stages[0],
            Stage {
                duration: Duration::from_secs(10),
                from: 0.0,
                to: 100.0
            }
        );
        assert_eq!(stages[1].from, 100.0);
        let s = Schedule::stages(&stages);
        // 500 ramping up, 1000 held, 500 ramping down
        assert_eq!(s.total(), 2000);
        assert!(s.due(1999).unwrap() < Duration::from_secs(30));
        assert!(Schedule::parse("10x:5").is_err());
        assert!(Schedule::parse("10s").is_err());
        assert!(Schedule::unpaced(5).due(3).is_none());
    }
}
