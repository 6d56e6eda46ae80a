//! What one key (a house, a token) may take: a rate, as token buckets, alone or one per key (a
//! house token's API requests, a house's MQTT publishes) in a bounded map; or places held at
//! once ([`Places`]: a house's push clients, its MQTT connections).
//!
//! Two ways to spend: [`Buckets::take`] takes one or says how long until one is there (the API
//! answers 429); [`Buckets::spend`] takes what was already done, going into debt, and says how
//! long the spender should hold what comes next (the embedded broker, which slows a client down
//! by holding its publishes instead of refusing them).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A rate: `per_second` on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// A token bucket: full, it holds `burst`; it fills at `per_second`; spent past empty, it owes.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    left: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            left: f64::from(rate.burst),
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) -> f64 {
        let per_second = f64::from(rate.per_second.max(1));
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.left = (self.left + elapsed * per_second).min(f64::from(rate.burst.max(1)));
        self.at = now;
        per_second
    }

    /// Take one; else how long until one is there.
    pub fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        let per_second = self.refill(rate, now);
        if self.left >= 1.0 {
            self.left -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.left) / per_second))
        }
    }

    /// Take `n`, owing what is not there, at most one burst: how long until the debt is paid
    /// (zero without one; at most `burst / per_second`).
    pub fn spend(&mut self, n: u32, rate: Rate, now: Instant) -> Duration {
        self.refill(rate, now);
        self.left = (self.left - f64::from(n)).max(-f64::from(rate.burst.max(1)));
        self.owed(rate, now)
    }

    /// How long until what it owes is paid (zero when it owes nothing).
    pub fn owed(&mut self, rate: Rate, now: Instant) -> Duration {
        let per_second = self.refill(rate, now);
        Duration::from_secs_f64((-self.left).max(0.0) / per_second)
    }

    /// Whether it has filled up again since it was last taken from.
    fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let refill = (f64::from(rate.burst) - self.left) / f64::from(rate.per_second.max(1));
        now.saturating_duration_since(self.at).as_secs_f64() >= refill
    }
}

/// Buckets kept before the full ones are let go (a full bucket is the same as none).
pub const BUCKETS_KEPT: usize = 10_000;

