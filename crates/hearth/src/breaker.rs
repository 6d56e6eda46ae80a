//! Circuit breakers around dependencies (PostgreSQL, each webhook URL): after `threshold` failures in a
//! row the circuit opens and calls fail at once instead of waiting on a dead or drowning server;
//! after `cooldown` one call goes through as a probe (half-open): success closes the circuit,
//! failure opens it for another cooldown. `hearth_circuit_open{dependency}` is 1 while open.
//!
//! Callers keep their own retry loop; the breaker only decides whether an attempt is worth
//! making. While PostgreSQL's circuit is open, routine entries stay pending in Redis (nothing is
//! held in memory beyond the batch in hand), and the critical lane still pushes its alerts (see
//! `worker::alerting::push_provisional`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics::METRICS;

pub struct Breaker {
    dependency: std::borrow::Cow<'static, str>,
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    failures: u32,
    /// When the circuit opened; `None` while closed.
    opened: Option<Instant>,
    /// A half-open probe is in flight: others keep failing fast until it reports.
    probing: bool,
}

/// PostgreSQL, for every consumer of this process.
pub static POSTGRES: Breaker = Breaker::new("postgres", 5, Duration::from_secs(2));

impl Breaker {
    pub const fn new(dependency: &'static str, threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            dependency: std::borrow::Cow::Borrowed(dependency),
            threshold,
            cooldown,
            state: Mutex::new(State {
                failures: 0,
                opened: None,
                probing: false,
            }),
        }
    }

    /// A breaker for a dependency known at run time (a webhook URL, say).
    pub fn named(dependency: String, threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            dependency: std::borrow::Cow::Owned(dependency),
            threshold,
            cooldown,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May a call be made now? Closed: yes. Open: no, until the cooldown is over; then one
    /// caller gets to probe.
    pub fn allow(&self) -> bool {
        let mut s = self.lock();
        match s.opened {
            None => true,
            Some(at) if !s.probing && at.elapsed() >= self.cooldown => {
                s.probing = true;
                true
            }
            Some(_) => false,
        }
    }

    pub fn is_open(&self) -> bool {
        self.lock().opened.is_some()
    }

    /// The dependency answered.
    pub fn success(&self) {
        let mut s = self.lock();
        if s.opened.is_some() {
            tracing::info!(dependency = %self.dependency, "circuit closed");
        }
        *s = State::default();
        METRICS.circuit_open.with(&self.dependency).set(0.0);
    }

    /// The dependency failed (unreachable, or an error of its own, not of the request's content).
    pub fn failure(&self) {
        let mut s = self.lock();
        s.failures = s.failures.saturating_add(1);
        let reopen = s.probing || (s.opened.is_none() && s.failures >= self.threshold);
        s.probing = false;
        if reopen {
            if s.opened.is_none() {
                tracing::warn!(
                    dependency = %self.dependency,
                    failures = s.failures,
                    "circuit open"
                );
            }
            s.opened = Some(Instant::now());
            METRICS.circuit_open.with(&self.dependency).set(1.0);
        }
    }
}

/// How often a process shares its circuit states, and how long a shared state counts.
pub const SHARE_EVERY: Duration = Duration::from_secs(1);
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_after_cooldown_and_closes_on_success() {
        let b = Breaker::new("test-breaker", 3, Duration::from_millis(50));
        for _ in 0..2 {
            assert!(b.allow());
            b.failure();
        }
        assert!(!b.is_open(), "below the threshold");
        b.failure();
        assert!(b.is_open());
        assert!(!b.allow(), "open: fail fast");
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.allow(), "half-open: one probe");
        assert!(!b.allow(), "only one probe at a time");
        b.failure();
        assert!(b.is_open() && !b.allow(), "a failed probe reopens");
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.allow());
        b.success();
        assert!(!b.is_open() && b.allow() && b.allow(), "closed again");
        assert_eq!(crate::metrics::circuits().get("test-breaker"), Some(&false));
    }
}
