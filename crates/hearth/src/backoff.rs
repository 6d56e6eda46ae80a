//! Exponential backoff with full jitter, for every retry of a server that went away: consumers
//! that failed together do not come back together.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(50), Duration::from_secs(5))
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next delay: uniform in [0, min(cap, base * 2^attempt)], never below 1 ms.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(fastrand::u64(1..=ms))
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        for _ in 0..50 {
            assert!(b.next_delay() <= Duration::from_millis(100));
        }
        assert_eq!(b.attempts(), 50);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(10));
    }
}