/// One bucket per key, at one rate. Past [`BUCKETS_KEPT`] buckets, the full ones are let go
/// when a new key comes, so that many keys seen once cost no memory for long.
pub struct Buckets<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq> Buckets<K> {
    pub fn new(rate: Rate) -> Buckets<K> {
        Buckets {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Run `f` on `key`'s bucket, made full if it is new.
    fn with<T>(&self, key: K, f: impl FnOnce(&mut Bucket, Rate, Instant) -> T) -> T {
        let (rate, now) = (self.rate, Instant::now());
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= BUCKETS_KEPT && !buckets.contains_key(&key) {
            buckets.retain(|_, b| !b.is_full(rate, now));
        }
        let bucket = buckets
            .entry(key)
            .or_insert_with(|| Bucket::full(rate, now));
        f(bucket, rate, now)
    }

    /// [`Bucket::take`] from `key`'s bucket.
    pub fn take(&self, key: K) -> Result<(), Duration> {
        self.with(key, |b, rate, now| b.take(rate, now))
    }

    /// [`Bucket::spend`] from `key`'s bucket.
    pub fn spend(&self, key: K, n: u32) -> Duration {
        self.with(key, |b, rate, now| b.spend(n, rate, now))
    }

    /// [`Bucket::owed`] by `key`'s bucket.
    pub fn owed(&self, key: K) -> Duration {
        self.with(key, |b, rate, now| b.owed(rate, now))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

/// Places held at once: at most `total` in all, `per_key` for each key (none for the holders
/// without a key). A [`Place`] is given back when dropped.
pub struct Places<K: Hash + Eq + Clone> {
    total: usize,
    per_key: usize,
    held: Arc<Mutex<Held<K>>>,
}

struct Held<K> {
    total: usize,
    by_key: HashMap<K, usize>,
}

/// Why no place was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Every place is taken.
    All,
    /// The key holds its share (how many).
    Key(usize),
}

impl<K: Hash + Eq + Clone> Places<K> {
    pub fn new(total: usize, per_key: usize) -> Places<K> {
        Places {
            total,
            per_key,
            held: Arc::new(Mutex::new(Held {
                total: 0,
                by_key: HashMap::new(),
            })),
        }
    }

    /// A place for `key` (`None`: counted in all only).
    pub fn take(&self, key: Option<&K>) -> Result<Place<K>, Full> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.total >= self.total {
            return Err(Full::All);
        }
        if let Some(k) = key {
            let n = held.by_key.get(k).copied().unwrap_or(0);
            if n >= self.per_key {
                return Err(Full::Key(n));
            }
            held.by_key.insert(k.clone(), n + 1);
        }
        held.total += 1;
        Ok(Place {
            held: self.held.clone(),
            key: key.cloned(),
        })
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.held.lock().unwrap().by_key.len()
    }
}

/// A place taken from [`Places`], held until dropped.
pub struct Place<K: Hash + Eq> {
    held: Arc<Mutex<Held<K>>>,
    key: Option<K>,
}

impl<K: Hash + Eq> Drop for Place<K> {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.total = held.total.saturating_sub(1);
        if let Some(k) = &self.key
            && let Some(n) = held.by_key.get_mut(k)
        {
            *n -= 1;
            if *n == 0 {
                held.by_key.remove(k);
            }
        }
    }
}

/// Says yes at most once per `every` for each key (at most [`BUCKETS_KEPT`] keys remembered;
/// past it, all are forgotten): a log line that a flood would otherwise repeat.
pub struct Sampler<K> {
    every: Duration,
    last: Mutex<HashMap<K, Instant>>,
}

impl<K: Hash + Eq> Sampler<K> {
    pub fn new(every: Duration) -> Sampler<K> {
        Sampler {
            every,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key`'s turn has come (and take it).
    pub fn turn(&self, key: K) -> bool {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.len() >= BUCKETS_KEPT && !last.contains_key(&key) {
            last.clear();
        }
        match last.get(&key) {
            Some(at) if now.saturating_duration_since(*at) < self.every => false,
            _ => {
                last.insert(key, now);
                true
            }
        }
    }
}

/// Log that `house` went past one of its bounds (`bound`: the setting's name), at most once a
/// minute per house and bound: the metrics count how often, this says who.
pub fn held_back(house: &str, bound: &'static str) {
    static SAMPLER: std::sync::LazyLock<Sampler<(String, &'static str)>> =
        std::sync::LazyLock::new(|| Sampler::new(Duration::from_secs(60)));
    if SAMPLER.turn((house.to_string(), bound)) {
        tracing::warn!(
            house,
            bound,
            "a house went past one of its bounds (said at most once a minute per house and bound)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_its_share_of_the_places_and_gives_them_back() {
        let places = Places::new(3, 1);
        let (h1, h2) = ("h1".to_string(), "h2".to_string());
        let first = places.take(Some(&h1)).expect("a place");
        assert_eq!(places.take(Some(&h1)).err(), Some(Full::Key(1)));
        let _h2 = places.take(Some(&h2)).expect("h2's own");
        let _keyless = places.take(None).expect("counted in all only");
        assert_eq!(places.take(None).err(), Some(Full::All));
        drop(first);
        assert_eq!(places.keys(), 1, "h1 let go");
        assert!(places.take(Some(&h1)).is_ok(), "given back");
    }

    #[test]
    fn a_bucket_takes_its_burst_then_its_rate() {
        let rate = Rate {
            per_second: 2,
            burst: 3,
        };
        let t0 = Instant::now();
        let mut b = Bucket::full(rate, t0);
        for _ in 0..3 {
            assert!(b.take(rate, t0).is_ok());
        }
        let wait = b.take(rate, t0).expect_err("past the burst");
        assert_eq!(wait, Duration::from_millis(500));
        assert!(!b.is_full(rate, t0 + Duration::from_millis(1400)));
        // Half a second later one more; the second one after that, not yet.
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.take(rate, t1).is_ok());
        assert!(b.take(rate, t1).is_err());
        // Long idle: the burst again, never more.
        let t2 = t1 + Duration::from_secs(60);
        assert!(b.is_full(rate, t2));
        for _ in 0..3 {
            assert!(b.take(rate, t2).is_ok());
        }
        assert!(b.take(rate, t2).is_err());
    }

    #[test]
    fn a_bucket_spent_past_empty_owes_and_repays() {
        let rate = Rate {
            per_second: 10,
            burst: 5,
        };
        let t0 = Instant::now();
        let mut b = Bucket::full(rate, t0);
        assert_eq!(b.spend(5, rate, t0), Duration::ZERO);
        // 3 more at once: 0.3 s of debt, and nothing taken meanwhile.
        assert_eq!(b.spend(3, rate, t0), Duration::from_millis(300));
        assert!(b.take(rate, t0 + Duration::from_millis(200)).is_err());
        // 20 more: the debt stops at one burst (0.5 s).
        assert_eq!(b.spend(20, rate, t0), Duration::from_millis(500));
        assert_eq!(
            b.owed(rate, t0 + Duration::from_millis(100)),
            Duration::from_millis(400)
        );
        assert!(!b.is_full(rate, t0 + Duration::from_millis(900)));
        // Paid, then full again half a second later.
        let t2 = t0 + Duration::from_secs(1);
        assert!(b.is_full(rate, t2));
        assert_eq!(b.spend(5, rate, t2), Duration::ZERO);
    }

    #[test]
    fn a_sampler_says_yes_once_per_interval_per_key() {
        let sampler = Sampler::new(Duration::from_millis(50));
        assert!(sampler.turn("h1"));
        assert!(!sampler.turn("h1"));
        assert!(sampler.turn("h2"), "each key its own turn");
        std::thread::sleep(Duration::from_millis(60));
        assert!(sampler.turn("h1"));
    }

    #[test]
    fn full_buckets_are_let_go_past_the_bound() {
        let buckets = Buckets::new(Rate {
            per_second: 1_000_000,
            burst: 1,
        });
        for i in 0..BUCKETS_KEPT as u32 {
            assert!(buckets.take(i).is_ok());
        }
        std::thread::sleep(Duration::from_millis(2));
        // Every bucket has filled again: the next new key finds room.
        assert!(buckets.take(u32::MAX).is_ok());
        assert_eq!(buckets.len(), 1);
    }
}
